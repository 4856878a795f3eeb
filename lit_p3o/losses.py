"""Every loss and advantage of lit-p3o, as pure functions of tensors (ALGORITHMS.md).

Conventions: groups of K responses to one prompt are ``[G, K]`` tensors; per-token tensors
are ``[B, T]`` with a ``mask`` that is 1 on response tokens. Nothing here knows about
models, tokenizers or Lightning; the stages call these functions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def token_logprobs(logits: Tensor, tokens: Tensor) -> Tensor:
    """``log softmax(logits)[tokens]`` in float32, ``[B, T]``.

    ``logits[:, t]`` must predict ``tokens[:, t]``. The softmax runs in float32 even for bf16
    logits: trajectory ratios sum these over whole responses, which amplifies tiny drift.
    """
    logp = torch.log_softmax(logits.float(), dim=-1)
    return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``x`` over entries where ``mask`` is 1 (over ``dim``, or all entries)."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def sft_loss(logits: Tensor, labels: Tensor, ignore_index: int = -100) -> Tensor:
    """Cross-entropy on response tokens only: mean over ``t`` with ``labels[t] ≠ ignore`` of
    ``−log p(labels[t] | tokens_<t)``; logits are shifted inside (``logits[:, t-1]`` predicts
    ``labels[:, t]``). Prompt and padding carry ``ignore_index``."""
    shifted_logits, shifted_labels = logits[:, :-1], labels[:, 1:]
    if not (shifted_labels != ignore_index).any():
        raise ValueError("sft_loss: no response token to learn from (all labels are ignore_index)")
    return F.cross_entropy(
        shifted_logits.reshape(-1, shifted_logits.shape[-1]).float(),
        shifted_labels.reshape(-1),
        ignore_index=ignore_index,
    )


def bradley_terry_loss(chosen: Tensor, rejected: Tensor, center_coef: float = 0.0) -> Tensor:
    """``mean(−log σ(r_w − r_l)) + c · mean((r_w + r_l)²)``.

    Only reward differences are identified by preferences; the optional centering term pins
    the free offset near zero so rewards stay comparable across runs.
    """
    loss = -F.logsigmoid(chosen - rejected).mean()
    if center_coef:
        loss = loss + center_coef * ((chosen + rejected) ** 2).mean()
    return loss


def pair_indices(k: int, device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
    """Indices ``(i, j)`` of the K(K−1)/2 unordered pairs ``i < j`` of a group."""
    i, j = torch.triu_indices(k, k, offset=1, device=device)
    return i, j


def _check_groups(logratio: Tensor, rewards: Tensor) -> None:
    if logratio.shape != rewards.shape or logratio.dim() != 2:
        raise ValueError(f"expected matching [G, K] tensors, got {tuple(logratio.shape)} and {tuple(rewards.shape)}")
    if logratio.shape[1] < 2:
        raise ValueError(f"pairwise losses need K >= 2 responses per group, got K={logratio.shape[1]}")


def _clipped_surrogate(ratio: Tensor, advantage: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """``min(ρ·A, clip(ρ, 1−ε, 1+ε)·A)`` and whether the clipped branch is the smaller one."""
    unclipped = ratio * advantage
    clipped = ratio.clamp(1 - eps, 1 + eps) * advantage
    return torch.minimum(unclipped, clipped), (clipped < unclipped).detach()


def p3o_loss(logratio: Tensor, rewards: Tensor, clip_epsilon: float = 0.2, variant: str = "v1") -> tuple[Tensor, Tensor]:
    """Pairwise Proximal Policy Optimization over all pairs of every group.

    ``logratio[g, k] = ℓ = Σ_t (log π_θ − log π_old)``, ``rewards[g, k] = r̃`` (constant).
    For each pair ``i < j``: ``δ = r̃_i − r̃_j`` and

    - V1 (separate clipping, ``ρ = exp ℓ``):
      ``L = −½ [min(ρ_i δ, clip(ρ_i) δ) + min(ρ_j (−δ), clip(ρ_j)(−δ))]``
    - V2 (joint clipping, ``ρ_ij = exp(ℓ_i − ℓ_j)``):
      ``L = −¼ [min(ρ_ij δ, clip(ρ_ij) δ) + min(ρ_ij⁻¹ (−δ), clip(ρ_ij⁻¹)(−δ))]``

    with ``clip(·) = clip(·, 1−ε, 1+ε)``. Returns the mean of ``L`` over all pairs and the
    share of min-terms whose clipped branch is active. Only δ enters, so adding any
    per-prompt constant to the rewards changes nothing.
    """
    _check_groups(logratio, rewards)
    if variant not in ("v1", "v2"):
        raise ValueError(f"p3o_loss: variant must be 'v1' or 'v2', got {variant!r}")
    if not 0 < clip_epsilon < 1:
        raise ValueError(f"p3o_loss: clip_epsilon must be in (0, 1), got {clip_epsilon}")
    i, j = pair_indices(logratio.shape[1], logratio.device)
    delta = (rewards[:, i] - rewards[:, j]).detach()
    if variant == "v1":
        term_i, clip_i = _clipped_surrogate(logratio[:, i].exp(), delta, clip_epsilon)
        term_j, clip_j = _clipped_surrogate(logratio[:, j].exp(), -delta, clip_epsilon)
        loss = -0.5 * (term_i + term_j)
    else:
        pair_logratio = logratio[:, i] - logratio[:, j]
        term_i, clip_i = _clipped_surrogate(pair_logratio.exp(), delta, clip_epsilon)
        term_j, clip_j = _clipped_surrogate((-pair_logratio).exp(), -delta, clip_epsilon)
        loss = -0.25 * (term_i + term_j)
    clip_fraction = torch.cat([clip_i, clip_j]).float().mean()
    return loss.mean(), clip_fraction


def pairwise_policy_gradient_loss(logprobs: Tensor, rewards: Tensor) -> Tensor:
    """The unclipped on-policy surrogate of the pairwise policy gradient (PPG):
    mean over pairs of ``−½ · δ_ij · (log π(y_i) − log π(y_j))``, ``δ`` constant."""
    _check_groups(logprobs, rewards)
    i, j = pair_indices(logprobs.shape[1], logprobs.device)
    delta = (rewards[:, i] - rewards[:, j]).detach()
    return (-0.5 * delta * (logprobs[:, i] - logprobs[:, j])).mean()


def rloo_advantages(rewards: Tensor) -> Tensor:
    """Leave-one-out advantages ``A_i = r̃_i − mean_{j≠i} r̃_j`` over each group ``[G, K]``."""
    k = rewards.shape[1]
    if k < 2:
        raise ValueError(f"rloo_advantages: need K >= 2 responses per group, got K={k}")
    others = (rewards.sum(dim=1, keepdim=True) - rewards) / (k - 1)
    return (rewards - others).detach()


def rloo_loss(logratio: Tensor, advantages: Tensor, clip_epsilon: float | None = None) -> Tensor:
    """REINFORCE with leave-one-out baseline on trajectory ratios ``ρ = exp ℓ``:
    ``−mean(ρ A)``, or ``−mean(min(ρ A, clip(ρ, 1−ε, 1+ε) A))`` when ``clip_epsilon`` is set."""
    _check_groups(logratio, advantages)
    ratio = logratio.exp()
    if clip_epsilon is None:
        return -(ratio * advantages.detach()).mean()
    return -_clipped_surrogate(ratio, advantages.detach(), clip_epsilon)[0].mean()


def whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """``(x − mean) / std`` over the masked entries (mean kept when ``shift_mean=False``):
    PPO normalises advantages per batch so the step size does not depend on reward scale."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    return out if shift_mean else out + mean


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over response tokens, ``[B, T]`` each.

    ``δ_t = r_t + γ V_{t+1} − V_t`` and ``A_t = δ_t + γλ A_{t+1}``, where ``t+1`` is the next
    *response* token of the row (masked positions are skipped, the value after the last one
    is 0). Returns ``(advantages, returns = advantages + values)``, zero outside the mask.
    """
    mask = mask.to(values.dtype)
    rewards, values = rewards.detach() * mask, values.detach() * mask
    advantages = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])
    next_advantage = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + gamma * lam * next_advantage
        advantages[:, t] = advantage * m
        next_value = torch.where(m.bool(), values[:, t], next_value)
        next_advantage = torch.where(m.bool(), advantage, next_advantage)
    return advantages, (advantages + values) * mask


def ppo_token_rewards(scores: Tensor, logp_old: Tensor, logp_ref: Tensor, mask: Tensor, beta: float | Tensor) -> Tensor:
    """Per-token rewards ``r_t = −β (logp_old_t − logp_ref_t)`` on response tokens, plus the
    sequence score on each row's last response token."""
    mask = mask.to(logp_old.dtype)
    rewards = -beta * (logp_old - logp_ref) * mask
    positions = torch.arange(mask.shape[1], device=mask.device)
    last = (mask * positions).argmax(dim=1)
    rewards[torch.arange(mask.shape[0], device=mask.device), last] += scores.to(rewards.dtype)
    return rewards.detach()


def ppo_policy_loss(
    logp: Tensor, logp_old: Tensor, advantages: Tensor, mask: Tensor, clip_epsilon: float = 0.2
) -> tuple[Tensor, Tensor]:
    """Token-level clipped surrogate ``−min(ρ_t A_t, clip(ρ_t, 1−ε, 1+ε) A_t)``, ``ρ_t =
    exp(logp − logp_old)``, averaged over response tokens; also the clipped share."""
    ratio = (logp - logp_old.detach()).exp()
    surrogate, clipped = _clipped_surrogate(ratio, advantages.detach(), clip_epsilon)
    return -masked_mean(surrogate, mask), masked_mean(clipped.float(), mask)


def ppo_value_loss(values: Tensor, values_old: Tensor, returns: Tensor, mask: Tensor, clip_epsilon: float = 0.2) -> Tensor:
    """``½ · mean_t max((V − R)², (clip(V, V_old − ε, V_old + ε) − R)²)`` over response tokens:
    the value function may not move further than ε from its rollout-time prediction for free."""
    returns, values_old = returns.detach(), values_old.detach()
    clipped = values_old + (values - values_old).clamp(-clip_epsilon, clip_epsilon)
    return 0.5 * masked_mean(torch.maximum((values - returns) ** 2, (clipped - returns) ** 2), mask)


def dpo_loss(
    policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor, beta: float = 0.1
) -> Tensor:
    """``mean(−log σ(β [(log π_w − log π_ref,w) − (log π_l − log π_ref,l)]))`` on sequence log-probs."""
    margin = (policy_chosen - ref_chosen.detach()) - (policy_rejected - ref_rejected.detach())
    return -F.logsigmoid(beta * margin).mean()


def kl_regularized_rewards(scores: Tensor, kl: Tensor, beta: float | Tensor) -> Tensor:
    """``r̃ = score − β · kl``, the reward the RL objective maximises."""
    return scores - beta * kl


def adaptive_kl_beta(beta: float, kl: float, target: float, n_samples: int, horizon: int) -> float:
    """Ziegler et al. (2019): ``β ← β · (1 + clip(kl/target − 1, −0.2, 0.2) · n / horizon)``,
    raising β when the policy drifts past the target KL and lowering it when it stays below."""
    if target <= 0 or horizon <= 0:
        raise ValueError(f"adaptive_kl_beta: target and horizon must be > 0, got {target}, {horizon}")
    error = min(max(kl / target - 1.0, -0.2), 0.2)
    return beta * (1.0 + error * n_samples / horizon)
