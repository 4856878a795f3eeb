"""Online DPO (ALGORITHMS.md §7): two fresh samples per prompt, labelled by the reward model.

Of each pair the response with the higher reward-model ``score`` is chosen; the DPO loss
then pushes the policy's log-ratio to the reference apart for chosen and rejected. Groups
whose two scores tie carry no preference and are left out of the loss.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from lit_p3o.buffer import RolloutBatch
from lit_p3o.losses import dpo_loss
from lit_p3o.models import ModelSource
from lit_p3o.rollout import RolloutSpec
from lit_p3o.scoring import RewardSource
from lit_p3o.stages.base import RLStage


class OnlineDPOModule(RLStage):
    """DPO on on-policy pairs; ``beta_dpo`` is DPO's own β (the KL block only shapes r̃ logs)."""

    def __init__(
        self,
        policy: ModelSource,
        reward_model: RewardSource,
        beta_dpo: float = 0.1,
        *,
        rollout: RolloutSpec | None = None,
        **shared: Any,
    ) -> None:
        rollout = rollout or RolloutSpec(update_epochs=1)
        if rollout.num_responses != 2:
            raise ValueError(f"OnlineDPOModule: rollout.num_responses must be 2, got {rollout.num_responses}")
        if beta_dpo <= 0:
            raise ValueError(f"OnlineDPOModule.beta_dpo: must be > 0, got {beta_dpo}")
        super().__init__(policy, reward_model, rollout=rollout, **shared)
        self.beta_dpo = beta_dpo

    def compute_loss(
        self, batch: RolloutBatch, logp: Tensor, states: Tensor | None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        logp = logp.sum(-1).view_as(batch.scores)
        logp_ref = batch.logp_ref.sum(-1).view_as(batch.scores)
        decided = batch.scores[:, 0] != batch.scores[:, 1]
        if not decided.any():  # a zero that keeps the graph, so every rank still runs backward;
            # the same statistics on every rank, or their cross-rank reductions would not pair up
            zero = logp.sum() * 0.0
            return zero, {"decided_fraction": decided.float().mean(), "implicit_margin": zero.detach()}
        winner = batch.scores.argmax(dim=1, keepdim=True)
        loser = 1 - winner

        def pick(x: Tensor, idx: Tensor) -> Tensor:
            return x.gather(1, idx).squeeze(1)[decided]

        weights = self.importance_weights(batch, "group")
        loss = dpo_loss(
            pick(logp, winner),
            pick(logp, loser),
            pick(logp_ref, winner),
            pick(logp_ref, loser),
            self.beta_dpo,
            None if weights is None else weights[decided],
        )
        margin = (pick(logp, winner) - pick(logp_ref, winner)) - (pick(logp, loser) - pick(logp_ref, loser))
        return loss, {"decided_fraction": decided.float().mean(), "implicit_margin": margin.detach().mean()}
