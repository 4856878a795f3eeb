"""The paper's comparison on the embedded task: KL–reward frontiers and head-to-head win rates,
with enough seeds and intervals to tell which differences are real.

Budget, the same for every method:

1. SFT and the reward model are trained once (or reused with ``--skip-base``).
2. Learning rate: every method gets the same grid (:data:`LR_GRID`), one tuning run per value
   at its middle KL knob under a seed kept out of the comparison (:data:`TUNING_SEED`); the
   value whose run reached the highest gold reward at any evaluation is kept.
3. Comparison: every method at that learning rate, 3 values of its KL knob (β; β_DPO for DPO)
   × ``--seeds`` seeds, each run ``--rollouts`` rollouts of 128 samples (64 prompts × 2, or
   32 × 4 for P3O with K = 4), 8 optimizer steps per rollout.

Figures (``docs/results/frontier.md``):

* gold reward at matched KL: a least-squares fit of gold on (√KL, KL) over all evaluation rows
  of a method (Gao et al.'s over-optimisation shape), read at :data:`MATCHED_KL` (only inside
  the KL range the method reached), with a bootstrap 95% interval over runs;
* win rates on every held-out prompt, each sampled ``--samples-per-prompt`` times, pooled over
  every seed's policy at the middle KL knob (each policy of A against each policy of B), with
  a bootstrap 95% interval that resamples A's seeds, B's seeds and the prompts; judged by the
  gold reward and by the reward model. P3O-V1 and PPO, the paper's head-to-head, get
  ``--head-to-head-seeds`` seeds at the middle knob (64 by default: what a 95% interval of ±3
  points took on 2026-12-07; the first ``--seeds`` of them are the
  frontier's runs): seed-to-seed variation, not the prompts, is what limits that interval.

    python benchmarks/frontier.py [--seeds 5] [--head-to-head-seeds 64] [--rollouts 20] [--skip-base]
        [--methods ...] [--jobs N]

``--jobs N`` runs N runs at a time, each on (cores / N) threads: results do not depend on it
beyond float rounding, wall time does.
"""

from __future__ import annotations

import argparse
import csv
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from sweep import TUNING_SEED, Provenance, lit_p3o, run_all, train_base, tune_learning_rates, use_jobs

from lit_p3o.commands import judge_policies
from lit_p3o.evaluation import read_frontier
from lit_p3o.statistics import Estimate, fitted_value_at, pooled_win_rate
from lit_p3o.tasks import get_task


@dataclass(frozen=True)
class Method:
    """A row of the comparison: a demo config, its fixed overrides and its KL knob's sweep."""

    config: str
    knob: str
    sweep: tuple[float, float, float]
    extra: tuple[str, ...] = field(default_factory=tuple)


P3O_KNOB, PPO_SWEEP = "--model.init_args.kl", (0.02, 0.05, 0.1)  # a fixed β: the sweep is the frontier
K4 = (
    "--model.init_args.rollout.num_responses",
    "4",
    "--model.init_args.rollout.num_prompts",
    "32",
    "--model.init_args.rollout.minibatch_groups",
    "8",
)
GRPO_KL_IN_REWARD = ("--model.init_args.kl_in_reward", "true", "--model.init_args.beta", "0")
METHODS = {
    "p3o-v1": Method("p3o", P3O_KNOB, PPO_SWEEP, ("--model.init_args.variant", "v1")),
    "p3o-v2": Method("p3o", P3O_KNOB, PPO_SWEEP, ("--model.init_args.variant", "v2")),
    # V2 clips the joint ratio of a pair, which leaves the trust region sooner than V1's two
    # separate clips: the same variant with a looser ε tests whether that is why V2 trails
    "p3o-v2-eps0.4": Method(
        "p3o", P3O_KNOB, PPO_SWEEP, ("--model.init_args.variant", "v2", "--model.init_args.clip_epsilon", "0.4")
    ),
    "p3o-v1-k4": Method("p3o", P3O_KNOB, PPO_SWEEP, ("--model.init_args.variant", "v1", *K4)),
    "ppo": Method("ppo", P3O_KNOB, PPO_SWEEP),
    "dpo": Method("dpo", "--model.init_args.beta_dpo", (0.05, 0.1, 0.2)),
    # GRPO (K = 4, the demo's grpo.yaml) with the KL in the reward and the same fixed-β sweep as
    # P3O and PPO, so the rows differ in the objective only
    "grpo": Method("grpo", P3O_KNOB, PPO_SWEEP, GRPO_KL_IN_REWARD + ("--model.init_args.loss_type", "grpo")),
    "dr-grpo": Method(
        "grpo",
        P3O_KNOB,
        PPO_SWEEP,
        GRPO_KL_IN_REWARD + ("--model.init_args.loss_type", "dr_grpo", "--model.init_args.scale_rewards", "none"),
    ),
}
LR_GRID = (1e-4, 2e-4, 4e-4)
MATCHED_KL = (1.0, 2.0, 4.0, 8.0)
HEAD_TO_HEAD = ("p3o-v1", "ppo")


def held_out_prompts() -> int:
    """How many distinct held-out prompts the reviews task has (asking for more repeats them
    from the first, so ``R`` times this many is R passes over every one)."""
    return len(set(get_task("reviews").prompts("test", 10_000)))


def run(work: Path, name: str, knob: float, lr: float, seed: int, rollouts: int) -> tuple[Path, Path]:
    """One RL run; returns its frontier CSV and its saved policy."""
    method = METHODS[name]
    tag = f"{name}_b{knob}_lr{lr:g}_r{rollouts}_s{seed}"
    csv_path = work / "logs" / tag / "demo" / "frontier.csv"
    policy = work / "policies" / tag
    if csv_path.exists() and (policy / "config.json").exists():
        return csv_path, policy  # finished earlier: an interrupted sweep resumes where it stopped
    # the demo's P3O config adapts β towards a KL target; the sweep fixes β instead
    value = json.dumps({"beta": knob, "target": None}) if method.knob == P3O_KNOB else str(knob)
    frontier = {
        "class_path": "lit_p3o.FrontierCallback",
        "init_args": {"evaluation": {"num_prompts": 100}, "eval_every": 8},
    }
    lit_p3o(
        "fit",
        "--config",
        f"configs/demo/{method.config}.yaml",
        *method.extra,
        method.knob,
        value,
        "--seed_everything",
        str(seed),
        "--model.init_args.seed",
        str(seed),
        "--model.init_args.optimizer.learning_rate",
        str(lr),
        "--model.init_args.policy.name_or_path",
        str(work / "sft"),
        "--model.init_args.reward_model",
        str(work / "reward"),
        "--model.init_args.save_dir",
        str(policy),
        "--trainer.max_epochs",
        str(rollouts),
        "--trainer.enable_checkpointing",
        "false",
        "--trainer.default_root_dir",
        str(work / "logs" / tag),
        "--trainer.logger.init_args.save_dir",
        str(work / "logs"),
        "--trainer.logger.init_args.name",
        tag,
        "--trainer.callbacks",
        json.dumps([frontier]),
    )
    return csv_path, policy


def tuning_peak(work: Path, rollouts: int) -> Callable[[str, float], float]:
    """The tuning run of (method, lr) at the method's middle KL knob; its highest gold reward."""

    def peak(name: str, lr: float) -> float:
        csv_path, _ = run(work, name, METHODS[name].sweep[1], lr, TUNING_SEED, rollouts)
        return max(read_frontier(csv_path)["gold"])

    return peak


def method_runs(csvs: list[Path], column: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """(√KL, ``column``) of each of a method's runs: a run's evaluations are correlated, so runs
    are the units the fits resample."""
    runs = []
    for path in csvs:
        rows = read_frontier(path)
        runs.append((np.sqrt(np.maximum(rows["kl"], 0.0)), np.asarray(rows[column])))
    return runs


def frontier_fit(csvs: list[Path]) -> tuple[list[Estimate | None], float]:
    """Gold at :data:`MATCHED_KL` from the fit over a method's runs (None beyond the KL it
    reached), and the largest KL it reached."""
    runs = method_runs(csvs, "gold")
    reached = max(float(r.max()) ** 2 for r, _ in runs)
    inside = [k for k in MATCHED_KL if k <= reached]
    estimates = fitted_value_at(runs, [np.sqrt(k) for k in inside], degree=2) if inside else []
    return estimates + [None] * (len(MATCHED_KL) - len(inside)), reached


def plot_fits(csvs: dict[str, list[Path]], out: Path, kl_max: float = 16.0) -> None:
    """Proxy and gold reward against KL, a curve per method: the fit the matched-KL table reads,
    with its bootstrap 95% band, over the KL the method reached (up to ``kl_max``); the runs'
    evaluations are the faint points. One line per run would bury hundreds of runs' result."""
    fig = Figure(figsize=(11, 4.5), layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, (column, title) in zip(axes, (("score", "proxy reward (reward model)"), ("gold", "gold reward"))):
        for i, (name, paths) in enumerate(csvs.items()):
            runs, colour = method_runs(paths, column), f"C{i % 10}"
            kl, y = np.concatenate([r for r, _ in runs]) ** 2, np.concatenate([v for _, v in runs])
            ax.scatter(kl[kl <= kl_max], y[kl <= kl_max], s=4, alpha=0.12, color=colour)
            grid = np.linspace(0.0, min(kl_max, float(kl.max())), 25)
            fit = fitted_value_at(runs, np.sqrt(grid), degree=2, n_resamples=500)
            ax.plot(grid, [e.value for e in fit], color=colour, linewidth=2, label=name)
            ax.fill_between(grid, [e.low for e in fit], [e.high for e in fit], color=colour, alpha=0.2)
        ax.set(xlabel="KL(π_θ ‖ π_ref)", ylabel=title, title=f"{title}: fit over each method's runs", xlim=(0, kl_max))
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.savefig(out, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rollouts", type=int, default=20)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument(
        "--head-to-head-seeds", type=int, default=64, help="seeds of P3O-V1 and PPO at the middle KL knob"
    )
    parser.add_argument("--samples-per-prompt", type=int, default=4, help="win rates: passes over the held-out prompts")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--work", type=Path, default=Path("outputs/frontier"))
    parser.add_argument("--out", type=Path, default=Path("docs/results"))
    parser.add_argument("--skip-base", action="store_true", help="reuse SFT and reward model under --work")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time, each on cores/jobs threads")
    args = parser.parse_args()
    use_jobs(args.jobs)
    if "ppo" not in args.methods:
        parser.error("--methods: ppo is the reference of the win-rate table; keep it")
    provenance = Provenance.now()
    if not args.skip_base:
        train_base(args.work)
    tuned = tune_learning_rates(tuning_peak(args.work, args.rollouts), args.methods, LR_GRID, args.jobs)
    csvs: dict[str, list[Path]] = {}
    middle_policies: dict[str, list[Path]] = {}
    middle_csvs: dict[str, list[Path]] = {}
    specs = [
        (args.work, name, knob, tuned[name][0], seed, args.rollouts)
        for name in args.methods
        for knob in METHODS[name].sweep
        for seed in range(
            max(args.seeds, args.head_to_head_seeds)
            if knob == METHODS[name].sweep[1] and name in HEAD_TO_HEAD
            else args.seeds
        )
    ]
    for (_, name, knob, *_), (path, policy) in zip(specs, run_all(run, specs, args.jobs)):
        csvs.setdefault(name, []).append(path)
        if knob == METHODS[name].sweep[1]:
            middle_policies.setdefault(name, []).append(policy)
            middle_csvs.setdefault(name, []).append(path)
    args.out.mkdir(parents=True, exist_ok=True)
    plot_fits(csvs, args.out / "frontier.png")
    flat = {"sft": args.work / "sft"} | {f"{n} {i}": p for n, ps in middle_policies.items() for i, p in enumerate(ps)}
    passes = args.samples_per_prompt
    scores = judge_policies(
        flat, judge=str(args.work / "reward"), prompts="embedded:reviews", num_prompts=passes * held_out_prompts()
    )
    win_rates = {judge: pooled_table(by_policy, ["sft", *args.methods], passes) for judge, by_policy in scores.items()}
    write_report(args, tuned, csvs, win_rates, middle_csvs, provenance)


def pooled_table(by_policy: dict, methods: list[str], passes: int) -> dict[tuple[str, str], Estimate]:
    """Pooled win rate of each method over SFT and over PPO, from per-policy prompt scores."""
    stacked = {
        m: np.stack([s.numpy() for n, s in by_policy.items() if n == m or n.rsplit(" ", 1)[0] == m]) for m in methods
    }
    return {
        (a, b): pooled_win_rate(stacked[a], stacked[b], samples_per_prompt=passes)
        for a in methods
        for b in ("sft", "ppo")
        if a != b
    }


def _win_cell(estimate: Estimate | None) -> str:
    if estimate is None:
        return "—"
    return f"{estimate}{' *' if estimate.excludes(0.5) else ''}"


def final_kl(csvs: list[Path]) -> np.ndarray:
    """Each run's KL to SFT at its last evaluation: where its saved policy stands."""
    return np.array([read_frontier(path)["kl"][-1] for path in csvs])


def write_report(args, tuned, csvs, win_rates, middle_csvs: dict[str, list[Path]], provenance: Provenance) -> None:
    """``frontier.md``: the run's identity first, then the budget, the frontier fits and the
    win-rate tables; every evaluation of every run goes to ``frontier_runs.csv``."""
    prompts = held_out_prompts()
    lines = [
        "# The KL–reward frontier on the embedded task",
        "",
        *provenance.table("frontier.py", "runs finished by an earlier invocation are reused"),
        "",
        f"Budget, identical for every method: {args.rollouts} rollouts of 128 samples, 2 replay passes, 8 "
        f"optimizer steps per rollout; learning rate picked from {', '.join(f'{lr:g}' for lr in LR_GRID)} by one "
        f"tuning run each (seed {TUNING_SEED}, middle KL knob, highest gold reward reached); 3 KL-knob values × "
        f"{args.seeds} seeds, and {', '.join(HEAD_TO_HEAD)} at the middle knob × {args.head_to_head_seeds} seeds. "
        "Evaluation during training: 100 held-out prompts every 8 steps.",
        "",
        "| method | learning rate | peak gold of the tuning runs per lr |",
        "|---|---|---|",
    ]
    for name, (lr, peaks) in tuned.items():
        lines.append(f"| {name} | {lr:g} | " + ", ".join(f"{k:g}: {v:.3f}" for k, v in peaks.items()) + " |")
    lines += [
        "",
        "## Gold reward at matched KL (fit of gold on √KL and KL over all runs; bootstrap 95% CI over runs)",
        "",
        "| method | " + " | ".join(f"gold @ KL={k:g}" for k in MATCHED_KL) + " | max KL reached |",
        "|---|" + "---|" * (len(MATCHED_KL) + 1),
    ]
    for name, paths in csvs.items():
        values, reached = frontier_fit(paths)
        cells = ["—" if v is None else str(v) for v in values]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {reached:.2f} |")
    lines += [
        "",
        f"## Win rates ({prompts} held-out prompts × {args.samples_per_prompt} samples; every seed's policy at "
        "the middle KL knob, pooled; bootstrap 95% CI over both methods' seeds and the prompts)",
        "",
        "| method | policies | their KL to SFT at the end: mean (min–max) |",
        "|---|---|---|",
    ]
    for name, paths in middle_csvs.items():
        kl = final_kl(paths)
        lines.append(f"| {name} | {len(kl)} | {kl.mean():.2f} ({kl.min():.2f}–{kl.max():.2f}) |")
    lines.append("")
    for judge, table in win_rates.items():
        lines += [f"Judge: {judge}", "", "| method | vs sft | vs ppo |", "|---|---|---|"]
        for name in dict.fromkeys(a for a, _ in table):
            cells = [_win_cell(table.get((name, b))) for b in ("sft", "ppo")]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    lines.append("\\* the interval excludes 0.5: the difference is significant at the 5% level.")
    lines.append("")
    lines.append(
        "Frontier plot (the fits above, with 95% bands): `frontier.png`; every evaluation of every run: `frontier_runs.csv`."
    )
    (args.out / "frontier.md").write_text("\n".join(lines) + "\n")
    write_runs(csvs, args.out / "frontier_runs.csv")
    print((args.out / "frontier.md").read_text())


def write_runs(csvs: dict[str, list[Path]], out: Path) -> None:
    """Every run's evaluations in one file, each row tagged with its method and run."""
    with open(out, "w", newline="") as f:
        writer = None
        for name, paths in csvs.items():
            for path in paths:
                with open(path, newline="") as run_file:
                    for row in csv.DictReader(run_file):
                        if writer is None:
                            writer = csv.DictWriter(f, ["method", "run", *row])
                            writer.writeheader()
                        writer.writerow({"method": name, "run": path.parents[1].name, **row})


if __name__ == "__main__":
    main()
