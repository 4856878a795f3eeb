"""Token-wise PPO as in InstructGPT-style RLHF (ALGORITHMS.md §6), the paper's main baseline.

Per-token reward ``−β (logp_old − logp_ref)`` plus the score on the last token, a value head
(on the policy's last hidden states, or on a separate critic network when ``critic`` is
given), GAE with γ = 1, λ = 0.95, advantages whitened over the whole rollout (InstructGPT,
TRL; or per minibatch), clipped policy and value losses. Unlike P3O its update depends on the
absolute reward level, not only on differences.
"""

from __future__ import annotations

from typing import Any, Literal

from torch import Tensor, nn

from lit_p3o.buffer import RolloutBatch, collate_groups
from lit_p3o.data.encoding import Batch
from lit_p3o.generation import response_logprobs_and_states
from lit_p3o.losses import gae, masked_moments, ppo_policy_loss, ppo_token_rewards, ppo_value_loss, whiten
from lit_p3o.models import ModelSource, as_spec, build_causal_lm
from lit_p3o.scoring import RewardSource
from lit_p3o.stages.base import RLStage


class PPOModule(RLStage):
    """PPO with a learned value function; ``critic=None`` puts the value head on the policy,
    ``critic`` (a :class:`ModelSpec` or, from Python, a ready model) on a separate network.

    ``whiten_advantages`` whitens the GAE advantages with the mean and variance of
    ``whiten_over``: ``"rollout"`` (every response token of this rank's rollout, as
    InstructGPT and TRL) or ``"minibatch"`` (each minibatch on its own).
    """

    def __init__(
        self,
        policy: ModelSource,
        reward_model: RewardSource,
        clip_epsilon: float = 0.2,
        value_clip_epsilon: float = 0.2,
        value_loss_coef: float = 0.1,
        gamma: float = 1.0,
        lam: float = 0.95,
        whiten_advantages: bool = True,
        whiten_over: Literal["rollout", "minibatch"] = "rollout",
        critic: ModelSource | None = None,
        **shared: Any,
    ) -> None:
        if not 0 < clip_epsilon < 1:
            raise ValueError(f"PPOModule.clip_epsilon: must be in (0, 1), got {clip_epsilon}")
        if value_loss_coef < 0:
            raise ValueError(f"PPOModule.value_loss_coef: must be >= 0, got {value_loss_coef}")
        if whiten_over not in ("rollout", "minibatch"):
            raise ValueError(f"PPOModule.whiten_over: 'rollout' or 'minibatch', got {whiten_over!r}")
        super().__init__(policy, reward_model, **shared)
        self.clip_epsilon, self.value_clip_epsilon = clip_epsilon, value_clip_epsilon
        self.value_loss_coef, self.gamma, self.lam = value_loss_coef, gamma, lam
        self.whiten_advantages, self.whiten_over = whiten_advantages, whiten_over
        self._rollout_moments: tuple[int, tuple[Tensor, Tensor]] | None = None  # (buffer.rollouts, (μ, σ²))
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

    def _gae(self, batch: RolloutBatch) -> tuple[Tensor, Tensor]:
        """GAE advantages and returns from the rollout's frozen rewards, KL and values."""
        mask = batch.response_mask
        beta = self.kl_controller.beta  # the rollout's: β moves only after its last update
        rewards = ppo_token_rewards(batch.scores.flatten(), batch.logp_old, batch.logp_ref, mask, beta)
        return gae(rewards, batch.extras["values"], mask, self.gamma, self.lam)

    def rollout_moments(self) -> tuple[Tensor, Tensor]:
        """Mean and variance of the advantages over every response token in the buffer.

        Everything they depend on is frozen at rollout time, so they are computed once per
        rollout (and again from the restored buffer after a resume).
        """
        if self._rollout_moments is None or self._rollout_moments[0] != self.buffer.rollouts:
            whole = collate_groups(self.buffer.groups, self.tokenizer.pad_token_id)
            self._rollout_moments = (self.buffer.rollouts, masked_moments(self._gae(whole)[0], whole.response_mask))
        return self._rollout_moments[1]

    def advantages(self, batch: RolloutBatch) -> tuple[Tensor, Tensor]:
        """GAE advantages (whitened as configured) and returns of a minibatch."""
        advantages, returns = self._gae(batch)
        if self.whiten_advantages:
            moments = None  # this minibatch's: when the update gives logp_old, it is the whole rollout
            if self.whiten_over == "rollout" and not self.rollout_spec.update_gives_logp_old:
                moments = tuple(m.to(advantages.device) for m in self.rollout_moments())
            advantages = whiten(advantages, batch.response_mask, moments=moments)
        return advantages, returns

    def compute_loss(
        self, batch: RolloutBatch, logp: Tensor, states: Tensor | None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        mask = batch.response_mask
        advantages, returns = self.advantages(batch)
        weights = self.importance_weights(batch, "token")
        policy_loss, clip_fraction = ppo_policy_loss(logp, batch.logp_old, advantages, mask, self.clip_epsilon, weights)
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
