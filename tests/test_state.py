"""Anchor state survives every resume route, bit-exactly, or the load raises AnchorError.

Routes: the full ``state_dict()`` through ``torch.save``/``weights_only`` loading, a plain
``{"state", "param_groups"}`` copy (what distributed checkpoint paths keep),
``torch.distributed.checkpoint`` with ``get_optimizer_state_dict`` /
``set_optimizer_state_dict`` (single process here; two gloo ranks in
``tests/dist/dcp_check.py``), the HF Trainer's checkpoint, accelerate's ``prepare``.
"""

from __future__ import annotations

import copy
import io

import pytest
import reference as ref
import torch
from tiny_models import DIMS, Q, V, lm_loss, lora, make_anchors, tiny_llama

from asft_optim import (
    AnchoredAdamW,
    AnchoredOptimizer,
    AnchorError,
    AnchorLambdaScheduler,
    anchor_penalty,
)
from asft_optim import state as anchor_state


def full_model(seed=0):
    model = tiny_llama(seed)
    for n, p in model.named_parameters():
        p.requires_grad_(n in (Q, V))
    return model


def setup(full=True, mode="safelora", seed=0):
    model = full_model(seed) if full else lora(tiny_llama(seed), ["q_proj", "v_proj"])
    anchors, oracle = make_anchors(model, DIMS, mode, None)
    return model, anchors, oracle


def train(model, opt, steps, start=0):
    for t in range(start, start + steps):
        opt.zero_grad()
        lm_loss(model, t).backward()
        opt.step()


def weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_bit_equal(a, b):
    assert a.keys() == b.keys()
    for n in a:
        assert torch.equal(a[n], b[n]), n


def roundtrip(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def resumed_run(route, full=True, coupling="coupled"):
    """Train 3 steps, save by ``route``, rebuild model and optimizer, load, train 3 more;
    return (uninterrupted weights, resumed weights, penalty right after the resume, oracle)."""
    model, anchors, oracle = setup(full)
    w0 = {n: p.detach().clone() for n, p in model.named_parameters() if n in DIMS}
    opt = AnchoredAdamW(model, anchors, anchor_lambda=0.5, lr=1e-2, coupling=coupling)
    train(model, opt, 3)
    saved_model = roundtrip(model.state_dict())
    saved_opt = route("save", model, opt)
    train(model, opt, 3, start=3)
    want = weights(model)

    model2, _, _ = setup(full)
    model2.load_state_dict(saved_model)
    opt2 = AnchoredAdamW(model2, anchors, anchor_lambda=0.5, lr=1e-2, coupling=coupling)  # W_ref wrong here
    route("load", model2, opt2, saved_opt)
    # The penalty the next step sees, against the true reference (the weights before step 1).
    want_penalty = float(anchor_penalty(model2, anchors, 0.5, reference=w0 if full else None).detach())
    train(model2, opt2, 1, start=3)
    got_penalty = opt2.anchor_summary()["anchor/penalty"]
    train(model2, opt2, 2, start=4)
    return want, weights(model2), got_penalty, want_penalty


def route_full(stage, model, opt, saved=None):
    if stage == "save":
        return roundtrip(opt.state_dict())
    opt.load_state_dict(saved)


def route_plain(stage, model, opt, saved=None):
    """Only the two keys distributed checkpointing keeps."""
    if stage == "save":
        sd = roundtrip(opt.state_dict())
        return {"state": sd["state"], "param_groups": sd["param_groups"]}
    opt.load_state_dict(saved)


def route_dcp(stage, model, opt, saved=None):
    from torch.distributed.checkpoint.state_dict import (
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    if stage == "save":
        return roundtrip(get_optimizer_state_dict(model, opt))
    set_optimizer_state_dict(model, opt, saved)


ROUTES = {"state_dict": route_full, "plain": route_plain, "dcp": route_dcp}


@pytest.mark.parametrize("full", [True, False], ids=["full", "lora"])
@pytest.mark.parametrize("route", list(ROUTES))
def test_resume_equals_uninterrupted_bit_exactly(route, full):
    want, got, got_penalty, want_penalty = resumed_run(ROUTES[route], full)
    assert_bit_equal(want, got)
    assert want_penalty > 1e-4  # a reset reference would give 0
    assert got_penalty == pytest.approx(want_penalty, rel=1e-12)


def test_resume_decoupled_bit_exactly():
    want, got, got_penalty, want_penalty = resumed_run(route_plain, True, coupling="decoupled")
    assert_bit_equal(want, got)
    assert got_penalty == pytest.approx(want_penalty, rel=1e-12)


def _references(opt):
    """W_ref of every fully tuned weight, as the optimizer's targets hold it."""
    return {t.name: t.reference for t in opt.targets if t.kind == "full"}


def test_reference_lives_in_per_parameter_state_and_not_in_live_dicts():
    model, anchors, _ = setup()
    opt = AnchoredAdamW(model, anchors, lr=1e-2)
    sd = opt.state_dict()  # before any step: the inner state is empty, ours is not
    params = dict(model.named_parameters())
    index = anchor_state.param_index(opt.param_groups)
    for n in DIMS:
        assert torch.equal(sd["state"][index[id(params[n])]]["anchor_ref"], params[n])
    g = sd["param_groups"][0]
    assert g["anchor_version"] == 2 and g["anchor_coupling"] == "coupled" and len(g["anchor_fingerprint"]) == 16
    assert not opt.state  # nothing leaked into the inner optimizer's live state
    assert "anchor_fingerprint" not in opt.param_groups[0]
    train(model, opt, 1)
    opt.state_dict()
    assert all("anchor_ref" not in s for s in opt.state.values())
    opt.load_state_dict(sd)  # loads before the first step: the inner state stays lazy
    assert not opt.state and "anchor_version" not in opt.param_groups[0]
    train(model, opt, 1)


def test_missing_reference_raises_and_reset_is_explicit():
    model, anchors, oracle = setup()
    opt = AnchoredAdamW(model, anchors, lr=1e-2)
    train(model, opt, 3)
    plain = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    plain.load_state_dict(opt.optimizer.state_dict())
    stripped = plain.state_dict()  # what a plain optimizer (or a tool that drops our keys) saves
    fresh = AnchoredAdamW(model, anchors, lr=1e-2)
    with pytest.raises(AnchorError, match="reset_reference=True"):
        fresh.load_state_dict(stripped)
    fresh.load_state_dict(stripped, reset_reference=True)
    now = {n: p.detach().clone() for n, p in model.named_parameters() if n in DIMS}
    assert float(anchor_penalty(model, anchors, reference=_references(fresh)).detach()) == 0.0
    assert all(torch.equal(_references(fresh)[n], now[n]) for n in DIMS)


def test_other_coupling_or_anchors_raise():
    model, anchors, _ = setup()
    opt = AnchoredAdamW(model, anchors, lr=1e-2)
    train(model, opt, 1)
    sd = opt.state_dict()
    with pytest.raises(AnchorError, match="coupling='coupled'"):
        AnchoredAdamW(model, anchors, lr=1e-2, coupling="decoupled").load_state_dict(sd)
    other, _ = make_anchors(model, DIMS, "safelora", None, seed=99)
    with pytest.raises(AnchorError, match="other anchors"):
        AnchoredAdamW(model, other, lr=1e-2).load_state_dict(sd)
    AnchoredAdamW(model, other, lr=1e-2).load_state_dict(sd, check_anchors=False)  # on purpose


def test_saved_reference_for_a_weight_not_anchored_now_raises():
    model, anchors, _ = setup(full=True)
    sd = AnchoredAdamW(model, anchors, lr=1e-2).state_dict()
    # The same tensors trained, but V no longer anchored: its saved W_ref has no owner.
    opt2 = AnchoredAdamW(model, {Q: anchors[Q]}, lr=1e-2, strict=False)
    with pytest.raises(AnchorError, match="does not anchor that way"):
        opt2.load_state_dict(sd, check_anchors=False)


def test_a_dict_without_per_parameter_references_is_refused():
    """No release wrote another layout (references at the top level): such a dict is one
    without W_ref, refused rather than silently restarting ΔW."""
    model, anchors, _ = setup()
    opt = AnchoredAdamW(model, anchors, lr=1e-2)
    train(model, opt, 2)
    other = opt.optimizer.state_dict()
    other["anchor"] = {"version": 1, "reference": {n: torch.zeros(DIMS[n]) for n in DIMS}}
    with pytest.raises(AnchorError, match="carries no anchor reference"):
        AnchoredAdamW(model, anchors, lr=1e-2).load_state_dict(other)


def test_rewrap_with_conflicting_lambda_raises():
    model, anchors, _ = setup(full=False)
    inner = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    first = AnchoredOptimizer(inner, model, anchors, anchor_lambda=1.0)
    with pytest.raises(ValueError, match="already anchored with anchor_lambda"):
        AnchoredOptimizer(first.optimizer, model, anchors, anchor_lambda=5.0)
    again = AnchoredOptimizer(first.optimizer, model, anchors)  # None: keep λ = 1
    assert again.param_groups[0]["anchor_lambda"] == 1.0
    AnchoredOptimizer(first.optimizer, model, anchors, anchor_lambda=1.0)  # same value: fine
    # A first wrap keeps λ the user put into a group.
    inner2 = torch.optim.SGD([{"params": [p for p in model.parameters() if p.requires_grad], "anchor_lambda": 3.0}], lr=0.1)
    assert AnchoredOptimizer(inner2, model, anchors, anchor_lambda=1.0).param_groups[0]["anchor_lambda"] == 3.0


def test_add_param_group_penalises_the_new_anchored_weights():
    model, anchors, oracle = setup()
    params = dict(model.named_parameters())
    w0 = {n: params[n].detach().clone() for n in DIMS}
    opt = AnchoredOptimizer(torch.optim.SGD([params[Q]], lr=0.0), model, anchors, 0.7, strict=False)
    assert [t.name for t in opt.targets] == [Q]
    opt.add_param_group({"params": [params[V]]})
    assert sorted(t.name for t in opt.targets) == sorted(DIMS)
    with torch.no_grad():
        for n in DIMS:
            params[n].add_(0.1 * torch.randn_like(params[n]))
    for p in params.values():
        p.grad = None
    opt.step()
    plain = copy.deepcopy(model)
    loss = ref.oracle_penalty(plain, oracle, 0.7, w0)
    loss.backward()
    for n, p in plain.named_parameters():
        if n in DIMS:
            torch.testing.assert_close(params[n].grad, p.grad, rtol=1e-12, atol=1e-12)


def test_lambda_scheduler_drives_lambda_and_resumes():
    model, anchors, _ = setup(full=False)
    opt = AnchoredAdamW(model, anchors, anchor_lambda=2.0, lr=1e-2)
    sched = AnchorLambdaScheduler(opt, lambda t: min(1.0, t / 4))
    seen = []
    for t in range(6):
        seen.append(opt.param_groups[0]["anchor_lambda"])
        train(model, opt, 1, start=t)
        sched.step()
    assert seen == [0.0, 0.5, 1.0, 1.5, 2.0, 2.0]
    assert opt.anchor_summary()["anchor/penalty"] > 0
    sd_opt, sd_sched = roundtrip(opt.state_dict()), sched.state_dict()
    opt2 = AnchoredAdamW(model, anchors, anchor_lambda=9.0, lr=1e-2)
    opt2.load_state_dict(sd_opt)
    sched2 = AnchorLambdaScheduler(opt2, lambda t: min(1.0, t / 4), last_step=sd_sched["last_step"])
    assert opt2.param_groups[0]["initial_anchor_lambda"] == 2.0
    assert sched2.get_last_lambda() == [2.0]
    with pytest.raises(ValueError, match="anchor_lambda"):
        AnchorLambdaScheduler(torch.optim.SGD(model.parameters(), lr=0.1), lambda t: 1.0)
    with pytest.raises(ValueError, match="step 0"):
        AnchorLambdaScheduler(opt, lambda t: -1.0)


def test_fingerprint_is_stable_across_files_and_tells_anchors_apart(tmp_path):
    from asft_optim import Anchors, build_anchors
    from asft_optim.anchors import anchor_fingerprint

    base, aligned = tiny_llama(0), tiny_llama(1)
    built = build_anchors(base, aligned, ["q_proj", "v_proj"], progress=False)
    built.save(tmp_path / "a.safetensors")
    loaded = Anchors.load(tmp_path / "a.safetensors")
    fp = anchor_fingerprint
    assert fp(built) == fp(loaded)
    assert fp(built) != fp(build_anchors(base, tiny_llama(2), ["q_proj", "v_proj"], progress=False))
    assert fp(built) != fp(build_anchors(base, aligned, ["q_proj", "v_proj"], mode="orthogonal", rank=2, progress=False))
    raw, _ = make_anchors(base, DIMS, "safelora", None)
    raw2, _ = make_anchors(base, DIMS, "safelora", None, seed=8)
    assert fp(raw) == fp(dict(raw)) != fp(raw2)


def _pissa_model():
    import warnings

    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = tiny_llama(0).float()  # PEFT builds PiSSA in float32; float64 afterwards
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, init_lora_weights="pissa",
                                                target_modules=["q_proj", "v_proj"]))
    return model.double()


@pytest.mark.parametrize("route", ["state_dict", "plain", "dcp"])
def test_pissa_origin_resumes_bit_exactly(route):
    """B₀A₀ (recorded at construction) rides in the B/A parameters' entries: a rebuilt
    optimizer would otherwise take the trained B·A as the origin (penalty 0)."""
    model = _pissa_model()
    anchors, _ = make_anchors(model, DIMS, "safelora", None)
    opt = AnchoredAdamW(model, anchors, anchor_lambda=0.5, lr=1e-2)
    origin = {t.name: dict(t.origin) for t in opt.targets}
    train(model, opt, 3)
    saved_model = roundtrip(model.state_dict())
    saved = ROUTES[route]("save", model, opt)
    train(model, opt, 3, start=3)
    want = weights(model)

    model2 = _pissa_model()
    model2.load_state_dict(saved_model)
    opt2 = AnchoredAdamW(model2, anchors, anchor_lambda=0.5, lr=1e-2)  # origin = trained B·A here
    ROUTES[route]("load", model2, opt2, saved)
    for t in opt2.targets:
        for a, (b0, a0) in origin[t.name].items():
            assert torch.equal(t.origin[a][0], b0) and torch.equal(t.origin[a][1], a0)
    train(model2, opt2, 3, start=3)
    assert_bit_equal(want, weights(model2))
    assert opt2.anchor_summary()["anchor/penalty"] > 1e-6


def test_pissa_state_without_origin_raises():
    model = _pissa_model()
    anchors, _ = make_anchors(model, DIMS, "safelora", None)
    opt = AnchoredAdamW(model, anchors, lr=1e-2)
    train(model, opt, 2)
    stripped = roundtrip(opt.state_dict())
    for entry in stripped["state"].values():
        entry.pop("anchor_origin", None)
    fresh = AnchoredAdamW(model, anchors, lr=1e-2)
    with pytest.raises(AnchorError, match="reset_reference=True"):
        fresh.load_state_dict(stripped)
    fresh.load_state_dict(stripped, reset_reference=True)  # origin = now: ΔW restarts at 0
    train(model, fresh, 1, start=2)
    assert fresh.anchor_stats()[Q]["raw_penalty"] < 1e-20
