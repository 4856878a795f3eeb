"""The sampler's log-probs in the buffer, the sampler–trainer gap, and the truncated
importance-sampling correction (TRL's ``vllm_importance_sampling_correction``) in every RL stage."""

import dataclasses
import math

import lightning as L
import pytest
import torch
from helpers import cpu_trainer
from micro import MICRO_ARCH

import lit_p3o.rollout as rollout_module
from lit_p3o import (
    GRPOModule,
    ModelSpec,
    OnlineDPOModule,
    P3OModule,
    PPOModule,
    RLOOModule,
    RolloutSpec,
    SamplingSpec,
)
from lit_p3o.buffer import Group, collate_groups
from lit_p3o.errors import locate
from lit_p3o.generation import Sampled
from lit_p3o.losses import (
    dpo_loss,
    grpo_loss,
    p3o_loss,
    ppo_policy_loss,
    rloo_loss,
    sampler_logp_gap,
    truncated_importance_weights,
)
from lit_p3o.rollout import rollout

CAP = 2.0


def test_truncated_importance_weights_by_hand():
    log_ratio = torch.tensor([0.0, math.log(1.5), math.log(5.0), -1.0])
    expected = torch.tensor([1.0, 1.5, CAP, math.exp(-1.0)])
    torch.testing.assert_close(truncated_importance_weights(log_ratio, CAP), expected)
    assert not truncated_importance_weights(log_ratio.requires_grad_(), CAP).requires_grad
    with pytest.raises(ValueError, match="cap must be > 0"):
        truncated_importance_weights(log_ratio, 0.0)


def test_sampler_logp_gap_by_hand():
    sampler = torch.tensor([[-1.0, -2.0, 0.0], [-3.0, 0.0, 0.0]])
    trainer = torch.tensor([[-1.5, -1.0, -9.0], [-2.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert sampler_logp_gap(sampler, trainer, mask).item() == pytest.approx((0.5 + 1.0 + 1.0) / 3)


def grad_of(loss, x: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """The gradient of ``loss(x, weights)`` with respect to ``x``."""
    x = x.clone().requires_grad_()
    loss(x, weights).backward()
    return x.grad


@pytest.mark.parametrize("clip", [None, 0.2])
def test_loss_functions_scale_each_terms_gradient_by_its_weight(clip):
    torch.manual_seed(0)
    g, k = 3, 4
    rewards, logratio = torch.randn(g, k), 0.3 * torch.randn(g, k)
    weights = truncated_importance_weights(torch.randn(g, k), CAP)
    advantages = rewards - rewards.mean(1, keepdim=True)
    cases = [  # (loss of x given weights, x): each term of x depends on its own x only
        (lambda x, w: rloo_loss(x, advantages, clip, w), logratio),
        (lambda x, w: p3o_loss(x, rewards, 0.2, "v1", w)[0], logratio),
        (lambda x, w: ppo_policy_loss(x, torch.zeros_like(x), advantages, torch.ones_like(x), 0.2, w)[0], logratio),
        (lambda x, w: grpo_loss(x, torch.zeros_like(x), advantages, torch.ones_like(x), weights=w)[0], logratio),
    ]
    pairs = torch.randn(5, 4)
    pair_weights = truncated_importance_weights(torch.randn(5), CAP)
    for loss, x in cases:
        torch.testing.assert_close(grad_of(loss, x, weights), weights * grad_of(loss, x, None))
        torch.testing.assert_close(loss(x, torch.ones_like(x)), loss(x, None))
    dpo = lambda chosen, w: dpo_loss(chosen, pairs[:, 1], pairs[:, 2], pairs[:, 3], 0.1, w)  # noqa: E731
    chosen = pairs[:, 0]
    torch.testing.assert_close(grad_of(dpo, chosen, pair_weights), pair_weights * grad_of(dpo, chosen, None))
    v2 = lambda x, w: p3o_loss(x, rewards, 0.2, "v2", w)[0]  # noqa: E731
    torch.testing.assert_close(v2(logratio, torch.ones_like(logratio)), v2(logratio, None))


# ------------------------------------------------------------------ stages on hand-built groups

SPEC = ModelSpec(architecture=MICRO_ARCH, tokenizer="embedded:reviews")
# Σ_t (logp_old − logp_sampler) of each response: weights 1, 1.5, 2 (capped from 4) and 0.5
SEQUENCE_LOG_RATIOS = [[0.0, math.log(1.5)], [math.log(4.0), -math.log(2.0)]]


def hand_groups(sampler_equals_trainer: bool = False) -> list[Group]:
    """Two groups of two responses with per-token logp_old and sampler log-probs whose
    per-response sums differ by :data:`SEQUENCE_LOG_RATIOS` (spread unevenly over the tokens)."""
    torch.manual_seed(1)
    groups = []
    for g, log_ratios in enumerate(SEQUENCE_LOG_RATIOS):
        responses = [[5 + g, 6, 7, 8][: 3 + k] for k in range(2)]
        logp_old = [-torch.rand(len(r)) - 0.1 for r in responses]
        sampler = []
        for old, total in zip(logp_old, log_ratios):
            share = torch.rand(len(old))
            sampler.append(old if sampler_equals_trainer else old - total * share / share.sum())
        groups.append(
            Group(
                prompt_ids=[1, 9 + g],
                responses=responses,
                logp_old=logp_old,
                logp_ref=[t - 0.05 for t in logp_old],
                scores=torch.tensor([1.0, -0.5 + g]),
                kl=torch.tensor([0.1, 0.2]),
                rewards=torch.tensor([0.9, -0.7 + g]),
                ended=torch.tensor([True, False]),
                extras={"values": [torch.rand(len(r)) for r in responses]},
                sampler_logp=sampler,
            )
        )
    return groups


def stage_of(cls, **kwargs):
    L.seed_everything(0)
    rollout = RolloutSpec(
        num_prompts=2,
        num_responses=2,
        update_epochs=2,
        importance_sampling_cap=CAP,
        prompt_pool=8,
        max_prompt_tokens=16,
        sampling=SamplingSpec(max_new_tokens=8),
        **kwargs,
    )
    return cls(SPEC, "embedded:reviews", rollout=rollout)


STAGES = {  # stage, the level of its weights
    "p3o": (lambda: stage_of(P3OModule), "sequence"),
    "rloo": (lambda: stage_of(RLOOModule), "sequence"),
    "ppo": (lambda: stage_of(PPOModule), "token"),
    "dpo": (lambda: stage_of(OnlineDPOModule), "group"),
    "grpo": (lambda: stage_of(GRPOModule), "token"),
}


def loss_and_logp_grad(stage, batch):
    logp = batch.logp_old.clone().requires_grad_()  # ρ = 1
    states = torch.zeros(*logp.shape, stage.policy.config.hidden_size)
    loss = stage.compute_loss(batch, logp, states)[0]
    loss.backward()
    return loss.detach(), logp.grad


@pytest.mark.parametrize("name", list(STAGES))
def test_stage_losses_weigh_by_the_capped_ratio_of_trainer_to_sampler(name):
    build, level = STAGES[name]
    stage = build()
    groups = hand_groups()
    stage.buffer.fill(groups)
    batch = collate_groups(groups, stage.tokenizer.pad_token_id)
    mask = batch.response_mask
    weights = stage.importance_weights(batch, level)
    sequence = torch.tensor(SEQUENCE_LOG_RATIOS).exp().clamp(max=CAP)
    expected = {
        "sequence": sequence,
        "group": torch.tensor([sum(r) for r in SEQUENCE_LOG_RATIOS]).exp().clamp(max=CAP),
        "token": (batch.logp_old - batch.sampler_logp).exp().clamp(max=CAP) * mask,
    }[level]
    torch.testing.assert_close(weights, expected)
    assert weights.max() <= CAP and (weights == CAP).any()

    loss, grad = loss_and_logp_grad(stage, batch)
    capped_spec = stage.rollout_spec
    stage.rollout_spec = dataclasses.replace(capped_spec, importance_sampling_cap=None)
    plain_loss, plain_grad = loss_and_logp_grad(stage, batch)
    per_row = {
        "sequence": weights.reshape(-1, 1),
        "group": weights.repeat_interleave(2).reshape(-1, 1),
        "token": weights,
    }[level]
    torch.testing.assert_close(grad, per_row * plain_grad)
    assert not torch.equal(loss, plain_loss)

    # the sampler agreeing with the trainer: every weight 1, the loss unchanged
    same = collate_groups(hand_groups(sampler_equals_trainer=True), stage.tokenizer.pad_token_id)
    stage.rollout_spec = capped_spec
    ones = same.response_mask if level == "token" else torch.ones_like(weights)
    assert torch.equal(stage.importance_weights(same, level), ones)
    on = loss_and_logp_grad(stage, same)
    stage.rollout_spec = dataclasses.replace(capped_spec, importance_sampling_cap=None)
    off = loss_and_logp_grad(stage, same)
    assert torch.equal(on[0], off[0]) and torch.equal(on[1], off[1])


def test_groups_carry_the_sampler_logprobs_and_refuse_a_wrong_length():
    groups = hand_groups()
    batch = collate_groups(groups, 0)
    assert torch.equal(batch.sampler_logp[3, :4], groups[1].sampler_logp[1])
    assert torch.equal(batch.to("cpu").sampler_logp, batch.sampler_logp)
    fields = {f.name: getattr(groups[0], f.name) for f in dataclasses.fields(Group)}
    with pytest.raises(ValueError, match="sampler_logp needs one log-prob per response token"):
        Group(**{**fields, "sampler_logp": [t[:-1] for t in fields["sampler_logp"]]})
    with pytest.raises(ValueError, match="mixes groups with and without the sampler"):
        collate_groups([groups[0], dataclasses.replace(groups[1], sampler_logp=None)], 0)


# ------------------------------------------------------------------ the rollout


def micro_stage(**kwargs) -> P3OModule:
    L.seed_everything(0)
    spec = RolloutSpec(
        prompt_pool=16,
        num_prompts=2,
        num_responses=2,
        minibatch_groups=2,
        max_prompt_tokens=16,
        sampling=SamplingSpec(max_new_tokens=5),
        **kwargs,
    )
    return P3OModule(SPEC, "embedded:reviews", rollout=spec)


def test_importance_sampling_without_sampler_logprobs_is_a_config_error():
    stage = micro_stage(importance_sampling_cap=CAP)
    with pytest.raises(ValueError) as err:
        rollout(stage, ["rate the bike :", "rate the lamp :"], 0.05, stage.rollout_spec)
    config = {"model": {"class_path": "lit_p3o.P3OModule", "init_args": {"rollout": {"importance_sampling_cap": CAP}}}}
    line = locate(str(err.value), config)
    assert line.startswith(
        "model.init_args.rollout.importance_sampling_cap: got 2.0, but the sampler gives no log-probs"
    )
    assert "\n" not in line
    with pytest.raises(ValueError, match=r"RolloutSpec.importance_sampling_cap: must be > 0, got 0.0"):
        RolloutSpec(importance_sampling_cap=0.0)


@pytest.mark.parametrize("update_epochs", [1, 2])  # on-policy: the update gives logp_old and the gap
def test_sampler_logp_gap_is_logged_each_rollout(tmp_path, monkeypatch, update_epochs):
    """A sampler reporting log-probs 0 (probability 1) for every token: the gap is the mean
    |logp_old| over response tokens; the correction runs on them."""
    sample = rollout_module.sample_responses

    def with_logprobs(*args, **kwargs):
        out = sample(*args, **kwargs)
        return Sampled(out.examples, out.ended, [torch.zeros(len(e.response_ids)) for e in out.examples])

    monkeypatch.setattr(rollout_module, "sample_responses", with_logprobs)
    stage = micro_stage(update_epochs=update_epochs, importance_sampling_cap=CAP)
    stage.scorer.score_examples = lambda examples, ended, prompts=None: torch.randn(len(examples))
    logged, expected = [], []
    log_rollout = stage.log_rollout
    stage.log_rollout = lambda stats: (logged.append(stats), log_rollout(stats))

    class Expected(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if module.buffer.consumed == 0:
                old = batch.logp_old if batch.logp_old is not None else module.policy_forward(batch)[0].logp_old
                expected.append(float((old.abs() * batch.response_mask).sum() / batch.response_mask.sum()))
                assert batch.sampler_logp is not None

    cpu_trainer(tmp_path, max_epochs=2, callbacks=[Expected()]).fit(stage)
    assert [s["sampler_logp_gap"] for s in logged] == pytest.approx(expected, rel=1e-5)
    assert len(logged) == 2
