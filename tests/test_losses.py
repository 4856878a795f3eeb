"""Numerical checks of lit_p3o.losses: hand-computed values and autograd on tiny tensors."""

from __future__ import annotations

import math

import pytest
import torch

from lit_p3o.losses import (
    adaptive_kl_beta,
    bradley_terry_loss,
    dpo_loss,
    gae,
    kl_regularized_rewards,
    masked_mean,
    masked_moments,
    p3o_loss,
    pair_indices,
    pairwise_policy_gradient_loss,
    ppo_policy_loss,
    ppo_token_rewards,
    ppo_value_loss,
    rloo_advantages,
    rloo_loss,
    sft_loss,
    token_logprobs,
    whiten,
)

D = torch.float64
EPS = 0.2


def t(*values) -> torch.Tensor:
    return torch.tensor(values, dtype=D)


def grad_of(loss_fn, x: torch.Tensor) -> torch.Tensor:
    """Gradient of ``loss_fn(x)`` with respect to a fresh leaf copy of ``x``."""
    leaf = x.detach().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(loss_fn(leaf), leaf)
    return grad


def on_policy_ratio(logprobs: torch.Tensor) -> torch.Tensor:
    """``ℓ = log π_θ − sg(log π_θ)``: every ratio is 1 but gradients flow to ``logprobs``."""
    return logprobs - logprobs.detach()


def p3o(variant: str):
    return lambda logratio, rewards: p3o_loss(logratio, rewards, EPS, variant)[0]


# --------------------------------------------------------------------------- basics


def test_token_logprobs_matches_manual_gather():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 5, generator=gen)
    tokens = torch.tensor([[0, 4, 2], [1, 1, 3]])
    out = token_logprobs(logits, tokens)
    manual = torch.empty(2, 3)
    for b in range(2):
        for s in range(3):
            row = logits[b, s]
            manual[b, s] = row[tokens[b, s]] - torch.logsumexp(row, dim=0)
    assert out.shape == (2, 3) and out.dtype == torch.float32
    torch.testing.assert_close(out, manual)


def test_token_logprobs_bf16_logits_give_float32():
    logits = torch.randn(1, 4, 7).to(torch.bfloat16)
    tokens = torch.tensor([[6, 0, 3, 3]])
    out = token_logprobs(logits, tokens)
    assert out.dtype == torch.float32
    expected = torch.log_softmax(logits.float(), dim=-1).gather(-1, tokens[..., None])[..., 0]
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_masked_mean_all_and_dim():
    x = t([1.0, 2.0, 3.0], [4.0, 5.0, 6.0])
    mask = torch.tensor([[1, 0, 1], [0, 0, 0]])
    assert masked_mean(x, mask).item() == pytest.approx(2.0)
    torch.testing.assert_close(masked_mean(x, mask, dim=1), t(2.0, 0.0))
    torch.testing.assert_close(masked_mean(x, mask.bool(), dim=0), t(1.0, 0.0, 3.0))


def test_sft_loss_hand_computed():
    # V = 3. logits[:, 0] predicts labels[:, 1] = 1: logits (0, ln 2, 0) → p = 2/4, loss ln 2.
    # logits[:, 1] predicts labels[:, 2] = 2: uniform → p = 1/3, loss ln 3. logits[:, 2] unused.
    logits = torch.tensor([[[0.0, math.log(2.0), 0.0], [0.0, 0.0, 0.0], [50.0, 0.0, 0.0]]])
    labels = torch.tensor([[-100, 1, 2]])
    assert sft_loss(logits, labels).item() == pytest.approx((math.log(2) + math.log(3)) / 2, rel=1e-6)
    # Masking the first response token leaves only the ln 3 term.
    assert sft_loss(logits, torch.tensor([[-100, -100, 2]])).item() == pytest.approx(math.log(3), rel=1e-6)
    # Works on bf16 logits (computed in float32).
    assert sft_loss(logits.bfloat16(), labels).dtype == torch.float32


def test_sft_loss_raises_without_response_tokens():
    logits = torch.zeros(2, 3, 4)
    with pytest.raises(ValueError):
        sft_loss(logits, torch.full((2, 3), -100))
    # A label only at position 0 is never predicted (nothing precedes it): still nothing to learn.
    with pytest.raises(ValueError):
        sft_loss(logits, torch.tensor([[1, -100, -100], [-100, -100, -100]]))


def test_bradley_terry_loss_hand_computed():
    chosen, rejected = t(2.0, 0.0), t(1.0, 1.0)  # margins (1, −1), sums (3, 1)
    nll = (math.log1p(math.exp(-1.0)) + math.log1p(math.exp(1.0))) / 2
    assert bradley_terry_loss(chosen, rejected).item() == pytest.approx(nll, rel=1e-12)
    # centering adds c · mean(9, 1) = 0.1 · 5
    assert bradley_terry_loss(chosen, rejected, center_coef=0.1).item() == pytest.approx(nll + 0.5, rel=1e-12)
    # logsigmoid stays finite for huge margins
    assert torch.isfinite(bradley_terry_loss(t(-1000.0), t(1000.0)))


def test_pair_indices():
    i, j = pair_indices(4)
    pairs = list(zip(i.tolist(), j.tolist()))
    assert pairs == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
    assert len(pair_indices(5)[0]) == 10


# --------------------------------------------------------------------------- P3O values


def reference_p3o(logratio: torch.Tensor, rewards: torch.Tensor, eps: float, variant: str) -> float:
    """Plain-Python P3O: a loop over groups and pairs, independent of the vectorised code."""

    def term(ratio: float, adv: float) -> float:
        return min(ratio * adv, min(max(ratio, 1 - eps), 1 + eps) * adv)

    losses = []
    for lr, r in zip(logratio.tolist(), rewards.tolist()):
        for a in range(len(r)):
            for b in range(a + 1, len(r)):
                delta = r[a] - r[b]
                if variant == "v1":
                    losses.append(-0.5 * (term(math.exp(lr[a]), delta) + term(math.exp(lr[b]), -delta)))
                else:
                    rho = math.exp(lr[a] - lr[b])
                    losses.append(-0.25 * (term(rho, delta) + term(1 / rho, -delta)))
    return sum(losses) / len(losses)


def test_p3o_k2_hand_computed():
    # ρ = (1.5, 1), δ = 1, ε = 0.2.
    # V1: −½ [min(1.5, 1.2) + min(−1, −1)] = −0.1; the first term is clipped, the second not.
    # V2: ρ_01 = 1.5: −¼ [min(1.5, 1.2) + min(−1/1.5, −0.8)] = −¼ (1.2 − 0.8) = −0.1; both clipped.
    logratio, rewards = t([math.log(1.5), 0.0]), t([1.0, 0.0])
    loss1, frac1 = p3o_loss(logratio, rewards, EPS, "v1")
    loss2, frac2 = p3o_loss(logratio, rewards, EPS, "v2")
    assert loss1.item() == pytest.approx(-0.1, abs=1e-12)
    assert loss2.item() == pytest.approx(-0.1, abs=1e-12)
    assert frac1.item() == pytest.approx(0.5)
    assert frac2.item() == pytest.approx(1.0)


@pytest.mark.parametrize("variant", ["v1", "v2"])
def test_p3o_matches_loop_reference(variant):
    gen = torch.Generator().manual_seed(1)
    logratio = 0.3 * torch.randn(3, 4, generator=gen, dtype=D)
    rewards = torch.randn(3, 4, generator=gen, dtype=D)
    loss, _ = p3o_loss(logratio, rewards, EPS, variant)
    assert loss.item() == pytest.approx(reference_p3o(logratio, rewards, EPS, variant), rel=1e-12)


def test_p3o_clip_fraction_hand_computed_two_groups():
    # Group 0 (K=3), ρ = (1.5, 1, 0.5), r = (1, 0, 0) → pairs δ_01 = 1, δ_02 = 1, δ_12 = 0.
    #   V1 terms (ρ_i·δ, ρ_j·(−δ)): (0,1): 1.5·1 clipped, 1·(−1) not; (0,2): 1.5·1 clipped,
    #   0.5·(−1) vs 0.8·(−1) → clipped; (1,2): δ = 0, never active. → 3 of 6.
    # Group 1, ρ = 1 everywhere: nothing clipped. → 3 of 12 in total.
    logratio = t([math.log(1.5), 0.0, math.log(0.5)], [0.0, 0.0, 0.0])
    rewards = t([1.0, 0.0, 0.0], [3.0, -1.0, 2.0])
    _, frac = p3o_loss(logratio, rewards, EPS, "v1")
    assert frac.item() == pytest.approx(3 / 12)
    assert not frac.requires_grad
    # V2: ρ_01 = 1.5 (δ=1): both terms clipped; ρ_02 = 3 (δ=1): both clipped; (1,2) δ = 0 → 4 of 12.
    _, frac = p3o_loss(logratio.requires_grad_(True), rewards, EPS, "v2")
    assert frac.item() == pytest.approx(4 / 12)
    assert not frac.requires_grad


def test_p3o_detaches_rewards():
    rewards = t([1.0, 0.0, 2.0]).requires_grad_(True)
    logratio = t([0.1, -0.2, 0.0]).requires_grad_(True)
    for variant in ("v1", "v2"):
        loss, _ = p3o_loss(logratio, rewards, EPS, variant)
        g_lr, g_r = torch.autograd.grad(loss, [logratio, rewards], allow_unused=True)
        assert g_r is None and g_lr.abs().sum() > 0


# --------------------------------------------------------------------------- P3O property 1


def hand_ppg_gradient(rewards: torch.Tensor) -> torch.Tensor:
    """∂/∂logπ_i of mean_{pairs} −½ δ_ij (logπ_i − logπ_j) = −1/(2·G·P) · Σ_{j≠i} (r_i − r_j)."""
    g, k = rewards.shape
    n_pairs = g * k * (k - 1) // 2
    grad = torch.zeros_like(rewards)
    for a in range(g):
        for i in range(k):
            grad[a, i] = -sum(rewards[a, i] - rewards[a, j] for j in range(k) if j != i) / (2 * n_pairs)
    return grad


@pytest.mark.parametrize("k", [2, 4])
@pytest.mark.parametrize("variant", ["v1", "v2"])
def test_property1_on_policy_gradient_is_pairwise_policy_gradient(variant, k):
    gen = torch.Generator().manual_seed(k)
    logprobs = -5 + torch.randn(3, k, generator=gen, dtype=D)
    rewards = torch.randn(3, k, generator=gen, dtype=D)
    grad_p3o = grad_of(lambda lp: p3o(variant)(on_policy_ratio(lp), rewards), logprobs)
    grad_ppg = grad_of(lambda lp: pairwise_policy_gradient_loss(lp, rewards), logprobs)
    torch.testing.assert_close(grad_p3o, grad_ppg)
    torch.testing.assert_close(grad_p3o, hand_ppg_gradient(rewards))
    # non-trivial: a real gradient, and the loss value itself is a constant −mean(½δ − ½δ) = 0
    assert grad_p3o.abs().max() > 1e-3
    assert p3o(variant)(on_policy_ratio(logprobs), rewards).item() == pytest.approx(0.0, abs=1e-12)


# --------------------------------------------------------------------------- P3O property 2


def reinforce_loss(logratio: torch.Tensor, rewards: torch.Tensor) -> torch.Tensor:
    """A non-pairwise REINFORCE surrogate −mean(ρ·r̃): it sees the absolute reward."""
    return -(logratio.exp() * rewards).mean()


@pytest.mark.parametrize("variant", ["v1", "v2"])
@pytest.mark.parametrize("off_policy", [False, True])
def test_property2_translation_invariance(variant, off_policy):
    gen = torch.Generator().manual_seed(7)
    logratio = 0.4 * torch.randn(3, 4, generator=gen, dtype=D) if off_policy else torch.zeros(3, 4, dtype=D)
    rewards = torch.randn(3, 4, generator=gen, dtype=D)
    shifted = rewards + t([10.0], [-3.0], [0.5])  # one constant per group (prompt)
    loss_fn = p3o(variant)
    torch.testing.assert_close(loss_fn(logratio, shifted), loss_fn(logratio, rewards))
    torch.testing.assert_close(
        grad_of(lambda lr: loss_fn(lr, shifted), logratio), grad_of(lambda lr: loss_fn(lr, rewards), logratio)
    )
    # The same check fails for a loss that is not pairwise: the test can tell the difference.
    assert not torch.allclose(
        grad_of(lambda lr: reinforce_loss(lr, shifted), logratio),
        grad_of(lambda lr: reinforce_loss(lr, rewards), logratio),
    )


# --------------------------------------------------------------------------- P3O property 3


def grad_wrt_logratio(variant: str, logratio: list[float], rewards: list[float]) -> torch.Tensor:
    """Gradient of a one-group P3O loss w.r.t. ``ℓ``, as a ``[K]`` vector."""
    return grad_of(lambda lr: p3o(variant)(lr, t(rewards)), t(logratio))[0]


def test_property3_v1_clipping_zeroes_gradient():
    up, down, inside = math.log(1.3), math.log(0.7), math.log(1.1)
    # δ > 0 and ρ_0 > 1+ε: no push on ℓ_0; ℓ_1 (ρ = 1) still receives −½·(−δ)/P = +½ (δ = 1, P = 1).
    g = grad_wrt_logratio("v1", [up, 0.0], [1.0, 0.0])
    assert g[0].item() == 0.0
    assert g[1].item() == pytest.approx(0.5)
    # δ < 0 and ρ_0 < 1−ε: no push on ℓ_0 either.
    g = grad_wrt_logratio("v1", [down, 0.0], [0.0, 1.0])
    assert g[0].item() == 0.0
    # Inside the range the gradient is −½ δ ρ_0.
    g = grad_wrt_logratio("v1", [inside, 0.0], [1.0, 0.0])
    assert g[0].item() == pytest.approx(-0.5 * 1.1)
    # Outside the range but moving back towards it: not clipped (δ > 0, ρ_0 < 1−ε).
    g = grad_wrt_logratio("v1", [down, 0.0], [1.0, 0.0])
    assert g[0].item() == pytest.approx(-0.5 * 0.7)


def test_property3_v2_clipping_zeroes_gradient():
    # δ > 0 and ρ_01 = 1.5 > 1+ε: ρ_01 δ is clipped, and ρ_01⁻¹ = 0.67 < 1−ε clips the mirror term.
    g = grad_wrt_logratio("v2", [math.log(1.5), 0.0], [1.0, 0.0])
    assert g.abs().max().item() == 0.0
    # The pair's ratio is what counts: same ρ_01 reached by lowering ℓ_1 instead.
    g = grad_wrt_logratio("v2", [0.3, 0.3 - math.log(1.5)], [1.0, 0.0])
    assert g.abs().max().item() == 0.0
    # δ < 0 and ρ_01 = 0.7 < 1−ε: both terms clipped too.
    g = grad_wrt_logratio("v2", [math.log(0.7), 0.0], [0.0, 1.0])
    assert g.abs().max().item() == 0.0
    # Inside: ∂/∂ℓ_0 of −¼ (ρ δ − ρ⁻¹ δ) = −¼ δ (ρ + ρ⁻¹), and ∂/∂ℓ_1 is its negative.
    rho = 1.1
    g = grad_wrt_logratio("v2", [math.log(rho), 0.0], [1.0, 0.0])
    assert g[0].item() == pytest.approx(-0.25 * (rho + 1 / rho))
    assert g[1].item() == pytest.approx(0.25 * (rho + 1 / rho))
    # Between 1+ε and 1/(1−ε) only the direct term is clipped; the mirror term still pushes
    # with −¼ δ ρ⁻¹ (the two clip ranges are not reciprocal).
    rho = 1.22
    g = grad_wrt_logratio("v2", [math.log(rho), 0.0], [1.0, 0.0])
    assert g[0].item() == pytest.approx(-0.25 / rho)


# --------------------------------------------------------------------------- P3O property 4


@pytest.mark.parametrize("k", [3, 4])
def test_property4_all_pairs_equal_leave_one_out(k):
    gen = torch.Generator().manual_seed(10 + k)
    g = 2
    logprobs = torch.randn(g, k, generator=gen, dtype=D)
    rewards = torch.randn(g, k, generator=gen, dtype=D)
    advantages = rloo_advantages(rewards)
    i, j = pair_indices(k)
    delta = rewards[:, i] - rewards[:, j]
    # Σ_{i<j} δ_ij ∇(ℓ_i − ℓ_j) = (K−1) Σ_i A_i ∇ℓ_i
    lhs = grad_of(lambda lp: (delta * (lp[:, i] - lp[:, j])).sum(), logprobs)
    rhs = grad_of(lambda lp: (k - 1) * (advantages * lp).sum(), logprobs)
    torch.testing.assert_close(lhs, rhs)
    # Means: P3O averages over G·K(K−1)/2 pairs with weight ½, RLOO over G·K responses, so
    # ∇P3O = −(K−1)/(2·G·K(K−1)/2) Σ A∇ℓ = −1/(G·K) Σ A∇ℓ = ∇RLOO: the constant is exactly 1.
    grad_rloo = grad_of(lambda lp: rloo_loss(on_policy_ratio(lp), advantages), logprobs)
    grad_rloo_clipped = grad_of(lambda lp: rloo_loss(on_policy_ratio(lp), advantages, EPS), logprobs)
    torch.testing.assert_close(grad_rloo, -advantages / (g * k))
    torch.testing.assert_close(grad_rloo_clipped, grad_rloo)
    for variant in ("v1", "v2"):
        grad_p3o = grad_of(lambda lp, variant=variant: p3o(variant)(on_policy_ratio(lp), rewards), logprobs)
        torch.testing.assert_close(grad_p3o, 1.0 * grad_rloo)


# --------------------------------------------------------------------------- RLOO


def test_rloo_advantages_hand_computed():
    rewards = t([1.0, 2.0, 6.0])
    # A_0 = 1 − (2+6)/2 = −3, A_1 = 2 − 3.5 = −1.5, A_2 = 6 − 1.5 = 4.5
    torch.testing.assert_close(rloo_advantages(rewards), t([-3.0, -1.5, 4.5]))
    torch.testing.assert_close(rloo_advantages(t([1.0, 3.0])), t([-2.0, 2.0]))


def test_rloo_loss_hand_computed_and_clipped():
    logratio = t([math.log(1.5), math.log(0.5)])
    advantages = t([2.0, -1.0])
    # unclipped: −mean(1.5·2, 0.5·(−1)) = −(3 − 0.5)/2
    assert rloo_loss(logratio, advantages).item() == pytest.approx(-1.25)
    # clipped: −mean(min(3, 2.4), min(−0.5, −0.8)) = −(2.4 − 0.8)/2
    assert rloo_loss(logratio, advantages, EPS).item() == pytest.approx(-0.8)
    g = grad_of(lambda lr: rloo_loss(lr, advantages, EPS), logratio)
    assert g.abs().max().item() == 0.0


# --------------------------------------------------------------------------- PPO pieces


def test_whiten_masked_statistics():
    x = t([1.0, 2.0, 100.0], [3.0, 4.0, -50.0])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    out = whiten(x, mask)
    kept = out[mask.bool()]
    assert kept.mean().item() == pytest.approx(0.0, abs=1e-12)
    assert kept.var(correction=0).item() == pytest.approx(1.0, rel=1e-6)
    torch.testing.assert_close(kept, (t(1.0, 2.0, 3.0, 4.0) - 2.5) / math.sqrt(1.25 + 1e-8))
    assert out[~mask.bool()].abs().max().item() == 0.0
    kept_mean = whiten(x, mask, shift_mean=False)[mask.bool()]
    assert kept_mean.mean().item() == pytest.approx(2.5)
    assert kept_mean.var(correction=0).item() == pytest.approx(1.0, rel=1e-6)


def test_whiten_with_given_moments_and_masked_moments_by_hand():
    x = t([1.0, 2.0, 100.0], [3.0, 4.0, -50.0])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    mean, var = masked_moments(x, mask)
    assert (mean.item(), var.item()) == pytest.approx((2.5, 1.25))  # (1.5² + .5² + .5² + 1.5²) / 4
    out = whiten(x, mask, moments=(torch.tensor(1.0), torch.tensor(4.0)), eps=0.0)
    torch.testing.assert_close(out, t([0.0, 0.5, 0.0], [1.0, 1.5, 0.0]))  # (x − 1) / 2 inside the mask
    kept = whiten(x, mask, shift_mean=False, moments=(torch.tensor(1.0), torch.tensor(4.0)), eps=0.0)
    torch.testing.assert_close(kept, t([1.0, 1.5, 0.0], [2.0, 2.5, 0.0]))


def test_gae_three_tokens_hand_computed():
    # r = (0, 0, 1), V = (0.5, 0.6, 0.7), γ = 1, λ = 0.95, V after the last token = 0:
    # δ_2 = 1 − 0.7 = 0.3                A_2 = 0.3
    # δ_1 = 0.7 − 0.6 = 0.1              A_1 = 0.1 + 0.95·0.3 = 0.385
    # δ_0 = 0.6 − 0.5 = 0.1              A_0 = 0.1 + 0.95·0.385 = 0.46575
    rewards, values, mask = t([0.0, 0.0, 1.0]), t([0.5, 0.6, 0.7]), torch.ones(1, 3)
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.95)
    torch.testing.assert_close(adv, t([0.46575, 0.385, 0.3]))
    torch.testing.assert_close(ret, t([0.96575, 0.985, 1.0]))


def test_gae_padded_rows_match_unpadded():
    expected = t(0.46575, 0.385, 0.3)
    # Row 0: left padding (2), row 1: right padding (2), row 2: one prompt token then padding.
    # Garbage rewards/values on masked positions must not leak into the response.
    rewards = t([9.0, 9.0, 0.0, 0.0, 1.0], [0.0, 0.0, 1.0, 9.0, 9.0], [9.0, 0.0, 0.0, 1.0, 9.0])
    values = t([7.0, 7.0, 0.5, 0.6, 0.7], [0.5, 0.6, 0.7, 7.0, 7.0], [7.0, 0.5, 0.6, 0.7, 7.0])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0], [0, 1, 1, 1, 0]], dtype=D)
    adv, ret = gae(rewards.requires_grad_(True), values.requires_grad_(True), mask, gamma=1.0, lam=0.95)
    torch.testing.assert_close(adv[0, 2:], expected)
    torch.testing.assert_close(adv[1, :3], expected)
    torch.testing.assert_close(adv[2, 1:4], expected)
    assert (adv[mask == 0] == 0).all() and (ret[mask == 0] == 0).all()
    torch.testing.assert_close(ret[0, 2:], expected + t(0.5, 0.6, 0.7))
    assert not adv.requires_grad and not ret.requires_grad


def test_gae_skips_masked_gap_inside_response():
    # A masked position between response tokens is absent: token 1's successor is token 3.
    rewards, values = t([0.0, 0.0, 9.0, 1.0]), t([0.5, 0.6, 7.0, 0.7])
    mask = torch.tensor([[1, 1, 0, 1]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.95)
    torch.testing.assert_close(adv, t([0.46575, 0.385, 0.0, 0.3]))
    torch.testing.assert_close(ret, t([0.96575, 0.985, 0.0, 1.0]))


def test_gae_discount():
    # γ = 0.5, λ = 1: A_t = Σ_k γ^k δ_{t+k} = discounted return − V_t. r = (1, 2), V = 0.
    adv, _ = gae(t([1.0, 2.0]), t([0.0, 0.0]), torch.ones(1, 2), gamma=0.5, lam=1.0)
    torch.testing.assert_close(adv, t([2.0, 2.0]))


def test_ppo_token_rewards_placement():
    logp_old = t([-1.0, -2.0, -3.0, -4.0], [-1.0, -1.0, -1.0, -1.0])
    logp_ref = t([-1.5, -1.0, -3.5, 0.0], [-2.0, -1.0, -1.0, -3.0])
    mask = torch.tensor([[0, 1, 1, 0], [1, 1, 1, 1]])
    scores = t(10.0, 20.0)
    rewards = ppo_token_rewards(scores, logp_old, logp_ref, mask, beta=0.5)
    # row 0: kl = (−1, 0.5) on positions 1, 2 → −β·kl = (0.5, −0.25); score at position 2.
    # row 1: kl = (1, 0, 0, 2) → (−0.5, 0, 0, −1); score at position 3.
    torch.testing.assert_close(rewards, t([0.0, 0.5, 9.75, 0.0], [-0.5, 0.0, 0.0, 19.0]))
    # A tensor β and a response at position 0 only.
    one = ppo_token_rewards(t(3.0), t([-1.0, 0.0]), t([-1.0, 5.0]), torch.tensor([[1, 0]]), torch.tensor(0.1))
    torch.testing.assert_close(one, t([3.0, 0.0]))


def test_ppo_token_rewards_rejects_empty_row_and_bad_scores():
    zeros = torch.zeros(2, 3)
    with pytest.raises(ValueError):
        ppo_token_rewards(torch.ones(2), zeros, zeros, torch.tensor([[1, 1, 0], [0, 0, 0]]), 0.1)
    with pytest.raises(ValueError):
        ppo_token_rewards(torch.ones(3), zeros, zeros, torch.ones(2, 3), 0.1)


def test_ppo_policy_loss_clipping_hand_computed():
    # tokens: (ρ, A) = (1.5, +1) clipped → 1.2; (0.5, −1) clipped → −0.8;
    # (0.5, +1) not clipped → 0.5; (1.1, −2) inside → −2.2; fifth token masked out.
    ratios = t([1.5, 0.5, 0.5, 1.1, 3.0])
    logp_old = t([-1.0, -2.0, -3.0, -4.0, -5.0])
    logp = logp_old + ratios.log()
    advantages = t([1.0, -1.0, 1.0, -2.0, 5.0])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    loss, frac = ppo_policy_loss(logp, logp_old, advantages, mask, EPS)
    assert loss.item() == pytest.approx(-(1.2 - 0.8 + 0.5 - 2.2) / 4)
    assert frac.item() == pytest.approx(0.5)
    g = grad_of(lambda lp: ppo_policy_loss(lp, logp_old, advantages, mask, EPS)[0], logp)
    # ∂/∂logp of −ρA/4 = −ρA/4 where unclipped, 0 where clipped or masked.
    torch.testing.assert_close(g, t([0.0, 0.0, -0.5 / 4, 2.2 / 4, 0.0]))


def test_ppo_value_loss_clipping_hand_computed():
    # token 0: V = 1.5, V_old = 1, R = 2: (V−R)² = 0.25, clip(V) = 1.2 → 0.64 → max 0.64 (clipped).
    # token 1: V = 1.5, V_old = 1, R = 1: 0.25 vs (1.2 − 1)² = 0.04 → 0.25 (unclipped).
    # token 2 is masked.
    values, values_old, returns = t([1.5, 1.5, 9.0]), t([1.0, 1.0, 0.0]), t([2.0, 1.0, 0.0])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    loss = ppo_value_loss(values, values_old, returns, mask, 0.2)
    assert loss.item() == pytest.approx(0.5 * (0.64 + 0.25) / 2)
    g = grad_of(lambda v: ppo_value_loss(v, values_old, returns, mask, 0.2), values)
    # clipped branch is constant in V → 0; unclipped: ½·2(V−R)/2 = 0.25
    torch.testing.assert_close(g, t([0.0, 0.25, 0.0]))


# --------------------------------------------------------------------------- DPO, KL


def test_dpo_loss_hand_computed():
    # margin = (−1 − (−2)) − (−3 − (−2.5)) = 1.5; β·margin = 0.15; −log σ(0.15) = log(1 + e^−0.15)
    loss = dpo_loss(t(-1.0, 0.0), t(-3.0, 0.0), t(-2.0, 0.0), t(-2.5, 0.0), beta=0.1)
    assert loss.item() == pytest.approx((math.log1p(math.exp(-0.15)) + math.log(2.0)) / 2, rel=1e-12)


def test_dpo_loss_gradient_only_through_policy():
    ref_c, ref_r = t(-2.0).requires_grad_(True), t(-2.5).requires_grad_(True)
    pc, pr = t(-1.0).requires_grad_(True), t(-3.0).requires_grad_(True)
    grads = torch.autograd.grad(dpo_loss(pc, pr, ref_c, ref_r, beta=0.1), [pc, pr, ref_c, ref_r], allow_unused=True)
    sig = 1 / (1 + math.exp(0.15))  # σ(−βm)
    assert grads[0].item() == pytest.approx(-0.1 * sig)
    assert grads[1].item() == pytest.approx(0.1 * sig)
    assert grads[2] is None and grads[3] is None


def test_kl_regularized_rewards():
    torch.testing.assert_close(kl_regularized_rewards(t(1.0, 2.0), t(0.5, -1.0), 0.2), t(0.9, 2.2))
    torch.testing.assert_close(kl_regularized_rewards(t(1.0), t(2.0), torch.tensor(0.5, dtype=D)), t(0.0))


def test_adaptive_kl_beta_hand_computed():
    # n/horizon = 256/10000 = 0.0256
    assert adaptive_kl_beta(0.1, kl=10.0, target=6.0, n_samples=256, horizon=10000) == pytest.approx(
        0.1 * (1 + 0.2 * 0.0256)
    )
    assert adaptive_kl_beta(0.1, kl=1.0, target=6.0, n_samples=256, horizon=10000) == pytest.approx(
        0.1 * (1 - 0.2 * 0.0256)
    )
    assert adaptive_kl_beta(0.1, kl=6.6, target=6.0, n_samples=256, horizon=10000) == pytest.approx(
        0.1 * (1 + 0.1 * 0.0256)
    )
    assert adaptive_kl_beta(0.1, kl=6.0, target=6.0, n_samples=256, horizon=10000) == pytest.approx(0.1)
    for target, horizon in [(0.0, 10), (-1.0, 10), (6.0, 0)]:
        with pytest.raises(ValueError):
            adaptive_kl_beta(0.1, 1.0, target, 1, horizon)


# --------------------------------------------------------------------------- errors


def test_errors():
    good = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="variant"):
        p3o_loss(good, good, EPS, "v3")
    with pytest.raises(ValueError, match="K >= 2"):
        p3o_loss(torch.zeros(2, 1), torch.zeros(2, 1))
    with pytest.raises(ValueError):
        p3o_loss(good, torch.zeros(2, 4))
    with pytest.raises(ValueError):
        p3o_loss(torch.zeros(6), torch.zeros(6))
    for eps in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match="clip_epsilon"):
            p3o_loss(good, good, eps)
    with pytest.raises(ValueError):
        pairwise_policy_gradient_loss(good, torch.zeros(3, 2))
    with pytest.raises(ValueError):
        rloo_advantages(torch.zeros(4, 1))
    with pytest.raises(ValueError):
        rloo_loss(good, torch.zeros(2, 4))
    with pytest.raises(ValueError):
        rloo_loss(good, good, clip_epsilon=1.5)
    with pytest.raises(ValueError):
        ppo_policy_loss(good, good, good, torch.ones(2, 3), clip_epsilon=0.0)
    with pytest.raises(ValueError):
        ppo_value_loss(good, good, good, torch.ones(2, 3), clip_epsilon=0.0)
