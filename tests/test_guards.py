"""Runs that would train nothing stop with a clear error: no gradient, zero gradients, skipped updates."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch
from helpers import cpu_trainer as trainer
from helpers import make_p3o_stage
from lightning.pytorch.callbacks import ModelCheckpoint
from micro import MICRO_ARCH, WIDE_ARCH
from torch import nn

from lit_p3o import (
    GuardSpec,
    LoraSpec,
    ModelSpec,
    OptimizerSpec,
    P3OModule,
    QuantizationSpec,
    SamplingSpec,
    SFTDataModule,
    SFTModule,
)
from lit_p3o.guards import GradientGuard, NoGradientError, TooManySkippedError, UpdateLedger

LORA = LoraSpec(r=2, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])


def make_stage(
    guards: GuardSpec | None = None, policy: ModelSpec | None = None, save_dir: Path | None = None, **rollout_kwargs
) -> P3OModule:
    """A micro P3O stage with LoRA: 4 prompts × 2 responses, 2 minibatches × 2 passes = 4 updates per rollout."""
    rollout_kwargs.setdefault("sampling", SamplingSpec(max_new_tokens=4))
    policy = policy or ModelSpec(architecture=dict(MICRO_ARCH), tokenizer="embedded:reviews", lora=LORA)
    return make_p3o_stage(policy, guards=guards, save_dir=save_dir, **rollout_kwargs)


def varied(examples, ended, prompts=None):
    """Distinct rewards within every group (a random policy's gold rewards all tie)."""
    return (
        torch.arange(len(examples), dtype=torch.float32)
        * torch.tensor([1.0, -1.0]).repeat(len(examples))[: len(examples)]
    )


def nan_at(*positions: int):
    """Varied rewards with NaN at the given response positions of every rollout."""

    def score(examples, ended, prompts=None):
        scores = varied(examples, ended)
        scores[list(positions)] = float("nan")
        return scores

    return score


def cut_graph_at(model: nn.Module, names: tuple[str, ...]) -> None:
    """What a kernel without autograd does (bitsandbytes' CPU inference path, issue 8): the
    output still requires grad, but nothing before it gets a gradient."""
    for name, module in model.named_modules():
        if name.endswith(names):
            module.register_forward_hook(lambda mod, args, out: out.detach().requires_grad_())


class StepCounter(L.Callback):
    def __init__(self) -> None:
        self.batches = 0

    def on_train_batch_start(self, *args) -> None:
        self.batches += 1


# --------------------------------------------------------------------------- no gradient


def test_a_step_whose_trainable_weights_get_no_gradient_stops_the_run(tmp_path):
    L.seed_everything(0)
    stage = make_stage(save_dir=tmp_path / "out")
    stage.scorer.score_examples = varied
    cut_graph_at(stage.policy, ("q_proj", "v_proj"))
    counter = StepCounter()
    with pytest.raises(NoGradientError, match=r"none of the 4 trainable tensors of `policy` received a gradient"):
        trainer(tmp_path, max_epochs=2, callbacks=[counter]).fit(stage)
    assert counter.batches == 1  # at the first optimizer step
    assert not (tmp_path / "out").exists()  # nothing exported


def test_sft_stops_too_when_its_trainable_weights_get_no_gradient(tmp_path):
    L.seed_everything(0)
    sft = SFTModule(
        ModelSpec(architecture=dict(MICRO_ARCH), tokenizer="embedded:reviews", lora=LORA),
        save_dir=str(tmp_path / "sft"),
    )
    cut_graph_at(sft.policy, ("q_proj", "v_proj"))
    data = SFTDataModule(embedded_size=32, max_length=48, batch_size=8)
    with pytest.raises(NoGradientError, match="`policy`"):
        trainer(tmp_path, max_epochs=1, limit_val_batches=0).fit(sft, data)
    assert not (tmp_path / "sft").exists()


@pytest.mark.parametrize("tied", [True, False], ids=["tied-rewards", "detached-loss"])
def test_consecutive_exactly_zero_gradients_stop_the_run_and_name_the_cause(tmp_path, tied):
    L.seed_everything(0)
    stage = make_stage(GuardSpec(max_zero_grad_steps=3))
    if tied:  # no learning signal: P3O's pairwise reward differences are all 0
        stage.scorer.score_examples = lambda examples, ended, prompts=None: torch.full((len(examples),), 0.5)
    else:  # signal, but the loss does not depend on the weights
        stage.scorer.score_examples = varied
        compute_loss = stage.compute_loss
        stage.compute_loss = lambda *args: (lambda loss, stats: (loss * 0.0, stats))(*compute_loss(*args))
    counter = StepCounter()
    cause = (
        "all responses to each prompt got the same reward" if tied else "the rewards of a prompt's responses differed"
    )
    with pytest.raises(
        NoGradientError,
        match=r"exactly-zero gradients in 3 consecutive optimizer steps "
        rf"\(model\.init_args\.guards\.max_zero_grad_steps = 3\).*{cause}",
    ):
        trainer(tmp_path, max_epochs=2, callbacks=[counter]).fit(stage)
    assert counter.batches == 3


def test_steps_whose_every_ratio_is_clipped_do_not_stop_a_healthy_run(tmp_path):
    """One group per minibatch and 4 passes: the policy moves so far on its rollout that every
    ratio of some later minibatches is clipped, and P3O's clipped loss is flat there (issue 22)."""
    L.seed_everything(0)
    stage = make_stage(GuardSpec(max_zero_grad_steps=1), minibatch_groups=1, update_epochs=4)
    stage.scorer.score_examples = varied
    run = trainer(tmp_path, max_epochs=1)
    run.fit(stage)
    guard = next(c for c in run.callbacks if isinstance(c, GradientGuard))
    assert guard.fully_clipped_steps > 0 and stage.updates.applied == 16
    assert float(run.callback_metrics["train/fully_clipped_steps"]) == guard.fully_clipped_steps


class Toy(L.LightningModule):
    """One weight; ``pattern[i]`` says what batch ``i`` does: 'g' gradient, '0' zero gradient,
    'c' zero gradient because every ratio was clipped, 's' skip."""

    def __init__(self, pattern: str, max_zero_grad_steps: int) -> None:
        super().__init__()
        self.pattern, self.max_zero = pattern, max_zero_grad_steps
        self.weight = nn.Parameter(torch.ones(1))
        self.fully_clipped = False

    def training_step(self, batch, batch_idx):
        kind = self.pattern[batch_idx]
        if kind == "s":
            return None
        self.fully_clipped = kind == "c"
        return (self.weight * batch).sum() * (1.0 if kind == "g" else 0.0)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.ones(len(self.pattern), 1), batch_size=1)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def configure_callbacks(self):
        return [GradientGuard(self.max_zero)]


@pytest.mark.parametrize(
    "pattern, fails",
    [
        ("0g0g0g", False),  # never two zero steps in a row
        ("00g00g", False),
        ("g000", True),
        ("0s0s", False),  # skipped steps neither count nor reset the streak, and are not "no gradient"
        ("0s0s0", True),
        ("ssss", False),
        ("cccccg", False),  # fully clipped steps neither count nor reset the streak
        ("0c0c0", True),
        ("00c", False),
    ],
)
def test_zero_gradient_streak(tmp_path, pattern, fails):
    module = Toy(pattern, max_zero_grad_steps=3)
    run = lambda: trainer(tmp_path, max_epochs=1).fit(module)  # noqa: E731
    if fails:
        with pytest.raises(NoGradientError, match="3 consecutive"):
            run()
    else:
        run()


def test_fully_clipped_steps_are_counted_and_logged(tmp_path):
    module = Toy("gcc0c", max_zero_grad_steps=3)
    guard = GradientGuard(3)
    module.configure_callbacks = lambda: [guard]
    run = trainer(tmp_path, max_epochs=1)
    run.fit(module)
    assert guard.fully_clipped_steps == 3
    assert float(run.callback_metrics["train/fully_clipped_steps"]) == 3.0


class OneTensorIdle(Toy):
    """A network (``net``) one of whose tensors always gets an exactly-zero gradient (its bias
    is multiplied by 0), as a LoRA ``A`` matrix does while ``B`` is still zero."""

    def __init__(self) -> None:
        super().__init__("gggg", max_zero_grad_steps=2)
        self.net = nn.Linear(1, 1)

    def training_step(self, batch, batch_idx):
        return (self.net.weight * batch).sum() + 0.0 * self.net.bias.sum()


def test_one_tensor_with_zero_gradient_does_not_stop_a_network_that_learns(tmp_path):
    """The guard asks whether *any* of a network's tensors got a non-zero gradient, not all."""
    module = OneTensorIdle()
    module.weight.requires_grad_(False)
    weight, bias = module.net.weight.detach().clone(), module.net.bias.detach().clone()
    trainer(tmp_path, max_epochs=1).fit(module)
    assert not torch.equal(module.net.weight, weight) and torch.equal(module.net.bias, bias)


def test_guard_spec_validation():
    with pytest.raises(ValueError, match="GuardSpec.max_zero_grad_steps"):
        GuardSpec(max_zero_grad_steps=0)
    with pytest.raises(ValueError, match="GuardSpec.max_skipped_fraction"):
        GuardSpec(max_skipped_fraction=1.5)


# --------------------------------------------------------------------------- skipped updates


def test_ledger_summary_and_limit():
    ledger = UpdateLedger(applied=6)
    assert ledger.summary() == "6 updates applied, 0 skipped"
    ledger.skipped.update({"non-finite reward in the minibatch": 2, "non-finite loss": 1})
    assert (
        ledger.summary() == "6 updates applied, 3 skipped (non-finite loss: 1, non-finite reward in the minibatch: 2)"
    )
    assert ledger.too_many_skipped(0.1, 29) and not ledger.too_many_skipped(0.1, 30)
    assert not ledger.too_many_skipped(0.0, math.inf) and not ledger.too_many_skipped(0.0, -1)


@pytest.mark.parametrize("accumulate", [1, 2])
def test_all_updates_skipped_stops_early_and_saves_nothing(tmp_path, accumulate):
    """A reward model that returns NaN: the default limit (0.1) stops a 40-update run at its 5th
    skip; an update is a minibatch, so accumulating 2 per optimizer step plans 40 all the same."""
    L.seed_everything(0)
    stage = make_stage(save_dir=tmp_path / "out")
    stage.scorer.score_examples = lambda examples, ended, prompts=None: torch.full((len(examples),), float("nan"))
    counter = StepCounter()
    with pytest.raises(
        TooManySkippedError,
        match=r"5 of the 40 planned updates were skipped.*"
        r"model\.init_args\.guards\.max_skipped_fraction = 0\.1.*\(0 updates applied, 5 skipped \(non-finite reward in the minibatch: 5\)\)",
    ):
        trainer(tmp_path, max_epochs=10, callbacks=[counter], accumulate_grad_batches=accumulate).fit(stage)
    assert counter.batches == 5
    assert not (tmp_path / "out").exists()


def test_skips_within_the_limit_train_save_and_are_summarised(tmp_path, capsys):
    L.seed_everything(0)
    stage = make_stage(GuardSpec(max_skipped_fraction=0.5), save_dir=tmp_path / "out")
    stage.scorer.score_examples = nan_at(0)  # one of the two minibatches of each rollout
    trainer(tmp_path, max_epochs=2).fit(stage)
    assert (stage.updates.applied, dict(stage.updates.skipped)) == (4, {"non-finite reward in the minibatch": 4})
    out = capsys.readouterr().out
    assert "[lit-p3o] P3OModule: 4 updates applied, 4 skipped (non-finite reward in the minibatch: 4)" in out
    assert (tmp_path / "out" / "adapter_config.json").is_file() or (tmp_path / "out" / "config.json").is_file()


def test_a_run_cut_short_is_checked_on_the_updates_it_ran(tmp_path):
    """The early check uses the planned updates; a run that ends before them is checked at its end."""
    L.seed_everything(0)
    stage = make_stage(GuardSpec(max_skipped_fraction=0.3), save_dir=tmp_path / "out")
    stage.scorer.score_examples = nan_at(0)  # 2 of every 4 updates skipped: 2 of 8 planned is < 0.3

    class StopAfterOneRollout(L.Callback):
        def on_train_epoch_end(self, trainer, module):
            trainer.should_stop = True

    with pytest.raises(TooManySkippedError, match="2 of the 4 updates run were skipped"):
        trainer(tmp_path, max_epochs=2, callbacks=[StopAfterOneRollout()]).fit(stage)
    assert not (tmp_path / "out").exists()


def test_the_ledger_is_checkpointed_and_resumed(tmp_path):
    L.seed_everything(0)
    stage = make_stage(GuardSpec(max_skipped_fraction=0.5))
    stage.scorer.score_examples = nan_at(0)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer(tmp_path, max_epochs=1, callbacks=[checkpoint], enable_checkpointing=True).fit(stage)
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert saved["updates"] == {"applied": 2, "skipped": {"non-finite reward in the minibatch": 2}}

    legacy = dict(saved, skipped_steps=2)  # as written before the ledger existed
    del legacy["updates"]
    torch.save(legacy, tmp_path / "legacy.ckpt")

    for path, skipped in [
        (tmp_path / "ckpt" / "last.ckpt", {"non-finite reward in the minibatch": 2}),
        (tmp_path / "legacy.ckpt", {"before resume": 2}),
    ]:
        L.seed_everything(0)
        resumed = make_stage(GuardSpec(max_skipped_fraction=0.5))
        resumed.scorer.score_examples = varied
        trainer(tmp_path, max_epochs=2).fit(resumed, ckpt_path=str(path))
        assert (resumed.updates.applied, dict(resumed.updates.skipped)) == (6, skipped)


# --------------------------------------------------------------------------- QLoRA end to end


@pytest.mark.slow
def test_qlora_p3o_on_cpu_trains_its_adapters_and_raises_the_task_reward(tmp_path, monkeypatch):
    """A tiny SFT model saved, loaded in 4 bits with LoRA, trained with P3O on the task's gold
    reward, as on a CPU with AVX512-BF16 (forced, so every machine takes bitsandbytes' CPU
    inference path that used to cut LoRA off its gradient)."""
    pytest.importorskip("bitsandbytes")
    import bitsandbytes.nn.modules as bnb_modules

    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: True)
    L.seed_everything(0)
    sft = SFTModule(
        ModelSpec(architecture=dict(WIDE_ARCH), tokenizer="embedded:reviews"),
        optimizer=OptimizerSpec(learning_rate=3e-3),
        save_dir=str(tmp_path / "sft"),
    )
    trainer(tmp_path, max_epochs=1, limit_val_batches=0).fit(
        sft, SFTDataModule(embedded_size=1000, max_length=48, batch_size=32)
    )
    L.seed_everything(0)
    targets = ["q_proj", "v_proj"]  # peft's default for Llama: every path from them to the loss crosses a 4-bit layer
    stage = make_stage(
        policy=ModelSpec(
            name_or_path=str(tmp_path / "sft"),
            lora=LoraSpec(r=8, lora_dropout=0.0, target_modules=targets),
            quantization=QuantizationSpec(),
        ),
        prompt_pool=64,
        num_prompts=16,
        num_responses=4,
        minibatch_groups=8,
        sampling=SamplingSpec(max_new_tokens=12),
    )
    assert any(type(m).__name__ == "Linear4bit" for m in stage.policy.modules())
    before = {n: p.detach().clone() for n, p in stage.policy.named_parameters()}
    rewards = []

    class RolloutReward(L.Callback):
        def on_train_epoch_end(self, trainer, module):
            rewards.append(float(torch.stack([g.scores for g in module.buffer.groups]).mean()))

    trainer(tmp_path, max_epochs=3, callbacks=[RolloutReward()]).fit(stage)
    after = dict(stage.policy.named_parameters())
    changed = [n for n in before if "lora_" in n and not torch.equal(after[n].detach(), before[n])]
    assert len(changed) == 2 * 2 * len(targets)  # layers × A/B × targets: every adapter moved
    # the 4-bit base weights are frozen, and not repacked in place either
    assert all(torch.equal(after[n].detach(), before[n]) for n in before if "lora_" not in n)
    assert stage.updates.applied == 3 * 4 and stage.skipped_steps == 0
    assert rewards[-1] > rewards[0] + 0.3, rewards  # seen: -1.45, -1.19, -0.78
