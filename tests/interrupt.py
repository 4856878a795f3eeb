"""Test-only callbacks that interrupt a run at an exact point (``tests/test_resume_cli.py``).

Loaded by ``python -m lit_p3o`` through a config's ``trainer.callbacks`` (``tests/`` on
``PYTHONPATH``), so a run can be killed at a chosen step instead of after a guessed time.
"""

from __future__ import annotations

import os
import signal
from typing import Any, Literal

import lightning as L


class Interrupt(L.Callback):
    """Send ``signal`` to this process when ``step`` optimizer steps are done: ``when="rollout"``
    as the next rollout starts (the rollout then runs with the signal pending), ``"update"``
    after that update's other callbacks (so a checkpoint taken at ``step`` is written first)."""

    def __init__(self, step: int, signal: str = "SIGKILL", when: Literal["rollout", "update"] = "rollout") -> None:
        self.step, self.signal, self.when = step, signal, when

    def _fire(self, trainer: L.Trainer, when: str) -> None:
        if when == self.when and trainer.global_step == self.step:
            os.kill(os.getpid(), getattr(signal, self.signal))

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._fire(trainer, "rollout")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self._fire(trainer, "update")
