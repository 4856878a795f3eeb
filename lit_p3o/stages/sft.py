"""Supervised fine-tuning: prompt-masked cross-entropy (ALGORITHMS.md §1)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from torchmetrics import MeanMetric
from transformers import PreTrainedTokenizerBase

from lit_p3o.data.encoding import Batch
from lit_p3o.guards import GradientGuard, GuardSpec
from lit_p3o.losses import sft_loss
from lit_p3o.models import ModelSource, as_spec, build_causal_lm, load_tokenizer, python_objects
from lit_p3o.optim import OptimizerSpec, configure_adamw
from lit_p3o.stages.sharding import ShardableModule


class SFTModule(ShardableModule):
    """Fine-tunes a causal LM on (prompt, completion) pairs; the loss sees completions only.

    At the end of ``fit`` the model (or its LoRA adapters) and tokenizer are written to
    ``save_dir`` with ``save_pretrained``, so the next stage's ``name_or_path`` can point there.
    ``model`` is a :class:`ModelSpec` or, from Python, a ready model with its ``tokenizer``.
    """

    def __init__(
        self,
        model: ModelSource,
        optimizer: OptimizerSpec | None = None,
        save_dir: str | None = None,
        guards: GuardSpec | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=python_objects(model=model, tokenizer=tokenizer))
        self.model_spec = as_spec(model)
        self.optimizer_spec = optimizer or OptimizerSpec()
        self.save_dir = save_dir
        self.guard_spec = guards or GuardSpec()
        self.tokenizer = load_tokenizer(self.model_spec, tokenizer, "SFTModule.model")
        self.policy = build_causal_lm(self.model_spec, self.tokenizer)
        self.val_loss = MeanMetric()

    def _loss(self, batch: Batch) -> torch.Tensor:
        logits = self.policy(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
            use_cache=False,
        ).logits
        return sft_loss(logits, batch.labels())

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch.input_ids.shape[0])
        return loss

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        # weight by response tokens so the epoch value is the per-token loss of the whole set
        self.val_loss.update(self._loss(batch), weight=batch.response_mask[:, 1:].sum())

    def on_validation_epoch_end(self) -> None:
        loss = self.val_loss.compute()
        self.val_loss.reset()
        self.log_dict({"val/loss": loss, "val/perplexity": torch.exp(loss)}, prog_bar=True, sync_dist=False)

    def configure_optimizers(self) -> Any:
        return configure_adamw(self, self.optimizer_spec)

    def configure_callbacks(self) -> list[L.Callback]:
        return [GradientGuard(self.guard_spec.max_zero_grad_steps)]

    def on_train_start(self) -> None:
        """``data/truncated_responses``: completions the data module cut to fit ``max_length``."""
        truncation = getattr(self.trainer.datamodule, "truncation", None)
        if truncation is not None:
            self.log("data/truncated_responses", float(truncation.truncated_responses), sync_dist=False)

    def on_train_end(self) -> None:
        if self.save_dir is None:
            return
        rebuild = lambda: build_causal_lm(self.model_spec, self.tokenizer)  # noqa: E731
        path = self.export_pretrained(self.policy, rebuild, self.tokenizer, self.save_dir)
        if path is not None:
            print(f"[lit-p3o] saved the SFT model to {Path(path).resolve()}")
