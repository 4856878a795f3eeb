"""The shared rollout on a micro model: shapes, masks, EOS handling, log-probs, KL, ratio = 1."""

import math
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from helpers import make_p3o_stage
from lightning.pytorch.plugins.precision import Precision
from micro import MICRO_ARCH as MICRO
from torch import nn

from lit_p3o import ModelSpec, P3OModule, RolloutSpec, SamplingSpec
from lit_p3o.buffer import collate_groups
from lit_p3o.data.prompts import load_prompts
from lit_p3o.evaluation import EvaluationSpec
from lit_p3o.generation import response_logprobs
from lit_p3o.losses import adaptive_kl_beta, token_logprobs
from lit_p3o.rollout import KLController, KLSpec, PromptSampler, RolloutCallback, rollout, sampling_seed


def make_stage(**rollout_kwargs) -> P3OModule:
    """6 prompts × 3 responses, one pass, forwards in batches of 5, the default optimizer; seeded."""
    L.seed_everything(0)
    kwargs = dict(num_prompts=6, num_responses=3, update_epochs=1, forward_batch_size=5)
    return make_p3o_stage(optimizer=None, **{**kwargs, **rollout_kwargs})


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
    force_eos(stage_no_penalty, 50.0)
    always = rollout(stage, prompts(3), beta=0.0, spec=stage.rollout_spec)
    always_plain = rollout(stage_no_penalty, prompts(3), beta=0.0, spec=stage_no_penalty.rollout_spec)
    for g, h in zip(always, always_plain):
        assert g.ended.all() and all(r == [stage.tokenizer.eos_token_id] for r in g.responses)
        torch.testing.assert_close(g.scores, h.scores)  # responses that ended keep their score
    # one rollout with both kinds: the penalty follows each response's own `ended`
    force_eos(stage, math.log(0.15 / 0.85 * (len(stage.tokenizer) - 1)))  # EOS with p = 0.15 per token
    stage.scorer.score_examples = lambda examples, ended, prompts=None: torch.zeros(len(examples))
    mixed = rollout(stage, prompts(4), beta=0.0, spec=stage.rollout_spec)
    ended = torch.cat([g.ended for g in mixed])
    assert ended.any() and not ended.all()
    torch.testing.assert_close(torch.cat([g.scores for g in mixed]), -0.7 * (~ended).float())


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


def test_adaptive_beta_after_one_rollout_counts_every_response(tmp_path):
    """6 prompts × K = 3 responses: the controller moves β by n = 18 samples, not 6 prompts."""
    L.seed_everything(0)
    stage = P3OModule(
        ModelSpec(architecture=MICRO, tokenizer="embedded:reviews"),
        "embedded:reviews",
        rollout=make_stage().rollout_spec,
        kl=KLSpec(beta=0.1, target=6.0, horizon=100),
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(stage)
    (callback,) = [c for c in trainer.callbacks if isinstance(c, RolloutCallback)]
    kl = float(torch.cat([g.kl for g in stage.buffer.groups]).mean())  # frozen at rollout time
    assert len(stage.buffer.groups) == 6 and trainer.callback_metrics["rollout/beta"] == 0.1  # drawn with β = 0.1
    error = min(max(kl / 6.0 - 1, -0.2), 0.2)
    assert callback.kl.beta == pytest.approx(0.1 * (1 + error * 18 / 100), rel=1e-6)
    assert callback.kl.beta != pytest.approx(0.1, rel=1e-3)


def test_every_update_of_a_rollout_uses_the_beta_it_was_drawn_with_and_beta_moves_after_the_last(tmp_path):
    """3 minibatches per rollout, adaptive β: the updates read β from the one controller (PPO's
    token rewards, on-policy r̃), so it must not move before the rollout's last update."""
    L.seed_everything(0)
    stage = P3OModule(
        ModelSpec(architecture=MICRO, tokenizer="embedded:reviews"),
        "embedded:reviews",
        rollout=make_stage().rollout_spec,
        kl=KLSpec(beta=0.1, target=0.01, horizon=10),
    )
    logged, seen = [], []
    log_rollout = stage.log_rollout
    stage.log_rollout = lambda stats: (logged.append(stats), log_rollout(stats))

    class Spy(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            seen.append((module.buffer.rollouts, module.kl_controller.beta))

    L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        callbacks=[Spy()],
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    ).fit(stage)
    drawn = [s["beta"] for s in logged]  # as logged: rounded to float32 by the mean over ranks
    assert drawn[0] == pytest.approx(0.1, rel=1e-6) and drawn[1] != pytest.approx(0.1, rel=1e-3)
    assert [rollout for rollout, _ in seen] == [1] * 3 + [2] * 3
    assert [beta for _, beta in seen] == pytest.approx([drawn[0]] * 3 + [drawn[1]] * 3, rel=1e-6)
    n = 6 * 3  # prompts × K
    assert logged[1]["beta"] == pytest.approx(adaptive_kl_beta(0.1, logged[0]["kl_mean"], 0.01, n, 10), rel=1e-6)
    assert stage.kl_controller.beta == pytest.approx(
        adaptive_kl_beta(logged[1]["beta"], logged[1]["kl_mean"], 0.01, n, 10), rel=1e-6
    )


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


@pytest.mark.parametrize("section", ["rollout", "evaluation"])
def test_prompt_and_response_budgets_beyond_the_context_are_refused_before_sampling(section):
    """400 + 8 on a 128-position model ran on silently (issue 22); the micro model has 64."""
    too_long = dict(max_prompt_tokens=60, sampling=SamplingSpec(max_new_tokens=8))
    spec = ModelSpec(architecture=MICRO, tokenizer="embedded:reviews")
    rollout_spec = RolloutSpec(
        prompt_pool=8, num_prompts=2, **(too_long if section == "rollout" else {"max_prompt_tokens": 16})
    )
    evaluation = EvaluationSpec(**too_long) if section == "evaluation" else None
    cls = "RolloutSpec" if section == "rollout" else "EvaluationSpec"
    with pytest.raises(
        ValueError,
        match=rf"^{cls}\.max_prompt_tokens: 60 prompt tokens \+ {cls}\.sampling\."
        r"max_new_tokens = 8 make 68 positions, more than the policy's context of 64 "
        r"\(max_position_embeddings of its config\)",
    ):
        P3OModule(spec, "embedded:reviews", rollout=rollout_spec, evaluation=evaluation)
    P3OModule(
        spec,
        "embedded:reviews",
        rollout=RolloutSpec(
            prompt_pool=8, num_prompts=2, max_prompt_tokens=56, sampling=SamplingSpec(max_new_tokens=8)
        ),
    )  # exactly 64 fits


def test_temperature_scales_sampling_logprobs_and_kl_alike():
    """At T = 0.7 responses come from softmax(z/T), so logp_old, logp_ref and the KL must use
    z/T too (ALGORITHMS.md §3), and the first update then sees ρ = 1."""
    t = 0.7
    stage = make_stage(sampling=SamplingSpec(max_new_tokens=6, temperature=t))
    with torch.no_grad():  # π_old ≠ π_ref, so logp_ref is checked on its own
        stage.policy.lm_head.weight.add_(0.3 * torch.randn_like(stage.policy.lm_head.weight))
    groups = rollout(stage, prompts(4), beta=0.1, spec=stage.rollout_spec)

    def direct(model, prompt_ids, response, temperature):
        ids = torch.tensor([prompt_ids + response])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1 : -1].double()
        return torch.log_softmax(logits / temperature, -1).gather(-1, ids[0, len(prompt_ids) :, None])[:, 0].float()

    with stage.reference.active() as reference:
        for g in groups:
            for response, old, ref in zip(g.responses, g.logp_old, g.logp_ref):
                torch.testing.assert_close(old, direct(stage.policy, g.prompt_ids, response, t), atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(ref, direct(reference, g.prompt_ids, response, t), atol=1e-5, rtol=1e-5)
                assert not torch.allclose(old, direct(stage.policy, g.prompt_ids, response, 1.0), atol=1e-3)
            torch.testing.assert_close(g.kl, torch.stack([(o - r).sum() for o, r in zip(g.logp_old, g.logp_ref)]))
    batch = collate_groups(groups[:2], stage.tokenizer.pad_token_id)
    token_logratio, logratio = stage.trajectory_logratio(*stage.policy_forward(batch)[:2])
    assert logratio.abs().max() < 1e-5 and token_logratio.abs().max() < 1e-5


def test_response_logprobs_divides_the_logits_by_the_temperature():
    stage = make_stage()
    groups = rollout(stage, prompts(2), beta=0.0, spec=stage.rollout_spec)
    batch = collate_groups(groups, stage.tokenizer.pad_token_id).batch
    with torch.no_grad():
        logits = stage.policy(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids
        ).logits[:, batch.prompt_width - 1 : -1]
        tokens = batch.input_ids[:, batch.prompt_width :]
        mask = batch.response_mask[:, batch.prompt_width :]
        for t in (1.0, 0.5, 2.0):
            expected = torch.log_softmax(logits.double() / t, -1).gather(-1, tokens[..., None])[..., 0] * mask
            torch.testing.assert_close(
                response_logprobs(stage.policy, batch, t), expected.float(), atol=1e-5, rtol=1e-5
            )
    with pytest.raises(ValueError, match="temperature"):
        response_logprobs(stage.policy, batch, 0.0)


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "bf16-true"])
def test_first_update_of_every_rollout_has_ratio_one_under_the_trainers_precision(tmp_path, precision):
    """The rollout's forwards run under the trainer's precision (autocast for bf16-mixed, the
    bf16 default dtype for bf16-true) like training_step, and the buffer's float32 statistics
    reach training_step unrounded, so each rollout's first update sees ρ = 1 up to the float
    error of a different padding layout (measured: mostly exactly 1, at most 2e-5; outside the
    trainer's autocast bf16-mixed gave 5e-4 to 4e-3, and bf16-true's rounded buffer 4e-2)."""
    stage = make_stage(
        num_prompts=4,
        num_responses=2,
        minibatch_groups=2,
        forward_batch_size=3,
        sampling=SamplingSpec(max_new_tokens=10),
    )
    stage.scorer.score_examples = lambda examples, ended, prompts=None: torch.randn(len(examples))
    seen = []

    class Spy(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            assert {t.dtype for t in (batch.logp_old, batch.logp_ref, batch.rewards, batch.scores)} == {torch.float32}
            served = module.buffer.groups[module.buffer.schedule()[batch_idx][0]]
            assert torch.equal(batch.rewards[0], served.rewards)  # not rounded on the way

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            m = trainer.callback_metrics
            seen.append((batch_idx, float(m["train/ratio_max"]), float(m["train/approx_kl"])))

    L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=2,
        precision=precision,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[Spy()],
    ).fit(stage)
    firsts = [(ratio, kl) for idx, ratio, kl in seen if idx == 0]
    assert len(firsts) == 2
    for ratio, kl in firsts:
        assert abs(ratio - 1) < 1e-4 and kl < 1e-9
    assert any(ratio != 1.0 for idx, ratio, _ in seen if idx > 0)  # later steps do move θ


def test_ranks_draw_different_sampling_noise_for_the_same_prompts():
    """The rollout callback seeds each rank's sampling with its own rank (a fast stand-in for
    the two-process test): the same prompts on rank 0 and rank 1 get different responses, and
    the same rank redraws its own."""
    pool = prompts(8)

    def responses(rank: int) -> list[list[int]]:
        stage = make_stage(num_prompts=4, minibatch_groups=4, log_samples=0)
        callback = RolloutCallback(stage.rollout_spec, KLSpec(), seed=0)
        callback.sampler = PromptSampler(pool, seed=0, rank=0, world_size=1)  # the same prompts on every rank
        trainer = SimpleNamespace(
            global_rank=rank,
            world_size=2,
            is_global_zero=rank == 0,
            precision_plugin=Precision(),
            progress_bar_callback=None,
        )
        callback.on_train_epoch_start(trainer, stage)
        return [r for g in stage.buffer.groups for r in g.responses]

    rank0 = responses(0)
    assert responses(0) == rank0 and responses(1) != rank0


def test_sampling_seed_differs_for_every_run_seed_rank_and_rollout():
    seeds = [sampling_seed(s, r, i) for s in (0, 1, 7) for r in range(4) for i in range(5)]
    assert len(set(seeds)) == len(seeds)
    assert all(0 <= s < 2**64 for s in seeds)  # what torch.manual_seed accepts
    assert seeds == [sampling_seed(s, r, i) for s in (0, 1, 7) for r in range(4) for i in range(5)]
