"""Embedded synthetic tasks: a prompt set, an SFT corpus, a tokenizer and a gold reward in one
place, so the whole pipeline runs without downloads. Config strings name them as
``"embedded:<task>"`` wherever a dataset, prompt source or tokenizer is expected."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

from transformers import PreTrainedTokenizerFast

from lit_p3o.errors import SourceError
from lit_p3o.tasks.arithmetic import ArithmeticTask
from lit_p3o.tasks.reviews import ReviewsTask

EMBEDDED_PREFIX = "embedded:"


class Task(Protocol):
    """What the library uses from an embedded task."""

    name: str
    max_prompt_tokens: int
    max_response_tokens: int

    def build_tokenizer(self) -> PreTrainedTokenizerFast: ...

    def sft_corpus(self, n: int, seed: int = 0) -> list[dict[str, str]]: ...

    def prompts(self, split: str, n: int) -> list[str]: ...

    def gold_reward(self, prompt: str, response: str, ended_with_eos: bool) -> float: ...

    def gold_reward_batch(
        self, prompts: Sequence[str], responses: Sequence[str], ended: Sequence[bool]
    ) -> list[float]: ...

    def is_grammatical(self, response: str) -> bool: ...

    # optional: ``prompt_columns(prompt) -> dict`` gives a prompt's extra columns (e.g. a
    # reference answer) to Python reward functions (see lit_p3o.data.prompts.Prompt)


TASKS: dict[str, Callable[[], Task]] = {ReviewsTask.name: ReviewsTask, ArithmeticTask.name: ArithmeticTask}


def get_task(name: str) -> Task:
    """The embedded task called ``name``."""
    if name not in TASKS:
        known = ", ".join(sorted(TASKS))
        raise SourceError(f"{EMBEDDED_PREFIX}{name}", f"unknown embedded task {name!r}; known tasks: {known}")
    return TASKS[name]()


def resolve_embedded(spec: Any) -> Task | None:
    """The task for ``"embedded:<name>"``, None for any other string (a path or hub name) or
    object (a dataset, a list of prompts)."""
    if not isinstance(spec, str) or not spec.startswith(EMBEDDED_PREFIX):
        return None
    return get_task(spec[len(EMBEDDED_PREFIX) :])
