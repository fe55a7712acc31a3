"""Online safety-gradient surgery (SafeGrad-like): the rule against a dense float64 oracle,
the optimizer against plain AdamW fed the oracle's gradient, the closure's schedule, the
state's bit-exact resume and the errors."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import seeds
from tiny_models import DIMS, lm_loss, lora, make_anchors, tiny_llama

from asft_optim import AnchoredAdamW, AnchorError, GradientSurgery, anchor_summary
from asft_optim.surgery import surgery_project_

MODES = st.sampled_from(["conflict", "always"])
GRANULARITIES = st.sampled_from(["global", "tensor"])
WEIGHTS = st.sampled_from([0.0, 0.5, 3.0])


def oracle(g: list[torch.Tensor], s: list[torch.Tensor], mode: str, granularity: str, mu: float):
    """The rule written from its definition on flat float64 vectors."""
    def one(gv, sv):
        d = float(gv @ sv)
        n = float(sv @ sv)
        c = 0.0 if n == 0 else (min(d, 0.0) if mode == "conflict" else d) / n
        return gv - c * sv + mu * sv

    if granularity == "tensor":
        return [one(a.reshape(-1), b.reshape(-1)).reshape(a.shape) for a, b in zip(g, s, strict=True)]
    flat = one(torch.cat([a.reshape(-1) for a in g]), torch.cat([b.reshape(-1) for b in s]))
    return list(torch.split(flat, [a.numel() for a in g])) if flat.numel() else []


@st.composite
def gradient_pairs(draw):
    shapes = draw(st.lists(st.tuples(st.integers(1, 5), st.integers(1, 5)), min_size=1, max_size=3))
    gen = torch.Generator().manual_seed(draw(seeds))
    g = [torch.randn(*sh, generator=gen, dtype=torch.float64) for sh in shapes]
    s = [torch.randn(*sh, generator=gen, dtype=torch.float64) for sh in shapes]
    if draw(st.booleans()):  # a zero safety gradient for one tensor
        s[draw(st.integers(0, len(s) - 1))].zero_()
    return g, s


@settings(max_examples=60, deadline=None)
@given(gradient_pairs(), MODES, GRANULARITIES, WEIGHTS)
def test_the_rule_equals_its_definition(pair, mode, granularity, mu):
    g, s = pair
    want = oracle(g, s, mode, granularity, mu)
    got = [t.clone() for t in g]
    surgery_project_(got, s, mode, granularity, mu)
    for a, b, orig in zip(got, want, g, strict=True):
        torch.testing.assert_close(a, b.reshape(orig.shape), rtol=1e-12, atol=1e-12)
    if mu == 0.0:  # the guarantee: the step does not raise the safety loss to first order
        groups = [(got, s)] if granularity == "global" else [([a], [b]) for a, b in zip(got, s, strict=True)]
        for gg, ss in groups:
            dot = sum(float((a * b).sum()) for a, b in zip(gg, ss, strict=True))
            scale = max(1.0, sum(float(a.norm() * b.norm()) for a, b in zip(gg, ss, strict=True)))
            if mode == "always":
                assert abs(dot) <= 1e-10 * scale
            else:
                assert dot >= -1e-10 * scale


def test_a_gradient_that_helps_safety_is_left_alone_in_conflict_mode():
    g = [torch.tensor([1.0, 2.0], dtype=torch.float64)]
    s = [torch.tensor([1.0, 0.0], dtype=torch.float64)]  # ⟨g, s⟩ = 1 > 0: no conflict
    surgery_project_(g, s, "conflict", "global")
    assert torch.equal(g[0], torch.tensor([1.0, 2.0], dtype=torch.float64))
    g = [torch.tensor([-1.0, 2.0], dtype=torch.float64)]  # ⟨g, s⟩ = -1: its part along s goes
    surgery_project_(g, s, "conflict", "global")
    assert torch.equal(g[0], torch.tensor([0.0, 2.0], dtype=torch.float64))


# -- the optimizer ----------------------------------------------------------------------

def _model():
    return lora(tiny_llama(0), ["q_proj", "v_proj"])


def _safety(model, calls=None):
    def closure():
        if calls is not None:
            calls.append(1)
        return lm_loss(model, 99)  # a fixed safety batch: what s is depends only on the weights
    return closure


def _opt(model, surgery, lam=0.0):
    anchors, _ = make_anchors(model, DIMS, "safelora", None)
    return AnchoredAdamW(model, anchors, lam, lr=1e-2, surgery=surgery)


def _train(model, opt, steps, start=0):
    for t in range(start, start + steps):
        opt.zero_grad()
        lm_loss(model, t).backward()
        opt.step()


@pytest.mark.parametrize("mode,granularity,mu", [("conflict", "global", 0.0), ("always", "tensor", 0.5)])
def test_the_optimizer_equals_adamw_on_the_oracle_gradient(mode, granularity, mu):
    """Five steps, every=2: the anchored optimizer's weights equal plain AdamW's, fed the
    task gradient projected by the oracle off a safety gradient taken (by autograd, apart)
    at steps 0, 2, 4."""
    model = _model()
    twin = copy.deepcopy(model)
    opt = _opt(model, GradientSurgery(_safety(model), every=2, mode=mode, granularity=granularity,
                                      safety_weight=mu))
    params = [p for p in twin.parameters() if p.requires_grad]
    plain = torch.optim.AdamW(params, lr=1e-2)
    s = None
    _train(model, opt, 5)
    for t in range(5):
        if t % 2 == 0:
            s = [x.detach() for x in torch.autograd.grad(lm_loss(twin, 99), params)]
        plain.zero_grad()
        lm_loss(twin, t).backward()
        for p, new in zip(params, oracle([p.grad for p in params], s, mode, granularity, mu), strict=True):
            p.grad = new.reshape(p.shape).clone()
        plain.step()
    for (n, a), b in zip(((n, p) for n, p in model.named_parameters() if p.requires_grad), params, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=n)
    assert anchor_summary(opt)["surgery/calls"] == 3.0


def test_the_surgery_changes_the_run():
    """Not a no-op: with a conflicting safety loss (the task's own loss ascended) the weights
    differ from plain AdamW's, and the closure ran on steps 0, 3, 6 of 7."""
    model = _model()
    twin = copy.deepcopy(model)
    calls: list[int] = []

    def against():
        calls.append(1)
        return -lm_loss(model, 0)  # any task step on batch 0 raises it: always a conflict

    opt = _opt(model, GradientSurgery(against, every=3))
    coefficients = []
    for t in range(7):
        opt.zero_grad()
        lm_loss(model, t).backward()
        opt.step()
        coefficients.append(anchor_summary(opt)["surgery/coefficient"])
    plain = torch.optim.AdamW([p for p in twin.parameters() if p.requires_grad], lr=1e-2)
    for t in range(7):
        plain.zero_grad()
        lm_loss(twin, t).backward()
        plain.step()
    assert len(calls) == 3
    diff = max(float((a - b).detach().abs().max()) for a, b in zip(model.parameters(), twin.parameters(), strict=True))
    assert diff > 1e-4
    assert coefficients[0] < 0.0  # step 0 trains on batch 0 itself: the conflict is certain
    assert all(c <= 0.0 for c in coefficients)  # conflict mode never adds along s


def _roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def test_a_resumed_run_equals_an_uninterrupted_one_bit_for_bit():
    """every=3: 4 steps, torch.save round trip into a fresh optimizer on a copy, 4 more,
    against 8 straight. The restored s and step count matter: without them the resumed
    run would refresh at step 4 (at other weights) instead of reusing step 3's."""
    straight = _model()
    opt = _opt(straight, GradientSurgery(_safety(straight), every=3), lam=0.3)
    _train(straight, opt, 8)

    first = _model()
    opt1 = _opt(first, GradientSurgery(_safety(first), every=3), lam=0.3)
    _train(first, opt1, 4)
    sd = _roundtrip(opt1.state_dict())
    assert {g["anchor_surgery"] for g in sd["param_groups"]} == {opt1.surgery.settings()}
    resumed = copy.deepcopy(first)
    calls: list[int] = []
    opt2 = _opt(resumed, GradientSurgery(_safety(resumed, calls), every=3), lam=0.3)
    opt2.load_state_dict(sd)
    _train(resumed, opt2, 4, start=4)
    assert len(calls) == 1  # step 6 only
    for a, b in zip(straight.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)


def _trained_state(surgery_kw=None):
    model = _model()
    opt = _opt(model, GradientSurgery(_safety(model), **(surgery_kw or {})))
    _train(model, opt, 2)
    return model, opt.state_dict()


def test_resuming_with_other_settings_is_refused():
    model, sd = _trained_state({"every": 2})
    with pytest.raises(AnchorError, match="saved with gradient surgery"):
        _opt(model, GradientSurgery(_safety(model), every=3)).load_state_dict(sd)


def test_resuming_without_the_surgery_is_refused():
    model, sd = _trained_state()
    with pytest.raises(AnchorError, match="this optimizer has none"):
        _opt(model, None).load_state_dict(sd)


def test_adding_surgery_to_a_run_without_it_is_refused():
    model = _model()
    opt = _opt(model, None)
    _train(model, opt, 1)
    with pytest.raises(AnchorError, match="saved with no gradient surgery"):
        _opt(model, GradientSurgery(_safety(model))).load_state_dict(opt.state_dict())


def test_a_state_that_lost_the_surgery_entries_is_refused():
    model, sd = _trained_state()
    for entry in sd["state"].values():
        entry.pop("surgery_step", None)
        entry.pop("surgery_grad", None)
    sd["state"] = {k: v for k, v in sd["state"].items() if v}
    opt = _opt(model, GradientSurgery(_safety(model)))
    before = [p.detach().clone() for p in model.parameters()]
    opt.load_state_dict(sd)  # a plain optimizer's state may say nothing: only the meta is checked
    assert opt.surgery.steps == 0 and not opt.surgery.safety
    sd2 = _trained_state()[1]
    first = next(iter(sd2["state"]))
    sd2["state"][first].pop("surgery_step")
    with pytest.raises(AnchorError, match="lacks the gradient-surgery state of 1"):
        _opt(model, GradientSurgery(_safety(model))).load_state_dict(sd2)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


@pytest.mark.parametrize("kw,match", [
    ({"every": 0}, "every"), ({"every": 1.5}, "every"), ({"every": True}, "every"),
    ({"mode": "sometimes"}, "mode"), ({"granularity": "row"}, "granularity"),
    ({"safety_weight": -1.0}, "safety_weight"), ({"safety_weight": float("nan")}, "safety_weight"),
])
def test_bad_settings_are_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        GradientSurgery(lambda: torch.zeros(()), **kw)


def test_a_non_callable_closure_is_refused():
    with pytest.raises(ValueError, match="callable"):
        GradientSurgery(torch.zeros(()))


@pytest.mark.parametrize("habit", ["backward", "zero_grad"])
def test_a_closure_that_touches_grad_is_refused(habit):
    """LBFGS-style closures call zero_grad() and backward(): here that would mix the safety
    gradient into the task's (or wipe it) silently, so it raises, before the inner step."""
    model = _model()
    holder = {}

    def closure():
        loss = lm_loss(model, 99)
        if habit == "backward":
            loss.backward(retain_graph=True)
        else:
            holder["opt"].zero_grad()
        return loss

    opt = holder["opt"] = _opt(model, GradientSurgery(closure))
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    lm_loss(model, 0).backward()
    with pytest.raises(AnchorError, match="changed the trained tensors' .grad"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_maximize_is_refused():
    model = _model()
    anchors, _ = make_anchors(model, DIMS, "safelora", None)
    with pytest.raises(ValueError, match="maximize"):
        AnchoredAdamW(model, anchors, 0.0, maximize=True, surgery=GradientSurgery(_safety(model)))


@pytest.mark.parametrize("closure_of,exc,match", [
    (lambda m: (lambda: torch.ones(2, requires_grad=True)), ValueError, "scalar tensor"),
    (lambda m: (lambda: 1.0), ValueError, "scalar tensor, got float"),
    (lambda m: (lambda: lm_loss(m, 99).detach()), AnchorError, "no graph"),
    (lambda m: (lambda: (torch.ones((), requires_grad=True) * 2)), AnchorError, "does not depend"),
])
def test_a_bad_safety_loss_is_refused_before_anything_changes(closure_of, exc, match):
    model = _model()
    opt = _opt(model, GradientSurgery(closure_of(model)))
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    lm_loss(model, 0).backward()
    with pytest.raises(exc, match=match):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert not opt.state or all("step" not in v for v in opt.state.values())
