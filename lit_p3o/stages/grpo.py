"""GRPO and its variants (Dr. GRPO, DAPO) on the shared rollout, with TRL ``GRPOConfig``'s knobs.

No critic: each response's advantage is its reward relative to the other responses to the
same prompt (:func:`lit_p3o.losses.group_advantages`), and the update is a token-level
clipped surrogate (:func:`lit_p3o.losses.grpo_loss`). The rewards are the rollout's r̃, as
every RL stage's: the score minus β·KL when the KL is folded into the reward
(``kl_in_reward: true``, β from ``kl`` as P3O's), else the score, with the KL to π_ref as a
loss term of weight ``beta`` (TRL's default, 0, leaves it out). docs/methods.md compares it
with P3O, RLOO and PPO.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

from lit_p3o.buffer import Group, RolloutBatch
from lit_p3o.losses import group_advantages, grpo_loss, k3_kl, masked_mean, overlong_penalty
from lit_p3o.models import ModelSource
from lit_p3o.rollout import KLController, KLSpec
from lit_p3o.scoring import RewardSource
from lit_p3o.stages.base import RLStage


def _equal_groups(scores: Tensor) -> Tensor:
    """``[G]``: whether all K scores of a group are the same (no learning signal: DAPO drops it)."""
    return (scores == scores[:, :1]).all(dim=1)


def _per_response(groups: list[Group]) -> tuple[Tensor, Tensor, Tensor]:
    """Scores, EOS flags and response lengths of ``groups``, ``[G, K]`` each."""
    lengths = torch.tensor([[float(len(r)) for r in g.responses] for g in groups])
    return torch.stack([g.scores for g in groups]), torch.stack([g.ended for g in groups]), lengths


class GRPOModule(RLStage):
    """GRPO over K responses per prompt; the arguments are TRL ``GRPOConfig``'s.

    ``loss_type`` says how the per-token losses of a minibatch are averaged
    (:func:`lit_p3o.losses.aggregate_token_loss`): ``"grpo"`` per response then over
    responses, ``"bnpo"`` over this minibatch's tokens, ``"dr_grpo"`` divided by
    (responses × ``rollout.sampling.max_new_tokens``), ``"dapo"`` (TRL's default) over every
    token of the optimizer step: the minibatches that ``trainer.accumulate_grad_batches``
    accumulates, on every rank (see :meth:`dapo_normalizer`). ``scale_rewards``: ``"group"``,
    ``"batch"`` (the σ of this rank's whole rollout) or ``"none"`` (Dr. GRPO).
    ``epsilon_high`` (None: ``epsilon``) is DAPO's clip-higher (0.28).

    The KL to π_ref enters in exactly one place: ``kl_in_reward: false`` (the default, as TRL)
    makes r̃ the score and adds ``beta`` × the k3 estimate per token to the loss;
    ``kl_in_reward: true`` folds ``kl.beta`` × the sequence KL into r̃ (fixed or adaptive, as
    P3O) and needs ``beta: 0``.

    Left out of the loss (their tokens' weight is 0): with ``mask_truncated_completions`` the
    responses that did not end within ``max_new_tokens``; with ``drop_equal_reward_groups``
    (DAPO's dynamic sampling, without resampling) the groups whose responses all got the same
    score, counted as ``train/dropped_groups``. ``overlong_buffer`` (DAPO's soft overlong
    punishment) adds ``−overlong_penalty`` × the share of the last ``overlong_buffer`` tokens
    of ``max_new_tokens`` a response used to its score, before the advantages.
    """

    def __init__(
        self,
        policy: ModelSource,
        reward_model: RewardSource,
        epsilon: float = 0.2,
        epsilon_high: float | None = None,
        loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo"] = "dapo",
        scale_rewards: Literal["group", "batch", "none"] = "group",
        beta: float = 0.0,
        kl_in_reward: bool = False,
        mask_truncated_completions: bool = False,
        drop_equal_reward_groups: bool = False,
        overlong_buffer: int | None = None,
        overlong_penalty: float = 1.0,
        **shared: Any,
    ) -> None:
        if not 0 < epsilon < 1:
            raise ValueError(f"GRPOModule.epsilon: must be in (0, 1), got {epsilon}")
        if epsilon_high is not None and epsilon_high <= 0:
            raise ValueError(f"GRPOModule.epsilon_high: must be > 0 or null, got {epsilon_high}")
        if beta < 0:
            raise ValueError(f"GRPOModule.beta: must be >= 0, got {beta}")
        if kl_in_reward and beta:
            raise ValueError(
                f"GRPOModule.beta: {beta} adds the KL as a loss term, but kl_in_reward is true and puts it in "
                "the reward already (β from kl); give one of the two"
            )
        if not kl_in_reward and shared.get("kl") is not None:
            raise ValueError(
                "GRPOModule.kl_in_reward: False, so the KL is the loss term weighted by beta and kl (the β of "
                "the KL in the reward) is not used; set kl_in_reward: true, or drop kl and set beta"
            )
        if overlong_penalty < 0:
            raise ValueError(
                f"GRPOModule.overlong_penalty: it is subtracted, give a value >= 0, got {overlong_penalty}"
            )
        super().__init__(policy, reward_model, **shared)
        max_new_tokens = self.rollout_spec.sampling.max_new_tokens
        if overlong_buffer is not None and not 0 < overlong_buffer <= max_new_tokens:
            raise ValueError(
                f"GRPOModule.overlong_buffer: must be in (0, rollout.sampling.max_new_tokens = {max_new_tokens}] "
                f"or null, got {overlong_buffer}"
            )
        if not kl_in_reward:  # r̃ = score: the rollout's β is 0 (and stays 0)
            self.kl_spec = KLSpec(beta=0.0)
            self.kl_controller = KLController(self.kl_spec)
        self.epsilon, self.epsilon_high, self.loss_type = epsilon, epsilon_high, loss_type
        self.scale_rewards, self.beta, self.kl_in_reward = scale_rewards, beta, kl_in_reward
        self.mask_truncated_completions = mask_truncated_completions
        self.drop_equal_reward_groups = drop_equal_reward_groups
        self.overlong_buffer, self.overlong_penalty = overlong_buffer, overlong_penalty
        self._nothing_left = False  # the last minibatch left every response out of the loss

    def shaped(self, rewards: Tensor, lengths: Tensor) -> Tensor:
        """Scores or r̃ ``[G, K]`` plus the overlong penalty of responses of ``lengths`` tokens."""
        if self.overlong_buffer is None:
            return rewards
        max_new_tokens = self.rollout_spec.sampling.max_new_tokens
        return rewards + overlong_penalty(lengths, max_new_tokens, self.overlong_buffer, self.overlong_penalty)

    def kept(self, scores: Tensor, ended: Tensor) -> Tensor:
        """Which responses ``[G, K]`` stay in the loss, from their shaped scores and EOS flags."""
        keep = torch.ones_like(ended, dtype=torch.bool)
        if self.mask_truncated_completions:
            keep &= ended.bool()
        if self.drop_equal_reward_groups:
            keep &= ~_equal_groups(scores)[:, None]
        return keep

    def dapo_normalizer(self) -> Tensor | None:
        """DAPO's token count during ``fit``: ``N / (world_size · accumulate_grad_batches)`` with
        ``N`` the tokens left in the loss of every minibatch the current optimizer step
        accumulates (the rollout's schedule, cut into runs of ``accumulate_grad_batches`` from
        its start, the last possibly shorter), summed over ranks. Lightning divides each
        minibatch's loss by ``accumulate_grad_batches`` and DDP/FSDP average gradients over
        ranks, so the step's gradient is that of ``Σ l·m / N`` over all its tokens. None
        outside ``fit`` (the minibatch's own count)."""
        if self._trainer is None or not self.trainer.training:
            return None
        steps = self.trainer.accumulate_grad_batches
        start = self.buffer.consumed - self.buffer.consumed % steps
        window = [self.buffer.groups[i] for indices in self.buffer.schedule()[start : start + steps] for i in indices]
        scores, ended, lengths = _per_response(window)
        tokens = (lengths * self.kept(self.shaped(scores, lengths), ended)).sum().to(self.device)
        total = self.trainer.strategy.reduce(tokens, reduce_op="sum")
        return total.clamp(min=1) / (self.trainer.world_size * steps)

    def batch_rewards(self, batch: RolloutBatch) -> Tensor:
        """The shaped r̃ of this rank's whole rollout, for ``scale_rewards: batch`` (the minibatch's
        own when the update gives ``logp_old``: its one minibatch is the rollout)."""
        if self.rollout_spec.update_gives_logp_old:
            return self.shaped(batch.rewards, batch.response_mask.sum(-1).view_as(batch.scores).float())
        _, _, lengths = _per_response(self.buffer.groups)
        rewards = torch.stack([g.rewards for g in self.buffer.groups])
        return self.shaped(rewards, lengths).to(batch.rewards.device)

    def compute_loss(
        self, batch: RolloutBatch, logp: Tensor, states: Tensor | None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        lengths = batch.response_mask.sum(-1).view_as(batch.scores).float()
        scores = self.shaped(batch.scores, lengths)
        keep = self.kept(scores, batch.ended)
        batch_rewards = self.batch_rewards(batch) if self.scale_rewards == "batch" else None
        advantages = group_advantages(self.shaped(batch.rewards, lengths), self.scale_rewards, batch_rewards)
        mask = batch.response_mask * keep.flatten()[:, None].to(batch.response_mask.dtype)
        loss, clip_fraction = grpo_loss(
            logp,
            batch.logp_old,
            advantages.flatten(),
            mask,
            self.epsilon,
            self.epsilon_high,
            self.loss_type,
            self.rollout_spec.sampling.max_new_tokens,
            self.beta,
            batch.logp_ref,
            self.dapo_normalizer() if self.loss_type == "dapo" else None,
            self.importance_weights(batch, "token"),
        )
        self._nothing_left = not bool(mask.any())
        token_logratio, logratio = self.trajectory_logratio(batch, logp)
        stats = self.ratio_stats(token_logratio, logratio, batch.response_mask)
        stats["clip_fraction"] = clip_fraction
        if self.beta:
            stats["kl_loss"] = masked_mean(k3_kl(logp.detach(), batch.logp_ref), mask)
        if self.drop_equal_reward_groups:
            stats["dropped_groups"] = _equal_groups(scores).sum().float()
        if self.mask_truncated_completions:
            stats["truncated_masked"] = (~batch.ended.bool()).sum().float()
        if self.overlong_buffer is not None:
            stats["overlong_penalty"] = (scores - batch.scores).mean()
        return loss, stats

    def zero_gradient_hint(self) -> str:
        if self._nothing_left:
            return (
                "Here: the last minibatch left every response out of the loss (drop_equal_reward_groups: all "
                "responses to each prompt scored alike; mask_truncated_completions: none ended with EOS)."
            )
        return super().zero_gradient_hint()
