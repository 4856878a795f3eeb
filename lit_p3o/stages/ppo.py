"""Token-wise PPO as in InstructGPT-style RLHF (ALGORITHMS.md §6), the paper's main baseline.

Per-token reward ``−β (logp_old − logp_ref)`` plus the score on the last token, a value head
(on the policy's last hidden states, or on a separate critic network when ``critic`` is
given), GAE with γ = 1, λ = 0.95, whitened advantages, clipped policy and value losses.
Unlike P3O its update depends on the absolute reward level, not only on differences.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from lit_p3o.buffer import RolloutBatch
from lit_p3o.data.encoding import Batch
from lit_p3o.generation import response_logprobs_and_states
from lit_p3o.losses import gae, ppo_policy_loss, ppo_token_rewards, ppo_value_loss, whiten
from lit_p3o.models import ModelSpec, as_spec, build_causal_lm
from lit_p3o.optim import OptimizerSpec
from lit_p3o.rollout import KLSpec, RolloutSpec
from lit_p3o.stages.base import RLStage


class PPOModule(RLStage):
    """PPO with a learned value function; ``critic=None`` puts the value head on the policy."""

    def __init__(
        self,
        policy: ModelSpec,
        reward_model: str,
        clip_epsilon: float = 0.2,
        value_clip_epsilon: float = 0.2,
        value_loss_coef: float = 0.1,
        gamma: float = 1.0,
        lam: float = 0.95,
        whiten_advantages: bool = True,
        critic: ModelSpec | None = None,
        rollout: RolloutSpec | None = None,
        kl: KLSpec | None = None,
        optimizer: OptimizerSpec | None = None,
        save_dir: str | None = None,
        seed: int = 0,
    ) -> None:
        if not 0 < clip_epsilon < 1:
            raise ValueError(f"PPOModule.clip_epsilon: must be in (0, 1), got {clip_epsilon}")
        if value_loss_coef < 0:
            raise ValueError(f"PPOModule.value_loss_coef: must be >= 0, got {value_loss_coef}")
        super().__init__(policy, reward_model, rollout, kl, optimizer, save_dir, seed)
        self.clip_epsilon, self.value_clip_epsilon = clip_epsilon, value_clip_epsilon
        self.value_loss_coef, self.gamma, self.lam = value_loss_coef, gamma, lam
        self.whiten_advantages = whiten_advantages
        self.critic = build_causal_lm(as_spec(critic), self.tokenizer) if critic is not None else None
        self.policy_states = self.critic is None  # the value head reads the policy's states
        hidden = (self.critic or self.policy).config.hidden_size
        self.value_head = nn.Linear(hidden, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    def _values(self, batch: Batch, policy_states: Tensor | None) -> Tensor:
        """Values of the states that emit each response token, ``[B, R]`` float32."""
        states = policy_states
        if self.critic is not None:
            states = response_logprobs_and_states(self.critic, batch)[1]
        return self.value_head(states).squeeze(-1).float()

    def rollout_extras(self, batch: Any) -> dict[str, Tensor]:
        states = None if self.critic is not None else response_logprobs_and_states(self.policy, batch)[1]
        return {"values": self._values(batch, states)}

    def advantages(self, batch: RolloutBatch) -> tuple[Tensor, Tensor]:
        """GAE advantages (whitened if asked) and returns from the rollout's frozen values."""
        mask = batch.response_mask
        rewards = ppo_token_rewards(batch.scores.flatten(), batch.logp_old, batch.logp_ref, mask, self.buffer.beta)
        advantages, returns = gae(rewards, batch.extras["values"], mask, self.gamma, self.lam)
        if self.whiten_advantages:
            advantages = whiten(advantages, mask) * mask
        return advantages, returns

    def compute_loss(self, batch: RolloutBatch, logp: Tensor, states: Tensor | None) -> tuple[Tensor, dict[str, Tensor]]:
        mask = batch.response_mask
        advantages, returns = self.advantages(batch)
        policy_loss, clip_fraction = ppo_policy_loss(logp, batch.logp_old, advantages, mask, self.clip_epsilon)
        values = self._values(batch.batch, states)
        value_loss = ppo_value_loss(values, batch.extras["values"], returns, mask, self.value_clip_epsilon)
        token_logratio = (logp - batch.logp_old) * mask
        stats = self.ratio_stats(token_logratio, token_logratio.sum(-1).view_as(batch.rewards), mask)
        stats.update(
            policy_loss=policy_loss.detach(),
            value_loss=value_loss.detach(),
            clip_fraction=clip_fraction,
            value_mean=(values.detach() * mask).sum() / mask.sum().clamp(min=1),
        )
        return policy_loss + self.value_loss_coef * value_loss, stats


