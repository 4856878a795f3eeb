"""Comparing finished runs: ``lit-p3o frontier``, ``winrate`` and ``report`` (ALGORITHMS.md §8).

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

import argparse
import csv
import importlib
import inspect
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import instantiate_module
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from lit_p3o.data.prompts import load_prompts
from lit_p3o.errors import SourceError, UserError, exit_with
from lit_p3o.evaluation import evaluate_examples, read_frontier, sample_completions
from lit_p3o.generation import SamplingSpec, seeded
from lit_p3o.models import (
    FrozenReference,
    ModelSpec,
    build_causal_lm,
    check_model_source,
    has_adapters,
    load_tokenizer,
    looks_local,
    save_pretrained,
)
from lit_p3o.runs import OutputLock, write_error
from lit_p3o.scoring import GoldScorer, RewardScorer, build_scorer, is_function_source, load_function
from lit_p3o.statistics import bootstrap_mean
from lit_p3o.tasks import resolve_embedded

# --------------------------------------------------------------------------- frontier


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


# --------------------------------------------------------------------------- win rates


def win_rate(a: Sequence[float] | Tensor, b: Sequence[float] | Tensor) -> float:
    """``P(a > b) + ½·P(a = b)`` over aligned judgements of the same prompts."""
    a = torch.as_tensor(a, dtype=torch.float64)
    b = torch.as_tensor(b, dtype=torch.float64)
    if a.ndim != 1 or a.shape != b.shape or a.numel() == 0:
        raise ValueError(
            f"win_rate: needs two non-empty 1-d score lists of one length, got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    return ((a > b).sum() + 0.5 * (a == b).sum()).item() / a.numel()


def win_rate_matrix(judged: Mapping[str, Tensor | Sequence[float]]) -> tuple[list[str], Tensor]:
    """Names and the matrix whose entry ``[i, j]`` is the win rate of policy i over policy j
    (diagonal ½, ``m[i, j] + m[j, i] = 1``)."""
    names = list(judged)
    matrix = torch.tensor([[win_rate(judged[a], judged[b]) for b in names] for a in names], dtype=torch.float64)
    return names, matrix


def judge_label(source: str) -> str:
    """Short name of a judge for titles and file names: ``gold`` or the reward model's folder."""
    return "gold" if resolve_embedded(source) is not None else Path(source).name or "reward"


def judge_labels(judge: str, prompts: str) -> dict[str, str]:
    """``{source: label}`` of the judges: ``judge``, plus the gold reward of embedded ``prompts``.
    Refused, naming ``--judge``: another task's gold reward (it scores only its own prompts) and
    a reward model folder named ``gold`` (its label would be the prompts' gold reward's)."""
    labels = {judge: judge_label(judge)}
    if resolve_embedded(prompts) is None or prompts == judge:
        return labels
    if resolve_embedded(judge) is not None:
        raise UserError(f"--judge {judge}: the gold reward of another task than --prompts {prompts}; a task's gold "
                        f"reward scores only its own prompts (give --judge {prompts}, or a reward model)")  # fmt: skip
    if labels[judge] == "gold":
        raise UserError(f"--judge {judge}: a reward model folder named 'gold' would share its label with the gold "
                        f"reward of --prompts {prompts}; rename the folder")  # fmt: skip
    return labels | {prompts: "gold"}


def compare_policies(
    policies: Mapping[str, str | Path],
    judge: str,
    prompts: str = "embedded:reviews",
    num_prompts: int = 200,
    max_new_tokens: int = 32,
    seed: int = 0,
    out_dir: str | Path = "winrates",
    split: str = "test",
    max_prompt_tokens: int = 256,
    batch_size: int = 64,
    device: str | None = None,
) -> dict[str, tuple[list[str], Tensor]]:
    """Head-to-head win rates of saved policies on the same prompts; ``{judge: (names, matrix)}``.

    Every policy samples one response per prompt under the same seed. ``judge`` is a reward
    model directory or ``"embedded:<task>"``; with embedded prompts the task's gold reward
    judges as well. Prints each matrix, writes ``winrates.csv`` and ``winrates_<judge>.png``.
    """
    if len(policies) < 2:
        raise ValueError(f"compare_policies: needs at least two policies, got {len(policies)}")
    scores = judge_policies(policies, judge, prompts, num_prompts, max_new_tokens, seed, split,
                            max_prompt_tokens, batch_size, device)  # fmt: skip
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, tuple[list[str], Tensor]] = {}
    for label, by_policy in scores.items():
        names, matrix = results[label] = win_rate_matrix(by_policy)
        means = [by_policy[n].mean().item() for n in names]
        n_prompts = len(next(iter(by_policy.values())))
        print(format_matrix(names, matrix, means, f"judge: {label}, {n_prompts} prompts"))
        plot_win_rates(names, matrix, f"win rate of row over column ({label})", out_dir / f"winrates_{label}.png")
    write_win_rates(results, out_dir / "winrates.csv")
    return results


def judge_policies(
    policies: Mapping[str, str | Path],
    judge: str,
    prompts: str = "embedded:reviews",
    num_prompts: int = 200,
    max_new_tokens: int = 32,
    seed: int = 0,
    split: str = "test",
    max_prompt_tokens: int = 256,
    batch_size: int = 64,
    device: str | None = None,
) -> dict[str, dict[str, Tensor]]:
    """``{judge label: {policy name: [num_prompts] scores}}``: every policy samples one response
    per prompt under the same seed, and ``judge`` (plus the gold reward with embedded prompts)
    scores them; the per-prompt scores that win rates and their intervals are computed from."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    labels = judge_labels(judge, prompts)
    judges = list(labels)
    sampling = SamplingSpec(max_new_tokens=max_new_tokens)
    scores: dict[str, dict[str, Tensor]] = {labels[source]: {} for source in judges}
    reward_models: dict[str, RewardScorer] = {}
    prompt_list: list[str] | None = None
    for name, path in policies.items():
        spec = ModelSpec(name_or_path=str(path))
        tokenizer = load_tokenizer(spec)
        prompt_list = prompt_list or load_prompts(prompts, split, num_prompts, tokenizer=tokenizer)
        model = build_causal_lm(spec, tokenizer).to(device)
        with seeded(seed, device):
            out = sample_completions(model, tokenizer, prompt_list, sampling, max_prompt_tokens, batch_size)
        del model  # one policy in memory at a time
        for source in judges:
            scorer = _scorer_for(source, tokenizer, reward_models, device)
            scores[labels[source]][name] = scorer.score_examples(out.examples, out.ended, prompts=out.prompts)
    return scores


def _scorer_for(
    source: str, tokenizer: PreTrainedTokenizerBase, reward_models: dict[str, RewardScorer], device: torch.device
) -> RewardScorer | GoldScorer:
    """A judge for ids made by ``tokenizer``: reward models are loaded once and taught each
    policy's vocabulary; a gold scorer is cheap and simply rebuilt for it."""
    if source in reward_models:
        reward_models[source].accept_ids_from(tokenizer)
        return reward_models[source]
    scorer = build_scorer(source, tokenizer)
    if isinstance(scorer, RewardScorer):
        scorer.model.to(device)
        reward_models[source] = scorer
    return scorer


def format_matrix(names: list[str], matrix: Tensor, means: list[float], title: str) -> str:
    """The matrix as text, rows beating columns, with each policy's mean judge score."""
    width = max(8, *(len(n) for n in names)) + 2
    header = " " * width + "".join(f"{n:>{width}}" for n in names) + "   mean score"
    lines = [f"win rate of row over column ({title})", header]
    for name, row, mean in zip(names, matrix.tolist(), means):
        lines.append(f"{name:<{width}}" + "".join(f"{v:>{width}.3f}" for v in row) + f"   {mean:10.4f}")
    return "\n".join(lines)


def plot_win_rates(names: list[str], matrix: Tensor, title: str, out: Path) -> Path:
    """A heatmap of the matrix with each cell's value written in it."""
    size = 1.6 + 0.9 * len(names)
    fig = Figure(figsize=(size + 1.2, size), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(matrix.numpy(), cmap="RdBu", vmin=0.0, vmax=1.0)
    for (i, j), value in np.ndenumerate(matrix.numpy()):
        ax.text(j, i, f"{value:.2f}", ha="center", va="center", color="white" if abs(value - 0.5) > 0.3 else "black")
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set(xlabel="B (column)", ylabel="A (row)", title=title)
    fig.colorbar(image, ax=ax, label="P(A beats B)")
    fig.savefig(out, dpi=120)
    return out


def write_win_rates(results: Mapping[str, tuple[list[str], Tensor]], path: Path) -> Path:
    """One row per (judge, A, B): the long format that spreadsheets and pandas pivot easily."""
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["judge", "policy_a", "policy_b", "win_rate"])
        for judge, (names, matrix) in results.items():
            for i, a in enumerate(names):
                for j, b in enumerate(names):
                    writer.writerow([judge, a, b, f"{matrix[i, j].item():.6f}"])
    return path


# --------------------------------------------------------------------------- command line


class _CommandParser(argparse.ArgumentParser):
    """The commands' parsers: a flag must be spelt in full (argparse would take ``--max-new``
    for ``--max-new-tokens``, and a misspelt flag for whichever it abbreviates), and an error
    is one line ``lit-p3o <command>: error: …`` without the usage above it (``--help`` has it)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(allow_abbrev=False, **kwargs)

    def error(self, message: str) -> NoReturn:
        exit_with(self.prog.removeprefix("lit-p3o").strip(), UserError(message))


def _label_and_path(text: str) -> tuple[str, str]:
    """``LABEL=PATH``, where labels may contain ``=`` ("p3o beta=0.05=runs/a.csv"): the cut
    that leaves an existing path wins, else the last ``=`` (hub ids have none)."""
    cuts = [i for i, c in enumerate(text) if c == "="]
    existing = [i for i in cuts if Path(text[i + 1 :]).expanduser().exists()]
    cut = existing[0] if existing else (cuts[-1] if cuts else -1)
    label, path = text[:cut].strip(), text[cut + 1 :]
    if cut < 0 or not label or not path:
        raise argparse.ArgumentTypeError(f"expected LABEL=PATH, got {text!r}")
    return label, path


def _positive_int(text: str) -> int:
    """An argparse type: counts and sizes must be at least 1 (0 prompts would judge nothing)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _unique(pairs: list[tuple[str, str]], parser: argparse.ArgumentParser) -> dict[str, str]:
    labels = [label for label, _ in pairs]
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    if duplicates:
        parser.error(f"duplicate labels: {', '.join(duplicates)}")
    return dict(pairs)


def check_models(models: Mapping[str, str | Path]) -> None:
    """Before anything is loaded or sampled: every ``{argument: source}`` names a saved model
    (a local directory holding a model and a tokenizer, or a hub model that resolves), so a
    wrong path fails at once naming its argument, not minutes later naming ``ModelSpec``."""
    from transformers import AutoConfig

    for argument, source in models.items():
        source = str(source)
        try:
            if looks_local(source):
                check_model_source(source, argument, "model")
                check_model_source(source, argument, "tokenizer")
            else:
                AutoConfig.from_pretrained(source)
        except OSError as err:
            if str(err).startswith(argument):  # check_model_source's message names the argument
                raise UserError(str(err)) from err
            raise UserError(
                f"{argument}: {source!r} is neither a local model directory nor a reachable hub model"
            ) from err


def check_judge(judge: str) -> None:
    """``--judge``: a known embedded task, a ``module:function`` that imports, or a reward model."""
    with _named("--judge"):
        if resolve_embedded(judge) is not None:
            return
        if is_function_source(judge):
            load_function(judge)
            return
    check_models({"--judge": judge})


def check_prompts(prompts: str) -> None:
    """``--prompts``: an ``embedded:`` source names a known task (files are read later)."""
    with _named("--prompts"):
        resolve_embedded(prompts)


@contextmanager
def _named(argument: str) -> Iterator[None]:
    """A source given as ``argument`` that cannot be used (an unknown embedded task, a reward
    function that fails) is named by that argument."""
    try:
        yield
    except SourceError as err:
        raise UserError(f"{argument}: {err}") from err


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


def winrate_main(argv: Sequence[str] | None = None) -> dict[str, tuple[list[str], Tensor]]:
    """``lit-p3o winrate NAME=DIR [NAME=DIR ...] --judge DIR_OR_EMBEDDED ...``."""
    parser = _CommandParser(
        prog="lit-p3o winrate",
        description="Head-to-head win rates of saved policies on the same prompts (row beats column).",
    )
    parser.add_argument("policies", nargs="+", type=_label_and_path, metavar="NAME=DIR")
    parser.add_argument("--judge", required=True, help="reward model directory, or embedded:<task> for its gold reward")
    parser.add_argument("--prompts", default="embedded:reviews", help="prompt source (default: %(default)s)")
    parser.add_argument("--split", default="test", help="prompt split (default: %(default)s)")
    parser.add_argument("--num-prompts", type=_positive_int, default=200)
    parser.add_argument("--max-new-tokens", type=_positive_int, default=32)
    parser.add_argument("--max-prompt-tokens", type=_positive_int, default=256)
    parser.add_argument("--batch-size", type=_positive_int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--out-dir", type=Path, default=Path("winrates"))
    args = parser.parse_args(argv)
    policies = _unique(args.policies, parser)
    if len(policies) < 2:
        parser.error("give at least two NAME=DIR policies")
    check_models({f"policy {name}": path for name, path in policies.items()})
    check_judge(args.judge)
    check_prompts(args.prompts)
    with _named("--judge"):
        return compare_policies(
            policies, args.judge, args.prompts, args.num_prompts, args.max_new_tokens, args.seed, args.out_dir,
            args.split, args.max_prompt_tokens, args.batch_size, args.device,
        )  # fmt: skip


# --------------------------------------------------------------------------- report


def report(
    reference: str | Path,
    policy: str | Path,
    judge: str,
    frontier_csv: str | Path | None,
    out: str | Path,
    prompts: str = "embedded:reviews",
    num_prompts: int = 200,
    max_new_tokens: int = 32,
    seed: int = 0,
    others: Mapping[str, str | Path] | None = None,
) -> dict[str, dict[str, float | None]]:
    """Before/after table of an RL run: the reference (SFT) policy and the trained policy on
    the same held-out prompts, both measured against the reference, with percentile-bootstrap
    95% intervals over the prompts; ``others`` (label → policy directory) adds rows, e.g. the
    same run without KL control. Also a PNG of the run's evaluation rows over optimizer steps.

    Returns ``{"reference"|"trained"|label: row}``; a row holds the means ``score``, ``gold``,
    ``kl``, ``response_length``, ``eos_rate`` and the bounds ``score_low``/``score_high``,
    ``gold_low``/``gold_high``, ``kl_low``/``kl_high``."""
    clash = sorted({"reference", "trained"} & set(others or {}))
    if clash:
        raise UserError(f"--also {clash[0]}=...: '{clash[0]}' names a built-in row of the report (reference, "
                        "trained); label the extra policy otherwise")  # fmt: skip
    spec = ModelSpec(name_or_path=str(reference))
    tokenizer = load_tokenizer(spec)
    ref_model = build_causal_lm(spec, tokenizer).eval()
    frozen = FrozenReference(ref_model)
    task = resolve_embedded(prompts)
    prompt_list = load_prompts(prompts, "test", num_prompts, tokenizer=tokenizer)
    scorer = build_scorer(judge, tokenizer)
    sampling = SamplingSpec(max_new_tokens=max_new_tokens)
    runs = {"reference": reference, "trained": policy, **(others or {})}
    names = {"reference": Path(reference).name, "trained": Path(policy).name} | {k: k for k in others or {}}
    rows: dict[str, dict[str, float | None]] = {}
    for key, path in runs.items():
        model = ref_model if key == "reference" else build_causal_lm(ModelSpec(name_or_path=str(path)), tokenizer)
        with seeded(seed):
            samples = evaluate_examples(model, frozen, tokenizer, scorer, prompt_list, sampling, 256, task)
        rows[key] = _summarise(samples)
    width = max(22, *(len(n) + 2 for n in names.values()))
    print(f"\n[lit-p3o] {len(prompt_list)} held-out prompts, one sample each (judge: {judge_label(judge)}); "
          "means with bootstrap 95% intervals over the prompts")  # fmt: skip
    print(f"{'':<{width}}{'proxy reward':>22}{'gold reward':>22}{'KL to ref':>20}{'length':>8}{'EOS':>7}")
    for key, r in rows.items():
        gold = "-" if r["gold"] is None else _with_interval(r, "gold")
        print(f"{names[key]:<{width}}{_with_interval(r, 'score'):>22}{gold:>22}{_with_interval(r, 'kl'):>20}"
              f"{r['response_length']:>8.1f}{r['eos_rate']:>7.0%}")  # fmt: skip
    if frontier_csv is not None:
        path = plot_training_curves(read_frontier(frontier_csv), Path(out))
        print(f"[lit-p3o] wrote {path}")
    return rows


def _summarise(samples: Mapping[str, Tensor]) -> dict[str, float | None]:
    """Per-response evaluation values (:func:`evaluate_examples`) → means, and bootstrap bounds
    for reward and KL; ``gold`` is None without a task."""
    row: dict[str, float | None] = {
        "response_length": samples["response_length"].mean().item(),
        "eos_rate": samples["eos_rate"].mean().item(),
    }
    for key in ("score", "gold", "kl"):
        if key not in samples:
            row[key] = row[f"{key}_low"] = row[f"{key}_high"] = None
            continue
        estimate = bootstrap_mean(samples[key].double().numpy())
        row[key], row[f"{key}_low"], row[f"{key}_high"] = estimate.value, estimate.low, estimate.high
    return row


def _with_interval(row: Mapping[str, float | None], key: str) -> str:
    return f"{row[key]:.3f} [{row[key + '_low']:.2f}, {row[key + '_high']:.2f}]"


def plot_training_curves(rows: Mapping[str, list[float]], out: Path) -> Path:
    """Reward (proxy, and gold when present) and KL against optimizer steps, side by side."""
    figure = Figure(figsize=(10, 4))
    reward_axes, kl_axes = figure.subplots(1, 2)
    reward_axes.plot(rows["step"], rows["score"], marker="o", label="proxy reward (reward model)")
    if any(not np.isnan(g) for g in rows["gold"]):
        reward_axes.plot(rows["step"], rows["gold"], marker="s", label="gold reward")
    reward_axes.set(xlabel="optimizer step", ylabel="mean reward on held-out prompts")
    reward_axes.legend()
    kl_axes.plot(rows["step"], rows["kl"], marker="o", color="tab:red")
    kl_axes.set(xlabel="optimizer step", ylabel="sequence KL to the reference")
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=100)
    return out


def report_main(argv: Sequence[str] | None = None) -> dict[str, dict[str, float | None]]:
    """``lit-p3o report --reference DIR --policy DIR --judge DIR_OR_EMBEDDED [--frontier CSV]``."""
    parser = _CommandParser(prog="lit-p3o report", description=report.__doc__.split("\n\n")[0])
    parser.add_argument("--reference", required=True, help="the policy RL started from (e.g. the SFT model)")
    parser.add_argument("--policy", required=True, help="the trained policy directory")
    parser.add_argument("--judge", required=True, help="reward model directory, or embedded:<task>")
    parser.add_argument("--frontier", default=None, help="the run's frontier.csv (FrontierCallback)")
    parser.add_argument("--out", type=Path, default=Path("training_curves.png"))
    parser.add_argument("--prompts", default="embedded:reviews")
    parser.add_argument("--num-prompts", type=_positive_int, default=200)
    parser.add_argument("--max-new-tokens", type=_positive_int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--also", nargs="+", type=_label_and_path, default=[], metavar="LABEL=DIR",
                        help="more policies to list as extra rows (e.g. the same run without KL control)")
    args = parser.parse_args(argv)
    also = _unique(args.also, parser)
    check_models({"--reference": args.reference, "--policy": args.policy} | {f"--also {k}": v for k, v in also.items()})
    check_judge(args.judge)
    check_prompts(args.prompts)
    if args.frontier is not None:
        read_frontier(args.frontier)  # a bad file fails now, not after every policy was sampled
    with _named("--judge"):
        return report(args.reference, args.policy, args.judge, args.frontier, args.out, args.prompts,
                      args.num_prompts, args.max_new_tokens, args.seed, also)  # fmt: skip


# --------------------------------------------------------------------------- export


def stage_class(hparams: Mapping[str, Any], class_path: str | None = None) -> type:
    """The stage a checkpoint was written by: ``class_path`` when given, else the one that
    LightningCLI recorded (``_class_path``), else the one of the library's stages whose
    constructor takes exactly the saved hyperparameters (or, for a checkpoint older than an
    added argument, the fewest others)."""
    class_path = class_path or hparams.get("_class_path")
    if class_path is not None:
        module, _, name = class_path.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError, ValueError) as err:  # ValueError: no module part
            raise ValueError(f"{class_path} does not import ({err})") from err
        if not (isinstance(cls, type) and issubclass(cls, LightningModule)):
            raise ValueError(f"{class_path} is not a LightningModule, so it wrote no checkpoint")
        return cls
    import lit_p3o

    keys = set(hparams) - {"_instantiator"}
    fits = []
    for cls in (lit_p3o.SFTModule, lit_p3o.RewardModule, lit_p3o.P3OModule, lit_p3o.PPOModule,
                lit_p3o.OnlineDPOModule, lit_p3o.RLOOModule):  # fmt: skip
        params = dict(inspect.signature(cls.__init__).parameters)
        params.pop("self")
        required = {n for n, p in params.items() if p.default is inspect.Parameter.empty}
        if required <= keys <= set(params):
            fits.append((len(set(params) - keys), cls))
    fits.sort(key=lambda fit: fit[0])
    if not fits or (len(fits) > 1 and fits[0][0] == fits[1][0]):
        names = ", ".join(cls.__name__ for _, cls in fits) or "none"
        raise ValueError(
            f"cannot tell which stage wrote this checkpoint (hyperparameters {sorted(keys)}; matching: {names}); "
            "pass --stage with its class path, e.g. --stage lit_p3o.P3OModule"
        )
    return fits[0][1]


def export_checkpoint(ckpt: str | Path, out: str | Path, merge: bool = False, class_path: str | None = None) -> Path:
    """Write the trained network of a Lightning checkpoint (``policy`` of SFT and RL stages,
    ``reward_model`` of the reward stage) and its tokenizer to ``out`` with
    :func:`lit_p3o.models.save_pretrained`; LoRA adapters are saved alone unless ``merge``.

    The stage is rebuilt from the checkpoint's hyperparameters, so its model sources (e.g.
    ``policy.name_or_path``) must resolve from the working directory, as in training. An RL
    stage's reward model is not rebuilt (it is not exported); PPO's value head is not exported.

    ``out`` follows the rules of ``fit``'s ``save_dir``: it must be missing, empty, or hold an
    export of the checkpoint's own run (re-exporting after more training replaces it), and it
    is locked while written. The export is marked with :data:`~lit_p3o.cli.RUN_MARKER` (the
    run and the checkpoint it was made from) and replaces ``out`` whole, so a failure leaves
    the previous export as it was. Errors are :class:`~lit_p3o.cli.ConfigError` lines naming
    ``--ckpt`` or ``--out``.
    """
    import lit_p3o  # noqa: F401  (registers the checkpoint's classes as safe to unpickle)
    from lit_p3o.cli import _RUN_ID_KEY, RUN_MARKER, ConfigError, check_export_dir, read_checkpoint, run_marker
    from lit_p3o.stages.base import RLStage

    checkpoint = read_checkpoint(ckpt, "--ckpt")
    if "hyper_parameters" not in checkpoint:
        raise ConfigError(f"--ckpt {ckpt}: a Lightning checkpoint without hyperparameters; it was not written by a lit-p3o stage")
    source, run_id = str(Path(ckpt).expanduser().resolve()), checkpoint.get(_RUN_ID_KEY)
    writer = f"this export of {ckpt} (run {run_id or 'without an id'})"
    with OutputLock(out, "--out", f"lit-p3o export of {ckpt}"):
        check_export_dir(out, run_id, "--out", writer, checkpoint=source)
        hparams = dict(checkpoint["hyper_parameters"])
        try:
            cls = stage_class(hparams, class_path)
        except ValueError as err:
            raise ConfigError(f"{'--stage' if class_path else f'--ckpt {ckpt}'}: {err}") from err
        if issubclass(cls, RLStage):
            hparams["reward_model"] = "embedded:reviews"  # the scorer is frozen, not in the checkpoint, not exported
        try:
            if hparams.pop("_instantiator", None) is not None:  # written by LightningCLI: the parsed config
                hparams.pop("_class_path", None)
                module = instantiate_module(cls, hparams)
            else:
                module = cls(**hparams)
        except OSError as err:
            raise ConfigError(f"--ckpt {ckpt}: rebuilding {cls.__name__} failed; run export from the directory "
                              f"training ran in ({err})") from err  # fmt: skip
        missing, unexpected = module.load_state_dict(checkpoint["state_dict"], strict=False)
        missing = [k for k in missing if not k.startswith(("reference.", "reward_model."))]
        if missing or unexpected:
            raise ConfigError(f"--ckpt {ckpt}: weights do not fit {cls.__name__}: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")  # fmt: skip
        network = module.policy if hasattr(module, "policy") else module.reward_model
        if has_adapters(network) and not merge:
            bases = [c.base_model_name_or_path for c in network.peft_config.values()]
            if any(Path(b, "adapter_config.json").is_file() for b in bases if b):
                print(f"[lit-p3o] the adapters' base {bases[0]} is itself an adapter directory; merging (peft cannot stack them)")
                merge = True
        marker = {RUN_MARKER: run_marker(run_id, cls.__name__, checkpoint=source)}
        try:
            path = save_pretrained(network.eval(), module.tokenizer, out, merge=merge, extra_files=marker)
        except OSError as err:  # a full disk, a read-only directory, a file in the way
            raise write_error("--out", out, err) from err
    print(f"[lit-p3o] exported {cls.__name__}.{'policy' if hasattr(module, 'policy') else 'reward_model'} "
          f"of {ckpt} to {Path(path).resolve()}")  # fmt: skip
    return path


def export_main(argv: Sequence[str] | None = None) -> Path:
    """``lit-p3o export --ckpt CKPT --out DIR [--merge] [--stage CLASS_PATH]``."""
    from lit_p3o.cli import ConfigError

    parser = _CommandParser(prog="lit-p3o export", description=export_checkpoint.__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", required=True, type=Path, help="a Lightning checkpoint (.ckpt) of any lit-p3o stage")
    parser.add_argument("--out", required=True, type=Path, help="directory to write (missing, empty, or an export of the same run)")
    parser.add_argument("--merge", action="store_true", help="merge LoRA adapters into the base and save it whole")
    parser.add_argument("--stage", default=None, help="the stage's class path, when it cannot be told from the checkpoint")
    args = parser.parse_args(argv)
    try:
        return export_checkpoint(args.ckpt, args.out, args.merge, args.stage)
    except ConfigError as err:  # names --ckpt or --out and the file: one line, no usage
        parser.exit(2, f"{parser.prog}: error: {err}\n")


COMMANDS: dict[str, Callable[[Sequence[str]], object]] = {
    "frontier": frontier_main,
    "winrate": winrate_main,
    "report": report_main,
    "export": export_main,
}
