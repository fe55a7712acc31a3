"""Penalty gradients for every kind of target equal autograd of the dense oracle.

For each target kind and each mode the optimizer's gradient (an inner SGD with lr=0
leaves exactly λ∇P in ``.grad``) and the loss-level twin ``anchor_penalty`` are both
compared with ``torch.autograd.grad`` of ``tests/reference.py``.
"""

from __future__ import annotations

import pytest
import reference as ref
import torch
from tiny_models import C_ATTN, D, Q, V, lora, make_anchors, tiny_convnet, tiny_gpt2, tiny_llama

from asft_optim import AnchoredOptimizer, AnchorPenalty, anchor_penalty
from asft_optim.discovery import find_targets, hf_name

E = "model.embed_tokens.weight"
CONV = "conv.weight"


def _llama_lora(**kw):
    return lora(tiny_llama(), ["q_proj", "v_proj"], **kw), {Q: (8, 8), V: (4, 8)}


def _multi_adapter():
    from peft import LoraConfig

    model, dims = _llama_lora()
    torch.manual_seed(5)
    model.add_adapter("second", LoraConfig(r=3, lora_alpha=5, init_lora_weights=False, target_modules=["q_proj"]))
    model.base_model.set_adapter(["default", "second"])
    return model.to(D), dims


def _full(model_fn, names, dims):
    model = model_fn()
    for p in model.parameters():
        p.requires_grad_(False)
    mods = dict(model.named_modules())
    for n in names:
        mods[n[: -len(".weight")]].weight.requires_grad_(True)
    return model, dims


CASES = {
    "lora_linear": lambda: _llama_lora(),
    "rslora": lambda: _llama_lora(use_rslora=True, r=3, lora_alpha=5),
    "conv1d_fan_in_fan_out": lambda: (lora(tiny_gpt2(), ["c_attn"], fan_in_fan_out=True), {C_ATTN: (24, 8)}),
    "embedding_lora": lambda: (lora(tiny_llama(), ["embed_tokens"]), {E: (8, 32)}),
    "conv2d_lora": lambda: (lora(tiny_convnet(), ["conv"]), {CONV: (4, 18)}),
    "dora": lambda: _llama_lora(use_dora=True),
    "dora_conv1d": lambda: (lora(tiny_gpt2(), ["c_attn"], fan_in_fan_out=True, use_dora=True), {C_ATTN: (24, 8)}),
    "multi_adapter": _multi_adapter,
    "full_linear": lambda: _full(tiny_llama, [Q, V], {Q: (8, 8), V: (4, 8)}),
    "full_conv1d": lambda: _full(tiny_gpt2, [C_ATTN], {C_ATTN: (24, 8)}),
    "full_embedding": lambda: _full(tiny_llama, [E], {E: (8, 32)}),
    "full_conv2d": lambda: _full(tiny_convnet, [CONV], {CONV: (4, 18)}),
}
EXPECTED_KIND = {"dora": "autograd", "dora_conv1d": "autograd"}


def _trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def _perturb_full_weights(model, dims, seed=3):
    """Move fully tuned weights away from W_ref (captured by the optimizer at construction)."""
    g = torch.Generator().manual_seed(seed)
    mods = dict(model.named_modules())
    with torch.no_grad():
        for n in dims:
            w = mods[n[: -len(".weight")]].weight
            w.add_(0.1 * torch.randn(w.shape, generator=g, dtype=D))


def _penalty_grads_from_optimizer(opt, params):
    for p in params:
        p.grad = None
    opt.step()
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]


@pytest.mark.parametrize("mode", ["safelora", "orthogonal", "subspace", "l2"])
@pytest.mark.parametrize("case", list(CASES))
def test_penalty_gradient_matches_oracle(case, mode):
    model, dims = CASES[case]()
    anchors, oracle = make_anchors(model, dims, mode, None)
    params = _trainable(model)
    lam = 0.7
    opt = AnchoredOptimizer(torch.optim.SGD(params, lr=0.0), model, anchors, anchor_lambda=lam)
    assert {t.kind for t in opt.targets} == {EXPECTED_KIND.get(case, "full" if case.startswith("full") else "lora")}
    full = case.startswith("full")
    reference = {n: dict(model.named_modules())[n[:-7]].weight.detach().clone() for n in dims} if full else None
    if full:
        _perturb_full_weights(model, dims)

    expected_loss = ref.oracle_penalty(model, oracle, lam, reference)
    expected = torch.autograd.grad(expected_loss, params, allow_unused=True)
    expected = [torch.zeros_like(p) if g is None else g for g, p in zip(expected, params, strict=True)]

    got = _penalty_grads_from_optimizer(opt, params)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, atol=1e-10, rtol=1e-9)
    assert any(e.abs().sum() > 0 for e in expected)  # the comparison is not vacuous

    # The loss-level twin: same value, same autograd gradient.
    twin = anchor_penalty(model, anchors, lam, reference=reference)
    torch.testing.assert_close(twin, expected_loss.detach(), atol=1e-10, rtol=1e-9)
    twin_grads = torch.autograd.grad(twin, params, allow_unused=True)
    for p, g, e in zip(params, twin_grads, expected, strict=True):
        torch.testing.assert_close(torch.zeros_like(p) if g is None else g, e, atol=1e-10, rtol=1e-9)

    # Diagnostics after the step equal the oracle's, per weight.
    stats = opt.anchor_stats()
    for name, (pen, frac) in ref.oracle_stats(model, oracle, reference).items():
        assert stats[name]["raw_penalty"] == pytest.approx(pen.item(), rel=1e-9, abs=1e-12)
        assert stats[name]["penalty"] == pytest.approx(lam * pen.item(), rel=1e-9, abs=1e-12)
        assert stats[name]["off_anchor_fraction"] == pytest.approx(frac.item(), rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("case", ["lora_linear", "conv1d_fan_in_fan_out", "embedding_lora", "conv2d_lora", "dora"])
def test_oracle_delta_matches_peft_merge(case):
    """The oracle's ΔW conventions agree with what PEFT merges into the base weight."""
    model, dims = CASES[case]()
    mods = dict(model.named_modules())
    for n in dims:
        m = mods["base_model.model." + n[:-7]]
        fan_t = type(m.get_base_layer()).__name__ == "Conv1D" or isinstance(m.get_base_layer(), torch.nn.Embedding)
        before = m.get_base_layer().weight.detach().clone()
        with torch.no_grad():
            expected = ref.lora_delta(m)
        m.merge()
        after = m.get_base_layer().weight.detach()
        merged = (after - before).T if fan_t else (after - before)
        torch.testing.assert_close(merged.reshape(merged.shape[0], -1), expected, atol=1e-12, rtol=1e-10)
        m.unmerge()


def test_scaling_is_reread_every_step():
    model, dims = _llama_lora()
    anchors, oracle = make_anchors(model, dims, "safelora", None)
    params = _trainable(model)
    opt = AnchoredOptimizer(torch.optim.SGD(params, lr=0.0), model, anchors)
    for scale in (1.0, 0.25, 3.0):
        for m in model.modules():
            if hasattr(m, "set_scale"):
                m.set_scale("default", scale)
        expected = torch.autograd.grad(ref.oracle_penalty(model, oracle), params)
        for g, e in zip(_penalty_grads_from_optimizer(opt, params), expected, strict=True):
            torch.testing.assert_close(g, e, atol=1e-10, rtol=1e-9)


def test_merged_and_disabled_adapters_add_nothing():
    model, dims = _llama_lora()
    anchors, _ = make_anchors(model, dims, "safelora", None)
    params = _trainable(model)
    opt = AnchoredOptimizer(torch.optim.SGD(params, lr=0.0), model, anchors)
    with model.disable_adapter():
        assert all(g.abs().sum() == 0 for g in _penalty_grads_from_optimizer(opt, params))
        assert anchor_penalty(model, anchors) == 0
    model.merge_adapter()
    assert all(g.abs().sum() == 0 for g in _penalty_grads_from_optimizer(opt, params))
    assert opt.anchor_stats() == {}
    model.unmerge_adapter()
    assert any(g.abs().sum() > 0 for g in _penalty_grads_from_optimizer(opt, params))


def test_only_active_adapter_is_penalised():
    """An inactive adapter contributes neither to ΔW nor to the gradients."""
    model, dims = _multi_adapter()
    model.base_model.set_adapter("second")
    anchors, oracle = make_anchors(model, {Q: dims[Q]}, "orthogonal", 2)
    params = _trainable(model)
    assert all("second" in n for n, p in model.named_parameters() if p.requires_grad)
    opt = AnchoredOptimizer(torch.optim.SGD(params, lr=0.0), model, anchors)
    expected = torch.autograd.grad(ref.oracle_penalty(model, oracle), params)
    for g, e in zip(_penalty_grads_from_optimizer(opt, params), expected, strict=True):
        torch.testing.assert_close(g, e, atol=1e-10, rtol=1e-9)


def test_find_targets_strips_wrappers_and_reports_missing():
    model, dims = _llama_lora()
    anchors, _ = make_anchors(model, {**dims, "model.layers.9.q_proj.weight": (8, 8)}, "safelora", None)
    targets, missing = find_targets(model, anchors)
    assert sorted(t.name for t in targets) == sorted(dims)
    assert missing == ["model.layers.9.q_proj.weight"]


def test_hf_name_strips_wrappers():
    assert hf_name("base_model.model.model.layers.0.self_attn.q_proj") == "model.layers.0.self_attn.q_proj"
    assert hf_name("module._orig_mod.model.layers.0._fsdp_wrapped_module.mlp") == "model.layers.0.mlp"
    assert hf_name("model.layers.1._checkpoint_wrapped_module.self_attn.v_proj") == "model.layers.1.self_attn.v_proj"


def test_anchor_penalty_binds_once_and_rebinds_when_the_model_or_anchors_change(monkeypatch):
    """Discovery and shape checks run once per (model, anchors); a later PEFT wrap, a replaced
    module, an edited or a new anchors mapping are seen (the value always equals the oracle)."""
    import asft_optim.penalty as penalty

    calls = []
    real = penalty.bind_targets
    monkeypatch.setattr(penalty, "bind_targets", lambda *a, **k: calls.append(1) or real(*a, **k))
    model, dims = _full(tiny_llama, [Q, V], {Q: (8, 8), V: (4, 8)})
    anchors, oracle = make_anchors(model, dims, "safelora", None)
    anchors = dict(anchors)
    reference = {n: dict(model.named_modules())[n[:-7]].weight.detach().clone() for n in dims}
    _perturb_full_weights(model, dims)

    def check():
        got = anchor_penalty(model, anchors, reference=reference)
        torch.testing.assert_close(got, ref.oracle_penalty(model, oracle, 1.0, reference).detach(), atol=1e-10, rtol=1e-9)

    check(), check()
    assert len(calls) == 1
    other, other_oracle = make_anchors(model, {V: dims[V]}, "orthogonal", 2, seed=11)
    anchors[V], oracle[V] = other[V], other_oracle[V]  # an edited entry
    check()
    assert len(calls) == 2
    attn = model.model.layers[0].self_attn
    attn.q_proj = torch.nn.Linear(8, 8, bias=False, dtype=D)  # a replaced module
    reference[Q] = attn.q_proj.weight.detach() - 0.1
    check()
    assert len(calls) == 3
    from peft import LoraConfig, get_peft_model

    get_peft_model(model, LoraConfig(r=2, lora_alpha=4, init_lora_weights=False, target_modules=["q_proj", "v_proj"]))
    check()  # the wrapped modules of the same model are found: ΔW is now s·B·A
    assert len(calls) == 4
    check()
    assert len(calls) == 4
    anchor_penalty(model, dict(anchors), reference=reference)  # another anchors object
    assert len(calls) == 5


def test_anchor_penalty_stays_bound_across_forward_passes(monkeypatch):
    """A forward pass that builds temporary containers (HF Llama slices its ModuleList) does
    not drop the binding: only a change of the model's own modules does."""
    import asft_optim.penalty as penalty

    calls = []
    real = penalty.bind_targets
    monkeypatch.setattr(penalty, "bind_targets", lambda *a, **k: calls.append(1) or real(*a, **k))
    model, dims = _llama_lora()
    anchors, _ = make_anchors(model, dims, "safelora", None)
    for _ in range(3):
        model(input_ids=torch.tensor([[1, 2, 3]])).logits.sum().backward()
        anchor_penalty(model, anchors).backward()
        torch.nn.ModuleList([torch.nn.Linear(2, 2)])  # unrelated registrations
    assert len(calls) == 1


def _pissa():
    model = lora(tiny_llama().float(), ["q_proj", "v_proj"], init_lora_weights="pissa")
    return model, {Q: (8, 8), V: (4, 8)}


@pytest.mark.parametrize("case", [*CASES, "pissa_origin"])
def test_loss_level_gradient_equals_the_optimizers_bit_for_bit(case):
    """One penalty path: ``AnchorPenalty`` and ``anchor_penalty`` take their gradients from
    the very terms ``step()`` adds to ``.grad``, for every kind of target (full weights with
    W_ref, LoRA with one or several adapters or an origin), bit for bit; DoRA (autograd on
    both routes) to float64 rounding."""
    model, dims = _pissa() if case == "pissa_origin" else CASES[case]()
    anchors, _ = make_anchors(model, dims, "safelora", None)
    params = _trainable(model)
    lam = 0.7
    opt = AnchoredOptimizer(torch.optim.SGD(params, lr=0.0), model, anchors, anchor_lambda=lam)
    penalty = AnchorPenalty(model, anchors, anchor_lambda=lam)  # records the same start
    full = {t.name: t.reference for t in opt.targets if t.kind == "full"}
    origins = {t.name: t.origin for t in opt.targets if t.kind == "lora"}
    _perturb_full_weights(model, full)
    with torch.no_grad():
        for p in params:  # move every adapter too, so that each term is nonzero
            if p.dim() >= 2 and case != "full" and not case.startswith("full"):
                p.add_(0.01 * torch.ones_like(p))
    want = _penalty_grads_from_optimizer(opt, params)
    assert any(bool(g.abs().sum() > 0) for g in want)
    for route in ("object", "one-shot"):
        for p in params:
            p.grad = None
        if route == "object":
            value = penalty()
        else:
            value = anchor_penalty(model, anchors, lam, reference=full or None, origins=origins or None)
        value.backward()
        got = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        for g, w in zip(got, want, strict=True):
            if EXPECTED_KIND.get(case) == "autograd":
                # DoRA: autograd of the same ΔW on both routes, λ applied before or after
                # the chain rule: equal to float64 rounding (see DeltaWeightTarget.penalty).
                torch.testing.assert_close(g, w, rtol=1e-13, atol=1e-15)
            else:
                assert torch.equal(g, w), (route, (g - w).abs().max())
