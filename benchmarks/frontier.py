"""The paper's comparison on the embedded task: KL–reward frontiers and head-to-head win rates.

Runs SFT and the reward model once, then P3O-V1, P3O-V2, PPO and online DPO over a sweep of
each method's KL knob (3 values) and 3 seeds, every run with the same budget: the demo
configs' rollout (64 prompts × 2 responses, 2 replay passes, minibatches of 16 groups),
the same learning rate, the same number of rollouts, no per-method tuning. Writes under
``docs/results/``: ``frontier.png`` (proxy and gold reward against KL), ``winrates_*.png``,
``winrates.csv`` and ``frontier.md`` (gold reward at matched KL, win rates vs SFT and vs
PPO, the exact command and the wall time).

    python benchmarks/frontier.py [--rollouts 10] [--out docs/results] [--work outputs/frontier]
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from lit_p3o.commands import compare_policies, plot_frontier
from lit_p3o.evaluation import read_frontier

# algorithm -> (config, the override that sets its KL knob, the knob's sweep)
ALGORITHMS = {
    "p3o-v1": ("p3o", ["--model.init_args.variant", "v1"], "--model.init_args.kl.beta", [0.02, 0.05, 0.1]),
    "p3o-v2": ("p3o", ["--model.init_args.variant", "v2"], "--model.init_args.kl.beta", [0.02, 0.05, 0.1]),
    "ppo": ("ppo", [], "--model.init_args.kl.beta", [0.02, 0.05, 0.1]),
    "dpo": ("dpo", [], "--model.init_args.beta_dpo", [0.05, 0.1, 0.2]),
}
SEEDS = (0, 1, 2)
MATCHED_KL = (1.0, 2.0, 4.0)


def lit_p3o(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "lit_p3o", *args], check=True)


def train_base(work: Path) -> None:
    """SFT and reward model once, shared by every run."""
    lit_p3o("fit", "--config", "configs/demo/sft.yaml", "--model.init_args.save_dir", str(work / "sft"),
            "--trainer.default_root_dir", str(work / "logs/sft"), "--trainer.logger.init_args.save_dir", str(work / "logs"))
    lit_p3o("fit", "--config", "configs/demo/reward.yaml", "--model.init_args.model.name_or_path", str(work / "sft"),
            "--data.init_args.embedded.policy", str(work / "sft"), "--model.init_args.save_dir", str(work / "reward"),
            "--trainer.default_root_dir", str(work / "logs/reward"), "--trainer.logger.init_args.save_dir", str(work / "logs"))


def run(work: Path, algorithm: str, knob: float, seed: int, rollouts: int) -> Path:
    """One RL run; returns its frontier CSV."""
    config, extra, knob_flag, _ = ALGORITHMS[algorithm]
    name = f"{algorithm}_b{knob}_s{seed}"
    lit_p3o(
        "fit", "--config", f"configs/demo/{config}.yaml", *extra, knob_flag, str(knob),
        "--seed_everything", str(seed), "--model.init_args.seed", str(seed),
        "--model.init_args.policy.name_or_path", str(work / "sft"),
        "--model.init_args.reward_model", str(work / "reward"),
        "--model.init_args.save_dir", str(work / "policies" / name),
        "--trainer.max_epochs", str(rollouts), "--trainer.enable_checkpointing", "false",
        "--trainer.logger.init_args.save_dir", str(work / "logs"), "--trainer.logger.init_args.name", name,
        "--trainer.callbacks", json.dumps([{"class_path": "lit_p3o.FrontierCallback",
                                            "init_args": {"num_prompts": 100, "eval_every": 8}}]),
    )  # fmt: skip
    return work / "logs" / name / "demo" / "frontier.csv"


def gold_at_matched_kl(csvs: list[Path]) -> tuple[list[float], float]:
    """Least-squares line of gold reward on KL over every evaluation row of an algorithm,
    read at :data:`MATCHED_KL`; also the largest KL the algorithm reached."""
    kl, gold = [], []
    for path in csvs:
        rows = read_frontier(path)
        kl += rows["kl"]
        gold += rows["gold"]
    slope, intercept = np.polyfit(kl, gold, 1)
    return [slope * k + intercept for k in MATCHED_KL], max(kl)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rollouts", type=int, default=10)
    parser.add_argument("--work", type=Path, default=Path("outputs/frontier"))
    parser.add_argument("--out", type=Path, default=Path("docs/results"))
    parser.add_argument("--skip-base", action="store_true", help="reuse SFT and reward model under --work")
    args = parser.parse_args()
    start = time.time()
    if not args.skip_base:
        train_base(args.work)
    csvs: dict[str, list[Path]] = {}
    labelled: dict[str, Path] = {}
    for algorithm, (_, _, _, sweep) in ALGORITHMS.items():
        for knob in sweep:
            for seed in SEEDS:
                path = run(args.work, algorithm, knob, seed, args.rollouts)
                csvs.setdefault(algorithm, []).append(path)
                labelled[f"{algorithm} beta={knob} seed={seed}"] = path
    args.out.mkdir(parents=True, exist_ok=True)
    plot_frontier(labelled, args.out / "frontier.png")
    middle = {a: ALGORITHMS[a][3][1] for a in ALGORITHMS}
    policies = {"sft": str(args.work / "sft")}
    policies |= {a: str(args.work / "policies" / f"{a}_b{middle[a]}_s0") for a in ALGORITHMS}
    results = compare_policies(policies, judge=str(args.work / "reward"), prompts="embedded:reviews",
                               num_prompts=200, out_dir=args.out)
    wall = time.time() - start
    write_table(args, csvs, results, middle, wall)


def write_table(args, csvs, results, middle, wall: float) -> None:
    lines = [
        "# Frontier benchmark on the embedded task",
        "",
        f"Command: `python benchmarks/frontier.py --rollouts {args.rollouts}{' --skip-base' if args.skip_base else ''}`"
        f" — wall time {wall / 60:.1f} min on 2 CPU cores.",
        "",
        "Budget, identical for every method: SFT and reward model trained once; each run "
        f"{args.rollouts} rollouts of 64 prompts × 2 responses, 2 replay passes in minibatches of 16 groups, "
        "AdamW lr 2e-4, gradient clipping 1.0; 3 values of the method's KL knob (β for P3O/PPO, "
        "β_DPO for DPO) × 3 seeds; no other tuning. Evaluation: 100 held-out prompts every 8 steps.",
        "",
        "## Gold reward at matched KL (linear fit over all runs of a method)",
        "",
        "| method | " + " | ".join(f"gold @ KL={k:g}" for k in MATCHED_KL) + " | max KL reached |",
        "|---|" + "---|" * (len(MATCHED_KL) + 1),
    ]
    for algorithm, paths in csvs.items():
        values, reached = gold_at_matched_kl(paths)
        lines.append(f"| {algorithm} | " + " | ".join(f"{v:.3f}" for v in values) + f" | {reached:.2f} |")
    lines += ["", "## Win rates (200 held-out prompts; seed-0 policy at each method's middle KL knob)", ""]
    for judge, (names, matrix) in results.items():
        lines += [f"Judge: {judge}", "", "| method | vs sft | vs ppo |", "|---|---|---|"]
        for i, name in enumerate(names):
            lines.append(f"| {name} | {matrix[i, names.index('sft')]:.3f} | {matrix[i, names.index('ppo')]:.3f} |")
        lines.append("")
    lines.append("Frontier plot: `frontier.png`; full matrices: `winrates.csv`, `winrates_*.png`.")
    (args.out / "frontier.md").write_text("\n".join(lines) + "\n")
    with open(args.out / "frontier_runs.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["method", "frontier_csv"])
        for algorithm, paths in csvs.items():
            writer.writerows([algorithm, str(p)] for p in paths)
    print((args.out / "frontier.md").read_text())


if __name__ == "__main__":
    main()
