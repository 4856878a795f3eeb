"""Bad input through the command line, as a user meets it (issue 8, items 5-9).

Each case runs ``python -m lit_p3o …`` in a subprocess and checks the exit code and the
first useful line of the message: the ``lit-p3o <command>: error: …`` line, or a log line.
One micro P3O run (module fixture) supplies the checkpoint, export and metrics that the
resume cases start from; each case that writes copies it first.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from micro import MICRO_ARCH

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}


def lit_p3o(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lit_p3o", *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300
    )


def error_line(result: subprocess.CompletedProcess) -> str:
    """The ``lit-p3o …: error: …`` line (argparse's or ours), else the last line of stderr."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    return next(
        (line for line in lines if line.startswith("lit-p3o") and ": error: " in line), lines[-1] if lines else ""
    )


def write_yaml(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


def p3o_config(**init_args) -> dict:
    """A micro P3O run whose paths are relative to the run's directory. Its rollout asks for
    more than it can get (8-group minibatches of 4 groups, 4 prompts from a pool of 3,
    prompts cut to 6 tokens), so the run also shows the clamp messages."""
    return {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_epochs": 1,
            "log_every_n_steps": 1,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "default_root_dir": "logs",
            "logger": {
                "class_path": "lightning.pytorch.loggers.CSVLogger",
                "init_args": {"save_dir": "logs", "name": "p3o", "version": "v"},
            },
            "callbacks": [
                {
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {"dirpath": "ckpt", "save_last": True, "save_top_k": 0},
                }
            ],
        },
        "model": {
            "class_path": "lit_p3o.P3OModule",
            "init_args": {
                "policy": {"tokenizer": "embedded:reviews", "architecture": dict(MICRO_ARCH)},
                "reward_model": "embedded:reviews",
                "rollout": {
                    "prompt_pool": 3,
                    "num_prompts": 4,
                    "num_responses": 2,
                    "update_epochs": 2,
                    "minibatch_groups": 8,
                    "max_prompt_tokens": 6,
                    "sampling": {"max_new_tokens": 4},
                    "log_samples": 0,
                },
                "save_dir": "export",
                **init_args,
            },
        },
    }


def sft_config(**data) -> dict:
    return {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_steps": 1,
            "logger": False,
            "enable_checkpointing": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
        },
        "model": {
            "class_path": "lit_p3o.SFTModule",
            "init_args": {"model": {"tokenizer": "embedded:reviews", "architecture": dict(MICRO_ARCH)}},
        },
        "data": {"class_path": "lit_p3o.SFTDataModule", "init_args": {"batch_size": 2, "max_length": 48, **data}},
    }


@pytest.fixture(scope="module")
def p3o_run(tmp_path_factory):
    """A finished one-rollout P3O run: ``ckpt/last.ckpt``, ``export/``, ``logs/p3o/v/metrics.csv``."""
    work = tmp_path_factory.mktemp("p3o_run")
    write_yaml(work / "p3o.yaml", p3o_config())
    result = lit_p3o("fit", "--config", "p3o.yaml", cwd=work)
    assert result.returncode == 0, result.stderr[-3000:]
    return work, result


def copy_run(p3o_run, tmp_path: Path) -> Path:
    work = tmp_path / "run"
    shutil.copytree(p3o_run[0], work)
    return work


# --------------------------------------------------------------------------- 5. resume


def test_resume_refuses_another_stage(p3o_run, tmp_path):
    config = p3o_config()
    config["model"] = {
        "class_path": "lit_p3o.PPOModule",
        "init_args": {k: config["model"]["init_args"][k] for k in ("policy", "reward_model", "rollout", "save_dir")},
    }
    write_yaml(tmp_path / "ppo.yaml", config)
    result = lit_p3o("fit", "--config", "ppo.yaml", "--ckpt_path", str(p3o_run[0] / "ckpt/last.ckpt"), cwd=tmp_path)
    assert result.returncode == 2
    assert "the checkpoint is a lit_p3o.P3OModule run but the config's model is lit_p3o.PPOModule" in error_line(result)
    assert not (tmp_path / "export").exists()


def test_resume_lists_the_changed_settings_it_cannot_apply(p3o_run):
    work = p3o_run[0]
    result = lit_p3o(
        "fit",
        "--config",
        "p3o.yaml",
        "--ckpt_path",
        "ckpt/last.ckpt",
        "--model.init_args.variant",
        "v2",
        "--model.init_args.reward_model",
        "outputs/other_reward",
        "--model.init_args.save_dir",
        "elsewhere",
        cwd=work,
    )
    assert result.returncode == 2
    assert "the config differs from the checkpoint's run in settings a resumed run cannot change" in error_line(result)
    listed = [line.strip() for line in result.stderr.splitlines() if line.startswith("  model.init_args.")]
    assert listed == [
        "model.init_args.reward_model: checkpoint 'embedded:reviews', config 'outputs/other_reward'",
        "model.init_args.variant: checkpoint 'v1', config 'v2'",
    ]  # save_dir may change on resume: not refused


def test_resume_never_overwrites_another_runs_export(p3o_run, tmp_path):
    other = tmp_path / "other_export"
    other.mkdir()
    (other / "config.json").write_text("{}")
    (other / "lit_p3o_run.json").write_text(json.dumps({"run_id": "0123456789ab", "stage": "PPOModule"}))
    result = lit_p3o(
        "fit",
        "--config",
        "p3o.yaml",
        "--ckpt_path",
        "ckpt/last.ckpt",
        "--model.init_args.save_dir",
        str(other),
        cwd=p3o_run[0],
    )
    assert result.returncode == 2
    assert f"model.init_args.save_dir {other}: holds the export of run 0123456789ab (PPOModule)" in error_line(result)
    assert sorted(p.name for p in other.iterdir()) == ["config.json", "lit_p3o_run.json"]


@pytest.mark.slow
def test_resume_applies_new_epochs_and_save_dir_and_appends_metrics(p3o_run, tmp_path):
    work = copy_run(p3o_run, tmp_path)
    marker = json.loads((work / "export" / "lit_p3o_run.json").read_text())
    metrics = (work / "logs/p3o/v/metrics.csv").read_text().splitlines()
    result = lit_p3o(
        "fit",
        "--config",
        "p3o.yaml",
        "--ckpt_path",
        "ckpt/last.ckpt",
        "--trainer.max_epochs",
        "2",
        "--model.init_args.save_dir",
        "export2",
        cwd=work,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (
        "resuming ckpt/last.ckpt with model.init_args.save_dir = 'export2' (the checkpoint had 'export')"
        in result.stderr
    )
    resumed = (work / "logs/p3o/v/metrics.csv").read_text().splitlines()
    assert resumed[: len(metrics)] == metrics and len(resumed) > len(metrics)  # appended, not replaced
    assert json.loads((work / "export2" / "lit_p3o_run.json").read_text()) == marker  # the same run
    assert (work / "export2" / "model.safetensors").is_file()


def test_text_file_as_checkpoint_says_what_it_is(p3o_run):
    result = lit_p3o("fit", "--config", "p3o.yaml", "--ckpt_path", "p3o.yaml", cwd=p3o_run[0])
    assert result.returncode == 2
    assert error_line(result) == (
        "lit-p3o fit: error: --ckpt_path p3o.yaml: is a text file (first line: 'model:'), "
        "not a Lightning checkpoint (the .ckpt files ModelCheckpoint writes)"
    )
    assert "weights_only" not in result.stderr


# --------------------------------------------------------------------------- 6. up-front checks


def test_unwritable_output_directories_fail_before_training(tmp_path):
    write_yaml(tmp_path / "p3o.yaml", p3o_config())
    (tmp_path / "a_file").write_text("not a directory")
    result = lit_p3o(
        "fit",
        "--config",
        "p3o.yaml",
        "--model.init_args.save_dir",
        "a_file/export",
        "--trainer.logger.init_args.save_dir",
        "a_file/logs",
        cwd=tmp_path,
    )
    assert result.returncode == 2
    blocked = tmp_path / "a_file"
    assert error_line(result) == (
        f"lit-p3o fit: error: model.init_args.save_dir a_file/export: cannot create a directory there, {blocked} is a file"
    )
    assert (
        f"\ntrainer.logger (CSVLogger) save_dir a_file/logs: cannot create a directory there, {blocked} is a file\n"
        in (result.stderr)
    )
    assert not (tmp_path / "ckpt").exists()  # no epoch ran


def test_missing_or_incomplete_model_directories_name_their_fields(tmp_path):
    (tmp_path / "outputs" / "empty").mkdir(parents=True)  # `outputs/` exists: `outputs/sft` is no hub id
    write_yaml(tmp_path / "p3o.yaml", p3o_config(policy={"name_or_path": "outputs/sft"}, reward_model="outputs/empty"))
    result = lit_p3o("fit", "--config", "p3o.yaml", cwd=tmp_path)
    assert result.returncode == 2
    assert error_line(result).startswith(
        "lit-p3o fit: error: model.init_args.policy.name_or_path: no such directory 'outputs/sft'"
    )
    assert (
        "\nmodel.init_args.reward_model: 'outputs/empty' holds no model (no config.json or adapter_config.json)\n"
        in (result.stderr)
    )
    assert (
        "\nmodel.init_args.reward_model: 'outputs/empty' holds no tokenizer (tokenizer_config.json or tokenizer.json)\n"
        in (result.stderr)
    )
    assert "Traceback" not in result.stderr and result.stderr.count("'outputs/sft'") == 1  # one line per problem


# --------------------------------------------------------------------------- 7. errors name the file


def test_non_utf8_data_file_names_file_and_line(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_bytes(b'{"prompt": "a", "completion": "b"}\n{"prompt": "caf\xe9", "completion": "b"}\n')
    write_yaml(tmp_path / "sft.yaml", sft_config(train=str(data)))
    result = lit_p3o("fit", "--config", "sft.yaml", cwd=tmp_path)
    assert result.returncode == 2
    assert error_line(result).startswith(f"lit-p3o fit: error: {data}: line 2: byte 0xe9 is not UTF-8 text")


def test_frontier_of_a_binary_file_names_it(tmp_path):
    (tmp_path / "run.csv").write_bytes(b"step,kl\n\x89PNG\x00\xff\xfe")
    result = lit_p3o("frontier", "p3o=run.csv", "--out", "f.png", cwd=tmp_path)
    assert result.returncode == 2
    assert error_line(result) == (
        f"lit-p3o frontier: error: {Path('run.csv')}: line 2: byte 0x89 is not UTF-8 text (invalid start byte); "
        "save the file as UTF-8"
    )
    assert not (tmp_path / "f.png").exists()


def test_winrate_with_zero_prompts_names_the_argument(tmp_path):
    result = lit_p3o("winrate", "a=x", "b=y", "--judge", "embedded:reviews", "--num-prompts", "0", cwd=tmp_path)
    assert result.returncode == 2
    assert error_line(result) == "lit-p3o winrate: error: argument --num-prompts: must be >= 1, got 0"


# --------------------------------------------------------------------------- 8. clamps are logged


def test_clamped_rollout_settings_are_logged_once_with_counts(p3o_run):
    lines = [line for line in p3o_run[1].stderr.splitlines() if line.startswith("[lit-p3o]")]
    assert (
        lines.count(
            "[lit-p3o] rollout.minibatch_groups=8 is larger than the 4 groups of a rollout (rollout.num_prompts per "
            "device): every minibatch holds all 4 groups, so each rollout gives 2 updates (rollout.update_epochs)"
        )
        == 1
    )
    assert (
        lines.count(
            "[lit-p3o] the prompt pool holds 3 prompts per device (3 read from embedded:reviews, "
            "rollout.prompt_pool=3), fewer than rollout.num_prompts=4: every rollout repeats prompts"
        )
        == 1
    )
    cut = [line for line in lines if "rollout.max_prompt_tokens=6" in line]
    assert len(cut) == 1 and cut[0].startswith("[lit-p3o] rollout prompts: 3 of 3 prompts truncated from the left (")


# --------------------------------------------------------------------------- 9. help and demo configs


def test_help_lists_every_command(tmp_path):
    from lit_p3o.commands import COMMANDS

    result = lit_p3o("--help", cwd=tmp_path)
    assert result.returncode == 0
    lightning = {line.split()[0] for line in result.stdout.splitlines() if line.startswith("    ")}
    assert {"fit", "validate", "test", "predict"} <= lightning, result.stdout
    assert set(COMMANDS) >= {"report", "frontier", "winrate"}
    for name in COMMANDS:
        assert f"\n  lit-p3o {name} " in result.stdout, result.stdout


@pytest.mark.slow
def test_demo_config_writes_last_ckpt_and_resumes_as_the_readme_says(tmp_path):
    """The README's resume command for the SFT stage, on a micro model."""
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    tiny = [
        "--model.init_args.model.architecture",
        json.dumps(MICRO_ARCH),
        "--data.init_args.embedded_size",
        "64",
        "--trainer.limit_val_batches",
        "1",
        "--trainer.enable_progress_bar",
        "false",
    ]
    first = lit_p3o("fit", "--config", "configs/demo/sft.yaml", *tiny, "--trainer.max_steps", "1", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    last = tmp_path / "outputs/demo/logs/sft/demo/checkpoints/last.ckpt"
    readme = (ROOT / "README.md").read_text()
    assert "`outputs/demo/logs/<stage>/demo/checkpoints/last.ckpt`" in readme
    assert "--ckpt_path outputs/demo/logs/p3o/demo/checkpoints/last.ckpt" in readme
    assert last.is_file()
    resumed = lit_p3o(
        "fit",
        "--config",
        "configs/demo/sft.yaml",
        *tiny,
        "--trainer.max_steps",
        "2",
        "--ckpt_path",
        str(last.relative_to(tmp_path)),
        cwd=tmp_path,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Restored all states from the checkpoint" in resumed.stderr + resumed.stdout
