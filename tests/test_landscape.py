"""asft_optim.landscape: direction norms, cosines, exact restore, origin value, EPL against analytic answers."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from tiny_models import D, lora, tiny_gpt2, tiny_llama, tokens

from asft_optim.landscape import (
    cosine,
    direction_from_adapter,
    direction_from_models,
    direction_norm,
    epl,
    grid,
    landscape_1d,
    landscape_2d,
    model_weights,
    normalize,
    off_anchor_fraction,
    orthogonalize,
    perturbed,
    random_direction,
)
from asft_optim.projection import AnchorError

QV = ["q_proj", "v_proj"]


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_bit_identical(model, snap):
    now = model.state_dict()
    assert now.keys() == snap.keys()
    for k, v in snap.items():
        assert now[k].dtype == v.dtype and torch.equal(now[k], v), k


def lm_loss_score(model) -> float:
    ids = tokens(3, batch=2, length=6)
    with torch.no_grad():
        return float(model(input_ids=ids, labels=ids).loss)


def projection_score(name: str, w0: torch.Tensor, unit: torch.Tensor):
    """Synthetic score: the coordinate α of the weight ``name`` along the unit direction ``unit``."""
    def coord(model) -> float:
        w = model_weights(model)[name].detach().double()
        return float(((w - w0) * unit).sum())
    return coord


# -- directions ---------------------------------------------------------------------------


def test_random_direction_has_each_layer_norm_and_skips_norms():
    model = tiny_llama(0)
    d = random_direction(model, seed=3)
    weights = model_weights(model)
    assert d and all(weights[n].dim() >= 2 for n in d)
    assert not [n for n in d if "norm" in n]
    for n, t in d.items():
        assert math.isclose(float(t.double().norm()), float(weights[n].detach().double().norm()), rel_tol=1e-6), n
    # every ≥2-D weight outside norm layers is covered, 1-D ones are not
    assert set(d) == {n for n, p in weights.items() if p.dim() >= 2}
    again, other = random_direction(model, seed=3), random_direction(model, seed=4)
    assert all(torch.equal(d[n], again[n]) for n in d)
    assert not torch.equal(d["model.layers.0.self_attn.q_proj.weight"], other["model.layers.0.self_attn.q_proj.weight"])
    only_qv = random_direction(model, seed=3, target_modules=QV)
    assert sorted(only_qv) == ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.v_proj.weight"]


def test_normalize_global_and_layer():
    base, aligned = tiny_llama(0), tiny_llama(1)
    d = direction_from_models(base, aligned, QV)
    assert math.isclose(direction_norm(normalize(d, "global")), 1.0, rel_tol=1e-6)
    by_layer = normalize(d, "layer", base)
    weights = model_weights(base)
    for n, t in by_layer.items():
        assert math.isclose(float(t.double().norm()), float(weights[n].detach().double().norm()), rel_tol=1e-6)
        assert cosine({n: t}, {n: d[n]}).overall == pytest.approx(1.0)
    zero = {n: torch.zeros_like(t) for n, t in d.items()}
    assert all(torch.equal(t, zero[n]) for n, t in normalize(zero, "layer", base).items())
    with pytest.raises(ValueError):
        normalize(zero, "global")
    with pytest.raises(ValueError):
        normalize(d, "layer")


def test_direction_from_models_modules_peft_and_directories(tmp_path):
    base, aligned = tiny_llama(0), tiny_llama(1)
    d = direction_from_models(base, aligned, QV, dtype=D)
    sd_b, sd_a = base.state_dict(), aligned.state_dict()
    assert sorted(d) == ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.v_proj.weight"]
    for n, t in d.items():
        assert torch.equal(t, sd_a[n] - sd_b[n])
    # PEFT-wrapped end model: its *base* weights, HF names
    wrapped = lora(copy.deepcopy(aligned), QV)
    d_wrapped = direction_from_models(base, wrapped, QV, dtype=D)
    assert d_wrapped.keys() == d.keys() and all(torch.equal(d[n], d_wrapped[n]) for n in d)
    # checkpoint directories
    base.save_pretrained(tmp_path / "b")
    aligned.save_pretrained(tmp_path / "a")
    d_dir = direction_from_models(tmp_path / "b", tmp_path / "a", QV, dtype=D)
    assert all(torch.equal(d[n], d_dir[n]) for n in d)
    every = direction_from_models(base, aligned)
    assert "model.embed_tokens.weight" in every and not [n for n in every if every[n].dim() < 2]
    with pytest.raises(AnchorError):
        direction_from_models(base, aligned, ["nope"])


@pytest.mark.parametrize("make, targets", [(tiny_llama, QV), (tiny_gpt2, ["c_attn", "wte"])])
def test_direction_from_adapter_is_the_merged_update(make, targets):
    base = make(0)
    peft_model = lora(copy.deepcopy(base), targets)
    d = direction_from_adapter(peft_model, dtype=D)
    merged = copy.deepcopy(peft_model).merge_and_unload()
    sd_b, sd_m = base.state_dict(), merged.state_dict()
    assert d and len(d) == sum(1 for n in sd_b if any(f".{t}." in f".{n}" for t in targets) and n.endswith("weight"))
    for n, t in d.items():
        assert t.shape == sd_b[n].shape
        torch.testing.assert_close(t, sd_m[n] - sd_b[n], rtol=0, atol=1e-12)


def test_cosine_and_orthogonalize():
    base = tiny_llama(0)
    d1, d2 = random_direction(base, 1, QV, dtype=D), random_direction(base, 2, QV, dtype=D)
    flat1 = torch.cat([d1[n].reshape(-1) for n in d1])
    flat2 = torch.cat([d2[n].reshape(-1) for n in d1])
    res = cosine(d1, d2)
    assert res.overall == pytest.approx(float(torch.nn.functional.cosine_similarity(flat1, flat2, dim=0)), abs=1e-12)
    assert res.n_weights == 2 and set(res.per_layer) == set(d1)
    for n in d1:
        assert res.per_layer[n] == pytest.approx(float(torch.nn.functional.cosine_similarity(d1[n].reshape(-1), d2[n].reshape(-1), dim=0)))
    assert cosine(d1, {n: -3 * t for n, t in d1.items()}).overall == pytest.approx(-1.0)
    o = orthogonalize(d2, d1)
    assert abs(cosine(o, d1).overall) < 1e-12
    assert all(abs(c) < 1e-12 for c in cosine(normalize(o, "layer", base), d1).per_layer.values())
    with pytest.raises(AnchorError):
        cosine(d1, {"other.weight": torch.ones(2, 2)})


# -- landscapes ---------------------------------------------------------------------------


def test_landscape_origin_equals_own_score_and_weights_restored():
    base, aligned = tiny_llama(0), tiny_llama(1)
    model = copy.deepcopy(aligned)
    snap = snapshot(model)
    own = lm_loss_score(model)
    d_aligned = normalize(direction_from_models(base, aligned, QV, dtype=D), "layer", model)
    d_rand = random_direction(model, 5, dtype=D)
    land = landscape_1d(model, d_aligned, grid("-1:1:5"), lm_loss_score, progress=False)
    assert land.at_origin() == own  # exactly, not approximately
    assert len(set(land.values)) > 1  # the perturbation does change the score
    assert_bit_identical(model, snap)
    land2 = landscape_2d(model, d_aligned, d_rand, grid("-0.5:0.5:3"), grid("-0.5:0.5:3"), lm_loss_score, progress=False)
    assert land2.values[1][1] == own
    assert_bit_identical(model, snap)


def test_weights_restored_when_score_raises_and_in_bfloat16():
    model = tiny_llama(0).to(torch.bfloat16)
    snap = snapshot(model)
    d = random_direction(model, 0)
    calls = []

    def failing(m):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("judge crashed")
        return 0.0

    with pytest.raises(RuntimeError, match="judge crashed"):
        landscape_1d(model, d, grid("-1:1:5"), failing, progress=False)
    assert_bit_identical(model, snap)
    landscape_1d(model, d, grid("-1:1:7"), lambda m: 0.0, progress=False)
    assert_bit_identical(model, snap)


def test_points_are_computed_from_the_originals_not_accumulated():
    model = tiny_llama(0)
    name = "model.layers.0.self_attn.q_proj.weight"
    w0 = model_weights(model)[name].detach().clone()
    d1, d2 = random_direction(model, 1, dtype=D), random_direction(model, 2, dtype=D)
    with perturbed(model, [d1, d2]) as set_point:
        seen = []
        for a, b in [(0.3, -0.7), (1.0, 1.0), (-2.0, 0.5), (0.3, -0.7)]:
            set_point(a, b)
            w = model_weights(model)[name].detach().clone()
            torch.testing.assert_close(w, w0 + a * d1[name] + b * d2[name], rtol=0, atol=1e-15)
            seen.append(w)
        assert torch.equal(seen[0], seen[-1])  # revisiting a point gives the same bits: no drift
        set_point(0.0, 0.0)
        assert torch.equal(model_weights(model)[name], w0)
        with pytest.raises(ValueError):
            set_point(1.0)
    assert torch.equal(model_weights(model)[name], w0)


def test_tied_weights_are_perturbed_once_and_missing_names_raise():
    model = tiny_llama(0, tie_word_embeddings=True)
    emb = model.model.embed_tokens.weight
    assert model.lm_head.weight is emb
    w0 = emb.detach().clone()
    step = torch.ones_like(w0)
    with perturbed(model, [{"model.embed_tokens.weight": step, "lm_head.weight": step}]) as set_point:
        set_point(0.5)
        assert torch.equal(emb, w0 + 0.5)
    assert torch.equal(emb, w0)
    with pytest.raises(AnchorError, match="missing"):
        with perturbed(model, [{"model.nope.weight": step}]):
            pass


# -- EPL ----------------------------------------------------------------------------------


def synthetic_landscape(fn, spec):
    """A landscape whose score is ``fn(α)``, α read back from the perturbed weights."""
    model = tiny_llama(0)
    name = "model.layers.0.self_attn.q_proj.weight"
    w0 = model_weights(model)[name].detach().double().clone()
    unit = normalize({name: torch.randn(w0.shape, generator=torch.Generator().manual_seed(0), dtype=D)}, "global")
    coord = projection_score(name, w0, unit[name])
    return landscape_1d(model, unit, grid(spec), lambda m: fn(coord(m)), progress=False)


def test_epl_quadratic_harmful_score_matches_sqrt_threshold():
    tau = 0.3
    land = synthetic_landscape(lambda a: a * a, "-1:1:41")  # step 0.05
    for a, v in zip(land.alphas, land.values):
        assert v == pytest.approx(a * a, abs=1e-9)
    exact = math.sqrt(tau)
    e = epl(land.alphas, land.values, tau)
    assert e.epl == pytest.approx(0.5) and e.negative == pytest.approx(0.5) and e.positive == pytest.approx(0.5)
    assert e.epl <= exact < e.epl + 0.05 and not e.censored
    fine = epl(land.alphas, land.values, tau, interpolate=True)
    assert fine.epl == pytest.approx(exact, abs=0.05 ** 2)
    # the same landscape as a safety score (higher is safer, Eq. 5's S ≥ τ)
    flipped = epl(land.alphas, [1 - v for v in land.values], 1 - tau, higher_is_safer=True)
    assert flipped.epl == pytest.approx(e.epl)


def test_epl_one_sided_linear_score_interpolates_exactly():
    # harmful only for α > 0: S = 2·max(α, 0); safe while S ≤ 0.5, i.e. α ≤ 0.25
    land = synthetic_landscape(lambda a: 2 * max(a, 0.0), "-1:1:11")
    e = epl(land.alphas, land.values, 0.5, interpolate=True)
    assert e.positive == pytest.approx(0.25, abs=1e-9) and e.epl == pytest.approx(0.25, abs=1e-9)
    assert e.negative == pytest.approx(1.0) and e.sup_safe == pytest.approx(1.0)  # Eq. 5 read literally
    assert not e.censored
    coarse = epl(land.alphas, land.values, 0.5)
    assert coarse.epl == pytest.approx(0.2)


def test_epl_edge_cases():
    alphas = [-1.0, -0.5, 0.0, 0.5, 1.0]
    e = epl(alphas, [0, 0, 0, 0, 0], 0.1)
    assert e.epl == 1.0 and e.censored  # never left the basin: only a lower bound
    assert epl(alphas, [0, 0, 0.5, 0, 0], 0.1).epl == 0.0  # the origin itself is unsafe
    # an unsafe point inside, a safe one beyond it: contiguous reach vs literal sup
    e = epl(alphas, [0, 0, 0, 0.9, 0], 0.1)
    assert e.epl == 0.0 and e.positive == 0.0 and e.negative == 1.0 and e.sup_safe == 1.0
    with pytest.raises(ValueError, match="alpha = 0"):
        epl([-1.0, 1.0], [0, 0], 0.1)
    with pytest.raises(ValueError):
        grid("1:2")


# -- CLI ----------------------------------------------------------------------------------


def q_weight_score(aligned_dir):
    """``--score`` factory for the CLI test: a harmful score that grows with ‖q_proj − q_proj(θ)‖."""
    from safetensors.torch import load_file

    w0 = load_file(f"{aligned_dir}/model.safetensors")["model.layers.0.self_attn.q_proj.weight"].double()

    def score(model) -> float:
        w = model.model.layers[0].self_attn.q_proj.weight.detach().double()
        return 100.0 * float((w - w0).norm() / w0.norm())
    return score


def test_cli_writes_cosines_landscapes_epl_and_plots(tmp_path, capsys):
    from asft_optim.cli import main

    base, aligned = tiny_llama(0), tiny_llama(1)
    finetuned = copy.deepcopy(aligned)
    with torch.no_grad():
        finetuned.model.layers[0].self_attn.q_proj.weight.add_(0.01)
    for name, m in [("base", base), ("aligned", aligned), ("ft", finetuned)]:
        m.to(torch.float32).save_pretrained(tmp_path / name)
    adapter_model = lora(copy.deepcopy(aligned), QV)
    adapter_model.save_pretrained(tmp_path / "adapter")
    from asft_optim import build_anchors

    anchors = build_anchors(base, aligned, QV, mode="orthogonal", rank=2)
    anchors.save(tmp_path / "qv.anchors")
    out = tmp_path / "out"
    rc = main(["landscape", "--base", str(tmp_path / "base"), "--aligned", str(tmp_path / "aligned"),
               "--finetuned", f"harm={tmp_path / 'ft'}", "--adapter", str(tmp_path / "adapter"),
               "--random", "1", "--grid=-1:1:5", "--2d", "--grid-2d=-1:1:3",
               "--score", "test_landscape:q_weight_score", "--threshold", "60", "--anchors", str(tmp_path / "qv.anchors"), "-o", str(out), "--no-progress"])
    assert rc == 0
    for f in ["cosines.json", "cosines.md", "landscape_1d.json", "landscape_1d.png", "epl.md",
              "landscape_2d.json", "landscape_2d.png"]:
        assert (out / f).stat().st_size > 0, f
    cos = json.loads((out / "cosines.json").read_text())
    assert set(cos) == {"aligned", "harm", "adapter", "random-0"}
    for n, frac in cos["aligned"]["off_anchor_fraction"]["per_layer"].items():  # rank-2 cut of V keeps energy e
        assert frac == pytest.approx(math.sqrt(1 - anchors[n].energy), abs=1e-4)
    assert "‖(I−C)d‖/‖d‖" in (out / "cosines.md").read_text()
    d_aligned = direction_from_models(base, aligned, QV)
    assert cos["harm"]["overall"] == pytest.approx(
        cosine(d_aligned, direction_from_models(aligned, finetuned, QV)).overall, abs=1e-6)
    res = json.loads((out / "landscape_1d.json").read_text())
    assert res["score_at_origin"] == 0.0 and res["threshold"] == 60
    assert res["alpha_of_update"]["random-0"] == pytest.approx(1.0)  # already scaled to the layer norms
    # layer-normalised directions: α moves q_proj by |α|·‖W‖, so this score is 100·|α| for every direction
    for c in res["curves"]:
        assert c["values"] == pytest.approx([100 * abs(a) for a in c["alphas"]], abs=1e-3)
        assert res["epl"][c["label"]]["epl"] == 0.5  # 100·0.5 ≤ 60 < 100·1
    assert res["weights_bit_identical_after_1d"] is True
    two_d = json.loads((out / "landscape_2d.json").read_text())
    assert two_d["weights_bit_identical_after"] is True and two_d["threshold"] == 60
    assert "random-0" in capsys.readouterr().out


def test_off_anchor_fraction_matches_dense_projector():
    from asft_optim import build_anchors

    base, aligned = tiny_gpt2(0), tiny_gpt2(1)  # Conv1D: stored (in, out)
    anchors = build_anchors(base, aligned, ["c_attn"], mode="orthogonal", rank=2, dtype=D)
    name = "transformer.h.0.attn.c_attn.weight"
    v = (aligned.state_dict()[name] - base.state_dict()[name]).T  # (out, in)
    u = torch.linalg.svd(v, full_matrices=False).U[:, :2]
    update = random_direction(base, 3, ["c_attn"], dtype=D)
    x = update[name].T
    expected = float((x - u @ (u.T @ x)).norm() / x.norm())
    assert off_anchor_fraction(update, anchors)[name] == pytest.approx(expected, rel=1e-9)
    inside = {name: (u @ torch.randn(2, x.shape[1], dtype=D)).T}
    assert off_anchor_fraction(inside, anchors)[name] == pytest.approx(0.0, abs=1e-9)


def test_include_1d_direction_interpolates_exactly_between_checkpoints():
    base, aligned = tiny_llama(0), tiny_llama(1)
    d = direction_from_models(base, aligned, include_1d=True, dtype=D)
    assert "model.norm.weight" in d and "model.norm.weight" not in direction_from_models(base, aligned)
    target = aligned.state_dict()
    with perturbed(base, [d]) as set_point:
        set_point(1.0)
        for k, v in base.state_dict().items():
            torch.testing.assert_close(v, target[k], rtol=0, atol=1e-12)


def test_off_anchor_overall_is_the_whole_directions_dense_fraction():
    """The cosines table's overall ‖(I−C)d‖/‖d‖ (asft_optim.landscape_report), written densely:
    the residual of every anchored layer stacked, over the same layers' stacked norm."""
    from asft_optim import build_anchors
    from asft_optim.landscape_report import off_anchor_overall

    base, aligned = tiny_gpt2(0), tiny_gpt2(1)
    anchors = build_anchors(base, aligned, ["c_attn", "c_fc"], mode="orthogonal", rank=2, dtype=D)
    update = random_direction(base, 5, ["c_attn", "c_fc"], dtype=D)
    residual, total = 0.0, 0.0
    for name in anchors:
        v = (aligned.state_dict()[name] - base.state_dict()[name]).T  # Conv1D: stored (in, out)
        u = torch.linalg.svd(v, full_matrices=False).U[:, :2]
        x = update[name].T
        residual += float((x - u @ (u.T @ x)).norm() ** 2)
        total += float(x.norm() ** 2)
    overall, per_layer = off_anchor_overall(update, anchors)
    assert len(per_layer) >= 2 and overall == pytest.approx((residual / total) ** 0.5, rel=1e-9)
    assert off_anchor_overall({n: torch.zeros_like(t) for n, t in update.items()}, anchors)[0] == 0.0
