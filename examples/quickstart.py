"""Quickstart: anchor a LoRA fine-tune of a tiny Llama to its alignment direction.

Runs in seconds on a CPU; no download (the models are built from a config).
"""

import copy

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from asft_optim import AnchoredAdamW, build_anchors


def main() -> dict[str, float]:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    base = LlamaForCausalLM(config)  # stands in for a base checkpoint
    aligned = copy.deepcopy(base)  # ... and for its aligned (chat) twin
    with torch.no_grad():
        for p in aligned.parameters():
            p.add_(0.02 * torch.randn_like(p))

    # 1. Anchors once: C per targeted weight, from V = W_aligned - W_base.
    anchors = build_anchors(base, aligned, target_modules=["q_proj", "v_proj"], mode="safelora")

    # 2. Fine-tune the aligned model with LoRA; the optimizer is the only change.
    model = get_peft_model(aligned, LoraConfig(r=8, lora_alpha=32, target_modules=["q_proj", "v_proj"]))
    opt = AnchoredAdamW(model, anchors, anchor_lambda=1.0, lr=1e-3, weight_decay=0.0)

    batch = torch.randint(0, 128, (4, 16))
    for _ in range(5):
        loss = model(input_ids=batch, labels=batch).loss  # the task loss, untouched
        loss.backward()
        opt.step()
        opt.zero_grad()

    summary = opt.anchor_summary()  # penalty and off-anchor fraction after the last step
    print({k: round(v, 6) for k, v in summary.items()})
    return summary


if __name__ == "__main__":
    main()
