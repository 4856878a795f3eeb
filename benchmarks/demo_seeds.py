"""The demo's P3O stage over several seeds, reusing one SFT policy and one reward model.

The demo is meant to show P3O raising the gold reward at a controlled KL; one run cannot show
that (the outcome moves with the seed and the machine's rounding). This script trains SFT and
the reward model once (or reuses them with ``--base``), runs ``configs/demo/p3o.yaml`` with
``seed_everything`` (and the stage's seed) set to each seed, and reports every run like
``lit-p3o report`` does (200 held-out prompts, bootstrap 95% intervals), then prints and writes
a table: SFT gold, P3O gold, gain, KL to SFT and proxy reward per seed, and their means.

    python benchmarks/demo_seeds.py --seeds 0 1 2 3 4 [--base outputs/demo] [--jobs 2] [--out FILE.md] \\
        [any `lit-p3o fit` override for the P3O runs, e.g. --model.init_args.kl.target 3]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from sweep import Provenance, train_base

from lit_p3o.commands import report


def p3o_command(base: Path, work: Path, seed: int, extra: list[str]) -> list[str]:
    """The demo's P3O stage under ``seed`` (policy saved to ``work/p3o_s<seed>``), without its
    evaluation callback: evaluation restores the training RNG, so the trained weights are the
    same, and ``report`` measures the result."""
    name = f"p3o_s{seed}"
    return [
        sys.executable,
        "-m",
        "lit_p3o",
        "fit",
        "--config",
        "configs/demo/p3o.yaml",
        "--seed_everything",
        str(seed),
        "--model.init_args.seed",
        str(seed),
        "--model.init_args.policy.name_or_path",
        str(base / "sft"),
        "--model.init_args.reward_model",
        str(base / "reward"),
        "--model.init_args.save_dir",
        str(work / name),
        "--trainer.enable_checkpointing",
        "false",
        "--trainer.default_root_dir",
        str(work / "logs" / name),
        "--trainer.callbacks",
        "[]",
        "--trainer.logger.init_args.save_dir",
        str(work / "logs"),
        "--trainer.logger.init_args.name",
        name,
        *extra,
    ]


def run_p3o(base: Path, work: Path, seeds: list[int], extra: list[str], jobs: int) -> dict[int, float]:
    """Every seed's P3O stage, ``jobs`` at a time; returns each run's wall seconds."""
    pending, running, seconds = list(seeds), {}, {}
    while pending or running:
        while pending and len(running) < jobs:
            seed = pending.pop(0)
            log = (work / f"p3o_s{seed}.log").open("w")
            running[seed] = (
                subprocess.Popen(p3o_command(base, work, seed, extra), stdout=log, stderr=log),
                time.time(),
            )
        for seed, (process, began) in list(running.items()):
            if process.poll() is not None:
                if process.returncode != 0:
                    raise RuntimeError(
                        f"P3O seed {seed} failed (exit {process.returncode}); see {work}/p3o_s{seed}.log"
                    )
                seconds[seed] = time.time() - began
                del running[seed]
        time.sleep(1)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--base", type=Path, default=None, help="reuse sft/ and reward/ under this folder")
    parser.add_argument("--work", type=Path, default=Path("outputs/demo_seeds"))
    parser.add_argument("--out", type=Path, default=None, help="markdown file for the table")
    parser.add_argument("--jobs", type=int, default=1, help="P3O runs at a time (default: %(default)s)")
    args, args.override = parser.parse_known_args()  # the rest goes to the P3O runs' `lit-p3o fit`
    provenance = Provenance.now()
    base = args.base or args.work
    if args.base is None:
        train_base(args.work)
    args.work.mkdir(parents=True, exist_ok=True)
    seconds = run_p3o(base, args.work, args.seeds, args.override, args.jobs)
    rows = []
    for seed in args.seeds:
        result = report(base / "sft", args.work / f"p3o_s{seed}", str(base / "reward"), None, args.work / "unused.png")
        sft, p3o = result["reference"], result["trained"]
        rows.append(
            (
                seed,
                sft["gold"],
                p3o["gold"],
                p3o["gold"] - sft["gold"],
                p3o["kl"],
                sft["score"],
                p3o["score"],
                (p3o["gold_low"], p3o["gold_high"]),
                seconds[seed],
            )
        )
    text = table(rows, provenance)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


def table(rows: list[tuple], provenance: Provenance) -> str:
    """The run's identity (date, commit, machine, command, wall time), then a row per seed and their mean."""
    lines = [
        *provenance.table("demo_seeds.py", "SFT and reward model included unless --base"),
        "",
        "| seed | SFT gold | P3O gold [95% CI] | gain | KL to SFT | proxy SFT → P3O | P3O stage (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for seed, sft_gold, gold, gain, kl, proxy_sft, proxy, (lo, hi), seconds in rows:
        lines.append(
            f"| {seed} | {sft_gold:.3f} | {gold:.3f} [{lo:.2f}, {hi:.2f}] | {gain:+.3f} | {kl:.2f} "
            f"| {proxy_sft:.2f} → {proxy:.2f} | {seconds:.0f} |"
        )
    data = np.array([[r[1], r[2], r[3], r[4], r[6]] for r in rows])
    mean = data.mean(axis=0)
    lines.append(f"| mean | {mean[0]:.3f} | {mean[1]:.3f} | {mean[2]:+.3f} | {mean[3]:.2f} | → {mean[4]:.2f} | |")
    gains = data[:, 2]
    lines += [
        "",
        f"Gain in gold reward over SFT: mean {gains.mean():+.3f}, min {gains.min():+.3f} "
        f"({int((gains > 0).sum())} of {len(gains)} seeds positive).",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
