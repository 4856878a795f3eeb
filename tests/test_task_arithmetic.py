"""The arithmetic task's held-out split (issue 26): benchmarks/rlvr.py measures exact match on
prompts that neither SFT nor RL trains on, and compares runs across seeds and commits, so the
split must be disjoint from the training prompts and the same in every process."""

from __future__ import annotations

from lit_p3o import EvaluationSpec, RolloutSpec
from lit_p3o.tasks import arithmetic


def test_held_out_prompts_are_disjoint_from_everything_trained_on():
    train, test = set(arithmetic.prompts("train", 1000)), set(arithmetic.prompts("test", 1000))
    assert not train & test and len(train | test) == 200
    for seed in range(3):
        assert {row["prompt"] for row in arithmetic.sft_corpus(2000, seed)} <= train
    # RL draws its prompts from the training split and evaluates on the held-out one by default
    assert RolloutSpec().split == "train" and EvaluationSpec().split == "test"


def test_split_and_order_are_pinned():
    """Fixed by hash and a named seed, not by Python's per-process ``hash``: a change here
    silently changes which prompts every earlier report was measured on."""
    assert arithmetic.prompts("test", 4) == ["what is 2 - 1 ?", "what is 4 - 4 ?", "what is 1 - 9 ?", "what is 2 + 7 ?"]
    assert arithmetic.prompts("train", 3) == ["what is 5 + 3 ?", "what is 2 + 5 ?", "what is 3 - 4 ?"]
    assert len(set(arithmetic.prompts("test", 1000))) == 51
    assert arithmetic.prompts("test", 60) == arithmetic.prompts("test", 60)
