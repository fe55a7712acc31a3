"""TRL SFTTrainer: a PeftModel with ``optimizers=``, the ``peft_config=`` route through the
factory, and the trap (optimizer built before PEFT wraps the model) raising AnchorError."""

import pytest
import torch
from datasets import Dataset
from integration_models import trainable_state
from tiny_models import (
    INTEGRATION_VOCAB,
    lora_config,
    tiny_anchors,
    tiny_llama,
    tiny_lora_llama,
    token_batches,
)
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast
from trl import SFTConfig, SFTTrainer

from asft_optim import AnchoredAdamW, AnchoredAdamWFactory, AnchorError, AnchorLoggingCallback
from asft_optim.integrations import unwrap_optimizer

KEYS = ("anchor/penalty", "anchor/off_anchor_mean", "anchor/off_anchor_max")

pytestmark = pytest.mark.usefixtures("clean_accelerate")


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, INTEGRATION_VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def tokenized_dataset(rows: int = 8) -> Dataset:
    ids = torch.cat(token_batches(1, batch=rows, length=10, seed=3))
    return Dataset.from_dict({"input_ids": ids.tolist()})


def sft_args(tmp_path, **kw) -> SFTConfig:
    base = dict(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2, learning_rate=1e-2,
        logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, seed=0,
        disable_tqdm=True, max_length=16, dataset_num_proc=None,
    )
    base.update(kw)
    return SFTConfig(**base)


def test_sft_with_peft_model_and_optimizer(tmp_path):
    model = tiny_lora_llama()
    before = trainable_state(model)
    opt = AnchoredAdamW(model, tiny_anchors(model), lr=1e-2)
    trainer = SFTTrainer(model=model, args=sft_args(tmp_path), train_dataset=tokenized_dataset(),
                         processing_class=tiny_tokenizer(), optimizers=(opt, None),
                         callbacks=[AnchorLoggingCallback()])
    trainer.train()
    steps = [h for h in trainer.state.log_history if "loss" in h]
    assert len(steps) == 2 and all(h["anchor/penalty"] > 0 for h in steps)
    after = trainable_state(model)
    assert all(not torch.equal(before[n], after[n]) for n in before if "lora_" in n)


def test_sft_peft_config_through_factory(tmp_path):
    model = tiny_llama(0, torch.float32, size="integration")
    anchors = tiny_anchors(model)  # HF names of the raw model: PEFT's prefix is stripped later
    trainer = SFTTrainer(
        model=model, args=sft_args(tmp_path), train_dataset=tokenized_dataset(),
        processing_class=tiny_tokenizer(), peft_config=lora_config(),
        optimizer_cls_and_kwargs=(AnchoredAdamWFactory, {"anchors": anchors, "anchor_lambda": 1.0, "lr": 1e-2}),
        callbacks=[AnchorLoggingCallback()],
    )
    trainer.train()
    opt = unwrap_optimizer(trainer.optimizer)
    assert isinstance(opt, AnchoredAdamW)
    assert {t.kind for t in opt.targets} == {"lora"} and len(opt.targets) == len(anchors)
    steps = [h for h in trainer.state.log_history if "loss" in h]
    assert len(steps) == 2 and all(h["anchor/penalty"] > 0 for h in steps)


def test_trap_optimizer_built_before_peft_wrapping_raises(tmp_path):
    model = tiny_llama(0, torch.float32, size="integration")
    anchors = tiny_anchors(model)
    opt = AnchoredAdamW(model, anchors, lr=1e-2)  # holds the raw weights; PEFT then freezes them
    trainer = SFTTrainer(model=model, args=sft_args(tmp_path), train_dataset=tokenized_dataset(),
                         processing_class=tiny_tokenizer(), peft_config=lora_config(), optimizers=(opt, None))
    with pytest.raises(AnchorError, match="no anchored parameter is trainable.*AnchoredAdamWFactory"):
        trainer.train()
