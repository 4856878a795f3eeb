"""Throughput against K, prompts per rollout and model size: a table of p3o_iteration runs.

Runs ``p3o_iteration.py --no-isolated`` once per configuration, each in its own process,
(``--sizes`` x ``--prompts`` x ``--ks``; 16-word prompts, 32 new tokens, one update pass
in one minibatch) and prints one row per run: ms per iteration, completions/s, generated
tokens/s, the share of generation, peak RSS.

    python benchmarks/scaling.py [--sizes small large] [--prompts 8 32] [--ks 2 4 8] [--iterations 5]
"""

from __future__ import annotations

import argparse
import itertools
import re
import subprocess
import sys
import time
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent / "p3o_iteration.py"
FIGURES = {
    "ms/iteration": r"iteration: ([\d.]+) ms",
    "completions/s": r"completions/s ([\d.]+)",
    "generated tokens/s": r"generated tokens/s ([\d.]+)",
    "generation share": r"generation\s+[\d.]+ ms\s+([\d.]+%)",
    "peak RSS MiB": r"peak RSS (\d+) MiB",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["small", "large"], choices=["small", "large"])
    parser.add_argument("--prompts", nargs="+", type=int, default=[8, 32])
    parser.add_argument("--ks", nargs="+", type=int, default=[2, 4, 8])
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    header = ["size", "prompts", "K", *FIGURES]
    print(" | ".join(header))
    print(" | ".join("---" for _ in header))
    start = time.perf_counter()
    for size, prompts, k in itertools.product(args.sizes, args.prompts, args.ks):
        command = [
            sys.executable,
            str(SCRIPT),
            "--no-isolated",
            "--size",
            size,
            "--prompts",
            str(prompts),
            "--k",
            str(k),
            "--iterations",
            str(args.iterations),
            "--warmup",
            str(args.warmup),
            "--device",
            args.device,
        ]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
        values = []
        for name, pattern in FIGURES.items():
            found = re.search(pattern, done.stdout)
            if found is None:
                raise RuntimeError(f"no {name!r} in the output of {' '.join(command)}:\n{done.stdout}")
            values.append(found.group(1))
        print(" | ".join([size, str(prompts), str(k), *values]), flush=True)
    print(
        f"\n{time.perf_counter() - start:.0f} s in all; device {args.device}, {args.iterations} iterations "
        f"after {args.warmup} warm-up per row"
    )


if __name__ == "__main__":
    main()
