"""P3O: Pairwise Proximal Policy Optimization (Wu et al. 2023, ALGORITHMS.md §4).

For every pair of responses to one prompt the update weighs the difference of their
trajectory log-ratios by the difference of their KL-regularised rewards, with the
trajectory-level importance ratio clipped separately (V1) or jointly (V2). The maths is
:func:`lit_p3o.losses.p3o_loss`; the rollout and buffer are shared with every RL stage.
"""

from __future__ import annotations

from typing import Any, Literal

from torch import Tensor

from lit_p3o.buffer import RolloutBatch
from lit_p3o.losses import p3o_loss
from lit_p3o.models import ModelSource
from lit_p3o.scoring import RewardSource
from lit_p3o.stages.base import RLStage


class P3OModule(RLStage):
    """P3O over K responses per prompt (all K(K−1)/2 pairs), variant ``v1`` or ``v2``."""

    def __init__(
        self,
        policy: ModelSource,
        reward_model: RewardSource,
        variant: Literal["v1", "v2"] = "v1",
        clip_epsilon: float = 0.2,
        **shared: Any,
    ) -> None:
        if variant not in ("v1", "v2"):
            raise ValueError(f"P3OModule.variant: 'v1' or 'v2', got {variant!r}")
        if not 0 < clip_epsilon < 1:
            raise ValueError(f"P3OModule.clip_epsilon: must be in (0, 1), got {clip_epsilon}")
        super().__init__(policy, reward_model, **shared)
        self.variant = variant
        self.clip_epsilon = clip_epsilon

    def compute_loss(
        self, batch: RolloutBatch, logp: Tensor, states: Tensor | None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        token_logratio, logratio = self.trajectory_logratio(batch, logp)
        weights = self.importance_weights(batch, "sequence")
        loss, clip_fraction = p3o_loss(logratio, batch.rewards, self.clip_epsilon, self.variant, weights)
        stats = self.ratio_stats(token_logratio, logratio, batch.response_mask)
        return loss, {"clip_fraction": clip_fraction, **stats}
