"""B4 for the data-driven operators: what each adds to an AdamW step, as a share of it.

The optimizer does not call these operators yet (issue 31's wiring is the lead's): this
times the math a step will add, on the same LoRA factors, against a full AdamW
iteration (forward + backward + step) of the same model, in interleaved rounds:

* ``input_k{k}``: :meth:`InputProjection.lora_terms` for every LoRA pair (input-side
  anchors of rank k) and the ``.grad`` accumulation ``g += λ·dP`` the step does;
* ``spf_k{k}``: :meth:`SafetySubspace.project_lora_` of every B (after the step);
* ``sum_k{k}``: a :class:`SumOperator` of two input-side parts (composition overhead);
* ``surgery_project``: :class:`~asft_optim.GradientSurgery`'s per-step work, the conflict
  rule on every trained tensor's ``.grad`` against a stored safety gradient (``"always"``,
  so the ``axpy`` always runs: the conflict rule's worst case);
* ``surgery_refresh``: its refresh, the closure's forward and ``autograd.grad`` on a safety
  batch as large as the task's; a step pays it every ``every`` steps, so the per-step
  overhead is ``surgery_project + surgery_refresh / every``.

Models: the lab model (h128, 4 layers, vocab 1024; batch 16 × 96) and SmolLM2-135M's
shapes (h576, 30 layers, 9 heads / 3 KV heads, vocab 49152; batch 8 × 128);
PEFT LoRA r=8, α=32 on q_proj/v_proj. Share = median over rounds of (part / adamw).

    PYTHONPATH=. python benchmarks/operator_cost.py --threads 1
    PYTHONPATH=. python benchmarks/operator_cost.py --tiny
"""

from __future__ import annotations

import statistics
import sys

import torch
from _common import environment, fmt_s, interleaved, markdown_table, parser, setup, summary, write
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.utils import logging as hf_logging

from asft_optim.input_projection import InputProjection, SumOperator
from asft_optim.safety_subspace import SafetySubspace
from asft_optim.surgery import GradientSurgery

MODELS = {
    "lab (h128, 4 layers)": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, heads=4, kv=4,
                                 vocab_size=1024, batch=16, seq=96, reps=30, ks=(16, 64)),
    "SmolLM2-135M shapes": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, heads=9, kv=3,
                                vocab_size=49152, batch=8, seq=128, reps=8, ks=(16, 64)),
}
TINY = {
    "tiny": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, heads=4, kv=2, vocab_size=100,
                 batch=2, seq=8, reps=3, ks=(4,)),
}


def lora_pairs(model):
    out = []
    for module in model.modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            out.append((module.lora_B["default"].weight, module.lora_A["default"].weight, module.scaling["default"]))
    return out


def bench_model(name: str, cfg: dict, device, reps: int | None) -> dict:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"], intermediate_size=cfg["intermediate_size"],
        num_hidden_layers=cfg["num_hidden_layers"], num_attention_heads=cfg["heads"],
        num_key_value_heads=cfg["kv"], max_position_embeddings=max(128, cfg["seq"]),
    )
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(
        r=8, lora_alpha=32, lora_dropout=0.0, init_lora_weights=False, target_modules=["q_proj", "v_proj"],
    )).to(device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=5e-5, weight_decay=0.0)
    ids = torch.randint(0, cfg["vocab_size"], (cfg["batch"], cfg["seq"]), generator=torch.Generator().manual_seed(2)).to(device)
    pairs = lora_pairs(model)
    g = torch.Generator().manual_seed(3)

    def orthonormal(d, k):
        return torch.linalg.qr(torch.randn(d, k, generator=g)).Q.to(device)

    def iteration():
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    fns = {"adamw": iteration}
    surgery = GradientSurgery(lambda: model(input_ids=ids, labels=ids).loss, mode="always")
    surgery.refresh(trainable)

    @torch.no_grad()
    def surgery_project():
        for p in trainable:
            p.grad = torch.ones_like(p)
        surgery.project_(trainable)
        for p in trainable:
            p.grad = None

    fns["surgery_project"] = surgery_project
    fns["surgery_refresh"] = lambda: surgery.refresh(trainable)
    for k in cfg["ks"]:
        ins = [InputProjection(orthonormal(a.shape[1], k), b.shape[0]) for b, a, _ in pairs]
        sums = [SumOperator([op, InputProjection(orthonormal(a.shape[1], k), b.shape[0])])
                for op, (b, a, _) in zip(ins, pairs, strict=True)]
        subs = [SafetySubspace(orthonormal(b.shape[0], k)) for b, _, _ in pairs]

        def penalty(ops):
            @torch.no_grad()
            def run():
                for op, (b, a, s) in zip(ops, pairs, strict=True):
                    gb, ga = op.lora_terms(b, a, s).grads
                    for p, gr in ((b, gb), (a, ga)):  # what step() does: .grad += λ·dP
                        p.grad = gr if p.grad is None else p.grad.add_(gr)
                for b, a, _ in pairs:
                    b.grad = a.grad = None
            return run

        @torch.no_grad()
        def project(subs=subs):
            for sub, (b, _, _) in zip(subs, pairs, strict=True):
                sub.project_lora_(b)

        fns[f"input_k{k}"] = penalty(ins)
        fns[f"sum_k{k}"] = penalty(sums)
        fns[f"spf_k{k}"] = project
    samples = interleaved(fns, device, reps=reps or cfg["reps"], warmup=2)
    stats = {k: summary(v) for k, v in samples.items()}
    for k, s in stats.items():
        s["share_of_adamw_step"] = statistics.median(a / b for a, b in zip(samples[k], samples["adamw"], strict=True))
    return {"model": name, "config": cfg, "lora_pairs": len(pairs), "stats": stats}


def main(argv: list[str] | None = None) -> dict:
    p = parser(__doc__.split("\n", 1)[0])
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--only", default=None, help="run only the models whose name contains this")
    args = p.parse_args(argv)
    device = setup(args)
    hf_logging.set_verbosity_error()
    results = []
    for name, cfg in (TINY if args.tiny else MODELS).items():
        if args.only and args.only not in name:
            continue
        print(f"{name}: {args.reps or cfg['reps']} interleaved rounds", file=sys.stderr)
        results.append(bench_model(name, cfg, device, args.reps))
    rows = [[r["model"], k, fmt_s(s["median_s"]), f"{fmt_s(s['p10_s'])} – {fmt_s(s['p90_s'])}", s["n"],
             "—" if k == "adamw" else f"{100 * s['share_of_adamw_step']:.2f} %"]
            for r in results for k, s in r["stats"].items()]
    table = markdown_table(["model", "variant", "median", "p10 – p90", "n", "share of an AdamW step"], rows)
    command = "PYTHONPATH=. python benchmarks/operator_cost.py " + " ".join(argv if argv is not None else sys.argv[1:])
    payload = {"environment": environment(device), "results": results}
    write(args.out, "operator_cost", payload, table, command.strip())
    return payload


if __name__ == "__main__":
    main()
