"""RLOO: REINFORCE with a leave-one-out baseline over K responses per prompt.

The baseline users know from TRL. On-policy its gradient equals P3O's all-pairs gradient up
to a constant factor (ALGORITHMS.md §4, property 4); with ``clip_epsilon`` set, the
trajectory ratio is clipped PPO-style when replaying the buffer.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from lit_p3o.buffer import RolloutBatch
from lit_p3o.losses import clip_fraction, rloo_advantages, rloo_loss
from lit_p3o.models import ModelSource
from lit_p3o.scoring import RewardSource
from lit_p3o.stages.base import RLStage


class RLOOModule(RLStage):
    """REINFORCE leave-one-out on trajectory ratios; ``clip_epsilon=None`` means unclipped."""

    def __init__(
        self,
        policy: ModelSource,
        reward_model: RewardSource,
        clip_epsilon: float | None = 0.2,
        **shared: Any,
    ) -> None:
        if clip_epsilon is not None and not 0 < clip_epsilon < 1:
            raise ValueError(f"RLOOModule.clip_epsilon: must be in (0, 1) or null, got {clip_epsilon}")
        super().__init__(policy, reward_model, **shared)
        self.clip_epsilon = clip_epsilon

    def compute_loss(
        self, batch: RolloutBatch, logp: Tensor, states: Tensor | None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        token_logratio, logratio = self.trajectory_logratio(batch, logp)
        advantages = rloo_advantages(batch.rewards)
        loss = rloo_loss(logratio, advantages, self.clip_epsilon, self.importance_weights(batch, "sequence"))
        stats = self.ratio_stats(token_logratio, logratio, batch.response_mask)
        if self.clip_epsilon is not None:  # every term clipped: a flat loss, not a fault (GradientGuard)
            stats["clip_fraction"] = clip_fraction(logratio.exp(), advantages, self.clip_epsilon)
        return loss, stats
