"""What each stage of ``asft lab --preset pretrained`` costs here, and the grids' compute plans.

Measures on the dequantised SmolLM2-135M-Instruct with the preset's own code paths: one
training step (with the model's loss and with :func:`answer_loss`; 8 real attack rows through the chat template, LoRA r=8 on q/v, LoRA on all
linear layers, and the alignment's full fine-tune of the blocks' linear weights), FA scoring
of 32 test rows (:func:`label_logits`, with and without the shared prefix's KV cache) and HS generation for 32 BeaverTails prompts
(:func:`generate`, 32 new tokens). Then multiplies them out for the reduced and the full grid.

    python benchmarks/lab_pretrained_costs.py [--data ../shared/data/asft] [--out FILE.json]

Times are wall seconds on whatever else the machine runs: the JSON records the load average.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model

from asft_optim.lab.data import DEFAULT_POISONS, REAL_FILES, load_real, parse_labels
from asft_optim.lab.evaluate import generate, label_logits
from asft_optim.lab.models import answer_loss
from asft_optim.lab.pretrained import load_gguf
from asft_optim.lab.pretrained_lab import FULL_SWEEPS, PretrainedSettings, pretrained_data
from asft_optim.lab.tokenizer import Collator, encode_example, render_prompt


def _steps(model, batch, params, n=3, loss=None) -> float:
    """Best of ``n - 1`` AdamW steps; ``loss(model, batch)`` (default: the model's own)."""
    opt = torch.optim.AdamW(params, lr=1e-5)
    times = []
    for _ in range(n):
        t = time.perf_counter()
        (model(**batch).loss if loss is None else loss(model, batch)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    return min(times[1:])  # the first step warms up


def measure(data_dir: Path) -> dict:
    model, tok, _ = load_gguf()
    data = load_real(**{k: str(data_dir / v) for k, v in REAL_FILES.items()}, poisons=DEFAULT_POISONS,
                     labels=parse_labels(None), test_limit=32, input_chars=100)
    data = pretrained_data(data, PretrainedSettings())
    rows = [encode_example(tok, e, 104) for e in data.attack_set(0.1, 0)[:8]]
    batch = Collator(tok.pad_token_id)(rows)
    out = {"tokens_per_train_batch": int(batch["attention_mask"].sum()), "threads": torch.get_num_threads()}
    model.eval()
    with torch.no_grad():
        prompts = [render_prompt(tok, t.instruction, t.input) for t in data.test[:32]]
        # FA scoring with the shared prefix's KV cache (what the lab runs) against every
        # row whole, interleaved, best of 2 each; and whether they pick the same labels.
        first = [tok.encode(y, add_special_tokens=False)[0] for y in data.labels]
        best = {True: math.inf, False: math.inf}
        scores = {}
        for _ in range(2):
            for shared in (False, True):
                t = time.perf_counter()
                scores[shared] = label_logits(model, tok, prompts, first, shared_prefix=shared, progress=False)
                best[shared] = min(best[shared], time.perf_counter() - t)
        out["score_32_rows_s"] = best[True]
        out["score_32_rows_whole_prompts_s"] = best[False]
        out["score_shared_prefix_speedup"] = best[False] / best[True]
        out["score_same_labels"] = bool((scores[True].argmax(-1) == scores[False].argmax(-1)).all())
        out["score_max_abs_logit_diff"] = float((scores[True] - scores[False]).abs().max())
        harm = [render_prompt(tok, p) for p in data.harmful_eval[:32]]
        t = time.perf_counter()
        generate(model, tok, harm, 32, batch_size=32, progress=False)
        out["generate_32_prompts_s"] = time.perf_counter() - t
    model.train()
    for name, p in model.named_parameters():
        p.requires_grad = ".layers." in f".{name}" and name.endswith("proj.weight")
    out["full_ft_step_s"] = _steps(model, batch, [p for p in model.parameters() if p.requires_grad])
    for p in model.parameters():
        p.requires_grad = False
    for label, targets in (("lora_qv_step_s", ["q_proj", "v_proj"]), ("lora_all_linear_step_s", "all-linear")):
        peft = get_peft_model(model, LoraConfig(r=8, lora_alpha=32, target_modules=targets, task_type="CAUSAL_LM"))
        out[label] = _steps(peft, batch, [p for p in peft.parameters() if p.requires_grad])
        if label == "lora_qv_step_s":  # the lab's attack loss: the LM head at the answer positions only
            out["lora_qv_answer_loss_step_s"] = _steps(peft, batch, [p for p in peft.parameters() if p.requires_grad],
                                                       loss=answer_loss)
            out["answer_loss_speedup"] = out[label] / out["lora_qv_answer_loss_step_s"]
        model = peft.unload()
    out["load_average"] = os.getloadavg()
    return out


def plan(c: dict, *, poisons, seeds: int, sweeps, test_rows: int, harmful: int, attack_rows: int = 128,
         batch: int = 8) -> dict:
    """Trainings, evaluations and minutes of one grid from the measured unit costs."""
    values = {s.method: len(s.values) for s in sweeps}
    methods = ("sft", "asft", "asft-orthogonal", "l2", "asft-alt")
    trained = sum(values.get(m, 1) for m in methods)
    evals_per = trained + values.get("safe-lora", 1)
    eval_s = math.ceil(test_rows / 32) * c["score_32_rows_s"] + math.ceil(harmful / 32) * c["generate_32_prompts_s"]
    train_s = (sum(math.ceil((attack_rows + round(p * attack_rows)) / batch) for p in poisons)
               * c["lora_qv_answer_loss_step_s"])
    # Once: base (load ~40 s, eval), aligned (replay generation, 2 epochs of ~122 rows, eval).
    once = 40 + 2 * eval_s + 2 * math.ceil(122 / batch) * c["full_ft_step_s"] + 3 * c["generate_32_prompts_s"] * 1.5
    total = once + seeds * (trained * train_s + evals_per * len(poisons) * eval_s)
    return {"trainings": seeds * trained * len(poisons), "evaluations": seeds * evals_per * len(poisons),
            "eval_s": round(eval_s), "attack_train_s_all_p": round(train_s), "once_s": round(once),
            "minutes": round(total / 60)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path("../shared/data/asft"))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/lab-pretrained/costs.json"))
    args = ap.parse_args()
    c = measure(args.data)
    c["plans"] = {
        "reduced": plan(c, poisons=(0.0, 0.1), seeds=2, sweeps=PretrainedSettings().sweeps, test_rows=100, harmful=100),
        "reduced_250_prompts": plan(c, poisons=(0.0, 0.1), seeds=2, sweeps=PretrainedSettings().sweeps,
                                    test_rows=200, harmful=250),
        "full": plan(c, poisons=(0.0, 0.05, 0.1, 0.2), seeds=2, sweeps=FULL_SWEEPS, test_rows=200, harmful=250),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(c, indent=1) + "\n")
    print(json.dumps(c, indent=1))


if __name__ == "__main__":
    main()
