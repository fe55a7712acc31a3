"""Building anchors from checkpoint directories: streaming reads match in-memory builds."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from tiny_models import gpt2_config, llama_config, model_pair, save_pair

from asft_optim import AnchorError, Anchors, build_anchors
from asft_optim.checkpoints import open_source

QV = ["q_proj", "v_proj"]


def assert_same(x: Anchors, y: Anchors) -> None:
    assert list(x) == list(y)
    for k in x:
        assert torch.equal(x[k].factor, y[k].factor), k
        assert (x[k].mode, x[k].energy) == (y[k].mode, y[k].energy)
    assert x.weights == y.weights


def oracle_c(v: torch.Tensor) -> torch.Tensor:
    """Reference operator C = V Vᵀ / ‖V‖_F in float64 (dense, as the reference code)."""
    v = v.double()
    return v @ v.T / torch.linalg.matrix_norm(v)


@pytest.mark.parametrize("targets", [QV, ["q_proj", "k_proj", "v_proj", "down_proj", "gate_proj"], r".*\.mlp\..*"])
def test_llama_directory_equals_in_memory(tmp_path, targets):
    base, aligned, bdir, adir = save_pair(tmp_path, llama_config())
    from_dirs = build_anchors(bdir, adir, targets, progress=False)
    assert_same(from_dirs, build_anchors(base, aligned, targets))
    assert_same(from_dirs, build_anchors(base.state_dict(), aligned.state_dict(), targets))


def test_exact_safelora_is_compact_and_exact(tmp_path):
    base, aligned = model_pair(llama_config())
    anchors = build_anchors(base, aligned, ["down_proj", "up_proj"])
    for name, p in anchors.items():
        w0, w1 = base.state_dict()[name], aligned.state_dict()[name]
        d_out, d_in = w0.shape
        assert p.factor.shape == (d_out, min(d_out, d_in))  # never d_out x d_out for tall, never d_in wide
        f = p.factor.double()
        torch.testing.assert_close(f @ f.T, oracle_c(w1 - w0), rtol=1e-5, atol=1e-6)


def test_sharded_checkpoint_with_biases(tmp_path):
    cfg = llama_config(attention_bias=True, mlp_bias=True)
    base, aligned, bdir, adir = save_pair(tmp_path, cfg, max_shard_size="8KB")
    assert (bdir / "model.safetensors.index.json").is_file()
    targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
    anchors = build_anchors(bdir, adir, targets, progress=False)
    assert len(anchors) == 8 and all(k.endswith(".weight") for k in anchors)  # biases skipped
    assert_same(anchors, build_anchors(base, aligned, targets))


def test_gpt2_conv1d_layout_from_config(tmp_path):
    base, aligned, bdir, adir = save_pair(tmp_path, gpt2_config())
    anchors = build_anchors(bdir, adir, ["c_attn", "c_fc"], progress=False)
    assert_same(anchors, build_anchors(base, aligned, ["c_attn", "c_fc"]))
    name = "transformer.h.0.attn.c_attn.weight"
    assert anchors.weights[name].layout == "in_out" and anchors[name].d_out == 48  # 3·n_embd outputs
    v = (aligned.state_dict()[name] - base.state_dict()[name]).T
    f = anchors[name].factor.double()
    torch.testing.assert_close(f @ f.T, oracle_c(v), rtol=1e-5, atol=1e-6)


def test_without_config_layout_defaults_to_out_in(tmp_path):
    _, _, bdir, adir = save_pair(tmp_path, gpt2_config())
    for d in (bdir, adir):
        (d / "config.json").unlink()
    anchors = build_anchors(bdir, adir, ["c_attn"], progress=False)
    assert {w.layout for w in anchors.weights.values()} == {"out_in"}


@pytest.mark.parametrize("cfg", [llama_config(tie_word_embeddings=True), gpt2_config()])
def test_tied_embeddings(tmp_path, cfg):
    base, aligned, bdir, adir = save_pair(tmp_path, cfg)
    assert "lm_head.weight" not in open_source(bdir)._stored()  # tied: not saved
    anchors = build_anchors(bdir, adir, ["lm_head"], progress=False)
    assert list(anchors) == ["lm_head.weight"]
    assert_same(anchors, build_anchors(base, aligned, ["lm_head"]))
    assert anchors["lm_head.weight"].d_out == cfg.vocab_size


def test_torch_bin_directory(tmp_path):
    base, aligned, bdir, adir = save_pair(tmp_path, llama_config())
    for d, m in ((bdir, base), (adir, aligned)):
        (d / "model.safetensors").unlink()
        torch.save(m.state_dict(), d / "pytorch_model.bin")
    assert_same(build_anchors(bdir, adir, QV, progress=False), build_anchors(base, aligned, QV))


def test_torch_bin_refuses_pickled_objects(tmp_path):
    base, _, bdir, adir = save_pair(tmp_path, llama_config())
    (adir / "model.safetensors").unlink()
    torch.save({"w": torch.zeros(2, 2), "evil": object()}, adir / "pytorch_model.bin")
    with pytest.raises(AnchorError, match="weights_only"):
        build_anchors(bdir, adir, QV)


def test_mismatches_listed_in_one_error():
    base, aligned = model_pair(llama_config())
    sd = dict(aligned.state_dict())
    del sd["model.layers.0.self_attn.q_proj.weight"]
    sd["model.layers.1.self_attn.v_proj.weight"] = torch.zeros(3, 16)
    with pytest.raises(AnchorError) as err:
        build_anchors(base, sd, QV)
    msg = str(err.value)
    assert "2 problem(s)" in msg and "layers.0.self_attn.q_proj.weight: missing" in msg and "v_proj" in msg


def test_extra_aligned_weight_is_reported():
    base, aligned = model_pair(llama_config())
    sd = dict(base.state_dict())
    del sd["model.layers.1.self_attn.q_proj.weight"]
    with pytest.raises(AnchorError, match="missing from the base model"):
        build_anchors(sd, aligned, QV)


def test_zero_matches_is_an_error(tmp_path):
    _, _, bdir, adir = save_pair(tmp_path, llama_config())
    with pytest.raises(AnchorError, match="no 2-D weight"):
        build_anchors(bdir, adir, ["c_attn"])
    with pytest.raises(AnchorError, match="no 2-D weight"):
        build_anchors(bdir, adir, ["input_layernorm"])  # 1-D only


def test_bad_directory_errors(tmp_path):
    with pytest.raises(AnchorError, match="no such"):
        build_anchors(tmp_path / "nope", tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(AnchorError, match="no model.safetensors"):
        build_anchors(tmp_path / "empty", tmp_path / "empty")
    with pytest.raises(AnchorError, match="cannot read weights"):
        build_anchors(3, 4)


def test_missing_shard_is_an_error(tmp_path):
    _, _, bdir, adir = save_pair(tmp_path, llama_config(), max_shard_size="8KB")
    index = json.loads((adir / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    (adir / shard).unlink()
    with pytest.raises(AnchorError, match="not found"):
        build_anchors(bdir, adir, QV)


def test_metadata_and_fingerprints(tmp_path):
    base, aligned, bdir, adir = save_pair(tmp_path, llama_config())
    anchors = build_anchors(bdir, adir, QV, mode="orthogonal", rank=2, dtype=torch.bfloat16, progress=False)
    meta = anchors.metadata
    assert meta["mode"] == "orthogonal" and meta["rank"] == "2" and meta["storage_dtype"] == "bfloat16"
    assert json.loads(meta["target_modules"]) == QV
    assert meta["base_fingerprint"] != meta["aligned_fingerprint"]  # same headers, different data
    again = build_anchors(bdir, adir, QV, mode="orthogonal", rank=2, progress=False)
    assert again.metadata["base_fingerprint"] == meta["base_fingerprint"]
    assert {p.factor.dtype for p in anchors.values()} == {torch.bfloat16}
    assert all(p.rank == 2 and 0 < p.energy <= 1 for p in anchors.values())


def test_progress_bar(tmp_path, capsys):
    _, _, bdir, adir = save_pair(tmp_path, llama_config())
    build_anchors(bdir, adir, QV, progress=True)
    assert "4/4" in capsys.readouterr().err


def test_bind_reports_unanchored_and_mismatches():
    peft = pytest.importorskip("peft")
    base, aligned = model_pair(llama_config())
    anchors = build_anchors(base, aligned, QV)
    model = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["q_proj", "k_proj", "v_proj"]))
    with pytest.warns(UserWarning, match="no anchor"):
        report = anchors.bind(model)
    assert sorted(report.found) == sorted(anchors)
    assert report.unanchored == [f"model.layers.{i}.self_attn.k_proj.weight" for i in range(2)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert anchors.bind(base, warn=False).unanchored  # full fine-tuning: all 2-D weights tuned
    other, _ = model_pair(llama_config(hidden_size=32, num_hidden_layers=1))
    with pytest.raises(AnchorError) as err:
        anchors.bind(other)
    msg = str(err.value)
    assert "4 problem(s)" in msg and "layers.1.self_attn.q_proj.weight: no such weight" in msg
    assert "layers.0.self_attn.q_proj.weight: anchored as (out, in) = (16, 16)" in msg
