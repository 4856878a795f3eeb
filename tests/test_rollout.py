"""The shared rollout on a micro model: shapes, masks, EOS handling, log-probs, KL, ratio = 1."""

import lightning as L
import pytest
import torch
from torch import nn

from lit_p3o import ModelSpec, P3OModule, RolloutSpec, SamplingSpec
from lit_p3o.buffer import collate_groups
from lit_p3o.data.prompts import load_prompts
from lit_p3o.generation import response_logprobs
from lit_p3o.losses import token_logprobs
from lit_p3o.rollout import KLController, KLSpec, PromptSampler, rollout

from micro import MICRO_ARCH as MICRO


def make_stage(**rollout_kwargs) -> P3OModule:
    L.seed_everything(0)
    spec = ModelSpec(architecture=MICRO, tokenizer="embedded:reviews")
    kwargs = dict(prompt_pool=32, num_prompts=6, num_responses=3, update_epochs=1, minibatch_groups=2,
                  max_prompt_tokens=16, forward_batch_size=5, sampling=SamplingSpec(max_new_tokens=6))
    kwargs.update(rollout_kwargs)
    return P3OModule(spec, "embedded:reviews", rollout=RolloutSpec(**kwargs))


def force_eos(stage: P3OModule, logit: float) -> None:
    """Replace the LM head by a zero-weight linear layer whose only bias is on EOS."""
    head = nn.Linear(stage.policy.config.hidden_size, len(stage.tokenizer), bias=True)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    head.bias.data[stage.tokenizer.eos_token_id] = logit
    stage.policy.lm_head = head


def prompts(n: int) -> list[str]:
    return load_prompts("embedded:reviews", "train", n)


def test_every_group_kept_with_consistent_shapes():
    stage = make_stage()
    groups = rollout(stage, prompts(6), beta=0.1, spec=stage.rollout_spec)
    assert len(groups) == 6  # the buffer must hold every group of the rollout
    eos = stage.tokenizer.eos_token_id
    for g in groups:
        assert len(g.responses) == 3
        for response, old, ref, ended in zip(g.responses, g.logp_old, g.logp_ref, g.ended):
            assert 1 <= len(response) <= 6
            assert old.shape == ref.shape == (len(response),)
            assert bool(ended) == (response[-1] == eos)
            assert eos not in response[:-1]  # cut at the first generated EOS


def test_logp_old_equals_a_direct_unpadded_forward():
    stage = make_stage()
    torch.nn.init.normal_(stage.policy.model.embed_tokens.weight, std=0.5)  # peakier, varied lengths
    groups = rollout(stage, prompts(6), beta=0.1, spec=stage.rollout_spec)
    lengths = {len(g.prompt_ids) for g in groups} | {len(r) for g in groups for r in g.responses}
    assert len(lengths) > 2  # padding is really exercised
    for g in groups:
        for response, old in zip(g.responses, g.logp_old):
            ids = torch.tensor([g.prompt_ids + response])
            with torch.no_grad():
                logits = stage.policy(input_ids=ids).logits[0]
            p = len(g.prompt_ids)
            direct = token_logprobs(logits[p - 1 : -1], ids[0, p:])
            torch.testing.assert_close(old, direct, atol=1e-5, rtol=1e-5)


def test_kl_zero_at_init_and_matches_logprobs_after_drift():
    stage = make_stage()
    groups = rollout(stage, prompts(4), beta=0.5, spec=stage.rollout_spec)
    for g in groups:
        assert torch.equal(g.kl, torch.zeros(3))  # π_old = π_ref before any update
        torch.testing.assert_close(g.rewards, g.scores)
    with torch.no_grad():
        stage.policy.lm_head.weight.add_(0.3 * torch.randn_like(stage.policy.lm_head.weight))
    groups = rollout(stage, prompts(4), beta=0.5, spec=stage.rollout_spec)
    for g in groups:
        expected = torch.stack([(o - r).sum() for o, r in zip(g.logp_old, g.logp_ref)])
        torch.testing.assert_close(g.kl, expected)
        assert (g.kl != 0).all()
        torch.testing.assert_close(g.rewards, g.scores - 0.5 * g.kl)


def test_missing_eos_penalty_is_subtracted_only_without_generated_eos():
    stage = make_stage(missing_eos_penalty=0.7)
    force_eos(stage, -50.0)  # EOS never sampled
    never = rollout(stage, prompts(3), beta=0.0, spec=stage.rollout_spec)
    stage_no_penalty = make_stage()
    force_eos(stage_no_penalty, -50.0)
    plain = rollout(stage_no_penalty, prompts(3), beta=0.0, spec=stage_no_penalty.rollout_spec)
    for g, h in zip(never, plain):
        assert not g.ended.any() and all(len(r) == 6 for r in g.responses)
        torch.testing.assert_close(g.scores, h.scores - 0.7)
    force_eos(stage, 50.0)  # EOS always sampled first
    always = rollout(stage, prompts(3), beta=0.0, spec=stage.rollout_spec)
    for g in always:
        assert g.ended.all() and all(r == [stage.tokenizer.eos_token_id] for r in g.responses)


def test_eos_inside_the_prompt_does_not_end_the_response():
    stage = make_stage()
    force_eos(stage, -50.0)
    eos_prompt = prompts(2)[0] + " <eos>"
    ids = stage.tokenizer(eos_prompt, add_special_tokens=True)["input_ids"]
    assert ids[-1] == stage.tokenizer.eos_token_id
    groups = rollout(stage, [eos_prompt], beta=0.0, spec=stage.rollout_spec)
    assert not groups[0].ended.any()


def test_first_update_has_trajectory_ratio_one():
    stage = make_stage()
    torch.nn.init.normal_(stage.policy.model.embed_tokens.weight, std=0.5)
    groups = rollout(stage, prompts(6), beta=0.1, spec=stage.rollout_spec)
    # minibatches pad differently from the rollout's forward chunks (2 groups vs 5 rows)
    for start in range(0, 6, 2):
        batch = collate_groups(groups[start : start + 2], stage.tokenizer.pad_token_id)
        token_logratio, logratio = stage.trajectory_logratio(batch, response_logprobs(stage.policy, batch.batch))
        assert logratio.shape == (2, 3)
        assert logratio.abs().max() < 1e-5
        assert token_logratio.abs().max() < 1e-5


def test_prompt_sampler_shards_and_resumes():
    pool = [f"p{i}" for i in range(10)]
    rank0, rank1 = PromptSampler(pool, seed=1, rank=0, world_size=2), PromptSampler(pool, seed=1, rank=1, world_size=2)
    assert set(rank0.prompts).isdisjoint(rank1.prompts)
    first = rank0.draw(3)
    state = rank0.state_dict()
    rest = rank0.draw(7)  # crosses a pass boundary: 5 prompts per pass
    again = PromptSampler(pool, seed=1, rank=0, world_size=2)
    again.load_state_dict(state)
    assert again.draw(7) == rest
    assert sorted(first + rest[:2]) == sorted(rank0.prompts)  # a pass sees each prompt once


def test_kl_controller_fixed_and_adaptive():
    fixed = KLController(KLSpec(beta=0.1))
    fixed.update(kl=100.0, n_samples=64)
    assert fixed.beta == 0.1
    adaptive = KLController(KLSpec(beta=0.1, target=6.0, horizon=1000))
    adaptive.update(kl=12.0, n_samples=100)  # error clipped to +0.2
    assert adaptive.beta == pytest.approx(0.1 * (1 + 0.2 * 100 / 1000))
    adaptive.update(kl=5.4, n_samples=100)  # error -0.1
    assert adaptive.beta == pytest.approx(0.1 * 1.02 * (1 - 0.1 * 0.1))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_responses": 1}, "num_responses"),
        ({"minibatch_groups": 0}, "minibatch_groups"),
        ({"missing_eos_penalty": -1.0}, "missing_eos_penalty"),
    ],
)
def test_rollout_spec_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RolloutSpec(**kwargs)
