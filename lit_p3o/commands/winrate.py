"""``lit-p3o winrate`` samples every saved policy on the same prompts and reports, for each pair,
the probability that a judge (a reward model, or an embedded task's gold reward) prefers the
row's response to the column's, ties counting one half (the paper's Figure 5; ALGORITHMS.md §8)."""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from lit_p3o.commands._common import (
    _CommandParser,
    _label_and_path,
    _named,
    _positive_int,
    _unique,
    check_judge,
    check_models,
    check_prompts,
)
from lit_p3o.data.prompts import load_prompts
from lit_p3o.errors import UserError
from lit_p3o.evaluation import sample_completions
from lit_p3o.generation import SamplingSpec, seeded
from lit_p3o.models import ModelSpec, build_causal_lm, load_tokenizer
from lit_p3o.scoring import GoldScorer, RewardScorer, build_scorer
from lit_p3o.tasks import resolve_embedded


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
        raise UserError(
            f"--judge {judge}: the gold reward of another task than --prompts {prompts}; a task's gold "
            f"reward scores only its own prompts (give --judge {prompts}, or a reward model)"
        )
    if labels[judge] == "gold":
        raise UserError(
            f"--judge {judge}: a reward model folder named 'gold' would share its label with the gold "
            f"reward of --prompts {prompts}; rename the folder"
        )
    return labels | {prompts: "gold"}


def compare_policies(
    policies: Mapping[str, str | Path], judge: str, out_dir: str | Path = "winrates", **judging: Any
) -> dict[str, tuple[list[str], Tensor]]:
    """Head-to-head win rates of saved policies on the same prompts; ``{judge: (names, matrix)}``.

    Every policy samples one response per prompt under the same seed. ``judge`` is a reward
    model directory or ``"embedded:<task>"``; with embedded prompts the task's gold reward
    judges as well. ``judging`` (prompts, num_prompts, max_new_tokens, seed, split,
    max_prompt_tokens, batch_size, device) goes to :func:`judge_policies`, whose signature
    holds the types and defaults. Prints each matrix, writes ``winrates.csv`` and ``winrates_<judge>.png``.
    """
    if len(policies) < 2:
        raise ValueError(f"compare_policies: needs at least two policies, got {len(policies)}")
    scores = judge_policies(policies, judge, **judging)
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
            policies,
            args.judge,
            args.out_dir,
            prompts=args.prompts,
            num_prompts=args.num_prompts,
            max_new_tokens=args.max_new_tokens,
            seed=args.seed,
            split=args.split,
            max_prompt_tokens=args.max_prompt_tokens,
            batch_size=args.batch_size,
            device=args.device,
        )
