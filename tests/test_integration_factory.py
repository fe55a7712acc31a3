"""``optimizer_cls_and_kwargs=(AnchoredAdamWFactory, kw)``: the Trainer calls it with the model."""

import pytest
import torch
from integration_models import TokenDataset, reset_accelerate_state, trainable_state, trainer_args
from tiny_models import tiny_anchors, tiny_llama, tiny_lora_llama
from transformers import Trainer

from asft_optim import AnchoredAdamW, AnchoredAdamWFactory
from asft_optim.integrations import unwrap_optimizer

pytestmark = pytest.mark.usefixtures("clean_accelerate")


def test_factory_route_equals_explicit_optimizer(tmp_path):
    model = tiny_lora_llama()
    kw = {"anchors": tiny_anchors(model), "anchor_lambda": 0.5, "lr": 1e-2}
    trainer = Trainer(model=model, args=trainer_args(tmp_path / "f"), train_dataset=TokenDataset(12),
                      optimizer_cls_and_kwargs=(AnchoredAdamWFactory, kw))
    trainer.train()
    opt = unwrap_optimizer(trainer.optimizer)
    assert isinstance(opt, AnchoredAdamW)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0)  # the Trainer's scheduler drives it

    reset_accelerate_state()
    model2 = tiny_lora_llama()
    opt2 = AnchoredAdamW(model2, kw["anchors"], 0.5, lr=1e-2, weight_decay=0.0)
    Trainer(model=model2, args=trainer_args(tmp_path / "o"), train_dataset=TokenDataset(12),
            optimizers=(opt2, None)).train()
    a, b = trainable_state(model), trainable_state(model2)
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=0, atol=0)


def test_factory_param_groups_follow_trainer_weight_decay_rule():
    # Full fine-tuning: norms have weights that get no decay.
    model = tiny_llama(0, torch.float32, size="integration")
    opt = AnchoredAdamWFactory()(model, anchors=tiny_anchors(model), lr=1e-3, weight_decay=0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decay = {names[id(p)] for p in opt.param_groups[0]["params"]}
    no_decay = {names[id(p)] for p in opt.param_groups[1]["params"]}
    assert opt.param_groups[0]["weight_decay"] == 0.1 and opt.param_groups[1]["weight_decay"] == 0.0
    assert all("norm" in n for n in no_decay) and no_decay
    assert any("q_proj" in n for n in decay)
    assert len(decay) + len(no_decay) == sum(p.requires_grad for p in model.parameters())


def test_factory_requires_lr_and_anchors():
    model = tiny_lora_llama()
    with pytest.raises(TypeError, match="lr="):
        AnchoredAdamWFactory()(model, anchors=tiny_anchors(model))
    with pytest.raises(TypeError, match="anchors="):
        AnchoredAdamWFactory()(model, lr=1e-3)


def test_import_asft_optim_does_not_import_transformers():
    import subprocess
    import sys

    code = ("import sys, asft_optim; assert 'transformers' not in sys.modules, 'eager'; "
            "asft_optim.AnchoredAdamWFactory; asft_optim.AnchorLoggingCallback; "
            "assert 'transformers.trainer' not in sys.modules")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
