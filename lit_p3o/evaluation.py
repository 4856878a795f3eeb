"""Looking at what a policy writes: sample reports and the KL–reward frontier.

The frontier (ALGORITHMS.md §8) is how RLHF methods are compared: a method is better when it
reaches a higher reward at the same KL from the reference. :class:`FrontierCallback` records
one point of it every ``eval_every`` optimizer steps, on a fixed held-out prompt set.
"""

from __future__ import annotations

import csv
import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only
from torch import nn
from transformers import PreTrainedTokenizerBase

from lit_p3o.data.encoding import Encoded, collate, encode_prompt, fit_prompt
from lit_p3o.data.prompts import load_prompts
from lit_p3o.generation import SamplingSpec, decode, eval_mode, response_logprobs, sample_responses
from lit_p3o.models import FrozenReference
from lit_p3o.rollout import Scorer
from lit_p3o.tasks import Task, resolve_embedded

FRONTIER_COLUMNS = ("step", "kl", "score", "gold", "response_length", "eos_rate")


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
) -> Completions:
    """Sample and decode one response per prompt, in batches."""
    ids = [fit_prompt(encode_prompt(tokenizer, p), max_prompt_tokens, tokenizer.bos_token_id) for p in prompts]
    sampled = sample_responses(model, tokenizer, ids, sampling, batch_size)
    responses = [decode(tokenizer, e.response_ids) for e in sampled.examples]
    return Completions(prompts, responses, sampled.ended, sampled.examples)


@contextmanager
def seeded(seed: int, device: torch.device | str = "cpu") -> Iterator[None]:
    """Run a block under ``torch.manual_seed(seed)`` and give the caller its RNG state back.

    Evaluation samples with the global generator (``generate()`` offers no other), so without
    this an evaluation would shift every later rollout and break resume-equality.
    """
    device = torch.device(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


@torch.no_grad()
def sequence_kl(
    policy: nn.Module,
    reference: FrozenReference,
    examples: list[Encoded],
    pad_token_id: int,
    batch_size: int = 64,
) -> torch.Tensor:
    """``Σ_t log π_θ(y_t|·) − log π_ref(y_t|·)`` per example, ``[N]`` float32 on CPU.

    For responses sampled from π_θ its mean is the Monte Carlo estimate of KL(π_θ ‖ π_ref).
    """
    device = next(policy.parameters()).device
    out = []
    with eval_mode(policy):
        for start in range(0, len(examples), batch_size):
            batch = collate(examples[start : start + batch_size], pad_token_id).to(device)
            logp = response_logprobs(policy, batch)
            with reference.active() as ref:
                logp = logp - response_logprobs(ref, batch)
            out.append(logp.sum(-1).cpu())
    return torch.cat(out)


@torch.no_grad()
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
) -> dict[str, float | None]:
    """One point of the frontier: sample one response per prompt from ``policy`` and report
    the mean sequence ``kl`` to ``reference``, the mean proxy ``score``, the mean ``gold``
    reward (None without a task), the mean ``response_length`` in tokens and ``eos_rate``."""
    if not prompts:
        raise ValueError("evaluate_policy: no prompts")
    out = sample_completions(policy, tokenizer, prompts, sampling, max_prompt_tokens, batch_size)
    kl = sequence_kl(policy, reference, out.examples, tokenizer.pad_token_id, batch_size)
    scores = scorer.score_examples(out.examples, out.ended, prompts=out.prompts).float()
    gold = None if task is None else sum(task.gold_reward_batch(out.prompts, out.responses, out.ended)) / len(prompts)
    return {
        "kl": kl.mean().item(),
        "score": scores.mean().item(),
        "gold": gold,
        "response_length": sum(len(e.response_ids) for e in out.examples) / len(prompts),
        "eos_rate": sum(out.ended) / len(prompts),
    }


class FrontierCallback(L.Callback):
    """Trace a run's KL–reward frontier on held-out prompts.

    Evaluates at the start of ``fit``, after every optimizer step that reaches a multiple of
    ``eval_every`` (once per step, so gradient accumulation and skipped steps do not repeat a
    row) and at the end of training. Each point is logged as ``eval/*`` to the trainer's
    loggers and appended to ``<log_dir>/<csv_name>`` (columns :data:`FRONTIER_COLUMNS`), the
    file :func:`lit_p3o.commands.plot_frontier` reads. Sampling is seeded with ``seed`` (the
    same noise at every step, which makes steps comparable) and the training RNG is restored
    afterwards. Needs an RL stage (``policy``, ``reference``, ``tokenizer``, ``scorer``).
    """

    def __init__(
        self,
        prompts: str = "embedded:reviews",
        split: str = "test",
        num_prompts: int = 200,
        eval_every: int = 50,
        max_new_tokens: int = 32,
        max_prompt_tokens: int = 256,
        csv_name: str = "frontier.csv",
        batch_size: int = 64,
        seed: int = 0,
    ) -> None:
        if eval_every < 1:
            raise ValueError(f"FrontierCallback.eval_every: must be >= 1, got {eval_every}")
        if num_prompts < 1:
            raise ValueError(f"FrontierCallback.num_prompts: must be >= 1, got {num_prompts}")
        self.prompts, self.split, self.num_prompts = prompts, split, num_prompts
        self.eval_every, self.max_prompt_tokens = eval_every, max_prompt_tokens
        self.sampling = SamplingSpec(max_new_tokens=max_new_tokens)
        self.csv_name, self.batch_size, self.seed = csv_name, batch_size, seed
        self.task = resolve_embedded(prompts)
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
                "it evaluates RL stages (P3O, PPO, RLOO, online DPO)"
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
        if trainer.is_global_zero:
            self._evaluate(trainer, pl_module)

    def _evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        rollout_spec = getattr(pl_module, "rollout_spec", None)  # the stage's chat template kwargs and stop strings
        if self._prompt_list is None:
            self._prompt_list = load_prompts(
                self.prompts, self.split, self.num_prompts, tokenizer=pl_module.tokenizer,
                chat_template_kwargs=getattr(rollout_spec, "chat_template_kwargs", None),
            )  # fmt: skip
        sampling = self.sampling
        if rollout_spec is not None:
            sampling = dataclasses.replace(sampling, stop_strings=rollout_spec.sampling.stop_strings)
        with seeded(self.seed, pl_module.device):
            point = evaluate_policy(
                pl_module.policy, pl_module.reference, pl_module.tokenizer, pl_module.scorer,
                self._prompt_list, sampling, self.max_prompt_tokens, self.task, self.batch_size,
            )  # fmt: skip
        row = {"step": trainer.global_step, **point}
        self.rows.append(row)
        metrics = {f"eval/{k}": v for k, v in point.items() if v is not None}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        self._append(row)

    def _append(self, row: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        new = not self.path.exists()
        with self.path.open("a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=FRONTIER_COLUMNS)
            if new:
                writer.writeheader()
            writer.writerow({k: "" if row[k] is None else row[k] for k in FRONTIER_COLUMNS})


def read_frontier(path: str | Path) -> dict[str, list[float]]:
    """A frontier CSV as columns of floats; ``gold`` is empty when the run had no gold reward."""
    with Path(path).open(newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError(f"{path}: no frontier rows")
    missing = set(FRONTIER_COLUMNS) - set(rows[0])
    if missing:
        raise ValueError(f"{path}: not a frontier CSV (missing columns {sorted(missing)})")
    columns = {name: [float(r[name]) for r in rows if r[name] != ""] for name in FRONTIER_COLUMNS}
    if columns["gold"] and len(columns["gold"]) != len(rows):
        raise ValueError(f"{path}: `gold` is missing on some rows")
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

    @rank_zero_only
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        prompts = load_prompts(self.prompts, self.split, self.num_prompts, tokenizer=pl_module.tokenizer)
        out = sample_completions(pl_module.policy, pl_module.tokenizer, prompts, self.sampling, self.max_prompt_tokens)
        print(f"\n[lit-p3o] sample completions ({self.split} prompts):")
        for prompt, response, ended in list(zip(out.prompts, out.responses, out.ended))[: self.show]:
            print(f"  {prompt!r} -> {response!r}{'' if ended else '  [no EOS]'}")
        task = resolve_embedded(self.prompts)
        if task is not None:
            ok = [task.is_grammatical(r) and e for r, e in zip(out.responses, out.ended)]
            self.pass_rate = sum(ok) / len(ok)
            print(f"[lit-p3o] grammatical and ended with EOS: {self.pass_rate:.1%} of {len(ok)} completions")
