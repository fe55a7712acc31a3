"""TRL SFTTrainer with ``peft_config=``: the optimizer comes from a model-aware factory.

TRL wraps the model with PEFT inside ``SFTTrainer.__init__``; an optimizer built
beforehand would hold the raw weights and train nothing (asft-optim raises
``AnchorError`` at the first step). ``AnchoredAdamWFactory`` is called by the Trainer
with the final PEFT model. Self-contained: tiny Llama and word-level tokenizer, CPU.
"""

import copy
import tempfile

import torch
from datasets import Dataset
from peft import LoraConfig
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from trl import SFTConfig, SFTTrainer

from asft_optim import AnchoredAdamWFactory, AnchorLoggingCallback, build_anchors
from asft_optim.integrations import unwrap_optimizer

WORDS = [f"w{i}" for i in range(60)]


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{w: i + 4 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>")


def main() -> dict[str, float]:
    torch.manual_seed(0)
    tokenizer = tiny_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
    base = LlamaForCausalLM(config)
    aligned = copy.deepcopy(base)
    with torch.no_grad():
        for p in aligned.parameters():
            p.add_(0.02 * torch.randn_like(p))
    anchors = build_anchors(base, aligned, target_modules=["q_proj", "v_proj"])

    g = torch.Generator().manual_seed(0)
    texts = [" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (12,), generator=g)) for _ in range(16)]
    with tempfile.TemporaryDirectory() as out:
        trainer = SFTTrainer(
            model=aligned,  # the raw model: TRL applies peft_config itself
            args=SFTConfig(output_dir=out, per_device_train_batch_size=4, max_steps=4, logging_steps=1,
                           max_length=32, save_strategy="no", report_to="none", use_cpu=True),
            train_dataset=Dataset.from_dict({"text": texts}),
            processing_class=tokenizer,
            peft_config=LoraConfig(r=8, lora_alpha=32, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]),
            optimizer_cls_and_kwargs=(AnchoredAdamWFactory, {"anchors": anchors, "anchor_lambda": 1.0, "lr": 1e-3}),
            callbacks=[AnchorLoggingCallback()],
        )
        trainer.train()

    summary = unwrap_optimizer(trainer.optimizer).anchor_summary()
    print({k: round(v, 6) for k, v in summary.items()})
    return summary


if __name__ == "__main__":
    main()
