"""Every loss and advantage of lit-p3o, as pure functions of tensors.

Conventions: the K responses to one prompt form a row of a ``[G, K]`` tensor (groups are
never split); per-token tensors are ``[B, T]`` with a ``mask`` that is 1 on response tokens
and 0 on prompt and padding. Nothing here knows about models, tokenizers or Lightning: the
stages call these functions.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def token_logprobs(logits: Tensor, tokens: Tensor, temperature: float = 1.0) -> Tensor:
    """``log softmax(logits / T)[tokens]`` in float32, ``[B, T, V]`` and ``[B, T]`` → ``[B, T]``.

    ``logits[:, t]`` must already predict ``tokens[:, t]``. The softmax runs in float32 even
    for bf16 logits: trajectory ratios sum these over whole responses, which amplifies tiny
    per-token drift into visible ratio errors. ``T`` is the sampling temperature: responses
    sampled from ``softmax(z/T)`` are scored under the same distribution (as TRL does).
    """
    if temperature <= 0:
        raise ValueError(f"token_logprobs: temperature must be > 0, got {temperature}")
    logits = logits.float()
    logp = torch.log_softmax(logits if temperature == 1.0 else logits / temperature, dim=-1)
    return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """``Σ x·m / Σ m`` over ``dim`` (or all entries); an empty 0/1 mask gives 0, not NaN."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def sft_loss(logits: Tensor, labels: Tensor, ignore_index: int = -100) -> Tensor:
    """Causal-LM cross-entropy on response tokens: ``mean_t −log p(labels[t] | labels[<t])``.

    Shifted inside (``logits[:, t−1]`` predicts ``labels[:, t]``); prompt and padding carry
    ``ignore_index`` so only the response is learned. Computed in float32.
    """
    shifted_logits, shifted_labels = logits[:, :-1], labels[:, 1:]
    if not (shifted_labels != ignore_index).any():
        raise ValueError("sft_loss: no response token to learn from (all labels are ignore_index)")
    return F.cross_entropy(
        shifted_logits.reshape(-1, shifted_logits.shape[-1]).float(),
        shifted_labels.reshape(-1),
        ignore_index=ignore_index,
    )


def bradley_terry_loss(
    chosen: Tensor, rejected: Tensor, center_coef: float = 0.0, margin: Tensor | None = None
) -> Tensor:
    """``mean(−log σ(r_w − r_l − m)) + c · mean((r_w + r_l)²)``.

    Preferences identify only reward differences; the optional centering term pins the free
    offset near zero so reward scales stay comparable across runs. ``margin`` ``m`` (per pair,
    0 when None) asks for ``r_w`` to exceed ``r_l`` by at least that much, as TRL's
    RewardTrainer does with a dataset's ``margin`` column. ``logsigmoid`` keeps large
    margins finite.
    """
    difference = chosen - rejected if margin is None else chosen - rejected - margin
    return -F.logsigmoid(difference).mean() + center_coef * ((chosen + rejected) ** 2).mean()


def pair_indices(k: int, device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
    """Indices ``(i, j)`` of the K(K−1)/2 unordered pairs ``i < j`` of a group of K."""
    i, j = torch.triu_indices(k, k, offset=1, device=device)
    return i, j


def _check_groups(logratio: Tensor, rewards: Tensor) -> None:
    """Both ``[G, K]`` with the same shape and ``K >= 2``; raise ``ValueError`` otherwise."""
    if logratio.shape != rewards.shape or logratio.dim() != 2:
        raise ValueError(f"expected matching [G, K] tensors, got {tuple(logratio.shape)} and {tuple(rewards.shape)}")
    if logratio.shape[1] < 2:
        raise ValueError(
            f"pairwise and leave-one-out losses need K >= 2 responses per group, got K={logratio.shape[1]}"
        )


def _check_epsilon(clip_epsilon: float) -> None:
    if not 0 < clip_epsilon < 1:
        raise ValueError(f"clip_epsilon must be in (0, 1), got {clip_epsilon}")


def _clipped_surrogate(
    ratio: Tensor, advantage: Tensor, eps: float, eps_high: float | None = None
) -> tuple[Tensor, Tensor]:
    """``min(ρA, clip(ρ, 1−ε, 1+ε_high)A)`` (``ε_high = ε`` unless given) and a detached mask of
    where the clipped branch is strictly smaller (there the term is constant in ρ, so its
    gradient is zero)."""
    unclipped = ratio * advantage
    clipped = ratio.clamp(1 - eps, 1 + (eps if eps_high is None else eps_high)) * advantage
    return torch.minimum(unclipped, clipped), (clipped < unclipped).detach()


def p3o_loss(
    logratio: Tensor, rewards: Tensor, clip_epsilon: float = 0.2, variant: str = "v1", weights: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Pairwise Proximal Policy Optimization over all pairs ``i < j`` of every group.

    ``logratio[g, k] = ℓ = Σ_t (log π_θ − log π_old)`` and ``rewards[g, k] = r̃`` (treated as a
    constant). With ``δ = r̃_i − r̃_j`` and ``clip(·) = clip(·, 1−ε, 1+ε)``:

    - V1, separate clipping, ``ρ = exp ℓ``:
      ``L_ij = −½ [min(ρ_i δ, clip(ρ_i) δ) + min(ρ_j (−δ), clip(ρ_j)(−δ))]``
    - V2, joint clipping, ``ρ_ij = exp(ℓ_i − ℓ_j)``:
      ``L_ij = −¼ [min(ρ_ij δ, clip(ρ_ij) δ) + min(ρ_ij⁻¹ (−δ), clip(ρ_ij⁻¹)(−δ))]``

    Only δ enters, so any per-prompt reward offset cancels (no value baseline is needed), and
    at ``θ = θ_old`` both variants have the gradient of ``−½ δ (ℓ_i − ℓ_j)``. Returns the mean
    of ``L_ij`` over all pairs and the (detached) share of the two min-terms per pair whose
    clipped branch is active. ``weights`` ``[G, K]`` (sequence-level truncated importance
    weights, :func:`truncated_importance_weights`) multiply each pair's min-term of ``y_i`` by
    ``w_i`` and that of ``y_j`` by ``w_j``.
    """
    _check_groups(logratio, rewards)
    if variant not in ("v1", "v2"):
        raise ValueError(f"p3o_loss: variant must be 'v1' or 'v2', got {variant!r}")
    _check_epsilon(clip_epsilon)
    i, j = pair_indices(logratio.shape[1], logratio.device)
    delta = (rewards[:, i] - rewards[:, j]).detach()
    w_i, w_j = (1.0, 1.0) if weights is None else (weights[:, i].detach(), weights[:, j].detach())
    if variant == "v1":
        term_i, clip_i = _clipped_surrogate(logratio[:, i].exp(), delta, clip_epsilon)
        term_j, clip_j = _clipped_surrogate(logratio[:, j].exp(), -delta, clip_epsilon)
        loss = -0.5 * (w_i * term_i + w_j * term_j)
    else:
        pair_logratio = logratio[:, i] - logratio[:, j]
        term_i, clip_i = _clipped_surrogate(pair_logratio.exp(), delta, clip_epsilon)
        term_j, clip_j = _clipped_surrogate((-pair_logratio).exp(), -delta, clip_epsilon)
        loss = -0.25 * (w_i * term_i + w_j * term_j)
    clip_fraction = torch.cat([clip_i, clip_j]).float().mean()
    return loss.mean(), clip_fraction


def pairwise_policy_gradient_loss(logprobs: Tensor, rewards: Tensor) -> Tensor:
    """Unclipped on-policy pairwise policy gradient surrogate:
    ``mean_{pairs} −½ · δ_ij · (log π(y_i) − log π(y_j))`` with ``δ_ij = r̃_i − r̃_j`` constant.
    Its gradient is the pairwise policy gradient that P3O clips."""
    _check_groups(logprobs, rewards)
    i, j = pair_indices(logprobs.shape[1], logprobs.device)
    delta = (rewards[:, i] - rewards[:, j]).detach()
    return (-0.5 * delta * (logprobs[:, i] - logprobs[:, j])).mean()


def rloo_advantages(rewards: Tensor) -> Tensor:
    """Leave-one-out advantages ``A_i = r̃_i − mean_{j≠i} r̃_j`` within each ``[G, K]`` row.

    The baseline excludes ``y_i`` itself, so it is independent of ``y_i`` and the estimator
    stays unbiased. Detached.
    """
    _check_groups(rewards, rewards)
    k = rewards.shape[1]
    others = (rewards.sum(dim=1, keepdim=True) - rewards) / (k - 1)
    return (rewards - others).detach()


def clip_fraction(ratio: Tensor, advantage: Tensor, eps: float) -> Tensor:
    """The (detached) share of ``min(ρA, clip(ρ, 1−ε, 1+ε)A)`` terms on their clipped branch,
    whose gradient is zero."""
    return _clipped_surrogate(ratio.detach(), advantage.detach(), eps)[1].float().mean()


def rloo_loss(
    logratio: Tensor, advantages: Tensor, clip_epsilon: float | None = None, weights: Tensor | None = None
) -> Tensor:
    """REINFORCE with leave-one-out baseline on trajectory ratios ``ρ = exp ℓ``, ``[G, K]``:
    ``−mean(ρA)``, or the PPO-style ``−mean(min(ρA, clip(ρ, 1−ε, 1+ε)A))`` when
    ``clip_epsilon`` is given. At ``ρ = 1`` the gradient is ``−mean(A ∇ℓ)``. ``weights``
    ``[G, K]`` (sequence-level truncated importance weights) multiply each response's term."""
    _check_groups(logratio, advantages)
    ratio, advantages = logratio.exp(), advantages.detach()
    weights = 1.0 if weights is None else weights.detach()
    if clip_epsilon is None:
        return -(weights * ratio * advantages).mean()
    _check_epsilon(clip_epsilon)
    return -(weights * _clipped_surrogate(ratio, advantages, clip_epsilon)[0]).mean()


GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
REWARD_SCALINGS = ("group", "batch", "none")


def group_advantages(
    rewards: Tensor, scale_rewards: str = "group", batch_rewards: Tensor | None = None, eps: float = 1e-4
) -> Tensor:
    """GRPO's group-relative advantages within each ``[G, K]`` row:
    ``A_i = (r̃_i − mean_group r̃) / (σ + eps)``, ``σ`` the unbiased standard deviation of the
    row (``"group"``, GRPO) or of every entry of ``batch_rewards`` (``"batch"``; default
    ``rewards``), or ``A_i = r̃_i − mean_group r̃`` (``"none"``, Dr. GRPO: dividing by a group's σ
    weighs prompts by how hard they are). ``eps = 1e-4`` as TRL's. Detached."""
    _check_groups(rewards, rewards)
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    if scale_rewards == "none":
        return centred.detach()
    if scale_rewards == "group":
        std = rewards.std(dim=1, keepdim=True)
    elif scale_rewards == "batch":
        std = (rewards if batch_rewards is None else batch_rewards).std()
    else:
        raise ValueError(f"group_advantages: scale_rewards must be one of {REWARD_SCALINGS}, got {scale_rewards!r}")
    return (centred / (std + eps)).detach()


def overlong_penalty(lengths: Tensor, max_length: int, buffer: int, factor: float = 1.0) -> Tensor:
    """DAPO's soft overlong punishment, a reward term ``≤ 0`` per response of ``|y|`` tokens:
    ``−factor · clip((|y| − (L − B)) / B, 0, 1)`` with ``L = max_length`` and ``B = buffer``:
    zero up to ``L − B`` tokens, then falling linearly to ``−factor`` at ``L`` (a response is
    never longer than ``L``), so the policy learns to finish before the limit cuts it off."""
    if not 0 < buffer <= max_length:
        raise ValueError(f"overlong_penalty: buffer must be in (0, {max_length}], got {buffer}")
    return -factor * ((lengths.float() - (max_length - buffer)) / buffer).clamp(0, 1)


def k3_kl(logp: Tensor, logp_ref: Tensor) -> Tensor:
    """Per-token k3 estimate of KL(π_θ ‖ π_ref): ``exp(ref − logp) − (ref − logp) − 1`` (≥ 0,
    unbiased on tokens sampled from π_θ, with gradient ``(1 − exp(ref − logp)) ∇logp``); GRPO's
    KL loss term. ``logp_ref`` is a constant."""
    diff = logp_ref.detach() - logp
    return diff.exp() - diff - 1


def aggregate_token_loss(
    per_token: Tensor,
    mask: Tensor,
    loss_type: str,
    max_completion_length: int | None = None,
    token_normalizer: float | Tensor | None = None,
) -> Tensor:
    """A per-token loss ``l`` ``[N, T]`` reduced over the tokens of ``mask`` as GRPO's ``loss_type`` says:

    - ``"grpo"``: ``mean_i (Σ_t l_it m_it / Σ_t m_it)`` over the sequences with a token in the
      mask: every response weighs the same, so a long one's tokens weigh less (length bias);
    - ``"bnpo"``: ``Σ l·m / Σ m``, every token of this batch weighs the same;
    - ``"dr_grpo"``: ``Σ l·m / (N · max_completion_length)``, a constant denominator (Dr. GRPO);
    - ``"dapo"``: ``Σ l·m / token_normalizer``, a token count the caller makes over more than
      this batch (DAPO: every token of an optimizer step); ``Σ m`` when None (then = ``"bnpo"``).
    """
    mask = mask.to(per_token.dtype)
    if loss_type == "grpo":
        lengths = mask.sum(-1)
        per_sequence = (per_token * mask).sum(-1) / lengths.clamp(min=1)
        return per_sequence.sum() / (lengths > 0).sum().clamp(min=1)
    total = (per_token * mask).sum()
    if loss_type == "bnpo" or (loss_type == "dapo" and token_normalizer is None):
        return total / mask.sum().clamp(min=1)
    if loss_type == "dr_grpo":
        if max_completion_length is None or max_completion_length < 1:
            raise ValueError(
                f"aggregate_token_loss: dr_grpo needs max_completion_length >= 1, got {max_completion_length}"
            )
        return total / (per_token.shape[0] * max_completion_length)
    if loss_type == "dapo":
        return total / token_normalizer
    raise ValueError(f"aggregate_token_loss: loss_type must be one of {GRPO_LOSS_TYPES}, got {loss_type!r}")


def grpo_loss(
    logp: Tensor,
    logp_old: Tensor,
    advantages: Tensor,
    mask: Tensor,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    loss_type: str = "dapo",
    max_completion_length: int | None = None,
    beta: float = 0.0,
    logp_ref: Tensor | None = None,
    token_normalizer: float | Tensor | None = None,
    weights: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """GRPO's token-level clipped surrogate on per-token log-probs ``[N, T]`` and one advantage
    per response ``[N]``: ``l_t = −min(ρ_t A, clip(ρ_t, 1−ε, 1+ε_high) A) + β · k3_t`` with
    ``ρ_t = exp(logp_t − logp_old_t)`` and :func:`k3_kl` to ``logp_ref`` (only when ``β > 0``),
    reduced by :func:`aggregate_token_loss`. ``ε_high > ε`` (DAPO's clip-higher, 0.28) lets a
    token with a positive advantage grow further before it is clipped. ``weights`` ``[N, T]``
    (token-level truncated importance weights) multiply each token's surrogate, not the KL term,
    as TRL applies them. Returns the loss and the (detached) share of the mask's tokens on the
    clipped branch."""
    _check_epsilon(epsilon)
    if epsilon_high is not None and epsilon_high <= 0:
        raise ValueError(f"grpo_loss: epsilon_high must be > 0, got {epsilon_high}")
    ratio = (logp - logp_old.detach()).exp()
    surrogate, clipped = _clipped_surrogate(ratio, advantages.detach()[:, None], epsilon, epsilon_high)
    per_token = -surrogate if weights is None else -surrogate * weights.detach()
    if beta:
        if logp_ref is None:
            raise ValueError("grpo_loss: beta > 0 needs logp_ref")
        per_token = per_token + beta * k3_kl(logp, logp_ref)
    loss = aggregate_token_loss(per_token, mask, loss_type, max_completion_length, token_normalizer)
    return loss, masked_mean(clipped.float(), mask)


def masked_moments(x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Mean ``μ = Σ x·m / Σ m`` and biased variance ``σ² = Σ (x − μ)²·m / Σ m`` of the masked entries."""
    mean = masked_mean(x, mask)
    return mean, masked_mean((x - mean) ** 2, mask)


def whiten(
    x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8, moments: tuple[Tensor, Tensor] | None = None
) -> Tensor:
    """``(x − μ) / sqrt(σ² + eps)`` with μ, σ² the masked mean and (biased) variance over the
    whole batch, or the given ``moments = (μ, σ²)`` (e.g. of a whole rollout, see
    :func:`masked_moments`); ``shift_mean=False`` adds μ back, rescaling without recentering.
    Zero outside the mask. PPO whitens advantages so its step size ignores the reward scale.
    """
    mean, var = moments if moments is not None else masked_moments(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask.to(out.dtype)


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over response tokens, ``[B, T]`` each.

    ``δ_t = r_t + γ V_{t+1} − V_t`` and ``A_t = δ_t + γλ A_{t+1}``, where ``t+1`` is the next
    *response* token of the row: masked positions (prompt, left or right padding) are
    skipped, and the value and advantage after the last response token are 0 (the episode
    ends there). Returns detached ``(advantages, returns = advantages + values)``, both zero
    outside the mask.
    """
    present = mask.bool()
    mask = mask.to(values.dtype)
    rewards, values = rewards.detach() * mask, values.detach() * mask
    advantages = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])
    next_advantage = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + gamma * lam * next_advantage
        advantages[:, t] = advantage * mask[:, t]
        next_value = torch.where(present[:, t], values[:, t], next_value)
        next_advantage = torch.where(present[:, t], advantage, next_advantage)
    return advantages, (advantages + values) * mask


def ppo_token_rewards(scores: Tensor, logp_old: Tensor, logp_ref: Tensor, mask: Tensor, beta: float | Tensor) -> Tensor:
    """Per-token PPO rewards, ``[B, T]``: ``r_t = −β (logp_old_t − logp_ref_t)`` on response
    tokens (a per-token KL penalty estimate) plus ``scores[b]`` on the last response token of
    row ``b`` (the sequence reward arrives when the episode ends); zero elsewhere. Detached.
    Every row needs at least one response token, else its score would have nowhere to go.
    """
    mask = mask.to(logp_old.dtype)
    if scores.shape != mask.shape[:1]:
        raise ValueError(f"ppo_token_rewards: scores must be [B]={tuple(mask.shape[:1])}, got {tuple(scores.shape)}")
    if not mask.any(dim=1).all():
        raise ValueError("ppo_token_rewards: a row has no response token")
    positions = torch.arange(mask.shape[1], device=mask.device, dtype=mask.dtype)
    last = (mask * positions).argmax(dim=1)
    at_last = F.one_hot(last, mask.shape[1]).to(mask.dtype)
    rewards = -beta * (logp_old - logp_ref) * mask + scores.to(mask.dtype)[:, None] * at_last
    return rewards.detach()


def ppo_policy_loss(
    logp: Tensor,
    logp_old: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_epsilon: float = 0.2,
    weights: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Token-level clipped surrogate ``−min(ρ_t A_t, clip(ρ_t, 1−ε, 1+ε) A_t)`` with
    ``ρ_t = exp(logp_t − logp_old_t)``, averaged over response tokens. Returns the loss and the
    (detached) share of response tokens whose clipped branch is active. ``weights`` ``[B, T]``
    (token-level truncated importance weights) multiply each token's term."""
    _check_epsilon(clip_epsilon)
    ratio = (logp - logp_old.detach()).exp()
    surrogate, clipped = _clipped_surrogate(ratio, advantages.detach(), clip_epsilon)
    if weights is not None:
        surrogate = surrogate * weights.detach()
    return -masked_mean(surrogate, mask), masked_mean(clipped.float(), mask)


def ppo_value_loss(
    values: Tensor, values_old: Tensor, returns: Tensor, mask: Tensor, clip_epsilon: float = 0.2
) -> Tensor:
    """``½ · mean_t max((V − R)², (clip(V, V_old − ε, V_old + ε) − R)²)`` over response tokens.

    The pessimistic max removes the incentive to move V further than ε from its rollout-time
    prediction ``V_old`` in one update. ε is in value units, so it only has to be positive.
    """
    if clip_epsilon <= 0:
        raise ValueError(f"ppo_value_loss: clip_epsilon must be > 0, got {clip_epsilon}")
    returns, values_old = returns.detach(), values_old.detach()
    clipped = values_old + (values - values_old).clamp(-clip_epsilon, clip_epsilon)
    return 0.5 * masked_mean(torch.maximum((values - returns) ** 2, (clipped - returns) ** 2), mask)


def dpo_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    beta: float = 0.1,
    weights: Tensor | None = None,
) -> Tensor:
    """``mean(−log σ(β [(log π_w − log π_ref,w) − (log π_l − log π_ref,l)]))`` on sequence
    log-probs ``[N]``: the Bradley–Terry loss with the implicit reward ``β log(π/π_ref)``.
    ``weights`` ``[N]`` (pair-level truncated importance weights) multiply each pair's term."""
    margin = (policy_chosen - ref_chosen.detach()) - (policy_rejected - ref_rejected.detach())
    terms = -F.logsigmoid(beta * margin)
    return (terms if weights is None else weights.detach() * terms).mean()


def kl_regularized_rewards(scores: Tensor, kl: Tensor, beta: float | Tensor) -> Tensor:
    """``r̃ = score − β · kl``: the KL-regularised reward the RL objective maximises, which
    keeps the policy near the reference where the reward model is trustworthy."""
    return scores - beta * kl


def sequence_kl_rewards(
    scores: Tensor, logp_old: Tensor, logp_ref: Tensor, mask: Tensor, beta: float | Tensor
) -> tuple[Tensor, Tensor]:
    """Per response: the sequence KL ``Σ_t (logp_old − logp_ref)`` over its tokens (per-token
    ``[N, R]``, ``mask`` marking the response) and ``r̃`` (:func:`kl_regularized_rewards`), both
    shaped like ``scores``. The one place r̃ is made: by the rollout, or on-policy by the update."""
    kl = ((logp_old - logp_ref) * mask).sum(-1).view_as(scores)
    return kl, kl_regularized_rewards(scores, kl, beta)


def adaptive_kl_beta(beta: float, kl: float, target: float, n_samples: int, horizon: int) -> float:
    """Ziegler et al. (2019): ``β ← β · (1 + clip(kl/target − 1, −0.2, 0.2) · n / horizon)``.

    Raises β when the measured KL overshoots the target and lowers it when it undershoots;
    the clip bounds how fast β can move per ``n`` samples.
    """
    if target <= 0 or horizon <= 0:
        raise ValueError(f"adaptive_kl_beta: target and horizon must be > 0, got {target}, {horizon}")
    error = min(max(kl / target - 1.0, -0.2), 0.2)
    return beta * (1.0 + error * n_samples / horizon)


def truncated_importance_weights(log_ratio: Tensor, cap: float) -> Tensor:
    """Truncated importance sampling for the sampler–trainer gap (TRL's
    ``vllm_importance_sampling_correction``): ``w = min(exp(log_ratio), C)``, detached, with
    ``log_ratio = logp_old − logp_sampler`` and ``C = cap``.

    An inference engine samples from its own π_sampler, which differs from π_old (the trainer's
    forward, whose ratio the losses clip) by kernels and precision; weighting a loss term by
    π_old/π_sampler corrects the expectation to π_old, and the cap bounds the variance. The
    level follows the stage's ratio:

    - token: ``w_t = min(exp(logp_old_t − logp_sampler_t), C)`` per response token (PPO);
    - sequence: ``w = min(exp(Σ_t (logp_old_t − logp_sampler_t)), C)`` per response (P3O's and
      RLOO's trajectory ratios);
    - group: the sum also runs over a group's responses (online DPO's pair).
    """
    if not cap > 0:
        raise ValueError(f"truncated_importance_weights: cap must be > 0, got {cap}")
    return log_ratio.detach().clamp(max=math.log(cap)).exp()


def sampler_logp_gap(logp_sampler: Tensor, logp: Tensor, mask: Tensor) -> Tensor:
    """``mean_t |logp_sampler_t − logp_t|`` over response tokens: how far the sampling engine's
    log-probs are from the trainer's for the tokens it emitted."""
    return masked_mean((logp_sampler - logp).abs(), mask)
