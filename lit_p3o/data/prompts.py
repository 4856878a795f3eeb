"""Prompt sets for rollouts and evaluation: the embedded task's, or any dataset's prompts."""

from __future__ import annotations

from lit_p3o.data.formats import load_rows, parse_preferences
from lit_p3o.tasks import resolve_embedded


def load_prompts(source: str, split: str = "train", limit: int | None = None, tokenizer=None) -> list[str]:
    """Prompts from ``"embedded:<task>"``, a dataset with a ``prompt`` text column, or a
    preference dataset (HH, TL;DR, TRL), whose distinct prompts are used in order."""
    task = resolve_embedded(source)
    if task is not None:
        if limit is None:
            raise ValueError(f"load_prompts({source!r}): give `limit`, the number of prompts to draw")
        return task.prompts(split, limit)
    rows, origin = load_rows(source, split)
    if rows and isinstance(rows[0].get("prompt"), str):
        prompts = [r.get("prompt") for r in rows]  # a later row may lack the column
        for i, p in enumerate(prompts):
            if not isinstance(p, str) or not p.strip():
                raise ValueError(f"{origin}: row {i}: field `prompt` is missing, empty or not text")
        if {"chosen", "rejected"} <= rows[0].keys():  # TRL preference pairs: one prompt, many pairs
            prompts = list(dict.fromkeys(prompts))
    else:
        records = parse_preferences(rows, origin, tokenizer=tokenizer, strict=False)
        prompts = list(dict.fromkeys(r.prompt for r in records))
    if not prompts:
        raise ValueError(f"{origin}: no prompts found")
    return prompts[:limit] if limit is not None else prompts
