"""Resume through the command line after a run was killed or stopped (issue 22, part 1 items 1-5).

Every case kills or stops a micro P3O run (2 rollouts of 4 updates, 8 in all) at an exact
point, chosen by the test-only callback :class:`interrupt.Interrupt` in its config (no sleeping
on timings), resumes it with ``lit-p3o fit --ckpt_path …`` and compares the final policy
bitwise (``torch.equal``) and ``metrics.csv`` row for row with one uninterrupted run.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from micro import MICRO_ARCH
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
METRICS = Path("logs/p3o/v/metrics.csv")
STEPS = 8  # 2 rollouts x (2 passes x 2 minibatches)

# ModelCheckpoint settings of the cases
EVERY_4_STEPS = {
    "dirpath": "ckpt",
    "save_last": True,
    "save_top_k": 0,
    "every_n_train_steps": 4,
}  # an epoch's last update
EVERY_3_STEPS = {"dirpath": "ckpt", "save_last": True, "save_top_k": -1, "every_n_train_steps": 3}


def demo_checkpointing() -> dict[str, Any]:
    """The ModelCheckpoint settings of the demo's RL configs (the same in every one)."""
    settings = []
    for stage in ("p3o", "ppo", "rloo"):
        config = yaml.safe_load((ROOT / "configs/demo" / f"{stage}.yaml").read_text())
        callbacks = config["trainer"]["callbacks"]
        settings.append(next(c["init_args"] for c in callbacks if c["class_path"].endswith("ModelCheckpoint")))
    assert all(s == settings[0] for s in settings)
    return {"dirpath": "ckpt", **settings[0]}


def config(checkpointing: dict[str, Any] | None, interrupt: dict[str, Any] | None = None, **init_args: Any) -> dict:
    callbacks = [] if interrupt is None else [{"class_path": "interrupt.Interrupt", "init_args": interrupt}]
    if checkpointing is not None:
        callbacks.append({"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": checkpointing})
    return {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_epochs": 2,
            "log_every_n_steps": 1,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "default_root_dir": "logs",
            "enable_checkpointing": checkpointing is not None,
            "logger": {
                "class_path": "lightning.pytorch.loggers.CSVLogger",
                "init_args": {"save_dir": "logs", "name": "p3o", "version": "v"},
            },
            "callbacks": callbacks,
        },
        "model": {
            "class_path": "lit_p3o.P3OModule",
            "init_args": {
                "policy": {"tokenizer": "embedded:reviews", "architecture": dict(MICRO_ARCH)},
                "reward_model": "embedded:reviews",
                "rollout": {
                    "prompt_pool": 16,
                    "num_prompts": 4,
                    "num_responses": 2,
                    "update_epochs": 2,
                    "minibatch_groups": 2,
                    "max_prompt_tokens": 8,
                    "sampling": {"max_new_tokens": 8},
                    "log_samples": 0,
                },
                "guards": {"max_zero_grad_steps": 1000},  # micro responses often tie
                "save_dir": "export",
                **init_args,
            },
        },
    }


def lit_p3o(work: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lit_p3o", "fit", "--config", "p3o.yaml", *args],
        cwd=work,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )


def run(
    work: Path, checkpointing: dict[str, Any] | None, interrupt: dict[str, Any] | None = None
) -> subprocess.CompletedProcess:
    work.mkdir(parents=True, exist_ok=True)
    (work / "p3o.yaml").write_text(yaml.safe_dump(config(checkpointing, interrupt)))
    return lit_p3o(work)


def killed(work: Path, checkpointing: dict[str, Any], **interrupt: Any) -> Path:
    """A run SIGKILLed at ``interrupt``; the same config without the interrupt for the resume."""
    result = run(work, checkpointing, interrupt)
    assert result.returncode == -9, result.stderr[-3000:]
    (work / "p3o.yaml").write_text(yaml.safe_dump(config(checkpointing)))
    return work


def global_step(path: Path) -> int:
    return torch.load(path, map_location="cpu", weights_only=False)["global_step"]


def assert_same_run(work: Path, uninterrupted: Path, resumed: subprocess.CompletedProcess) -> None:
    """Bitwise the uninterrupted run's policy, its metrics rows once each, every update applied once."""
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"{STEPS} updates applied" in resumed.stdout + resumed.stderr
    expected = load_file(uninterrupted / "export/model.safetensors")
    got = load_file(work / "export/model.safetensors")
    assert expected.keys() == got.keys()
    assert [name for name in expected if not torch.equal(expected[name], got[name])] == []
    assert (work / METRICS).read_text() == (uninterrupted / METRICS).read_text()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    """The reference run, checkpointed every 3 updates (keeping every file)."""
    work = tmp_path_factory.mktemp("uninterrupted")
    result = run(work, EVERY_3_STEPS)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"{STEPS} updates applied" in result.stdout + result.stderr
    return work


def test_kill_during_the_rollout_after_a_checkpoint_on_the_epochs_last_update(uninterrupted, tmp_path):
    """Issue 22 §1.1: last.ckpt written by the 4th update, the last of rollout 1; killed while
    rollout 2 is sampled. Resuming used to skip rollout 2 (4 of 8 updates)."""
    work = killed(tmp_path, EVERY_4_STEPS, step=4, when="rollout")
    assert global_step(work / "ckpt/last.ckpt") == 4
    assert_same_run(work, uninterrupted, lit_p3o(work, "--ckpt_path", "ckpt/last.ckpt"))


@pytest.mark.slow  # also in-process: test_p3o_stage.py::test_resume_mid_rollout_continues_with_the_next_minibatch
def test_kill_between_updates_of_a_rollout(uninterrupted, tmp_path):
    """The newest checkpoint (update 3) sits inside rollout 1's replay; killed at update 6."""
    work = killed(tmp_path, EVERY_3_STEPS, step=6, when="update")
    assert global_step(work / "ckpt/last.ckpt") == 3
    assert_same_run(work, uninterrupted, lit_p3o(work, "--ckpt_path", "ckpt/last.ckpt"))


def test_demo_checkpointing_writes_last_ckpt_after_every_rollout(uninterrupted, tmp_path):
    """Issue 22 §1.2: with the demo configs' ModelCheckpoint, a run killed after its first
    rollout has a last.ckpt of that rollout's end, and resumes from it exactly."""
    work = killed(tmp_path, demo_checkpointing(), step=4, when="rollout")
    assert global_step(work / "ckpt/last.ckpt") == 4
    assert_same_run(work, uninterrupted, lit_p3o(work, "--ckpt_path", "ckpt/last.ckpt"))


def test_sigterm_during_a_rollout_checkpoints_exits_143_and_resumes_with_ckpt_path_last(uninterrupted, tmp_path):
    """Issue 22 §1.4: the rollout under way is finished and its first update applied, then the
    run stops with a checkpoint, status 143 and one line saying how to resume; no export."""
    result = run(tmp_path, demo_checkpointing(), {"step": 4, "when": "rollout", "signal": "SIGTERM"})
    assert result.returncode == 143, result.stderr[-3000:]
    saved = (tmp_path / "ckpt/last.ckpt").resolve()
    assert result.stderr.splitlines()[-1] == (
        "lit-p3o fit: error: stopped by SIGTERM after 5 optimizer steps (epoch 1); nothing was exported. "
        f"Checkpoint: {saved}; resume by running the same command with --ckpt_path {saved}"
    )
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "export").exists()
    assert global_step(tmp_path / "ckpt/epoch=0-step=4.ckpt") == 4  # the demo checkpointing's, after rollout 1
    assert not saved.is_symlink() and global_step(saved) == 5  # written at the signal, not a link to rollout 1's
    (tmp_path / "p3o.yaml").write_text(yaml.safe_dump(config(demo_checkpointing())))
    resumed = lit_p3o(tmp_path, "--ckpt_path", "last")
    assert f"--ckpt_path last: resuming from {saved}" in resumed.stderr
    assert "dataloader is not resumable" not in resumed.stderr  # it is: the buffer holds the position
    assert_same_run(tmp_path, uninterrupted, resumed)


@pytest.mark.slow
def test_sigterm_on_an_epochs_last_update_resumes_exactly(uninterrupted, tmp_path):
    """Lightning stops at the end of the epoch then: the checkpoint holds a finished epoch."""
    result = run(tmp_path, demo_checkpointing(), {"step": 4, "when": "update", "signal": "SIGTERM"})
    assert result.returncode == 143, result.stderr[-3000:]
    assert global_step(tmp_path / "ckpt/last.ckpt") == 4
    (tmp_path / "p3o.yaml").write_text(yaml.safe_dump(config(demo_checkpointing())))
    assert_same_run(tmp_path, uninterrupted, lit_p3o(tmp_path, "--ckpt_path", "last"))


def test_sigterm_without_a_model_checkpoint_says_nothing_can_resume(tmp_path):
    result = run(tmp_path, None, {"step": 4, "when": "update", "signal": "SIGTERM"})
    assert result.returncode == 143, result.stderr[-3000:]
    assert result.stderr.splitlines()[-1] == (
        "lit-p3o fit: error: stopped by SIGTERM after 4 optimizer steps (epoch 1); no checkpoint was written "
        "(no ModelCheckpoint in trainer.callbacks) and nothing was exported: the run cannot be resumed"
    )
    assert not (tmp_path / "export").exists()


def test_resume_from_an_earlier_step_keeps_each_metrics_row_once_and_the_run_id(uninterrupted, tmp_path):
    """Issue 22 §1.5 and §3: a finished run resumed from update 6's checkpoint drops the rows
    logged after it (they are logged again), keeps the 6th update's own row, and goes on as
    the same run: its checkpoints and export carry the original run id."""
    work = tmp_path / "run"
    shutil.copytree(uninterrupted, work)
    run_id = json.loads((work / "export/lit_p3o_run.json").read_text())["run_id"]
    resumed = lit_p3o(work, "--ckpt_path", "ckpt/epoch=1-step=6.ckpt")
    assert "kept 8 rows of logs/p3o/v/metrics.csv logged before step 6" in resumed.stderr
    with (work / METRICS).open() as f:
        rows = [(int(r["step"]), "train/loss" if r["train/loss"] else "rollout") for r in csv.DictReader(f)]
    assert len(rows) == len(set(rows)) and rows == sorted(rows, key=lambda r: r[0])  # each row once, in order
    assert (5, "train/loss") in rows  # the checkpoint's own update
    assert_same_run(work, uninterrupted, resumed)
    assert json.loads((work / "export/lit_p3o_run.json").read_text())["run_id"] == run_id
    assert torch.load(work / "ckpt/last.ckpt", weights_only=False)["lit_p3o_run_id"] == run_id


def test_ckpt_path_last_is_checked_like_a_path(uninterrupted, tmp_path):
    """Issue 22 §1.3: a finished run resumed by name with another reward and variant is refused
    before anything is written: export and metrics stay as they were."""
    work = tmp_path / "run"
    shutil.copytree(uninterrupted, work)
    metrics = (work / METRICS).read_text()
    result = lit_p3o(
        work,
        "--ckpt_path",
        "last",
        "--model.init_args.variant",
        "v2",
        "--model.init_args.reward_model",
        "embedded:arithmetic",
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("lit-p3o fit: error: ")]
    assert errors == [
        f"lit-p3o fit: error: --ckpt_path {work / 'ckpt/last.ckpt'}: the config differs from the checkpoint's run "
        "in settings a resumed run cannot change:"
    ]
    listed = [line.strip() for line in result.stderr.splitlines() if line.startswith("  model.init_args.")]
    assert listed == [
        "model.init_args.reward_model: checkpoint 'embedded:reviews', config 'embedded:arithmetic'",
        "model.init_args.variant: checkpoint 'v1', config 'v2'",
    ]
    assert (work / METRICS).read_text() == metrics
    assert (work / "export/model.safetensors").read_bytes() == (uninterrupted / "export/model.safetensors").read_bytes()
