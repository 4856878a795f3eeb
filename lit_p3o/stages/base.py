"""What every RL stage shares: models, buffer, rollout wiring, the non-finite and no-gradient
guards, the end-of-run summary, saving, and the held-out evaluation behind ``validate``,
``test`` and ``predict``.

A new algorithm subclasses :class:`RLStage` and implements :meth:`RLStage.compute_loss`
(calling one function of ``lit_p3o.losses``); the rollout, buffer, the update's one policy
forward and checkpointing are here.
"""

from __future__ import annotations

import inspect
import warnings
from collections import Counter
from contextlib import ExitStack
from dataclasses import is_dataclass
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.parsing import collect_init_args
from torch import Tensor
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from lit_p3o.buffer import BufferDataset, BufferLoader, ReplayBuffer, RolloutBatch
from lit_p3o.data.prompts import load_prompts
from lit_p3o.evaluation import CompletionWriter, EvaluationSpec, evaluate_examples, sample_completions
from lit_p3o.generation import check_fits_context, response_logprobs_and_states, seeded
from lit_p3o.guards import GradientGuard, GuardSpec, TooManySkippedError, UpdateLedger
from lit_p3o.losses import sampler_logp_gap, truncated_importance_weights
from lit_p3o.models import (
    FrozenReference,
    ModelSource,
    as_spec,
    build_causal_lm,
    disable_dropout,
    load_tokenizer,
    python_objects,
)
from lit_p3o.monitoring import log_point
from lit_p3o.optim import OptimizerSpec, configure_adamw
from lit_p3o.rollout import (
    KLController,
    KLSpec,
    RolloutCallback,
    RolloutSpec,
    gather_from_ranks,
    rollout_stats,
    this_ranks,
)
from lit_p3o.scoring import RewardSource, build_scorer
from lit_p3o.stages.objects import keep_config_only
from lit_p3o.stages.sharding import ShardableModule
from lit_p3o.tasks import resolve_embedded

_NOT_CHECKPOINTED = ("reward_model.", "reference.")
# statistics of the ratio π_θ / π_old: constant on an on-policy minibatch (ρ = 1, nothing clipped)
_RATIO_STATS = ("ratio_mean", "ratio_max", "approx_kl", "clip_fraction")

# Lightning warnings that do not apply to an RL stage, silenced from its setup to its teardown
# only (RLStage.setup): BufferDataset defines __len__ on purpose (progress bar, schedulers) and is
# only ever read by the main process (num_workers=0), which is the case Lightning's warning is not
# about; and RL stages return no validation loader during `fit` unless `evaluation` is set.
_INAPPLICABLE_WARNINGS = (
    "Your `IterableDataset` has `__len__` defined",
    "Total length of `list` across ranks is zero",
)


def close_finished_epoch(checkpoint: dict[str, Any]) -> None:
    """Record a checkpoint taken on an epoch's last update as one taken at the epoch's end.

    Lightning resumes a checkpoint written in ``on_train_batch_end`` of an epoch's last batch
    (``ModelCheckpoint(every_n_train_steps=…)``) by counting that epoch as done but then runs the
    next epoch as a restarted one, without ``on_train_epoch_start``: an RL stage would replay
    its spent buffer (no batch) instead of drawing the next rollout, and skip a rollout. The
    buffer says the rollout is spent, so the loops' counters are moved to where the epoch's end
    leaves them (what an ``on_train_epoch_end`` checkpoint holds), which Lightning resumes by
    starting the next epoch with its hooks.
    """
    loop = checkpoint.get("loops", {}).get("fit_loop")
    if loop is None:
        return
    epochs, batches = loop["epoch_progress"], loop["epoch_loop.batch_progress"]
    total = batches["total"]
    saved_on_batch_end = total["ready"] == total["started"] == total["processed"] == total["completed"] + 1
    inside_epoch = epochs["total"]["started"] == epochs["total"]["processed"] + 1
    if not (saved_on_batch_end and inside_epoch):
        return
    for progress in (epochs["total"], epochs["current"]):
        progress["processed"] += 1
    for progress in (batches["total"], batches["current"]):
        progress["completed"] += 1
    loop["epoch_loop.state_dict"]["_batches_that_stepped"] = (
        loop["epoch_loop.state_dict"].get("_batches_that_stepped", 0) + 1
    )


class RLStage(ShardableModule):
    """Policy π_θ, frozen reference π_ref, frozen scorer r, and the replay buffer.

    ``reward_model`` is the directory of a saved reward model, ``"embedded:<task>"`` to
    optimise an embedded task's gold reward directly, a Python reward function
    ``"package.module:function"`` (TRL's ``reward_funcs`` convention, see
    :class:`lit_p3o.scoring.FunctionScorer`), or a list of weighted such sources
    (:class:`lit_p3o.scoring.RewardSpec`), whose weighted sum is the reward; from Python also the
    function itself. ``policy`` is a :class:`ModelSpec` or, from Python, a ready model, whose
    tokenizer is then ``tokenizer``. One Lightning epoch is one rollout
    followed by ``rollout.update_epochs`` passes over its buffer, so ``trainer.max_epochs``
    counts rollouts.

    ``validate`` and ``test`` sample one response per held-out prompt of ``evaluation`` and
    log ``val/*`` or ``test/*``: ``kl`` (sequence KL to π_ref), ``score`` (the reward model),
    ``gold`` (with an embedded task's prompts), ``response_length`` and ``eos_rate``.
    ``predict`` writes completions for ``evaluation.predict_prompts``. During ``fit`` the
    validation runs only when ``evaluation`` is given (then after every rollout, or as
    ``trainer.check_val_every_n_epoch`` says), so ``ModelCheckpoint(monitor="val/gold")`` works.
    """

    def __init__(
        self,
        policy: ModelSource,
        reward_model: RewardSource,
        *,
        rollout: RolloutSpec | None = None,
        kl: KLSpec | None = None,
        optimizer: OptimizerSpec | None = None,
        save_dir: str | None = None,
        seed: int = 0,
        guards: GuardSpec | None = None,
        evaluation: EvaluationSpec | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
    ) -> None:
        """The arguments every RL stage shares, keyword-only: a stage declares its own and
        passes these on as ``**shared`` (the CLI follows ``**shared`` to this signature)."""
        super().__init__()
        # the stage's constructor arguments (its own and these) given as Python objects (a ready
        # model, a reward function) are left out of the hyperparameters; specs are config
        given: dict[str, Any] = {}
        for arguments in collect_init_args(inspect.currentframe(), [], classes=(RLStage,)):
            given.update({name: value for name, value in arguments.items() if not is_dataclass(value)})
        self.save_hyperparameters(ignore=python_objects(**given))
        keep_config_only(self)  # e.g. a Dataset as rollout.prompts: noted, not pickled into checkpoints
        self.evaluation_spec = evaluation or EvaluationSpec()
        self.validate_during_fit = evaluation is not None
        self.rollout_spec = rollout or RolloutSpec()
        self.kl_spec = kl or KLSpec()
        self.kl_controller = KLController(self.kl_spec)  # β: read by rollout and update, moved by the callback
        self.optimizer_spec = optimizer or OptimizerSpec()
        self.save_dir = save_dir
        self.seed = seed
        self._warning_scope: ExitStack | None = None  # see setup
        self.guard_spec = guards or GuardSpec()
        self.policy_spec = as_spec(policy)
        self.tokenizer = load_tokenizer(self.policy_spec, tokenizer, f"{type(self).__name__}.policy")
        self.policy = disable_dropout(build_causal_lm(self.policy_spec, self.tokenizer)).train()
        self._check_context(evaluation)
        self.reference = FrozenReference(self.policy)
        self.scorer = build_scorer(reward_model, self.tokenizer)
        self.reward_model = getattr(self.scorer, "model", None)  # registered so it follows the device
        self.buffer = ReplayBuffer(self.rollout_spec.update_epochs, self.rollout_spec.minibatch_groups, seed)
        self.updates = UpdateLedger()
        self._tied_streak = 0  # consecutive updates whose every group scored its responses alike
        self.fully_clipped = False  # every ratio of the last minibatch clipped: a flat loss (GradientGuard)
        self.strict_loading = False  # frozen models are rebuilt from their sources, not stored

    def _check_context(self, evaluation: EvaluationSpec | None) -> None:
        """Prompt plus response budgets within the policy's context, checked before anything is
        sampled (``evaluation`` only when given: its defaults serve validate/test on request)."""
        rollout = self.rollout_spec
        check_fits_context(
            self.policy,
            self.tokenizer,
            "RolloutSpec",
            rollout.max_prompt_tokens,
            "RolloutSpec.sampling",
            rollout.sampling.max_new_tokens,
        )
        if evaluation is not None:
            check_fits_context(
                self.policy,
                self.tokenizer,
                "EvaluationSpec",
                evaluation.max_prompt_tokens,
                "EvaluationSpec.sampling",
                evaluation.sampling.max_new_tokens,
            )

    # ------------------------------------------------------------------ what subclasses define

    policy_states = False  # whether compute_loss needs the policy's last hidden states

    def compute_loss(
        self, batch: RolloutBatch, logp: Tensor, states: Tensor | None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The algorithm: a scalar loss and detached statistics to log, from the minibatch and
        the policy's per-token log-probs ``[N, R]`` (with gradient) and, when
        :attr:`policy_states`, its hidden states ``[N, R, H]``, both from one forward."""
        raise NotImplementedError

    def rollout_extras(self, batch: Any) -> dict[str, Tensor]:
        """Per-token tensors ``[B, R]`` to store with each response at rollout time."""
        return {}

    # ------------------------------------------------------------------ shared machinery

    def configure_callbacks(self) -> list[L.Callback]:
        if self.trainer.state.fn == TrainerFn.PREDICTING:
            return [CompletionWriter(self.evaluation_spec.predictions_file)]
        if self.trainer.state.fn == TrainerFn.FITTING:
            return [
                RolloutCallback(self.rollout_spec, self.kl_controller, self.seed),
                GradientGuard(self.guard_spec.max_zero_grad_steps),
            ]
        return []

    def setup(self, stage: str) -> None:
        """Silence :data:`_INAPPLICABLE_WARNINGS` until :meth:`teardown`, for this run only: the
        process's warning filters are restored then."""
        super().setup(stage)
        self._close_warning_scope()  # one left open by a run that did not tear down
        self._warning_scope = ExitStack()
        self._warning_scope.enter_context(warnings.catch_warnings())
        for message in _INAPPLICABLE_WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=UserWarning)

    def teardown(self, stage: str) -> None:
        self._close_warning_scope()

    def _close_warning_scope(self) -> None:
        if self._warning_scope is not None:
            self._warning_scope.close()
            self._warning_scope = None

    def train_dataloader(self) -> DataLoader:
        dataset = BufferDataset(self.buffer, self.tokenizer.pad_token_id, self.rollout_spec.num_prompts)
        # its own generator: creating the iterator must not consume the global RNG (resume equality)
        return BufferLoader(dataset, batch_size=None, generator=torch.Generator().manual_seed(self.seed))

    def configure_optimizers(self) -> Any:
        return configure_adamw(self, self.optimizer_spec)

    @property
    def temperature(self) -> float:
        """The sampling temperature: the update scores responses as the rollout sampled them."""
        return self.rollout_spec.sampling.temperature

    # ------------------------------------------------------------------ held-out evaluation

    def val_dataloader(self) -> DataLoader | list:
        if self.trainer.state.fn == TrainerFn.FITTING and not self.validate_during_fit:
            return []  # no validation loop in `fit` unless asked for
        return self._prompt_loader(self.evaluation_spec.prompts)

    def test_dataloader(self) -> DataLoader:
        return self._prompt_loader(self.evaluation_spec.prompts)

    def predict_dataloader(self) -> DataLoader:
        return self._prompt_loader(self.evaluation_spec.predict_prompts or self.evaluation_spec.prompts)

    def _prompt_loader(self, source: str | list[str]) -> DataLoader:
        spec = self.evaluation_spec
        prompts = load_prompts(
            source,
            spec.split,
            spec.num_prompts,
            tokenizer=self.tokenizer,
            chat_template_kwargs=self.rollout_spec.chat_template_kwargs,  # rendered as the rollout's
        )
        return DataLoader(prompts, batch_size=spec.batch_size, shuffle=False, collate_fn=list)

    def _evaluation_seed(self, batch_idx: int) -> int:
        """Distinct per batch and rank, the same on every run."""
        return self.evaluation_spec.seed + batch_idx * self.trainer.world_size + self.global_rank

    def _evaluate_prompts(self, prompts: list[str], batch_idx: int, prefix: str) -> None:
        spec = self.evaluation_spec
        with seeded(self._evaluation_seed(batch_idx), self.device):
            values = evaluate_examples(
                self.policy,
                self.reference,
                self.tokenizer,
                self.scorer,
                prompts,
                spec.sampling,
                spec.max_prompt_tokens,
                resolve_embedded(spec.prompts),
                spec.batch_size,
            )
        means = {f"{prefix}/{name}": v.mean().to(self.device) for name, v in values.items()}
        self.log_dict(means, batch_size=len(prompts), sync_dist=True, prog_bar=False)

    def validation_step(self, prompts: list[str], batch_idx: int) -> None:
        self._evaluate_prompts(prompts, batch_idx, "val")

    def test_step(self, prompts: list[str], batch_idx: int) -> None:
        self._evaluate_prompts(prompts, batch_idx, "test")

    def predict_step(self, prompts: list[str], batch_idx: int) -> list[dict[str, Any]]:
        """One sampled completion per prompt: ``{"prompt", "response", "ended"}``."""
        spec = self.evaluation_spec
        with seeded(self._evaluation_seed(batch_idx), self.device):
            out = sample_completions(
                self.policy, self.tokenizer, prompts, spec.sampling, spec.max_prompt_tokens, spec.batch_size
            )
        return [{"prompt": p, "response": r, "ended": e} for p, r, e in zip(out.prompts, out.responses, out.ended)]

    def trajectory_logratio(self, batch: RolloutBatch, logp: Tensor) -> tuple[Tensor, Tensor]:
        """Per-token ``log π_θ − logp_old`` ``[N, R]`` (masked) and its per-response sum ``[G, K]``."""
        token_logratio = (logp - batch.logp_old) * batch.response_mask
        return token_logratio, token_logratio.sum(-1).view_as(batch.rewards)

    def importance_weights(self, batch: RolloutBatch, level: Literal["token", "sequence", "group"]) -> Tensor | None:
        """Truncated importance weights for the sampler–trainer gap at the level of the stage's
        ratio (:func:`lit_p3o.losses.truncated_importance_weights`): ``[N, R]`` per token,
        ``[G, K]`` per response, ``[G]`` per group; None unless ``RolloutSpec.importance_sampling_cap``."""
        spec = self.rollout_spec
        if spec.importance_sampling_cap is None:
            return None
        spec.require_sampler_logprobs(batch.sampler_logp is not None)
        mask = batch.response_mask
        log_ratio = (batch.logp_old - batch.sampler_logp) * mask
        if level == "token":  # zero on padding, as every per-token tensor
            return truncated_importance_weights(log_ratio, spec.importance_sampling_cap) * mask
        log_ratio = log_ratio.sum(-1).view_as(batch.scores)
        if level == "group":
            log_ratio = log_ratio.sum(-1)
        return truncated_importance_weights(log_ratio, spec.importance_sampling_cap)

    def ratio_stats(self, token_logratio: Tensor, logratio: Tensor, mask: Tensor) -> dict[str, Tensor]:
        """Trajectory ratio mean/max and the k3 estimate of KL(old ‖ θ) per token."""
        ratio = logratio.detach().exp()
        r = token_logratio.detach()
        approx_kl = ((r.exp() - 1 - r) * mask).sum() / mask.sum().clamp(min=1)
        return {"ratio_mean": ratio.mean(), "ratio_max": ratio.max(), "approx_kl": approx_kl}

    def policy_forward(self, batch: RolloutBatch) -> tuple[RolloutBatch, Tensor, Tensor | None]:
        """The update's one policy forward; on-policy, when the rollout left ``logp_old`` to it,
        it also gives the minibatch ``logp_old`` (this forward detached, so ρ = 1 exactly; see
        ``RolloutSpec.defer_logp_old``), the KL and r̃, in a new batch (the buffer is not written)."""
        logp, states = response_logprobs_and_states(
            self.policy, batch.batch, with_states=self.policy_states, temperature=self.temperature
        )
        if batch.logp_old is None:
            batch = batch.with_logp_old(logp.detach(), self.kl_controller.beta)
        return batch, logp, states

    def loss(self, batch: RolloutBatch) -> tuple[Tensor, dict[str, Tensor]]:
        """:meth:`compute_loss` of a minibatch, forward included (no guard, no logging)."""
        return self.compute_loss(*self.policy_forward(batch))

    def training_step(self, batch: RolloutBatch, batch_idx: int) -> Tensor | dict[str, Any] | None:
        """Step 4 of an iteration (see :mod:`lit_p3o.rollout`): one minibatch's loss. On-policy,
        when this forward gives ``logp_old`` (ρ = 1 exactly), the minibatch is the whole rollout
        and its statistics go out with the loss (``"rollout"``), to be logged after this step."""
        on_policy = batch.logp_old is None
        batch, logp, states = self.policy_forward(batch)
        if not self._finite_everywhere(batch.rewards):
            return self._skip("non-finite reward in the minibatch")
        loss, stats = self.compute_loss(batch, logp, states)
        if not self._finite_everywhere(loss):
            return self._skip("non-finite loss")
        self.updates.applied += 1
        self._tied_streak = self._tied_streak + 1 if bool((batch.rewards == batch.rewards[:, :1]).all()) else 0
        self.fully_clipped = bool(stats.get("clip_fraction", 0.0) == 1)
        n = batch.rewards.numel()
        if on_policy:  # ratio statistics would be constants; each self.log costs ~0.3-0.7 ms on CPU
            stats = {k: v for k, v in stats.items() if k not in _RATIO_STATS}
        self.log("train/loss", loss, prog_bar=True, batch_size=n, sync_dist=True)
        self.log_dict({f"train/{k}": v for k, v in stats.items()}, batch_size=n, sync_dist=True)
        if on_policy:
            per_response = (t.flatten() for t in (batch.scores, batch.kl, batch.rewards))
            lengths, ended, beta = batch.response_mask.sum(-1), batch.ended.flatten(), self.kl_controller.beta
            rollout = rollout_stats(*per_response, lengths, ended, beta)
            if batch.sampler_logp is not None:
                rollout["sampler_logp_gap"] = sampler_logp_gap(batch.sampler_logp, batch.logp_old, batch.response_mask)
            return {"loss": loss, "rollout": rollout}
        return loss

    def _finite_everywhere(self, value: Tensor) -> bool:
        """All ranks agree, so they skip (or not) together and DDP never waits on a missing backward."""
        bad = torch.tensor(float(not torch.isfinite(value).all()), device=self.device)
        return float(self.trainer.strategy.reduce(bad, reduce_op="sum")) == 0

    @property
    def skipped_steps(self) -> int:
        """Updates skipped so far in this run (all reasons)."""
        return self.updates.skipped_total

    def _skip(self, why: str) -> None:
        """Returning None skips backward and the optimizer step: the weights do not change.

        Stops the run as soon as the skipped share of its planned updates exceeds
        ``GuardSpec.max_skipped_fraction`` (all ranks skip together, so they stop together)."""
        self.updates.skipped[why] += 1
        self.log("train/skipped_steps", float(self.skipped_steps), batch_size=1)
        self.print(f"[lit-p3o] skipped an update ({why}); {self.skipped_steps} so far")
        planned = self.trainer.estimated_stepping_batches * self.trainer.accumulate_grad_batches
        if self.updates.too_many_skipped(self.guard_spec.max_skipped_fraction, planned):
            raise self._too_many_skipped(f"of the {planned:.0f} planned updates")
        return None

    def _too_many_skipped(self, of_what: str) -> TooManySkippedError:
        return TooManySkippedError(
            f"[lit-p3o] {self.skipped_steps} {of_what} were skipped, more than "
            f"model.init_args.guards.max_skipped_fraction = {self.guard_spec.max_skipped_fraction} allows "
            f"({self.updates.summary()}); the policy is not saved. Non-finite rewards come from the "
            f"reward model ({self.hparams.get('reward_model', 'a Python function')}), non-finite losses from the update "
            "(learning rate, precision)."
        )

    def zero_gradient_hint(self) -> str:
        """Which cause of exactly-zero gradients the last minibatches point to (for :class:`GradientGuard`)."""
        if self._tied_streak >= self.guard_spec.max_zero_grad_steps:
            return (
                f"Here: in the last {self._tied_streak} minibatches all responses to each prompt got the "
                "same reward, so there was nothing to learn from."
            )
        return "Here: the rewards of a prompt's responses differed, so the loss does not reach the weights."

    def log_rollout(self, stats: dict[str, float]) -> None:
        """One point per rollout, at the step it was drawn (on-policy: after its update)."""
        log_point(self.trainer, {f"rollout/{k}": v for k, v in stats.items()})

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        grads = [p.grad for p in self.policy.parameters() if p.grad is not None]
        if grads:  # empty when the step was skipped (no gradients)
            total = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
            if isinstance(total, DTensor):  # FSDP2: each rank holds the norm of its shards
                total = total.full_tensor()
            self.log("train/grad_norm", total, batch_size=1)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint["state_dict"]
        # a distributed (sharded) checkpoint must hold every key to load, so frozen copies stay in it
        if not any(isinstance(v, DTensor) for v in state.values()):
            for key in [k for k in state if k.startswith(_NOT_CHECKPOINTED)]:
                del state[key]
        checkpoint["replay_buffer"] = gather_from_ranks(self.buffer.state_dict())  # each rank's groups
        checkpoint["updates"] = self.updates.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        buffer_state = this_ranks(checkpoint["replay_buffer"], "replay buffer")
        self.buffer.load_state_dict(buffer_state)
        if self.buffer.groups and self.buffer.consumed >= self.buffer.num_minibatches():
            close_finished_epoch(checkpoint)
        elif "beta" in buffer_state and "RolloutCallback" in checkpoint.get("callbacks", {}):
            # written before 2026-12-07, inside a rollout's replay: its β had already moved; the
            # rollout's own (which the rest of the replay uses and step 5 moves) is the buffer's
            checkpoint["callbacks"]["RolloutCallback"]["kl"]["beta"] = buffer_state["beta"]
        if "updates" in checkpoint:
            self.updates.load_state_dict(checkpoint["updates"])
        else:  # written before the ledger: a count of skips, and a global step that includes them
            skipped = checkpoint["skipped_steps"]
            self.updates = UpdateLedger(checkpoint["global_step"] - skipped, Counter({"before resume": skipped}))

    def on_train_end(self) -> None:
        """Summarise the run's updates, refuse to save a policy that skipped too many, then save
        (gathered on rank 0 when sharded)."""
        self.print(f"[lit-p3o] {type(self).__name__}: {self.updates.summary()}")
        if self.updates.too_many_skipped(
            self.guard_spec.max_skipped_fraction, self.updates.applied + self.skipped_steps
        ):
            raise self._too_many_skipped(f"of the {self.updates.applied + self.skipped_steps} updates run")
        if self.updates.applied == 0:
            self.print("[lit-p3o] no update was applied: the policy is the one the run started from")
        if self.save_dir is None:
            return
        rebuild = lambda: build_causal_lm(self.policy_spec, self.tokenizer)  # noqa: E731
        path = self.export_pretrained(self.policy, rebuild, self.tokenizer, self.save_dir)
        if path is not None:
            print(f"[lit-p3o] saved the policy to {Path(path).resolve()}")
