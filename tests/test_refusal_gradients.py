"""Safety subspaces from the aligned model's own greedy refusals, on a tiny Llama (float64)."""

from __future__ import annotations

import pytest
import torch
from tiny_models import INTEGRATION_VOCAB, assert_same_bases, tiny_llama

from asft_optim.projection import AnchorError
from asft_optim.refusal_gradients import greedy_refusals, refusal_grams, refusal_subspaces
from asft_optim.safety_subspace import subspace_from_gram

D = torch.float64
VOCAB = INTEGRATION_VOCAB
TARGETS = ["q_proj", "down_proj"]


def _llama():
    """tiny_models' ``integration`` Llama (width 32, two blocks) without a pad token."""
    return tiny_llama(0, D, size="integration", pad_token_id=None)


@pytest.fixture(scope="module")
def model():
    return _llama()


def _prompts(seed, n=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB, (4 + i,), generator=g) for i in range(n)]


def test_greedy_refusals_are_the_argmax_continuations_with_the_prompt_masked(model):
    prompts = _prompts(0)
    examples = greedy_refusals(model, prompts, max_new_tokens=4, eos_token_id=VOCAB + 1)  # never emitted
    for p, ex in zip(prompts, examples, strict=True):
        seq = p.clone()
        with torch.no_grad():
            for _ in range(4):  # the oracle: argmax, one token at a time, no cache
                seq = torch.cat([seq, model(seq[None]).logits[0, -1].argmax()[None]])
        assert torch.equal(ex["input_ids"][0], seq)
        assert torch.equal(ex["labels"][0, : len(p)], torch.full((len(p),), -100))
        assert torch.equal(ex["labels"][0, len(p):], seq[len(p):])


def test_an_answer_stops_at_eos_and_keeps_it(model):
    [p] = _prompts(1, n=1)
    [full] = greedy_refusals(model, [p], max_new_tokens=4, eos_token_id=VOCAB + 1)
    first = int(full["input_ids"][0, len(p)])
    [ex] = greedy_refusals(model, [p], max_new_tokens=4, eos_token_id=first)
    assert ex["input_ids"].shape[1] == len(p) + 1 and int(ex["labels"][0, -1]) == first


def test_subspaces_span_the_per_example_gradients_and_the_model_is_restored(model):
    examples = greedy_refusals(model, _prompts(2), max_new_tokens=3, eos_token_id=VOCAB + 1)
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    model.get_parameter("model.layers.0.self_attn.q_proj.weight").requires_grad_(False)
    subs = refusal_subspaces(model, examples, target_modules=TARGETS, rank=2, dtype=D)
    assert not model.get_parameter("model.layers.0.self_attn.q_proj.weight").requires_grad
    model.get_parameter("model.layers.0.self_attn.q_proj.weight").requires_grad_(True)
    assert all(m.training for m in model.modules())
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert len(subs) == 4
    # Oracle: per-example .grad from backward() on a fresh copy in eval mode, stacked, SVD'd.
    oracle = _llama().eval()
    for name, sub in subs.items():
        grads = []
        for ex in examples:
            oracle.zero_grad()
            oracle(**ex).loss.backward()
            grads.append(oracle.get_parameter(name).grad.clone())
        u = torch.linalg.svd(torch.cat(grads, 1), full_matrices=False).U[:, :2]
        torch.testing.assert_close(sub.basis @ sub.basis.T, u @ u.T, atol=1e-8, rtol=0)
        w = oracle.get_parameter(name)
        assert sub.fits(tuple(w.shape)) is None


def test_grams_are_the_per_example_gradients_second_moment_and_what_subspaces_cut(model):
    examples = greedy_refusals(model, _prompts(3), max_new_tokens=3, eos_token_id=VOCAB + 1)
    grams, infos, n = refusal_grams(model, examples, target_modules=TARGETS)
    subs = refusal_subspaces(model, examples, target_modules=TARGETS, rank=2, dtype=D)
    assert n == 3 and list(grams) == list(subs) == list(infos)
    oracle = _llama().eval()
    for name, gram in grams.items():
        total = torch.zeros_like(gram)
        for ex in examples:  # Σ_i G_i G_iᵀ from .grad of each example's backward()
            oracle.zero_grad()
            oracle(**ex).loss.backward()
            g = oracle.get_parameter(name).grad.double()
            total += g @ g.T
        torch.testing.assert_close(gram, total, atol=1e-10, rtol=1e-8)
        assert infos[name].shape == tuple(oracle.get_parameter(name).shape)
        assert torch.equal(subs[name].basis, subspace_from_gram(gram, rank=2).basis.to(D))


def test_bad_inputs_name_the_fix(model):
    with pytest.raises(AnchorError, match="no harmful prompt"):
        greedy_refusals(model, [])
    with pytest.raises(AnchorError, match="no refusal example"):
        refusal_subspaces(model, [], target_modules=TARGETS, rank=1)
    only_q = lambda m, e: m.model.layers[0].self_attn.q_proj(torch.ones(1, 32, dtype=D)).sum()  # noqa: E731
    with pytest.raises(AnchorError, match="layers.0.mlp.down_proj.weight: the refusal loss does not reach"):
        refusal_subspaces(model, [{}], target_modules=TARGETS, rank=1, loss_fn=only_q)


def test_file_round_trip_marks_the_gradient_side_and_readers_refuse_other_sides(model, tmp_path):
    from asft_optim import Anchors
    from asft_optim.input_anchors import InputAnchors
    from asft_optim.refusal_gradients import SafetySubspaces

    examples = greedy_refusals(model, _prompts(3, n=2), max_new_tokens=2, eos_token_id=VOCAB + 1)
    subs = refusal_subspaces(model, examples, target_modules=TARGETS, energy=0.9)
    path = tmp_path / "g.anchors.safetensors"
    subs.save(path)
    loaded = SafetySubspaces.load(path)
    assert_same_bases(loaded, subs, "d_in")
    with pytest.raises(AnchorError, match="gradient-side anchors, not input-side ones; load it with SafetySub"):
        InputAnchors.load(path)
    with pytest.raises(AnchorError, match="gradient-side anchors, not output-side ones"):
        Anchors.load(path)
