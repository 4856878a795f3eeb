"""Showing what a run does while it runs: sampled text in the loggers, phases in the progress bar.

Loss curves say little about an RL run; the responses say a lot. :func:`log_samples` writes
rows of sampled text to every logger the trainer has, in the form each one displays:
TensorBoard a markdown table (``add_text``), Weights & Biases a table (``log_table``), and
Lightning's ``CSVLogger`` a JSONL file next to its ``metrics.csv``. :func:`log_point` records
one event's summary (a rollout, an evaluation) at the step it happened. :func:`phase` names the
current phase (generation, log-prob passes, scoring, evaluation) in Lightning's progress bar.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger, WandbLogger


def log_samples(loggers: Sequence[Logger], key: str, rows: list[dict[str, Any]], step: int) -> None:
    """Write ``rows`` (dicts with the same keys) under ``key`` at ``step`` to each logger that
    shows text; call it on rank 0. CSV loggers get ``<log_dir>/<key with / as _>.jsonl``."""
    if not rows:
        return
    columns = list(rows[0])
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_text(key, markdown_table(columns, rows), global_step=step)
        elif isinstance(logger, WandbLogger):
            logger.log_table(key=key, columns=columns, data=[[row[c] for c in columns] for row in rows], step=step)
        elif isinstance(logger, CSVLogger):
            path = Path(logger.log_dir) / f"{key.replace('/', '_')}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a") as f:
                for row in rows:
                    f.write(json.dumps({"step": step, **row}) + "\n")


def log_point(trainer: L.Trainer, metrics: dict[str, float]) -> None:
    """Write one event's figures to every logger at the current optimizer step and put them in
    ``trainer.callback_metrics`` (so ``ModelCheckpoint``/``EarlyStopping`` can monitor them).

    Not through ``self.log``: an event happens once, not every step, and Lightning writes a
    step-level value logged in a batch hook again at later logging steps and drops it on steps
    that are not a multiple of ``log_every_n_steps``; it also costs 0.3-0.7 ms per value on CPU
    (Lightning's result bookkeeping), more than the rollout's own statistics. Call it on every
    rank with the same ``metrics`` (reduce them first); rank-zero loggers write on rank 0 only.
    """
    trainer.callback_metrics.update({k: torch.tensor(v) for k, v in metrics.items()})
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=trainer.global_step)


def markdown_table(columns: list[str], rows: list[dict[str, Any]]) -> str:
    """A markdown table (what TensorBoard's text tab renders), ``|`` escaped in cells."""

    def cell(value: Any) -> str:
        text = f"{value:.4g}" if isinstance(value, float) else str(value)
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row[c]) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def shows_progress(trainer: L.Trainer) -> bool:
    """Whether this process draws progress bars (rank 0 of a trainer that has one)."""
    return trainer.is_global_zero and trainer.progress_bar_callback is not None


@contextmanager
def phase(trainer: L.Trainer, label: str) -> Iterator[None]:
    """Show ``[label]`` in Lightning's training progress bar (TQDM or Rich) during the block."""
    bar = trainer.progress_bar_callback
    if not trainer.is_global_zero or bar is None or bar.is_disabled:
        yield
        return
    if isinstance(bar, TQDMProgressBar) and bar._train_progress_bar is not None:
        tqdm = bar.train_progress_bar
        tqdm.set_postfix_str(f"[{label}]", refresh=True)
        try:
            yield
        finally:
            tqdm.set_postfix_str("", refresh=False)
    elif (
        isinstance(bar, RichProgressBar)
        and bar.progress is not None
        and getattr(bar, "train_progress_bar_id", None) is not None
    ):
        description = bar.train_progress_bar.description
        bar.progress.update(bar.train_progress_bar_id, description=f"{description} [{label}]")
        bar.refresh()
        try:
            yield
        finally:
            bar.progress.update(bar.train_progress_bar_id, description=description)
    else:  # a custom bar, or before the training bar is drawn
        yield
