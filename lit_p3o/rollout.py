"""The rollout, written once for every RL stage (ALGORITHMS.md §3).

One iteration of an RL stage is one Lightning epoch; its events, in order, and where each lives
(tested in ``tests/test_rollout.py``, ``tests/test_monitoring.py`` and ``tests/test_p3o_stage.py``):

1. sample — :meth:`RolloutCallback.on_train_epoch_start` draws this rank's prompts
   (:class:`PromptSampler`) and :func:`rollout` samples K responses per prompt with
   ``generate()`` (KV cache on, noise seeded by :func:`sampling_seed`);
2. score — :func:`rollout` scores them (the stage's ``scorer`` minus the missing-EOS penalty) and
   takes per-token ``logp_ref``, ``logp_old`` (:mod:`lit_p3o.forwards`: ``logp_old`` in the
   update's first-pass minibatches), the KL and ``r̃ = score − β·KL``
   (:func:`lit_p3o.losses.sequence_kl_rewards`) and the stage's per-token extras (PPO's
   values). On-policy (``RolloutSpec.defer_logp_old`` and :attr:`RolloutSpec.on_policy`)
   ``logp_old``, the KL and ``r̃`` are left to the update;
3. fill — the callback refills the stage's :class:`~lit_p3o.buffer.ReplayBuffer` and logs the
   rollout's statistics (:func:`rollout_stats`) at the step it was drawn;
4. replay passes — Lightning iterates the stage's ``train_dataloader`` (a
   :class:`~lit_p3o.buffer.BufferDataset`: ``update_epochs`` passes of minibatches of whole
   groups) into ``RLStage.training_step`` (``stages/base.py``), which makes a loss with
   ``lit_p3o.losses``; on-policy it makes ``logp_old`` (its own forward, detached), the KL and
   r̃ itself, with the same function, and returns the rollout's statistics with its loss.
   :meth:`RolloutCallback.on_train_batch_end` advances the buffer's cursor after each minibatch
   (and, on-policy, logs the statistics the update returned, after its optimizer step);
5. β update — once the last minibatch is trained on, the callback moves β
   (:class:`KLController`, the one place β is kept) from the rollout's KL.

Nothing flows back: the update reads the buffer and never writes into it. Steps 1-3 run under
the trainer's precision context, as ``training_step`` does.
"""

from __future__ import annotations

import hashlib
import logging
import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torch.nn.utils.rnn import pad_sequence
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from lit_p3o.buffer import Group, ReplayBuffer
from lit_p3o.data.encoding import TruncationStats, encode_prompt, fit_prompt
from lit_p3o.data.prompts import load_prompts
from lit_p3o.forwards import logp_old_in_update_layout, reference_passes
from lit_p3o.generation import SamplingSpec, decode, sample_responses, seeded
from lit_p3o.losses import adaptive_kl_beta, sampler_logp_gap, sequence_kl_rewards
from lit_p3o.monitoring import log_samples, phase, shows_progress
from lit_p3o.scoring import Scorer, score_terms, term_stats

if TYPE_CHECKING:
    from lit_p3o.models import FrozenReference

log = logging.getLogger(__name__)


@dataclass
class RolloutSpec:
    """What one rollout draws and samples, and how its buffer is replayed.

    ``num_prompts`` prompts per device per rollout, ``num_responses`` (K ≥ 2) responses each;
    ``update_epochs`` passes over the buffer in minibatches of ``minibatch_groups`` groups.
    ``prompt_pool`` caps how many prompts are read from ``prompts`` (required for embedded
    tasks, which can generate any number); ``prompts`` is any source
    :func:`lit_p3o.data.prompts.load_prompts` reads, a list of prompt strings included. ``missing_eos_penalty`` is subtracted from the
    score of responses that did not end within ``sampling.max_new_tokens``.
    ``chat_template_kwargs`` go to ``apply_chat_template`` when conversational prompts
    (lists of messages) are rendered.
    ``defer_logp_old``: when the rollout is :attr:`on_policy` (replayed once, in one
    minibatch), skip the rollout's ``logp_old`` forward and take ``logp_old`` from the
    update's own forward, detached (the ratio is then exactly 1); false keeps the pass.
    ``importance_sampling_cap``: C of the truncated importance-sampling correction for the gap
    between the sampler and the trainer (:func:`lit_p3o.losses.truncated_importance_weights`);
    it needs a sampler that reports its log-probs. Null (default) applies none.
    """

    prompts: str | list[str] = "embedded:reviews"
    split: str = "train"
    prompt_pool: int | None = 2000
    num_prompts: int = 64
    num_responses: int = 2
    update_epochs: int = 4
    minibatch_groups: int = 8
    max_prompt_tokens: int = 256
    sampling: SamplingSpec = field(default_factory=SamplingSpec)
    missing_eos_penalty: float | None = None
    generation_batch_size: int = 64
    forward_batch_size: int = 32
    log_samples: int = 2
    chat_template_kwargs: dict[str, Any] | None = None
    defer_logp_old: bool = True
    importance_sampling_cap: float | None = None

    def __post_init__(self) -> None:
        if self.num_responses < 2:
            raise ValueError(f"RolloutSpec.num_responses: pairwise methods need K >= 2, got {self.num_responses}")
        for name in (
            "num_prompts",
            "update_epochs",
            "minibatch_groups",
            "max_prompt_tokens",
            "generation_batch_size",
            "forward_batch_size",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"RolloutSpec.{name}: must be >= 1, got {getattr(self, name)}")
        if self.missing_eos_penalty is not None and self.missing_eos_penalty < 0:
            raise ValueError("RolloutSpec.missing_eos_penalty: it is subtracted, give a value >= 0")
        if self.importance_sampling_cap is not None and not self.importance_sampling_cap > 0:
            raise ValueError(f"RolloutSpec.importance_sampling_cap: must be > 0, got {self.importance_sampling_cap}")

    def require_sampler_logprobs(self, present: bool) -> None:
        """The importance-sampling correction needs the sampler's log-probs (``present``)."""
        if self.importance_sampling_cap is not None and not present:
            raise ValueError(
                f"RolloutSpec.importance_sampling_cap: got {self.importance_sampling_cap}, but the sampler gives no "
                "log-probs to correct for (generate(), rollout.sampling.backend: hf); leave it null"
            )

    @property
    def on_policy(self) -> bool:
        """One update pass over the rollout in a single minibatch: the policy the update
        differentiates is the one that sampled, so ``logp_old`` is the update's own log-prob."""
        return self.update_epochs == 1 and self.minibatch_groups >= self.num_prompts

    @property
    def update_gives_logp_old(self) -> bool:
        """The rollout leaves ``logp_old``, the KL and r̃ to the update (:attr:`defer_logp_old`
        and :attr:`on_policy`), whose one minibatch is then the whole rollout."""
        return self.defer_logp_old and self.on_policy


@dataclass
class KLSpec:
    """KL coefficient β: fixed, or adaptive towards ``target`` (Ziegler et al. 2019) when set."""

    beta: float = 0.05
    target: float | None = None
    horizon: int = 10000

    def __post_init__(self) -> None:
        if self.beta < 0:
            raise ValueError(f"KLSpec.beta: must be >= 0, got {self.beta}")
        if self.target is not None and self.target <= 0:
            raise ValueError(f"KLSpec.target: must be > 0 when set, got {self.target}")
        if self.horizon < 1:
            raise ValueError(f"KLSpec.horizon: must be >= 1, got {self.horizon}")


class KLController:
    """The one holder of β: the rollout and the update of an iteration read it, and it moves
    (when a target is set) only after the iteration's last update (step 5 above), so both use
    the β the rollout was drawn with. The stage owns it; its :class:`RolloutCallback` moves it
    and checkpoints it."""

    def __init__(self, spec: KLSpec) -> None:
        self.spec = spec
        self.beta = spec.beta

    def update(self, kl: float, n_samples: int) -> None:
        if self.spec.target is not None:
            self.beta = adaptive_kl_beta(self.beta, kl, self.spec.target, n_samples, self.spec.horizon)

    def state_dict(self) -> dict[str, float]:
        return {"beta": self.beta}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.beta = state["beta"]


class PromptSampler:
    """Endless seeded passes over a prompt list; a rank sees only its own shard."""

    def __init__(self, prompts: list[str], seed: int, rank: int = 0, world_size: int = 1) -> None:
        self.prompts = prompts[rank::world_size]
        if not self.prompts:
            raise ValueError(f"rank {rank} of {world_size} has no prompts: give more prompts than devices")
        self.seed, self.epoch, self.position = seed, 0, 0
        self._order = self._shuffled()

    def _shuffled(self) -> list[int]:
        return random.Random(self.seed * 7919 + self.epoch).sample(range(len(self.prompts)), len(self.prompts))

    def draw(self, n: int) -> list[str]:
        out = []
        while len(out) < n:
            if self.position == len(self._order):
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._shuffled()
            out.append(self.prompts[self._order[self.position]])
            self.position += 1
        return out

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = state["epoch"], state["position"]
        self._order = self._shuffled()


class RolloutStage(Protocol):
    """What the callback needs from a stage (see :class:`lit_p3o.stages.base.RLStage`)."""

    policy: nn.Module
    reference: FrozenReference
    tokenizer: PreTrainedTokenizerBase
    scorer: Scorer
    buffer: ReplayBuffer
    rollout_spec: RolloutSpec

    def rollout_extras(self, batch: Any) -> dict[str, Tensor]: ...

    def log_rollout(self, stats: dict[str, float]) -> None: ...


def sampling_seed(seed: int, rank: int, rollout_index: int) -> int:
    """The seed of one rollout's sampling noise, distinct for every (run seed, rank, rollout).

    Ranks draw independent noise (a shared stream would correlate their samples), and the
    noise depends on nothing but these three numbers, so a run is reproducible and a resumed
    one redraws exactly what the uninterrupted run drew, on every rank.
    """
    digest = hashlib.sha256(f"lit-p3o rollout {seed} {rank} {rollout_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


class RolloutCallback(L.Callback):
    """Runs one iteration per epoch around the stage's updates: steps 1-3 before the first
    minibatch, the cursor after each, step 5 after the last (see the module's docstring).
    ``kl`` is the stage's :class:`KLController` (or a spec, for a controller of its own)."""

    def __init__(self, spec: RolloutSpec, kl: KLSpec | KLController, seed: int = 0) -> None:
        self.spec = spec
        self.kl = kl if isinstance(kl, KLController) else KLController(kl)
        self.seed = seed
        self.sampler: PromptSampler | None = None
        self._pending_state: dict[str, Any] | None = None
        self._terms: dict[str, float] = {}  # the last rollout's reward terms (term_stats)

    @property
    def state_key(self) -> str:
        return "RolloutCallback"

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.sampler is None:
            prompts = load_prompts(
                self.spec.prompts,
                self.spec.split,
                self.spec.prompt_pool,
                pl_module.tokenizer,
                chat_template_kwargs=self.spec.chat_template_kwargs,
            )
            self.sampler = PromptSampler(prompts, self.seed, trainer.global_rank, trainer.world_size)
            if trainer.is_global_zero:
                log_clamps(self.spec, prompts, len(self.sampler.prompts), pl_module.tokenizer)
        if self._pending_state is not None:
            self.sampler.load_state_dict(self._pending_state)
            self._pending_state = None

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Steps 1-3: sample, score, fill (and the rollout's statistics, when it has its KL)."""
        buffer = pl_module.buffer
        if buffer.groups and buffer.consumed < buffer.num_minibatches():
            return  # resumed mid-rollout: finish replaying the restored buffer first
        prompts = self.sampler.draw(self.spec.num_prompts)
        noise = sampling_seed(self.seed, trainer.global_rank, buffer.rollouts)
        # the trainer's precision (autocast, bf16-true's default dtype) as in training_step, so
        # logp_old and the update's log-probs come from the same numeric path: ρ = 1 at first
        with seeded(noise, pl_module.device), trainer.precision_plugin.forward_context(), phase(trainer, "rollout"):
            groups = rollout(pl_module, prompts, self.kl.beta, self.spec, show_progress=shows_progress(trainer))
        buffer.fill(groups)
        terms = {name: torch.cat([g.reward_terms[name] for g in groups]) for name in groups[0].reward_terms}
        self._terms = term_stats(terms)  # each reward term, logged with the rollout's statistics
        if groups[0].kl is not None:  # else the update gives the KL (on-policy, step 4)
            stats = {**rollout_stats(*group_tensors(groups), self.kl.beta), **self._terms}
            if groups[0].sampler_logp is not None:
                stats["sampler_logp_gap"] = group_sampler_gap(groups)
            self._report(trainer, pl_module, stats)
        if self.spec.log_samples and trainer.is_global_zero:
            self._log_samples(trainer, pl_module, groups[: self.spec.log_samples])

    def _log_samples(self, trainer: L.Trainer, pl_module: L.LightningModule, groups: list[Group]) -> None:
        """The first response of each group to the console; all K to the loggers (``rollout/samples``)."""
        tok, index = pl_module.tokenizer, pl_module.buffer.rollouts
        rows = []
        for g in groups:
            prompt = decode(tok, g.prompt_ids)
            for i, response in enumerate(g.responses):
                rows.append(
                    {
                        "rollout": index,
                        "prompt": prompt,
                        "response": decode(tok, response),
                        "score": float(g.scores[i]),
                        "kl": None if g.kl is None else float(g.kl[i]),
                        "ended": bool(g.ended[i]),
                    }
                )
            rank_zero_info(
                f"[rollout {index}] {prompt!r} -> {rows[-len(g.responses)]['response']!r} (score {g.scores[0]:.3f})"
            )
        log_samples(trainer.loggers, "rollout/samples", rows, trainer.global_step)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Step 4's cursor, after the optimizer step (before any checkpoint of this step); after
        the rollout's last minibatch, step 5. ``outputs`` holds, on-policy, the statistics the
        update made of its rollout (``"rollout"``; absent when the update was skipped)."""
        buffer = pl_module.buffer
        buffer.consumed += 1
        stats = outputs.get("rollout") if isinstance(outputs, dict) else None
        if stats is not None:  # on-policy: what the update made of its rollout, logged after its step
            stats = self._report(trainer, pl_module, {**stats, **self._terms})
        elif buffer.groups[0].kl is None and self._terms:  # on-policy, the update skipped: the terms still
            self._report(trainer, pl_module, self._terms)
        if buffer.consumed < buffer.num_minibatches():
            return
        if stats is None and buffer.groups[0].kl is not None:  # off-policy: the rollout's own KL (step 3)
            kl = torch.cat([g.kl for g in buffer.groups]).mean()
            stats = self._mean_over_ranks(trainer, pl_module, {"kl_mean": kl})
        if stats is not None:  # None when the on-policy update was skipped: no KL, β stays
            self.kl.update(stats["kl_mean"], len(buffer.groups) * self.spec.num_responses * trainer.world_size)

    @staticmethod
    def _mean_over_ranks(trainer: L.Trainer, pl_module: L.LightningModule, stats: dict[str, Any]) -> dict[str, float]:
        """Means over ranks, in one collective (every rank calls it with the same keys)."""
        values = torch.tensor([float(v) for v in stats.values()], device=pl_module.device)
        return dict(zip(stats, trainer.strategy.reduce(values, reduce_op="mean").tolist()))

    def _report(self, trainer: L.Trainer, pl_module: L.LightningModule, stats: dict[str, Any]) -> dict[str, float]:
        """Log a rollout's statistics (this rank's, see :func:`rollout_stats`) as means over ranks."""
        stats = self._mean_over_ranks(trainer, pl_module, stats)
        pl_module.log_rollout(stats)
        return stats

    def state_dict(self) -> dict[str, Any]:
        """β, the sampler's position and every rank's RNG state (ranks draw different streams)."""
        rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
        return {
            "kl": self.kl.state_dict(),
            "sampler": self.sampler.state_dict() if self.sampler else None,
            "rng": gather_from_ranks(rng),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Lightning restores callbacks after ``setup``; the sampler may already exist."""
        self.kl.load_state_dict(state["kl"])  # earlier checkpoints' "stats_pending" is not needed
        if self.sampler is not None:
            self.sampler.load_state_dict(state["sampler"])
        else:
            self._pending_state = state["sampler"]
        rng = this_ranks(state["rng"], "RolloutCallback RNG state")
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])


def gather_from_ranks(value: Any) -> list[Any]:
    """Every rank's ``value`` in rank order (a collective: every rank must call it).

    Checkpoints are written from rank 0, but buffers and RNG streams differ by rank; each rank's
    share is saved so that a resumed multi-process run continues exactly.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [value]
    out: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, value)
    return out


def this_ranks(values: list[Any] | dict[str, Any], what: str) -> Any:
    """This rank's entry of a :func:`gather_from_ranks` list (a bare dict: a one-process checkpoint)."""
    if isinstance(values, dict):
        values = [values]
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if distributed else (0, 1)
    if len(values) != world:
        raise ValueError(
            f"checkpoint: the {what} was saved by {len(values)} process(es) but this run has {world}; "
            "resume with the same number of devices"
        )
    return values[rank]


def log_clamps(spec: RolloutSpec, prompts: list[str], rank_prompts: int, tokenizer: PreTrainedTokenizerBase) -> None:
    """Say once, with counts, where the run does less than the spec asks: minibatches capped
    at a rollout's groups, prompts repeated within a rollout, prompts cut to fit."""
    if spec.minibatch_groups > spec.num_prompts:
        log.warning(
            "rollout.minibatch_groups=%d is larger than the %d groups of a rollout (rollout.num_prompts per "
            "device): every minibatch holds all %d groups, so each rollout gives %d updates (rollout.update_epochs)",
            spec.minibatch_groups,
            spec.num_prompts,
            spec.num_prompts,
            spec.update_epochs,
        )
    if rank_prompts < spec.num_prompts:
        log.warning(
            "the prompt pool holds %d prompts per device (%d read from %s, rollout.prompt_pool=%s), fewer than "
            "rollout.num_prompts=%d: every rollout repeats prompts",
            rank_prompts,
            len(prompts),
            spec.prompts,
            spec.prompt_pool,
            spec.num_prompts,
        )
    stats = TruncationStats()
    for prompt in prompts:
        fit_prompt(encode_prompt(tokenizer, prompt), spec.max_prompt_tokens, tokenizer.bos_token_id, stats)
    if stats.truncated_prompts:
        log.warning(
            "rollout prompts: %s of the pool to fit rollout.max_prompt_tokens=%d",
            stats.describe(),
            spec.max_prompt_tokens,
        )


def rollout(
    stage: RolloutStage, prompts: list[str], beta: float, spec: RolloutSpec, show_progress: bool = False
) -> list[Group]:
    """Sample, score and log-prob K responses per prompt; return one :class:`Group` per prompt."""
    tok = stage.tokenizer
    k = spec.num_responses
    prompt_ids = [fit_prompt(encode_prompt(tok, p), spec.max_prompt_tokens, tok.bos_token_id) for p in prompts]
    repeated = [ids for ids in prompt_ids for _ in range(k)]  # group-major: K copies in a row
    sampled = sample_responses(
        stage.policy,
        tok,
        repeated,
        spec.sampling,
        spec.generation_batch_size,
        progress="rollout: generate" if show_progress else None,
    )
    examples, ended = sampled.examples, sampled.ended
    spec.require_sampler_logprobs(sampled.logprobs is not None)
    for e in examples:
        if not e.response_ids:  # generate() always emits at least one token; guard anyway
            raise RuntimeError("rollout: an empty response was sampled")

    deferred = spec.update_gives_logp_old
    temperature = spec.sampling.temperature
    logp_old = None
    if not deferred:  # in the update's first-pass minibatches: ρ = 1 exactly at its first step
        first_pass = stage.buffer.next_first_pass(len(prompts))
        logp_old = logp_old_in_update_layout(stage, examples, k, first_pass, temperature, show_progress)
    logp_ref, extras = reference_passes(stage, examples, spec.forward_batch_size, temperature, show_progress)
    n = spec.forward_batch_size
    chunks = tqdm(range(0, len(examples), n), desc="rollout: score", leave=False, disable=not show_progress)
    prompt_of = [p for p in prompts for _ in range(k)]  # the prompt set's row (its columns) for each response
    parts = [score_terms(stage.scorer, examples[i : i + n], ended[i : i + n], prompt_of[i : i + n]) for i in chunks]
    scores = torch.cat([total for total, _ in parts])
    terms = {name: torch.cat([t[name] for _, t in parts]) for name in parts[0][1]}
    if spec.missing_eos_penalty is not None:
        scores = scores - spec.missing_eos_penalty * (~torch.tensor(ended)).float()
    kl = rewards = None
    if not deferred:
        mask = pad_sequence([torch.ones(len(e.response_ids)) for e in examples], batch_first=True)
        old, ref = (pad_sequence(rows, batch_first=True) for rows in (logp_old, logp_ref))
        kl, rewards = sequence_kl_rewards(scores, old, ref, mask, beta)
    ended_t = torch.tensor(ended)

    def rows(values: Any, g: int) -> Any:
        return None if values is None or deferred else values[g * k : (g + 1) * k]

    return [
        Group(
            prompt_ids=prompt_ids[g],
            responses=[e.response_ids for e in examples[g * k : (g + 1) * k]],
            logp_old=rows(logp_old, g),
            logp_ref=logp_ref[g * k : (g + 1) * k],
            scores=scores[g * k : (g + 1) * k],
            kl=rows(kl, g),
            rewards=rows(rewards, g),
            ended=ended_t[g * k : (g + 1) * k],
            extras={name: values[g * k : (g + 1) * k] for name, values in extras.items()},
            reward_terms={name: values[g * k : (g + 1) * k] for name, values in terms.items()},
            sampler_logp=None if sampled.logprobs is None else sampled.logprobs[g * k : (g + 1) * k],
        )
        for g in range(len(prompts))
    ]


def group_tensors(groups: list[Group]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Scores, KL, r̃, response lengths and EOS flags of every response in ``groups``, flat,
    in the order :func:`rollout_stats` takes them."""

    def flat(name: str) -> Tensor:
        return torch.cat([getattr(g, name) for g in groups])

    lengths = torch.tensor([float(len(r)) for g in groups for r in g.responses])
    return flat("scores"), flat("kl"), flat("rewards"), lengths, flat("ended")


def group_sampler_gap(groups: list[Group]) -> float:
    """:func:`lit_p3o.losses.sampler_logp_gap` over every response token of ``groups``."""
    sampler, old = (torch.cat([t for g in groups for t in getattr(g, name)]) for name in ("sampler_logp", "logp_old"))
    return sampler_logp_gap(sampler, old, torch.ones_like(old)).item()


def rollout_stats(
    scores: Tensor, kl: Tensor, rewards: Tensor, lengths: Tensor, ended: Tensor, beta: float
) -> dict[str, float]:
    """Score, KL, r̃, length and EOS-rate summaries of a rollout's responses (this rank), and
    the β it was drawn with: from the rollout's groups (:func:`group_tensors`) or, on-policy,
    from the update's minibatch, which holds the whole rollout."""
    return {
        "score_mean": scores.mean().item(),
        "score_std": scores.std().item() if scores.numel() > 1 else 0.0,
        "kl_mean": kl.mean().item(),
        "reward_mean": rewards.mean().item(),
        "response_length": lengths.float().mean().item(),
        "eos_rate": ended.float().mean().item(),
        "beta": beta,
    }
