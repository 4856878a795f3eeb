"""GRPO and its variants (lit_p3o/stages/grpo.py): each formula of losses.py against hand or
autograd values, the stage's masking, dynamic sampling, overlong penalty and KL placement, and
runs through the trainer (K responses, replay, gradient accumulation, resume, DDP/FSDP2, CLI)."""

from __future__ import annotations

import copy
import os
import statistics
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from micro import MICRO_ARCH as MICRO

from lit_p3o import GRPOModule, KLSpec, ModelSpec, OptimizerSpec, RolloutSpec, SamplingSpec
from lit_p3o.buffer import RolloutBatch, collate_groups
from lit_p3o.commands.export import stage_class
from lit_p3o.data.prompts import load_prompts
from lit_p3o.losses import aggregate_token_loss, group_advantages, grpo_loss, k3_kl, overlong_penalty
from lit_p3o.rollout import rollout

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
EPS = 1e-4  # group_advantages' (TRL's)


# ---------------------------------------------------------------------------- the formulas


def test_group_advantages_per_scale_rewards_against_hand_values():
    rewards = torch.tensor([[1.0, 2.0, 3.0], [0.0, 3.0, 6.0], [5.0, 5.0, 5.0]])
    group = group_advantages(rewards, "group")
    # row means 2, 3, 5; unbiased row standard deviations 1, 3, 0
    expected = torch.tensor([[-1 / (1 + EPS), 0, 1 / (1 + EPS)], [-3 / (3 + EPS), 0, 3 / (3 + EPS)], [0, 0, 0]])
    torch.testing.assert_close(group, expected)
    batch_std = statistics.stdev([1, 2, 3, 0, 3, 6, 5, 5, 5])  # every reward of the batch
    expected = torch.tensor([[-1.0, 0, 1], [-3, 0, 3], [0, 0, 0]]) / (batch_std + EPS)
    torch.testing.assert_close(group_advantages(rewards, "batch"), expected)
    wider = torch.tensor([0.0, 10.0, 20.0, 30.0])  # the rollout's rewards, when the minibatch is part of it
    torch.testing.assert_close(
        group_advantages(rewards, "batch", wider),
        torch.tensor([[-1.0, 0, 1], [-3, 0, 3], [0, 0, 0]]) / (wider.std() + EPS),
    )
    torch.testing.assert_close(group_advantages(rewards, "none"), torch.tensor([[-1.0, 0, 1], [-3, 0, 3], [0, 0, 0]]))
    with pytest.raises(ValueError, match="scale_rewards must be one of"):
        group_advantages(rewards, "rank")


def test_aggregate_token_loss_per_loss_type_against_hand_values():
    per_token = torch.tensor([[1.0, 2.0, 3.0, 9.0], [4.0, 9.0, 9.0, 9.0], [7.0, 7.0, 7.0, 7.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])  # the third response left out
    assert aggregate_token_loss(per_token, mask, "grpo").item() == pytest.approx((6 / 3 + 4 / 1) / 2)
    assert aggregate_token_loss(per_token, mask, "bnpo").item() == pytest.approx(10 / 4)
    assert aggregate_token_loss(per_token, mask, "dr_grpo", max_completion_length=4).item() == pytest.approx(10 / 12)
    assert aggregate_token_loss(per_token, mask, "dapo", token_normalizer=8.0).item() == pytest.approx(10 / 8)
    assert aggregate_token_loss(per_token, mask, "dapo").item() == pytest.approx(10 / 4)  # alone: bnpo
    with pytest.raises(ValueError, match="dr_grpo needs max_completion_length"):
        aggregate_token_loss(per_token, mask, "dr_grpo")
    with pytest.raises(ValueError, match="loss_type must be one of"):
        aggregate_token_loss(per_token, mask, "ppo")


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_grpo_loss_on_policy_gradient_is_the_advantage_weighted_by_the_aggregation(loss_type):
    """At θ = θ_old (ρ = 1, nothing clipped) ∂L/∂logp_t = −A_i · w_t, w the aggregation's weight
    of token t: 1/(n_seq · |y_i|) (grpo), 1/Σm (bnpo), 1/(N · L) (dr_grpo), 1/normaliser (dapo)."""
    torch.manual_seed(0)
    logp = (-torch.rand(3, 4)).requires_grad_()
    mask = torch.tensor([[1.0, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
    advantages = torch.tensor([0.5, -2.0, 1.5])
    loss, clip_fraction = grpo_loss(
        logp, logp.detach(), advantages, mask, loss_type=loss_type, max_completion_length=5, token_normalizer=20.0
    )
    loss.backward()
    weight = {
        "grpo": mask / mask.sum(-1, keepdim=True) / 3,
        "bnpo": mask / mask.sum(),
        "dr_grpo": mask / (3 * 5),
        "dapo": mask / 20.0,
    }[loss_type]
    torch.testing.assert_close(logp.grad, -advantages[:, None] * weight)
    assert loss.item() == pytest.approx(-(advantages[:, None] * weight).sum().item(), abs=1e-6)
    assert clip_fraction == 0


def test_clip_higher_lets_a_positive_advantage_grow_further_and_keeps_the_lower_bound():
    """ρ = 1.25 with A > 0: clipped with ε = 0.2, not with ε_high = 0.28 (DAPO's clip-higher);
    ρ = 0.75 with A < 0: clipped by 1 − ε either way."""
    logp_old = torch.zeros(2, 1)
    ratios = torch.tensor([[1.25], [0.75]])
    advantages = torch.tensor([1.0, -1.0])
    mask = torch.ones(2, 1)

    def grad(epsilon_high):
        logp = ratios.log().requires_grad_()
        loss, clip_fraction = grpo_loss(logp, logp_old, advantages, mask, 0.2, epsilon_high, "bnpo")
        loss.backward()
        return logp.grad.flatten(), clip_fraction

    symmetric, fraction = grad(None)
    assert symmetric.tolist() == [0.0, 0.0] and fraction == 1.0
    higher, fraction = grad(0.28)
    # d/dlogp of −ρA/2 at ρ = 1.25, A = 1 is −1.25/2; the lower bound still clips the second
    torch.testing.assert_close(higher, torch.tensor([-1.25 / 2, 0.0]))
    assert fraction == 0.5


def test_k3_kl_value_and_gradient_against_hand_and_autograd():
    logp = torch.tensor([-1.0, -2.0, -0.5], requires_grad=True)
    ref = torch.tensor([-1.0, -1.0, -1.5])
    kl = k3_kl(logp, ref)
    d = ref - logp.detach()
    torch.testing.assert_close(kl.detach(), d.exp() - d - 1)  # 0 where π_θ = π_ref, > 0 elsewhere
    assert kl[0].item() == 0.0 and bool((kl[1:] > 0).all())
    (grad,) = torch.autograd.grad(kl.sum(), logp)
    torch.testing.assert_close(grad, 1 - d.exp())  # the estimator's stated gradient
    # in grpo_loss: β · k3 per token, aggregated like the surrogate (A = 0 isolates it)
    logp2 = logp.detach()[None].requires_grad_()
    loss, _ = grpo_loss(logp2, logp2.detach(), torch.zeros(1), torch.ones(1, 3), beta=0.1, logp_ref=ref[None])
    loss.backward()
    torch.testing.assert_close(logp2.grad, 0.1 * (1 - d.exp())[None] / 3)
    with pytest.raises(ValueError, match="needs logp_ref"):
        grpo_loss(logp2, logp2.detach(), torch.zeros(1), torch.ones(1, 3), beta=0.1)


def test_overlong_penalty_against_hand_values():
    lengths = torch.tensor([3, 6, 8, 10])
    # L = 10, B = 4: free up to 6 tokens, then −factor · (|y| − 6) / 4
    torch.testing.assert_close(overlong_penalty(lengths, 10, 4, 2.0), torch.tensor([0.0, 0.0, -1.0, -2.0]))
    with pytest.raises(ValueError, match="buffer must be in"):
        overlong_penalty(lengths, 10, 11)


# ---------------------------------------------------------------------------- the stage


def build(k: int = 3, defer_logp_old: bool = False, num_prompts: int = 4, **kwargs) -> GRPOModule:
    L.seed_everything(0)
    spec = RolloutSpec(
        prompt_pool=16,
        num_prompts=num_prompts,
        num_responses=k,
        update_epochs=1,
        minibatch_groups=num_prompts,
        max_prompt_tokens=16,
        sampling=SamplingSpec(max_new_tokens=6),
        defer_logp_old=defer_logp_old,
    )
    return GRPOModule(
        ModelSpec(architecture=MICRO, tokenizer="embedded:reviews"), "embedded:reviews", rollout=spec, **kwargs
    )


def fixed_batch(stage: GRPOModule, scores: torch.Tensor | None = None) -> RolloutBatch:
    """A seeded rollout of the stage's 4 groups (the buffer holds it), scores replaced by ``scores``."""
    torch.manual_seed(5)
    groups = rollout(stage, load_prompts("embedded:reviews", "train", 4), stage.kl_controller.beta, stage.rollout_spec)
    for i, g in enumerate(groups):
        g.scores.copy_(torch.randn(len(g.responses)) if scores is None else scores[i])
        g.rewards.copy_(g.scores - stage.kl_controller.beta * g.kl)
    stage.buffer.fill(groups)
    return collate_groups(groups, stage.tokenizer.pad_token_id)


def drift(stage: GRPOModule) -> None:
    """Move the policy away from π_ref (a copy taken at construction), so that the KL is not 0."""
    torch.manual_seed(9)
    with torch.no_grad():
        for p in stage.policy.parameters():
            p.add_(0.05 * torch.randn_like(p))


def logp_gradient(stage: GRPOModule, batch: RolloutBatch) -> tuple[torch.Tensor, dict]:
    """∂loss/∂logp ``[N, R]`` of the stage's compute_loss, and its statistics."""
    logp = batch.logp_old.clone().requires_grad_()
    loss, stats = stage.compute_loss(batch, logp, None)
    loss.backward()
    return logp.grad, stats


def row_has_gradient(grad: torch.Tensor) -> list[bool]:
    return grad.abs().sum(-1).gt(0).tolist()


def test_truncated_completions_leave_the_loss():
    stage = build(mask_truncated_completions=True)
    batch = fixed_batch(stage)
    batch.ended[:] = torch.tensor([[True, False, True]] * 2 + [[False, False, False]] * 2)
    grad, stats = logp_gradient(stage, batch)
    assert row_has_gradient(grad) == [True, False, True] * 2 + [False] * 6
    assert stats["truncated_masked"] == 8
    kept = build()
    kept.load_state_dict(stage.state_dict())
    assert all(row_has_gradient(logp_gradient(kept, batch)[0]))  # without the option every response counts


def test_groups_whose_scores_all_tie_are_dropped_and_counted():
    """Folded into the reward the KL makes r̃ differ within a tied group, which would otherwise
    give it (pure KL) advantages; dynamic sampling drops it by its scores."""
    scores = torch.tensor([[1.0, 1.0, 1.0], [0.0, 1.0, 0.0], [0.5, 0.5, 0.5], [2.0, 0.0, 1.0]])
    stage = build(kl_in_reward=True, kl=KLSpec(beta=0.5), drop_equal_reward_groups=True)
    drift(stage)
    batch = fixed_batch(stage, scores)
    assert not torch.equal(batch.rewards, batch.scores)
    grad, stats = logp_gradient(stage, batch)
    assert row_has_gradient(grad) == [False] * 3 + [True] * 3 + [False] * 3 + [True] * 3
    assert stats["dropped_groups"] == 2
    kept = build(kl_in_reward=True, kl=KLSpec(beta=0.5))
    kept.load_state_dict(stage.state_dict())
    assert all(row_has_gradient(logp_gradient(kept, batch)[0]))
    # every group tied: nothing is left, and GradientGuard's message says why the gradient is zero
    assert "rewards of a prompt's responses differed" in stage.zero_gradient_hint()
    batch.scores[:] = 1.0
    grad, stats = logp_gradient(stage, batch)
    assert not grad.any() and stats["dropped_groups"] == 4
    assert "left every response out of the loss" in stage.zero_gradient_hint()


def test_overlong_penalty_is_applied_to_scores_before_the_advantages():
    """Responses of 6 tokens (the limit) lose the whole penalty; equal raw scores then differ by
    length, so the group is not dropped and its advantages follow the shaped scores."""
    stage = build(overlong_buffer=4, overlong_penalty=1.0, drop_equal_reward_groups=True, scale_rewards="none")
    batch = fixed_batch(stage, torch.zeros(4, 3))
    lengths = batch.response_mask.sum(-1).float().view(4, 3)
    for row, n in enumerate([2, 6, 4]):  # group 0: cut to 2, 6 and 4 tokens
        batch.batch.response_mask[row, batch.batch.prompt_width + n :] = 0
    lengths[0] = torch.tensor([2.0, 6.0, 4.0])
    penalty = -((lengths - 2) / 4).clamp(0, 1)  # free up to 6 − 4 = 2 tokens
    grad, stats = logp_gradient(stage, batch)
    assert stats["overlong_penalty"].item() == pytest.approx(penalty.mean().item())
    assert stats["dropped_groups"] == float((penalty == penalty[:, :1]).all(1).sum())
    # on-policy ∂L/∂logp_t = −A_i / N_tokens (dapo alone), A the centred shaped score
    advantages = penalty - penalty.mean(1, keepdim=True)
    mask = batch.response_mask.float() * ~(penalty == penalty[:, :1]).all(1).repeat_interleave(3)[:, None]
    torch.testing.assert_close(grad, -advantages.flatten()[:, None] * mask / mask.sum())


def test_batch_scaling_divides_by_the_std_of_the_whole_rollout_not_the_minibatch():
    stage = build(scale_rewards="batch")
    whole = fixed_batch(stage)  # the buffer holds all 4 groups
    minibatch = collate_groups(stage.buffer.groups[1:3], stage.tokenizer.pad_token_id)
    grad, _ = logp_gradient(stage, minibatch)
    rewards = minibatch.rewards
    advantages = (rewards - rewards.mean(1, keepdim=True)) / (whole.rewards.std() + EPS)
    mask = minibatch.response_mask.float()  # on-policy ∂L/∂logp_t = −A_i / N_tokens (dapo alone)
    torch.testing.assert_close(grad, -advantages.flatten()[:, None] * mask / mask.sum())
    assert not torch.allclose(whole.rewards.std(), rewards.std())


def test_the_kl_is_in_the_reward_or_in_the_loss_never_both():
    in_loss = build(beta=0.1)
    drift(in_loss)
    batch = fixed_batch(in_loss)
    assert in_loss.kl_controller.beta == 0.0 and torch.equal(batch.rewards, batch.scores)  # r̃ = score
    _, stats = logp_gradient(in_loss, batch)
    assert stats["kl_loss"] > 0
    in_reward = build(kl_in_reward=True, kl=KLSpec(beta=0.3))
    drift(in_reward)
    batch = fixed_batch(in_reward)
    assert bool((batch.kl != 0).all())
    torch.testing.assert_close(batch.rewards, batch.scores - 0.3 * batch.kl)
    assert "kl_loss" not in logp_gradient(in_reward, batch)[1]
    with pytest.raises(ValueError, match=r"GRPOModule.beta: 0.1 adds the KL as a loss term"):
        build(kl_in_reward=True, beta=0.1)
    with pytest.raises(ValueError, match=r"GRPOModule.kl_in_reward: False, so the KL is the loss term"):
        build(kl=KLSpec(beta=0.3))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"epsilon": 1.5}, "GRPOModule.epsilon: must be in (0, 1), got 1.5"),
        ({"epsilon_high": -0.1}, "GRPOModule.epsilon_high: must be > 0 or null, got -0.1"),
        ({"overlong_buffer": 7}, "GRPOModule.overlong_buffer: must be in (0, rollout.sampling.max_new_tokens = 6]"),
        ({"overlong_penalty": -1.0}, "GRPOModule.overlong_penalty: it is subtracted"),
        ({"beta": -1.0}, "GRPOModule.beta: must be >= 0"),
    ],
)
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        build(**kwargs)


def test_the_overlong_buffer_may_span_the_whole_response():
    assert build(overlong_buffer=6).overlong_buffer == 6  # = rollout.sampling.max_new_tokens, the bound


def trainer(root: Path, **kwargs) -> L.Trainer:
    kwargs.setdefault("max_epochs", 1)
    kwargs.setdefault("enable_checkpointing", False)
    return L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        **kwargs,
    )


def varied_scores(examples, ended, prompts=None):
    return torch.randn(len(examples))  # the seeded RNG: the same in every run


@pytest.mark.parametrize(
    "loss_type, defer_logp_old", [("dapo", True), ("dapo", False), ("grpo", False), ("bnpo", False), ("dr_grpo", False)]
)
def test_trains_through_the_shared_rollout_with_k_responses(tmp_path, loss_type, defer_logp_old):
    stage = build(k=4, defer_logp_old=defer_logp_old, loss_type=loss_type, epsilon_high=0.28)
    stage.scorer.score_examples = varied_scores
    before = copy.deepcopy(stage.policy.state_dict())
    trainer(tmp_path).fit(stage)
    assert stage.buffer.rollouts == 1 and len(stage.buffer) == 4
    assert any(not torch.equal(v, before[n]) for n, v in stage.policy.state_dict().items())


def replay_run(root: Path, minibatch_groups: int, accumulate: int) -> dict[str, torch.Tensor]:
    """One rollout of 8 groups of unequal lengths, two update passes; the policy's weights after."""
    L.seed_everything(0)
    stage = GRPOModule(
        ModelSpec(architecture=MICRO, tokenizer="embedded:reviews"),
        "embedded:reviews",
        mask_truncated_completions=True,
        rollout=RolloutSpec(
            prompt_pool=16,
            num_prompts=8,
            num_responses=2,
            update_epochs=2,
            minibatch_groups=minibatch_groups,
            max_prompt_tokens=16,
            sampling=SamplingSpec(max_new_tokens=6),
            defer_logp_old=False,
        ),
        optimizer=OptimizerSpec(learning_rate=1e-2),
    )
    stage.scorer.score_examples = varied_scores
    fill = stage.buffer.fill

    def with_unequal_ends(groups):  # every third response "ended": the kept token counts differ by minibatch
        for i, g in enumerate(groups):
            g.ended.copy_(torch.tensor([(2 * i) % 3 == 0, (2 * i + 1) % 3 == 0]))
        fill(groups)

    stage.buffer.fill = with_unequal_ends
    trainer(root, accumulate_grad_batches=accumulate).fit(stage)
    return {k: v.detach().clone() for k, v in stage.policy.state_dict().items()}


def test_dapo_normalises_over_every_token_of_the_accumulated_step(tmp_path):
    """Two minibatches of 4 groups accumulated into one step update the weights as one
    minibatch of all 8 groups: the token count is the step's, not each minibatch's."""
    whole = replay_run(tmp_path / "whole", minibatch_groups=8, accumulate=1)
    accumulated = replay_run(tmp_path / "accumulated", minibatch_groups=4, accumulate=2)
    for name, value in whole.items():
        torch.testing.assert_close(accumulated[name], value, rtol=1e-5, atol=1e-6)


def test_resume_mid_rollout_matches_an_uninterrupted_run(tmp_path):
    def run(root: Path, max_steps: int = -1, resume_from: str | None = None) -> GRPOModule:
        L.seed_everything(0)
        stage = GRPOModule(
            ModelSpec(architecture=MICRO, tokenizer="embedded:reviews"),
            "embedded:reviews",
            beta=0.05,
            rollout=RolloutSpec(
                prompt_pool=16,
                num_prompts=4,
                num_responses=3,
                update_epochs=2,
                minibatch_groups=2,
                max_prompt_tokens=16,
                sampling=SamplingSpec(max_new_tokens=6),
            ),
            optimizer=OptimizerSpec(learning_rate=1e-2),
        )
        stage.scorer.score_examples = varied_scores
        checkpoint = ModelCheckpoint(dirpath=root / "ckpt", save_top_k=-1, every_n_train_steps=6)
        trainer(root, max_epochs=2, max_steps=max_steps, callbacks=[checkpoint], enable_checkpointing=True).fit(
            stage, ckpt_path=resume_from
        )
        return stage

    full = run(tmp_path / "full")
    run(tmp_path / "cut", max_steps=6)
    (saved,) = (tmp_path / "cut" / "ckpt").glob("*step=6*.ckpt")
    checkpoint = torch.load(saved, weights_only=False)
    assert checkpoint["replay_buffer"][0]["consumed"] == 2  # inside rollout 2
    assert stage_class(checkpoint["hyper_parameters"]) is GRPOModule  # `lit-p3o export` tells the stage
    resumed = run(tmp_path / "resumed", resume_from=str(saved))
    assert resumed.updates.applied == full.updates.applied == 8
    for name, value in full.policy.state_dict().items():
        torch.testing.assert_close(resumed.policy.state_dict()[name], value, rtol=0, atol=1e-6)


def run_fixed_buffer(out: Path, devices: int, strategy: str) -> dict:
    """tests/scripts/fixed_buffer_step.py's two GRPO updates on ``devices`` processes."""
    script = ROOT / "tests" / "scripts" / "fixed_buffer_step.py"
    result = subprocess.run(
        [sys.executable, str(script), str(out), str(devices), strategy, "grpo"],
        capture_output=True,
        text=True,
        timeout=400,
        env=ENV,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(out, weights_only=False)


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> dict:
    """The one-process run both strategies are compared with (run once)."""
    return run_fixed_buffer(tmp_path_factory.mktemp("single") / "single.pt", 1, "ddp")


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_match_one_process(single, tmp_path, strategy):
    """DAPO's token mean over the step spans both ranks' tokens (their counts differ), so 2
    processes with 4 groups each update as 1 process with all 8 groups."""
    sharded = run_fixed_buffer(tmp_path / f"{strategy}.pt", 2, strategy)
    assert sum(sharded["tokens_by_rank"]) == sum(single["tokens_by_rank"]) and len(set(sharded["tokens_by_rank"])) == 2
    assert sharded["loss"] == pytest.approx(single["loss"], abs=1e-6) and single["loss"] != 0.0
    # AdamW's first steps are ~lr · g/|g|: for a weight whose gradient is nearly 0, the summation
    # order of the two runs moves it by up to ~1e-4 of the 1e-2 step; a wrong normaliser moves far more
    for name, value in single["weights"].items():
        torch.testing.assert_close(sharded["weights"][name], value, atol=1e-4, rtol=1e-5)


def overlay(tmp_path: Path, config: str, **init_args) -> list[str]:
    """``fit --config CONFIG`` on the micro policy and the embedded task's reward, one tiny rollout."""
    tiny = {
        "trainer": {"max_epochs": 1, "callbacks": [], "logger": False, "enable_progress_bar": False},
        "model": {
            "init_args": {
                "policy": {"name_or_path": None, "architecture": dict(MICRO), "tokenizer": "embedded:reviews"},
                "reward_model": "embedded:reviews",
                "rollout": {
                    "prompts": "embedded:reviews",
                    "num_prompts": 4,
                    "minibatch_groups": 2,
                    "update_epochs": 1,
                    "log_samples": 0,
                },
                "save_dir": str(tmp_path / "export"),
                **init_args,
            }
        },
    }
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(tiny))
    return ["fit", "--config", str(ROOT / config), "--config", str(tmp_path / "tiny.yaml")]


def test_demo_config_fits_through_the_cli(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "lit_p3o", *overlay(tmp_path, "configs/demo/grpo.yaml")],
        cwd=tmp_path,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "GRPOModule: 2 updates applied" in result.stdout + result.stderr
    assert (tmp_path / "export" / "config.json").is_file()


def test_arithmetic_config_runs_a_rollout_and_a_bad_setting_is_one_line(tmp_path, monkeypatch):
    from lit_p3o.cli import LitP3OCLI

    monkeypatch.setattr(sys, "argv", ["lit-p3o"])
    monkeypatch.chdir(tmp_path)
    args = overlay(
        tmp_path, "configs/arithmetic/grpo.yaml", reward_model=[{"source": "lit_p3o.tasks.arithmetic:exact_match"}]
    )
    args += ["--model.init_args.rollout.prompts", "embedded:arithmetic"]
    cli = LitP3OCLI(args=args)
    assert cli.trainer.global_step == 2 and cli.model.drop_equal_reward_groups and cli.model.loss_type == "dapo"

    result = subprocess.run(
        [sys.executable, "-m", "lit_p3o", *args, "--model.init_args.overlong_buffer", "9"],
        cwd=tmp_path,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if ": error: " in line]
    assert errors == [
        "lit-p3o fit: error: model.init_args.overlong_buffer: must be in (0, rollout.sampling.max_new_tokens = 4] "
        "or null, got 9"
    ]
