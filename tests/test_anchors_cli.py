"""``asft anchors build`` / ``asft anchors info`` through ``asft_optim.cli.main``."""

from __future__ import annotations

import json

import torch
from tiny_models import llama_config, save_pair

from asft_optim import Anchors, build_anchors
from asft_optim.cli import main


def test_build_then_info(tmp_path, capsys):
    base, aligned, bdir, adir = save_pair(tmp_path, llama_config(attention_bias=True), max_shard_size="8KB")
    out = tmp_path / "qv.anchors.safetensors"
    rc = main(["anchors", "build", "--base", str(bdir), "--aligned", str(adir), "--targets", "q_proj,v_proj",
               "--mode", "orthogonal", "--rank", "3", "--dtype", "bfloat16", "-o", str(out), "--no-progress"])
    assert rc == 0 and "wrote 4 anchors" in capsys.readouterr().out
    loaded = Anchors.load(out)
    expected = build_anchors(base, aligned, ["q_proj", "v_proj"], mode="orthogonal", rank=3, dtype=torch.bfloat16)
    for k in expected:
        assert torch.equal(loaded[k].factor, expected[k].factor)

    assert main(["anchors", "info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "weight" in text and "rank kept" in text and "energy kept" in text and "bytes" in text
    assert "max eig C" in text  # the values: checked in the JSON below
    assert "model.layers.1.self_attn.v_proj.weight" in text and "8x16" in text
    assert "4 weights" in text

    assert main(["anchors", "info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["metadata"]["mode"] == "orthogonal" and len(info["weights"]) == 4
    assert {w["rank"] for w in info["weights"]} == {3}
    assert all(abs(w["c_max"] - 1) < 1e-2 for w in info["weights"])  # projectors, stored in bfloat16


def test_build_energy_and_regex(tmp_path, capsys):
    _, _, bdir, adir = save_pair(tmp_path, llama_config())
    out = tmp_path / "mlp.safetensors"
    rc = main(["anchors", "build", "--base", str(bdir), "--aligned", str(adir),
               "--targets-regex", r"model\.layers\.0\.mlp\..*", "--mode", "orthogonal", "--energy", "0.5",
               "-o", str(out), "--no-progress"])
    assert rc == 0
    anchors = Anchors.load(out)
    assert sorted(anchors) == [f"model.layers.0.mlp.{m}.weight" for m in ("down_proj", "gate_proj", "up_proj")]
    assert all(p.energy >= 0.5 for p in anchors.values())


def test_errors_are_reported_not_raised(tmp_path, capsys):
    _, _, bdir, adir = save_pair(tmp_path, llama_config())
    rc = main(["anchors", "build", "--base", str(bdir), "--aligned", str(adir), "--targets", "c_attn",
               "-o", str(tmp_path / "x.safetensors")])
    assert rc == 1 and "no 2-D weight" in capsys.readouterr().err
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 40)
    assert main(["anchors", "info", str(tmp_path / "junk.safetensors")]) == 1
    assert "error" in capsys.readouterr().err


def test_info_says_how_close_safelora_anchors_are_to_l2(tmp_path, capsys):
    _, _, bdir, adir = save_pair(tmp_path, llama_config())
    out = tmp_path / "s.safetensors"
    assert main(["anchors", "build", "--base", str(bdir), "--aligned", str(adir), "--targets", "q_proj",
                 "--mode", "safelora", "-o", str(out), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["anchors", "info", str(out), "--json"]) == 0
    worst = max(w["c_max"] for w in json.loads(capsys.readouterr().out)["weights"])
    assert 0 < worst
    assert main(["anchors", "info", str(out)]) == 0
    assert f"largest eigenvalue of C over all weights: {worst:.4f}" in capsys.readouterr().out
