"""P3O as a Lightning stage: the order of events, the non-finite guard, resume, learning."""

from pathlib import Path

import lightning as L
import pytest
import torch
from helpers import cpu_trainer as trainer
from helpers import make_p3o_stage as make_stage
from lightning.pytorch.callbacks import ModelCheckpoint
from micro import MICRO_ARCH as MICRO

from lit_p3o import GuardSpec, ModelSpec, OptimizerSpec, P3OModule, RolloutSpec, SamplingSpec
from lit_p3o.buffer import collate_groups
from lit_p3o.data.prompts import load_prompts
from lit_p3o.generation import response_logprobs
from lit_p3o.losses import pairwise_policy_gradient_loss
from lit_p3o.rollout import KLSpec, rollout


def weights(stage: P3OModule) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in stage.policy.state_dict().items()}


def test_one_epoch_is_one_rollout_then_update_epochs_passes(tmp_path):
    L.seed_everything(0)
    stage = make_stage()
    stage.scorer.score_examples = varied_scores  # a random policy's gold rewards all tie: no gradient
    seen = []

    class Spy(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            seen.append((module.buffer.rollouts, batch.num_groups))

    trainer(tmp_path, max_epochs=2, callbacks=[Spy()]).fit(stage)
    # 4 groups, minibatches of 2, 2 passes -> 4 steps per rollout, 2 rollouts
    assert seen == [(1, 2)] * 4 + [(2, 2)] * 4
    assert stage.trainer.global_step == 8


def varied_scores(examples, ended, prompts=None):
    """Distinct scores per response, so every pair has δ ≠ 0 (a random micro policy earns the
    same gold reward for all its gibberish)."""
    return (
        torch.arange(len(examples), dtype=torch.float32)
        * torch.tensor([1.0, -1.0]).repeat(len(examples))[: len(examples)]
    )


def test_non_finite_reward_skips_the_step_and_keeps_weights(tmp_path, capsys):
    L.seed_everything(0)
    # every minibatch holds the poisoned group; let every update be skipped (tests/test_guards.py
    # covers the default limit)
    stage = make_stage(minibatch_groups=4, guards=GuardSpec(max_skipped_fraction=1.0))

    def poisoned(examples, ended, prompts=None):
        scores = varied_scores(examples, ended)
        scores[1] = float("nan")
        return scores

    stage.scorer.score_examples = poisoned
    before = weights(stage)
    trainer(tmp_path, max_epochs=1).fit(stage)
    assert stage.skipped_steps == 2  # update_epochs passes of one minibatch each
    for name, value in weights(stage).items():
        assert torch.equal(value, before[name]), name
    out = capsys.readouterr().out
    assert (
        out.count("skipped an update (non-finite reward") == 2 and "non-finite loss" not in out
    )  # the reward guard caught it


def test_non_finite_loss_with_finite_rewards_skips_that_step_only(tmp_path, capsys):
    L.seed_everything(0)
    stage = make_stage(minibatch_groups=4, guards=GuardSpec(max_skipped_fraction=0.5))  # 1 of 2 updates skipped
    stage.scorer.score_examples = varied_scores
    real, calls = stage.compute_loss, []

    def nan_on_first_call(*args):
        loss, stats = real(*args)
        calls.append(loss)
        return (loss * float("nan") if len(calls) == 1 else loss), stats

    stage.compute_loss = nan_on_first_call
    before = weights(stage)
    trainer(tmp_path, max_epochs=1).fit(stage)
    assert len(calls) == 2 and stage.skipped_steps == 1
    out = capsys.readouterr().out
    assert "non-finite loss" in out and "non-finite reward" not in out
    after = weights(stage)
    assert all(torch.isfinite(v).all() for v in after.values())
    assert any(not torch.equal(v, before[k]) for k, v in after.items())  # the second step trained


def test_finite_rewards_do_change_weights(tmp_path):
    L.seed_everything(0)
    stage = make_stage(minibatch_groups=4)
    stage.scorer.score_examples = varied_scores
    before = weights(stage)
    trainer(tmp_path, max_epochs=1).fit(stage)
    assert stage.skipped_steps == 0
    assert any(not torch.equal(v, before[k]) for k, v in weights(stage).items())


def test_p3o_learns_from_the_kl_regularised_rewards_not_the_raw_scores():
    """Equal scores within every group, but different KLs: only r̃ = score − β·kl tells the
    responses apart, so the update must follow −β·kl (ALGORITHMS.md §4, property 1 at θ = θ_old)."""
    L.seed_everything(0)
    stage = make_stage(num_responses=3)
    stage.scorer.score_examples = lambda examples, ended, prompts=None: torch.zeros(len(examples))
    with torch.no_grad():  # move π_old away from π_ref so that the KL differs between responses
        stage.policy.lm_head.weight.add_(0.3 * torch.randn_like(stage.policy.lm_head.weight))
    groups = rollout(stage, load_prompts("embedded:reviews", "train", 4), 0.5, stage.rollout_spec)
    batch = collate_groups(groups, stage.tokenizer.pad_token_id)
    assert torch.equal(batch.scores, torch.zeros_like(batch.scores)) and batch.kl.std() > 0.1
    torch.testing.assert_close(batch.rewards, -0.5 * batch.kl)

    def grad_of(loss: torch.Tensor) -> torch.Tensor:
        stage.zero_grad(set_to_none=True)
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in stage.policy.parameters() if p.grad is not None])
        stage.zero_grad(set_to_none=True)
        return grads

    actual = grad_of(stage.loss(batch)[0])
    logp = response_logprobs(stage.policy, batch.batch).sum(-1).view_as(batch.rewards)
    expected = grad_of(pairwise_policy_gradient_loss(logp, batch.rewards))
    assert expected.abs().max() > 1e-4
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-7)


def run_to_end(
    tmp_path: Path, epochs: int, resume_from: str | None = None, stop_after: int | None = None, kl: KLSpec | None = None
):
    L.seed_everything(0)
    stage = make_stage(update_epochs=2, minibatch_groups=2, num_responses=3, kl=kl)
    stage.scorer.score_examples = lambda examples, ended, prompts=None: torch.randn(
        len(examples)
    )  # uses the seeded RNG
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=-1, every_n_epochs=1)
    t = trainer(tmp_path, max_epochs=stop_after or epochs, callbacks=[checkpoint], enable_checkpointing=True)
    t.fit(stage, ckpt_path=resume_from)
    return stage, t


def test_resume_from_checkpoint_matches_an_uninterrupted_run(tmp_path):
    full, full_trainer = run_to_end(tmp_path / "full", epochs=4)
    run_to_end(tmp_path / "cut", epochs=4, stop_after=2)
    last = tmp_path / "cut" / "ckpt" / "last.ckpt"
    assert last.is_file()
    resumed, resumed_trainer = run_to_end(tmp_path / "resumed", epochs=4, resume_from=str(last))
    assert resumed_trainer.global_step == full_trainer.global_step
    assert resumed.buffer.rollouts == full.buffer.rollouts == 4
    for name, value in weights(full).items():
        torch.testing.assert_close(weights(resumed)[name], value, rtol=0, atol=1e-6)
    torch.testing.assert_close(
        torch.stack([g.scores for g in resumed.buffer.groups]), torch.stack([g.scores for g in full.buffer.groups])
    )


def test_checkpoint_keeps_buffer_and_drops_frozen_copies(tmp_path):
    _, t = run_to_end(tmp_path, epochs=1)
    state = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    (buffer,) = state["replay_buffer"]  # one state per rank
    assert len(buffer["groups"]) == 4
    assert not [k for k in state["state_dict"] if k.startswith("reference.")]
    assert "RolloutCallback" in state["callbacks"]
    assert set(state["callbacks"]["RolloutCallback"]) == {"kl", "sampler", "rng"}


@pytest.mark.slow
def test_p3o_raises_reward_of_an_sft_policy(tmp_path):
    """A short seeded P3O run on the embedded task beats the SFT policy it starts from."""
    from lit_p3o import SFTDataModule, SFTModule
    from lit_p3o.evaluation import sample_completions
    from lit_p3o.generation import SamplingSpec as Sampling
    from lit_p3o.tasks import get_task

    L.seed_everything(0)
    arch = dict(
        MICRO, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4
    )
    sft = SFTModule(
        ModelSpec(architecture=arch, tokenizer="embedded:reviews"),
        optimizer=OptimizerSpec(learning_rate=3e-3),
        save_dir=str(tmp_path / "sft"),
    )
    data = SFTDataModule(embedded_size=2000, max_length=48, batch_size=32)
    trainer(tmp_path, max_epochs=2, limit_val_batches=0).fit(sft, data)

    task = get_task("reviews")
    test_prompts = task.prompts("test", 64)

    def mean_gold(policy, tokenizer) -> float:
        torch.manual_seed(123)
        out = sample_completions(policy, tokenizer, test_prompts, Sampling(max_new_tokens=24), 16)
        return sum(task.gold_reward(p, r, e) for p, r, e in zip(out.prompts, out.responses, out.ended)) / len(
            test_prompts
        )

    L.seed_everything(0)
    stage = make_stage(
        policy=ModelSpec(name_or_path=str(tmp_path / "sft")),
        prompt_pool=400,
        num_prompts=32,
        minibatch_groups=8,
        sampling=SamplingSpec(max_new_tokens=24),
    )
    stage.optimizer_spec = OptimizerSpec(learning_rate=5e-4)  # 1e-3 gained only ~0.13, near the bar
    before = mean_gold(stage.policy, stage.tokenizer)
    trainer(tmp_path, max_epochs=8, gradient_clip_val=1.0).fit(stage)
    after = mean_gold(stage.policy, stage.tokenizer)
    assert after > before + 0.1, (before, after)


def test_resume_mid_rollout_continues_with_the_next_minibatch(tmp_path):
    """A checkpoint taken inside a rollout's replay resumes with the restored buffer and the
    minibatches not yet trained on, and ends where an uninterrupted run ends."""
    full, full_trainer = run_to_end(tmp_path / "full", epochs=3)

    L.seed_everything(0)
    stage = make_stage(update_epochs=2, minibatch_groups=2, num_responses=3)
    stage.scorer.score_examples = lambda examples, ended, prompts=None: torch.randn(len(examples))
    checkpoint = ModelCheckpoint(
        dirpath=tmp_path / "mid", save_top_k=-1, every_n_train_steps=6, save_on_train_epoch_end=False
    )
    trainer(tmp_path / "cut", max_epochs=3, max_steps=6, callbacks=[checkpoint], enable_checkpointing=True).fit(stage)
    saved = torch.load(next((tmp_path / "mid").glob("*step=6*.ckpt")), weights_only=False)
    assert saved["replay_buffer"][0]["consumed"] == 2  # 4 minibatches per rollout: 2 into rollout 2

    resumed, resumed_trainer = run_to_end(
        tmp_path / "resumed", epochs=3, resume_from=str(next((tmp_path / "mid").glob("*step=6*.ckpt")))
    )
    assert resumed_trainer.global_step == full_trainer.global_step == 12
    for name, value in weights(full).items():
        torch.testing.assert_close(weights(resumed)[name], value, rtol=0, atol=1e-6)


def test_resume_mid_rollout_with_adaptive_beta_also_from_a_checkpoint_of_the_previous_format(tmp_path):
    """β moves after a rollout's last update, so a checkpoint inside the replay holds the β the
    rollout was drawn with. Checkpoints written before 2026-12-07 held the moved β there and
    the rollout's own in the buffer (``beta``); both resume to the uninterrupted run."""
    adaptive = KLSpec(beta=0.1, target=0.01, horizon=10)
    full, _ = run_to_end(tmp_path / "full", epochs=3, kl=adaptive)

    L.seed_everything(0)
    stage = make_stage(update_epochs=2, minibatch_groups=2, num_responses=3, kl=adaptive)
    stage.scorer.score_examples = lambda examples, ended, prompts=None: torch.randn(len(examples))
    checkpoint = ModelCheckpoint(
        dirpath=tmp_path / "mid", save_top_k=-1, every_n_train_steps=6, save_on_train_epoch_end=False
    )
    trainer(tmp_path / "cut", max_epochs=3, max_steps=6, callbacks=[checkpoint], enable_checkpointing=True).fit(stage)
    path = next((tmp_path / "mid").glob("*step=6*.ckpt"))
    saved = torch.load(path, weights_only=False)
    drawn = saved["callbacks"]["RolloutCallback"]["kl"]["beta"]  # rollout 2's β, 2 minibatches into it
    assert drawn != pytest.approx(0.1, rel=1e-3) and "beta" not in saved["replay_buffer"][0]
    saved["replay_buffer"][0]["beta"] = drawn  # the previous format: the rollout's β in the buffer,
    saved["callbacks"]["RolloutCallback"]["kl"]["beta"] = 0.5  # the moved one in the callback
    saved["callbacks"]["RolloutCallback"]["stats_pending"] = False
    torch.save(saved, tmp_path / "previous.ckpt")

    for resume_from in (path, tmp_path / "previous.ckpt"):
        resumed, _ = run_to_end(tmp_path / resume_from.stem, epochs=3, resume_from=str(resume_from), kl=adaptive)
        assert resumed.kl_controller.beta == pytest.approx(full.kl_controller.beta, rel=1e-6)
        for name, value in weights(full).items():
            torch.testing.assert_close(weights(resumed)[name], value, rtol=0, atol=1e-6)


def on_policy_run(tmp_path: Path, defer: bool) -> tuple[P3OModule, L.Trainer, int]:
    """Two on-policy rollouts (one pass, one minibatch) with an adaptive β; counts the
    policy's full-sequence forwards (generation's cached steps are left out)."""
    from lit_p3o.rollout import KLSpec

    L.seed_everything(0)
    stage = P3OModule(
        ModelSpec(architecture=MICRO, tokenizer="embedded:reviews"),
        "embedded:reviews",
        rollout=RolloutSpec(
            prompt_pool=32,
            num_prompts=4,
            num_responses=3,
            update_epochs=1,
            minibatch_groups=4,
            max_prompt_tokens=16,
            sampling=SamplingSpec(max_new_tokens=6),
            defer_logp_old=defer,
        ),
        kl=KLSpec(beta=0.1, target=0.01, horizon=10),
        optimizer=OptimizerSpec(learning_rate=1e-2),
    )
    stage.scorer.score_examples = varied_scores
    stage.loss_stats = []  # what compute_loss reported, minibatch by minibatch
    stage.loss_inputs = []  # the KL, r̃ and logp_old each update used (on-policy: made by it)
    compute_loss = stage.compute_loss

    def recording(batch, *args):
        loss, stats = compute_loss(batch, *args)
        stage.loss_stats.append(stats)
        stage.loss_inputs.append([t.detach().clone() for t in (batch.kl, batch.rewards, batch.logp_old)])
        return loss, stats

    stage.compute_loss = recording
    calls = []
    stage.policy.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(1) if kwargs.get("use_cache") is False else None, with_kwargs=True
    )
    t = trainer(tmp_path, max_epochs=2)
    t.fit(stage)
    return stage, t, len(calls)


def test_on_policy_update_takes_logp_old_from_its_own_forward(tmp_path):
    kept, kept_trainer, kept_calls = on_policy_run(tmp_path / "kept", defer=False)
    skipped, skipped_trainer, skipped_calls = on_policy_run(tmp_path / "skipped", defer=True)
    assert kept_calls == 2 * 2  # per rollout: the rollout's logp_old pass and the update's forward
    assert skipped_calls == 2 * 1  # the update's forward only
    for stats in skipped.loss_stats:  # exactly, by construction
        assert stats["ratio_max"].item() == 1.0 and stats["approx_kl"].item() == 0.0
    # constants are not logged on-policy; with the separate pass they are, as measured
    assert not any(key in skipped_trainer.callback_metrics for key in ("train/ratio_max", "train/clip_fraction"))
    assert kept_trainer.callback_metrics["train/ratio_max"].item() == pytest.approx(1.0, abs=1e-4)
    assert "train/loss" in skipped_trainer.callback_metrics
    for name, value in weights(kept).items():
        torch.testing.assert_close(weights(skipped)[name], value, rtol=0, atol=1e-6)
    assert len(skipped.loss_inputs) == len(kept.loss_inputs) == 2
    for a, b in zip(kept.loss_inputs, skipped.loss_inputs):  # the same KL, r̃ and logp_old (padded rows)
        for value_b, value_a in zip(b, a):
            torch.testing.assert_close(value_b, value_a, rtol=0, atol=1e-5)
    assert all(g.logp_old is None and g.kl is None for g in skipped.buffer.groups)  # nothing written back
    # β moved after each rollout, from the same KL
    from lit_p3o.rollout import RolloutCallback

    def beta(stage: P3OModule) -> float:
        return next(c for c in stage.trainer.callbacks if isinstance(c, RolloutCallback)).kl.beta

    assert beta(kept) != 0.1
    assert beta(skipped) == pytest.approx(beta(kept), rel=0, abs=1e-7)
    for key in ("rollout/kl_mean", "rollout/reward_mean", "rollout/beta", "train/loss"):
        torch.testing.assert_close(
            skipped_trainer.callback_metrics[key], kept_trainer.callback_metrics[key], rtol=0, atol=1e-5
        )


SHARED = ["rollout", "kl", "optimizer", "save_dir", "seed", "guards", "evaluation", "tokenizer"]


@pytest.mark.parametrize("name", ["P3OModule", "PPOModule", "OnlineDPOModule", "RLOOModule", "GRPOModule"])
def test_every_rl_stage_shows_the_shared_arguments_to_the_cli_and_takes_them_by_keyword(name):
    """The stages pass the shared arguments on as ``**shared``: the CLI (jsonargparse) and the
    export's stage detection still see each with its type and default, and none is positional."""
    import inspect

    from jsonargparse import ArgumentParser

    import lit_p3o
    from lit_p3o.commands.export import constructor_parameters

    stage = getattr(lit_p3o, name)
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(stage, "model")
    defaults = parser.get_defaults().model
    assert {field: defaults[field] for field in SHARED} == {field: (0 if field == "seed" else None) for field in SHARED}
    assert parser._option_string_actions["--model.seed"]._typehint is int
    params = constructor_parameters(stage)
    assert set(SHARED) <= set(params) and all(params[f].kind is inspect.Parameter.KEYWORD_ONLY for f in SHARED)
    with pytest.raises(TypeError):
        stage(ModelSpec(architecture=dict(MICRO)), "embedded:reviews", *[None] * 12)


def test_importing_lit_p3o_leaves_the_warning_filters_as_they_were():
    """The library's own imports add no filter (third-party imports it makes are done first)."""
    import os
    import subprocess
    import sys

    code = (
        "import warnings, torch, lightning, transformers, datasets, jsonargparse, accelerate.scheduler\n"
        "before = list(warnings.filters)\n"
        "import lit_p3o, lit_p3o.stages.base, lit_p3o.cli\n"
        "added = [f for f in warnings.filters if f not in before]\n"
        "assert not added, added\n"
    )
    root = str(Path(__file__).parent.parent)
    env = {**os.environ, "PYTHONPATH": root}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, env=env)
    assert done.returncode == 0, done.stderr[-2000:]


def test_a_stage_silences_lightnings_inapplicable_warnings_during_its_run_only(tmp_path):
    """Lightning's IterableDataset-with-__len__ warning is not raised during fit (the filter is
    on), and the process's filters are as before once the run is over."""
    import warnings

    seen = []

    class Spy(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            seen.append(any(f[0] == "ignore" and f[1] and "IterableDataset" in f[1].pattern for f in warnings.filters))

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        before = list(warnings.filters)
        trainer(tmp_path, max_epochs=1, callbacks=[Spy()]).fit(make_stage(update_epochs=1))
        after = list(warnings.filters)
    assert seen and all(seen)
    assert after == before
    assert not [w for w in caught if "IterableDataset` has `__len__`" in str(w.message)]
