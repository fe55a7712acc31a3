"""Plain PyTorch loop, full fine-tuning of the anchored weights (no PEFT).

Only q_proj/v_proj are trained here; ΔW = W - W_ref with W_ref the weights when the
optimizer is built (saved in ``opt.state_dict()``). ``opt.anchor_summary()`` is the
one-line accessor for the statistics. Self-contained: tiny Llama, CPU, a few seconds.
"""

import copy

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from asft_optim import AnchoredAdamW, build_anchors


def main() -> dict[str, float]:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    base = LlamaForCausalLM(config)
    model = copy.deepcopy(base)  # the aligned model we fine-tune
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    anchors = build_anchors(base, model, target_modules=["q_proj", "v_proj"])

    for name, p in model.named_parameters():
        p.requires_grad_(name.endswith(("q_proj.weight", "v_proj.weight")))
    opt = AnchoredAdamW(model, anchors, anchor_lambda=1.0, lr=1e-3, weight_decay=0.0)

    batch = torch.randint(0, 128, (4, 16))
    for step in range(8):
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # clip first: the penalty joins in step()
        opt.step()
        opt.zero_grad()
        if step % 4 == 3:
            print(step, round(loss.item(), 4), {k: round(v, 4) for k, v in opt.anchor_summary().items()})

    summary = opt.anchor_summary()
    print({k: round(v, 6) for k, v in summary.items()})
    return summary


if __name__ == "__main__":
    main()
