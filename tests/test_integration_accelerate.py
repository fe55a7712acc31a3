"""accelerate plain loop: ``accelerator.prepare(model, opt, dataloader, scheduler)``.

Oracle: plain AdamW on ``task + anchor_penalty`` (the loss-level twin) in a plain loop.
"""

import pytest
import torch
from accelerate import Accelerator
from integration_models import TokenDataset, trainable_state
from tiny_models import tiny_anchors, tiny_lora_llama

from asft_optim import AnchoredAdamW, anchor_penalty
from asft_optim.integrations import anchor_summary, unwrap_optimizer

LAM, LR, STEPS = 0.5, 1e-2, 3

pytestmark = pytest.mark.usefixtures("clean_accelerate")


def schedule(opt):
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / STEPS)


def test_accelerate_loop_equals_loss_level_oracle():
    data = torch.utils.data.DataLoader(TokenDataset(12), batch_size=4, shuffle=False)

    model = tiny_lora_llama()
    anchors = tiny_anchors(model)
    opt = AnchoredAdamW(model, anchors, LAM, lr=LR, weight_decay=0.0)
    accelerator = Accelerator(cpu=True)
    model, opt, dl, sched = accelerator.prepare(model, opt, data, schedule(opt))
    assert unwrap_optimizer(opt) is not None and opt is not unwrap_optimizer(opt)
    for batch in dl:
        loss = model(**batch).loss
        accelerator.backward(loss)
        opt.step()
        sched.step()
        opt.zero_grad()
    summary = anchor_summary(opt)  # one line, through accelerate's wrapper
    assert summary["anchor/penalty"] > 0
    assert unwrap_optimizer(opt).param_groups[0]["lr"] == pytest.approx(0.0)  # inner LR followed

    ref = tiny_lora_llama()
    params = [p for p in ref.parameters() if p.requires_grad]
    ref_opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    ref_sched = schedule(ref_opt)
    for batch in data:
        loss = ref(**batch).loss + anchor_penalty(ref, anchors, LAM)
        loss.backward()
        ref_opt.step()
        ref_sched.step()
        ref_opt.zero_grad()
    got, want = trainable_state(accelerator.unwrap_model(model)), trainable_state(ref)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-6)
