"""Looking at what a policy writes: sample reports, held-out evaluation, the KL–reward frontier.

The frontier (ALGORITHMS.md §8) is how RLHF methods are compared: a method is better when it
reaches a higher reward at the same KL from the reference. :class:`FrontierCallback` records
one point of it every ``eval_every`` optimizer steps, on a fixed held-out prompt set. The RL
stages' ``validate``/``test`` (configured by :class:`EvaluationSpec`) measure the same
quantities with the same code, :func:`evaluate_examples`.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from torch import nn
from transformers import PreTrainedTokenizerBase

from lit_p3o.data.encoding import Encoded, collate, encode_prompt, fit_prompt
from lit_p3o.data.issues import DataFormatError
from lit_p3o.data.prompts import load_prompts
from lit_p3o.data.sources import read_text
from lit_p3o.generation import SamplingSpec, decode, eval_mode, response_logprobs, sample_responses, seeded
from lit_p3o.models import FrozenReference, is_sharded
from lit_p3o.monitoring import log_point, phase, shows_progress
from lit_p3o.scoring import Scorer
from lit_p3o.tasks import Task, resolve_embedded

FRONTIER_COLUMNS = ("step", "kl", "score", "gold", "response_length", "eos_rate")


@dataclass
class EvaluationSpec:
    """The held-out evaluation an RL stage runs in ``validate`` and ``test`` (and in ``fit``
    when the stage's ``evaluation`` is set), and the completions ``predict`` writes.

    ``prompts`` (``"embedded:<task>"``, a JSONL/parquet file or dataset with a ``prompt``
    column, a preference dataset, or a list of prompt strings) and ``split`` name the prompt set; ``num_prompts`` caps
    it (``None``: all of it; required for embedded tasks). One response per prompt is
    sampled with ``sampling``, seeded with ``seed`` plus the batch index (and the rank), the
    training RNG being restored afterwards. ``predict_prompts`` is the prompt source of
    ``predict`` (default: ``prompts``); its completions go to ``predictions_file`` (default:
    ``<log_dir>/predictions.jsonl``).
    """

    prompts: str | list[str] = "embedded:reviews"
    split: str = "test"
    num_prompts: int | None = 200
    batch_size: int = 64
    max_prompt_tokens: int = 256
    sampling: SamplingSpec = field(default_factory=SamplingSpec)
    seed: int = 0
    predict_prompts: str | list[str] | None = None
    predictions_file: str | None = None

    def __post_init__(self) -> None:
        for name in ("batch_size", "max_prompt_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"EvaluationSpec.{name}: must be >= 1, got {getattr(self, name)}")
        if self.num_prompts is not None and self.num_prompts < 1:
            raise ValueError(f"EvaluationSpec.num_prompts: must be >= 1 or null (all), got {self.num_prompts}")


@dataclass
class Completions:
    """One sampled response per prompt: decoded text, and the ids that scorers and log-probs need."""

    prompts: list[str]
    responses: list[str]
    ended: list[bool]
    examples: list[Encoded]


def sample_completions(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    sampling: SamplingSpec,
    max_prompt_tokens: int,
    batch_size: int = 64,
    progress: str | None = None,
) -> Completions:
    """Sample and decode one response per prompt, in batches (a progress bar when ``progress``
    labels one)."""
    ids = [fit_prompt(encode_prompt(tokenizer, p), max_prompt_tokens, tokenizer.bos_token_id) for p in prompts]
    sampled = sample_responses(model, tokenizer, ids, sampling, batch_size, progress=progress)
    responses = [decode(tokenizer, e.response_ids) for e in sampled.examples]
    return Completions(prompts, responses, sampled.ended, sampled.examples)


@torch.no_grad()
def sequence_kl(
    policy: nn.Module,
    reference: FrozenReference,
    examples: list[Encoded],
    pad_token_id: int,
    batch_size: int = 64,
    temperature: float = 1.0,
) -> torch.Tensor:
    """``Σ_t log π_θ(y_t|·) − log π_ref(y_t|·)`` per example, ``[N]`` float32 on CPU.

    For responses sampled from π_θ (at ``temperature``, which both log-probs then use) its
    mean is the Monte Carlo estimate of KL(π_θ ‖ π_ref).
    """
    device = next(policy.parameters()).device
    out = []
    with eval_mode(policy):
        for start in range(0, len(examples), batch_size):
            batch = collate(examples[start : start + batch_size], pad_token_id).to(device)
            logp = response_logprobs(policy, batch, temperature)
            with reference.active() as ref:
                logp = logp - response_logprobs(ref, batch, temperature)
            out.append(logp.sum(-1).cpu())
    return torch.cat(out)


@torch.no_grad()
def evaluate_examples(
    policy: nn.Module,
    reference: FrozenReference,
    tokenizer: PreTrainedTokenizerBase,
    scorer: Scorer,
    prompts: Sequence[str],
    sampling: SamplingSpec,
    max_prompt_tokens: int,
    task: Task | None = None,
    batch_size: int = 64,
    progress: str | None = None,
) -> dict[str, torch.Tensor]:
    """Sample one response per prompt from ``policy`` and measure each: sequence ``kl`` to
    ``reference``, proxy ``score``, ``gold`` reward (only with a task), ``response_length``
    in tokens and ``eos_rate`` (1.0 when the response ended with EOS); ``[N]`` float32 each."""
    if not prompts:
        raise ValueError("evaluate_examples: no prompts")
    prompts = list(prompts)
    out = sample_completions(policy, tokenizer, prompts, sampling, max_prompt_tokens, batch_size, progress)
    values = {
        "kl": sequence_kl(policy, reference, out.examples, tokenizer.pad_token_id, batch_size, sampling.temperature),
        "score": scorer.score_examples(out.examples, out.ended, prompts=out.prompts).float().cpu(),
        "response_length": torch.tensor([float(len(e.response_ids)) for e in out.examples]),
        "eos_rate": torch.tensor(out.ended, dtype=torch.float32),
    }
    if task is not None:
        values["gold"] = torch.tensor(
            task.gold_reward_batch(out.prompts, out.responses, out.ended), dtype=torch.float32
        )
    return values


def evaluate_policy(
    policy: nn.Module,
    reference: FrozenReference,
    tokenizer: PreTrainedTokenizerBase,
    scorer: Scorer,
    prompts: list[str],
    sampling: SamplingSpec,
    max_prompt_tokens: int,
    task: Task | None = None,
    batch_size: int = 64,
    progress: str | None = None,
) -> dict[str, float | None]:
    """One point of the frontier: the means of :func:`evaluate_examples` over ``prompts``
    (``gold`` is None without a task)."""
    values = evaluate_examples(
        policy, reference, tokenizer, scorer, prompts, sampling, max_prompt_tokens, task, batch_size, progress
    )
    point: dict[str, float | None] = {name: values[name].mean().item() for name in ("kl", "score")}
    point["gold"] = values["gold"].mean().item() if "gold" in values else None
    point.update({name: values[name].mean().item() for name in ("response_length", "eos_rate")})
    return point


class FrontierCallback(L.Callback):
    """Trace a run's KL–reward frontier on held-out prompts.

    Evaluates at the start of ``fit``, after every optimizer step that reaches a multiple of
    ``eval_every`` (once per step, so gradient accumulation and skipped steps do not repeat a
    row) and at the end of training. Each point is appended to ``<log_dir>/<csv_name>``
    (columns :data:`FRONTIER_COLUMNS`), the file :func:`lit_p3o.commands.frontier.plot_frontier` reads,
    logged as ``eval/*`` to the trainer's loggers at its optimizer step, and put into
    ``trainer.callback_metrics`` on every rank, so ``ModelCheckpoint(monitor="eval/gold")``
    and ``EarlyStopping`` can use the latest point.

    Not through ``self.log``: Lightning allows no step-level logging in ``on_train_start``
    nor any in ``on_train_end``, and a step-level value logged in ``on_train_batch_end`` is
    written again at every later logging step of the epoch (the frontier would repeat stale
    points at wrong steps) and dropped when the step is not a multiple of
    ``log_every_n_steps``.

    ``evaluation`` names the prompts and how they are sampled, as the stages' own (its
    ``predict_*`` fields belong to the stage and are refused here). Sampling is seeded with
    ``evaluation.seed`` (the same noise at every step, which makes steps comparable) and the
    training RNG is restored afterwards; every forward runs under the trainer's precision (e.g.
    bf16 autocast). Rank 0 evaluates and broadcasts the point. Needs an RL stage (``policy``,
    ``reference``, ``tokenizer``, ``scorer``).
    """

    def __init__(
        self, evaluation: EvaluationSpec | None = None, eval_every: int = 50, csv_name: str = "frontier.csv"
    ) -> None:
        evaluation = evaluation or EvaluationSpec()
        if eval_every < 1:
            raise ValueError(f"FrontierCallback.eval_every: must be >= 1, got {eval_every}")
        for name in ("predict_prompts", "predictions_file"):  # set here, they would be ignored
            if getattr(evaluation, name) is not None:
                raise ValueError(
                    f"EvaluationSpec.{name}: FrontierCallback never predicts (the stage's `evaluation` does), "
                    f"got {getattr(evaluation, name)!r}"
                )
        self.evaluation, self.eval_every, self.csv_name = evaluation, eval_every, csv_name
        self.task = resolve_embedded(evaluation.prompts)
        self.path: Path | None = None
        self.rows: list[dict[str, Any]] = []
        self.last_step: int | None = None
        self._prompt_list: list[str] | None = None

    @property
    def state_key(self) -> str:
        return f"FrontierCallback[{self.csv_name}]"

    def state_dict(self) -> dict[str, Any]:
        return {"last_step": self.last_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last_step = state["last_step"]

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        missing = [a for a in ("policy", "reference", "tokenizer", "scorer") if not hasattr(pl_module, a)]
        if missing:
            raise TypeError(
                f"FrontierCallback: {type(pl_module).__name__} has no {', '.join(missing)}; "
                "it evaluates RL stages (P3O, PPO, RLOO, GRPO, online DPO)"
            )
        # log_dir broadcasts, so every rank must ask for it, not only the one that writes
        self.path = Path(trainer.log_dir or trainer.default_root_dir) / self.csv_name

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step == 0 and trainer.is_global_zero and self.path.exists():
            self.path.unlink()  # a fresh run starts a fresh trace; a resumed one appends
        self._maybe_evaluate(trainer, pl_module)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if trainer.global_step % self.eval_every == 0:
            self._maybe_evaluate(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._maybe_evaluate(trainer, pl_module)

    def _maybe_evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.last_step == trainer.global_step:
            return
        self.last_step = trainer.global_step
        # rank 0 evaluates; under FSDP every rank does (sharded forwards are collectives)
        evaluates = trainer.is_global_zero or is_sharded(pl_module.policy)
        point = self._evaluate(trainer, pl_module) if evaluates else None
        point = trainer.strategy.broadcast(point, src=0)
        log_point(trainer, {f"eval/{k}": v for k, v in point.items() if v is not None})

    def _evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float | None]:
        """One point; every rank evaluating uses the same prompts and seed, only rank 0 writes."""
        rollout_spec = getattr(pl_module, "rollout_spec", None)  # the stage's chat template kwargs and stop strings
        spec = self.evaluation
        if self._prompt_list is None:
            self._prompt_list = load_prompts(
                spec.prompts,
                spec.split,
                spec.num_prompts,
                tokenizer=pl_module.tokenizer,
                chat_template_kwargs=getattr(rollout_spec, "chat_template_kwargs", None),
            )
        with seeded(spec.seed, pl_module.device), trainer.precision_plugin.forward_context(), phase(trainer, "eval"):
            point = evaluate_policy(
                pl_module.policy,
                pl_module.reference,
                pl_module.tokenizer,
                pl_module.scorer,
                self._prompt_list,
                self.sampling(rollout_spec),
                spec.max_prompt_tokens,
                self.task,
                spec.batch_size,
                progress="eval: generate" if shows_progress(trainer) else None,
            )
        if not trainer.is_global_zero:
            return point
        row = {"step": trainer.global_step, **point}
        self.rows.append(row)
        self._append(row)
        return point

    def sampling(self, rollout_spec: Any) -> SamplingSpec:
        """``evaluation.sampling``, stopping at the rollout's stop strings unless it names its own
        (the policy learns to end its responses where the rollout cuts them)."""
        sampling = self.evaluation.sampling
        if rollout_spec is None or sampling.stop_strings is not None:
            return sampling
        return dataclasses.replace(sampling, stop_strings=rollout_spec.sampling.stop_strings)

    def _append(self, row: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        new = not self.path.exists()
        with self.path.open("a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=FRONTIER_COLUMNS)
            if new:
                writer.writeheader()
            writer.writerow({k: "" if row[k] is None else row[k] for k in FRONTIER_COLUMNS})


class CompletionWriter(BasePredictionWriter):
    """Appends ``predict`` outputs (dicts) to a JSONL file, one line per completion.

    ``path`` defaults to ``<log_dir>/predictions.jsonl``; with several ranks each writes
    ``<stem>.rank<N>.jsonl``. The file is started afresh at each ``predict``.
    """

    def __init__(self, path: str | None = None) -> None:
        super().__init__(write_interval="batch")
        self.path = None if path is None else Path(path)
        self.written: Path | None = None

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        path = self.path or Path(trainer.log_dir or trainer.default_root_dir) / "predictions.jsonl"
        if trainer.world_size > 1:
            path = path.with_name(f"{path.stem}.rank{trainer.global_rank}{path.suffix}")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("")
        self.written = path

    def write_on_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, prediction: Any, *args: Any) -> None:
        with self.written.open("a") as f:
            for row in prediction:
                f.write(json.dumps(row) + "\n")

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        print(f"[lit-p3o] wrote the completions to {self.written.resolve()}")


def read_frontier(path: str | Path) -> dict[str, list[float]]:
    """A frontier CSV as columns of floats; ``gold`` is empty when the run had no gold reward."""
    path = Path(path)
    try:
        rows = list(csv.DictReader(io.StringIO(read_text(path), newline="")))
    except csv.Error as err:
        raise DataFormatError(f"{path}: not a CSV file ({err})") from None
    if not rows:
        raise DataFormatError(f"{path}: no frontier rows (FrontierCallback writes one per evaluation)")
    missing = set(FRONTIER_COLUMNS) - set(rows[0])
    if missing:
        raise DataFormatError(f"{path}: not a frontier CSV (missing columns {sorted(missing)})")
    try:
        columns = {name: [float(r[name]) for r in rows if r[name] != ""] for name in FRONTIER_COLUMNS}
    except (TypeError, ValueError) as err:
        raise DataFormatError(f"{path}: not a frontier CSV (a value is not a number: {err})") from None
    if columns["gold"] and len(columns["gold"]) != len(rows):
        raise DataFormatError(f"{path}: `gold` is missing on some rows")
    return columns


class CompletionReport(L.Callback):
    """At the end of ``fit``, print sample completions on held-out prompts.

    For an embedded task it also prints the share of completions that are grammatical and
    end with EOS, the figure that says whether SFT has learned the task's language.
    """

    def __init__(
        self,
        prompts: str = "embedded:reviews",
        split: str = "test",
        num_prompts: int = 100,
        show: int = 5,
        max_new_tokens: int = 32,
        max_prompt_tokens: int = 64,
    ) -> None:
        self.prompts, self.split, self.num_prompts = prompts, split, num_prompts
        self.show, self.max_prompt_tokens = show, max_prompt_tokens
        self.sampling = SamplingSpec(max_new_tokens=max_new_tokens)
        self.pass_rate: float | None = None

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Rank 0 reports; under FSDP every rank samples too (sharded forwards are collectives)."""
        if not (trainer.is_global_zero or is_sharded(pl_module.policy)):
            return
        prompts = load_prompts(self.prompts, self.split, self.num_prompts, tokenizer=pl_module.tokenizer)
        with trainer.precision_plugin.forward_context():
            out = sample_completions(
                pl_module.policy, pl_module.tokenizer, prompts, self.sampling, self.max_prompt_tokens
            )
        if not trainer.is_global_zero:
            return
        print(f"\n[lit-p3o] sample completions ({self.split} prompts):")
        for prompt, response, ended in list(zip(out.prompts, out.responses, out.ended))[: self.show]:
            print(f"  {prompt!r} -> {response!r}{'' if ended else '  [no EOS]'}")
        task = resolve_embedded(self.prompts)
        if task is not None:
            ok = [task.is_grammatical(r) and e for r, e in zip(out.responses, out.ended)]
            self.pass_rate = sum(ok) / len(ok)
            print(f"[lit-p3o] grammatical and ended with EOS: {self.pass_rate:.1%} of {len(ok)} completions")
