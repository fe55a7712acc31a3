"""Geometry of input-side anchors on SmolLM2-135M-Instruct: plain versus contrast.

No fine-tuning: what each form's subspace ``U`` holds of the layers' inputs, on prompts
*not* used to build it. Per anchored weight (q_proj, v_proj: the lab's LoRA targets), with
``Σ`` a per-token input covariance, the captured share ``tr(Uᵀ Σ U) / tr(Σ)`` on

* held-out harmful prompts (high: the penalty holds the layer's response to them), and
* held-out task prompts (low: the penalty leaves the task's inputs free),

for the plain form (top-k eigenvectors of the harmful covariance) and the contrast form
(``Σ_h u = μ (Σ_t + εI) u``). Split, fixed and disjoint from every evaluation prompt: the
lab's hand-written harmful pool (``HARMFUL_CHAT_PROMPTS``) and its replay chat pool
(``CHAT_PROMPTS``), even indices build, odd indices validate; the BeaverTails evaluation
prompts are never read. Base model: the instruct GGUF the lab's pretrained preset starts from
(the lab's own aligned checkpoint is not needed for geometry; rebuild on it for the grid).

    PYTHONPATH=. python benchmarks/operator_geometry.py --threads 2
"""

from __future__ import annotations

import sys
import time

import torch
from _common import environment, markdown_table, parser, setup, write

from asft_optim.activation_anchors import contrast_directions, input_covariances, top_directions
from asft_optim.lab.pretrained import load_gguf
from asft_optim.lab.prompts import CHAT_PROMPTS, HARMFUL_CHAT_PROMPTS
from asft_optim.prompt_tokens import prompt_ids, right_padded_batches, shared_prefix_length

TARGETS = ["q_proj", "v_proj"]


def captured(u: torch.Tensor, cov: torch.Tensor) -> float:
    return float(torch.trace(u.T @ cov @ u) / torch.trace(cov))


def main(argv: list[str] | None = None) -> dict:
    p = parser(__doc__.split("\n", 1)[0])
    p.add_argument("--ranks", default="8,32,128")
    p.add_argument("--keep-prefix", action="store_true",
                   help="count the chat template's shared prefix (system prompt) tokens too")
    p.add_argument("--eps", default="1e-3,0.1,1,10", help="the contrast's relative ridges, comma-separated")
    args = p.parse_args(argv)
    device = setup(args)
    ranks = [int(k) for k in args.ranks.split(",")]
    epsilons = [float(e) for e in args.eps.split(",")]
    forms = ["plain", *(f"contrast eps={e:g}" for e in epsilons)]
    t0 = time.perf_counter()
    model, tokenizer, _ = load_gguf()
    t_load = time.perf_counter() - t0
    pad = tokenizer.pad_token_id or 0

    every = prompt_ids(tokenizer, list(HARMFUL_CHAT_PROMPTS) + list(CHAT_PROMPTS))
    skip = 0 if args.keep_prefix else shared_prefix_length(every)
    print(f"shared prefix left out of the statistics: {skip} tokens", file=sys.stderr)

    def covs(prompts):
        ids = prompt_ids(tokenizer, list(prompts))
        t = time.perf_counter()
        out = input_covariances(model, right_padded_batches(ids, 8, pad, skip_prefix=skip), TARGETS)
        return out, time.perf_counter() - t, len(ids)

    sets = {
        "harmful_build": HARMFUL_CHAT_PROMPTS[0::2], "harmful_val": HARMFUL_CHAT_PROMPTS[1::2],
        "task_build": CHAT_PROMPTS[0::2], "task_val": CHAT_PROMPTS[1::2],
    }
    stats, timing = {}, {}
    for key, prompts in sets.items():
        stats[key], seconds, n = covs(prompts)
        timing[key] = {"prompts": n, "forward_s": seconds,
                       "tokens": next(iter(stats[key].values())).tokens}
        print(f"{key}: {n} prompts, {timing[key]['tokens']} tokens, {seconds:.1f} s", file=sys.stderr)
    # q_proj and v_proj of one layer read the same input: one decomposition per layer input,
    # the full spectrum once, every k a slice of it.
    agg = {(k, f): {"harmful_val": [], "task_val": []} for k in ranks for f in forms}
    per_weight, done = [], {}
    t_eig = time.perf_counter()
    for name in stats["harmful_build"]:
        layer_input = name.rsplit(".", 2)[0].replace("self_attn", "")  # same key for q/v of a layer
        if layer_input not in done:
            h, t = stats["harmful_build"][name].mean, stats["task_build"][name].mean
            full = {"plain": top_directions(h, rank=h.shape[0])[0]}
            for e in epsilons:
                full[f"contrast eps={e:g}"] = contrast_directions(h, t, rank=h.shape[0], eps=e)[2]
            done[layer_input] = {
                (k, f): (u[:, :k] if f == "plain" else torch.linalg.qr(u[:, :k]).Q)
                for k in ranks for f, u in full.items()
            }
        for (k, form), u in done[layer_input].items():
            row = {"k": k, "weight": name, "form": form}
            for split in ("harmful_val", "task_val"):
                row[split] = captured(u, stats[split][name].mean)
                agg[(k, form)][split].append(row[split])
            per_weight.append(row)
    print(f"decompositions: {time.perf_counter() - t_eig:.1f} s", file=sys.stderr)
    rows = []
    for (k, form), v in agg.items():
        hv, tv = (sum(x) / len(x) for x in (v["harmful_val"], v["task_val"]))
        rows.append([k, form, f"{100 * hv:.1f} %", f"{100 * tv:.1f} %", f"{hv / tv:.2f}"])
    table = markdown_table(
        ["k", "form", "held-out harmful energy in span(U)", "held-out task energy in span(U)", "ratio"], rows)
    table += (f"\n\nMean over {len(stats['harmful_build'])} weights (q_proj, v_proj), d_in = 576; "
              f"tokens counted: all but the {skip} of the chat template's shared prefix. Build cost: one forward pass per batch of 8 prompts "
              f"({timing['harmful_build']['prompts']} harmful prompts, "
              f"{timing['harmful_build']['forward_s']:.1f} s; + {timing['task_build']['prompts']} task prompts for "
              f"contrast, {timing['task_build']['forward_s']:.1f} s) on this CPU; model load {t_load:.0f} s.")
    command = "PYTHONPATH=. python benchmarks/operator_geometry.py " + " ".join(argv if argv is not None else sys.argv[1:])
    payload = {"environment": environment(device), "timing": timing, "skipped_prefix_tokens": skip, "eps": epsilons, "per_weight": per_weight}
    write(args.out, "operator_geometry", payload, table, command.strip())
    return payload


if __name__ == "__main__":
    main()
