"""accelerate in a plain loop: prepare the anchored optimizer like any other.

``accelerator.prepare`` wraps it in an ``AcceleratedOptimizer``; the scheduler drives
the inner AdamW's LR, and ``anchor_summary(opt)`` reads the statistics through the
wrapper. Self-contained: tiny Llama from a config, CPU, a few seconds.
"""

import copy

import torch
from accelerate import Accelerator
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from asft_optim import AnchoredAdamW, build_anchors
from asft_optim.integrations import anchor_summary


def main() -> dict[str, float]:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    base = LlamaForCausalLM(config)
    aligned = copy.deepcopy(base)
    with torch.no_grad():
        for p in aligned.parameters():
            p.add_(0.02 * torch.randn_like(p))
    anchors = build_anchors(base, aligned, target_modules=["q_proj", "v_proj"])
    model = get_peft_model(aligned, LoraConfig(r=8, lora_alpha=32, lora_dropout=0.0,
                                               target_modules=["q_proj", "v_proj"]))

    ids = torch.randint(0, 128, (32, 16))
    data = torch.utils.data.DataLoader([{"input_ids": x, "labels": x} for x in ids], batch_size=4)
    opt = AnchoredAdamW(model, anchors, anchor_lambda=1.0, lr=1e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LinearLR(opt, start_factor=1.0, end_factor=0.1, total_iters=len(data))

    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    model, opt, data, sched = accelerator.prepare(model, opt, data, sched)
    for step, batch in enumerate(data):
        with accelerator.accumulate(model):
            loss = model(**batch).loss
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), 1.0)  # the task gradient only
            opt.step()  # skipped by accelerate on non-final micro-batches; adds λ∇P once per step
            sched.step()
            opt.zero_grad()
        if accelerator.sync_gradients and step % 4 == 3:
            accelerator.print(step, {k: round(v, 4) for k, v in anchor_summary(opt).items()})

    summary = anchor_summary(opt)
    accelerator.print({k: round(v, 6) for k, v in summary.items()})
    return summary


if __name__ == "__main__":
    main()
