"""Python objects resume (issue 25, part 3): whatever a stage is given as a Python object (a
ready model and its tokenizer, a critic, a reward function, a reward model object, a
``datasets.Dataset`` or a list of prompts, data modules' datasets) stays out of its checkpoint,
which torch's safe loader then reads; training resumes with the same objects passed again, and
``export_checkpoint`` takes them again (the command line names what is missing)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from datasets import Dataset, DatasetDict
from lightning.pytorch.callbacks import ModelCheckpoint
from micro import MICRO_ARCH
from transformers import AutoModelForCausalLM

from lit_p3o import (
    EvaluationSpec,
    ModelSpec,
    P3OModule,
    PPOModule,
    RewardModule,
    RewardScorer,
    RolloutSpec,
    SamplingSpec,
    SFTModule,
)
from lit_p3o.commands import export_checkpoint
from lit_p3o.data.preferences import PreferenceDataModule
from lit_p3o.data.prompts import load_prompts
from lit_p3o.data.sft import SFTDataModule
from lit_p3o.errors import ConfigError
from lit_p3o.models import build_causal_lm, build_reward_model

ITEMS = ("tea", "mug", "lamp", "bike")
MICRO = ModelSpec(architecture=dict(MICRO_ARCH), tokenizer="embedded:reviews")


def length(prompts, completions, **kwargs):
    return [float(len(c)) for c in completions]


def rollout(prompts) -> RolloutSpec:
    return RolloutSpec(
        prompts=prompts,
        prompt_pool=None,
        num_prompts=2,
        num_responses=2,
        update_epochs=1,
        minibatch_groups=2,
        max_prompt_tokens=16,
        sampling=SamplingSpec(max_new_tokens=4),
    )


def fit_and_resume(build, tmp_path: Path, data=None) -> Path:
    """Fit one epoch with a checkpoint, read it with torch's safe loader, resume a freshly built
    stage (the same objects passed again) for a second epoch; the checkpoint's path."""
    L.seed_everything(0)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0)
    trainer(tmp_path, 1, callbacks=[ckpt]).fit(build(), datamodule=data and data())
    last = tmp_path / "ckpt" / "last.ckpt"
    torch.load(last, weights_only=True)  # no UnpicklingError: no Python object inside
    resumed = trainer(tmp_path, 2, enable_checkpointing=False)
    resumed.fit(build(), datamodule=data and data(), ckpt_path=str(last))
    assert resumed.current_epoch == 2 and resumed.global_step == 2
    return last


def trainer(tmp_path: Path, epochs: int, **kwargs) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        max_epochs=epochs,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
        **kwargs,
    )


def ready_lm(tokenizer):
    torch.manual_seed(0)
    return build_causal_lm(MICRO, tokenizer)


def test_an_rl_stage_of_python_objects_resumes_and_exports(micro_tokenizer, tmp_path):
    """A ready policy and its tokenizer, a reward function, a Dataset of prompts and a list of
    Prompt strings for the evaluation."""
    prompts = Dataset.from_list([{"prompt": f"rate the {item} :", "item": item} for item in ITEMS])
    evaluation = EvaluationSpec(
        prompts=load_prompts(prompts, limit=2), num_prompts=None, max_prompt_tokens=16, sampling=SamplingSpec()
    )

    def stage() -> P3OModule:
        return P3OModule(
            policy=ready_lm(micro_tokenizer),
            reward_model=length,
            tokenizer=micro_tokenizer,
            rollout=rollout(prompts),
            evaluation=evaluation,
        )

    built = stage()
    assert built.hparams["rollout"].prompts == "<Dataset given from Python>"
    assert built.rollout_spec.prompts is prompts  # the stage itself keeps the object
    assert built.hparams["evaluation"].prompts == [f"rate the {item} :" for item in ITEMS[:2]]
    assert all(type(p) is str for p in built.hparams["evaluation"].prompts)  # Prompt objects made plain
    last = fit_and_resume(stage, tmp_path)

    with pytest.raises(ConfigError, match=r"P3OModule was built from Python objects \(policy\), which checkpoints"):
        export_checkpoint(last, tmp_path / "refused")
    out = export_checkpoint(last, tmp_path / "export", policy=ready_lm(micro_tokenizer), tokenizer=micro_tokenizer)
    exported = AutoModelForCausalLM.from_pretrained(out)
    state = torch.load(last, weights_only=True)["state_dict"]
    torch.testing.assert_close(exported.model.embed_tokens.weight, state["policy.model.embed_tokens.weight"])


def test_a_reward_model_object_and_a_prompt_list_resume_and_export(micro_tokenizer, tmp_path):
    torch.manual_seed(0)
    scorer_model = build_reward_model(MICRO, micro_tokenizer)
    with torch.no_grad():
        scorer_model.score.weight.normal_(0, 1)
    scorer = RewardScorer(scorer_model, micro_tokenizer)
    prompts = load_prompts([f"rate the {item} :" for item in ITEMS])  # Prompt objects, a str subclass

    def stage() -> P3OModule:
        torch.manual_seed(0)
        return P3OModule(MICRO, scorer, rollout=rollout(prompts))

    assert "reward_model" not in stage().hparams
    with pytest.raises(
        TypeError, match=r"reward_model: a LlamaForSequenceClassification needs its tokenizer; pass Rew"
    ):
        P3OModule(MICRO, scorer_model, rollout=rollout(prompts))  # a bare model: refused, not called as a function
    last = fit_and_resume(stage, tmp_path)
    assert (export_checkpoint(last, tmp_path / "export") / "config.json").is_file()


def test_ppo_with_a_critic_object_resumes_and_exports(micro_tokenizer, tmp_path):
    def stage() -> PPOModule:
        return PPOModule(
            policy=ready_lm(micro_tokenizer),
            reward_model=length,
            critic=ready_lm(micro_tokenizer),
            tokenizer=micro_tokenizer,
            rollout=rollout([f"rate the {item} :" for item in ITEMS]),
        )

    last = fit_and_resume(stage, tmp_path)
    out = export_checkpoint(
        last,
        tmp_path / "export",
        policy=ready_lm(micro_tokenizer),
        critic=ready_lm(micro_tokenizer),
        tokenizer=micro_tokenizer,
    )
    assert (out / "config.json").is_file()


def test_sft_and_reward_stages_of_python_objects_resume_and_export(micro_tokenizer, tmp_path):
    rows = [{"prompt": f"rate the {item} :", "completion": " good"} for item in ITEMS]
    sft_last = fit_and_resume(
        lambda: SFTModule(model=ready_lm(micro_tokenizer), tokenizer=micro_tokenizer),
        tmp_path / "sft",
        data=lambda: SFTDataModule(
            train=Dataset.from_list(rows), val_fraction=0.0, max_length=32, batch_size=4, tokenizer=micro_tokenizer
        ),
    )
    with pytest.raises(ConfigError, match=r"SFTModule was built from Python objects \(model\)"):
        export_checkpoint(sft_last, tmp_path / "refused")
    out = export_checkpoint(sft_last, tmp_path / "sft_out", model=ready_lm(micro_tokenizer), tokenizer=micro_tokenizer)
    assert (out / "config.json").is_file()

    def ready_rm():
        torch.manual_seed(0)
        return build_reward_model(MICRO, micro_tokenizer)

    pairs = Dataset.from_list(
        [{"prompt": f"rate the {item} :", "chosen": " good", "rejected": " bad"} for item in ITEMS]
    )
    rm_last = fit_and_resume(
        lambda: RewardModule(model=ready_rm(), tokenizer=micro_tokenizer),
        tmp_path / "rm",
        data=lambda: PreferenceDataModule(
            train=DatasetDict({"train": pairs}),
            val_fraction=0.0,
            max_length=32,
            batch_size=4,
            tokenizer=micro_tokenizer,
        ),
    )
    out = export_checkpoint(rm_last, tmp_path / "rm_out", model=ready_rm(), tokenizer=micro_tokenizer)
    assert (out / "config.json").is_file()
