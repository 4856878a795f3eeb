"""Pairwise preference data for reward modelling.

Real data goes through one parser per format (:mod:`lit_p3o.data.formats`: Anthropic HH,
TL;DR comparisons, TRL standard and conversational) into ``(prompt, chosen, rejected)``
records. The embedded task instead samples two (or K) responses per prompt from the SFT policy
and labels each pair like noisy people would (:mod:`lit_p3o.tasks.pairs`). The best any
reward model can do on such labels is the Bayes accuracy ``mean σ(|Δgold| / T)``, reported
as :attr:`PreferenceDataModule.label_accuracy_ceiling`.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from lit_p3o.data.encoding import (
    Encoded,
    Pair,
    PairBatch,
    collate_pairs,
    encode_prompt,
    encode_response,
    fit_prompt,
)
from lit_p3o.data.formats import Parsed, PreferenceRecord, parse_preferences
from lit_p3o.data.issues import RowIssues
from lit_p3o.data.module import SourceDataModule
from lit_p3o.data.sources import DataSource, load_rows
from lit_p3o.monitoring import shows_progress
from lit_p3o.tasks import Task, resolve_embedded
from lit_p3o.tasks.pairs import EmbeddedPreferenceSpec, draw_label, sample_labelled_groups, sample_labelled_pairs

__all__ = [  # the pair types and the embedded synthesis keep their old import path
    "EmbeddedPreferenceSpec",
    "Pair",
    "PairBatch",
    "PreferenceDataModule",
    "collate_pairs",
    "draw_label",
    "sample_labelled_groups",
    "sample_labelled_pairs",
]


class PreferenceDataModule(SourceDataModule):
    """(prompt, chosen, rejected) pairs, tokenized with the reward model's tokenizer.

    ``train``/``val`` accept ``"embedded:<task>"``, ``.jsonl``/``.json`` files, directories
    written by ``datasets.save_to_disk``, names/directories for ``datasets.load_dataset``, or from
    Python a ``datasets.Dataset``/``DatasetDict``.
    ``format`` is ``auto`` or one of ``hh``, ``tldr``, ``trl``, ``trl_implicit``,
    ``trl_conversational``. With ``strict`` the first bad row raises an error naming it;
    otherwise bad rows are skipped, counted and logged. ``chat_template_kwargs`` go to
    ``apply_chat_template`` for conversational rows. ``batch_size`` counts pairs; with
    ``embedded.responses_per_prompt`` K > 2 it must be a multiple of K(K−1)/2, as a batch holds
    whole prompts' groups of pairs.
    """

    label, unit = "preference data", "pairs"

    def __init__(
        self,
        train: DataSource = "embedded:reviews",
        val: DataSource | None = None,
        train_split: str = "train",
        val_split: str = "test",
        format: str = "auto",
        val_fraction: float = 0.05,
        max_length: int = 512,
        batch_size: int = 8,
        num_workers: int = 0,
        strict: bool = False,
        seed: int = 0,
        embedded: EmbeddedPreferenceSpec | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
    ) -> None:
        super().__init__(train, val, val_fraction, max_length, tokenizer)
        if batch_size < 1:
            raise ValueError(f"PreferenceDataModule.batch_size: must be >= 1 pair, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"PreferenceDataModule.num_workers: must be >= 0, got {num_workers}")
        self.embedded = embedded or EmbeddedPreferenceSpec()
        self.train_groups: list[list[Pair]] = []  # pairs that share responses are batched together
        self.val_pairs: list[Pair] = []
        self.label_accuracy_ceiling: float | None = None

    @property
    def train_pairs(self) -> list[Pair]:
        """The training pairs, group after group."""
        return [pair for group in self.train_groups for pair in group]

    def setup(self, stage: str | None = None) -> None:
        if self.train_groups:
            return
        self._take_trainer_tokenizer()
        task = resolve_embedded(self.train_source)
        if task is not None:
            self._setup_embedded(task)
            return
        train, self.val_pairs = self._train_and_val(lambda source, split: self._encode(*self._read(source, split)))
        self.train_groups = [[pair] for pair in train]
        self._report(len(self.val_pairs))

    def _read(self, source: DataSource, split: str) -> tuple[Parsed[PreferenceRecord], str]:
        rows, origin = load_rows(source, split)
        records = parse_preferences(
            rows,
            origin,
            format=self.hparams.format,
            tokenizer=self.tokenizer,
            strict=self.hparams.strict,
            chat_template_kwargs=self.hparams.chat_template_kwargs,
        )
        return records, origin

    def _encode(self, records: Parsed[PreferenceRecord], origin: str) -> list[Pair]:
        """Both sides of a pair get the same prompt ids, fitted next to the longer response: a
        comparison of two responses must condition them on one context. A response that leaves
        no room for a prompt token is a bad row, named by its row number in the source."""
        tokenizer, max_length = self.tokenizer, self.hparams.max_length
        issues = RowIssues(origin, strict=self.hparams.strict)
        pairs = []
        for row, r in zip(getattr(records, "row_numbers", range(len(records))), records):
            chosen, rejected = encode_response(tokenizer, r.chosen), encode_response(tokenizer, r.rejected)
            too_long = [field for field, ids in (("chosen", chosen), ("rejected", rejected)) if len(ids) >= max_length]
            if too_long:
                issues.add(
                    row,
                    too_long[0],
                    f"response too long for max_length={max_length} (EOS included; a prompt token must fit too)",
                )
                continue
            budget = max_length - max(len(chosen), len(rejected))
            prompt = fit_prompt(encode_prompt(tokenizer, r.prompt), budget, tokenizer.bos_token_id, self.truncation)
            pairs.append(Pair(Encoded(prompt, chosen), Encoded(list(prompt), rejected), r.margin))
        issues.report(total=len(records))
        return pairs

    def _setup_embedded(self, task: Task) -> None:
        spec = self.embedded
        vocab = self.tokenizer.get_vocab()
        per_batch = self.hparams.batch_size
        if per_batch % spec.pairs_per_prompt:
            raise ValueError(
                f"PreferenceDataModule.batch_size: {per_batch} is not a multiple of the {spec.pairs_per_prompt} pairs "
                f"per prompt that embedded.responses_per_prompt={spec.responses_per_prompt} makes"
            )
        # minutes of sampling on a CPU: a bar like the rollout's, where the trainer draws bars
        progress = self.trainer is not None and shows_progress(self.trainer)
        seed, k = self.hparams.seed, spec.responses_per_prompt
        train_bar, val_bar = ("reward pairs: train", "reward pairs: val") if progress else (None, None)
        self.train_groups, _ = sample_labelled_groups(task, spec, "train", spec.train_pairs, seed, vocab, k, train_bar)
        self.val_pairs, self.label_accuracy_ceiling = sample_labelled_pairs(
            task, spec, "test", spec.val_pairs, seed + 1, vocab, progress=val_bar
        )
        print(
            f"[lit-p3o] embedded preferences: {len(self.train_pairs)} train / {len(self.val_pairs)} val pairs, "
            f"labels at T={spec.label_temperature}; Bayes-optimal val accuracy {self.label_accuracy_ceiling:.1%}"
        )

    def _loader(self, groups: list[list[Pair]], shuffle: bool) -> DataLoader:
        """Batches of whole groups, ``batch_size`` pairs in all (fewer where a group lost a
        duplicate response)."""
        per_group = max((len(group) for group in groups), default=1)
        collate_fn = partial(collate_pair_groups, pad_token_id=self.tokenizer.pad_token_id)
        return self._dataloader(groups, shuffle, max(1, self.hparams.batch_size // per_group), collate_fn)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_groups, shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        if not self.val_pairs:  # e.g. val_fraction=0: an empty list makes Lightning skip validation
            return []
        return self._loader([[pair] for pair in self.val_pairs], shuffle=False)


def collate_pair_groups(groups: list[list[Pair]], pad_token_id: int) -> PairBatch:
    """:func:`collate_pairs` over the pairs of some prompts' groups of comparisons (not
    :func:`lit_p3o.buffer.collate_groups`, which batches rollout groups)."""
    return collate_pairs([pair for group in groups for pair in group], pad_token_id)
