"""The lab's safety score for ``asft landscape`` (its default ``--score``).

It lives in the lab, not in :mod:`asft_optim.landscape_cli`: the landscape takes any
``--score MODULE:FACTORY`` and names this one only as a string
(:data:`~asft_optim.landscape_cli.DEFAULT_SCORE`), so the library never imports the lab.
"""

from __future__ import annotations

__all__ = ["lab_harmful_score"]


def lab_harmful_score(aligned_dir: str):
    """The lab's harmful score (%): greedy answers to the default world's held-out harmful
    prompts, flagged by the refusal judge, exactly as ``asft lab`` evaluates HS.

    The tokenizer is read from ``aligned_dir`` (lab checkpoints carry theirs).
    """
    from transformers import PreTrainedTokenizerFast

    from .config import default_config
    from .evaluate import HARMFUL_NEW_TOKENS, generate, harmful_score
    from .judge import get_judge
    from .tokenizer import format_prompt
    from .world import World

    prompts = list(World(default_config().world).data().harmful_eval)
    formatted = [format_prompt(p) for p in prompts]
    tokenizer = PreTrainedTokenizerFast.from_pretrained(aligned_dir)
    judge = get_judge("refusal")

    def score(model) -> float:
        responses = generate(model, tokenizer, formatted, HARMFUL_NEW_TOKENS, progress=False)
        return harmful_score(judge.is_harmful(prompts, responses))

    return score
