"""The probe list: user routes, each ending in the exact penalty or a clear error.

Every route is something a user does (build, wrap, train, save, resume, re-wrap, switch
tuner). "exact" routes compare the penalty the optimizer applied at its last step with
the independent dense float64 oracle of ``tests/reference.py``; "error" routes assert
the exception type and that its message says what to do. None may be a silent no-op:
a route whose penalty is 0 where the oracle's is not fails.
"""

from __future__ import annotations

import copy
import io

import pytest
import reference as ref
import torch
from peft import LoraConfig, get_peft_model
from tiny_models import DIMS, Q, V, lm_loss, lora, make_anchors, tiny_gpt2, tiny_llama

from asft_optim import (
    AnchoredAdamW,
    AnchoredOptimizer,
    AnchorError,
    AnchorLambdaScheduler,
    Anchors,
    anchor_penalty,
    anchor_summary,
)

LAM = 0.7


def _full_llama():
    model = tiny_llama(0)
    for n, p in model.named_parameters():
        p.requires_grad_(n in DIMS)
    return model


def _w(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if n in DIMS}


def _train(model, opt, steps, start=0):
    for t in range(start, start + steps):
        opt.zero_grad()
        lm_loss(model, t).backward()
        opt.step()


def _roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _measure(model, opt, oracle, lam=LAM, reference=None):
    """(optimizer's λP at its next step, oracle λP at the same weights)."""
    want = float(ref.oracle_penalty(copy.deepcopy(model), oracle, lam, reference).detach())
    _train(model, opt, 1, start=50)
    return anchor_summary(opt)["anchor/penalty"], want  # through any wrapper (accelerate)


def _lora_route(**kw):
    model = lora(tiny_llama(0), ["q_proj", "v_proj"], **kw)
    anchors, oracle = make_anchors(model, DIMS, "safelora", None)
    opt = AnchoredAdamW(model, anchors, LAM, lr=1e-2)
    _train(model, opt, 2)
    return _measure(model, opt, oracle)


def _full_route(mode="safelora", coupling="coupled"):
    model = _full_llama()
    w0 = _w(model)
    anchors, oracle = make_anchors(model, DIMS, mode, None)
    opt = AnchoredAdamW(model, anchors, LAM, lr=1e-2, coupling=coupling)
    _train(model, opt, 3)
    return _measure(model, opt, oracle, reference=w0)


def _resume_route(save):
    """Full fine-tuning, 3 steps, a new optimizer on the trained model loads ``save(opt)``."""
    model = _full_llama()
    w0 = _w(model)
    anchors, oracle = make_anchors(model, DIMS, "safelora", None)
    opt = AnchoredAdamW(model, anchors, LAM, lr=1e-2)
    _train(model, opt, 3)
    saved = save(model, opt)
    fresh = AnchoredAdamW(model, anchors, LAM, lr=1e-2)
    load = saved.pop("__load__", None) if isinstance(saved, dict) else None
    if load is not None:
        load(model, fresh, saved)
    else:
        fresh.load_state_dict(saved)
    return _measure(model, fresh, oracle, reference=w0)


def _save_dcp(model, opt):
    from torch.distributed.checkpoint.state_dict import (
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    sd = _roundtrip(get_optimizer_state_dict(model, opt))
    return {**sd, "__load__": lambda m, o, s: set_optimizer_state_dict(m, o, s)}


def _resume_plain_dict():
    def save(model, opt):
        sd = _roundtrip(opt.state_dict())
        return {"state": sd["state"], "param_groups": sd["param_groups"]}

    return _resume_route(save)


def _resume_stripped():
    def save(model, opt):
        plain = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        plain.load_state_dict(opt.optimizer.state_dict())
        return plain.state_dict()

    return _resume_route(save)


def _resume_accelerate():
    from accelerate import Accelerator
    from integration_models import reset_accelerate_state

    reset_accelerate_state()
    try:
        model = _full_llama()
        w0 = _w(model)
        anchors, oracle = make_anchors(model, DIMS, "safelora", None)
        acc = Accelerator(cpu=True)
        opt = acc.prepare(AnchoredAdamW(model, anchors, LAM, lr=1e-2))  # state_dict round trip inside
        _train(model, opt, 3)
        fresh = acc.prepare(AnchoredAdamW(model, anchors, LAM, lr=1e-2))
        fresh.load_state_dict(_roundtrip(opt.state_dict()))
        return _measure(model, fresh, oracle, reference=w0)
    finally:
        reset_accelerate_state()


def _other_coupling():
    model = _full_llama()
    anchors, _ = make_anchors(model, DIMS, "safelora", None)
    sd = AnchoredAdamW(model, anchors, lr=1e-2).state_dict()
    AnchoredAdamW(model, anchors, lr=1e-2, coupling="decoupled").load_state_dict(sd)


def _other_anchors():
    model = _full_llama()
    anchors, _ = make_anchors(model, DIMS, "safelora", None)
    other, _ = make_anchors(model, DIMS, "orthogonal", 2)
    AnchoredAdamW(model, other, lr=1e-2).load_state_dict(AnchoredAdamW(model, anchors, lr=1e-2).state_dict())


def _subspaces(k=2, seed=0):
    from asft_optim.safety_subspace import SafetySubspace

    g = torch.Generator().manual_seed(seed)
    return {n: SafetySubspace(torch.linalg.qr(torch.randn(d_out, k, generator=g, dtype=torch.float64)).Q)
            for n, (d_out, _) in DIMS.items()}


def _lora_with_subspaces(subspaces):
    """LoRA from B₀ = 0 under safety subspaces, 3 steps: ``(model, optimizer, anchors, oracle)``."""
    model = lora(tiny_llama(0), ["q_proj", "v_proj"], init_lora_weights=True)
    anchors, oracle = make_anchors(model, DIMS, "safelora", None)
    opt = AnchoredAdamW(model, anchors, LAM, lr=1e-2, subspaces=subspaces)
    _train(model, opt, 3)
    return model, opt, anchors, oracle


def _resume_with_subspaces():
    """The state survives a torch.save round trip; the resumed run keeps QᵀΔW = 0 exactly."""
    subs = _subspaces()
    model, opt, anchors, oracle = _lora_with_subspaces(subs)
    fresh = AnchoredAdamW(model, anchors, LAM, lr=1e-2, subspaces=_subspaces())  # the same, rebuilt
    sd = _roundtrip(opt.state_dict())
    assert {g["anchor_subspaces"] for g in sd["param_groups"]} == {opt.subspace_fingerprint()}
    fresh.load_state_dict(sd)
    _train(model, fresh, 2, start=10)
    for name, m in model.named_modules():
        if hasattr(m, "lora_A"):
            delta = m.scaling["default"] * m.lora_B["default"].weight @ m.lora_A["default"].weight
            assert delta.norm() > 1e-4
            assert float((subs[name.removeprefix("base_model.model.") + ".weight"].basis.T @ delta).abs().max()) < 1e-12
    return _measure(model, fresh, oracle)


def _resume_with_other_subspaces():
    """A lower rank (a prefix of the same Q): the trained B passes the construction's check
    (QᵀB = 0 for the smaller Q too), so only the saved fingerprint tells the runs apart."""
    from asft_optim.safety_subspace import SafetySubspace

    subs = _subspaces()
    model, opt, anchors, _ = _lora_with_subspaces(subs)
    lower = {n: SafetySubspace(s.basis[:, :1].contiguous()) for n, s in subs.items()}
    AnchoredAdamW(model, anchors, LAM, lr=1e-2, subspaces=lower).load_state_dict(opt.state_dict())


def _resume_without_the_subspaces():
    model, opt, anchors, _ = _lora_with_subspaces(_subspaces())
    AnchoredAdamW(model, anchors, LAM, lr=1e-2).load_state_dict(_roundtrip(opt.state_dict()))


def _resume_adding_subspaces():
    model = lora(tiny_llama(0), ["q_proj", "v_proj"], init_lora_weights=True)
    anchors, _ = make_anchors(model, DIMS, "safelora", None)
    sd = AnchoredAdamW(model, anchors, LAM, lr=1e-2).state_dict()
    AnchoredAdamW(model, anchors, LAM, lr=1e-2, subspaces=_subspaces()).load_state_dict(sd)


def _surgery(model, every=2):
    from asft_optim import GradientSurgery

    return GradientSurgery(lambda: lm_loss(model, 99), every=every)


def _resume_with_surgery(save):
    """LoRA under gradient surgery (every=2), 3 steps, saved through ``save``, resumed on a
    fresh optimizer: the step count and the safety gradient come back exactly, and the
    penalty of the next step is the oracle's."""
    model = lora(tiny_llama(0), ["q_proj", "v_proj"])
    anchors, oracle = make_anchors(model, DIMS, "safelora", None)
    opt = AnchoredAdamW(model, anchors, LAM, lr=1e-2, surgery=_surgery(model))
    _train(model, opt, 3)
    saved = save(model, opt)
    fresh = AnchoredAdamW(model, anchors, LAM, lr=1e-2, surgery=_surgery(model))
    load = saved.pop("__load__", None)
    (load(model, fresh, saved) if load is not None else fresh.load_state_dict(saved))
    assert fresh.surgery.steps == 3 and len(fresh.surgery.safety) == len(opt.surgery.safety) > 0
    assert {id(k) for k in fresh.surgery.safety} == {id(k) for k in opt.surgery.safety}  # the same model's tensors
    for k, v in opt.surgery.safety.items():
        assert torch.equal(fresh.surgery.safety[k], v)
    return _measure(model, fresh, oracle)


def _drop_surgery():
    model = lora(tiny_llama(0), ["q_proj", "v_proj"])
    anchors, _ = make_anchors(model, DIMS, "safelora", None)
    opt = AnchoredAdamW(model, anchors, LAM, lr=1e-2, surgery=_surgery(model))
    _train(model, opt, 1)
    AnchoredAdamW(model, anchors, LAM, lr=1e-2).load_state_dict(_roundtrip(opt.state_dict()))


def _other_surgery():
    model = lora(tiny_llama(0), ["q_proj", "v_proj"])
    anchors, _ = make_anchors(model, DIMS, "safelora", None)
    opt = AnchoredAdamW(model, anchors, LAM, lr=1e-2, surgery=_surgery(model))
    _train(model, opt, 1)
    AnchoredAdamW(model, anchors, LAM, lr=1e-2, surgery=_surgery(model, every=5)).load_state_dict(opt.state_dict())


def _rewrap_conflicting_lambda():
    model = lora(tiny_llama(0), ["q_proj", "v_proj"])
    anchors, _ = make_anchors(model, DIMS, "safelora", None)
    opt = AnchoredOptimizer(torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1),
                            model, anchors)
    AnchoredOptimizer(opt.optimizer, model, anchors, anchor_lambda=5.0)


def _rewrap_keeps_lambda():
    model = lora(tiny_llama(0), ["q_proj", "v_proj"])
    anchors, oracle = make_anchors(model, DIMS, "safelora", None)
    first = AnchoredOptimizer(torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1),
                              model, anchors, anchor_lambda=LAM)
    return _measure(model, AnchoredOptimizer(first.optimizer, model, anchors), oracle)


def _add_param_group():
    model = _full_llama()
    params = dict(model.named_parameters())
    w0 = _w(model)
    anchors, oracle = make_anchors(model, DIMS, "safelora", None)
    opt = AnchoredOptimizer(torch.optim.AdamW([params[Q]], lr=1e-2), model, anchors, LAM, strict=False)
    _train(model, opt, 2)  # V is frozen-in-place but untrained until now: its W_ref is w0 still
    opt.add_param_group({"params": [params[V]]})
    _train(model, opt, 2, start=2)
    return _measure(model, opt, oracle, reference=w0)


def _lambda_schedule():
    model = lora(tiny_llama(0), ["q_proj", "v_proj"])
    anchors, oracle = make_anchors(model, DIMS, "safelora", None)
    opt = AnchoredAdamW(model, anchors, 2 * LAM, lr=1e-2)
    sched = AnchorLambdaScheduler(opt, lambda t: 0.5 if t >= 1 else 0.0)
    _train(model, opt, 1)
    sched.step()  # λ = 2·LAM·0.5 = LAM from now
    return _measure(model, opt, oracle)


def _gpt2_conv1d():
    model = lora(tiny_gpt2(0), ["c_attn"], fan_in_fan_out=True)
    anchors, oracle = make_anchors(model, {"transformer.h.0.attn.c_attn.weight": (24, 8)}, "safelora", None)
    opt = AnchoredAdamW(model, anchors, LAM, lr=1e-2)
    _train(model, opt, 2)
    return _measure(model, opt, oracle)


def _two_adapters():
    model = lora(tiny_llama(0), ["q_proj", "v_proj"])
    torch.manual_seed(5)
    model.add_adapter("second", LoraConfig(r=3, lora_alpha=3, init_lora_weights=False, target_modules=["q_proj"]))
    model.base_model.set_adapter(["default", "second"])
    model.to(torch.float64)
    anchors, oracle = make_anchors(model, DIMS, "safelora", None)
    opt = AnchoredAdamW(model, anchors, LAM, lr=1e-2)
    _train(model, opt, 2)
    return _measure(model, opt, oracle)


def _loss_level_twin():
    model = lora(tiny_llama(0), ["q_proj", "v_proj"])
    anchors, oracle = make_anchors(model, DIMS, "safelora", None)
    got = float(anchor_penalty(model, anchors, LAM).detach())
    return got, float(ref.oracle_penalty(model, oracle, LAM).detach())


def _wrapped_after_optimizer():
    """TRL's trap: the optimizer is built on the raw model, PEFT wraps it afterwards."""
    model = tiny_llama(0)
    for n, p in model.named_parameters():
        p.requires_grad_(n in DIMS)
    anchors, _ = make_anchors(model, DIMS, "safelora", None)
    opt = AnchoredAdamW(model, anchors, LAM, lr=1e-2)
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    lm_loss(peft_model, 0).backward()
    opt.step()


def _anchor_names_wrong():
    model = lora(tiny_llama(0), ["q_proj", "v_proj"])
    anchors, _ = make_anchors(model, {"model.layers.9.self_attn.q_proj.weight": (8, 8)}, "safelora", None)
    AnchoredAdamW(model, anchors, lr=1e-2)


def _anchor_shape_wrong():
    model = lora(tiny_llama(0), ["q_proj", "v_proj"])
    anchors, _ = make_anchors(model, {Q: (5, 8)}, "safelora", None)
    AnchoredAdamW(model, anchors, lr=1e-2, strict=False)


def _nothing_trained():
    model = lora(tiny_llama(0), ["q_proj", "v_proj"])
    anchors, _ = make_anchors(model, DIMS, "safelora", None)
    head = [p for n, p in model.named_parameters() if "lm_head" in n or "embed" in n]
    AnchoredOptimizer(torch.optim.SGD(head, lr=0.1), model, anchors)


def _anchor_file_roundtrip(tmp=None):
    model = lora(tiny_llama(0), ["q_proj", "v_proj"])
    anchors, oracle = make_anchors(model, DIMS, "safelora", None)
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        anchors.save(Path(d) / "a.anchors.safetensors")
        loaded = Anchors.load(Path(d) / "a.anchors.safetensors")
    opt = AnchoredAdamW(model, loaded, LAM, lr=1e-2)
    return _measure(model, opt, oracle)


def _pissa_resumed():
    """PiSSA: ΔW = s(BA − B₀A₀) from the B₀A₀ PEFT started with, across a plain-dict resume."""
    import warnings

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(tiny_llama(0).float(), LoraConfig(
            r=2, lora_alpha=4, init_lora_weights="pissa", target_modules=["q_proj", "v_proj"])).double()
    anchors, oracle = make_anchors(model, DIMS, "safelora", None)
    mods = {n.removeprefix("base_model.model.") + ".weight": m for n, m in model.named_modules() if hasattr(m, "lora_A")}
    start = {n: (m.lora_B["default"].weight.detach().clone(), m.lora_A["default"].weight.detach().clone()) for n, m in mods.items()}
    opt = AnchoredAdamW(model, anchors, LAM, lr=1e-2)
    _train(model, opt, 3)
    sd = _roundtrip(opt.state_dict())
    fresh = AnchoredAdamW(model, anchors, LAM, lr=1e-2)
    fresh.load_state_dict({"state": sd["state"], "param_groups": sd["param_groups"]})
    want = 0.0
    for n, m in mods.items():
        s_, (b0, a0) = m.scaling["default"], start[n]
        delta = s_ * (m.lora_B["default"].weight @ m.lora_A["default"].weight - b0 @ a0)
        want += LAM * float(ref.penalty_of(delta.detach(), *oracle[n]))
    _train(model, fresh, 1, start=50)
    return anchor_summary(fresh)["anchor/penalty"], want


def _adalora():
    from peft import AdaLoraConfig

    torch.manual_seed(1)
    model = get_peft_model(tiny_llama(0), AdaLoraConfig(init_r=2, target_r=1, total_step=10, init_lora_weights=False,
                                                       target_modules=["q_proj", "v_proj"])).double()
    anchors, oracle = make_anchors(model, DIMS, "safelora", None)
    opt = AnchoredAdamW(model, anchors, LAM, lr=1e-2)
    _train(model, opt, 2)
    want = 0.0
    for n, m in model.named_modules():
        if hasattr(m, "lora_E"):  # ΔW = B (A ⊙ E) · α / ranknum, PEFT's AdaLoRA update
            delta = m.lora_B["default"] @ (m.lora_A["default"] * m.lora_E["default"])
            delta = delta * m.scaling["default"] / (m.ranknum["default"] + 1e-5)
            want += LAM * float(ref.penalty_of(delta.detach(), *oracle[n.removeprefix("base_model.model.") + ".weight"]))
    _train(model, opt, 1, start=50)
    return anchor_summary(opt)["anchor/penalty"], want


def _modules_to_save():
    model = get_peft_model(tiny_llama(0), LoraConfig(r=2, target_modules=["k_proj"], modules_to_save=["q_proj"])).double()
    anchors, oracle = make_anchors(model, {Q: (8, 8)}, "safelora", None)
    original = {Q: next(m for n, m in model.named_modules() if n.endswith("q_proj.original_module")).weight.detach().clone()}
    opt = AnchoredAdamW(model, anchors, LAM, lr=1e-2, strict=False)
    _train(model, opt, 2)
    copy_ = next(m for n, m in model.named_modules() if n.endswith("q_proj.modules_to_save.default"))
    want = LAM * float(ref.penalty_of((copy_.weight - original[Q]).detach(), *oracle[Q]))
    _train(model, opt, 1, start=50)
    return anchor_summary(opt)["anchor/penalty"], want


def _refused_tuner(config):
    def run():
        model = get_peft_model(tiny_llama(0), config).double()
        anchors, _ = make_anchors(model, DIMS, "safelora", None)
        AnchoredAdamW(model, anchors, lr=1e-2)

    return run



# -- routes found by the second probe round (issue: every route exact or a clear error) ---


def _reference_keys(transform):
    """``reference=`` keyed another usual way (``module.`` prefix, no ``.weight``)."""
    def run():
        model = _full_llama()
        w0 = _w(model)
        given = {transform(n): w - 0.05 for n, w in w0.items()}  # not the weights now
        anchors, oracle = make_anchors(model, DIMS, "safelora", None)
        opt = AnchoredAdamW(model, anchors, LAM, lr=1e-2, reference=given)
        _train(model, opt, 2)
        return _measure(model, opt, oracle, reference={n: w - 0.05 for n, w in w0.items()})
    return run


def _reference_key_unknown():
    model = _full_llama()
    anchors, _ = make_anchors(model, DIMS, "safelora", None)
    given = {**_w(model), "model.layers.0.self_attn.k_proj.weight": torch.zeros(4, 8, dtype=torch.float64)}
    AnchoredAdamW(model, anchors, LAM, lr=1e-2, reference=given)


def _reference_one_missing():
    model = _full_llama()
    anchors, _ = make_anchors(model, DIMS, "safelora", None)
    AnchoredAdamW(model, anchors, LAM, lr=1e-2, reference={Q: _w(model)[Q]})


def _adapter_added_later():
    """``add_adapter`` on another module after construction, then ``add_param_group``: found."""
    model = lora(tiny_llama(0), ["q_proj"])
    anchors, oracle = make_anchors(model, DIMS, "safelora", None)
    opt = AnchoredAdamW(model, anchors, LAM, lr=1e-2, strict=False)
    _train(model, opt, 1)
    torch.manual_seed(4)
    model.add_adapter("extra", LoraConfig(r=2, lora_alpha=4, init_lora_weights=False, target_modules=["v_proj"]))
    model.base_model.set_adapter(["default", "extra"])
    model.double()
    extra = [p for n, p in model.named_parameters() if ".extra" in n]
    for p in extra:
        p.requires_grad_(True)
    opt.add_param_group({"params": extra})
    assert {t.name for t in opt.targets} == {Q, V}
    _train(model, opt, 2, start=1)
    return _measure(model, opt, oracle)


def _origins_given():
    """A PiSSA adapter trained before (as a reload hands it over): ``origins=`` says where ΔW starts."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(tiny_llama(0).float(), LoraConfig(
            r=2, lora_alpha=4, init_lora_weights="pissa", target_modules=["q_proj", "v_proj"])).double()
    anchors, oracle = make_anchors(model, DIMS, "safelora", None)
    first = AnchoredAdamW(model, anchors, LAM, lr=1e-2)
    origins = {t.name: {a: (b.clone(), a0.clone()) for a, (b, a0) in t.origin.items()} for t in first.targets}
    _train(model, first, 3)
    opt = AnchoredAdamW(model, anchors, LAM, lr=1e-2, origins=origins)  # the trained B·A is not the origin
    assert all(torch.equal(t.origin["default"][0], origins[t.name]["default"][0]) for t in opt.targets)
    mods = {n.removeprefix("base_model.model.") + ".weight": m for n, m in model.named_modules() if hasattr(m, "lora_A")}
    want = 0.0  # ΔW = s(BA − B₀A₀) from the given origin, dense, at the weights the step starts from
    for n, m in mods.items():
        b0, a0 = origins[n]["default"]
        delta = m.scaling["default"] * (m.lora_B["default"].weight @ m.lora_A["default"].weight - b0 @ a0)
        want += LAM * float(ref.penalty_of(delta.detach(), *oracle[n]))
    _train(model, opt, 1, start=50)
    return anchor_summary(opt)["anchor/penalty"], want


def _lora_with_trainable_base():
    model = lora(tiny_llama(0), ["q_proj", "v_proj"])
    for m in model.modules():
        if hasattr(m, "lora_A"):
            m.get_base_layer().weight.requires_grad_(True)
    anchors, _ = make_anchors(model, DIMS, "safelora", None)
    opt = AnchoredAdamW(model, anchors, LAM, lr=1e-2)
    _train(model, opt, 1)


def _tied_embeddings():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).double()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    anchors, _ = make_anchors(model, {"model.embed_tokens.weight": (8, 32), "lm_head.weight": (32, 8)}, "l2", None)
    AnchoredAdamW(model, anchors, LAM, lr=1e-2)


def _decoupled_overshoot():
    model = _full_llama()
    anchors, _ = make_anchors(model, DIMS, "safelora", None)
    AnchoredAdamW(model, anchors, 1e4, lr=1e-3, coupling="decoupled")


def _decoupled_overshoot_scheduled():
    """λ raised past the bound after construction: step() refuses before moving anything."""
    model = _full_llama()
    anchors, _ = make_anchors(model, DIMS, "safelora", None)
    opt = AnchoredAdamW(model, anchors, 1.0, lr=1e-3, coupling="decoupled")
    opt.param_groups[0]["anchor_lambda"] = 1e4
    before = _w(model)
    lm_loss(model, 0).backward()
    try:
        opt.step()
    finally:
        assert all(torch.equal(before[n], w) for n, w in _w(model).items())


def _decoupled_without_lr():
    model = _full_llama()
    anchors, _ = make_anchors(model, DIMS, "safelora", None)
    inner = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    inner.param_groups[0]["lr"] = None  # Adafactor's relative step leaves lr None
    AnchoredOptimizer(inner, model, anchors, LAM, coupling="decoupled")


def _numpy_lambda():
    np = pytest.importorskip("numpy")
    model = lora(tiny_llama(0), ["q_proj", "v_proj"])
    anchors, oracle = make_anchors(model, DIMS, "safelora", None)
    opt = AnchoredAdamW(model, anchors, np.float32(LAM), lr=1e-2)
    opt.param_groups[0]["anchor_lambda"] = np.float64(LAM)  # as a NumPy schedule would set it
    _train(model, opt, 2)
    return _measure(model, opt, oracle)


def _bad_lambda_in_step():
    """A λ of the wrong type set after construction: refused before any gradient changes."""
    model = lora(tiny_llama(0), ["q_proj", "v_proj"])
    anchors, _ = make_anchors(model, DIMS, "safelora", None)
    opt = AnchoredAdamW(model, anchors, LAM, lr=1e-2)
    lm_loss(model, 0).backward()
    grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    opt.param_groups[0]["anchor_lambda"] = "0.7"
    try:
        opt.step()
    finally:
        assert all(torch.equal(g, p.grad) for g, p in zip(grads, [p for p in model.parameters() if p.grad is not None], strict=True))


def _compiled_step_keeps_diagnostics():
    model = lora(tiny_llama(0), ["q_proj", "v_proj"])
    anchors, oracle = make_anchors(model, DIMS, "safelora", None)
    opt = AnchoredAdamW(model, anchors, LAM, lr=1e-2)
    step = torch.compile(opt.step, backend="eager")
    for t in range(2):
        opt.zero_grad()
        lm_loss(model, t).backward()
        step()
    want = float(ref.oracle_penalty(copy.deepcopy(model), oracle, LAM).detach())
    opt.zero_grad()
    lm_loss(model, 9).backward()
    step()
    return anchor_summary(opt)["anchor/penalty"], want


def _compiled_step_with_surgery():
    """torch.compile(opt.step) runs the surgery's closure eagerly: the weights equal an
    uncompiled run's (to the ~2e-7 compiling AdamW gives anyway), the closure ran once per step."""
    runs = []
    for compiled in (False, True):
        model = lora(tiny_llama(0), ["q_proj", "v_proj"])
        anchors, oracle = make_anchors(model, DIMS, "safelora", None)
        opt = AnchoredAdamW(model, anchors, LAM, lr=1e-2, surgery=_surgery(model, every=1))
        step = torch.compile(opt.step, backend="eager") if compiled else opt.step
        for t in range(3):
            opt.zero_grad()
            lm_loss(model, t).backward()
            step()
        runs.append((model, opt))
    (plain, _), (model, opt) = runs
    assert opt.surgery.calls == 3
    # Compiling AdamW's step alone moves float32 weights by ~2e-7 (without surgery too): close, not equal.
    assert max(float((a - b).detach().abs().max()) for a, b in zip(plain.parameters(), model.parameters(),
                                                                      strict=True)) < 1e-6
    want = float(ref.oracle_penalty(copy.deepcopy(model), oracle, LAM).detach())
    opt.zero_grad()
    lm_loss(model, 9).backward()
    opt.step()
    return anchor_summary(opt)["anchor/penalty"], want


def _penalty_object():
    """``AnchorPenalty`` built once: W_ref recorded at construction, like the optimizer."""
    from asft_optim import AnchorPenalty

    model = _full_llama()
    w0 = _w(model)
    anchors, oracle = make_anchors(model, DIMS, "safelora", None)
    penalty = AnchorPenalty(model, anchors, LAM)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for t in range(3):
        opt.zero_grad()
        (lm_loss(model, t) + penalty()).backward()
        opt.step()
    return float(penalty().detach()), float(ref.oracle_penalty(model, oracle, LAM, w0).detach())


def _anchor_penalty_in_compiled_loop():
    """``loss + anchor_penalty(...)`` inside a ``torch.compile``d function, three steps."""
    model = lora(tiny_llama(0), ["q_proj", "v_proj"])
    anchors, oracle = make_anchors(model, DIMS, "safelora", None)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2)

    @torch.compile(backend="eager")
    def loss_fn(t):
        return lm_loss(model, t) + anchor_penalty(model, anchors, LAM)

    for t in range(3):
        opt.zero_grad()
        loss_fn(t).backward()
        opt.step()
    return float(anchor_penalty(model, anchors, LAM).detach()), float(ref.oracle_penalty(model, oracle, LAM).detach())


EXACT = {
    "PiSSA, resumed from a plain dict": _pissa_resumed,
    "AdaLoRA (E vector)": _adalora,
    "modules_to_save copy": _modules_to_save,
    "lora q/v, plain loop": lambda: _lora_route(),
    "rsLoRA": lambda: _lora_route(use_rslora=True),
    "DoRA": lambda: _lora_route(use_dora=True),
    "GPT-2 Conv1D LoRA": _gpt2_conv1d,
    "two adapters at once": _two_adapters,
    "full fine-tuning q/v": lambda: _full_route(),
    "full fine-tuning, orthogonal anchors": lambda: _full_route("orthogonal"),
    "full fine-tuning, decoupled": lambda: _full_route(coupling="decoupled"),
    "resume: full state_dict": lambda: _resume_route(lambda m, o: _roundtrip(o.state_dict())),
    "resume: plain {state, param_groups}": _resume_plain_dict,
    "resume: DCP get/set_optimizer_state_dict": lambda: _resume_route(_save_dcp),
    "resume: accelerate prepare": _resume_accelerate,
    "resume with safety subspaces: torch.save round trip": _resume_with_subspaces,
    "resume with gradient surgery: torch.save round trip": lambda: _resume_with_surgery(
        lambda m, o: _roundtrip(o.state_dict())),
    "resume with gradient surgery: DCP get/set_optimizer_state_dict": lambda: _resume_with_surgery(_save_dcp),
    "re-wrap keeping λ": _rewrap_keeps_lambda,
    "add_param_group with an anchored weight": _add_param_group,
    "λ scheduler": _lambda_schedule,
    "loss-level twin": _loss_level_twin,
    "anchor file save/load": _anchor_file_roundtrip,
    "reference= keyed with a module. prefix": _reference_keys(lambda n: "module." + n),
    "reference= keyed without .weight": _reference_keys(lambda n: n.removesuffix(".weight")),
    "adapter added after construction + add_param_group": _adapter_added_later,
    "PiSSA trained before, origins= given": _origins_given,
    "NumPy λ (constructor and param group)": _numpy_lambda,
    "torch.compile(opt.step): diagnostics kept": _compiled_step_keeps_diagnostics,
    "torch.compile(opt.step) with gradient surgery": _compiled_step_with_surgery,
    "AnchorPenalty object in a plain loop": _penalty_object,
    "anchor_penalty inside a torch.compile'd loss": _anchor_penalty_in_compiled_loop,
}

ERRORS = {
    "IA3 (multiplicative)": (_refused_tuner(__import__("peft").IA3Config(target_modules=["q_proj", "v_proj"],
                                                                          feedforward_modules=[])), AnchorError, "IA3"),
    "OFT (rotation)": (_refused_tuner(__import__("peft").OFTConfig(r=2, oft_block_size=0, target_modules=["q_proj", "v_proj"])),
                       AnchorError, "OFT"),
    "resume: state of a plain optimizer (no W_ref)": (_resume_stripped, AnchorError, "reset_reference=True"),
    "resume with another coupling": (_other_coupling, AnchorError, "coupling="),
    "resume with other anchors": (_other_anchors, AnchorError, "other anchors"),
    "resume with other safety subspaces": (_resume_with_other_subspaces, AnchorError, "saved with safety subspaces"),
    "resume dropping the safety subspaces": (_resume_without_the_subspaces, AnchorError, "this optimizer has none"),
    "resume adding safety subspaces": (_resume_adding_subspaces, AnchorError, "saved with no safety subspaces"),
    "resume dropping the gradient surgery": (_drop_surgery, AnchorError, "saved with gradient surgery"),
    "resume with other gradient-surgery settings": (_other_surgery, AnchorError, "every=2"),
    "re-wrap with a conflicting λ": (_rewrap_conflicting_lambda, ValueError, "anchor_lambda=None"),
    "PEFT wrapped after the optimizer": (_wrapped_after_optimizer, AnchorError, "build the optimizer on the final model"),
    "anchors for weights the model lacks": (_anchor_names_wrong, AnchorError, "match no module"),
    "anchors of another shape": (_anchor_shape_wrong, AnchorError, "do not fit"),
    "optimizer trains no anchored weight": (_nothing_trained, AnchorError, "no anchored weight is trained"),
    "reference= key for a weight that is not anchored": (_reference_key_unknown, AnchorError, "name no anchored weight"),
    "reference= missing one fully tuned weight": (_reference_one_missing, AnchorError, "no W_ref for 1"),
    "LoRA with its base weight trainable too": (_lora_with_trainable_base, AnchorError, "freeze the base weight"),
    "two anchors on tied embed_tokens/lm_head": (_tied_embeddings, AnchorError, "one tied tensor"),
    "decoupled with 2·lr·λ >= 1": (_decoupled_overshoot, ValueError, "2·lr·λ < 1"),
    "decoupled, λ scheduled past 2·lr·λ >= 1": (_decoupled_overshoot_scheduled, ValueError, "2·lr·λ < 1"),
    "decoupled with lr=None (Adafactor relative step)": (_decoupled_without_lr, ValueError, "numeric lr"),
    "a str λ set in a param group": (_bad_lambda_in_step, ValueError, "must be a finite number"),
}


@pytest.mark.parametrize("route", list(EXACT))
def test_route_gives_the_exact_penalty(route):
    got, want = EXACT[route]()
    assert want > 1e-6, "the route must exercise a non-zero penalty"
    assert got == pytest.approx(want, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("route", list(ERRORS))
def test_route_raises_a_clear_error(route):
    fn, exc, match = ERRORS[route]
    with pytest.raises(exc, match=match):
        fn()


def test_the_probe_list_is_long_enough():
    # 30 routes in the first probe round, 16 more (and the tests below, and test_routes_io.py) in the
    # second, 4 for the safety subspaces' state, 5 for the gradient surgery's.
    assert len(EXACT) + len(ERRORS) >= 50


def test_anchor_penalty_under_bf16_autocast_is_the_float32_penalty():
    """Autocast does not reach the penalty: value and gradient equal the float32 ones bit
    for bit, and the value is a float32 scalar (not bf16)."""
    model = lora(tiny_llama(0), ["q_proj", "v_proj"]).float()
    anchors, _ = make_anchors(model, DIMS, "safelora", None)
    anchors = anchors.to(dtype=torch.float32)
    params = [p for p in model.parameters() if p.requires_grad]
    plain = anchor_penalty(model, anchors, LAM)
    want = torch.autograd.grad(plain, params)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = anchor_penalty(model, anchors, LAM)
        grads = torch.autograd.grad(got, params)
    assert got.dtype == torch.float32 and torch.equal(got, plain)
    assert all(torch.equal(g, w) for g, w in zip(grads, want, strict=True))


def test_unanchored_lora_weights_are_named_at_construction():
    """LoRA on all linear layers, anchors on q/v only: the optimizer says how many trained
    weights it leaves unpenalised (only Anchors.bind did before)."""
    model = lora(tiny_llama(0), ["q_proj", "k_proj", "v_proj", "o_proj"])
    anchors, _ = make_anchors(model, DIMS, "safelora", None)
    with pytest.warns(UserWarning, match="2 trained 2-D weight"):
        AnchoredAdamW(model, anchors, LAM, lr=1e-2)


def test_anchors_that_act_as_l2_are_named_before_training(tmp_path):
    """A small alignment update gives C = VVᵀ/‖V‖_F near 0: the optimizer and
    ``asft anchors info`` say so and name the alternatives; a large one stays silent."""
    import warnings

    from asft_optim.cli import main as asft_main

    model = lora(tiny_llama(0), ["q_proj", "v_proj"])
    g = torch.Generator().manual_seed(0)
    small = {n: 1e-3 * torch.randn(*d, generator=g, dtype=torch.float64) for n, d in DIMS.items()}
    anchors = Anchors.from_deltas(small, "safelora", dtype=torch.float64)
    assert max(p.largest_eigenvalue() for p in anchors.values()) < 0.2
    with pytest.warns(UserWarning, match="almost plain L2.*mode='orthogonal'"):
        AnchoredAdamW(model, anchors, LAM, lr=1e-2)
    large, _ = make_anchors(model, DIMS, "safelora", None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        AnchoredAdamW(model, large, LAM, lr=1e-2)
    path = tmp_path / "small.safetensors"
    anchors.save(path)
    import contextlib
    import io as _io

    out = _io.StringIO()
    with contextlib.redirect_stdout(out):
        assert asft_main(["anchors", "info", str(path)]) == 0
    assert "2 of 2 safelora anchors" in out.getvalue() and "almost plain L2" in out.getvalue()


def test_lbfgs_diagnostics_are_the_last_closure_evaluations():
    """LBFGS evaluates the closure (and the penalty) several times per step: the summary
    holds the penalty at the weights of the last evaluation, as the README says."""
    model = _full_llama()
    w0 = _w(model)
    anchors, oracle = make_anchors(model, DIMS, "safelora", None)
    opt = AnchoredOptimizer(torch.optim.LBFGS([p for p in model.parameters() if p.requires_grad], lr=0.5,
                                              max_iter=4), model, anchors, LAM)
    seen = []

    def closure():
        opt.zero_grad()
        seen.append(_w(model))
        loss = lm_loss(model, 0)
        loss.backward()
        return loss

    opt.step(closure)
    assert len(seen) > 1  # several evaluations in one step
    at_last = copy.deepcopy(model)
    with torch.no_grad():
        for n, p in at_last.named_parameters():
            if n in DIMS:
                p.copy_(seen[-1][n])
    want = float(ref.oracle_penalty(at_last, oracle, LAM, w0).detach())
    assert anchor_summary(opt)["anchor/penalty"] == pytest.approx(want, rel=1e-9)


def test_an_origin_taken_from_the_model_is_announced_and_a_given_one_is_not():
    """A PiSSA adapter reloaded after training looks like a fresh one: the optimizer cannot
    tell, so it says which origins it took from the model, and is silent once origins= is given."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(tiny_llama(0).float(), LoraConfig(
            r=2, lora_alpha=4, init_lora_weights="pissa", target_modules=["q_proj", "v_proj"])).double()
    anchors, _ = make_anchors(model, DIMS, "safelora", None)
    with pytest.warns(UserWarning, match="pass origins= or load this optimizer's saved state"):
        first = AnchoredAdamW(model, anchors, LAM, lr=1e-2)
    origins = {t.name: dict(t.origin) for t in first.targets}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        AnchoredAdamW(model, anchors, LAM, lr=1e-2, origins=origins)
