"""AnchoredOptimizer as a drop-in: trajectories, state, schedulers, AMP, bad input."""

from __future__ import annotations

import copy
import io

import pytest
import reference as ref
import torch
from tiny_models import DIMS, D, Q, V, lm_loss, lora, make_anchors, tiny_llama

from asft_optim import (
    AnchoredAdamW,
    AnchoredOptimizer,
    AnchorError,
    Projection,
    convert_reference_lambda,
)

INNER = {
    "sgd": lambda ps, **kw: torch.optim.SGD(ps, lr=0.05, momentum=0.9, **kw),
    "adam": lambda ps, **kw: torch.optim.Adam(ps, lr=1e-2, **kw),
    "adamw": lambda ps, **kw: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, **kw),
    "rmsprop": lambda ps, **kw: torch.optim.RMSprop(ps, lr=1e-3, **kw),
}


def _setup(mode="safelora", full=False, seed=0):
    model = tiny_llama(seed)
    if full:
        for n, p in model.named_parameters():
            p.requires_grad_(n in (Q, V))
    else:
        model = lora(model, ["q_proj", "v_proj"])
    anchors, oracle = make_anchors(model, DIMS, mode, None)
    return model, anchors, oracle


def _params(model):
    return [p for p in model.parameters() if p.requires_grad]


def _train(model, opt, steps, start=0, penalty=None):
    for t in range(start, start + steps):
        opt.zero_grad()
        loss = lm_loss(model, t)
        if penalty is not None:
            loss = loss + penalty(t)
        loss.backward()
        opt.step()


def _assert_models(a, b, exact=False, atol=1e-9):
    for (n, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        if exact:
            assert torch.equal(p, q), n
        else:
            torch.testing.assert_close(p, q, atol=atol, rtol=1e-8, msg=n)


def _full_reference(model):
    mods = dict(model.named_modules())
    return {n: mods[n[:-7]].weight.detach().clone() for n in DIMS}


# -- trajectories -----------------------------------------------------------------------


@pytest.mark.parametrize("inner", list(INNER))
def test_trajectory_equals_inner_on_task_plus_penalty(inner):
    model, anchors, oracle = _setup("safelora")
    twin = copy.deepcopy(model)
    opt = AnchoredOptimizer(INNER[inner](_params(model)), model, anchors, anchor_lambda=0.5)
    _train(model, opt, 20)
    _train(twin, INNER[inner](_params(twin)), 20, penalty=lambda t: ref.oracle_penalty(twin, oracle, 0.5))
    _assert_models(model, twin)
    assert not torch.equal(model.base_model.model.model.layers[0].self_attn.q_proj.lora_B.default.weight,
                           tiny_llama_lora_b0())  # it moved


def tiny_llama_lora_b0():
    return lora(tiny_llama(0), ["q_proj", "v_proj"]).base_model.model.model.layers[0].self_attn.q_proj.lora_B.default.weight


@pytest.mark.parametrize("mode", ["orthogonal", "subspace"])
def test_full_finetuning_trajectory(mode):
    model, anchors, oracle = _setup(mode, full=True)
    twin = copy.deepcopy(model)
    reference = _full_reference(model)
    opt = AnchoredAdamW(model, anchors, anchor_lambda=2.0, lr=1e-2)
    _train(model, opt, 20)
    inner = torch.optim.AdamW(_params(twin), lr=1e-2)
    _train(twin, inner, 20, penalty=lambda t: ref.oracle_penalty(twin, oracle, 2.0, reference))
    _assert_models(model, twin)


@pytest.mark.parametrize("inner", list(INNER))
def test_lambda_zero_is_bit_identical(inner):
    model, anchors, _ = _setup()
    twin = copy.deepcopy(model)
    opt = AnchoredOptimizer(INNER[inner](_params(model)), model, anchors, anchor_lambda=0.0)
    _train(model, opt, 10)
    plain = INNER[inner](_params(twin))
    _train(twin, plain, 10)
    _assert_models(model, twin, exact=True)
    assert opt.anchor_stats()[Q]["raw_penalty"] > 0  # diagnostics still computed


def test_lambda_zero_does_not_create_gradients():
    """A parameter without a gradient stays without one (the inner optimizer skips it)."""
    model, anchors, _ = _setup()
    opt = AnchoredOptimizer(torch.optim.AdamW(_params(model), lr=1e-2), model, anchors, anchor_lambda=0.0)
    before = [p.clone() for p in _params(model)]
    opt.step()
    assert all(p.grad is None for p in _params(model)) and not opt.state
    _assert_models(model, model, exact=True)
    assert all(torch.equal(a, b) for a, b in zip(before, _params(model), strict=True))


def test_per_group_lambda():
    model, anchors, oracle = _setup()
    twin = copy.deepcopy(model)

    def groups(m):
        q = [p for n, p in m.named_parameters() if p.requires_grad and "q_proj" in n]
        v = [p for n, p in m.named_parameters() if p.requires_grad and "v_proj" in n]
        return q, v

    q, v = groups(model)
    inner = torch.optim.Adam([{"params": q, "anchor_lambda": 0.3}, {"params": v, "anchor_lambda": 3.0}], lr=1e-2)
    opt = AnchoredOptimizer(inner, model, anchors, anchor_lambda=1.0)
    _train(model, opt, 8)
    lam = {Q: 0.3, V: 3.0}
    _train(twin, torch.optim.Adam(_params(twin), lr=1e-2), 8, penalty=lambda t: ref.oracle_penalty(twin, oracle, lam))
    _assert_models(model, twin)


def test_schedulers_on_lr_and_on_lambda():
    """A torch LR scheduler drives lr, and λ is scheduled by writing the param group."""
    model, anchors, oracle = _setup()
    twin = copy.deepcopy(model)
    opt = AnchoredAdamW(model, anchors, anchor_lambda=1.0, lr=1e-2, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    inner = torch.optim.AdamW(_params(twin), lr=1e-2, weight_decay=0.0)
    sched_ref = torch.optim.lr_scheduler.StepLR(inner, step_size=3, gamma=0.5)
    lam_at = lambda t: 0.2 * (t + 1)  # noqa: E731
    for t in range(10):
        for g in opt.param_groups:
            g["anchor_lambda"] = lam_at(t)
        _train(model, opt, 1, start=t)
        sched.step()
        _train(twin, inner, 1, start=t, penalty=lambda s: ref.oracle_penalty(twin, oracle, lam_at(s)))
        sched_ref.step()
    assert opt.param_groups[0]["lr"] == inner.param_groups[0]["lr"] == 1e-2 * 0.5**3
    _assert_models(model, twin)


# -- state -------------------------------------------------------------------------------


@pytest.mark.parametrize("full", [False, True])
def test_state_dict_roundtrip_resumes_bit_exactly(full):
    model, anchors, _ = _setup("orthogonal", full=full)
    start = copy.deepcopy(model)
    opt = AnchoredAdamW(model, anchors, anchor_lambda=0.5, lr=1e-2)
    _train(model, opt, 6)
    for g in opt.param_groups:
        g["anchor_lambda"] = 0.8  # a scheduled λ must survive the round trip
    buf_opt, buf_model = io.BytesIO(), io.BytesIO()
    torch.save(opt.state_dict(), buf_opt)
    torch.save(model.state_dict(), buf_model)
    _train(model, opt, 6, start=6)

    resumed = copy.deepcopy(start)
    buf_opt.seek(0), buf_model.seek(0)
    resumed.load_state_dict(torch.load(buf_model, weights_only=True))
    fresh = AnchoredAdamW(resumed, anchors, anchor_lambda=0.5, lr=1e-2)  # W_ref would be wrong
    fresh.load_state_dict(torch.load(buf_opt, weights_only=True))  # ... until restored here
    assert fresh.param_groups[0]["anchor_lambda"] == 0.8
    _train(resumed, fresh, 6, start=6)
    _assert_models(model, resumed, exact=True)


def test_deepcopy_and_scheduler_patched_step():
    model, anchors, _ = _setup()
    opt = AnchoredAdamW(model, anchors, lr=1e-2)
    torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 1.0)  # patches opt.step on the instance
    _train(model, opt, 2)
    model2, opt2 = copy.deepcopy((model, opt))
    _train(model, opt, 3, start=2)
    _train(model2, opt2, 3, start=2)
    _assert_models(model, model2, exact=True)
    assert opt2.state is not opt.state and opt2.param_groups[0]["params"][0] is not opt.param_groups[0]["params"][0]


def test_live_param_groups_follow_load_state_dict():
    """accelerate replaces the group dicts through load_state_dict: schedulers must still act."""
    model, anchors, _ = _setup()
    opt = AnchoredAdamW(model, anchors, lr=1e-2)
    opt.load_state_dict(opt.state_dict())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 0.5**e)
    _train(model, opt, 1)
    sched.step()
    assert opt.optimizer.param_groups[0]["lr"] == 5e-3
    assert opt.param_groups is opt.optimizer.param_groups and opt.state is opt.optimizer.state
    assert isinstance(opt, torch.optim.Optimizer) and opt.defaults["anchor_lambda"] == 1.0


def test_zero_grad_hooks_and_train_eval_forwarded():
    model, anchors, _ = _setup()
    calls = []

    class WithModes(torch.optim.SGD):
        def train(self):
            calls.append("train")

        def eval(self):
            calls.append("eval")

    opt = AnchoredOptimizer(WithModes(_params(model), lr=0.1), model, anchors)
    opt.register_step_pre_hook(lambda *a: calls.append("pre"))
    opt.register_step_post_hook(lambda *a: calls.append("post"))
    opt.train(), opt.eval()
    _train(model, opt, 1)
    assert calls == ["train", "eval", "pre", "post"]
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is not None and p.grad.abs().sum() == 0 for p in _params(model))
    opt.zero_grad()
    assert all(p.grad is None for p in _params(model))


# -- AMP ---------------------------------------------------------------------------------


def test_grad_scaler_matches_reference():
    model, anchors, oracle = _setup()
    twin = copy.deepcopy(model)
    opt = AnchoredAdamW(model, anchors, anchor_lambda=0.5, lr=1e-2)
    inner = torch.optim.AdamW(_params(twin), lr=1e-2)
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2) for _ in range(2)]
    for t in range(8):
        for m, o, sc, pen in ((model, opt, scalers[0], None), (twin, inner, scalers[1], 1)):
            o.zero_grad()
            loss = lm_loss(m, t) + (ref.oracle_penalty(twin, oracle, 0.5) if pen else 0)
            if t == 4:  # an overflow: both must skip the step and back off
                loss = loss * float("inf")
            sc.scale(loss).backward()
            sc.step(o)
            sc.update()
    assert scalers[0].get_scale() == scalers[1].get_scale() == 2.0**12  # grew, backed off, grew
    p0 = _params(model)[0]
    assert opt.state[p0]["step"] == 7  # the overflowing step was skipped
    _assert_models(model, twin)


def test_fused_inner_is_rejected():
    model, anchors, _ = _setup()
    with pytest.raises(ValueError, match="fused"):
        AnchoredOptimizer(torch.optim.AdamW(_params(model), lr=1e-3, fused=True), model, anchors)
    with pytest.raises(ValueError, match="fused"):
        AnchoredAdamW(model, anchors, fused=True)
    assert not getattr(AnchoredAdamW(model, anchors), "_step_supports_amp_scaling", False)


# -- coupling and closures -------------------------------------------------------------


def test_decoupled_mode_equals_its_formula():
    """θ ← AdamW(θ - lr·λ·∇P(θ), ∇task(θ)): the pull bypasses Adam's normalisation."""
    model, anchors, oracle = _setup()
    twin = copy.deepcopy(model)
    lam, lr = 0.5, 1e-2
    opt = AnchoredAdamW(model, anchors, anchor_lambda=lam, lr=lr, coupling="decoupled")
    inner = torch.optim.AdamW(_params(twin), lr=lr)
    for t in range(6):
        _train(model, opt, 1, start=t)
        inner.zero_grad()
        lm_loss(twin, t).backward()
        pen_grads = torch.autograd.grad(ref.oracle_penalty(twin, oracle, lam), _params(twin))
        with torch.no_grad():
            for p, g in zip(_params(twin), pen_grads, strict=True):
                p.sub_(lr * g)
        inner.step()
    _assert_models(model, twin)


def test_lbfgs_closure_sees_the_penalty():
    model, anchors, oracle = _setup()
    twin = copy.deepcopy(model)
    opt = AnchoredOptimizer(torch.optim.LBFGS(_params(model), lr=0.5, max_iter=4), model, anchors, anchor_lambda=0.3)
    inner = torch.optim.LBFGS(_params(twin), lr=0.5, max_iter=4)
    for t in range(3):
        def closure(m=model, o=opt, t=t):
            o.zero_grad()
            loss = lm_loss(m, t)
            loss.backward()
            return loss

        def closure_ref(t=t):
            inner.zero_grad()
            loss = lm_loss(twin, t) + ref.oracle_penalty(twin, oracle, 0.3)
            loss.backward()
            return loss

        got, want = opt.step(closure), inner.step(closure_ref)
        torch.testing.assert_close(got, want, atol=1e-9, rtol=1e-9)
    _assert_models(model, twin, atol=1e-8)
    with pytest.raises(ValueError, match="LBFGS"):
        AnchoredOptimizer(torch.optim.LBFGS(_params(model)), model, anchors, coupling="decoupled")


def test_maximize_still_restrains():
    model, anchors, oracle = _setup()
    twin = copy.deepcopy(model)
    opt = AnchoredOptimizer(torch.optim.SGD(_params(model), lr=0.05, maximize=True), model, anchors)
    _train(model, opt, 3)
    inner = torch.optim.SGD(_params(twin), lr=0.05, maximize=True)
    _train(twin, inner, 3, penalty=lambda t: -ref.oracle_penalty(twin, oracle))
    _assert_models(model, twin)


# -- requirement 5: the reference code's λ ----------------------------------------------


@pytest.mark.parametrize("use_rslora", [False, True])
def test_reference_lambda_conversion(use_rslora):
    """Reference style (λ_ref‖(I-C)BA‖² on every micro-batch, loss/k) == ours with the converted λ."""
    r, alpha, k, lam_ref = 2, 4, 3, 0.7
    model = lora(tiny_llama(), ["q_proj", "v_proj"], r=r, lora_alpha=alpha, use_rslora=use_rslora)
    anchors, oracle = make_anchors(model, DIMS, "safelora", None)
    twin = copy.deepcopy(model)
    mods = dict(twin.named_modules())
    c = {n: ref.dense_c(v, "safelora") for n, (v, _, _) in oracle.items()}

    def reference_penalty():  # the reference code: unscaled B@A, dense C and torch.eye
        total = 0
        for n in DIMS:
            m = mods["base_model.model." + n[:-7]]
            delta = m.lora_B["default"].weight @ m.lora_A["default"].weight
            total = total + ((torch.eye(delta.shape[0], dtype=D) - c[n]) @ delta).pow(2).sum()
        return total

    lam = convert_reference_lambda(lam_ref, r, alpha, grad_accum_steps=k, use_rslora=use_rslora)
    opt = AnchoredAdamW(model, anchors, anchor_lambda=lam, lr=1e-2)
    inner = torch.optim.AdamW(_params(twin), lr=1e-2)
    for step in range(5):
        opt.zero_grad(), inner.zero_grad()
        for micro in range(k):
            (lm_loss(model, 10 * step + micro) / k).backward()
            (lm_loss(twin, 10 * step + micro) / k + lam_ref * reference_penalty()).backward()
        opt.step(), inner.step()
    _assert_models(model, twin)
    assert convert_reference_lambda(1.0, 8, 32) == 1 / 16


# -- hot path: no d×d, no sync ---------------------------------------------------------


def test_step_forms_no_square_matrix_and_never_syncs():
    from torch.utils._python_dispatch import TorchDispatchMode

    d_out, d_in = 96, 6  # d_in ≠ 2r: F [Y, W] (d_out × 2r) is no dense ΔW
    model = torch.nn.Sequential(torch.nn.Linear(d_in, d_out, dtype=D))
    model = lora(model, ["0"])
    anchors, _ = make_anchors(model, {"0.weight": (d_out, d_in)}, "safelora", None)
    full = torch.nn.Sequential(torch.nn.Linear(4, d_out, dtype=D))
    full_anchors, _ = make_anchors(full, {"0.weight": (d_out, 4)}, "orthogonal", 2)

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.shapes, self.ops = [], []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            self.ops.append(str(func))
            for o in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(o, torch.Tensor):
                    self.shapes.append(tuple(o.shape))
            return out

    for m, a in ((model, anchors), (full, full_anchors)):
        opt = AnchoredOptimizer(torch.optim.SGD(_params(m), lr=0.1), m, a)
        opt.step()  # first step moves the anchors to the math dtype once
        with Record() as rec:
            opt.step()
        assert rec.shapes and all(s.count(d_out) < 2 for s in rec.shapes), "a d_out × d_out tensor was formed"
        if m is model:  # LoRA: not even the dense ΔW (d_out × d_in)
            assert (d_out, d_in) not in rec.shapes
        assert not any("_local_scalar_dense" in op or "item" in op for op in rec.ops)


# -- bad input -------------------------------------------------------------------------


def test_bad_inputs_raise_naming_the_weight():
    model, anchors, _ = _setup()
    ps = _params(model)
    sgd = lambda: torch.optim.SGD(ps, lr=0.1)  # noqa: E731
    with pytest.raises(ValueError, match="anchor_lambda"):
        AnchoredOptimizer(sgd(), model, anchors, anchor_lambda=-1.0)
    with pytest.raises(ValueError, match="param group 1"):
        AnchoredOptimizer(torch.optim.SGD([{"params": ps[:1]}, {"params": ps[1:], "anchor_lambda": float("nan")}], lr=0.1),
                          model, anchors)
    bad = dict(anchors)
    bad["model.layers.3.mlp.up_proj.weight"] = anchors[Q]
    with pytest.raises(AnchorError, match="model.layers.3.mlp.up_proj.weight"):
        AnchoredOptimizer(sgd(), model, bad)
    with pytest.raises(AnchorError, match=f"{V}: anchor acts on 8 outputs"):
        AnchoredOptimizer(sgd(), model, {**anchors, V: anchors[Q]})
    nan = anchors[Q].factor.clone()
    nan[0, 0] = float("nan")
    with pytest.raises(AnchorError, match=f"{Q}: anchor factor has non-finite"):
        AnchoredOptimizer(sgd(), model, {**anchors, Q: Projection(nan, "safelora")})
    with pytest.raises(AnchorError, match=f"{V}: anchor rank 5 exceeds"):
        AnchoredOptimizer(sgd(), model, {**anchors, V: Projection(torch.randn(4, 5, dtype=D), "orthogonal")})
    # Anchors matching a module this optimizer does not train: the silent no-op, refused.
    with pytest.raises(AnchorError, match="does not train"):
        AnchoredOptimizer(torch.optim.SGD([p for n, p in model.named_parameters() if p.requires_grad and "q_proj" in n],
                                          lr=0.1), model, anchors)
    plain = tiny_llama()  # the TRL trap: optimizer on the raw model, anchors for LoRA targets
    for p in plain.parameters():
        p.requires_grad_(False)
    with pytest.raises(AnchorError, match="no anchored weight is trained"):
        AnchoredOptimizer(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))]), plain, anchors)
    opt = AnchoredOptimizer(sgd(), model, anchors)
    opt.param_groups[0]["anchor_lambda"] = -0.5  # e.g. a buggy schedule
    with pytest.raises(ValueError, match="anchor_lambda"):
        opt.step()


@pytest.mark.parametrize("mode", ["safelora", "orthogonal"])  # orthogonal rank 2 on Q: cached G path
def test_tensors_swapped_after_construction_are_followed(mode):
    """accelerate/FSDP2 replace Parameters after the optimizer is built: look them up at step time."""
    model, anchors, oracle = _setup(mode)
    opt = AnchoredOptimizer(torch.optim.SGD(_params(model), lr=0.0), model, anchors)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    old = layer.lora_B["default"].weight
    new = torch.nn.Parameter(old.detach().clone() * 2)
    layer.lora_B["default"].weight = new
    group = opt.param_groups[0]
    group["params"] = [new if p is old else p for p in group["params"]]
    opt.step()  # the first step filled the per-target caches
    expected = torch.autograd.grad(ref.oracle_penalty(model, oracle), [new])[0]
    assert old.grad is None
    torch.testing.assert_close(new.grad, expected, atol=1e-10, rtol=1e-9)
    # Swapped again after the caches exist: still followed.
    newer = torch.nn.Parameter(new.detach().clone() * 0.5)
    layer.lora_B["default"].weight = newer
    group["params"] = [newer if p is new else p for p in group["params"]]
    opt.step()
    expected = torch.autograd.grad(ref.oracle_penalty(model, oracle), [newer])[0]
    torch.testing.assert_close(newer.grad, expected, atol=1e-10, rtol=1e-9)


def test_anchor_cache_follows_dtype_and_in_place_factor_changes():
    """The moved anchor and its Gram matrix G = FᵀF are rebuilt for a new dtype or changed factor."""
    model, anchors, _ = _setup("orthogonal")
    opt = AnchoredOptimizer(torch.optim.SGD(_params(model), lr=0.0), model, anchors)
    (target,) = [t for t in opt.targets if t.name == Q]
    opt.step()
    gram = target._moved.operator.prepared_gram
    assert gram is not None and gram.dtype == D  # rank 2 ≤ 8/4: G is cached
    opt.zero_grad()
    opt.step()
    assert target._moved.operator.prepared_gram is gram  # reused across steps
    # In place change of the factor (its version counter moves): G follows.
    with torch.no_grad():
        anchors[Q].factor.mul_(0.5)
    opt.zero_grad()
    opt.step()
    assert target._moved.operator.prepared_gram is not gram
    torch.testing.assert_close(target._moved.operator.prepared_gram, anchors[Q].factor.T @ anchors[Q].factor)
    # float32 adapters: the anchor and G move to float32 once.
    model.float()
    opt.zero_grad()
    opt.step()
    moved = target._moved.operator
    gram = moved.prepared_gram
    assert moved.factor.dtype == gram.dtype == torch.float32


def test_diagnostics_are_those_of_the_step_start():
    """Diagnostics are computed lazily, but from the weights the step started from."""
    model, anchors, oracle = _setup("orthogonal")
    opt = AnchoredOptimizer(torch.optim.SGD(_params(model), lr=0.5), model, anchors, anchor_lambda=0.3)
    _train(model, opt, 1)  # a first step, so ΔW is not at its initial value
    before = {n: (pen.item(), frac.item()) for n, (pen, frac) in ref.oracle_stats(model, oracle).items()}
    opt.zero_grad()
    lm_loss(model, 1).backward()
    opt.step()  # moves the LoRA weights in place
    after = ref.oracle_stats(model, oracle)
    stats = opt.anchor_stats()
    for name, (pen, frac) in before.items():
        assert after[name][0].item() != pytest.approx(pen, rel=1e-6)
        assert stats[name]["raw_penalty"] == pytest.approx(pen, rel=1e-9)
        assert stats[name]["penalty"] == pytest.approx(0.3 * pen, rel=1e-9)
        assert stats[name]["off_anchor_fraction"] == pytest.approx(frac, rel=1e-9)
    assert opt.anchor_stats() == stats
    summary = opt.anchor_summary()
    assert summary["anchor/penalty"] == pytest.approx(sum(0.3 * p for p, _ in before.values()), rel=1e-9)
    assert summary["anchor/off_anchor_max"] == pytest.approx(max(f for _, f in before.values()), rel=1e-9)
    tensors = opt.anchor_tensors()
    assert set(tensors) == set(before) and all(t.dim() == 0 for v in tensors.values() for t in v)
    assert copy.deepcopy(opt).anchor_stats() == stats
