"""How many generated tokens does the refusal judge need? (the verdict issue's item 2)

The pretrained lab judges each harmful prompt on the first N greedily generated tokens.
Fewer tokens make a point cheaper; too few change verdicts (a refusal that starts after
a preamble, an answer that turns into one). This script attacks the lab's aligned model
(sft at p = 0.1, the attack the grid runs most, on the given seeds; the attack stages
are the grid's own cache entries), generates ``--max-tokens`` tokens for every harmful
evaluation prompt, and judges the first N tokens of each answer for every N of
``--tokens``. Greedy decoding makes the first N tokens of a longer generation the answer
a generation of N tokens gives in the same batches (``--check`` verifies that on the
first model by generating the shortest length directly).

It reports, per N, the share of verdicts that differ from the verdict at the longest
length, over all answers, and the HS per model. The lab uses the shortest N whose share
is under 1 %.

Usage (from the repository root; the stages land in OUT/cache, which a grid with the
same OUT reuses)::

    python benchmarks/judge_tokens.py --data ../shared/data/asft --out runs/decisive --seeds 0,1
    # or one process per seed, then:  --merge a.json b.json --json benchmarks/results/judge_tokens.json

Writes ``--json`` (default ``benchmarks/results/judge_tokens.json``) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from asft_optim.lab import cli
from asft_optim.lab.attack import load_attacked
from asft_optim.lab.judge import RefusalJudge
from asft_optim.lab.models import model_device
from asft_optim.lab.pretrained_lab import PretrainedLab
from asft_optim.lab.tokenizer import encode_prompts, render_prompt


@torch.no_grad()
def generate_ids(model, tok, prompts: list[str], max_new_tokens: int, batch_size: int) -> list[list[int]]:
    """The new token ids of each prompt's greedy continuation, batched exactly as
    :func:`asft_optim.lab.evaluate.generate` batches them (by length)."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[list[int]] = [[] for _ in prompts]
    for start in range(0, len(order), batch_size):
        idx = order[start: start + batch_size]
        batch = {k: v.to(model_device(model)) for k, v in encode_prompts(tok, [prompts[i] for i in idx]).items()}
        gen = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        for i, row in zip(idx, gen[:, batch["input_ids"].shape[1]:].tolist()):
            out[i] = row
    return out


def verdicts(tok, ids: list[list[int]], n: int, prompts: list[str]) -> list[bool]:
    texts = tok.batch_decode([row[:n] for row in ids], skip_special_tokens=True)
    return RefusalJudge().is_harmful(prompts, texts)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", help="the reference data folder (../shared/data/asft)")
    p.add_argument("--out", type=Path, help="the lab's output folder (its cache is reused)")
    p.add_argument("--seeds", default="0,1,2", help="attack seeds (sft at p = 0.1)")
    p.add_argument("--tokens", default="8,16,24,32", help="the lengths judged")
    p.add_argument("--max-tokens", type=int, default=48, help="tokens generated (the reference verdict)")
    p.add_argument("--check", action="store_true", help="also generate the shortest length directly once")
    p.add_argument("--json", type=Path, default=Path("benchmarks/results/judge_tokens.json"))
    p.add_argument("--merge", type=Path, nargs="+", metavar="JSON",
                   help="combine earlier runs' JSON files into --json (nothing is generated)")
    args = p.parse_args(argv)
    if args.merge:
        return merge(args.merge, args.json)
    if args.data is None or args.out is None:
        p.error("give --data and --out (or --merge)")
    lab_args = cli.add_parser(argparse.ArgumentParser().add_subparsers()).parse_args(
        ["--preset", "pretrained", "--data", args.data, "--grid", "fine", "--poison", "0.1", "--no-progress",
         "--out", str(args.out), "--harmful-limit", "250"])
    cfg = cli._config(lab_args)
    settings = cli._settings(lab_args)
    data = cli._data(lab_args, cfg, settings)
    lab = PretrainedLab(cfg, data, args.out, settings, progress=False)
    tok, _ = lab.tokenizer()
    lengths = sorted(int(x) for x in args.tokens.split(","))
    prompts = [render_prompt(tok, q) for q in data.harmful_eval]
    rows = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        attack_dir, _ = lab.attack("sft", 0.1, seed, None)
        aligned_dir, _ = lab.aligned(seed)
        model = load_attacked(aligned_dir, attack_dir / "adapter").merge_and_unload().eval()
        t = time.perf_counter()
        ids = generate_ids(model, tok, prompts, args.max_tokens, settings.eval_batch_size)
        seconds = time.perf_counter() - t
        ref = verdicts(tok, ids, args.max_tokens, data.harmful_eval)
        row = {"seed": seed, "prompts": len(prompts), "generate_s": round(seconds, 1),
               "hs": {str(args.max_tokens): 100.0 * sum(ref) / len(ref)}, "changed": {}}
        for n in lengths:
            v = verdicts(tok, ids, n, data.harmful_eval)
            diff = sum(a != b for a, b in zip(v, ref))
            row["hs"][str(n)] = 100.0 * sum(v) / len(v)
            row["changed"][str(n)] = diff
        if args.check and not rows:
            direct = generate_ids(model, tok, prompts, lengths[0], settings.eval_batch_size)
            row["prefix_equals_direct"] = all(a == b[: lengths[0]] for a, b in zip(direct, ids))
        rows.append(row)
        print(json.dumps(row))
    return write(rows, args.max_tokens, args.json)


def write(rows: list[dict], reference: int, path: Path) -> int:
    """Sum the models' changed verdicts per length, pick the shortest under 1 %, write ``path``."""
    lengths = sorted(int(n) for n in rows[0]["changed"])
    total = sum(r["prompts"] for r in rows)
    changed = {n: sum(r["changed"][str(n)] for r in rows) for n in lengths}
    summary = {str(n): {"changed": changed[n], "of": total, "percent": round(100.0 * changed[n] / total, 2)}
               for n in lengths}
    chosen = next((n for n in lengths if 100.0 * changed[n] / total < 1.0), reference)
    result = {"reference_tokens": reference, "models": rows, "changed_vs_reference": summary,
              "shortest_under_1_percent": chosen, "attack": "sft, p = 0.1, the pretrained lab's aligned model"}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    print("| tokens | verdicts changed vs", reference, "| % |")
    print("|---|---|---|")
    for n in lengths:
        print(f"| {n} | {changed[n]} of {total} | {100.0 * changed[n] / total:.2f} |")
    print("shortest under 1 %:", chosen)
    return 0


def merge(paths: list[Path], out: Path) -> int:
    """``--merge``: one study from several runs' JSON files (e.g. one process per seed)."""
    runs = [json.loads(p.read_text()) for p in paths]
    if len({r["reference_tokens"] for r in runs}) != 1:
        raise SystemExit("judge_tokens --merge: the runs used different --max-tokens")
    return write([m for r in runs for m in r["models"]], runs[0]["reference_tokens"], out)


if __name__ == "__main__":
    raise SystemExit(main())
