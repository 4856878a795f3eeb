"""Supervised fine-tuning data: the embedded corpus, JSONL files or HF datasets."""

from __future__ import annotations

from functools import partial
from typing import Any

from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from lit_p3o.data.encoding import Encoded, ResponseTooLong, collate, encode_example
from lit_p3o.data.formats import SFTRecord, parse_sft
from lit_p3o.data.issues import DataFormatError, RowIssues
from lit_p3o.data.module import SourceDataModule
from lit_p3o.data.sources import DataSource, load_rows, source_label
from lit_p3o.tasks import resolve_embedded


class SFTDataModule(SourceDataModule):
    """(prompt, completion) pairs, tokenized with the model's tokenizer and fitted to ``max_length``.

    ``train`` is ``"embedded:reviews"`` (the embedded task's corpus), a ``.jsonl`` file, a
    directory written by ``datasets.save_to_disk``, a dataset name/directory for
    ``datasets.load_dataset``, or from Python a ``datasets.Dataset``/``DatasetDict``; rows hold
    ``prompt``/``completion``, ``messages`` or ``text``, or a preference dataset's pairs, whose chosen
    replies are trained on (:func:`~lit_p3o.data.formats.parse_chosen`). Without
    ``val``, a seeded ``val_fraction`` of the training rows is held out (none: no validation).
    A bad row (a missing field, an empty completion) raises an error naming it (its row number
    in the file), or with ``strict: false`` is skipped, counted and logged. A completion longer
    than ``max_length`` (with a one-token prompt) is cut at its end, as TRL's ``SFTTrainer``
    does, counted and logged (``data/truncated_responses``), or with ``strict: true`` raises.
    ``chat_template_kwargs`` go to ``apply_chat_template`` for conversational rows (give the
    RL stage's ``rollout.chat_template_kwargs`` too, so that both render prompts alike).
    The tokenizer is the trained module's (``trainer.lightning_module.tokenizer``) unless one
    is passed for use outside a Trainer.
    """

    label, unit = "SFT data", "examples"

    def __init__(
        self,
        train: DataSource = "embedded:reviews",
        val: DataSource | None = None,
        train_split: str = "train",
        val_split: str = "test",
        val_fraction: float = 0.05,
        embedded_size: int = 4000,
        max_length: int = 512,
        batch_size: int = 8,
        num_workers: int = 0,
        strict: bool | None = None,
        seed: int = 0,
        chat_template_kwargs: dict[str, Any] | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
    ) -> None:
        super().__init__(train, val, val_fraction, max_length, tokenizer)
        self.train_examples: list[Encoded] = []
        self.val_examples: list[Encoded] = []

    def setup(self, stage: str | None = None) -> None:
        if self.train_examples:
            return
        self._take_trainer_tokenizer()
        hp = self.hparams
        task = resolve_embedded(self.train_source)
        if task is not None:
            n_val = max(1, int(hp.embedded_size * hp.val_fraction)) if hp.val_fraction > 0 else 0
            corpus = task.sft_corpus(hp.embedded_size + n_val, seed=hp.seed)
            records = [SFTRecord(r["prompt"], r["completion"]) for r in corpus]
            examples = self._encode(records, self.train_source)
            self.train_examples, self.val_examples = examples[: hp.embedded_size], examples[hp.embedded_size :]
        else:
            self.train_examples, self.val_examples = self._train_and_val(
                lambda source, split: self._encode(self._read(source, split), source_label(source, split))
            )
        self._report(len(self.val_examples))

    def _read(self, source: DataSource, split: str) -> list[SFTRecord]:
        rows, origin = load_rows(source, split)
        try:
            return parse_sft(
                rows,
                origin,
                tokenizer=self.tokenizer,
                strict=self.hparams.strict is not False,
                chat_template_kwargs=self.hparams.chat_template_kwargs,
            )
        except DataFormatError as err:
            if origin in str(err):
                raise
            raise DataFormatError(f"{origin}: {err}") from err

    def _encode(self, records: list[SFTRecord], origin: str) -> list[Encoded]:
        """Over-long rows are cut, or under ``strict: true`` named by their row in the source,
        even after the parser skipped some."""
        truncate = self.hparams.strict is not True
        issues = RowIssues(origin, strict=True)  # reached only when not truncating
        examples = []
        for row, record in zip(getattr(records, "row_numbers", range(len(records))), records):
            try:
                examples.append(
                    encode_example(
                        self.tokenizer,
                        record.prompt,
                        record.completion,
                        self.hparams.max_length,
                        self.truncation,
                        truncate,
                    )
                )
            except ResponseTooLong as err:
                issues.add(row, "completion", str(err))
        return examples

    def _loader(self, examples: list[Encoded], shuffle: bool) -> DataLoader:
        collate_fn = partial(collate, pad_token_id=self.tokenizer.pad_token_id)
        return self._dataloader(examples, shuffle, self.hparams.batch_size, collate_fn)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_examples, shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        if not self.val_examples:  # e.g. val_fraction=0: an empty list makes Lightning skip validation
            return []
        return self._loader(self.val_examples, shuffle=False)
