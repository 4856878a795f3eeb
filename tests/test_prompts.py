"""lit_p3o.data.prompts: load_prompts from a prompt column, from preference data and from the embedded task."""

from __future__ import annotations

import logging

import pytest
from helpers import write_jsonl
from prefs_fixtures import BREAD, CODE, HH, PLANT, TLDR, TLDR_RECORDS, TRL

from lit_p3o.data.prompts import load_prompts
from lit_p3o.tasks import get_task

DATA_LOG = "lit_p3o.data"


# --------------------------------------------------------------------------- load_prompts


def test_load_prompts_from_a_prompt_column(tmp_path):
    path = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "rate the tea :"}, {"prompt": "rate the mug :"}])
    assert load_prompts(str(path)) == ["rate the tea :", "rate the mug :"]
    assert load_prompts(str(path), limit=1) == ["rate the tea :"]
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "rate the tea :"}, {"text": "rate the mug :"}])
    with pytest.raises(ValueError) as info:
        load_prompts(str(bad))
    assert str(info.value) == f"{bad}: row 1: field `prompt`: missing"


def test_load_prompts_from_preference_data_are_distinct_and_in_order(caplog):
    assert load_prompts(str(TRL)) == [
        "write a review of the pizza :",
        "what do you think of the lamp ?",
        "please write a review of the soup for my blog :",
        "rate the bike :",
    ]
    with caplog.at_level(logging.WARNING, logger=DATA_LOG):
        assert load_prompts(str(HH)) == [BREAD, PLANT, CODE]  # row 8 repeats row 0's prompt
        assert load_prompts(str(TLDR), limit=2) == [r.prompt for r in TLDR_RECORDS[:2]]


def test_load_prompts_embedded_needs_a_limit():
    assert load_prompts("embedded:reviews", "test", 3) == get_task("reviews").prompts("test", 3)
    with pytest.raises(ValueError, match="give `limit`"):
        load_prompts("embedded:reviews")
