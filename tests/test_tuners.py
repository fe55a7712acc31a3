"""Every PEFT tuner a user can pick is exact or refused (the README's tuner table).

The ORACLE here knows nothing of the library nor of PEFT's ``get_delta_weight``: the
effective update of a layer is read off its forward pass, ``ΔWᵀ = layer(I) - layer₀(I)``
(an identity batch through the tuned layer minus the same batch through the layer as it
was: a deep copy of the model taken before PEFT touched it, or the tuned layer's own
output at construction for tuners measured from an origin), then ``λ Σ ‖R ΔW‖²`` with a
dense R (``tests/reference.py``'s ``oracle_penalty(..., origin=...)``) is differentiated by
autograd in float64. The optimizer's gradient (an inner SGD with lr=0 leaves exactly λ∇P in
``.grad``) and the loss-level :func:`anchor_penalty` are compared with it.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import warnings

import peft
import pytest
import reference as ref
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import forward_weight, hf_modules, origin_of
from strategies import modes, positive_lambdas, seeds
from tiny_models import (
    TARGETS,
    D,
    Q,
    V,
    anchor_deltas,
    make_anchors,
    tiny_gpt2,
    tiny_llama,
    token_batches,
)
from torch import nn

from asft_optim import AnchoredOptimizer, AnchorError, Anchors, anchor_penalty
from asft_optim.discovery import find_targets
from asft_optim.tuners import DELTA_WEIGHT_TUNERS, REFUSED

HEAD = "lm_head.weight"
DIMS = {Q: (16, 16), V: (8, 16)}  # the ``wide`` Llama's q/v weights
RANK = 3  # of the orthogonal anchors
QV = ["q_proj", "v_proj"]

pytestmark = pytest.mark.filterwarnings("ignore")


def perturb(model, seed=3, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


def trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def optimizer_grads(opt, params):
    for p in params:
        p.grad = None
    opt.step()
    return [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in params]


def assert_exact(model, origin, anchors, oracle, lam=0.7, *, origins=None, opt=None, tol=(1e-9, 1e-8)):
    """Optimizer gradient and loss-level twin == autograd of the forward-pass oracle."""
    atol, rtol = tol
    params = trainable(model)
    if opt is None:
        opt = AnchoredOptimizer(torch.optim.SGD(params, lr=0.0), model, anchors, anchor_lambda=lam)
    expected_loss = ref.oracle_penalty(model, oracle, lam, origin=origin)
    expected = [
        torch.zeros_like(p) if g is None else g
        for g, p in zip(torch.autograd.grad(expected_loss, params, allow_unused=True), params, strict=True)
    ]
    assert any(e.abs().sum() > 0 for e in expected), "vacuous comparison"
    got = optimizer_grads(opt, params)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, atol=atol, rtol=rtol)
    twin = anchor_penalty(model, anchors, lam, origins=origins)
    torch.testing.assert_close(twin, expected_loss.detach(), atol=atol, rtol=rtol)
    twin_grads = torch.autograd.grad(twin, params, allow_unused=True)
    for p, g, e in zip(params, twin_grads, expected, strict=True):
        torch.testing.assert_close(torch.zeros_like(p) if g is None else g, e, atol=atol, rtol=rtol)
    return opt


def peft_model(config, seed=0, dtype=D, init_dtype=None):
    """A tiny Llama wrapped by ``config`` and a deep copy of it as it was before."""
    base = tiny_llama(seed, init_dtype or dtype, size="wide")
    original = copy.deepcopy(base).to(D)
    torch.manual_seed(seed + 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(base, config).to(dtype)
    model.eval()  # dropout off in both the oracle and the library's view
    return model, original


# -- exact rows: LoRA family and get_delta_weight tuners ---------------------------------

def _lora(**kw):
    return peft.LoraConfig(**{"r": 2, "lora_alpha": 4, "init_lora_weights": False, "target_modules": QV, **kw})


EXACT = {
    "lora": lambda: _lora(),
    "rslora": lambda: _lora(use_rslora=True, r=3, lora_alpha=5),
    "dora": lambda: _lora(use_dora=True),
    "mica": lambda: _lora(init_lora_weights="mica"),
    "adalora": lambda: peft.AdaLoraConfig(init_r=4, target_r=2, total_step=10, target_modules=QV),
    "loha": lambda: peft.LoHaConfig(r=2, alpha=4, target_modules=QV),
    "lokr": lambda: peft.LoKrConfig(r=2, alpha=4, target_modules=QV),
    "vera": lambda: peft.VeraConfig(r=4, target_modules=QV),
    "fourierft": lambda: peft.FourierFTConfig(n_frequency=20, target_modules=QV),
    "c3a": lambda: peft.C3AConfig(block_size=4, target_modules=QV),
    "delora": lambda: peft.DeloraConfig(target_modules=QV),
    "frod": lambda: peft.FrodConfig(target_modules=QV),
    "gralora": lambda: peft.GraloraConfig(r=4, gralora_k=2, target_modules=QV),
    "osf": lambda: peft.OSFConfig(target_modules=QV),
    "peanut": lambda: peft.PeanutConfig(target_modules=QV),
    "pvera": lambda: peft.PveraConfig(r=4, target_modules=QV),
    "randlora": lambda: peft.RandLoraConfig(r=4, target_modules=QV),
    "supertuning": lambda: peft.SupertuningConfig(target_modules=QV),
    "tinylora": lambda: peft.TinyLoraConfig(target_modules=QV),
    "unilora": lambda: peft.UniLoraConfig(target_modules=QV),
    "vblora": lambda: peft.VBLoRAConfig(vector_length=4, num_vectors=8, target_modules=QV),
    "waveft": lambda: peft.WaveFTConfig(n_frequency=20, target_modules=QV),
}
EXPECTED_KIND = {"lora": "lora", "rslora": "lora", "mica": "lora"}
FLOAT32_INIT = {"mica"}  # PEFT refuses to build MiCA in float64
# PEFT computes these ΔW in float32 whatever the model's dtype (FFT of a float32 copy).
FLOAT32_MATH = {"fourierft": (1e-5, 1e-5), "c3a": (1e-7, 1e-5)}


def test_every_delta_weight_tuner_has_an_exact_row():
    assert DELTA_WEIGHT_TUNERS <= set(EXACT), sorted(DELTA_WEIGHT_TUNERS - set(EXACT))


@pytest.mark.parametrize("row", list(EXACT))
def test_tuner_penalty_gradient_matches_forward_oracle(row):
    model, original = peft_model(EXACT[row](), init_dtype=torch.float32 if row in FLOAT32_INIT else None)
    perturb(model)  # every trainable tensor moves: ΔW ≠ 0 for all tuners
    anchors, oracle = make_anchors(None, DIMS, rank=RANK)
    opt = assert_exact(model, origin_of(original, DIMS), anchors, oracle, tol=FLOAT32_MATH.get(row, (1e-9, 1e-8)))
    assert {t.kind for t in opt.targets} == {EXPECTED_KIND.get(row, "autograd")}


def test_adalora_penalises_its_e_vector():
    """AdaLoRA's ΔW = B·diag(E)·A·α/ranknum: the E vector gets a penalty gradient too."""
    model, original = peft_model(EXACT["adalora"]())
    perturb(model)
    anchors, oracle = make_anchors(None, DIMS, rank=RANK)
    assert_exact(model, origin_of(original, DIMS), anchors, oracle)
    params = dict(model.named_parameters())
    e = params["base_model.model.model.layers.0.self_attn.q_proj.lora_E.default"]
    assert e.grad is not None and e.grad.abs().sum() > 0


def test_loha_rank_dropout_does_not_randomise_the_penalty():
    """LoHa drops ranks inside get_delta_weight while training: the penalty is on the weights."""
    model, original = peft_model(peft.LoHaConfig(r=2, alpha=4, rank_dropout=0.5, target_modules=QV))
    perturb(model)
    model.train()
    anchors, oracle = make_anchors(None, DIMS, rank=RANK)
    origin = origin_of(original, DIMS)
    params = trainable(model)
    opt = AnchoredOptimizer(torch.optim.SGD(params, lr=0.0), model, anchors, anchor_lambda=0.7)
    first = optimizer_grads(opt, params)
    for g, h in zip(first, optimizer_grads(opt, params), strict=True):
        assert torch.equal(g, h)
    model.eval()
    assert_exact(model, origin, anchors, oracle, opt=opt)


# -- PiSSA / OLoRA / LoftQ: measured from the adapter's initial B₀A₀ ----------------------

ORIGIN = {
    "pissa": lambda: _lora(init_lora_weights="pissa"),
    "pissa_niter": lambda: _lora(init_lora_weights="pissa_niter_2"),
    "olora": lambda: _lora(init_lora_weights="olora"),
    "loftq": lambda: _lora(init_lora_weights="loftq", loftq_config=peft.LoftQConfig(loftq_bits=4)),
}
NEEDS = {"loftq": "scipy"}  # PEFT's LoftQ init imports scipy


def test_origin_is_detected_from_every_rewriting_init():
    """Detection reads init_lora_weights (LoftQ's init itself needs scipy: see the skip below)."""
    from asft_optim.tuners import ORIGIN_INITS, origin_adapters

    inits = ["pissa", "pissa_niter_4", "olora", "loftq", "corda", "lora_ga"]
    assert all(i.startswith(ORIGIN_INITS) for i in inits)
    cfgs = {i: peft.LoraConfig(init_lora_weights=i) for i in ("pissa_niter_4", "olora", "corda")}
    cfgs |= {"plain": peft.LoraConfig(), "eva": peft.LoraConfig(init_lora_weights="eva"),
             "orthogonal": peft.LoraConfig(init_lora_weights="orthogonal"), "gaussian": peft.LoraConfig(init_lora_weights="gaussian")}
    assert origin_adapters(cfgs) == {"pissa_niter_4", "olora", "corda"}


@pytest.mark.parametrize("row", list(ORIGIN))
def test_origin_tuners_start_at_zero_and_match_oracle(row):
    if row in NEEDS and importlib.util.find_spec(NEEDS[row]) is None:
        pytest.skip(f"PEFT's {row} init needs {NEEDS[row]} (not installed); detection is tested above")
    # PEFT builds these inits in float32 only; the model is float64 afterwards.
    model, original = peft_model(ORIGIN[row](), init_dtype=torch.float32)
    targets = find_targets(model, make_anchors(None, DIMS, rank=RANK)[0], start=False)[0]
    assert all(t.needs_origin for t in targets)
    start = origin_of(model, DIMS)  # W_base + s·B₀A₀: the effective weight PEFT starts from
    if row != "loftq":  # LoftQ starts from a quantised approximation of W, the others from W
        for n in DIMS:
            torch.testing.assert_close(start[n], origin_of(original, DIMS)[n], atol=1e-5, rtol=1e-5)
    anchors, oracle = make_anchors(None, DIMS, rank=RANK)
    params = trainable(model)
    opt = AnchoredOptimizer(torch.optim.SGD(params, lr=0.0), model, anchors, anchor_lambda=0.7)
    # B·A ≠ 0 by design, yet nothing was trained: penalty 0 and no gradient at the first step.
    assert any(f.b.abs().sum() > 0 for t in opt.targets for f in t.lora_factors())
    assert all(g.abs().max() < 1e-12 for g in optimizer_grads(opt, params))
    assert all(s["raw_penalty"] < 1e-24 for s in opt.anchor_stats().values())
    perturb(model, scale=0.05)
    origins = {t.name: t.origin for t in opt.targets}
    assert_exact(model, start, anchors, oracle, origins=origins, opt=opt)
    assert all(s["raw_penalty"] > 0 for s in opt.anchor_stats().values())  # ... then it grows


def test_pissa_without_origin_is_refused_by_the_stateless_penalty():
    model, _ = peft_model(ORIGIN["pissa"](), init_dtype=torch.float32)
    anchors, _ = make_anchors(None, DIMS, rank=RANK)
    with pytest.raises(AnchorError, match="PiSSA.*origins="):
        anchor_penalty(model, anchors)


def test_origin_survives_set_scale_and_a_restored_snapshot():
    """ΔW = s·BA - s₀·B₀A₀ with s₀ the configured scaling; a restored origin is used as is."""
    model, _ = peft_model(ORIGIN["olora"](), init_dtype=torch.float32)
    anchors, oracle = make_anchors(None, DIMS, rank=RANK)
    start = origin_of(model, DIMS)
    params = trainable(model)
    opt = AnchoredOptimizer(torch.optim.SGD(params, lr=0.0), model, anchors, anchor_lambda=0.7)
    saved = {t.name: {a: (b.clone(), aa.clone()) for a, (b, aa) in t.origin.items()} for t in opt.targets}
    perturb(model, scale=0.05)
    for m in model.modules():
        if hasattr(m, "set_scale"):
            m.set_scale("default", 0.5)
    fresh = AnchoredOptimizer(torch.optim.SGD(params, lr=0.0), model, anchors, anchor_lambda=0.7)
    for t in fresh.targets:  # what the optimizer's load_state_dict does with the saved origin
        for a, pair in saved[t.name].items():
            t.origin[a] = pair
    assert_exact(model, start, anchors, oracle, origins=saved, opt=fresh)


@settings(max_examples=10)
@given(d_out=st.integers(2, 6), d_in=st.integers(2, 6), r=st.integers(1, 2), alpha=st.floats(0.5, 8.0),
       rslora=st.booleans(), lam=positive_lambdas, mode=modes, seed=seeds)
def test_origin_closed_form_matches_oracle_on_random_shapes(d_out, d_in, r, alpha, rslora, lam, mode, seed):
    """The closed form of s(BA) - s₀B₀A₀, any shape/rank/scaling/mode, against dense autograd."""
    torch.manual_seed(seed % 1000)
    net = nn.Sequential(nn.Linear(d_in, d_out, bias=False))
    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, use_rslora=rslora, init_lora_weights="olora", target_modules=["0"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(net, cfg).to(D)
    name = "0.weight"
    start = origin_of(model, [name])
    g = torch.Generator().manual_seed(seed % 1000)
    v = torch.randn(d_out, d_in, generator=g, dtype=D)
    rank = min(2, d_out, d_in) if mode in ("orthogonal", "subspace") else None
    anchors = Anchors.from_deltas({name: v}, mode, rank=rank, dtype=D)
    params = trainable(model)
    opt = AnchoredOptimizer(torch.optim.SGD(params, lr=0.0), model, anchors, anchor_lambda=lam)
    perturb(model, seed=seed % 997, scale=0.2)
    assert_exact(model, start, anchors, {name: (v, mode, rank)}, lam, opt=opt,
                 origins={t.name: t.origin for t in opt.targets})


# -- several adapters, merged/unmerged, modules_to_save -----------------------------------

def test_two_active_adapters_are_penalised_jointly():
    model, original = peft_model(_lora())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.add_adapter("second", peft.LoraConfig(r=3, lora_alpha=5, init_lora_weights=False, target_modules=["q_proj"]))
    model.base_model.set_adapter(["default", "second"])
    model.to(D)
    perturb(model)
    anchors, oracle = make_anchors(None, DIMS, rank=RANK)
    assert_exact(model, origin_of(original, DIMS), anchors, oracle)


def test_two_adapters_pissa_and_plain_lora():
    """An origin adapter next to a plain one: ΔW = s₁B₁A₁ - s₁B₁⁰A₁⁰ + s₂B₂A₂."""
    model, _ = peft_model(ORIGIN["pissa"](), init_dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.add_adapter("plain", peft.LoraConfig(r=3, lora_alpha=5, init_lora_weights=False, target_modules=QV))
    model.base_model.set_adapter(["default", "plain"])
    model.to(D)
    mods = hf_modules(model)
    with torch.no_grad():  # the origin: the weight with the plain adapter's own ΔW taken out
        start = {n: forward_weight(mods[n], 16) - mods[n].get_delta_weight("plain") for n in DIMS}
    anchors, oracle = make_anchors(None, DIMS, rank=RANK)
    params = trainable(model)
    opt = AnchoredOptimizer(torch.optim.SGD(params, lr=0.0), model, anchors, anchor_lambda=0.7)
    assert all(t.origin_adapters == {"default"} for t in opt.targets)
    perturb(model, scale=0.05)
    assert_exact(model, start, anchors, oracle, origins={t.name: t.origin for t in opt.targets}, opt=opt)


def test_merged_adapter_adds_nothing_and_unmerged_is_exact():
    model, original = peft_model(_lora())
    perturb(model)
    anchors, oracle = make_anchors(None, DIMS, rank=RANK)
    params = trainable(model)
    opt = AnchoredOptimizer(torch.optim.SGD(params, lr=0.0), model, anchors, anchor_lambda=0.7)
    model.merge_adapter()  # the update lives in the base weight; the adapter is not trained
    assert all(g.abs().max() == 0 for g in optimizer_grads(opt, params))
    model.unmerge_adapter()
    assert_exact(model, origin_of(original, DIMS), anchors, oracle, opt=opt)


def test_modules_to_save_copy_is_fully_tuned_from_its_original():
    model, original = peft_model(_lora(modules_to_save=["lm_head"]))
    dims = {**DIMS, HEAD: (32, 16)}
    anchors, oracle = make_anchors(None, dims, rank=RANK)
    params = trainable(model)
    opt = AnchoredOptimizer(torch.optim.SGD(params, lr=0.0), model, anchors, anchor_lambda=0.7)
    assert {t.name: t.kind for t in opt.targets}[HEAD] == "full"
    perturb(model)  # the trainable copy of lm_head moves; its frozen original does not
    head = hf_modules(model)[HEAD]
    assert torch.equal(head.original_module.weight, hf_modules(original)[HEAD].weight)
    # anchor_penalty (stateless) measures the copy from the frozen original.
    assert_exact(model, origin_of(original, dims), anchors, oracle, opt=opt)


# -- QLoRA: LoRA on a quantised base ---------------------------------------------------------

def _fake_packed_base(model):
    """Replace q/v base weights by a packed uint8 tensor (what a 4-bit layer stores)."""
    for n, m in model.named_modules():
        if n.endswith(("q_proj", "v_proj")) and hasattr(m, "get_base_layer"):
            base = m.get_base_layer()
            base.weight = nn.Parameter(torch.zeros(base.weight.numel() // 2, 1, dtype=torch.uint8), requires_grad=False)


def test_quantised_base_uses_the_layers_shape():
    """The packed weight's shape is not the layer's: LoRA on it is exact (it never reads W)."""
    model, _ = peft_model(_lora())
    perturb(model)
    anchors, oracle = make_anchors(None, DIMS, rank=RANK)
    mods = hf_modules(model)
    _fake_packed_base(model)
    targets, _ = find_targets(model, anchors)
    assert all(t.out_features() == DIMS[t.name][0] for t in targets)
    params = trainable(model)
    opt = AnchoredOptimizer(torch.optim.SGD(params, lr=0.0), model, anchors, anchor_lambda=0.7)
    # No forward pass through a fake packed weight: the oracle's ΔW is PEFT's convention s·B·A.
    expected = torch.autograd.grad(
        sum(0.7 * ref.penalty_of(ref.lora_delta(mods[n]), *oracle[n]) for n in DIMS), params
    )
    for g, e in zip(optimizer_grads(opt, params), expected, strict=True):
        torch.testing.assert_close(g, e, atol=1e-9, rtol=1e-8)
    for m in mods.values():  # a quantised layer that does not say its shape: explained
        if hasattr(m, "out_features") and hasattr(m, "lora_A"):
            del m.out_features
    with pytest.raises(AnchorError, match="packed"):
        AnchoredOptimizer(torch.optim.SGD(params, lr=0.0), model, anchors)


def test_dora_on_a_quantised_base_is_refused():
    model, _ = peft_model(_lora(use_dora=True))
    _fake_packed_base(model)
    with pytest.raises(AnchorError, match="DoRA on a quantized base"):
        find_targets(model, make_anchors(None, DIMS, rank=RANK)[0])


@pytest.mark.skipif(
    importlib.util.find_spec("bitsandbytes") is None and not os.environ.get("CI"),
    reason="bitsandbytes not installed (optional here; CI installs it from requirements-ci.txt and runs this)",
)
def test_qlora_4bit_bitsandbytes_is_exact():
    import bitsandbytes as bnb

    base = tiny_llama(0, torch.float32, size="wide")
    attn = base.model.layers[0].self_attn
    for n in QV:
        lin = getattr(attn, n)
        q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=False, compute_dtype=torch.float32, quant_type="nf4")
        q.weight = bnb.nn.Params4bit(lin.weight.detach().clone(), requires_grad=False, quant_type="nf4")
        setattr(attn, n, q.to("cpu"))
    torch.manual_seed(1)
    model = peft.get_peft_model(base, _lora())
    for n, p in model.named_parameters():
        if "lora_" in n:
            p.data = p.data.to(D)
    mods = hf_modules(model)
    assert type(mods[Q].get_base_layer().weight).__name__ == "Params4bit"
    anchors, oracle = make_anchors(None, DIMS, rank=RANK)
    params = trainable(model)
    opt = AnchoredOptimizer(torch.optim.SGD(params, lr=0.0), model, anchors, anchor_lambda=0.7)
    assert {t.kind for t in opt.targets} == {"lora"}
    # Oracle: the dequantised merged weight minus the dequantised base, i.e. what PEFT merges.
    deq = {n: bnb.functional.dequantize_4bit(m.get_base_layer().weight.data, m.get_base_layer().weight.quant_state).to(D)
           for n, m in ((n, mods[n]) for n in DIMS)}
    expected_loss = 0.7 * sum(ref.penalty_of(ref.lora_delta(mods[n]), *oracle[n]) for n in DIMS)
    expected = torch.autograd.grad(expected_loss, params)
    for g, e in zip(optimizer_grads(opt, params), expected, strict=True):
        torch.testing.assert_close(g, e, atol=1e-9, rtol=1e-8)
    x = torch.eye(16, dtype=torch.float32)
    with torch.no_grad():  # the oracle's ΔW is what the quantised layer adds in its forward pass
        for n in DIMS:
            got = mods[n](x).T.to(D) - deq[n]
            torch.testing.assert_close(got, ref.lora_delta(mods[n]).detach(), atol=1e-4, rtol=1e-4)


# -- refused rows --------------------------------------------------------------------------

REFUSED_ROWS = {
    "oft": lambda: peft.OFTConfig(r=0, oft_block_size=4, target_modules=QV),
    "boft": lambda: peft.BOFTConfig(boft_block_size=4, target_modules=QV),
    "hra": lambda: peft.HRAConfig(r=2, target_modules=QV),
    "hira": lambda: peft.HiraConfig(target_modules=QV),
    "ia3": lambda: peft.IA3Config(target_modules=QV, feedforward_modules=[]),
    "ln_tuning": lambda: peft.LNTuningConfig(target_modules=QV),
    "miss": lambda: peft.MissConfig(r=4, target_modules=QV),
    "lily": lambda: peft.LilyConfig(target_modules=QV),
    "shira": lambda: peft.ShiraConfig(r=2, target_modules=QV),
    "deft": lambda: peft.DeftConfig(target_modules=QV),
    "glora": lambda: peft.GloraConfig(target_modules=QV),
    "beft": lambda: peft.BeftConfig(target_modules=QV),
    "shadow": lambda: peft.ShadowConfig(target_modules=QV),
}


@pytest.mark.parametrize("row", list(REFUSED_ROWS))
def test_refused_tuner_names_itself(row):
    assert row in REFUSED
    model, _ = peft_model(REFUSED_ROWS[row]())
    anchors, _ = make_anchors(None, DIMS, rank=RANK)
    with pytest.raises(AnchorError, match=rf"PEFT tuner '{row}'.*not supported.*anchors"):
        AnchoredOptimizer(torch.optim.SGD(trainable(model) or [nn.Parameter(torch.zeros(1))], lr=0.0), model, anchors)
    with pytest.raises(AnchorError, match=rf"PEFT tuner '{row}'"):
        anchor_penalty(model, anchors)


@pytest.mark.parametrize("variant", ["alora", "kasa"])
def test_lora_variants_with_another_delta_are_refused(variant):
    kw = {"alora": dict(alora_invocation_tokens=[3], task_type="CAUSAL_LM"), "kasa": dict(kasa_config=peft.KasaConfig())}
    model, _ = peft_model(_lora(**kw[variant]))
    with pytest.raises(AnchorError, match="LoRA variant .*Variant.*not supported"):
        find_targets(model, make_anchors(None, DIMS, rank=RANK)[0])


def test_prompt_tuning_is_refused_naming_the_method():
    model, _ = peft_model(peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    anchors, _ = make_anchors(None, DIMS, rank=RANK)
    with pytest.raises(AnchorError, match="PROMPT_TUNING.*no ΔW"):
        AnchoredOptimizer(torch.optim.SGD(trainable(model), lr=0.0), model, anchors)


# -- the issue's routes (tiny Llama, two q/v layers, AnchoredAdamW, float32) -------------------

def _route_model(config, init_dtype=torch.float32):
    base = tiny_llama(0, init_dtype, size="integration")
    original = copy.deepcopy(base)
    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(base, config), original


def _route_penalties(model, start, anchors_raw):
    """Raw ‖RΔW‖² per weight from the forward-pass oracle (R = I - C, safelora C = VVᵀ/‖V‖)."""
    mods = hf_modules(model)
    with torch.no_grad():
        return {
            n: ref.penalty_of((forward_weight(mods[n], w0.shape[1], w0.dtype) - w0).double(), anchors_raw[n].double(), "safelora")
            for n, w0 in start.items()
        }


@pytest.mark.parametrize("route", ["adalora", "pissa"])
def test_issue_route_trains_with_the_exact_penalty(route):
    """AdaLoRA used to raise AttributeError; PiSSA used to start at penalty 2.17 instead of 0."""
    from asft_optim import AnchoredAdamW

    cfg = {
        "adalora": peft.AdaLoraConfig(init_r=4, target_r=2, total_step=10, target_modules=list(TARGETS)),
        "pissa": peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights="pissa", target_modules=list(TARGETS)),
    }[route]
    model, original = _route_model(cfg)
    names = sorted(anchor_deltas(model))
    raw = anchor_deltas(model)
    anchors = Anchors.from_deltas(raw, "safelora")
    start = origin_of(model if route == "pissa" else original, names, torch.float32)
    opt = AnchoredAdamW(model, anchors, anchor_lambda=1.0, lr=1e-2)
    seen = []
    for ids in token_batches(3):
        expected = _route_penalties(model, start, raw)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
        stats = opt.anchor_stats()
        for n in names:
            assert stats[n]["raw_penalty"] == pytest.approx(float(expected[n]), rel=1e-4, abs=1e-9)
        seen.append(sum(s["raw_penalty"] for s in stats.values()))
    # Both start with ΔW = 0 (AdaLoRA's E is 0; PiSSA's B·A ≠ 0 is its origin), then it grows.
    assert seen[0] < 1e-9 < seen[-1]


def test_lora_without_a_reachable_peft_config_warns():
    """LoRA layers without the config that says PiSSA or not (PEFT's inner model keeps a copy)."""
    model, _ = peft_model(ORIGIN["pissa"](), init_dtype=torch.float32)
    inner = model.get_base_model()
    targets, _ = find_targets(inner, make_anchors(None, DIMS, rank=RANK)[0])
    assert all(t.needs_origin for t in targets)  # found through the inner model's peft_config
    del inner.peft_config
    with pytest.warns(UserWarning, match="no peft_config.*PiSSA"):
        find_targets(inner, make_anchors(None, DIMS, rank=RANK)[0])


def test_safe_lora_refuses_an_adapter_with_an_origin():
    from asft_optim import safe_lora_project

    model, _ = peft_model(ORIGIN["pissa"](), init_dtype=torch.float32)
    with pytest.raises(AnchorError, match="Safe LoRA.*PiSSA"):
        safe_lora_project(model, make_anchors(None, DIMS, rank=RANK)[0])


def test_bind_reads_the_shape_of_a_quantised_layer():
    model, _ = peft_model(_lora())
    _fake_packed_base(model)
    anchors, _ = make_anchors(None, DIMS, rank=RANK)
    assert sorted(anchors.bind(model, warn=False).found) == sorted(DIMS)


def test_pissa_on_gpt2_conv1d_is_measured_from_its_origin():
    """GPT-2 stores W as (in, out) (fan_in_fan_out): the origin B₀A₀ is still (out, in)."""
    base = tiny_gpt2(0, torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(
            base, peft.LoraConfig(r=2, lora_alpha=4, init_lora_weights="pissa", target_modules=["c_attn"], fan_in_fan_out=True)
        ).to(D)
    model.eval()
    name = "transformer.h.0.attn.c_attn.weight"
    start = origin_of(model, [name])
    anchors, oracle = make_anchors(None, {name: (24, 8)}, rank=RANK)
    params = trainable(model)
    opt = AnchoredOptimizer(torch.optim.SGD(params, lr=0.0), model, anchors, anchor_lambda=0.7)
    assert all(g.abs().max() < 1e-12 for g in optimizer_grads(opt, params))
    perturb(model, scale=0.05)
    assert_exact(model, start, anchors, oracle, origins={t.name: t.origin for t in opt.targets}, opt=opt)


def test_two_active_loha_adapters_are_summed():
    model, original = peft_model(EXACT["loha"]())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.add_adapter("second", peft.LoHaConfig(r=3, alpha=5, target_modules=["q_proj"]))
    model.base_model.set_adapter(["default", "second"])
    model.to(D)
    perturb(model)
    anchors, oracle = make_anchors(None, DIMS, rank=RANK)
    assert_exact(model, origin_of(original, DIMS), anchors, oracle)
