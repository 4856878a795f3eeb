"""The embedded "arithmetic" task: a verifiable task for RL with verifiable rewards (RLVR).

A prompt asks for a sum or difference of two integers in ``0..MAX_OPERAND``
(``"what is 12 + 7 ?"``); a response is the result as one word (``"19"``). The reward needs
no model: :func:`exact_match` (a Python reward function in TRL's ``reward_funcs`` form) gives
1 when the completion is the reference ``answer`` and 0 otherwise; the gold reward is the same
check, 0 for a response that did not end. The SFT corpus is noisy on purpose (a share
``WRONG_SHARE`` of its answers is off by one or two), so an SFT policy is often wrong and RL
against the exact-match reward has something to fix. Everything is deterministic.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Sequence
from typing import Any

from transformers import PreTrainedTokenizerFast

from lit_p3o.tasks.words import word_tokenizer

MAX_OPERAND = 9
OPERATORS = ("+", "-")
WRONG_SHARE = 0.3
TEST_SHARE = 5  # one prompt in TEST_SHARE (by hash) is held out for evaluation
_PROMPT = re.compile(r"what is (\d+) ([+-]) (\d+) \?")


def answer(prompt: str) -> int:
    """The result a prompt asks for; a prompt outside the task raises ``ValueError``."""
    match = _PROMPT.fullmatch(prompt.strip())
    if match is None:
        raise ValueError(f"arithmetic task: {prompt!r} is not a prompt of the task ('what is A + B ?')")
    a, op, b = int(match[1]), match[2], int(match[3])
    return a + b if op == "+" else a - b


def exact_match(
    prompts: Sequence[str], completions: Sequence[str], answer: Sequence[Any] | None = None, **kwargs: Any
) -> list[float | None]:
    """1.0 where the completion (stripped) is the row's ``answer`` column, else 0.0; None where
    a row has no answer (the RL stage then skips that update, as for any non-finite reward)."""
    answers = answer if answer is not None else [None] * len(completions)
    return [None if a is None else float(c.strip() == str(a).strip()) for c, a in zip(completions, answers)]


def _all_prompts() -> list[str]:
    return [
        f"what is {a} {op} {b} ?" for a in range(MAX_OPERAND + 1) for op in OPERATORS for b in range(MAX_OPERAND + 1)
    ]


def _split(split: str) -> list[str]:
    if split not in ("train", "test"):
        raise ValueError(f"arithmetic task: split must be 'train' or 'test', got {split!r}")
    held_out = lambda p: int(hashlib.sha256(p.encode()).hexdigest(), 16) % TEST_SHARE == 0  # noqa: E731
    pool = [p for p in _all_prompts() if held_out(p) == (split == "test")]
    return random.Random(f"arithmetic-{split}").sample(pool, len(pool))


def prompts(split: str, n: int) -> list[str]:
    """``n`` prompts of ``split`` (train 149, test 51, disjoint), in a fixed shuffled order,
    repeating the split from its start when ``n`` is larger."""
    if n < 0:
        raise ValueError(f"arithmetic task: number of prompts must be >= 0, got {n}")
    pool = _split(split)
    return [pool[i % len(pool)] for i in range(n)]


def sft_corpus(n: int, seed: int = 0) -> list[dict[str, str]]:
    """``n`` training prompts with answers, a share ``WRONG_SHARE`` of them off by 1 or 2."""
    rng = random.Random(seed)
    corpus = []
    for prompt in prompts("train", n):
        value = answer(prompt)
        if rng.random() < WRONG_SHARE:
            value += rng.choice((-2, -1, 1, 2))
        corpus.append({"prompt": prompt, "completion": str(value)})
    return corpus


def vocabulary() -> list[str]:
    numbers = [str(i) for i in range(-MAX_OPERAND - 2, 2 * MAX_OPERAND + 3)]
    return ["what", "is", "?", *OPERATORS, *numbers]


def gold_reward(prompt: str, response: str, ended_with_eos: bool) -> float:
    """1.0 for the exact answer followed by EOS, else 0.0."""
    return float(ended_with_eos and response.strip() == str(answer(prompt)))


class ArithmeticTask:
    """The arithmetic task behind ``"embedded:arithmetic"``; see the module docstring."""

    name = "arithmetic"
    max_prompt_tokens = 5
    max_response_tokens = 2  # the number and EOS

    def build_tokenizer(self) -> PreTrainedTokenizerFast:
        return word_tokenizer(vocabulary())

    def sft_corpus(self, n: int, seed: int = 0) -> list[dict[str, str]]:
        return sft_corpus(n, seed)

    def prompts(self, split: str, n: int) -> list[str]:
        return prompts(split, n)

    def prompt_columns(self, prompt: str) -> dict[str, Any]:
        """The reference ``answer`` column that :func:`exact_match` reads."""
        return {"answer": str(answer(prompt))}

    def gold_reward(self, prompt: str, response: str, ended_with_eos: bool) -> float:
        return gold_reward(prompt, response, ended_with_eos)

    def gold_reward_batch(self, prompts: Sequence[str], responses: Sequence[str], ended: Sequence[bool]) -> list[float]:
        if not len(prompts) == len(responses) == len(ended):
            raise ValueError(
                f"gold_reward_batch: {len(prompts)} prompts, {len(responses)} responses, {len(ended)} ended flags"
            )
        return [gold_reward(p, r, e) for p, r, e in zip(prompts, responses, ended)]

    def is_grammatical(self, response: str) -> bool:
        return bool(re.fullmatch(r"-?\d+", response.strip()))
