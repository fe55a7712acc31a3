"""The pretrained preset's training loss: the LM head at the answer positions only.

Oracle: the full-logits causal-LM loss written out in float64 (every position projected,
shifted by one, cross-entropy over the labelled tokens), differentiated by autograd.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import LlamaConfig, LlamaForCausalLM

from asft_optim.lab.models import answer_loss


def _model(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=61, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).double()


def _oracle(model, inputs, num_items=None):
    logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    logits, target = logits[:, :-1].reshape(-1, logits.shape[-1]), inputs["labels"][:, 1:].reshape(-1)
    keep = target != -100
    loss = F.cross_entropy(logits[keep], target[keep], reduction="sum")
    return loss / (keep.sum() if num_items is None else num_items)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**16), batch=st.integers(1, 4), length=st.integers(3, 12), data=st.data())
def test_answer_loss_and_its_gradient_match_the_full_logits_loss(seed, batch, length, data):
    model = _model(seed)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 61, (batch, length), generator=g)
    lengths = [data.draw(st.integers(2, length)) for _ in range(batch)]  # right padding
    starts = [data.draw(st.integers(1, n - 1)) for n in lengths]  # first answer token
    labels = torch.full_like(ids, -100)
    mask = torch.zeros_like(ids)
    for i, (n, a) in enumerate(zip(lengths, starts)):
        labels[i, a:n] = ids[i, a:n]
        mask[i, :n] = 1
    inputs = {"input_ids": ids, "labels": labels, "attention_mask": mask}
    num_items = data.draw(st.none() | st.integers(1, 50))

    got = answer_loss(model, inputs, num_items)
    got_grads = torch.autograd.grad(got, list(model.parameters()))
    want = _oracle(model, inputs, num_items)
    want_grads = torch.autograd.grad(want, list(model.parameters()))
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_a_batch_without_answer_tokens_gives_zero_not_nan():
    model = _model(0)
    ids = torch.randint(0, 61, (2, 5))
    inputs = {"input_ids": ids, "labels": torch.full_like(ids, -100), "attention_mask": torch.ones_like(ids)}
    loss = answer_loss(model, inputs)
    assert loss.item() == 0.0
    loss.backward()  # still differentiable: a step on it changes nothing


def test_num_items_as_a_tensor_divides_like_the_trainer():
    model = _model(1)
    ids = torch.randint(0, 61, (2, 6))
    labels = ids.clone()
    labels[:, :3] = -100
    inputs = {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}
    torch.testing.assert_close(answer_loss(model, inputs, torch.tensor(12)), _oracle(model, inputs, 12))
