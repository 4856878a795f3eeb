"""What every RL stage shares: models, buffer, rollout wiring, the non-finite guard, saving.

A new algorithm subclasses :class:`RLStage` and implements :meth:`RLStage.compute_loss`
(calling one function of ``lit_p3o.losses``); the rollout, buffer, the update's one policy
forward and checkpointing are here.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import grad_norm
from torch import Tensor
from torch.utils.data import DataLoader

from lit_p3o.buffer import BufferDataset, ReplayBuffer, RolloutBatch
from lit_p3o.generation import response_logprobs_and_states
from lit_p3o.models import (
    FrozenReference,
    ModelSpec,
    as_spec,
    build_causal_lm,
    disable_dropout,
    load_tokenizer,
    save_pretrained,
)
from lit_p3o.optim import OptimizerSpec, configure_adamw
from lit_p3o.rollout import KLSpec, RolloutCallback, RolloutSpec
from lit_p3o.scoring import build_scorer

_NOT_CHECKPOINTED = ("reward_model.", "reference.")

# BufferDataset defines __len__ on purpose (progress bar, schedulers) and is only ever read
# by the main process (num_workers=0), which is the case Lightning's warning is not about.
warnings.filterwarnings("ignore", message="Your `IterableDataset` has `__len__` defined", category=UserWarning)


class RLStage(L.LightningModule):
    """Policy π_θ, frozen reference π_ref, frozen scorer r, and the replay buffer.

    ``reward_model`` is the directory of a saved reward model, or ``"embedded:<task>"`` to
    optimise an embedded task's gold reward directly. One Lightning epoch is one rollout
    followed by ``rollout.update_epochs`` passes over its buffer, so ``trainer.max_epochs``
    counts rollouts.
    """

    def __init__(
        self,
        policy: ModelSpec,
        reward_model: str,
        rollout: RolloutSpec | None = None,
        kl: KLSpec | None = None,
        optimizer: OptimizerSpec | None = None,
        save_dir: str | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.rollout_spec = rollout or RolloutSpec()
        self.kl_spec = kl or KLSpec()
        self.optimizer_spec = optimizer or OptimizerSpec()
        self.save_dir = save_dir
        self.seed = seed
        spec = as_spec(policy)
        self.tokenizer = load_tokenizer(spec)
        self.policy = disable_dropout(build_causal_lm(spec, self.tokenizer)).train()
        self.reference = FrozenReference(self.policy)
        self.scorer = build_scorer(reward_model, self.tokenizer)
        self.reward_model = getattr(self.scorer, "model", None)  # registered so it follows the device
        self.buffer = ReplayBuffer(self.rollout_spec.update_epochs, self.rollout_spec.minibatch_groups, seed)
        self.skipped_steps = 0
        self.strict_loading = False  # frozen models are rebuilt from their sources, not stored

    # ------------------------------------------------------------------ what subclasses define

    policy_states = False  # whether compute_loss needs the policy's last hidden states

    def compute_loss(self, batch: RolloutBatch, logp: Tensor, states: Tensor | None) -> tuple[Tensor, dict[str, Tensor]]:
        """The algorithm: a scalar loss and detached statistics to log, from the minibatch and
        the policy's per-token log-probs ``[N, R]`` (with gradient) and, when
        :attr:`policy_states`, its hidden states ``[N, R, H]``, both from one forward."""
        raise NotImplementedError

    def rollout_extras(self, batch: Any) -> dict[str, Tensor]:
        """Per-token tensors ``[B, R]`` to store with each response at rollout time."""
        return {}

    # ------------------------------------------------------------------ shared machinery

    def configure_callbacks(self) -> list[L.Callback]:
        return [RolloutCallback(self.rollout_spec, self.kl_spec, self.seed)]

    def train_dataloader(self) -> DataLoader:
        dataset = BufferDataset(self.buffer, self.tokenizer.pad_token_id, self.rollout_spec.num_prompts)
        # its own generator: creating the iterator must not consume the global RNG (resume equality)
        return DataLoader(dataset, batch_size=None, generator=torch.Generator().manual_seed(self.seed))

    def configure_optimizers(self) -> Any:
        return configure_adamw(self, self.optimizer_spec)

    def trajectory_logratio(self, batch: RolloutBatch, logp: Tensor) -> tuple[Tensor, Tensor]:
        """Per-token ``log π_θ − logp_old`` ``[N, R]`` (masked) and its per-response sum ``[G, K]``."""
        token_logratio = (logp - batch.logp_old) * batch.response_mask
        return token_logratio, token_logratio.sum(-1).view_as(batch.rewards)

    def ratio_stats(self, token_logratio: Tensor, logratio: Tensor, mask: Tensor) -> dict[str, Tensor]:
        """Trajectory ratio mean/max and the k3 estimate of KL(old ‖ θ) per token."""
        ratio = logratio.detach().exp()
        r = token_logratio.detach()
        approx_kl = ((r.exp() - 1 - r) * mask).sum() / mask.sum().clamp(min=1)
        return {"ratio_mean": ratio.mean(), "ratio_max": ratio.max(), "approx_kl": approx_kl}

    def policy_forward(self, batch: RolloutBatch) -> tuple[RolloutBatch, Tensor, Tensor | None]:
        """The update's one policy forward; on-policy it also completes the pending minibatch
        (``logp_old`` = this forward detached, so ρ = 1 exactly; see ``RolloutSpec.defer_logp_old``)."""
        logp, states = response_logprobs_and_states(self.policy, batch.batch, with_states=self.policy_states)
        if batch.logp_old is None:
            batch = batch.complete_on_policy(logp, self.buffer.beta)
        return batch, logp, states

    def loss(self, batch: RolloutBatch) -> tuple[Tensor, dict[str, Tensor]]:
        """:meth:`compute_loss` of a minibatch, forward included (no guard, no logging)."""
        return self.compute_loss(*self.policy_forward(batch))

    def training_step(self, batch: RolloutBatch, batch_idx: int) -> Tensor | None:
        self.buffer.consumed += 1
        batch, logp, states = self.policy_forward(batch)
        if not self._finite_everywhere(batch.rewards):
            return self._skip("non-finite reward in the minibatch")
        loss, stats = self.compute_loss(batch, logp, states)
        if not self._finite_everywhere(loss):
            return self._skip("non-finite loss")
        n = batch.rewards.numel()
        self.log("train/loss", loss, prog_bar=True, batch_size=n, sync_dist=True)
        self.log_dict({f"train/{k}": v for k, v in stats.items()}, batch_size=n, sync_dist=True)
        return loss

    def _finite_everywhere(self, value: Tensor) -> bool:
        """All ranks agree, so they skip (or not) together and DDP never waits on a missing backward."""
        bad = torch.tensor(float(not torch.isfinite(value).all()), device=self.device)
        return float(self.trainer.strategy.reduce(bad, reduce_op="sum")) == 0

    def _skip(self, why: str) -> None:
        """Returning None skips backward and the optimizer step: the weights do not change."""
        self.skipped_steps += 1
        self.log("train/skipped_steps", float(self.skipped_steps), batch_size=1)
        self.print(f"[lit-p3o] skipped an update ({why}); {self.skipped_steps} so far")
        return None

    def log_rollout(self, stats: dict[str, float]) -> None:
        self.log_dict({f"rollout/{k}": v for k, v in stats.items()}, sync_dist=True, batch_size=1)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        norms = grad_norm(self.policy, norm_type=2)
        if norms:  # empty when the step was skipped (no gradients)
            self.log("train/grad_norm", norms["grad_2.0_norm_total"], batch_size=1)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith(_NOT_CHECKPOINTED)]:
            del state[key]
        checkpoint["replay_buffer"] = self.buffer.state_dict()
        checkpoint["skipped_steps"] = self.skipped_steps

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.buffer.load_state_dict(checkpoint["replay_buffer"])
        self.skipped_steps = checkpoint["skipped_steps"]

    def on_train_end(self) -> None:
        if self.save_dir is not None and self.trainer.is_global_zero:
            path = save_pretrained(self.policy, self.tokenizer, self.save_dir)
            print(f"[lit-p3o] saved the policy to {Path(path).resolve()}")
