"""``lit-p3o report`` prints an RL run's before/after table and plots its evaluation rows over steps."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from torch import Tensor

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
from lit_p3o.commands.winrate import judge_label
from lit_p3o.data.prompts import load_prompts
from lit_p3o.errors import UserError
from lit_p3o.evaluation import evaluate_examples, read_frontier
from lit_p3o.generation import SamplingSpec, seeded
from lit_p3o.models import FrozenReference, ModelSpec, build_causal_lm, load_tokenizer
from lit_p3o.scoring import build_scorer
from lit_p3o.statistics import bootstrap_mean
from lit_p3o.tasks import resolve_embedded


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
        raise UserError(
            f"--also {clash[0]}=...: '{clash[0]}' names a built-in row of the report (reference, "
            "trained); label the extra policy otherwise"
        )
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
    print(
        f"\n[lit-p3o] {len(prompt_list)} held-out prompts, one sample each (judge: {judge_label(judge)}); "
        "means with bootstrap 95% intervals over the prompts"
    )
    print(f"{'':<{width}}{'proxy reward':>22}{'gold reward':>22}{'KL to ref':>20}{'length':>8}{'EOS':>7}")
    for key, r in rows.items():
        gold = "-" if r["gold"] is None else _with_interval(r, "gold")
        print(
            f"{names[key]:<{width}}{_with_interval(r, 'score'):>22}{gold:>22}{_with_interval(r, 'kl'):>20}"
            f"{r['response_length']:>8.1f}{r['eos_rate']:>7.0%}"
        )
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
    parser.add_argument(
        "--also",
        nargs="+",
        type=_label_and_path,
        default=[],
        metavar="LABEL=DIR",
        help="more policies to list as extra rows (e.g. the same run without KL control)",
    )
    args = parser.parse_args(argv)
    also = _unique(args.also, parser)
    check_models({"--reference": args.reference, "--policy": args.policy} | {f"--also {k}": v for k, v in also.items()})
    check_judge(args.judge)
    check_prompts(args.prompts)
    if args.frontier is not None:
        read_frontier(args.frontier)  # a bad file fails now, not after every policy was sampled
    with _named("--judge"):
        return report(
            args.reference,
            args.policy,
            args.judge,
            args.frontier,
            args.out,
            args.prompts,
            args.num_prompts,
            args.max_new_tokens,
            args.seed,
            also,
        )
