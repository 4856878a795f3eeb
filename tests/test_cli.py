"""The ``lit-p3o`` LightningCLI: a micro SFT run from YAML, ``--print_config``, the shipped configs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from micro import MICRO_ARCH

from lit_p3o.cli import LitP3OCLI, main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def plain_argv(monkeypatch):
    """LightningCLI warns when ``args=`` and pytest's own command line are both present."""
    monkeypatch.setattr(sys, "argv", ["lit-p3o"])


def micro_config(tmp_path: Path) -> dict:
    return {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_steps": 2,
            "logger": False,
            "enable_checkpointing": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "limit_val_batches": 1,
            "default_root_dir": str(tmp_path / "logs"),
        },
        "model": {
            "class_path": "lit_p3o.SFTModule",
            "init_args": {
                "model": {
                    "tokenizer": "embedded:reviews",
                    "architecture": MICRO_ARCH,
                },
                "optimizer": {"learning_rate": 0.01, "warmup_steps": 1, "schedule": "cosine"},
                "save_dir": str(tmp_path / "sft"),
            },
        },
        "data": {
            "class_path": "lit_p3o.SFTDataModule",
            "init_args": {"train": "embedded:reviews", "embedded_size": 64, "batch_size": 8, "max_length": 48},
        },
    }


def write_config(tmp_path: Path, config: dict) -> Path:
    path = tmp_path / "sft.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_fit_from_a_micro_config(tmp_path):
    config = write_config(tmp_path, micro_config(tmp_path))
    cli = LitP3OCLI(args=["fit", "--config", str(config), "--model.init_args.model.lora.r=2"])
    assert cli.trainer.global_step == 2
    spec = cli.model.model_spec
    assert spec.lora is not None and spec.lora.r == 2 and spec.lora.lora_alpha == 16  # dataclass defaults fill in
    assert cli.model.optimizer_spec.learning_rate == 0.01 and cli.model.optimizer_spec.schedule == "cosine"
    assert cli.datamodule.hparams.embedded_size == 64 and len(cli.datamodule.train_examples) == 64
    saved = tmp_path / "sft"
    assert (saved / "config.json").is_file() and (saved / "tokenizer.json").is_file()
    assert (saved / "model.safetensors").is_file()  # adapters on a fresh architecture are saved merged
    assert (tmp_path / "logs" / "config.yaml").is_file()  # the resolved config, next to the logs


def test_print_config_shows_the_knobs(tmp_path, capsys):
    config = write_config(tmp_path, micro_config(tmp_path))
    with pytest.raises(SystemExit) as exit_info:
        LitP3OCLI(args=["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    model_args = printed["model"]["init_args"]
    assert model_args["optimizer"]["learning_rate"] == 0.01
    assert "lora" in model_args["model"] and "quantization" in model_args["model"]
    data_args = printed["data"]["init_args"]
    assert data_args["max_length"] == 48 and data_args["strict"] is None and data_args["val_fraction"] == 0.05
    assert not (tmp_path / "sft").exists()  # printing runs nothing


@pytest.mark.parametrize("name", ["sft.yaml", "reward.yaml", "p3o.yaml"])
def test_shipped_demo_configs_parse(name, capsys):
    path = ROOT / "configs" / "demo" / name
    with pytest.raises(SystemExit) as exit_info:
        LitP3OCLI(args=["fit", "--config", str(path), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    shipped = yaml.safe_load(path.read_text())
    assert printed["model"]["class_path"] == shipped["model"]["class_path"]
    if name == "sft.yaml":
        assert printed["model"]["init_args"]["model"]["architecture"]["hidden_size"] == 128
        assert printed["data"]["init_args"]["max_length"] == 64


def test_bad_config_value_is_rejected(tmp_path, capsys):
    config = micro_config(tmp_path)
    config["model"]["init_args"]["optimizer"]["schedule"] = "linear"  # not a known schedule
    with pytest.raises(SystemExit) as exit_info:
        LitP3OCLI(args=["fit", "--config", str(write_config(tmp_path, config))])
    assert exit_info.value.code not in (0, None)
    assert "schedule" in capsys.readouterr().err


def test_a_cli_run_prints_no_lightning_tips(tmp_path, caplog):
    """Lightning's "💡 Tip" lines (litlogger, litmodels) are hidden; its other messages stay."""
    from lightning_utilities.core import rank_zero

    config = micro_config(tmp_path)
    config["trainer"].update(max_steps=1, limit_val_batches=0, enable_checkpointing=True)  # the litmodels tip too
    path = write_config(tmp_path, config)
    rank_zero.log.addHandler(caplog.handler)  # sees what passes the logger's filters, propagated or not
    try:
        main(["fit", "--config", str(path)])
    finally:
        rank_zero.log.removeHandler(caplog.handler)
    messages = [record.getMessage() for record in caplog.records]
    assert any(message.startswith("GPU available") for message in messages)
    assert not [message for message in messages if "Tip" in message]


@pytest.mark.slow
def test_python_m_lit_p3o_fit(tmp_path):
    config = micro_config(tmp_path)
    config["trainer"]["max_steps"] = 1
    path = write_config(tmp_path, config)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "lit_p3o", "fit", "--config", str(path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "saved the SFT model" in result.stdout
    assert (tmp_path / "sft" / "model.safetensors").is_file()


# --------------------------------------------------------------------------- resume checks (in process)


def saved_checkpoint(**hparams) -> dict:
    return {"hyper_parameters": {"_class_path": "lit_p3o.P3OModule", "_instantiator": "x", **hparams}}


def test_resume_applies_changeable_settings_and_compares_paths_by_target(tmp_path, monkeypatch):
    from lit_p3o.checkpoints import check_resume

    monkeypatch.chdir(tmp_path)
    (tmp_path / "rm").mkdir()
    checkpoint = saved_checkpoint(reward_model="rm", save_dir="a", rollout={"num_prompts": 4, "log_samples": 2})
    config = {
        "model": {
            "class_path": "lit_p3o.stages.p3o.P3OModule",
            "init_args": {
                "reward_model": str(tmp_path / "rm"),
                "save_dir": "b",
                "rollout": {"num_prompts": 4, "log_samples": 0},
            },
        }
    }
    assert check_resume(config, checkpoint, "x.ckpt") == {
        "model.init_args.rollout.log_samples": (2, 0),
        "model.init_args.save_dir": ("a", "b"),
    }


def test_resume_refuses_other_differences_and_other_stages():
    from lit_p3o.checkpoints import check_resume
    from lit_p3o.errors import ConfigError

    checkpoint = saved_checkpoint(kl=None, rollout={"num_prompts": 4})
    config = {
        "model": {"class_path": "lit_p3o.P3OModule", "init_args": {"kl": {"beta": 0.1}, "rollout": {"num_prompts": 4}}}
    }
    with pytest.raises(
        ConfigError, match=r"(?s)cannot change:\n  model\.init_args\.kl: checkpoint None, config \{'beta': 0\.1\}\nSet"
    ):
        check_resume(config, checkpoint, "x.ckpt")
    config["model"]["class_path"] = "lit_p3o.PPOModule"
    with pytest.raises(
        ConfigError, match="the checkpoint is a lit_p3o.P3OModule run but the config's model is lit_p3o.PPOModule"
    ):
        check_resume(config, checkpoint, "x.ckpt")


def test_checkpoint_that_is_no_lightning_checkpoint(tmp_path):
    import torch

    from lit_p3o.checkpoints import read_checkpoint
    from lit_p3o.errors import ConfigError

    torch.save({"weight": torch.zeros(2)}, tmp_path / "weights.pt")
    with pytest.raises(ConfigError, match=r"weights.pt: a torch file but not a Lightning checkpoint"):
        read_checkpoint(tmp_path / "weights.pt")
    (tmp_path / "blob.ckpt").write_bytes(b"\x00\x01\x02\xff")
    with pytest.raises(ConfigError, match=r"blob.ckpt: is a binary file, not a Lightning checkpoint"):
        read_checkpoint(tmp_path / "blob.ckpt")
    with pytest.raises(ConfigError, match=r"missing.ckpt: no such file"):
        read_checkpoint(tmp_path / "missing.ckpt")


def test_resumed_export_goes_only_where_its_own_run_exported(tmp_path):
    from lit_p3o.checkpoints import RUN_MARKER, check_export_dir
    from lit_p3o.errors import ConfigError

    check_export_dir(str(tmp_path / "new"), "run1")  # missing: fine
    (tmp_path / "empty").mkdir()
    check_export_dir(str(tmp_path / "empty"), None)  # empty: fine
    ours = tmp_path / "ours"
    ours.mkdir()
    (ours / RUN_MARKER).write_text('{"run_id": "run1", "stage": "P3OModule"}')
    check_export_dir(str(ours), "run1")
    with pytest.raises(ConfigError, match=r"holds the export of run run1 \(P3OModule\); this resumed run \(run run2\)"):
        check_export_dir(str(ours), "run2")
    (tmp_path / "plain" / "model.safetensors").parent.mkdir()
    (tmp_path / "plain" / "model.safetensors").write_bytes(b"")
    with pytest.raises(ConfigError, match=rf"holds files without a {RUN_MARKER}"):
        check_export_dir(str(tmp_path / "plain"), "run1")


def test_close_process_group_destroys_an_open_group(tmp_path):
    """A multi-process run's group is closed before interpreter shutdown (left open, gloo aborts the
    process at exit after a run that succeeded); with none open it does nothing."""
    import torch.distributed as dist

    from lit_p3o.cli import close_process_group

    close_process_group()  # nothing open: no error
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    assert dist.is_initialized()
    close_process_group()
    assert not dist.is_initialized()
