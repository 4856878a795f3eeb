"""RLVR on the embedded arithmetic task: which objective learns fastest from a 0/1 reward?

With a verifiable reward (``lit_p3o.tasks.arithmetic:exact_match``) there is no reward model
to over-optimise, so the comparison measures the objectives themselves. Every method starts
from one SFT policy (``configs/arithmetic/sft.yaml``, trained once and cached under
``--work``) and takes ``configs/arithmetic/p3o.yaml``'s rollout, KL and optimizer settings
(the KL to SFT enters every method's reward with the same β, the GRPO rows' included).

Budget, the same for every method:

1. ``--rollouts`` rollouts of :data:`SAMPLES` samples (64 prompts × 4 responses; 128 × 2 for
   online DPO, which needs pairs), 2 replay passes in minibatches of :data:`MINIBATCH`
   samples: 8 optimizer steps per rollout.
2. Learning rate: ``sweep.py``'s rule over :data:`LR_GRID` (one tuning run per value under a
   seed kept out of the comparison; the value with the highest exact-match rate at any
   evaluation after the start wins), scored on the *training* prompts, so the held-out
   prompts take no part in any choice.
3. ``--seeds`` seeds at the chosen rate.

Measured every 2 rollouts: exact match on the task's held-out split (51 prompts that neither
SFT nor RL sees; disjoint from the 149 training prompts), each prompt sampled
:data:`EVAL_REPEATS` times at temperature 1; and the run's training seconds so far, the
evaluations' own time left out (:class:`ClockedFrontier`). Intervals: bootstrap 95% over seeds.

    python benchmarks/rlvr.py [--seeds 5] [--rollouts 40] [--jobs 2] [--methods ...] [--learning-rates ...]
                              [--work DIR] [--out DIR]

Every finished (method, learning rate, seed, rollouts) run is kept under ``--work`` and
reused, so an interrupted sweep continues where it stopped. ``--jobs N`` runs N runs at a
time, each on (cores / N) threads. Seconds depend on that and on how busy the machine is:
compare them only between runs made under the same conditions (a fresh ``--work`` for a
timing you report).
"""

from __future__ import annotations

import argparse
import csv
import importlib
import inspect
import json
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from sweep import TUNING_SEED, Provenance, RunFailed, lit_p3o, run_all, tune_learning_rates, use_jobs

from lit_p3o.evaluation import FrontierCallback, read_frontier
from lit_p3o.stages.base import RLStage
from lit_p3o.statistics import Estimate, bootstrap_mean
from lit_p3o.tasks import get_task


@dataclass(frozen=True)
class Method:
    """A row of the comparison: an RL stage, its own arguments, and its responses per prompt."""

    class_path: str
    init_args: Mapping[str, Any] = field(default_factory=dict)
    responses: int = 4


METHODS = {
    "p3o-v1": Method("lit_p3o.P3OModule", {"variant": "v1"}),
    "p3o-v2": Method("lit_p3o.P3OModule", {"variant": "v2"}),
    # the GRPO family with the KL in the reward as every other row (β = kl.beta), so rows differ by objective only
    "grpo": Method("lit_p3o.GRPOModule", {"loss_type": "grpo", "scale_rewards": "group", "kl_in_reward": True}),
    "dr-grpo": Method("lit_p3o.GRPOModule", {"loss_type": "dr_grpo", "scale_rewards": "none", "kl_in_reward": True}),
    "dapo": Method(  # DAPO's clip-higher (Yu et al.: ε_high = 0.28) and token-level loss, without dynamic sampling
        "lit_p3o.GRPOModule", {"loss_type": "dapo", "epsilon_high": 0.28, "kl_in_reward": True}
    ),
    "rloo": Method("lit_p3o.RLOOModule"),
    "ppo": Method("lit_p3o.PPOModule"),
    "online-dpo": Method("lit_p3o.OnlineDPOModule", {"beta_dpo": 0.1}, responses=2),
}
BASE_CONFIG, SFT_CONFIG = Path("configs/arithmetic/p3o.yaml"), Path("configs/arithmetic/sft.yaml")
LR_GRID = (2.5e-4, 5e-4, 1e-3)  # around the shipped config's 5e-4
SAMPLES, MINIBATCH, UPDATE_EPOCHS = 256, 64, 2
STEPS_PER_ROLLOUT = UPDATE_EPOCHS * SAMPLES // MINIBATCH
EVAL_EVERY_ROLLOUTS, EVAL_REPEATS = 2, 8  # 408 samples: a run's accuracy ± 2 points (binomial SE)
EVAL_SAMPLES = EVAL_REPEATS * len(set(get_task("arithmetic").prompts("test", 10_000)))


class ClockedFrontier(FrontierCallback):
    """:class:`FrontierCallback` that also writes, at each evaluation, the seconds the run has
    trained since ``fit`` began (the evaluations' own time left out) to ``clock.csv`` beside
    the frontier CSV: methods are compared per second of training, not of measuring."""

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._start, self._measuring = time.perf_counter(), 0.0
        self._clock = self.path.with_name("clock.csv")
        if trainer.global_step == 0 and trainer.is_global_zero:
            self._clock.unlink(missing_ok=True)  # a fresh run starts a fresh clock, as its frontier CSV
        self._timed(super().on_train_start, trainer, pl_module)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
        self._timed(super().on_train_batch_end, trainer, pl_module, *args)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._timed(super().on_train_end, trainer, pl_module)

    def _timed(self, hook: Any, trainer: Any, *args: Any) -> None:
        began, evaluations = time.perf_counter(), len(self.rows)
        hook(trainer, *args)
        if len(self.rows) > evaluations:  # this hook evaluated (rank 0 only keeps rows)
            new = not self._clock.exists()
            with self._clock.open("a") as f:
                f.write("step,seconds\n" * new)
                f.write(f"{self.rows[-1]['step']},{began - self._start - self._measuring:.3f}\n")
        self._measuring += time.perf_counter() - began


@dataclass
class Trace:
    """One run's evaluations: rollouts done, exact match (held-out or training prompts), KL to
    SFT and training seconds, each ``[evaluations]``; and its optimizer steps."""

    rollouts: np.ndarray
    accuracy: np.ndarray
    kl: np.ndarray
    seconds: np.ndarray
    steps: int


def read_trace(log_dir: Path) -> Trace:
    frontier = read_frontier(log_dir / "frontier.csv")
    with open(log_dir / "clock.csv", newline="") as f:
        seconds = {int(row["step"]): float(row["seconds"]) for row in csv.DictReader(f)}
    steps = [int(s) for s in frontier["step"]]
    return Trace(
        np.array(steps) / STEPS_PER_ROLLOUT,
        np.array(frontier["gold"]),
        np.array(frontier["kl"]),
        np.array([seconds[s] for s in steps]),
        max(steps),
    )


def check_methods(names: list[str]) -> None:
    """Stop with one line when a method's stage is not in this lit_p3o or refuses an argument."""
    for name in names:
        method = METHODS[name]
        module, _, attribute = method.class_path.rpartition(".")
        stage = getattr(importlib.import_module(module), attribute, None)
        if stage is None:
            sys.exit(
                f"rlvr.py: --methods {name}: {method.class_path} is not in this version of lit_p3o; "
                f"leave {name} out of --methods"
            )
        taken = inspect.signature(stage).parameters
        unknown = [a for a in method.init_args if a not in taken]
        if unknown:
            sys.exit(f"rlvr.py: --methods {name}: {method.class_path} takes no argument {', '.join(unknown)}")


def train_sft(work: Path) -> None:
    """The shared SFT policy, trained once: a finished one under ``work`` is reused."""
    if (work / "sft" / "config.json").exists():
        return
    (work / "logs").mkdir(parents=True, exist_ok=True)
    print(f"[rlvr] SFT policy: training {work / 'sft'}", flush=True)
    lit_p3o(
        "fit",
        "--config",
        str(SFT_CONFIG),
        "--model.init_args.save_dir",
        str(work / "sft"),
        "--trainer.default_root_dir",
        str(work / "logs" / "sft"),
        log=work / "logs" / "sft.log",
    )


def run_config(work: Path, name: str, lr: float, seed: int, rollouts: int, split: str, log_dir: Path) -> dict:
    """The full ``fit`` config of one run: the shipped RLVR config's shared stage arguments
    (rollout, KL, optimizer, reward) with this method's class, arguments and budget."""
    base = yaml.safe_load(BASE_CONFIG.read_text())
    shared = inspect.signature(RLStage.__init__).parameters
    init = {k: v for k, v in base["model"]["init_args"].items() if k in shared and k != "save_dir"}
    method = METHODS[name]
    init["policy"] = {"name_or_path": str(work / "sft")}
    init["rollout"] |= {
        "split": "train",  # RL trains on the training prompts only
        "num_prompts": SAMPLES // method.responses,
        "num_responses": method.responses,
        "minibatch_groups": MINIBATCH // method.responses,
        "update_epochs": UPDATE_EPOCHS,
    }
    init["optimizer"] |= {"learning_rate": lr}
    init |= {"seed": seed, **method.init_args}
    evaluation = {
        "prompts": "embedded:arithmetic",
        "split": split,
        "num_prompts": EVAL_SAMPLES,
        "sampling": {"max_new_tokens": init["rollout"]["sampling"]["max_new_tokens"]},
    }
    trainer = base["trainer"] | {
        "max_epochs": rollouts,
        "default_root_dir": str(log_dir),
        "enable_progress_bar": False,
        "logger": {
            "class_path": "lightning.pytorch.loggers.CSVLogger",
            "init_args": {"save_dir": str(log_dir.parent), "name": "", "version": log_dir.name},
        },
        "callbacks": [
            {
                "class_path": "rlvr.ClockedFrontier",
                "init_args": {"evaluation": evaluation, "eval_every": EVAL_EVERY_ROLLOUTS * STEPS_PER_ROLLOUT},
            }
        ],
    }
    return {"seed_everything": seed, "trainer": trainer, "model": {"class_path": method.class_path, "init_args": init}}


def run(work: Path, name: str, lr: float, seed: int, rollouts: int, split: str) -> Path:
    """One RL run, evaluated on ``split``; returns its log folder. A finished run with the same
    config is reused; one whose config differs (a constant of this script changed) runs again."""
    log_dir = work / "runs" / f"{name}_lr{lr:g}_s{seed}_r{rollouts}_{split}"
    config, done = log_dir / "run.yaml", log_dir / "done.json"  # not config.yaml: the CLI writes that one
    text = yaml.safe_dump(run_config(work, name, lr, seed, rollouts, split, log_dir), sort_keys=False)
    if done.exists() and config.exists() and config.read_text() == text:
        return log_dir
    done.unlink(missing_ok=True)
    log_dir.mkdir(parents=True, exist_ok=True)
    config.write_text(text)
    print(f"[rlvr] {log_dir.name}: started", flush=True)
    start = time.time()
    result: dict[str, Any] = {}
    try:
        lit_p3o("fit", "--config", str(config), log=log_dir / "output.log")
    except RunFailed as err:
        last = (log_dir / "output.log").read_text().strip().splitlines()[-1:]
        if not (last and last[0].startswith("lit-p3o fit: error:") and (log_dir / "frontier.csv").exists()):
            raise RunFailed(f"run {log_dir.name}: {err}") from None
        # lit-p3o stopped it on purpose (a guard: e.g. the policy collapsed to one answer and the
        # gradients vanished): an outcome of this method at this rate, kept with what it reached
        result["stopped"] = last[0].removeprefix("lit-p3o fit: error: ")
    done.write_text(json.dumps({"seconds": time.time() - start, **result}))
    how = "stopped by lit-p3o" if result else "done"
    print(f"[rlvr] {log_dir.name}: {how} in {time.time() - start:.0f} s", flush=True)
    return log_dir


def stopped_runs(work: Path) -> list[str]:
    """One line per run lit-p3o stopped early (tuning runs included), with its reason."""
    lines = []
    for done in sorted((work / "runs").glob("*/done.json")):
        reason = json.loads(done.read_text()).get("stopped")
        if reason:
            lines.append(f"- `{done.parent.name}`: {reason.split('. ')[0]}.")
    return lines


def at_time(trace: Trace, seconds: float) -> float:
    """The run's accuracy after ``seconds`` of training, interpolated between its evaluations
    (its last one beyond them)."""
    return float(np.interp(seconds, trace.seconds, trace.accuracy))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rollouts", type=int, default=40)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--learning-rates", nargs="+", type=float, default=list(LR_GRID))
    parser.add_argument("--work", type=Path, default=Path("outputs/rlvr"))
    parser.add_argument("--out", type=Path, default=Path("docs/results"))
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time, each on cores/jobs threads")
    args = parser.parse_args()
    if args.rollouts < EVAL_EVERY_ROLLOUTS or args.seeds < 1 or args.jobs < 1:
        sys.exit(f"rlvr.py: needs --rollouts >= {EVAL_EVERY_ROLLOUTS}, --seeds >= 1 and --jobs >= 1")
    check_methods(args.methods)
    use_jobs(args.jobs)
    provenance = Provenance.now()
    try:
        train_sft(args.work)

        def peak(name: str, lr: float) -> float:
            trace = read_trace(run(args.work, name, lr, TUNING_SEED, args.rollouts, "train"))
            return float(trace.accuracy[1:].max())  # not the first evaluation: the SFT policy, the same for every lr

        tuned = tune_learning_rates(peak, args.methods, args.learning_rates, args.jobs)
        specs = [(args.work, n, tuned[n][0], s, args.rollouts, "test") for n in args.methods for s in range(args.seeds)]
        log_dirs = run_all(run, specs, args.jobs)
    except RunFailed as err:
        sys.exit(f"rlvr.py: {err}")
    traces: dict[str, list[Trace]] = {}
    for (_, name, *_), log_dir in zip(specs, log_dirs):
        traces.setdefault(name, []).append(read_trace(log_dir))
    run_seconds = sum(json.loads((d / "done.json").read_text())["seconds"] for d in log_dirs)
    args.out.mkdir(parents=True, exist_ok=True)
    plot(traces, args.out / "rlvr.png")
    write_report(args, tuned, traces, run_seconds, provenance)


def rollout_columns(rollouts: int) -> list[int]:
    """The evaluated rollout counts the table shows: about a quarter, half, three quarters and all of the budget."""
    evaluated = range(EVAL_EVERY_ROLLOUTS, rollouts + 1, EVAL_EVERY_ROLLOUTS)
    picks = [min(evaluated, key=lambda r: abs(r - rollouts * f)) for f in (0.25, 0.5, 0.75)]
    return list(dict.fromkeys([*picks, rollouts]))


def at_rollout(trace: Trace, rollouts: float) -> float:
    return float(trace.accuracy[np.argmin(abs(trace.rollouts - rollouts))])


def write_report(args, tuned, traces: dict[str, list[Trace]], run_seconds: float, provenance: Provenance) -> None:
    """``rlvr.md``: the run's identity, the results table and its mechanical reading, then the
    budget and tuning; every evaluation of every run goes to ``rlvr_runs.csv``."""
    columns = rollout_columns(args.rollouts)
    budget = min(float(np.mean([t.seconds[-1] for t in ts])) for ts in traces.values())
    matched = (budget / 2, budget)  # the least training time any method had, on average over its seeds
    sft_rate = float(np.mean([ts[0].accuracy[0] for ts in traces.values()]))  # every run starts from the same SFT
    hits = round(sft_rate * EVAL_SAMPLES)
    sft = bootstrap_mean([1.0] * hits + [0.0] * (EVAL_SAMPLES - hits))
    by_rollouts = {n: [bootstrap_mean([at_rollout(t, r) for t in ts]) for r in columns] for n, ts in traces.items()}
    by_seconds = {n: [bootstrap_mean([at_time(t, s) for t in ts]) for s in matched] for n, ts in traces.items()}
    lines = [
        "# RLVR on the arithmetic task: every method from one SFT policy, the same budget",
        "",
        *provenance.table(
            "rlvr.py",
            f"its runs took {run_seconds / 60:.1f} min together, counting any reused from an earlier invocation",
        ),
        "",
        f"Exact match on the {EVAL_SAMPLES // EVAL_REPEATS} held-out prompts (each sampled {EVAL_REPEATS} times at "
        f"temperature 1: {EVAL_SAMPLES} samples per evaluation), mean over {args.seeds} seeds with a bootstrap 95% "
        f"interval over seeds; SFT, where every run starts: {sft} (interval over the samples). Seconds: training "
        "time on this machine, evaluations left out (accuracy interpolated between evaluations); "
        f"{matched[1]:.0f} s is the least any method trained, on average over its seeds.",
        "",
        "| method | lr | "
        + " | ".join([f"after {r} rollouts" for r in columns] + [f"after {s:.0f} s" for s in matched])
        + " | KL to SFT at the end | training s per rollout | optimizer steps |",
        "|---|---|" + "---|" * (len(columns) + len(matched) + 3),
    ]
    for name, ts in traces.items():
        cells = [str(e) for e in by_rollouts[name] + by_seconds[name]]
        cells.append(str(bootstrap_mean([t.kl[-1] for t in ts])))
        cells.append(str(bootstrap_mean([t.seconds[-1] / t.rollouts[-1] for t in ts])))
        cells.append("/".join(sorted({str(t.steps) for t in ts})))
        lines.append(f"| {name} | {tuned[name][0]:g} | " + " | ".join(cells) + " |")
    lines += ["", *reading(by_rollouts, by_seconds, f"{columns[-1]} rollouts", f"{matched[1]:.0f} s", sft), ""]
    lines += budget_section(args, tuned)
    stopped = stopped_runs(args.work)
    if stopped:
        lines += [
            "",
            "Runs that lit-p3o stopped before their budget (a guard; they count with the evaluations they "
            "reached, the last one carried to later columns):",
            *stopped,
        ]
    (args.out / "rlvr.md").write_text("\n".join(lines) + "\n")
    write_runs(traces, args.out / "rlvr_runs.csv")
    print((args.out / "rlvr.md").read_text())


def reading(by_rollouts: dict, by_seconds: dict, rollouts: str, seconds: str, sft: Estimate) -> list[str]:
    """The mechanical part of the reading: per budget the best method, those whose interval
    overlaps its own (not told apart at this many seeds), and those whose interval lies above SFT's."""
    out = ["**Reading** (mechanical, from the table; a person's reading belongs under it):"]
    for budget, table in ((rollouts, by_rollouts), (seconds, by_seconds)):
        final = {name: estimates[-1] for name, estimates in table.items()}
        best = max(final, key=lambda n: final[n].value)
        tied = [n for n in final if n != best and final[n].high >= final[best].low]
        above_sft = [n for n in final if final[n].low > sft.high]
        out.append(
            f"- after {budget}: best {best} {final[best]}; not told apart from it: {', '.join(tied) or 'none'}; "
            f"above SFT ({sft.value:.3f}) beyond both intervals: {', '.join(above_sft) or 'none'}."
        )
    return out


def budget_section(args, tuned) -> list[str]:
    lines = [
        "## Budget and tuning",
        "",
        f"Every method: {args.rollouts} rollouts of {SAMPLES} samples ({SAMPLES // 4} prompts × 4 responses; "
        f"online DPO, which needs pairs, {SAMPLES // 2} × 2), {UPDATE_EPOCHS} replay passes in minibatches of "
        f"{MINIBATCH} samples ({STEPS_PER_ROLLOUT} optimizer steps per rollout); KL, optimizer and reward as in "
        f"`{BASE_CONFIG}`, from one SFT policy (`{SFT_CONFIG}`); RL samples its prompts from the training split only. "
        f"Learning rate: of {', '.join(f'{lr:g}' for lr in args.learning_rates)}, the value whose tuning run "
        f"(seed {TUNING_SEED}) reached the highest exact-match rate on the training prompts after its start "
        "(the held-out prompts take no part in any choice).",
        "",
        "| method | stage | arguments | chosen lr | tuning peak per lr (training prompts) |",
        "|---|---|---|---|---|",
    ]
    for name, (lr, peaks) in tuned.items():
        method = METHODS[name]
        arguments = ", ".join(f"{k}={v}" for k, v in method.init_args.items()) or "defaults"
        peaks_cell = ", ".join(f"{k:g}: {v:.3f}" for k, v in peaks.items()) or "— (one value: no tuning run)"
        lines.append(f"| {name} | `{method.class_path}` | {arguments} | {lr:g} | {peaks_cell} |")
    lines += ["", "Plot: `rlvr.png`; every evaluation of every run: `rlvr_runs.csv`."]
    return lines


def write_runs(traces: dict[str, list[Trace]], out: Path) -> None:
    """Every evaluation of every run, tagged with its method and seed."""
    with open(out, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["method", "seed", "rollouts", "training_seconds", "exact_match", "kl"])
        for name, ts in traces.items():
            for seed, t in enumerate(ts):
                for row in zip(t.rollouts, t.seconds, t.accuracy, t.kl):
                    writer.writerow([name, seed, *(f"{v:.6g}" for v in row)])


def plot(traces: dict[str, list[Trace]], out: Path) -> None:
    """Held-out exact match (mean over seeds, 95% band) against rollouts and training seconds."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 4.2))
    by_rollouts, by_seconds = figure.subplots(1, 2, sharey=True)
    for name, ts in traces.items():
        length = min(len(t.accuracy) for t in ts)
        estimates = [bootstrap_mean([t.accuracy[i] for t in ts]) for i in range(length)]
        mean = np.array([e.value for e in estimates])
        low, high = np.array([e.low for e in estimates]), np.array([e.high for e in estimates])
        seconds = np.mean([t.seconds[:length] for t in ts], axis=0)
        for axes, x in ((by_rollouts, ts[0].rollouts[:length]), (by_seconds, seconds)):
            (line,) = axes.plot(x, mean, label=name)
            axes.fill_between(x, low, high, color=line.get_color(), alpha=0.15)
    by_rollouts.set(xlabel="rollouts", ylabel="held-out exact match (mean over seeds, 95% CI)")
    by_seconds.set(xlabel="training seconds (mean over seeds)")
    by_rollouts.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(out, dpi=120)


if __name__ == "__main__":
    main()
