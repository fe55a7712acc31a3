"""FA scoring of the pretrained preset: the shared prompt prefix runs once.

Oracle: each prompt alone, unpadded, through the model in float64, the logits of the
label tokens at its last position.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import LlamaConfig, LlamaForCausalLM

from asft_optim.lab.evaluate import label_logits, score_labels
from asft_optim.lab.tokenizer import prompt_ids


class _Tok:
    """A character tokenizer with a chat template (so no ``<s>`` is prepended)."""

    chat_template = "x"
    pad_token_id = 0
    bos_token_id = 1

    def encode(self, text, add_special_tokens=False):
        return [2 + (ord(c) % 40) for c in text]


def _model(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=48, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(cfg).double().eval()


def _oracle(model, tok, prompts, tokens):
    rows = []
    for p in prompts:
        ids = torch.tensor([prompt_ids(tok, p)])
        with torch.no_grad():
            rows.append(model(input_ids=ids).logits[0, -1, list(tokens)])
    return torch.stack(rows)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**16), prefix=st.text("abcdefgh", min_size=0, max_size=12),
       own=st.lists(st.text("abcdefghij", min_size=1, max_size=9), min_size=1, max_size=7),
       batch=st.integers(1, 4))
def test_shared_prefix_scores_equal_each_prompt_alone(seed, prefix, own, batch):
    model, tok = _model(seed), _Tok()
    prompts = [prefix + o for o in own]
    tokens = [3, 7, 11, 20]
    want = _oracle(model, tok, prompts, tokens)
    for shared in (True, False):
        got = label_logits(model, tok, prompts, tokens, batch_size=batch, shared_prefix=shared, progress=False)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_score_labels_picks_the_highest_first_token_and_checks_labels():
    model, tok = _model(0), _Tok()
    prompts = ["sys: classify: " + t for t in ("one", "three", "five words", "x")]
    labels = ["A", "B", "C", "D"]
    first = [tok.encode(y)[0] for y in labels]
    want = _oracle(model, tok, prompts, first).argmax(-1).tolist()
    assert score_labels(model, tok, prompts, labels, batch_size=3, progress=False) == [labels[k] for k in want]
    assert score_labels(model, tok, [], labels, progress=False) == []
    with pytest.raises(ValueError, match="share a first token"):
        score_labels(model, tok, prompts, ["Aa", "Ab"], progress=False)
