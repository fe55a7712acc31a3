"""Geometry of safety-gradient subspaces on SmolLM2-135M-Instruct: what the projection removes.

Per weight (q_proj, v_proj of every layer), ``Q`` = top-k output directions of the refusal
gradients on the even-indexed half of the lab's harmful pool (the model's own greedy
answers as targets). On held-out examples (odd-indexed harmful prompts; odd-indexed
``CHAT_PROMPTS`` with the model's own answers, standing for task gradients), the share of
each example's gradient that the projection removes, ``‖QᵀG‖² / ‖G‖²`` (summed over weights).
No evaluation prompt is read. Base model: the instruct GGUF the pretrained preset starts from.

    PYTHONPATH=. python benchmarks/refusal_geometry.py --threads 2 --prompts 16
"""

from __future__ import annotations

import sys
import time

import torch
from _common import environment, markdown_table, parser, setup, write

from asft_optim.baselines.targeted import targeted_weights
from asft_optim.lab.pretrained import load_gguf
from asft_optim.lab.prompts import CHAT_PROMPTS, HARMFUL_CHAT_PROMPTS
from asft_optim.prompt_tokens import prompt_ids
from asft_optim.refusal_gradients import greedy_refusals, refusal_subspaces

TARGETS = ["q_proj", "v_proj"]


def main(argv: list[str] | None = None) -> dict:
    p = parser(__doc__.split("\n", 1)[0])
    p.add_argument("--ranks", default="1,4,16")
    p.add_argument("--prompts", type=int, default=16, help="prompts per split")
    p.add_argument("--max-new-tokens", type=int, default=24)
    args = p.parse_args(argv)
    device = setup(args)
    ranks = [int(k) for k in args.ranks.split(",")]
    model, tokenizer, _ = load_gguf()
    n = args.prompts

    def examples(prompts):
        t = time.perf_counter()
        out = greedy_refusals(model, prompt_ids(tokenizer, list(prompts)[:n]), max_new_tokens=args.max_new_tokens,
                              eos_token_id=tokenizer.eos_token_id)
        return out, time.perf_counter() - t

    build, t_gen = examples(HARMFUL_CHAT_PROMPTS[0::2])
    t = time.perf_counter()
    subs = refusal_subspaces(model, build, target_modules=TARGETS, rank=max(ranks))  # top-k: a slice
    t_grad = time.perf_counter() - t
    print(f"build: {n} generations {t_gen:.0f} s, {n} backward passes {t_grad:.0f} s", file=sys.stderr)
    weights = targeted_weights(model, TARGETS)
    params = [w for w, _ in weights.values()]
    for w in params:
        w.requires_grad_(True)
    rows, per_split = [], {}
    for split, prompts in (("harmful (held out)", HARMFUL_CHAT_PROMPTS[1::2]), ("task (held out)", CHAT_PROMPTS[1::2])):
        exs, _ = examples(prompts)
        shares = {k: [] for k in ranks}
        for ex in exs:
            grads = torch.autograd.grad(model(**ex).loss, params)
            total = sum(float(g.double().pow(2).sum()) for g in grads)
            for k in ranks:
                inside = sum(float((subs[name].basis[:, :k].double().T @ g.double()).pow(2).sum())
                             for name, g in zip(weights, grads, strict=True))
                shares[k].append(inside / total)
        per_split[split] = shares
        for k in ranks:
            rows.append([k, split, f"{100 * sum(shares[k]) / len(shares[k]):.1f} %", len(shares[k])])
    table = markdown_table(["k", "examples", "share of the gradient removed (mean)", "n"], rows)
    table += (f"\n\nQ from {n} refusal gradients (even-indexed harmful prompts, greedy answers of ≤ "
              f"{args.max_new_tokens} tokens); q_proj/v_proj of every layer. Build: {n} generations "
              f"{t_gen:.0f} s + {n} forward/backward passes {t_grad:.0f} s on this CPU.")
    command = "PYTHONPATH=. python benchmarks/refusal_geometry.py " + " ".join(argv if argv is not None else sys.argv[1:])
    payload = {"environment": environment(device), "build_generation_s": t_gen, "build_gradient_s": t_grad,
               "shares": {s: {str(k): v for k, v in d.items()} for s, d in per_split.items()}}
    write(args.out, "refusal_geometry", payload, table, command.strip())
    return payload


if __name__ == "__main__":
    main()
