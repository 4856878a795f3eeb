"""From Python, stages and data modules take objects, not only paths: a ready model (and its
tokenizer), a peft model, a ``datasets.Dataset``/``DatasetDict``, a list of prompts, a reward
function."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from datasets import Dataset, DatasetDict
from helpers import cpu_trainer as trainer
from micro import MICRO_ARCH

from lit_p3o import P3OModule, PPOModule, RewardModule, SFTModule
from lit_p3o.data.issues import DataFormatError
from lit_p3o.data.preferences import PreferenceDataModule
from lit_p3o.data.prompts import load_prompts
from lit_p3o.data.sft import SFTDataModule
from lit_p3o.evaluation import EvaluationSpec
from lit_p3o.generation import SamplingSpec
from lit_p3o.models import ModelSpec, build_causal_lm, build_reward_model, has_adapters
from lit_p3o.rollout import RolloutSpec

PROMPTS = [f"rate the {item} :" for item in ("tea", "mug", "lamp", "bike")]
FITS = RolloutSpec(max_prompt_tokens=16)  # within the micro model's 64 positions


def micro_lm(tokenizer):
    torch.manual_seed(0)
    return build_causal_lm(ModelSpec(architecture=dict(MICRO_ARCH), tokenizer="embedded:reviews"), tokenizer)


def test_stages_take_a_ready_model_with_its_tokenizer(micro_tokenizer):
    model = micro_lm(micro_tokenizer).eval()
    sft = SFTModule(model=model, tokenizer=micro_tokenizer)
    assert sft.policy is model and model.training
    assert sft.tokenizer is micro_tokenizer and "model" not in sft.hparams  # not copied into the hparams
    scorer = build_reward_model(ModelSpec(architecture=dict(MICRO_ARCH), tokenizer="embedded:reviews"), micro_tokenizer)
    assert RewardModule(model=scorer, tokenizer=micro_tokenizer).reward_model is scorer
    p3o = P3OModule(policy=model, reward_model="embedded:reviews", tokenizer=micro_tokenizer, rollout=FITS)
    assert p3o.policy is model
    assert p3o.reference.copy is not None and p3o.reference.copy is not model  # a frozen copy, as from a spec
    with pytest.raises(ValueError, match=r"P3OModule.policy: a ready LlamaForCausalLM .* `tokenizer=`"):
        P3OModule(policy=model, reward_model="embedded:reviews", rollout=FITS)
    with pytest.raises(TypeError, match=r"SFTModule.model: expected a ModelSpec, .* got Linear"):
        SFTModule(model=torch.nn.Linear(2, 2), tokenizer=micro_tokenizer)


def test_ppo_takes_a_ready_critic_and_keeps_it_out_of_the_hparams(micro_tokenizer, tmp_path):
    critic = micro_lm(micro_tokenizer)
    ppo = PPOModule(
        policy=micro_lm(micro_tokenizer),
        reward_model="embedded:reviews",
        critic=critic,
        tokenizer=micro_tokenizer,
        rollout=RolloutSpec(
            prompt_pool=4,
            num_prompts=2,
            minibatch_groups=2,
            max_prompt_tokens=16,
            update_epochs=2,
            sampling=SamplingSpec(max_new_tokens=4),
        ),
    )
    assert ppo.critic is critic and not ppo.policy_states
    assert "critic" not in ppo.hparams and "policy" not in ppo.hparams
    before = {k: v.clone() for k, v in critic.state_dict().items()}
    trainer(tmp_path).fit(ppo)
    assert any(
        not torch.equal(before[k], v) for k, v in critic.state_dict().items()
    )  # trained (from the 2nd step: the value head starts at zero)


def test_a_peft_model_is_the_policy_and_its_adapters_off_the_reference(micro_tokenizer):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(micro_lm(micro_tokenizer), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    p3o = P3OModule(policy=model, reward_model="embedded:reviews", tokenizer=micro_tokenizer, rollout=FITS)
    assert p3o.policy is model and has_adapters(p3o.policy)
    assert p3o.reference.copy is None  # π_ref is the policy with its adapters switched off


def test_sft_data_from_a_dataset(micro_tokenizer):
    rows = [{"prompt": p, "completion": " good"} for p in PROMPTS]
    dm = SFTDataModule(train=Dataset.from_list(rows), val_fraction=0.0, max_length=32, tokenizer=micro_tokenizer)
    dm.setup("fit")
    assert len(dm.train_examples) == 4 and "train" not in dm.hparams
    decoded = {micro_tokenizer.decode(e.prompt_ids, skip_special_tokens=True) for e in dm.train_examples}
    assert {" ".join(p.split()) for p in decoded} == set(PROMPTS)
    bad = Dataset.from_list([{"prompt": "rate the tea :", "answer": "x"}])
    with pytest.raises(DataFormatError, match="the Dataset given"):
        SFTDataModule(train=bad, tokenizer=micro_tokenizer).setup("fit")


def test_preference_data_from_a_dataset_dict(micro_tokenizer):
    def pairs(n):
        return Dataset.from_list([{"prompt": PROMPTS[i % 4], "chosen": " good", "rejected": " bad"} for i in range(n)])

    splits = DatasetDict({"train": pairs(6), "test": pairs(2)})
    dm = PreferenceDataModule(train=splits, val=splits, max_length=32, tokenizer=micro_tokenizer)
    dm.setup("fit")
    assert (len(dm.train_pairs), len(dm.val_pairs)) == (6, 2)
    with pytest.raises(DataFormatError, match=r"the DatasetDict given: no split 'dev'; available splits: train, test"):
        PreferenceDataModule(train=splits, train_split="dev", tokenizer=micro_tokenizer).setup("fit")


CALLS: list[dict] = []


def completion_length(prompts, completions, **columns):
    CALLS.append({"prompts": prompts, "completions": completions})
    return [float(len(c.split())) for c in completions]


def p3o(reward, prompts, evaluation=None, **rollout) -> P3OModule:
    L.seed_everything(0)
    kwargs = dict(
        prompts=prompts,
        num_prompts=4,
        num_responses=2,
        update_epochs=1,
        minibatch_groups=4,
        max_prompt_tokens=16,
        sampling=SamplingSpec(max_new_tokens=4),
        **rollout,
    )
    policy = ModelSpec(architecture=dict(MICRO_ARCH), tokenizer="embedded:reviews")
    return P3OModule(policy, reward, rollout=RolloutSpec(**kwargs), evaluation=evaluation)


def test_a_list_of_prompts_for_the_rollout_and_the_evaluation(tmp_path):
    CALLS.clear()
    evaluation = EvaluationSpec(
        prompts=PROMPTS[:3], num_prompts=None, max_prompt_tokens=16, sampling=SamplingSpec(max_new_tokens=4)
    )
    stage = p3o(f"{__name__}:completion_length", PROMPTS, evaluation, prompt_pool=None)
    trainer(tmp_path).fit(stage)
    (call,) = [c for c in CALLS if len(c["prompts"]) == 8]  # the rollout: 4 prompts x 2 responses
    assert sorted(set(call["prompts"])) == sorted(PROMPTS)
    assert all(c["prompts"] == PROMPTS[:3] for c in CALLS if c is not call)  # the validation's
    predictions = trainer(tmp_path).predict(stage)
    assert [row["prompt"] for batch in predictions for row in batch] == PROMPTS[:3]
    with pytest.raises(ValueError, match=r"prompts\[1\]: expected a non-empty string, got ''"):
        load_prompts(["rate the tea :", ""])


def test_a_python_function_as_the_reward(tmp_path):
    CALLS.clear()
    stage = p3o(completion_length, "embedded:reviews", prompt_pool=16)
    trainer(tmp_path).fit(stage)
    (call,) = CALLS
    scores = torch.cat([g.scores for g in stage.buffer.groups])
    assert len(call["completions"]) == 8
    assert scores.tolist() == [float(len(c.split())) for c in call["completions"]]


def test_a_weighted_reward_built_from_python_resumes_and_exports(tmp_path):
    """RewardSpec objects land in the hyperparameters; a checkpoint holding them must load with
    torch's safe loader (resume through Lightning, and `lit-p3o export`)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lit_p3o.commands import export_checkpoint
    from lit_p3o.scoring import RewardSpec

    def stage() -> P3OModule:
        torch.manual_seed(0)
        reward = [RewardSpec("embedded:reviews", 1.0), RewardSpec(f"{__name__}:completion_length", 0.1)]
        return p3o(reward, "embedded:reviews", prompt_pool=16)

    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0)
    L.Trainer(
        accelerator="cpu",
        max_epochs=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[ckpt],
        default_root_dir=tmp_path,
    ).fit(stage())
    last = tmp_path / "ckpt" / "last.ckpt"
    torch.load(last, weights_only=True)  # no UnpicklingError: every class in it is allowed
    resumed = L.Trainer(
        accelerator="cpu",
        max_epochs=2,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
    )
    resumed.fit(stage(), ckpt_path=str(last))
    assert resumed.global_step > 0 and resumed.current_epoch == 2
    out = export_checkpoint(last, tmp_path / "export")
    assert (out / "config.json").is_file()
