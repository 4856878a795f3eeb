"""Sizes a run cannot honour, refused through the command line before anything is sampled or
trained (issue 22 items 8 and 9): exit 2, no traceback, and one line naming the fields by their
config paths."""

from __future__ import annotations

from pathlib import Path

import pytest
from micro import MICRO_ARCH
from test_bad_inputs import lit_p3o, p3o_config, write_yaml
from test_user_errors import fails_in_one_line

PREFS = Path(__file__).parent / "fixtures" / "prefs"


@pytest.mark.parametrize("section", ["rollout", "evaluation"])
def test_prompt_and_response_budgets_beyond_the_policys_context(tmp_path: Path, section: str):
    config = p3o_config()
    config["model"]["init_args"].setdefault(section, {}).update(max_prompt_tokens=60, sampling={"max_new_tokens": 8})
    write_yaml(tmp_path / "p3o.yaml", config)
    result = lit_p3o("fit", "--config", "p3o.yaml", cwd=tmp_path)
    assert fails_in_one_line(result) == (
        f"lit-p3o fit: error: model.init_args.{section}.max_prompt_tokens: 60 prompt tokens + "
        f"model.init_args.{section}.sampling.max_new_tokens = 8 make 68 positions, more than the policy's context "
        "of 64 (max_position_embeddings of its config); lower one of them"
    )
    assert not (tmp_path / "logs").exists() and not (tmp_path / "export").exists()  # refused before the run


def test_preference_batch_size_zero(tmp_path: Path):
    config = {
        "trainer": {"accelerator": "cpu", "max_steps": 1, "logger": False, "enable_checkpointing": False},
        "model": {
            "class_path": "lit_p3o.RewardModule",
            "init_args": {"model": {"tokenizer": "embedded:reviews", "architecture": dict(MICRO_ARCH)}},
        },
        "data": {
            "class_path": "lit_p3o.PreferenceDataModule",
            "init_args": {"train": str(PREFS / "trl.jsonl"), "batch_size": 0},
        },
    }
    write_yaml(tmp_path / "reward.yaml", config)
    result = lit_p3o("fit", "--config", "reward.yaml", cwd=tmp_path)
    assert fails_in_one_line(result) == "lit-p3o fit: error: data.init_args.batch_size: must be >= 1 pair, got 0"
