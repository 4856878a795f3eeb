"""What the SFT and preference DataModules share: their ``train``/``val`` sources (an embedded
task, files, dataset names or Python ``datasets`` objects), the hyperparameters saved for them,
the tokenizer, a seeded hold-out when no ``val`` is given, and the reports on what was read."""

from __future__ import annotations

import inspect
import logging
import random
from collections.abc import Callable
from typing import Any, TypeVar

import lightning as L
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from lit_p3o.data.encoding import TruncationStats
from lit_p3o.data.sources import DataSource
from lit_p3o.models import python_objects

T = TypeVar("T")


class SourceDataModule(L.LightningDataModule):
    """Base of :class:`~lit_p3o.data.sft.SFTDataModule` and
    :class:`~lit_p3o.data.preferences.PreferenceDataModule`; subclasses keep their own explicit
    constructor signatures (the CLI reads them) and call ``super().__init__`` first."""

    label: str  # how log lines name the data, e.g. "SFT data"
    unit: str  # what the data is made of, e.g. "examples"

    def __init__(
        self,
        train: DataSource,
        val: DataSource | None,
        val_fraction: float,
        max_length: int,
        tokenizer: PreTrainedTokenizerBase | None,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        if not 0 <= val_fraction < 1:
            raise ValueError(f"{name}.val_fraction: must be in [0, 1), got {val_fraction}")
        if max_length < 2:  # one prompt token and the response's EOS at least
            raise ValueError(f"{name}.max_length: must be >= 2 tokens, got {max_length}")
        # the subclass's constructor arguments, less those given as Python objects (datasets,
        # tokenizers): they are neither config nor small
        caller = inspect.currentframe().f_back  # type: ignore[union-attr]
        self.save_hyperparameters(ignore=["tokenizer", *python_objects(train=train, val=val)], frame=caller)
        self.train_source, self.val_source = train, val
        self.tokenizer = tokenizer
        self.truncation = TruncationStats()

    def _take_trainer_tokenizer(self) -> None:
        """The trained module's tokenizer, unless one was passed for use outside a Trainer."""
        if self.tokenizer is None:
            self.tokenizer = self.trainer.lightning_module.tokenizer

    def _train_and_val(self, load: Callable[[DataSource, str], list[T]]) -> tuple[list[T], list[T]]:
        """``load(source, split)`` for ``train`` and ``val``, or without ``val`` a seeded
        ``val_fraction`` of the training items. Items are loaded in source order before any
        split, so that a bad row is named by its row number."""
        hp = self.hparams
        train = load(self.train_source, hp.train_split)
        if self.val_source is not None:
            return train, load(self.val_source, hp.val_split)
        shuffled = random.Random(hp.seed).sample(train, len(train))
        n_val = int(round(len(train) * hp.val_fraction))
        return shuffled[n_val:], shuffled[:n_val]

    def _report(self, n_val: int) -> None:
        """Log the prompts (and responses) cut to fit, and that validation is skipped when nothing was held out."""
        log = logging.getLogger(type(self).__module__)  # the subclass's module, as before the base
        if self.truncation.truncated_prompts:
            log.warning("%s: %s", self.label, self.truncation.describe())
        if self.truncation.truncated_responses:
            log.info(
                "%s: %s to fit max_length=%d (strict: true stops at such rows instead)",
                self.label,
                self.truncation.describe_responses(),
                self.hparams.max_length,
            )
        if not n_val:
            log.info("%s: no validation %s; validation is skipped", self.label, self.unit)

    def _dataloader(self, items: list[Any], shuffle: bool, batch_size: int, collate_fn: Callable) -> DataLoader:
        if not items:
            raise ValueError(f"{type(self).__name__}: no {self.unit} left after reading and filtering the data")
        return DataLoader(
            items, batch_size=batch_size, shuffle=shuffle, num_workers=self.hparams.num_workers, collate_fn=collate_fn
        )
