"""Safe LoRA, AsFT_Alt's harmful anchors and l2 anchors against dense oracles.

The oracles are written here from the definitions with dense matrices
(``torch.eye``, ``V Vᵀ/‖V‖_F``, ``s·B@A``), independently of ``asft_optim``.
"""

from __future__ import annotations

import json
import math

import pytest
import reference as ref
import torch
from hypothesis import given
from hypothesis import strategies as st
from strategies import lora_shapes, scalings, seeds
from tiny_models import C_ATTN, D, Q, V, lora, tiny_gpt2, tiny_llama
from torch import nn

from asft_optim import (
    AnchoredOptimizer,
    AnchorError,
    Anchors,
    anchor_penalty,
    harmful_anchors,
    l2_anchors,
    projection_from_delta,
    safe_lora_project,
)
from asft_optim.baselines import lora_cosine
from asft_optim.discovery import find_targets

PREFIX = "base_model.model."


def dense_kept(v: torch.Tensor, mode: str, rank: int | None) -> torch.Tensor:
    """Dense K: ``V Vᵀ/‖V‖_F`` or ``U_k U_kᵀ`` (alignment modes), ``I - U_k U_kᵀ`` (subspace)."""
    if mode == "safelora":
        return v @ v.T / torch.linalg.matrix_norm(v)
    u = torch.linalg.svd(v, full_matrices=False)[0][:, :rank]
    c = u @ u.T
    return torch.eye(v.shape[0], dtype=v.dtype) - c if mode == "subspace" else c


def dense_cos(k: torch.Tensor, delta: torch.Tensor) -> float:
    k, delta = k.detach(), delta.detach()
    return float(torch.nn.functional.cosine_similarity((k @ delta).reshape(1, -1), delta.reshape(1, -1)))


def _module(model, name):
    return model.get_submodule(PREFIX + name[: -len(".weight")])


def _llama_setup(mode="safelora", rank=None, seed=7):
    model = lora(tiny_llama(), ["q_proj", "v_proj"])
    g = torch.Generator().manual_seed(seed)
    vs = {Q: torch.randn(8, 8, generator=g, dtype=D), V: torch.randn(4, 8, generator=g, dtype=D)}
    anchors = Anchors.from_deltas(vs, mode, rank=rank, dtype=D)
    return model, anchors, vs


def _snapshot(model):
    return {n: t.detach().clone() for n, t in model.state_dict().items()}, {
        n: (p.requires_grad, None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()
    }


# -- Safe LoRA -----------------------------------------------------------------------------


@given(shape=lora_shapes(), mode=st.sampled_from(["safelora", "orthogonal", "subspace"]), s=scalings, seed=seeds)
def test_lora_cosine_equals_dense_formula(shape, mode, s, seed):
    d_out, d_in, r = shape
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(d_out, d_in + 1, generator=g, dtype=D)
    b, a = torch.randn(d_out, r, generator=g, dtype=D), torch.randn(r, d_in, generator=g, dtype=D)
    rank = None if mode == "safelora" else max(1, min(d_out, d_in + 1) - 1)
    proj = projection_from_delta(v, mode, rank=rank)
    expected = dense_cos(dense_kept(v, mode, rank), s * b @ a)
    got = float(lora_cosine(proj, s * b, a))  # s cancels: scaling B or not gives one cosine
    if math.isnan(expected):  # K·B·A = 0 exactly: the dense cosine is 0/0
        assert got == 0.0
    else:
        assert got == pytest.approx(expected, abs=1e-9)
    assert float(lora_cosine(proj, b, a)) == pytest.approx(got, abs=1e-9)


def test_lora_cosine_zero_update_is_nan():
    proj = projection_from_delta(torch.randn(4, 3, dtype=D))
    assert math.isnan(float(lora_cosine(proj, torch.zeros(4, 2, dtype=D), torch.randn(2, 3, dtype=D))))


@pytest.mark.parametrize("mode,rank", [("safelora", None), ("orthogonal", 2), ("subspace", 2)])
def test_report_cosines_equal_dense_oracle(mode, rank):
    model, anchors, vs = _llama_setup(mode, rank)
    report = safe_lora_project(model, anchors, dry_run=True)
    assert [(r.name, r.adapter) for r in report] == [(Q, "default"), (V, "default")]
    for r in report:
        delta = ref.lora_delta(_module(model, r.name))
        assert r.cosine == pytest.approx(dense_cos(dense_kept(vs[r.name], mode, rank), delta), abs=1e-10)


def test_one_row_per_active_adapter():
    from peft import LoraConfig

    model, anchors, vs = _llama_setup()
    torch.manual_seed(5)
    model.add_adapter("second", LoraConfig(r=3, lora_alpha=5, init_lora_weights=False, target_modules=["q_proj"]))
    model.base_model.set_adapter(["default", "second"])
    model.to(D)
    module = _module(model, Q)
    before = {a: (module.lora_B[a].weight.detach().clone(), module.lora_A[a].weight.detach()) for a in ("default", "second")}
    rows = safe_lora_project(model, anchors, threshold=1.0)
    assert [(r.name, r.adapter) for r in rows] == [(Q, "default"), (Q, "second"), (V, "default")]
    k = dense_kept(vs[Q], "safelora", None)
    for r in rows[:2]:  # each adapter scored and projected on its own
        b, a = before[r.adapter]
        assert r.cosine == pytest.approx(dense_cos(k, b @ a), abs=1e-10) and r.projected
        torch.testing.assert_close(module.lora_B[r.adapter].weight.detach(), k @ b, rtol=0, atol=1e-12)


def test_gpt2_conv1d_cosine_and_projection():
    model = lora(tiny_gpt2(), ["c_attn"], fan_in_fan_out=True)
    v = torch.randn(24, 8, generator=torch.Generator().manual_seed(3), dtype=D)
    anchors = Anchors.from_deltas({C_ATTN: v}, dtype=D)
    module = model.get_submodule(PREFIX + "transformer.h.0.attn.c_attn")
    k = dense_kept(v, "safelora", None)
    delta = ref.lora_delta(module)
    b_old = module.lora_B["default"].weight.detach().clone()
    (row,) = safe_lora_project(model, anchors, threshold=1.0)
    assert row.cosine == pytest.approx(dense_cos(k, delta), abs=1e-10) and row.projected
    torch.testing.assert_close(module.lora_B["default"].weight, k @ b_old, rtol=0, atol=1e-12)


def test_selection_by_threshold_and_count():
    model, anchors, _ = _llama_setup()
    cos = {r.name: r.cosine for r in safe_lora_project(model, anchors, dry_run=True)}
    low, high = sorted(cos, key=cos.get)
    between = (cos[low] + cos[high]) / 2
    assert {r.name for r in safe_lora_project(model, anchors, threshold=between, dry_run=True) if r.projected} == {low}
    assert {r.name: r.projected for r in safe_lora_project(model, anchors, threshold=cos[low], dry_run=True)} == {
        low: True, high: False,  # at or below the threshold
    }
    assert not any(r.projected for r in safe_lora_project(model, anchors, threshold=cos[low] - 1e-6, dry_run=True))
    for n, expected in [(0, set()), (1, {low}), (2, {low, high}), (10, {low, high})]:
        rows = safe_lora_project(model, anchors, num_layers=n, dry_run=True)
        assert {r.name for r in rows if r.projected} == expected


def test_default_threshold_is_half():
    model, anchors, _ = _llama_setup()
    rows = safe_lora_project(model, anchors, dry_run=True)
    assert [r.projected for r in rows] == [r.cosine <= 0.5 for r in rows]


@pytest.mark.parametrize("kw", [{"threshold": 1.0}, {"num_layers": 2}])
def test_dry_run_leaves_every_tensor_unchanged(kw):
    model, anchors, _ = _llama_setup()
    state, params = _snapshot(model)
    rows = safe_lora_project(model, anchors, dry_run=True, **kw)
    assert all(r.projected for r in rows)  # it would project everything...
    state2, params2 = _snapshot(model)  # ...but nothing changed
    assert state.keys() == state2.keys()
    assert all(torch.equal(state[n], state2[n]) for n in state)
    assert params2 == params  # requires_grad flags, and no .grad appeared
    assert rows == safe_lora_project(model, anchors, dry_run=True, **kw)


@pytest.mark.parametrize("mode,rank", [("safelora", None), ("orthogonal", 2), ("subspace", 2)])
def test_projected_model_has_expected_b(mode, rank):
    model, anchors, vs = _llama_setup(mode, rank)
    before = _snapshot(model)[0]
    cos = {r.name: r.cosine for r in safe_lora_project(model, anchors, dry_run=True)}
    chosen = min(cos, key=cos.get)
    rows = safe_lora_project(model, anchors, num_layers=1)
    assert [r.name for r in rows if r.projected] == [chosen]
    after = _snapshot(model)[0]
    for key in before:
        name = key[len(PREFIX):].replace(".lora_B.default", "").replace(".lora_A.default", "")
        if key.endswith("lora_B.default.weight") and name == chosen:
            expected = dense_kept(vs[chosen], mode, rank) @ before[key]
            torch.testing.assert_close(after[key], expected, rtol=0, atol=1e-12)
        else:
            assert torch.equal(after[key], before[key]), key
    # The projected layer is now aligned: a second pass finds cos(K·KB·A, KB·A) = 1 for projectors.
    if mode != "safelora":
        assert {r.name: r.cosine for r in safe_lora_project(model, anchors, dry_run=True)}[chosen] == pytest.approx(1.0)


def test_safe_lora_zero_adapter_is_reported_not_projected():
    model = lora(tiny_llama(), ["q_proj", "v_proj"], init_lora_weights=True)  # B = 0
    _, anchors, _ = _llama_setup()
    rows = safe_lora_project(model, anchors, num_layers=2)
    assert all(math.isnan(r.cosine) and not r.projected for r in rows)


def test_safe_lora_bad_inputs():
    model, anchors, _ = _llama_setup()
    with pytest.raises(ValueError, match="not both"):
        safe_lora_project(model, anchors, threshold=0.5, num_layers=1)
    with pytest.raises(ValueError, match="num_layers"):
        safe_lora_project(model, anchors, num_layers=-1)
    with pytest.raises(AnchorError, match="keep nothing"):
        safe_lora_project(model, l2_anchors(model, ["q_proj"]))
    other = Anchors.from_deltas({"model.layers.9.self_attn.q_proj.weight": torch.randn(8, 8, dtype=D)})
    with pytest.raises(AnchorError, match="match no module"):
        safe_lora_project(model, other)
    with pytest.raises(AnchorError, match="no anchored module has an active"):
        safe_lora_project(tiny_llama(), anchors)  # no LoRA at all


# -- l2 anchors ----------------------------------------------------------------------------


def test_l2_anchors_penalise_all_of_delta_w():
    model = lora(tiny_llama(), ["q_proj", "v_proj"])
    anchors = l2_anchors(model, ["q_proj", "v_proj"], dtype=D)
    assert set(anchors) == {Q, V} and {p.mode for p in anchors.values()} == {"l2"}
    assert anchors[Q].factor.shape == (8, 0) and anchors[V].factor.shape == (4, 0)
    expected = sum(ref.lora_delta(_module(model, n)).pow(2).sum() for n in (Q, V))
    torch.testing.assert_close(anchor_penalty(model, anchors), expected)
    # One metadata writer: the same target_modules format as build_anchors' (a JSON list).
    assert json.loads(anchors.metadata["target_modules"]) == ["q_proj", "v_proj"]
    assert anchors.metadata["library"].startswith("asft-optim ")
    gpt2 = l2_anchors(tiny_gpt2(), ["c_attn"])  # Conv1D (in, out): C acts on the 24 outputs
    assert gpt2[C_ATTN].factor.shape == (24, 0)
    with pytest.raises(AnchorError, match="no 2-D weight"):
        l2_anchors(model, ["nope"])


# -- AsFT_Alt: harmful anchors -------------------------------------------------------------


class Toy(nn.Module):
    """``fc2(tanh(fc1 x))``; the harmful loss is ``-mean(uᵀ fc2(h))``: it only sees direction u."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 5)
        self.fc2 = nn.Linear(5, 4)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def _planted(seed=0):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    u = torch.randn(4, generator=g, dtype=D)
    u = u / u.norm()
    batches = [torch.randn(3, 6, generator=g, dtype=D) for _ in range(4)]

    def loss_fn(model, x):  # harmful loss: push the output along u (and nowhere else)
        return -(model(x) @ u).mean() + 0.1 * (model(x) @ u).pow(2).mean()

    return Toy().to(D), u, batches, loss_fn


def _principal_angle(basis: torch.Tensor, u: torch.Tensor) -> float:
    """Angle between the unit vector u and span(basis), basis orthonormal columns."""
    return math.acos(min(1.0, float((basis.T @ u).norm())))


@pytest.mark.parametrize("method", ["gradient", "delta"])
@pytest.mark.parametrize("rank", [1, 2])
def test_planted_harmful_direction_is_recovered(method, rank):
    model, u, batches, loss_fn = _planted()
    anchors = harmful_anchors(
        model, batches, target_modules=["fc2"], rank=rank, method=method, loss_fn=loss_fn, lr=0.5, epochs=3, dtype=D
    )
    (name,) = anchors
    assert name == "fc2.weight" and anchors[name].mode == "subspace" and anchors[name].rank == rank
    assert _principal_angle(anchors[name].factor, u) < 1e-6


def test_planted_direction_in_lora_model_and_exact_restore():
    model, u, batches, loss_fn = _planted()
    model = lora(model, ["fc1", "fc2"])
    model.train()
    model.base_model.model.fc1.lora_A["default"].train(False)  # a mixed mode must come back as is
    state, params = _snapshot(model)
    modes = {n: m.training for n, m in model.named_modules()}
    for method in ("gradient", "delta"):
        anchors = harmful_anchors(
            model, batches, target_modules=["fc1", "fc2"], rank=1, method=method, loss_fn=loss_fn, lr=0.5, dtype=D
        )
        assert set(anchors) == {"fc1.weight", "fc2.weight"}
        assert _principal_angle(anchors["fc2.weight"].factor, u) < 1e-6
        state2, params2 = _snapshot(model)
        assert all(torch.equal(state[n], state2[n]) for n in state)  # weights bit for bit
        assert params2 == {n: (p[0], None) for n, p in params.items()}  # flags; no .grad written
        assert {n: m.training for n, m in model.named_modules()} == modes
    assert not model.base_model.model.fc2.base_layer.weight.requires_grad


def test_harmful_anchors_on_hf_model_with_default_loss():
    model = lora(tiny_llama(), ["q_proj", "v_proj"])
    ids = torch.randint(0, 32, (2, 5), generator=torch.Generator().manual_seed(0))
    anchors = harmful_anchors(model, [{"input_ids": ids, "labels": ids}], target_modules=["q_proj", "v_proj"], rank=2)
    assert set(anchors) == {Q, V} and anchors[V].factor.shape == (4, 2)
    assert anchors[Q].factor.dtype == torch.float32 and anchors.metadata["source"] == "harmful-gradient"
    f = anchors[Q].factor.double()
    torch.testing.assert_close(f.T @ f, torch.eye(2, dtype=D), atol=1e-5, rtol=0)


def test_harmful_anchors_restore_on_error():
    model, _, batches, _ = _planted()
    state, params = _snapshot(model)

    def failing(model, x):
        raise RuntimeError("boom")

    model.fc2.weight.requires_grad_(False)
    with pytest.raises(RuntimeError, match="boom"):
        harmful_anchors(model, batches, target_modules=["fc2"], rank=1, method="delta", loss_fn=failing)
    assert not model.fc2.weight.requires_grad and model.training
    assert all(torch.equal(t, _snapshot(model)[0][n]) for n, t in state.items())


def test_harmful_anchors_bad_inputs():
    model, _, batches, loss_fn = _planted()
    with pytest.raises(AnchorError, match="rank= or energy="):
        harmful_anchors(model, batches, target_modules=["fc2"], loss_fn=loss_fn)
    with pytest.raises(ValueError, match="method"):
        harmful_anchors(model, batches, target_modules=["fc2"], rank=1, method="oops", loss_fn=loss_fn)
    with pytest.raises(ValueError, match="empty"):
        harmful_anchors(model, [], target_modules=["fc2"], rank=1, loss_fn=loss_fn)
    with pytest.raises(AnchorError, match="does not move"):  # fc1's output never reaches this loss
        harmful_anchors(model, batches, target_modules=["fc1"], rank=1, loss_fn=lambda m, x: m.fc2(x[:, :5]).sum())
    with pytest.raises(TypeError, match="dicts"):
        harmful_anchors(model, batches, target_modules=["fc2"], rank=1)


@pytest.mark.parametrize("anchor_lambda", [1.0, 2.5])
def test_subspace_penalty_gradient_equals_autograd(anchor_lambda):
    """λ‖C_harm s·B·A‖² with dense C_harm = U Uᵀ: value, closed-form grads, and one optimizer step."""
    toy, _, batches, loss_fn = _planted()
    anchors = harmful_anchors(toy, batches, target_modules=["fc1", "fc2"], rank=2, loss_fn=loss_fn, dtype=D)
    model = lora(toy, ["fc1", "fc2"], lora_alpha=3)

    def dense_penalty():
        total = 0.0
        for name, proj in anchors.items():
            u = proj.factor
            c = u @ u.T
            assert torch.allclose(c @ c, c, atol=1e-12)  # a projector
            total = total + (c @ ref.lora_delta(_module(model, name))).pow(2).sum()
        return anchor_lambda * total

    params = [p for p in model.parameters() if p.requires_grad]
    expected = torch.autograd.grad(dense_penalty(), params)
    torch.testing.assert_close(anchor_penalty(model, anchors, anchor_lambda), dense_penalty())

    targets, _ = find_targets(model, anchors)
    closed = {}
    for t in targets:
        terms = t.terms(anchors[t.name])
        closed.update({id(p): anchor_lambda * g for p, g in zip(terms.params, terms.values.grads, strict=True)})
    for p, e in zip(params, expected, strict=True):
        torch.testing.assert_close(closed[id(p)], e, rtol=1e-10, atol=1e-12)

    before = [p.detach().clone() for p in params]
    opt = AnchoredOptimizer(torch.optim.SGD(params, lr=0.1), model, anchors, anchor_lambda)
    opt.step()  # no task gradient: the step is -lr·λ∇P
    for p, b, e in zip(params, before, expected, strict=True):
        torch.testing.assert_close(p.detach(), b - 0.1 * e, rtol=1e-10, atol=1e-12)


# -- CLI -----------------------------------------------------------------------------------

HAS_ANCHOR_FILES = hasattr(Anchors, "save") and hasattr(Anchors, "load")


def test_cli_rejects_threshold_with_num_layers(capsys):
    from asft_optim.cli import main

    with pytest.raises(SystemExit):
        main(["safe-lora", "--model", "m", "--adapter", "a", "--anchors", "f", "--threshold", "0.5", "--num-layers", "2"])
    assert "not allowed with argument" in capsys.readouterr().err


@pytest.mark.xfail(
    not HAS_ANCHOR_FILES, raises=AttributeError, strict=True,
    reason="anchor files (Anchors.save/load) come with the anchors branch; passes once it is merged",
)
def test_cli_safe_lora_on_saved_adapter(tmp_path, capsys):
    from safetensors.torch import load_file

    from asft_optim import build_anchors
    from asft_optim.cli import main

    base, aligned = tiny_llama(0).float(), tiny_llama(1).float()
    base.save_pretrained(tmp_path / "base")
    anchors = build_anchors(base, aligned, ["q_proj", "v_proj"])
    anchors.save(tmp_path / "qv.anchors.safetensors")
    model = lora(tiny_llama(0), ["q_proj", "v_proj"]).float()
    model.save_pretrained(tmp_path / "adapter")
    expected = safe_lora_project(model, anchors, num_layers=1, dry_run=True)
    common = ["safe-lora", "--model", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter"),
              "--anchors", str(tmp_path / "qv.anchors.safetensors"), "--num-layers", "1"]

    assert main(common + ["--dry-run"]) == 0
    assert "would project 1 of 2" in capsys.readouterr().err
    assert main(common) == 2  # no -o
    assert main(common + ["-o", str(tmp_path / "out"), "--json"]) == 0
    import json

    rows = json.loads(capsys.readouterr().out)
    assert [(r["name"], r["projected"]) for r in rows] == [(r.name, r.projected) for r in expected]
    assert [r["cosine"] for r in rows] == pytest.approx([r.cosine for r in expected], abs=1e-5)

    old = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    new = load_file(tmp_path / "out" / "adapter_model.safetensors")
    (chosen,) = [r.name for r in expected if r.projected]
    b_key = PREFIX + chosen.replace(".weight", ".lora_B.weight")
    assert old.keys() == new.keys()
    for key in old:
        if key == b_key:
            torch.testing.assert_close(new[key], anchors[chosen].apply_c(old[key]), rtol=1e-5, atol=1e-6)
            assert not torch.allclose(new[key], old[key])
        else:
            assert torch.equal(new[key], old[key]), key
