"""Comparing finished runs: ``lit-p3o frontier``, ``winrate`` and ``report`` (ALGORITHMS.md §8),
and ``lit-p3o export``; one module per command, what they share in :mod:`._common`.

* ``frontier`` plots the (KL, reward) rows that :class:`~lit_p3o.evaluation.FrontierCallback`
  wrote for each run, one colour per algorithm and a least-squares line per run: a method is
  better when its line lies higher at the same KL.
* ``winrate`` samples every saved policy on the same prompts and reports, for each pair, the
  probability that a judge (a reward model, or an embedded task's gold reward) prefers the
  row's response to the column's, ties counting one half (the paper's Figure 5).
* ``report`` prints an RL run's before/after table and plots its evaluation rows over steps.
* ``export`` turns a Lightning checkpoint of any stage into a directory that plain
  transformers/peft load (the trained network and its tokenizer).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from lit_p3o.commands._common import check_judge, check_models, check_prompts
from lit_p3o.commands.export import export_checkpoint, export_main, stage_class
from lit_p3o.commands.frontier import algorithm_of, frontier_main, plot_frontier
from lit_p3o.commands.report import plot_training_curves, report, report_main
from lit_p3o.commands.winrate import (
    compare_policies,
    format_matrix,
    judge_label,
    judge_labels,
    judge_policies,
    plot_win_rates,
    win_rate,
    win_rate_matrix,
    winrate_main,
    write_win_rates,
)

__all__ = [
    "COMMANDS",
    "algorithm_of",
    "check_judge",
    "check_models",
    "check_prompts",
    "compare_policies",
    "export_checkpoint",
    "export_main",
    "format_matrix",
    "frontier_main",
    "judge_label",
    "judge_labels",
    "judge_policies",
    "plot_frontier",
    "plot_training_curves",
    "plot_win_rates",
    "report",
    "report_main",
    "stage_class",
    "win_rate",
    "win_rate_matrix",
    "winrate_main",
    "write_win_rates",
]

COMMANDS: dict[str, Callable[[Sequence[str]], object]] = {
    "frontier": frontier_main,
    "winrate": winrate_main,
    "report": report_main,
    "export": export_main,
}
