"""Optimizers: LightningCLI's --optimizer/--lr_scheduler with the stages, and OptimizerSpec's
bitsandbytes choices (8-bit and paged AdamW, which bitsandbytes 0.50 runs on CPU)."""

from __future__ import annotations

import sys

import bitsandbytes as bnb
import lightning as L
import pytest
import torch
import yaml
from micro import MICRO_ARCH
from test_cli import micro_config, write_config

from lit_p3o import ModelSpec, OptimizerSpec, SFTDataModule, SFTModule
from lit_p3o.cli import LitP3OCLI
from lit_p3o.optim import configure_adamw


@pytest.fixture(autouse=True)
def plain_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["lit-p3o"])


def test_cli_optimizer_and_scheduler_replace_the_stage_optimizer(tmp_path):
    config = write_config(tmp_path, micro_config(tmp_path))
    cli = LitP3OCLI(
        args=[
            "fit",
            "--config",
            str(config),
            "--model.init_args.optimizer",
            "null",
            "--trainer.max_steps",
            "9",
            "--optimizer",
            "torch.optim.SGD",
            "--optimizer.lr",
            "0.25",
            "--lr_scheduler",
            "torch.optim.lr_scheduler.StepLR",
            "--lr_scheduler.step_size",
            "1",
            "--lr_scheduler.gamma",
            "0.5",
        ]
    )
    [optimizer] = cli.trainer.optimizers
    assert type(optimizer) is torch.optim.SGD
    [scheduler] = cli.trainer.lr_scheduler_configs
    assert type(scheduler.scheduler) is torch.optim.lr_scheduler.StepLR
    assert cli.trainer.global_step == 9
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.25 * 0.5)  # 8 batches an epoch: one StepLR step


def test_cli_optimizer_works_with_an_rl_stage(tmp_path):
    rl = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_epochs": 1,
            "logger": False,
            "enable_checkpointing": False,
            "default_root_dir": str(tmp_path),  # LightningCLI saves its config.yaml there
            "enable_progress_bar": False,
            "enable_model_summary": False,
        },
        "model": {
            "class_path": "lit_p3o.P3OModule",
            "init_args": {
                "policy": {"architecture": MICRO_ARCH, "tokenizer": "embedded:reviews"},
                "reward_model": "embedded:reviews",
                "rollout": {
                    "prompt_pool": 16,
                    "num_prompts": 4,
                    "minibatch_groups": 2,
                    "update_epochs": 1,
                    "max_prompt_tokens": 16,
                    "sampling": {"max_new_tokens": 6},
                },
            },
        },
    }
    path = tmp_path / "p3o.yaml"
    path.write_text(yaml.safe_dump(rl))
    cli = LitP3OCLI(args=["fit", "--config", str(path), "--optimizer", "torch.optim.Adam", "--optimizer.lr", "0.5"])
    [optimizer] = cli.trainer.optimizers
    assert type(optimizer) is torch.optim.Adam and cli.trainer.global_step == 2
    stepped = [optimizer.state[p]["step"].item() for p in cli.model.policy.parameters() if p in optimizer.state]
    assert len(stepped) == len(list(cli.model.policy.parameters())) and set(stepped) == {2.0}


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--optimizer", "torch.optim.SGD", "--optimizer.lr", "0.1"],
            "--optimizer replaces the stage's `optimizer` block",
        ),
        (
            [
                "--model.init_args.optimizer",
                "null",
                "--lr_scheduler",
                "torch.optim.lr_scheduler.StepLR",
                "--lr_scheduler.step_size",
                "1",
            ],
            "--lr_scheduler needs --optimizer",
        ),
    ],
)
def test_cli_refuses_optimizer_settings_that_would_be_ignored(tmp_path, capsys, args, message):
    config = write_config(tmp_path, micro_config(tmp_path))
    with pytest.raises(SystemExit) as exit_info:
        LitP3OCLI(args=["fit", "--config", str(config), *args])
    assert exit_info.value.code not in (0, None)
    assert message in capsys.readouterr().err


def sft_module(name: str) -> SFTModule:
    torch.manual_seed(0)
    # MLP weights of 64·128 ≥ 4096 entries: bitsandbytes keeps smaller tensors' state in 32 bits
    spec = ModelSpec(architecture=dict(MICRO_ARCH, hidden_size=64, intermediate_size=128), tokenizer="embedded:reviews")
    return SFTModule(spec, optimizer=OptimizerSpec(learning_rate=1e-2, name=name))


@pytest.mark.parametrize(
    "name, cls",
    [
        ("adamw_8bit", bnb.optim.AdamW8bit),
        ("paged_adamw_8bit", bnb.optim.PagedAdamW8bit),
        ("paged_adamw", bnb.optim.PagedAdamW),
    ],
)
def test_bitsandbytes_adamw_trains_on_cpu_like_adamw(name, cls):
    modules = {"adamw": sft_module("adamw"), name: sft_module(name)}
    dm = SFTDataModule(
        train="embedded:reviews", embedded_size=16, max_length=48, batch_size=8, tokenizer=modules["adamw"].tokenizer
    )
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    steps = {}
    for key, module in modules.items():
        module.trainer = L.Trainer(
            accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False
        )
        optimizer = configure_adamw(module, module.optimizer_spec)["optimizer"]
        before = {k: v.clone() for k, v in module.policy.state_dict().items()}
        module._loss(batch).backward()
        optimizer.step()
        steps[key] = {k: module.policy.state_dict()[k] - before[k] for k in before}
        if key == name:
            assert type(optimizer) is cls
            mlp = module.policy.model.layers[0].mlp.up_proj.weight
            assert optimizer.state[mlp]["state1"].dtype == (torch.uint8 if "8bit" in name else torch.float32)
    # Adam's first step is lr·g/(|g| + eps) per weight: the same up to state quantization
    for k, step in steps["adamw"].items():
        torch.testing.assert_close(steps[name][k], step, atol=2e-3, rtol=0)
    assert max(step.abs().max().item() for step in steps[name].values()) > 5e-3


def test_bitsandbytes_optimizer_without_the_package_says_what_to_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a)
    )
    module = sft_module("adamw_8bit")
    with pytest.raises(ImportError, match=r"'adamw_8bit' needs the `bitsandbytes` package"):
        configure_adamw(module, module.optimizer_spec)


def adamw_trajectory(fused: bool | None, steps: int = 3) -> tuple[torch.optim.Optimizer, dict[str, torch.Tensor]]:
    """Weights after ``steps`` AdamW steps (weight decay on) of an SFT module on a fixed batch."""
    module = sft_module("adamw")
    module.optimizer_spec = OptimizerSpec(learning_rate=1e-2, weight_decay=0.1, fused=fused)
    dm = SFTDataModule(
        train="embedded:reviews", embedded_size=16, max_length=48, batch_size=8, tokenizer=module.tokenizer
    )
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    module.trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    optimizer = configure_adamw(module, module.optimizer_spec)["optimizer"]
    for _ in range(steps):
        optimizer.zero_grad()
        module._loss(batch).backward()
        optimizer.step()
    return optimizer, {k: v.clone() for k, v in module.policy.state_dict().items()}


def test_adamw_is_fused_by_default_and_steps_like_torchs_default_implementation():
    fused, fused_weights = adamw_trajectory(None)
    plain, plain_weights = adamw_trajectory(False)
    assert fused.param_groups[0]["fused"] is True and not plain.param_groups[0]["fused"]
    start = sft_module("adamw").policy.state_dict()
    for k, w in plain_weights.items():
        torch.testing.assert_close(fused_weights[k], w, atol=1e-6, rtol=1e-5)
    assert max((plain_weights[k] - start[k]).abs().max().item() for k in start) > 1e-2  # the steps moved the weights


def test_fused_is_refused_for_bitsandbytes_optimizers():
    with pytest.raises(ValueError, match=r"OptimizerSpec.fused: .* 'adamw', not 'adamw_8bit'"):
        OptimizerSpec(name="adamw_8bit", fused=True)


@pytest.mark.parametrize(
    "precision, clip, fused", [("32-true", 1.0, True), ("bf16-mixed", None, True), ("bf16-mixed", 1.0, False)]
)
def test_fused_adamw_where_lightning_allows_it(precision, clip, fused):
    """Lightning's mixed-precision plugin refuses to clip a fused optimizer's gradients."""
    module = sft_module("adamw")
    module.trainer = L.Trainer(
        accelerator="cpu",
        precision=precision,
        gradient_clip_val=clip,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    assert bool(configure_adamw(module, module.optimizer_spec)["optimizer"].param_groups[0]["fused"]) is fused
    if not fused:
        with pytest.raises(
            ValueError, match=r"OptimizerSpec.fused: true cannot be combined with trainer.gradient_clip_val=1.0"
        ):
            configure_adamw(module, OptimizerSpec(fused=True))
