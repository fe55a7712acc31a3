"""Input-side anchors built from prompts on a tiny Llama: the hooks, the eigenproblems, the file."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from strategies import seeds
from tiny_models import INTEGRATION_VOCAB, assert_same_bases, join, split, tiny_llama

from asft_optim import AnchorError, Anchors
from asft_optim.activation_anchors import (
    anchors_from_covariances,
    build_input_anchors,
    contrast_directions,
    input_covariances,
    top_directions,
)
from asft_optim.input_anchors import InputAnchors

D = torch.float64
VOCAB = INTEGRATION_VOCAB
TARGETS = ["q_proj", "v_proj", "down_proj"]


def _llama():
    """tiny_models' ``integration`` Llama (width 32, two blocks) without a pad token."""
    return tiny_llama(0, D, size="integration", pad_token_id=None).eval()


@pytest.fixture(scope="module")
def model():
    return _llama()


def _prompts(seed, n=5):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB, (int(torch.randint(2, 9, (1,), generator=g)),), generator=g) for _ in range(n)]


def _right_padded(prompts, batch_size=3):
    """Batches padded on the right with token 0 (masked)."""
    out = []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i:i + batch_size]
        length = max(len(p) for p in chunk)
        ids = torch.zeros(len(chunk), length, dtype=torch.long)
        mask = torch.zeros(len(chunk), length, dtype=torch.long)
        for j, p in enumerate(chunk):
            ids[j, :len(p)], mask[j, :len(p)] = p, 1
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def test_hooks_capture_exactly_the_layer_inputs_on_unmasked_tokens(model):
    prompts = _prompts(1)
    batches = _right_padded(prompts)
    covs = input_covariances(model, batches, TARGETS)
    assert set(covs) == {f"model.layers.{i}.{m}.weight" for i in (0, 1)
                         for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")}
    n_tokens = sum(len(p) for p in prompts)
    assert all(c.tokens == n_tokens for c in covs.values())
    # Manual: the input of layer i's q/v projections is input_layernorm(hidden state i),
    # computed prompt by prompt without padding.
    want = {0: torch.zeros(32, 32, dtype=D), 1: torch.zeros(32, 32, dtype=D)}
    with torch.no_grad():
        for p in prompts:
            hidden = model(p[None], output_hidden_states=True).hidden_states
            for i in (0, 1):
                x = model.model.layers[i].input_layernorm(hidden[i])[0]
                want[i] += x.T @ x
    for i in (0, 1):
        for m in ("q_proj", "v_proj"):
            got = covs[f"model.layers.{i}.self_attn.{m}.weight"].total
            torch.testing.assert_close(got, want[i], rtol=1e-10, atol=1e-10)


def test_padding_is_masked_out_whatever_the_batching(model):
    prompts = _prompts(2, n=6)
    batched = input_covariances(model, _right_padded(prompts, batch_size=4), TARGETS)
    alone = input_covariances(model, [{"input_ids": p[None]} for p in prompts], TARGETS)  # no mask, no padding
    for name in batched:
        assert batched[name].tokens == alone[name].tokens
        torch.testing.assert_close(batched[name].total, alone[name].total, rtol=1e-10, atol=1e-10)
    # Counting the pad tokens would change it: the mask matters.
    unmasked = [{"input_ids": b["input_ids"]} for b in _right_padded(prompts, batch_size=4)]
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(input_covariances(model, unmasked, TARGETS)[name].total, batched[name].total)


def test_a_peft_model_anchors_the_wrapped_layers_and_sees_the_same_inputs(model):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(_llama(), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    batches = _right_padded(_prompts(3))
    got = input_covariances(peft_model, batches, ["q_proj", "v_proj"])
    ref = input_covariances(model, batches, ["q_proj", "v_proj"])
    assert set(got) == set(ref)
    for name in ref:
        torch.testing.assert_close(got[name].total, ref[name].total, rtol=1e-10, atol=1e-10)
    # Collected in eval mode (no dropout), then every module's mode is restored.
    peft_model.train()
    seen = []
    handle = peft_model.base_model.model.model.layers[0].self_attn.q_proj.register_forward_pre_hook(
        lambda m, args: seen.append(m.training))
    input_covariances(peft_model, batches, ["q_proj"])
    handle.remove()
    assert seen and not any(seen)
    assert all(m.training for m in peft_model.modules())


def _spd(seed, d, scale=1.0):
    x = torch.randn(3 * d, d, generator=torch.Generator().manual_seed(seed), dtype=D)
    return scale * x.T @ x / (3 * d)


@given(st.integers(2, 8), seeds, st.floats(1e-4, 1e-1))
def test_contrast_vectors_solve_the_generalised_eigenproblem(d, seed, eps):
    h, t = _spd(seed, d), _spd(seed + 1, d)
    k = max(1, d // 2)
    u, mu, v, kept = contrast_directions(h, t, rank=k, eps=eps)
    ridge = eps * float(torch.trace(t)) / d
    torch.testing.assert_close(h @ v, (t + ridge * torch.eye(d, dtype=D)) @ v * mu, rtol=1e-8, atol=1e-8)
    assert torch.all(mu[:-1] >= mu[1:])
    # The oracle: scipy-free, the eigenvalues of (Σ_t + εI)⁻¹ Σ_h (a non-symmetric matrix).
    ratio = torch.linalg.eigvals(torch.linalg.solve(t + ridge * torch.eye(d, dtype=D), h)).real
    ratio = ratio.sort(descending=True).values
    torch.testing.assert_close(mu, ratio[:k], rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(u.T @ u, torch.eye(k, dtype=D), rtol=0, atol=1e-10)
    torch.testing.assert_close(u @ (u.T @ v), v, rtol=1e-8, atol=1e-8)  # same span
    assert 0.0 < kept <= 1.0


def test_contrast_finds_the_harmful_only_direction_that_plain_misses():
    d = 6
    e = torch.eye(d, dtype=D)
    shared, harmful_only = e[:, 0:1], e[:, 3:4]
    task = 10.0 * shared @ shared.T + 0.01 * e
    harmful = 10.0 * shared @ shared.T + 1.0 * harmful_only @ harmful_only.T + 0.01 * e
    plain, _, _ = top_directions(harmful, rank=1)
    contrast, _, _, _ = contrast_directions(harmful, task, rank=1)
    assert abs(float(plain[:, 0] @ shared[:, 0])) > 0.999
    assert abs(float(contrast[:, 0] @ harmful_only[:, 0])) > 0.999


def test_top_directions_by_energy_and_rank():
    c = torch.diag(torch.tensor([5.0, 3.0, 1.0, 1.0], dtype=D))
    u, evals, kept = top_directions(c, energy=0.8)
    assert u.shape == (4, 2) and kept == pytest.approx(0.8) and evals.tolist() == [5.0, 3.0]
    assert top_directions(c, energy=0.81)[0].shape == (4, 3)
    with pytest.raises(AnchorError, match="rank 5 must be an int in"):
        top_directions(c, rank=5)
    with pytest.raises(AnchorError, match="give rank= or energy="):
        top_directions(c)


@pytest.mark.parametrize("contrast", [False, True])
def test_build_is_deterministic_and_fits_the_model(model, contrast):
    harmful = _right_padded(_prompts(4))
    task = _right_padded(_prompts(5)) if contrast else None
    a = build_input_anchors(model, harmful, target_modules=TARGETS, rank=3, task_batches=task, dtype=D)
    b = build_input_anchors(model, harmful, target_modules=TARGETS, rank=3, task_batches=task, dtype=D)
    assert list(a) == list(b) and a.metadata == b.metadata
    assert a.metadata["form"] == ("contrast" if contrast else "plain")
    for name, op in a.items():
        assert torch.equal(op.basis, b[name].basis)
        w = model.get_parameter(name)
        assert op.fits(tuple(w.shape)) is None and op.rank == 3
        assert op.orthonormality_error() < 1e-10


@pytest.mark.parametrize("contrast", [False, True])
def test_anchors_from_collected_covariances_are_the_build(model, contrast):
    harmful, task = _right_padded(_prompts(4)), _right_padded(_prompts(5)) if contrast else None
    built = build_input_anchors(model, harmful, target_modules=TARGETS, rank=3, task_batches=task, dtype=D)
    covs = input_covariances(model, harmful, TARGETS)
    tcovs = input_covariances(model, task, TARGETS) if contrast else None
    again = anchors_from_covariances(model, covs, tcovs, target_modules=TARGETS, rank=3, dtype=D)
    assert list(again) == list(built) and again.metadata == built.metadata
    assert all(torch.equal(again[n].basis, built[n].basis) for n in built)
    with pytest.raises(AnchorError, match="no covariance for"):
        anchors_from_covariances(model, dict(list(covs.items())[:1]), target_modules=TARGETS, rank=3)


def test_plain_anchors_hold_the_layer_output_on_the_prompts(model):
    """With k = all directions the prompts' inputs span, ‖ΔW U‖ = 0 means ΔW x = 0 on them."""
    prompts = _prompts(6, n=2)  # few tokens: rank < d_in
    batches = _right_padded(prompts)
    name = "model.layers.0.self_attn.q_proj.weight"
    anchors = build_input_anchors(model, batches, target_modules=["layers.0.self_attn.q_proj"], energy=1.0, dtype=D)
    u = anchors[name].basis
    delta = torch.randn(32, 32, dtype=D) @ (torch.eye(32, dtype=D) - u @ u.T)
    with torch.no_grad():
        x = model.model.layers[0].input_layernorm(model.model.embed_tokens(prompts[0][None]))[0]
    assert float((x @ delta.T).abs().max()) < 1e-8


def test_bad_inputs_name_the_fix(model):
    with pytest.raises(AnchorError, match="no batch of prompts"):
        input_covariances(model, [], TARGETS)
    masked = [{"input_ids": torch.ones(1, 3, dtype=torch.long), "attention_mask": torch.zeros(1, 3, dtype=torch.long)}]
    with pytest.raises(AnchorError, match="no unmasked token reached"):
        input_covariances(model, masked, TARGETS)
    with pytest.raises(AnchorError, match="embedding reads token ids"):
        input_covariances(model, masked, ["embed_tokens"])
    with pytest.raises(AnchorError, match="matches target_modules"):
        input_covariances(model, masked, ["nothing_here"])
    with pytest.raises(AnchorError, match="dtype"):
        build_input_anchors(model, masked, target_modules=TARGETS, rank=1, dtype=torch.int8)


# -- the file -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def built(model):
    return build_input_anchors(model, _right_padded(_prompts(7)), target_modules=TARGETS, rank=2)


def test_round_trip_is_exact_and_marks_the_side(built, tmp_path):
    path = tmp_path / "in.anchors.safetensors"
    built.save(path)
    loaded = InputAnchors.load(path)
    assert_same_bases(loaded, built, "d_out")
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["side"] == "input" and meta["format"] == "asft-anchors"
    assert all(e["side"] == "input" for e in json.loads(meta["weights"]).values())


def test_each_reader_refuses_the_other_side(built, tmp_path):
    path = tmp_path / "in.anchors.safetensors"
    built.save(path)
    with pytest.raises(AnchorError, match="input-side anchors, not output-side ones; load it with InputAnchors.load"):
        Anchors.load(path)
    out = tmp_path / "out.anchors.safetensors"
    Anchors.from_deltas({"w.weight": torch.randn(4, 3)}, "orthogonal", rank=2).save(out)
    with pytest.raises(AnchorError, match="output-side anchors, not input-side ones; load it with Anchors.load"):
        InputAnchors.load(out)


def test_edited_files_are_refused(built, tmp_path):
    path = tmp_path / "in.anchors.safetensors"
    built.save(path)
    header, body = split(path.read_bytes())
    name = sorted(k for k in header if k != "__metadata__")[0]

    def edited(fn, match):
        h = json.loads(json.dumps(header))
        b = fn(h, bytearray(body))
        path.write_bytes(join(h, bytes(b if b is not None else body)))
        with pytest.raises(AnchorError, match=match):
            InputAnchors.load(path)

    def flip_byte(h, b):
        b[-1] ^= 0xFF
        return b

    def bad_rank(h, b):
        w = json.loads(h["__metadata__"]["weights"])
        w[name]["rank"] = 0
        h["__metadata__"]["weights"] = json.dumps(w)

    def other_version(h, b):
        h["__metadata__"]["format_version"] = "9"

    def drop_weight(h, b):
        w = json.loads(h["__metadata__"]["weights"])
        del w[name]
        h["__metadata__"]["weights"] = json.dumps(w)

    edited(flip_byte, "checksum mismatch")
    edited(bad_rank, "bad rank")
    edited(other_version, "unsupported input-side format version")
    edited(drop_weight, "tensors and metadata disagree")


# -- prompts as inputs ------------------------------------------------------------------


def _word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = "<pad> <user> <assistant> how do i bake bread pick a lock ?".split()
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>")
    fast.chat_template = (
        "{% for m in messages %}<user> {{ m['content'] }} {% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    return fast


def test_prompt_ids_use_the_chat_template_and_batches_pad_right():
    from asft_optim.prompt_tokens import prompt_ids, right_padded_batches

    tok = _word_tokenizer()
    ids = prompt_ids(tok, ["how do i bake bread ?", "pick a lock ?"])
    assert [t.tolist() for t in ids] == [[1, 3, 4, 5, 6, 7, 11, 2], [1, 8, 9, 10, 11, 2]]
    assert [t.tolist() for t in prompt_ids(tok, ["pick a lock ?"], chat_template=False)] == [[8, 9, 10, 11]]
    [batch] = right_padded_batches(ids, batch_size=2)
    assert batch["input_ids"].tolist() == [[1, 3, 4, 5, 6, 7, 11, 2], [1, 8, 9, 10, 11, 2, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1] * 8, [1] * 6 + [0, 0]]
    assert len(right_padded_batches(ids * 3, batch_size=4)) == 2
    with pytest.raises(AnchorError, match="no prompt"):
        prompt_ids(tok, [])
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        right_padded_batches(ids, batch_size=0)


def test_the_container_checks_each_basis_against_its_weight(built):
    from asft_optim.input_projection import InputProjection
    from asft_optim.layout import WeightInfo

    name = next(iter(built))
    op = built[name]
    with pytest.raises(AnchorError, match=f"{name}: input-side anchor fits a weight"):
        InputAnchors({name: op}, weights={name: WeightInfo((op.d_out, op.d_in + 1))})
    with pytest.raises(AnchorError, match="input anchors are empty"):
        InputAnchors({})
    gpt2_style = InputAnchors({name: op}, weights={name: WeightInfo((op.d_in, op.d_out), "in_out")})
    assert gpt2_style.weights[name].out_in_shape == (op.d_out, op.d_in)
    mixed = InputAnchors({name: op, "x.weight": InputProjection(op.basis.double(), op.d_out)})
    with pytest.raises(AnchorError, match="mix storage dtypes"):
        mixed.save("unused.safetensors")
    assert built.to(dtype=D)[name].basis.dtype == D
    assert {row["side"] for row in built.summary()} == {"input"}


def test_a_token_mask_leaves_a_shared_prefix_out_of_the_statistics(model):
    from asft_optim.prompt_tokens import right_padded_batches, shared_prefix_length

    prefix = torch.tensor([5, 6, 7])
    prompts = [torch.cat([prefix, p]) for p in _prompts(8, n=4)]
    skip = shared_prefix_length(prompts)
    assert skip >= 3 and shared_prefix_length([torch.tensor([1, 2]), torch.tensor([3])]) == 0
    batches = right_padded_batches(prompts, batch_size=3, skip_prefix=skip)
    assert all(torch.equal(b["token_mask"][:, :skip], torch.zeros_like(b["token_mask"][:, :skip])) for b in batches)
    name = "model.layers.0.self_attn.q_proj.weight"
    got = input_covariances(model, batches, ["layers.0.self_attn.q_proj"])[name]
    want = torch.zeros(32, 32, dtype=D)
    with torch.no_grad():
        for p in prompts:  # the layer's input on the tokens after the prefix, computed by hand
            x = model.model.layers[0].input_layernorm(model.model.embed_tokens(p[None]))[0, skip:]
            want += x.T @ x
    assert got.tokens == sum(len(p) - skip for p in prompts)
    torch.testing.assert_close(got.total, want, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="skip_prefix must be an int"):
        right_padded_batches(prompts, skip_prefix=100)
