"""Sizes a run cannot honour, refused through the command line before anything is sampled or
trained (issue 22 items 8 and 9): a non-zero exit and a message naming the fields."""

from __future__ import annotations

from pathlib import Path

from micro import MICRO_ARCH
from test_bad_inputs import lit_p3o, p3o_config, write_yaml

PREFS = Path(__file__).parent / "fixtures" / "prefs"


def test_prompt_and_response_budgets_beyond_the_policys_context(tmp_path: Path):
    config = p3o_config()
    config["model"]["init_args"]["rollout"].update(max_prompt_tokens=60, sampling={"max_new_tokens": 8})
    write_yaml(tmp_path / "p3o.yaml", config)
    result = lit_p3o("fit", "--config", "p3o.yaml", cwd=tmp_path)
    assert result.returncode != 0
    assert ("max_prompt_tokens: 60 prompt tokens + rollout.sampling.max_new_tokens = 8 make 68 positions, more than "
            "the policy's context of 64 (max_position_embeddings of its config)") in result.stderr
    assert not (tmp_path / "logs").exists() and not (tmp_path / "export").exists()  # refused before the run


def test_preference_batch_size_zero(tmp_path: Path):
    config = {
        "trainer": {"accelerator": "cpu", "max_steps": 1, "logger": False, "enable_checkpointing": False},
        "model": {"class_path": "lit_p3o.RewardModule",
                  "init_args": {"model": {"tokenizer": "embedded:reviews", "architecture": dict(MICRO_ARCH)}}},
        "data": {"class_path": "lit_p3o.PreferenceDataModule",
                 "init_args": {"train": str(PREFS / "trl.jsonl"), "batch_size": 0}},
    }  # fmt: skip
    write_yaml(tmp_path / "reward.yaml", config)
    result = lit_p3o("fit", "--config", "reward.yaml", cwd=tmp_path)
    assert result.returncode != 0
    assert "PreferenceDataModule.batch_size: must be >= 1 pair, got 0" in result.stderr or (
        "data.init_args.batch_size: must be >= 1 pair, got 0" in result.stderr  # as the CLI names config paths
    )
