"""Reward modelling: a Bradley–Terry scalar head on pairwise preferences (ALGORITHMS.md §2).

The model is ``AutoModelForSequenceClassification`` with one label, usually initialised from
the SFT policy: it is the standard HF shape for reward models (plain transformers can load
and run it), and the backbone starts from a network that already reads the task's language.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from torchmetrics import MeanMetric
from transformers import PreTrainedTokenizerBase

from lit_p3o.data.encoding import Batch
from lit_p3o.data.preferences import PairBatch
from lit_p3o.guards import GradientGuard, GuardSpec
from lit_p3o.losses import bradley_terry_loss
from lit_p3o.models import ModelSource, as_spec, build_reward_model, load_tokenizer, python_objects
from lit_p3o.optim import OptimizerSpec, configure_adamw
from lit_p3o.scoring import reward_scores
from lit_p3o.stages.sharding import ShardableModule


class RewardModule(ShardableModule):
    """Trains ``r(x, y)`` so that ``σ(r(x, y_w) − r(x, y_l))`` is the preference probability.

    A :class:`PairBatch` names each pair's chosen and rejected rows (one forward for all; a plain
    :class:`Batch` holds chosen rows first, then rejected rows), and each pair's
    ``margin`` (TRL's column; 0 without one) enters the loss as ``−log σ(r_w − r_l − m)``. Logs loss,
    accuracy (share of pairs with ``r_w > r_l``) and mean margin ``r_w − r_l``; where the labels
    were drawn with known probabilities (the embedded task), also ``expected_accuracy``, the
    accuracy's mean over the label draw, which compares with the Bayes ceiling without the
    draw's noise. At the end of
    ``fit`` the model is written to ``save_dir`` for :class:`lit_p3o.RewardScorer`. ``model`` is a
    :class:`ModelSpec` or, from Python, a ready sequence-classification model with its ``tokenizer``.
    """

    def __init__(
        self,
        model: ModelSource,
        optimizer: OptimizerSpec | None = None,
        center_coef: float = 0.0,
        save_dir: str | None = None,
        guards: GuardSpec | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
    ) -> None:
        super().__init__()
        if center_coef < 0:
            raise ValueError(f"RewardModule.center_coef: must be >= 0, got {center_coef}")
        self.save_hyperparameters(ignore=python_objects(model=model, tokenizer=tokenizer))
        self.model_spec = as_spec(model)
        self.optimizer_spec = optimizer or OptimizerSpec()
        self.center_coef = center_coef
        self.save_dir = save_dir
        self.guard_spec = guards or GuardSpec()
        self.tokenizer = load_tokenizer(self.model_spec, tokenizer, "RewardModule.model")
        self.reward_model = build_reward_model(self.model_spec, self.tokenizer, new_head_expected=True)
        self.metrics = torch.nn.ModuleDict(
            {
                f"{split}_{name}": MeanMetric()
                for split in ("train", "val")
                for name in ("accuracy", "expected_accuracy", "margin")
            }
        )

    def _step(self, batch: Batch, split: str) -> torch.Tensor:
        scores = reward_scores(self.reward_model, batch)
        chosen, rejected = batch.pair_scores(scores) if isinstance(batch, PairBatch) else scores.chunk(2)
        loss = bradley_terry_loss(chosen, rejected, self.center_coef, getattr(batch, "margin", None))
        margin = (chosen - rejected).detach()
        self.metrics[f"{split}_accuracy"]((margin > 0).float())
        self.metrics[f"{split}_margin"](margin)
        names = ["accuracy", "margin"]
        preference = getattr(batch, "preference", None)
        if preference is not None:  # P(chosen wins): ranking the pair as the model does is right this often
            self.metrics[f"{split}_expected_accuracy"](torch.where(margin > 0, preference, 1.0 - preference))
            names.append("expected_accuracy")
        n = chosen.shape[0]
        self.log(f"{split}/loss", loss, prog_bar=True, batch_size=n, sync_dist=split == "val")
        for name in names:
            self.log(f"{split}/{name}", self.metrics[f"{split}_{name}"], prog_bar=name == "accuracy", batch_size=n)
        return loss

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self._step(batch, "val")

    def configure_optimizers(self) -> Any:
        return configure_adamw(self, self.optimizer_spec)

    def configure_callbacks(self) -> list[L.Callback]:
        return [GradientGuard(self.guard_spec.max_zero_grad_steps)]

    def on_train_end(self) -> None:
        path = None
        if self.save_dir is not None:
            rebuild = lambda: build_reward_model(self.model_spec, self.tokenizer, new_head_expected=True)  # noqa: E731
            path = self.export_pretrained(self.reward_model, rebuild, self.tokenizer, self.save_dir)
        if not self.trainer.is_global_zero:
            return
        metrics = self.trainer.callback_metrics
        accuracy, expected = metrics.get("val/accuracy"), metrics.get("val/expected_accuracy")
        ceiling = getattr(self.trainer.datamodule, "label_accuracy_ceiling", None)
        if accuracy is not None:
            line = f"[lit-p3o] reward model held-out accuracy {float(accuracy):.1%}"
            notes = [] if expected is None else [f"expected over the label draw: {float(expected):.1%}"]
            if ceiling is not None:
                notes.append(f"Bayes-optimal for these noisy labels: {ceiling:.1%}")
            print(line + (f" ({'; '.join(notes)})" if notes else ""))
        if path is not None:
            print(f"[lit-p3o] saved the reward model to {Path(path).resolve()}")
