"""HF Trainer + LoRA + AnchoredAdamW, with the anchor statistics in the Trainer's logs.

Self-contained: a tiny Llama built from a config (no download), CPU, a few seconds.
The Trainer's scheduler, gradient accumulation, clipping and checkpointing work as
usual; the penalty is added inside ``optimizer.step()``, after clipping.
"""

import copy
import tempfile

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

from asft_optim import AnchoredAdamW, add_anchor_logging, build_anchors


class RandomTokens(torch.utils.data.Dataset):
    def __init__(self, rows=32, length=16, vocab=128):
        self.ids = torch.randint(0, vocab, (rows, length), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def main() -> dict[str, float]:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    base = LlamaForCausalLM(config)  # stands in for the base checkpoint
    aligned = copy.deepcopy(base)  # ... and its aligned (chat) twin
    with torch.no_grad():
        for p in aligned.parameters():
            p.add_(0.02 * torch.randn_like(p))
    anchors = build_anchors(base, aligned, target_modules=["q_proj", "v_proj"])

    model = get_peft_model(aligned, LoraConfig(r=8, lora_alpha=32, lora_dropout=0.0,
                                               target_modules=["q_proj", "v_proj"]))
    opt = AnchoredAdamW(model, anchors, anchor_lambda=1.0, lr=1e-3, weight_decay=0.0)

    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out, per_device_train_batch_size=4, gradient_accumulation_steps=2,
            max_steps=6, max_grad_norm=1.0, lr_scheduler_type="cosine", warmup_steps=1,
            logging_steps=2, save_strategy="no", report_to="none", use_cpu=True,
        )
        # optimizers=(opt, None): the Trainer builds its default scheduler on `opt`.
        trainer = Trainer(model=model, args=args, train_dataset=RandomTokens(), optimizers=(opt, None))
        add_anchor_logging(trainer)  # first callback: report_to integrations see the keys too
        trainer.train()

    logged = [h for h in trainer.state.log_history if "anchor/penalty" in h and "loss" in h]
    print("logged:", [round(h["anchor/penalty"], 4) for h in logged])
    summary = opt.anchor_summary()
    print({k: round(v, 6) for k, v in summary.items()})
    return summary


if __name__ == "__main__":
    main()
