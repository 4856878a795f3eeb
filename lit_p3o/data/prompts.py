"""Prompt sets for rollouts and evaluation: the embedded task's, or any dataset's prompts."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from transformers import PreTrainedTokenizerBase

from lit_p3o.data.formats import parse_preferences, parse_prompts, render_user_turn
from lit_p3o.data.sources import DataSource, load_rows
from lit_p3o.tasks import resolve_embedded


class Prompt(str):
    """A prompt's text carrying its dataset row's other ``columns`` (e.g. a reference
    ``answer``), which Python reward functions receive as keyword arguments, and, for a
    conversational row, its ``messages`` (the list the text was rendered from), which they
    receive as the prompt, as TRL passes it."""

    columns: dict[str, Any]
    messages: list[dict[str, Any]] | None

    def __new__(
        cls, text: str, columns: Mapping[str, Any] | None = None, messages: list[dict[str, Any]] | None = None
    ) -> Prompt:
        prompt = super().__new__(cls, text)
        prompt.columns = dict(columns or {})
        prompt.messages = messages
        return prompt

    def __reduce__(self) -> tuple[Any, ...]:
        return (Prompt, (str(self), self.columns, self.messages))


def load_prompts(
    source: str | list[str] | DataSource,
    split: str = "train",
    limit: int | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    chat_template_kwargs: Mapping[str, Any] | None = None,
) -> list[str]:
    """Prompts from ``"embedded:<task>"``; a dataset (a path, a name or, from Python, a
    ``datasets`` object) with a ``prompt`` column, as text or as TRL's conversational
    prompt-only form (message lists rendered with ``tokenizer``'s chat template and the
    generation prompt, ``chat_template_kwargs`` passed through); a preference dataset (HH,
    TL;DR, TRL), whose distinct prompts are used in order; or a list of strings (YAML or Python),
    each a user message: rendered as one user turn with ``tokenizer``'s chat template when it
    has one, so that the rollout and the evaluation prompt alike (a dataset's text prompts are
    used as written: they are often formatted already, as HH's transcripts).

    Prompts are :class:`Prompt` strings: from a ``prompt`` column they carry the row's other
    columns (and, conversational, the row's messages); an embedded task may give columns
    through its ``prompt_columns(prompt)``."""
    if isinstance(source, (list, tuple)):
        return _listed_prompts(source, limit, tokenizer, chat_template_kwargs)
    task = resolve_embedded(source)
    if task is not None:
        if limit is None:
            raise ValueError(f"load_prompts({source!r}): give `limit`, the number of prompts to draw")
        columns = getattr(task, "prompt_columns", lambda prompt: {})
        return [Prompt(p, columns(p)) for p in task.prompts(split, limit)]
    rows, origin = load_rows(source, split)
    if rows and "prompt" in rows[0]:
        parsed = parse_prompts(rows, origin, tokenizer, chat_template_kwargs=chat_template_kwargs)
        prompts = [
            Prompt(
                p,
                {k: v for k, v in rows[n].items() if k != "prompt"},
                rows[n]["prompt"] if isinstance(rows[n]["prompt"], list) else None,
            )
            for n, p in zip(parsed.row_numbers, parsed)
        ]
        if {"chosen", "rejected"} <= rows[0].keys():  # preference pairs: one prompt, many pairs
            prompts = list(dict.fromkeys(prompts))
    else:
        records = parse_preferences(
            rows, origin, tokenizer=tokenizer, strict=False, chat_template_kwargs=chat_template_kwargs
        )
        prompts = [Prompt(p) for p in dict.fromkeys(r.prompt for r in records)]
    if not prompts:
        raise ValueError(f"{origin}: no prompts found")
    return prompts[:limit] if limit is not None else prompts


def _listed_prompts(
    prompts: list[str] | tuple[str, ...],
    limit: int | None,
    tokenizer: PreTrainedTokenizerBase | None,
    chat_template_kwargs: Mapping[str, Any] | None,
) -> list[str]:
    for n, prompt in enumerate(prompts):
        if not isinstance(prompt, str) or not prompt:
            raise ValueError(f"prompts[{n}]: expected a non-empty string, got {prompt!r}")
    if not prompts:
        raise ValueError("prompts: the list given is empty")
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        return [p if isinstance(p, Prompt) else Prompt(p) for p in prompts[:limit]]
    return [
        Prompt(render_user_turn(tokenizer, p, chat_template_kwargs), getattr(p, "columns", None))
        for p in prompts[:limit]
    ]
