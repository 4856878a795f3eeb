"""``lit-p3o frontier`` plots the (KL, reward) rows that :class:`~lit_p3o.evaluation.FrontierCallback`
wrote for each run, one colour per algorithm and a least-squares line per run: a method is
better when its line lies higher at the same KL (ALGORITHMS.md §8)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from lit_p3o.commands._common import _CommandParser, _label_and_path, _unique
from lit_p3o.evaluation import read_frontier


def algorithm_of(label: str) -> str:
    """The algorithm a run label names: its first word ("p3o-v1 beta=0.05 seed=0" → "p3o-v1")."""
    return label.split(" ", 1)[0]


def plot_frontier(runs: Mapping[str, str | Path], out: str | Path) -> Path:
    """Plot proxy score (and gold reward, when the runs have it) against KL; save a PNG.

    ``runs`` maps a label to a frontier CSV. Runs of one algorithm share a colour, so seeds
    and β values of a method read as one cloud of lines.
    """
    if not runs:
        raise ValueError("plot_frontier: no runs given")
    data = {label: read_frontier(path) for label, path in runs.items()}
    panels = [("score", "proxy reward (reward model)")]
    if any(columns["gold"] for columns in data.values()):
        panels.append(("gold", "gold reward"))
    algorithms = list(dict.fromkeys(algorithm_of(label) for label in data))
    colours = {name: f"C{i % 10}" for i, name in enumerate(algorithms)}

    fig = Figure(figsize=(5.5 * len(panels), 4.5), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (column, title) in zip(axes, panels):
        for label, columns in data.items():
            if not columns[column]:
                continue
            colour = colours[algorithm_of(label)]
            kl, y = np.asarray(columns["kl"]), np.asarray(columns[column])
            ax.scatter(kl, y, s=14, alpha=0.5, color=colour)
            if np.ptp(kl) > 0:  # a line needs two distinct KL values
                slope, intercept = np.polyfit(kl, y, deg=1)
                xs = np.array([kl.min(), kl.max()])
                ax.plot(xs, slope * xs + intercept, color=colour, linewidth=1.5)
        ax.set(xlabel="KL(π_θ ‖ π_ref)", ylabel=title, title=f"{title} vs KL")
        ax.grid(alpha=0.3)
    axes[0].legend(handles=[Line2D([], [], color=colours[a], marker="o", label=a) for a in algorithms])
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    return out


def frontier_main(argv: Sequence[str] | None = None) -> Path:
    """``lit-p3o frontier LABEL=CSV [LABEL=CSV ...] --out PNG``."""
    parser = _CommandParser(
        prog="lit-p3o frontier",
        description="Plot KL–reward frontiers from the CSVs that FrontierCallback writes. "
        "The label's first word names the algorithm, which picks the colour.",
    )
    parser.add_argument("runs", nargs="+", type=_label_and_path, metavar="LABEL=CSV")
    parser.add_argument("--out", type=Path, default=Path("frontier.png"), help="PNG to write (default: %(default)s)")
    args = parser.parse_args(argv)
    runs = _unique(args.runs, parser)
    path = plot_frontier(runs, args.out)  # a missing or bad CSV is a user error: one line (cli.main)
    print(f"[lit-p3o] wrote {path}")
    return path
