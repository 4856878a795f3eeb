"""Reward functions as TRL users write them (issue 25, part 2): conversational prompts give a
function message lists (``completion[0]["content"]``), each reward term is logged on its own
(``rollout/reward/<name>/...``), and None means "does not apply" in a weighted sum."""

from __future__ import annotations

import csv
import json
import math

import lightning as L
import pytest
import torch
from hf_fixtures import llama3_chat_tokenizer, save_model_dir
from lightning.pytorch.loggers import CSVLogger
from micro import MICRO_ARCH

from lit_p3o import GuardSpec, ModelSpec, OptimizerSpec, P3OModule, RolloutSpec, SamplingSpec
from lit_p3o.data.encoding import encode_example
from lit_p3o.data.prompts import Prompt
from lit_p3o.scoring import RewardSpec, build_scorer

HERE = __name__
CONVERSATIONS = [
    [{"role": "user", "content": "What is 12 + 7?"}],
    [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "Hello!"}],
]
CALLS: list[dict] = []


# Two reward functions written as in TRL's documentation (GRPOTrainer's reward_funcs).
def reward_len(completions, **kwargs):
    return [-abs(20 - len(completion[0]["content"])) for completion in completions]


def last_turn_is_user(prompts, completions, **kwargs):
    CALLS.append({"prompts": prompts, "completions": completions, **kwargs})
    return [1.0 if prompt[-1]["role"] == "user" else 0.0 for prompt in prompts]


def test_a_trl_conversational_reward_runs_unchanged(tmp_path):
    tokenizer = llama3_chat_tokenizer()
    model_dir = save_model_dir(tmp_path / "chat", tokenizer)
    rows = [{"prompt": c, "answer": str(i)} for i, c in enumerate(CONVERSATIONS)]
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    L.seed_everything(0)
    stage = P3OModule(
        ModelSpec(name_or_path=str(model_dir)),
        [RewardSpec(f"{HERE}:reward_len", 1.0), RewardSpec(f"{HERE}:last_turn_is_user", 0.5)],
        rollout=RolloutSpec(
            prompts=str(path),
            prompt_pool=None,
            num_prompts=2,
            num_responses=2,
            update_epochs=1,
            minibatch_groups=2,
            max_prompt_tokens=64,
            sampling=SamplingSpec(max_new_tokens=4),
        ),
        optimizer=OptimizerSpec(learning_rate=1e-2),
    )
    CALLS.clear()
    fit(stage, tmp_path)
    assert stage.trainer.global_step == 1
    (call,) = CALLS
    assert sorted(map(json.dumps, call["prompts"])) == sorted(json.dumps(c) for c in CONVERSATIONS for _ in range(2))
    assert all(c[0]["role"] == "assistant" and isinstance(c[0]["content"], str) for c in call["completions"])
    assert call["answer"] == [str(CONVERSATIONS.index(p)) for p in call["prompts"]]  # the row's columns still come
    expected = [-abs(20 - len(c[0]["content"])) + 0.5 for c in call["completions"]]
    assert torch.cat([g.scores for g in stage.buffer.groups]).tolist() == pytest.approx(expected)


def recorded(prompts, completions, **kwargs):
    CALLS.append({"prompts": prompts, "completions": completions, **kwargs})
    return [0.0] * len(completions)


def length(completions, **kwargs):
    return [float(len(c.split())) for c in completions]


def every_other_none(completions, **kwargs):
    """Applies to every other completion only (a verifier for some prompts, say)."""
    return [None if i % 2 else 3.0 for i in range(len(completions))]


def micro_stage(reward, guards=None, **rollout) -> P3OModule:
    L.seed_everything(0)
    spec = dict(num_prompts=2, num_responses=2, update_epochs=1, minibatch_groups=2, max_prompt_tokens=16)
    return P3OModule(
        ModelSpec(architecture=dict(MICRO_ARCH), tokenizer="embedded:reviews"),
        reward,
        rollout=RolloutSpec(prompt_pool=16, sampling=SamplingSpec(max_new_tokens=4), **{**spec, **rollout}),
        guards=guards,
    )


def logged_terms(stage, tmp_path, name: str) -> dict[str, str]:
    """The CSV row of the one rollout that logged reward term ``name``."""
    logger = CSVLogger(tmp_path, name="logs")
    fit(stage, tmp_path, logger=logger)
    with open(f"{logger.log_dir}/metrics.csv") as f:
        (row,) = [r for r in csv.DictReader(f) if r.get(f"rollout/reward/{name}/mean")]
    return row


@pytest.mark.parametrize("update_epochs", [1, 2])  # on-policy (logged after the update) and replayed
def test_each_reward_term_reaches_the_logger_and_none_leaves_the_sum(tmp_path, update_epochs):
    reward = [RewardSpec(f"{HERE}:length", 1.0), RewardSpec(f"{HERE}:every_other_none", 2.0)]
    stage = micro_stage(reward, update_epochs=update_epochs)
    row = logged_terms(stage, tmp_path, "length")
    tok = stage.tokenizer
    lengths = [
        float(len(tok.decode(r, skip_special_tokens=True).split())) for g in stage.buffer.groups for r in g.responses
    ]
    assert float(row["rollout/reward/length/mean"]) == pytest.approx(sum(lengths) / 4)
    assert float(row["rollout/reward/length/std"]) == pytest.approx(torch.tensor(lengths).std().item())
    assert float(row["rollout/reward/length/none_fraction"]) == 0.0
    assert float(row["rollout/reward/every_other_none/mean"]) == 3.0
    assert float(row["rollout/reward/every_other_none/none_fraction"]) == 0.5
    scores = torch.cat([g.scores for g in stage.buffer.groups]).tolist()
    assert scores == [n + (6.0 if i % 2 == 0 else 0.0) for i, n in enumerate(lengths)]  # None: term left out


def test_weighted_sum_with_none_by_hand():
    tok = llama3_chat_tokenizer()
    rows = [encode_example(tok, "a", " b c", 32), encode_example(tok, "d", " e", 32)]
    mixed = build_scorer([RewardSpec(f"{HERE}:every_other_none", 2.0), RewardSpec(f"{HERE}:length", -1.0)], tok)
    assert mixed.names == ["every_other_none", "length"]
    assert mixed.score_examples(rows, [True, True]).tolist() == [6.0 - 2.0, -1.0]
    alone = build_scorer([RewardSpec(f"{HERE}:every_other_none"), RewardSpec(f"{HERE}:every_other_none")], tok)
    assert alone.names == ["every_other_none", "every_other_none_2"]
    scores = alone.score_examples(rows, [True, True])
    assert scores[0] == 6.0 and math.isnan(scores[1])  # no term applies: NaN, the guard skips the update
    CALLS.clear()  # plain prompts keep giving text
    build_scorer(f"{HERE}:recorded", tok).score_examples(rows, [True, True], prompts=[Prompt("a"), Prompt("d")])
    assert CALLS == [{"prompts": ["a", "d"], "completions": [" b c", " e"]}]


def fit(stage, tmp_path, logger=False):
    L.Trainer(
        accelerator="cpu",
        max_epochs=1,
        logger=logger,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
    ).fit(stage)


def test_terms_are_logged_when_the_update_is_skipped(tmp_path):
    """One function returning None for some completions: those rewards are NaN, the on-policy
    update is skipped, and the term's none_fraction still reaches the logger."""
    stage = micro_stage(f"{HERE}:every_other_none", guards=GuardSpec(max_skipped_fraction=1.0))
    row = logged_terms(stage, tmp_path, "every_other_none")
    assert stage.skipped_steps == 1
    assert float(row["rollout/reward/every_other_none/none_fraction"]) == 0.5
