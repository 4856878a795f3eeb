"""What the method-comparison benchmarks (``frontier.py``, ``rlvr.py``) share: running
``lit-p3o`` as subprocesses, several at a time, and the learning-rate rule that gives every
method the same tuning budget.

The rule: every method gets the same grid, one tuning run per value under a seed kept out of
the comparison (:data:`TUNING_SEED`); the value whose run reached the highest score at any
evaluation is kept. What "score" is (gold reward, exact-match rate on training prompts) is the
caller's choice.
"""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TypeVar

TUNING_SEED = 100
BENCHMARKS = Path(__file__).resolve().parent

THREADS: int | None = None  # torch threads of each run; None: torch's default (all cores)
T = TypeVar("T")


def use_jobs(jobs: int) -> None:
    """Runs ``jobs`` at a time from now on, each on (cores / jobs) threads, so they do not
    oversubscribe the machine (one job keeps torch's default)."""
    global THREADS
    THREADS = max(1, (os.cpu_count() or 1) // jobs) if jobs > 1 else None


class RunFailed(Exception):
    """A ``lit-p3o`` run whose output went to a file exited non-zero; the message names the file."""


def lit_p3o(*args: str, log: Path | None = None) -> None:
    """``python -m lit_p3o *args`` on :data:`THREADS` threads, its output to ``log`` when given
    (runs side by side do not interleave); this folder is importable in it (a benchmark's own
    callback can be named by class path)."""
    env = dict(os.environ)
    if THREADS is not None:
        env["OMP_NUM_THREADS"] = str(THREADS)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(BENCHMARKS), env.get("PYTHONPATH")) if p)
    command = [sys.executable, "-m", "lit_p3o", *args]
    if log is None:
        subprocess.run(command, check=True, env=env)
        return
    with open(log, "w") as out:
        code = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=env).returncode
    if code != 0:
        raise RunFailed(f"`lit-p3o {' '.join(args[:1])}` exited with {code}; its output: {log}")


def run_all(run: Callable[..., T], specs: Sequence[tuple], jobs: int) -> list[T]:
    """``run(*spec)`` for every spec, ``jobs`` at a time; results in the order of ``specs``.
    The first failure stops the sweep: the runs not yet started are cancelled."""
    pool = ThreadPoolExecutor(jobs)
    try:
        return list(pool.map(lambda spec: run(*spec), specs))
    finally:
        pool.shutdown(cancel_futures=True)


def tune_learning_rates(
    peak: Callable[[str, float], float], names: Sequence[str], grid: Sequence[float], jobs: int
) -> dict[str, tuple[float, dict[float, float]]]:
    """Per method, the grid value whose tuning run reached the highest score, and every
    value's peak; ``peak(name, lr)`` runs (or reuses) the tuning run and returns its peak.
    A one-value grid needs no tuning run (its peaks are then empty)."""
    if len(grid) == 1:
        return {name: (grid[0], {}) for name in names}
    specs = [(name, lr) for name in names for lr in grid]
    peaks = dict(zip(specs, run_all(peak, specs, jobs)))
    tuned = {}
    for name in names:
        by_lr = {lr: peaks[name, lr] for lr in grid}
        tuned[name] = (max(by_lr, key=by_lr.get), by_lr)
    return tuned


def train_base(work: Path) -> None:
    """The demo's SFT policy and reward model under ``work`` (``sft``, ``reward``; logs in
    ``logs``), trained once and shared by every run of a benchmark."""
    lit_p3o(
        "fit",
        "--config",
        "configs/demo/sft.yaml",
        "--model.init_args.save_dir",
        str(work / "sft"),
        "--trainer.default_root_dir",
        str(work / "logs/sft"),
        "--trainer.logger.init_args.save_dir",
        str(work / "logs"),
    )
    lit_p3o(
        "fit",
        "--config",
        "configs/demo/reward.yaml",
        "--model.init_args.model.name_or_path",
        str(work / "sft"),
        "--data.init_args.embedded.policy",
        str(work / "sft"),
        "--model.init_args.save_dir",
        str(work / "reward"),
        "--trainer.default_root_dir",
        str(work / "logs/reward"),
        "--trainer.logger.init_args.save_dir",
        str(work / "logs"),
    )


def machine(load: float) -> str:
    """The CPU model and core count, and how busy the machine was when the sweep began."""
    cpuinfo = Path("/proc/cpuinfo")
    models = [
        line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")
    ]
    model = models[0] if models else platform.processor() or platform.machine()
    return f"{os.cpu_count()} cores, {model}; load average {load:.1f} when it began"


@dataclass(frozen=True)
class Provenance:
    """What a result report's first table says about its run. Taken when the sweep begins: by
    the time the report is written, the sweep's own outputs (tracked result files) would mark
    the checkout dirty."""

    commit: str  # ``git describe``, ``-dirty`` when the checkout had uncommitted changes
    load: float
    start: float

    @classmethod
    def now(cls) -> Provenance:
        described = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True)
        return cls(described.stdout.strip(), os.getloadavg()[0], time.time())

    def table(self, script: str, wall_note: str) -> list[str]:
        """date | commit | machine | command | wall time, the command as it was typed."""
        command = f"python benchmarks/{script} " + shlex.join(sys.argv[1:])
        minutes = (time.time() - self.start) / 60
        return [
            "| date | commit | machine | command | wall time |",
            "|---|---|---|---|---|",
            f"| {datetime.now(timezone.utc):%Y-%m-%d} | `{self.commit}` | {machine(self.load)} | `{command}` | "
            f"{minutes:.1f} min ({wall_note}) |",
        ]
