"""Rollout samples in the loggers (TensorBoard text, W&B table, JSONL next to CSV metrics) and
the phases of a rollout and an evaluation in the progress output."""

from __future__ import annotations

import json
from csv import DictReader
from pathlib import Path
from unittest.mock import MagicMock

import lightning as L
import pytest
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger
from micro import MICRO_ARCH
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lit_p3o import EvaluationSpec, FrontierCallback, ModelSpec, OptimizerSpec, P3OModule, RolloutSpec, SamplingSpec
from lit_p3o.monitoring import log_samples, markdown_table

ROWS = [
    {"prompt": "review the tea :", "response": "it is | good .", "score": 0.5, "ended": True},
    {"prompt": "review the bike :", "response": "bad", "score": -1.25, "ended": False},
]


def tensorboard_texts(log_dir: str | Path) -> dict[str, list[tuple[int, str]]]:
    events = EventAccumulator(str(log_dir), size_guidance={"tensors": 0})
    events.Reload()
    return {
        tag: [(e.step, e.tensor_proto.string_val[0].decode()) for e in events.Tensors(tag)]
        for tag in events.Tags()["tensors"]
    }


def test_markdown_table_escapes_cells():
    table = markdown_table(list(ROWS[0]), ROWS).splitlines()
    assert table[0] == "| prompt | response | score | ended |"
    assert table[2] == "| review the tea : | it is \\| good . | 0.5 | True |"
    assert table[3].endswith("| -1.25 | False |")


def test_log_samples_writes_to_each_logger_in_its_form(tmp_path):
    tensorboard = TensorBoardLogger(tmp_path, name="tb")
    csv = CSVLogger(tmp_path, name="csv")
    wandb = MagicMock(spec=WandbLogger)  # wandb itself is not installed; its logger's API is what we call
    log_samples([tensorboard, csv, wandb], "rollout/samples", ROWS, step=7)
    tensorboard.experiment.flush()
    [(step, text)] = tensorboard_texts(tensorboard.log_dir)["rollout/samples/text_summary"]
    assert step == 7 and "it is \\| good ." in text and "review the bike :" in text
    lines = (Path(csv.log_dir) / "rollout_samples.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [{"step": 7, **row} for row in ROWS]
    wandb.log_table.assert_called_once_with(
        key="rollout/samples",
        columns=["prompt", "response", "score", "ended"],
        data=[["review the tea :", "it is | good .", 0.5, True], ["review the bike :", "bad", -1.25, False]],
        step=7,
    )


def p3o_stage(log_samples_groups: int = 2, minibatch_groups: int = 2) -> P3OModule:
    L.seed_everything(0)
    rollout = RolloutSpec(
        prompt_pool=16,
        num_prompts=4,
        num_responses=2,
        update_epochs=1,
        minibatch_groups=minibatch_groups,
        max_prompt_tokens=16,
        sampling=SamplingSpec(max_new_tokens=6),
        log_samples=log_samples_groups,
        forward_batch_size=3,
    )
    spec = ModelSpec(architecture=MICRO_ARCH, tokenizer="embedded:reviews")
    return P3OModule(spec, "embedded:reviews", rollout=rollout, optimizer=OptimizerSpec(learning_rate=1e-2))


def test_rollout_samples_reach_tensorboard_and_a_jsonl_next_to_the_csv_metrics(tmp_path):
    csv, tensorboard = CSVLogger(tmp_path, name="csv"), TensorBoardLogger(tmp_path, name="tb")
    L.Trainer(
        accelerator="cpu",
        max_epochs=2,
        logger=[csv, tensorboard],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    ).fit(p3o_stage())
    rows = [json.loads(line) for line in (Path(csv.log_dir) / "rollout_samples.jsonl").read_text().splitlines()]
    assert (Path(csv.log_dir) / "metrics.csv").is_file()
    assert [(r["step"], r["rollout"]) for r in rows] == [(0, 1)] * 4 + [(2, 2)] * 4  # 2 groups × K = 2, per rollout
    assert all(
        r["response"] and r["prompt"].startswith(("write", "review", "rate", "what")) or r["prompt"] for r in rows
    )
    assert {type(r["score"]) for r in rows} == {float} and {type(r["ended"]) for r in rows} == {bool}
    texts = tensorboard_texts(tensorboard.log_dir)["rollout/samples/text_summary"]
    assert [step for step, _ in texts] == [0, 2]
    assert all(r["prompt"] in texts[r["rollout"] - 1][1] for r in rows)


@pytest.mark.parametrize("on_policy", [True, False])
def test_every_rollouts_statistics_reach_the_csv_at_their_step(tmp_path, on_policy):
    """One row per rollout, even when log_every_n_steps skips the steps in between: at the step
    the rollout was drawn, or after its update when that update gives its KL (on-policy)."""
    # on-policy: one minibatch of all 4 groups, whose update gives logp_old, the KL and r̃
    stage = p3o_stage(log_samples_groups=0, minibatch_groups=4 if on_policy else 2)
    csv = CSVLogger(tmp_path, name="csv")
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=3,
        logger=csv,
        log_every_n_steps=50,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(stage)
    csv.save()
    with open(Path(csv.log_dir) / "metrics.csv") as f:
        rows = [r for r in DictReader(f) if r["rollout/kl_mean"]]
    assert [int(r["step"]) for r in rows] == ([1, 2, 3] if on_policy else [0, 2, 4])
    assert all(rows[0][f"rollout/{name}"] for name in ("score_mean", "reward_mean", "beta", "eos_rate"))
    assert float(rows[-1]["rollout/kl_mean"]) == pytest.approx(trainer.callback_metrics["rollout/kl_mean"].item())


class ScorerSpy:
    """Wraps the stage's scorer and records what the training progress bar shows while scoring."""

    def __init__(self, scorer, trainer: L.Trainer) -> None:
        self.scorer, self.trainer, self.shown = scorer, trainer, []

    def score_examples(self, examples, ended, prompts=None):
        bar = self.trainer.progress_bar_callback
        if isinstance(bar, RichProgressBar) and bar.train_progress_bar_id is not None:
            self.shown.append(bar.train_progress_bar.description)
        elif isinstance(bar, TQDMProgressBar) and bar._train_progress_bar is not None:
            self.shown.append(str(bar.train_progress_bar))
        return self.scorer.score_examples(examples, ended)


@pytest.mark.parametrize("bar", [TQDMProgressBar, RichProgressBar])
def test_progress_shows_every_rollout_phase_and_the_evaluation(tmp_path, capfd, bar):
    stage = p3o_stage(log_samples_groups=0)
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[
            bar(),
            FrontierCallback(EvaluationSpec(num_prompts=4, sampling=SamplingSpec(max_new_tokens=6)), eval_every=1),
        ],
    )
    stage.scorer = spy = ScorerSpy(stage.scorer, trainer)
    trainer.fit(stage)
    # scoring happens in the rollout (8 responses in chunks of 3) and in each evaluation
    assert any("[rollout]" in shown for shown in spy.shown) and any("[eval]" in shown for shown in spy.shown)
    err = capfd.readouterr().err
    for label in ("rollout: generate", "rollout: log-probs", "rollout: score", "eval: generate"):
        assert label in err, label  # the phases' own bars, under Lightning's
