"""``lit-p3o export``: a Lightning checkpoint of any stage → a directory plain transformers/peft
load from any working directory, with the weights the stage trained."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import lightning as L
import pytest
import torch
from peft import AutoPeftModelForCausalLM
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from lit_p3o import (
    LoraSpec,
    ModelSpec,
    OptimizerSpec,
    P3OModule,
    PreferenceDataModule,
    RewardModule,
    RolloutSpec,
    SamplingSpec,
    SFTDataModule,
    SFTModule,
)
from lit_p3o.cli import main
from lit_p3o.commands.export import export_checkpoint, stage_class
from lit_p3o.data.encoding import Encoded, collate
from lit_p3o.errors import ConfigError
from lit_p3o.models import save_pretrained
from lit_p3o.scoring import reward_scores

TRL = Path(__file__).parent / "fixtures" / "prefs" / "trl.jsonl"
OPT = OptimizerSpec(learning_rate=5e-2)


def train_and_checkpoint(
    module: L.LightningModule, path: Path, data: L.LightningDataModule | None = None, **kwargs
) -> Path:
    L.seed_everything(0)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        **kwargs,
    )
    trainer.fit(module, data)
    trainer.save_checkpoint(path)
    return path


@pytest.fixture
def workdir(tmp_path, monkeypatch, micro_model_dir):
    """Training's cwd, holding the base model at the relative path ``base``."""
    train_dir = tmp_path / "train"
    shutil.copytree(micro_model_dir, train_dir / "base")
    monkeypatch.chdir(train_dir)
    return train_dir


def sft_data(tokenizer) -> SFTDataModule:
    return SFTDataModule(train="embedded:reviews", embedded_size=16, max_length=48, batch_size=8, tokenizer=tokenizer)


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


IDS = torch.tensor([[1, 5, 9, 13, 4, 7, 2]])


def test_lora_sft_export_loads_with_peft_from_another_directory(workdir, tmp_path, monkeypatch):
    module = SFTModule(ModelSpec(name_or_path="base", lora=LoraSpec(r=2, lora_dropout=0.0)), optimizer=OPT)
    ckpt = train_and_checkpoint(module, workdir / "sft.ckpt", sft_data(module.tokenizer), max_steps=2)
    main(["export", "--ckpt", str(ckpt), "--out", str(tmp_path / "adapters")])
    main(["export", "--ckpt", str(ckpt), "--out", str(tmp_path / "merged"), "--merge"])
    expected = logits(module.policy, IDS)

    monkeypatch.chdir(tmp_path)  # anywhere else: the relative `base` no longer resolves here
    config = json.loads((tmp_path / "adapters" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(workdir / "base")
    assert not (tmp_path / "adapters" / "model.safetensors").exists()  # adapters alone
    adapters = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapters")
    torch.testing.assert_close(logits(adapters, IDS), expected, rtol=0, atol=0)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not (tmp_path / "merged" / "adapter_config.json").exists()
    torch.testing.assert_close(logits(merged, IDS), expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(
        logits(AutoModelForCausalLM.from_pretrained(workdir / "base"), IDS), expected
    )  # it trained
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "adapters")
    assert (
        tokenizer.padding_side == "left" and AutoTokenizer.from_pretrained(tmp_path / "merged").padding_side == "left"
    )


def test_rl_stage_export_is_the_trained_policy(workdir, tmp_path, monkeypatch):
    rollout = RolloutSpec(
        prompt_pool=16,
        num_prompts=4,
        update_epochs=1,
        minibatch_groups=2,
        max_prompt_tokens=16,
        sampling=SamplingSpec(max_new_tokens=6),
    )
    module = P3OModule(ModelSpec(name_or_path="base"), reward_model="embedded:reviews", rollout=rollout, optimizer=OPT)
    ckpt = train_and_checkpoint(module, workdir / "p3o.ckpt", max_epochs=1)
    out = export_checkpoint(ckpt, tmp_path / "policy")
    monkeypatch.chdir(tmp_path)
    exported = AutoModelForCausalLM.from_pretrained(out)
    trained = module.policy.state_dict()
    assert exported.state_dict().keys() == trained.keys()
    assert all(torch.equal(exported.state_dict()[k], trained[k]) for k in trained)
    assert AutoTokenizer.from_pretrained(out).padding_side == "left"


def test_reward_stage_export_scores_like_the_module(workdir, tmp_path, monkeypatch):
    module = RewardModule(ModelSpec(name_or_path="base", lora=LoraSpec(r=2, lora_dropout=0.0)), optimizer=OPT)
    data = PreferenceDataModule(train=str(TRL), val=str(TRL), max_length=64, batch_size=2)
    ckpt = train_and_checkpoint(module, workdir / "rm.ckpt", data, max_steps=2)
    out = export_checkpoint(ckpt, tmp_path / "rm", merge=True)
    monkeypatch.chdir(tmp_path)
    exported = AutoModelForSequenceClassification.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    texts = ["rate the tea : it is good .", "rate the bike : i hate it"]  # no final EOS (= pad here)
    ours = reward_scores(
        module.reward_model.eval(),
        collate([Encoded([], ids) for ids in tokenizer(texts)["input_ids"]], tokenizer.pad_token_id),
    )
    # HF pools at the last token that is not pad_token_id, whichever side pads
    for side in ("left", "right"):
        tokenizer.padding_side = side
        with torch.no_grad():
            plain = exported(**tokenizer(texts, return_tensors="pt", padding=True)).logits.squeeze(-1)
        torch.testing.assert_close(plain, ours, rtol=1e-5, atol=1e-5)


def test_export_refuses_what_it_cannot_read(tmp_path, workdir):
    with pytest.raises(ConfigError, match="--ckpt .*missing.ckpt: no such file"):
        export_checkpoint(tmp_path / "missing.ckpt", tmp_path / "out")
    with pytest.raises(ValueError, match="pass --stage"):
        stage_class({"policy": None, "unknown_knob": 1})
    assert stage_class({"policy": None, "reward_model": "x", "clip_epsilon": 0.2}).__name__ == "RLOOModule"
    module = SFTModule(ModelSpec(name_or_path="./base"), optimizer=OPT)
    ckpt = train_and_checkpoint(module, workdir / "sft.ckpt", sft_data(module.tokenizer), max_steps=1)
    shutil.rmtree(workdir / "base")
    with pytest.raises(ConfigError, match="run export from the directory training ran in"):
        export_checkpoint(ckpt, tmp_path / "out")


def test_save_pretrained_makes_a_relative_adapter_base_absolute(workdir, micro_tokenizer):
    module = SFTModule(ModelSpec(name_or_path="base", lora=LoraSpec(r=2)))
    out = save_pretrained(module.policy, micro_tokenizer, workdir / "saved")
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(workdir / "base")


def test_export_of_a_checkpoint_written_under_the_cli(tmp_path, monkeypatch):
    """LightningCLI stores the parsed config (plain dicts, `_class_path`) as hyperparameters."""
    from test_cli import micro_config, write_config

    from lit_p3o.cli import LitP3OCLI

    monkeypatch.setattr("sys.argv", ["lit-p3o"])
    config = write_config(tmp_path, micro_config(tmp_path))
    cli = LitP3OCLI(
        args=["fit", "--config", str(config), "--model.init_args.model.lora.r=2", "--trainer.enable_checkpointing=true"]
    )
    [ckpt] = (tmp_path / "logs" / "checkpoints").glob("*.ckpt")
    assert "_class_path" in torch.load(ckpt, weights_only=False)["hyper_parameters"]
    out = export_checkpoint(ckpt, tmp_path / "exported")  # adapters on an in-memory base: saved merged
    torch.testing.assert_close(
        logits(AutoModelForCausalLM.from_pretrained(out), IDS), logits(cli.model.policy, IDS), rtol=1e-5, atol=1e-5
    )


def test_adapters_on_saved_adapters_are_exported_merged(workdir, tmp_path, monkeypatch, micro_tokenizer, capsys):
    """LoRA SFT → LoRA on top: peft cannot load adapters whose base is an adapter directory."""
    sft = SFTModule(ModelSpec(name_or_path="base", lora=LoraSpec(r=2, lora_dropout=0.0)))
    with torch.no_grad():
        for name, p in sft.policy.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
    save_pretrained(sft.policy, micro_tokenizer, workdir / "sft")
    module = SFTModule(ModelSpec(name_or_path="sft", lora=LoraSpec(r=2, lora_dropout=0.0)), optimizer=OPT)
    ckpt = train_and_checkpoint(module, workdir / "second.ckpt", sft_data(module.tokenizer), max_steps=1)
    out = export_checkpoint(ckpt, tmp_path / "exported")
    assert "is itself an adapter directory; merging" in capsys.readouterr().out
    monkeypatch.chdir(tmp_path)
    exported = AutoModelForCausalLM.from_pretrained(out)
    torch.testing.assert_close(logits(exported, IDS), logits(module.policy, IDS), rtol=1e-5, atol=1e-5)
