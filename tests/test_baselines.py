"""The paper's baselines on the shared rollout: PPO, online DPO, RLOO (ALGORITHMS.md §4, §6, §7)."""

import copy

import lightning as L
import pytest
import torch
from micro import MICRO_ARCH as MICRO

from lit_p3o import ModelSpec, OnlineDPOModule, P3OModule, PPOModule, RLOOModule, RolloutSpec, SamplingSpec
from lit_p3o.buffer import RolloutBatch, collate_groups
from lit_p3o.data.prompts import load_prompts
from lit_p3o.losses import dpo_loss, gae, ppo_token_rewards, rloo_advantages
from lit_p3o.rollout import KLSpec, rollout


def build(cls, k: int = 3, defer_logp_old: bool = False, **kwargs):
    L.seed_everything(0)
    # by default logp_old from the rollout's own pass, so that perturbing θ afterwards gives ratios ≠ 1
    spec = RolloutSpec(
        prompt_pool=16,
        num_prompts=4,
        num_responses=k,
        update_epochs=1,
        minibatch_groups=4,
        max_prompt_tokens=16,
        sampling=SamplingSpec(max_new_tokens=6),
        defer_logp_old=defer_logp_old,
    )
    kwargs.setdefault("kl", KLSpec(beta=0.1))  # the β the test rollouts are drawn with
    return cls(ModelSpec(architecture=MICRO, tokenizer="embedded:reviews"), "embedded:reviews", rollout=spec, **kwargs)


def fixed_batch(stage, shift: torch.Tensor | None = None) -> RolloutBatch:
    """A seeded rollout with varied scores; ``shift[g]`` is added to group g's scores."""
    torch.manual_seed(5)
    groups = rollout(stage, load_prompts("embedded:reviews", "train", 4), 0.1, stage.rollout_spec)
    for g_index, g in enumerate(groups):
        g.scores.copy_(torch.randn(len(g.responses)) + (0.0 if shift is None else shift[g_index]))
        g.rewards.copy_(g.scores - 0.1 * g.kl)
    stage.buffer.fill(groups)  # the batch is the whole rollout (PPO whitens over it)
    return collate_groups(groups, stage.tokenizer.pad_token_id)


def gradient(stage, batch: RolloutBatch) -> torch.Tensor:
    stage.zero_grad(set_to_none=True)
    loss, _ = stage.loss(batch)
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in stage.parameters() if p.grad is not None])
    stage.zero_grad(set_to_none=True)
    return grads


def perturb(stage) -> None:
    """Move θ away from θ_old so that ratios ≠ 1 (the replayed case)."""
    torch.manual_seed(9)
    with torch.no_grad():
        for p in stage.policy.parameters():
            p.add_(0.02 * torch.randn_like(p))


SHIFT = torch.tensor([100.0, -3.0, 7.5, 0.25])


@pytest.mark.parametrize("variant", ["v1", "v2"])
def test_p3o_update_is_invariant_to_per_prompt_reward_shifts(variant):
    stage = build(P3OModule, variant=variant)
    plain, shifted = fixed_batch(stage), fixed_batch(stage, SHIFT)
    assert not torch.allclose(plain.rewards, shifted.rewards)
    perturb(stage)
    torch.testing.assert_close(gradient(stage, shifted), gradient(stage, plain), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stage.loss(shifted)[0], stage.loss(plain)[0])


def test_rloo_and_dpo_updates_are_invariant_too():
    rloo = build(RLOOModule)
    plain, shifted = fixed_batch(rloo), fixed_batch(rloo, SHIFT)
    perturb(rloo)
    torch.testing.assert_close(gradient(rloo, shifted), gradient(rloo, plain), rtol=1e-5, atol=1e-6)
    dpo = build(OnlineDPOModule, k=2)
    plain, shifted = fixed_batch(dpo), fixed_batch(dpo, SHIFT)
    perturb(dpo)
    torch.testing.assert_close(gradient(dpo, shifted), gradient(dpo, plain))


def test_ppo_update_changes_under_per_prompt_reward_shifts():
    """Without whitening PPO's advantages carry the absolute reward level, so a per-prompt
    shift changes its update: the failure mode P3O is built to avoid."""
    stage = build(PPOModule, whiten_advantages=False)
    plain, shifted = fixed_batch(stage), fixed_batch(stage, SHIFT)
    perturb(stage)
    g_plain, g_shifted = gradient(stage, plain), gradient(stage, shifted)
    assert not torch.allclose(g_plain, g_shifted, rtol=1e-3, atol=1e-6)


def test_rloo_and_p3o_agree_on_policy():
    """Property 4 at the stage level: at θ = θ_old the all-pairs P3O gradient equals the RLOO
    gradient (the constants of the two means cancel exactly, see tests/test_losses.py)."""
    p3o = build(P3OModule)
    batch = fixed_batch(p3o)
    rloo = build(RLOOModule, clip_epsilon=None)
    rloo.load_state_dict(p3o.state_dict())
    torch.testing.assert_close(gradient(p3o, batch), gradient(rloo, batch), rtol=1e-5, atol=1e-8)


def test_clipped_rloo_reports_a_fully_clipped_minibatch():
    """Every ratio moved past the clip range in its advantage's direction: the loss is flat, and
    the stage says so (``fully_clipped``, which GradientGuard excuses) instead of looking broken."""
    stage = build(RLOOModule, clip_epsilon=0.2)
    batch = fixed_batch(stage)
    advantages = rloo_advantages(batch.rewards)
    assert bool((advantages != 0).all())
    first = batch.response_mask.float().argmax(1)  # each response's first token
    batch.logp_old[torch.arange(len(first)), first] -= advantages.flatten().sign()  # ρ = e^{±1}
    loss, stats = stage.loss(batch)
    assert float(stats["clip_fraction"]) == 1.0
    loss.backward()
    assert all(p.grad is None or not p.grad.any() for p in stage.policy.parameters())
    batch.logp_old[torch.arange(len(first)), first] += 2 * advantages.flatten().sign()  # against A: unclipped
    assert float(stage.loss(batch)[1]["clip_fraction"]) == 0.0


def test_online_dpo_loss_picks_the_higher_score_and_drops_ties():
    stage = build(OnlineDPOModule, k=2, beta_dpo=0.5)
    batch = fixed_batch(stage)
    batch.scores[0] = torch.tensor([1.0, 1.0])  # a tie carries no preference
    batch.scores[1] = torch.tensor([-1.0, 2.0])  # response 1 wins
    batch.scores[2] = torch.tensor([3.0, 0.0])  # response 0 wins
    batch.scores[3] = torch.tensor([0.5, 0.7])  # response 1 wins
    perturb(stage)
    loss, stats = stage.loss(batch)
    with torch.no_grad():
        from lit_p3o.generation import response_logprobs

        logp = response_logprobs(stage.policy, batch.batch).sum(-1).view(4, 2)
    ref = batch.logp_ref.sum(-1).view(4, 2)
    keep, w = [1, 2, 3], [1, 0, 1]  # the decided groups and their winners, by hand
    expected = dpo_loss(logp[keep, w], logp[keep, [1 - i for i in w]], ref[keep, w], ref[keep, [1 - i for i in w]], 0.5)
    torch.testing.assert_close(loss, expected)
    assert stats["decided_fraction"] == pytest.approx(0.75)


def test_online_dpo_logs_the_same_statistics_when_every_pair_ties():
    """Ranks log their statistics with cross-rank reductions; a rank whose pairs all tie must
    log the same names as the others, or the reductions pair up wrongly and the run hangs."""
    stage = build(OnlineDPOModule, k=2)
    batch = fixed_batch(stage)
    decided = stage.loss(batch)[1]
    batch.scores[:] = 1.0
    loss, tied = stage.loss(batch)
    assert tied.keys() == decided.keys()
    assert loss.requires_grad and loss.detach().item() == 0.0 and float(tied["decided_fraction"]) == 0.0


def test_online_dpo_requires_two_responses():
    with pytest.raises(ValueError, match="num_responses must be 2"):
        build(OnlineDPOModule, k=3)


def test_ppo_stores_rollout_values_and_separate_critic_works():
    stage = build(PPOModule)
    batch = fixed_batch(stage)
    assert batch.extras["values"].shape == batch.logp_old.shape
    assert torch.equal(batch.extras["values"], torch.zeros_like(batch.logp_old))  # zero-initialised head
    critic = build(PPOModule, critic=ModelSpec(architecture=MICRO, tokenizer="embedded:reviews"))
    torch.nn.init.normal_(critic.value_head.weight)  # as after a first update: the states reach the values
    batch = fixed_batch(critic)
    values = critic._values(batch.batch, None)
    perturb(critic)  # the policy: the values must not depend on it
    torch.testing.assert_close(critic._values(batch.batch, None), values, rtol=0, atol=0)
    with torch.no_grad():
        for p in critic.critic.parameters():
            p.add_(0.02 * torch.randn_like(p))
    assert not torch.allclose(critic._values(batch.batch, None), values)  # ... but on the critic
    loss, stats = critic.loss(batch)
    assert torch.isfinite(loss) and stats["value_loss"] > 0
    loss.backward()  # the value loss trains the critic network
    assert any(p.grad is not None and bool(p.grad.any()) for p in critic.critic.parameters())


@pytest.mark.parametrize("defer_logp_old", [False, True], ids=["rollout-logp-old", "update-gives-logp-old"])
@pytest.mark.parametrize("cls, k", [(PPOModule, 2), (OnlineDPOModule, 2), (RLOOModule, 3), (P3OModule, 3)])
def test_every_stage_trains_through_the_shared_rollout(tmp_path, cls, k, defer_logp_old):
    """Also on-policy with ``logp_old`` from the update, whose minibatch is the whole rollout
    (PPO whitens over it) and the buffer holds no ``logp_old``."""
    stage = build(cls, k=k, defer_logp_old=defer_logp_old)
    real = stage.scorer.score_examples
    stage.scorer.score_examples = lambda examples, ended, prompts=None: (
        real(examples, ended) + torch.randn(len(examples))
    )
    before = copy.deepcopy(stage.policy.state_dict())
    L.Trainer(
        accelerator="cpu",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    ).fit(stage)
    assert stage.buffer.rollouts == 1 and len(stage.buffer) == 4
    assert any(not torch.equal(v, before[n]) for n, v in stage.policy.state_dict().items())


@pytest.mark.parametrize("cls, k", [(PPOModule, 2), (OnlineDPOModule, 2), (RLOOModule, 3), (P3OModule, 3)])
def test_every_update_scores_at_the_sampling_temperature(cls, k):
    """At θ = θ_old the update's log-probs equal the rollout's at T = 0.7: ratio 1, and for
    online DPO (π_θ = π_ref at start) an implicit margin of 0."""
    L.seed_everything(0)
    spec = RolloutSpec(
        prompt_pool=16,
        num_prompts=4,
        num_responses=k,
        update_epochs=1,
        minibatch_groups=4,
        max_prompt_tokens=16,
        sampling=SamplingSpec(max_new_tokens=6, temperature=0.7),
        defer_logp_old=False,
    )  # the rollout's own logp_old pass, at T
    stage = cls(ModelSpec(architecture=MICRO, tokenizer="embedded:reviews"), "embedded:reviews", rollout=spec)
    with torch.no_grad():  # peakier logits, so T changes the log-probs a lot
        stage.policy.lm_head.weight.mul_(20.0)
        stage.reference.copy.lm_head.weight.mul_(20.0)
    _, stats = stage.loss(fixed_batch(stage))
    if cls is OnlineDPOModule:
        assert stats["implicit_margin"].abs() < 1e-4
    else:
        assert stats["ratio_max"] == pytest.approx(1.0, abs=1e-5) and stats["approx_kl"].abs() < 1e-8


def raw_advantages(batch: RolloutBatch) -> torch.Tensor:
    """GAE advantages of a collated batch at β = 0.1, before whitening."""
    rewards = ppo_token_rewards(batch.scores.flatten(), batch.logp_old, batch.logp_ref, batch.response_mask, 0.1)
    return gae(rewards, batch.extras["values"], batch.response_mask)[0]


def test_ppo_whitens_advantages_over_the_whole_rollout_by_default():
    """InstructGPT/TRL: one mean and variance over every response token of the rollout, so a
    minibatch's advantages keep their level relative to the rest of the rollout;
    ``whiten_over="minibatch"`` keeps the per-minibatch statistics."""
    stage = build(PPOModule)
    torch.manual_seed(5)
    groups = rollout(stage, load_prompts("embedded:reviews", "train", 4), 0.1, stage.rollout_spec)
    for scale in (1.0, 3.0):  # a second rollout with other scores gets its own moments, not the first's
        for g in groups:
            g.scores.copy_(scale * torch.randn(len(g.responses)) + scale - 1)
        stage.buffer.fill(groups)
        whole = collate_groups(groups, stage.tokenizer.pad_token_id)
        tokens = raw_advantages(whole)[whole.response_mask.bool()].double()
        mean, std = tokens.mean(), tokens.std(correction=0)  # by hand, over all 4 groups

        minibatch = collate_groups(groups[1:3], stage.tokenizer.pad_token_id)
        mb_raw = raw_advantages(minibatch)
        mask = minibatch.response_mask.bool()
        advantages, _ = stage.advantages(minibatch)
        torch.testing.assert_close(
            advantages[mask].double(), (mb_raw[mask].double() - mean) / std, rtol=1e-5, atol=1e-5
        )
        assert advantages[mask].mean().abs() > 1e-3  # not recentred on this minibatch alone
        assert torch.all(advantages[~mask] == 0)

    per_minibatch = build(PPOModule, whiten_over="minibatch")
    per_minibatch.buffer.fill(groups)
    local, _ = per_minibatch.advantages(minibatch)
    torch.testing.assert_close(
        local[mask].double(),
        (mb_raw[mask].double() - mb_raw[mask].mean()) / mb_raw[mask].std(correction=0),
        rtol=1e-5,
        atol=1e-5,
    )
