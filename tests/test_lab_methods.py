"""The lab's methods declare themselves: the grids, the CLI and the cache keys read METHODS."""

from __future__ import annotations

import argparse
from dataclasses import replace

import pytest

from asft_optim.lab.attack import (
    EMA_DECAYS,
    GRIDS,
    METHODS,
    Method,
    Operator,
    Setting,
    setting_options,
    swept_methods,
)


def _declared(grid: str) -> dict[str, tuple[str, tuple]]:
    out = {}
    for name, m in METHODS.items():
        if m.setting is not None and m.setting.values(grid) is not None:
            out[name] = (m.setting.field, m.setting.values(grid))
    return out


def test_every_methods_declared_sweep_is_what_the_pretrained_grids_use():
    from asft_optim.lab.pretrained_lab import (
        ATTACKER_FIELDS,
        FINE_SWEEPS,
        FULL_SWEEPS,
        GRID_SWEEPS,
        PretrainedSettings,
    )

    tables = {"reduced": PretrainedSettings().sweeps, "full": FULL_SWEEPS, "fine": FINE_SWEEPS}
    assert set(tables) == set(GRIDS) == set(GRID_SWEEPS) - {"decisive"}
    assert GRID_SWEEPS["decisive"] == FINE_SWEEPS  # the verdict's grid: the fine sweeps, more seeds
    for grid, sweeps in tables.items():
        assert GRID_SWEEPS[grid] == sweeps, grid
        mine = [s for s in sweeps if s.field not in ATTACKER_FIELDS]
        assert {s.method: (s.field, s.values) for s in mine} == _declared(grid), grid
        assert len(mine) == len({s.method for s in mine}), grid  # one sweep per method
    # Every method with a setting is swept in the full grid; the reduced grid is asft and l2's λ.
    assert set(_declared("full")) == {m.name for m in swept_methods()}
    assert set(_declared("reduced")) == {"asft", "l2"}
    # The attacker's side is no method's setting: only the full grid has it (sft's layers).
    assert [(s.method, s.field) for s in FULL_SWEEPS if s.field in ATTACKER_FIELDS] == [("sft", "target_modules")]


def test_the_cli_reads_the_methods_settings():
    from asft_optim.lab import cli as lab_cli
    from asft_optim.lab.pretrained_lab import GRID_SWEEPS

    parser = argparse.ArgumentParser()
    lab_cli.add_parser(parser.add_subparsers())
    options = setting_options()
    assert list(options) == ["--lambda", "--l2-lambda", "--alt-lambda", "--input-lambda", "--ema-decay",
                             "--safegrad-weight"]
    for m in swept_methods():  # methods sharing an option share its field and help
        if m.setting.option is not None:
            assert options[m.setting.option].field == m.setting.field
            assert options[m.setting.option].help == m.setting.help
    argv = ["lab", "--lambda", "0.5", "--l2-lambda", "0.25", "--alt-lambda", "7", "--input-lambda", "3",
            "--ema-decay", "0.95", "--safegrad-weight", "0.3", "--methods", "sft,ema"]
    cfg = lab_cli._config(parser.parse_args(argv))
    assert (cfg.attack.anchor_lambda, cfg.attack.l2_lambda, cfg.attack.alt_lambda) == (0.5, 0.25, 7.0)
    assert (cfg.attack.input_lambda, cfg.attack.ema_decay, cfg.methods) == (3.0, 0.95, ("sft", "ema"))
    assert cfg.attack.safegrad_weight == 0.3
    with pytest.raises(ValueError, match=r"ema_decay must be in \[0, 1\), got 1.0"):
        lab_cli._config(parser.parse_args(["lab", "--ema-decay", "1"]))
    # --sweep ema takes its β sweep; --sweep-values (the λ sweeps') leaves it alone.
    settings = lab_cli._settings(parser.parse_args(["lab", "--sweep", "ema", "--sweep-values", "3"]))
    assert [(s.method, s.field, s.values) for s in settings.sweeps] == [("ema", "ema_decay", EMA_DECAYS)]
    # --sweep NAME takes NAME's declared sweep; --sweep-values replaces the λ sweeps only.
    settings = lab_cli._settings(parser.parse_args(["lab", "--sweep", "safe-lora,asft-alt", "--sweep-values", "3"]))
    safe = METHODS["safe-lora"].setting
    assert [(s.method, s.values) for s in settings.sweeps] == [("safe-lora", safe.full), ("asft-alt", (3.0,))]
    fine = lab_cli._settings(parser.parse_args(["lab", "--grid", "fine"]))
    assert fine.sweeps == GRID_SWEEPS["fine"]


def test_a_setting_outside_the_methods_cache_key_is_refused():
    with pytest.raises(ValueError, match="its setting 'l2_lambda' must be in its uses"):
        Method("x", uses=("anchor_lambda",), setting=Setting("l2_lambda", (1.0,)))
    with pytest.raises(ValueError, match="its operator's design"):
        Method("x", uses=("input_lambda",), operator=Operator("k", ("input_rank",), lambda ctx, out: {}))
    with pytest.raises(ValueError, match="unknown grid 'huge'; known: reduced, full, fine"):
        METHODS["asft"].setting.values("huge")


def test_attack_keys_take_the_declared_fields_and_the_defenders_rows(tmp_path):
    """The attack stage's key, rebuilt by hand from its documented payload: what each
    method declares (``uses``, ``reads_known_harmful``) is what enters it, and no more."""
    from asft_optim.lab.config import tiny_config
    from asft_optim.lab.runner import Lab, _examples_hash, _key
    from asft_optim.lab.world import World

    cfg = tiny_config()
    data = World(cfg.world).data()
    lab = Lab(cfg, data, tmp_path, plan=True, progress=False)
    aligned = lab.aligned(0)[1]["key"]
    shared = ("r", "lora_alpha", "lora_dropout", "target_modules", "train")
    assert [n for n, m in METHODS.items() if m.reads_known_harmful] == ["asft-alt"]
    for name in ("sft", "asft-alt", "weight-decay", "ema"):
        a = cfg.attack
        payload = {"stage": "attack", "aligned": aligned, "method": name, "poison": 0.1, "seed": 0,
                   "rows": _examples_hash(data.attack_set(0.1, 0)),
                   "config": {f: getattr(a, f) for f in shared + METHODS[name].uses}}
        if name == "asft-alt":
            payload["known_harmful"] = _examples_hash(data.known_harmful)
        assert lab.attack(name, 0.1, 0)[1]["key"] == _key(payload), name
    # Another method's setting leaves a method's key alone.
    other = replace(cfg.attack, alt_lambda=123.0, adamw_weight_decay=5.0, ema_decay=0.5)
    assert lab.attack("asft", 0.1, 0, other)[1]["key"] == lab.attack("asft", 0.1, 0)[1]["key"]
    # ema_decay enters ema's keys only: sft's (and every other method's) stay as they were.
    assert "ema_decay" in METHODS["ema"].uses
    assert all("ema_decay" not in m.uses for n, m in METHODS.items() if n != "ema")
    assert lab.attack("sft", 0.1, 0, other)[1]["key"] == lab.attack("sft", 0.1, 0)[1]["key"]
    assert lab.attack("ema", 0.1, 0, other)[1]["key"] != lab.attack("ema", 0.1, 0)[1]["key"]
    assert lab.attack("ema", 0.1, 0)[1]["key"] != lab.attack("sft", 0.1, 0)[1]["key"]
    assert lab.evaluation("ema", 0.1, 0)["key"] != lab.evaluation("sft", 0.1, 0)["key"]
    assert lab.attack("asft-alt", 0.1, 0, other)[1]["key"] != lab.attack("asft-alt", 0.1, 0)[1]["key"]


def test_ema_is_sfts_adamw_with_an_ema_callback_at_the_configs_beta():
    """``ema`` is sft's AdamW plus an :class:`~asft_optim.integrations.hf.EMACallback` at the
    config's β, started on the adapter it is built on, copied into it when training ends."""
    import torch
    from tiny_models import tiny_lora_llama

    from asft_optim.integrations.hf import EMACallback
    from asft_optim.lab.attack import AttackConfig

    method = METHODS["ema"]
    assert method.setting.values("full") == EMA_DECAYS and method.setting.values("reduced") is None
    assert method.optimizer is METHODS["sft"].optimizer and method.operator is None
    model = tiny_lora_llama(init_lora_weights=True)
    ctx = type("Ctx", (), {"model": model, "config": replace(AttackConfig(), ema_decay=0.95)})()
    (cb,) = method.callbacks(ctx)
    assert isinstance(cb, EMACallback) and cb.copy_at_end and cb.ema.beta == 0.95
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(cb.ema.params) == len(trainable) and all(a is b for a, b in zip(cb.ema.params, trainable))
    assert all(not s.any() for n, s in zip((n for n, p in model.named_parameters() if p.requires_grad),
                                          cb.ema.shadow) if "lora_B" in n)
    assert isinstance(method.optimizer(ctx)[0], torch.optim.AdamW)
