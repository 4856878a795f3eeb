"""Pairwise preference data for reward modelling.

Real data goes through one parser per format (:mod:`lit_p3o.data.formats`: Anthropic HH,
TL;DR comparisons, TRL standard and conversational) into ``(prompt, chosen, rejected)``
records. The embedded task instead samples two (or K) responses per prompt from the SFT policy
and labels each pair like noisy people would: ``P(a ≻ b) = σ((gold(a) − gold(b)) / T)``. The best any
reward model can do on such labels is the Bayes accuracy ``mean σ(|Δgold| / T)``, reported
as :attr:`PreferenceDataModule.label_accuracy_ceiling`.
"""

from __future__ import annotations

import itertools
import logging
import math
import random
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from lit_p3o.data.encoding import Batch, Encoded, TruncationStats, collate, encode_prompt, encode_response, fit_prompt
from lit_p3o.data.formats import Parsed, PreferenceRecord, parse_preferences
from lit_p3o.data.sources import DataSource, load_rows
from lit_p3o.data.issues import RowIssues
from lit_p3o.generation import SamplingSpec, sample_responses
from lit_p3o.models import ModelSpec, build_causal_lm, load_tokenizer, python_objects
from lit_p3o.tasks import Task, resolve_embedded

log = logging.getLogger(__name__)

class Pair(tuple):
    """``(chosen, rejected)`` encoded, unpacking as a 2-tuple, plus ``margin``: TRL's per-pair
    margin that the reward loss subtracts from ``r_w − r_l`` (0: plain Bradley–Terry), and
    ``preference``: the labeller's probability that ``chosen`` wins, where the labels were drawn
    from a known model (the embedded task's Bradley–Terry draw; None for real data)."""

    margin: float
    preference: float | None

    def __new__(cls, chosen: Encoded, rejected: Encoded, margin: float = 0.0, preference: float | None = None) -> Pair:
        pair = super().__new__(cls, (chosen, rejected))
        pair.margin, pair.preference = margin, preference
        return pair

    def __getnewargs__(self) -> tuple[Any, ...]:  # pickling (DataLoader workers) keeps both
        return (*self, self.margin, self.preference)


@dataclass
class PairBatch(Batch):
    """:class:`Batch` of the distinct rows of some pairs, with ``chosen_rows`` and
    ``rejected_rows`` ``[N]`` naming each pair's two rows (a response compared several times,
    as in K-wise comparisons, is scored once), each pair's ``margin`` ``[N]`` and, when every
    pair knows it, its ``preference`` ``[N]`` (see :class:`Pair`)."""

    chosen_rows: torch.Tensor | None = None
    rejected_rows: torch.Tensor | None = None
    margin: torch.Tensor | None = None
    preference: torch.Tensor | None = None

    def pair_scores(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-row ``scores`` ``[rows]`` as (chosen, rejected) ``[N]``."""
        return scores[self.chosen_rows], scores[self.rejected_rows]

    def to(self, device: torch.device | str) -> PairBatch:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        extra = {name: move(getattr(self, name)) for name in ("chosen_rows", "rejected_rows", "margin", "preference")}
        return PairBatch(**vars(super().to(device)), **extra)


@dataclass
class EmbeddedPreferenceSpec:
    """How the embedded task's preference pairs are made.

    ``policy`` is the saved SFT model that writes the responses; ``label_temperature`` T sets
    the labelling noise (smaller = more decisive labellers). ``sampling_temperatures`` spreads
    the responses: prompt i's responses are sampled at ``sampling_temperatures[i % len]`` (all
    at the same temperature), so a value above 1 shows the reward model the flawed texts (repeats,
    off-topic or unfinished sentences) that a policy drifting from SFT writes.
    ``responses_per_prompt`` K > 2 samples K responses per training prompt and labels all
    K(K−1)/2 pairs among them, each by its own draw; a batch then holds whole prompts' groups,
    so each response is scored once for its K − 1 comparisons. Held-out pairs stay one per
    prompt, so that their accuracy is over independent comparisons.
    """

    policy: str = "outputs/demo/sft"
    train_pairs: int = 4000
    val_pairs: int = 500
    label_temperature: float = 0.5
    max_new_tokens: int = 32
    generation_batch_size: int = 256
    sampling_temperatures: list[float] = field(default_factory=lambda: [1.0])
    responses_per_prompt: int = 2

    def __post_init__(self) -> None:
        if self.label_temperature <= 0:
            raise ValueError(f"EmbeddedPreferenceSpec.label_temperature: must be > 0, got {self.label_temperature}")
        if not self.sampling_temperatures or min(self.sampling_temperatures) <= 0:
            raise ValueError(
                f"EmbeddedPreferenceSpec.sampling_temperatures: needs values > 0, got {self.sampling_temperatures}"
            )
        if self.train_pairs < 1 or self.val_pairs < 1:
            raise ValueError("EmbeddedPreferenceSpec: train_pairs and val_pairs must be >= 1")
        if self.responses_per_prompt < 2:
            raise ValueError(f"EmbeddedPreferenceSpec.responses_per_prompt: must be >= 2, got {self.responses_per_prompt}")

    @property
    def pairs_per_prompt(self) -> int:
        """Training pairs labelled per prompt: K(K−1)/2 for K responses."""
        return math.comb(self.responses_per_prompt, 2)


def collate_pairs(pairs: list[Pair] | list[tuple[Encoded, Encoded]], pad_token_id: int) -> PairBatch:
    """One batch for one forward pass: the chosen rows first, then the rejected rows, each
    distinct (prompt, response) once; plain ``(chosen, rejected)`` tuples have margin 0 and
    no preference."""
    keys = [[(tuple(pair[side].prompt_ids), tuple(pair[side].response_ids)) for pair in pairs] for side in (0, 1)]
    rows = {key: row for row, key in enumerate(dict.fromkeys(keys[0] + keys[1]))}  # first occurrences, in order
    batch = collate([Encoded(list(prompt), list(response)) for prompt, response in rows], pad_token_id)
    margin = torch.tensor([float(getattr(p, "margin", 0.0)) for p in pairs])
    known = [getattr(p, "preference", None) for p in pairs]
    preference = None if None in known else torch.tensor(known, dtype=torch.float32)
    chosen_rows, rejected_rows = (torch.tensor([rows[key] for key in side], dtype=torch.long) for side in keys)
    return PairBatch(**vars(batch), chosen_rows=chosen_rows, rejected_rows=rejected_rows, margin=margin, preference=preference)


class PreferenceDataModule(L.LightningDataModule):
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
        super().__init__()
        if not 0 <= val_fraction < 1:
            raise ValueError(f"PreferenceDataModule.val_fraction: must be in [0, 1), got {val_fraction}")
        if batch_size < 1:
            raise ValueError(f"PreferenceDataModule.batch_size: must be >= 1 pair, got {batch_size}")
        if max_length < 2:  # one prompt token and the response's EOS at least
            raise ValueError(f"PreferenceDataModule.max_length: must be >= 2 tokens, got {max_length}")
        if num_workers < 0:
            raise ValueError(f"PreferenceDataModule.num_workers: must be >= 0, got {num_workers}")
        self.save_hyperparameters(ignore=["tokenizer", *python_objects(train=train, val=val)])
        self.train_source, self.val_source = train, val
        self.embedded = embedded or EmbeddedPreferenceSpec()
        self.tokenizer = tokenizer
        self.train_groups: list[list[Pair]] = []  # pairs that share responses are batched together
        self.val_pairs: list[Pair] = []
        self.truncation = TruncationStats()
        self.label_accuracy_ceiling: float | None = None

    @property
    def train_pairs(self) -> list[Pair]:
        """The training pairs, group after group."""
        return [pair for group in self.train_groups for pair in group]

    def setup(self, stage: str | None = None) -> None:
        if self.train_groups:
            return
        if self.tokenizer is None:
            self.tokenizer = self.trainer.lightning_module.tokenizer
        hp = self.hparams
        task = resolve_embedded(self.train_source)
        if task is not None:
            self._setup_embedded(task)
            return
        # encoded in source order, before any split, so that a bad row is named by its row number
        train = self._encode(*self._read(self.train_source, hp.train_split))
        if self.val_source is not None:
            val = self._encode(*self._read(self.val_source, hp.val_split))
        else:
            shuffled = random.Random(hp.seed).sample(train, len(train))
            n_val = int(round(len(train) * hp.val_fraction))
            train, val = shuffled[n_val:], shuffled[:n_val]
        self.train_groups, self.val_pairs = [[pair] for pair in train], val
        if self.truncation.truncated_prompts:
            log.warning("preference data: %s", self.truncation.describe())
        if not self.val_pairs:
            log.info("preference data: no validation pairs; validation is skipped")

    def _read(self, source: DataSource, split: str) -> tuple[Parsed[PreferenceRecord], str]:
        rows, origin = load_rows(source, split)
        records = parse_preferences(
            rows, origin, format=self.hparams.format, tokenizer=self.tokenizer, strict=self.hparams.strict,
            chat_template_kwargs=self.hparams.chat_template_kwargs,
        )  # fmt: skip
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
        self.train_groups, _ = sample_labelled_groups(
            task, spec, "train", spec.train_pairs, self.hparams.seed, vocab, spec.responses_per_prompt
        )
        self.val_pairs, self.label_accuracy_ceiling = sample_labelled_pairs(
            task, spec, "test", spec.val_pairs, self.hparams.seed + 1, vocab
        )
        print(
            f"[lit-p3o] embedded preferences: {len(self.train_pairs)} train / {len(self.val_pairs)} val pairs, "
            f"labels at T={spec.label_temperature}; Bayes-optimal val accuracy {self.label_accuracy_ceiling:.1%}"
        )

    def _loader(self, groups: list[list[Pair]], shuffle: bool) -> DataLoader:
        """Batches of whole groups, ``batch_size`` pairs in all (fewer where a group lost a
        duplicate response)."""
        if not groups:
            raise ValueError("PreferenceDataModule: no pairs left after reading and filtering the data")
        per_group = max(len(group) for group in groups)
        return DataLoader(
            groups,
            batch_size=max(1, self.hparams.batch_size // per_group),
            shuffle=shuffle,
            num_workers=self.hparams.num_workers,
            collate_fn=partial(collate_groups, pad_token_id=self.tokenizer.pad_token_id),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_groups, shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        if not self.val_pairs:  # e.g. val_fraction=0: an empty list makes Lightning skip validation
            return []
        return self._loader([[pair] for pair in self.val_pairs], shuffle=False)


def collate_groups(groups: list[list[Pair]], pad_token_id: int) -> PairBatch:
    """:func:`collate_pairs` over the pairs of some groups."""
    return collate_pairs([pair for group in groups for pair in group], pad_token_id)


def sample_labelled_pairs(
    task: Task,
    spec: EmbeddedPreferenceSpec,
    split: str,
    n_pairs: int,
    seed: int,
    expected_vocab: dict[str, int] | None = None,
) -> tuple[list[Pair], float]:
    """``n_pairs`` independent pairs, one per prompt (:func:`sample_labelled_groups` with two
    responses per prompt), and their Bayes accuracy: what held-out accuracy is measured on."""
    groups, ceiling = sample_labelled_groups(task, spec, split, n_pairs, seed, expected_vocab, responses_per_prompt=2)
    return [pair for group in groups for pair in group], ceiling


def sample_labelled_groups(
    task: Task,
    spec: EmbeddedPreferenceSpec,
    split: str,
    n_pairs: int,
    seed: int,
    expected_vocab: dict[str, int] | None = None,
    responses_per_prompt: int = 2,
) -> tuple[list[list[Pair]], float]:
    """Sample ``responses_per_prompt`` (K) responses per prompt from ``spec.policy`` and label
    every pair of distinct ones by its own Bradley–Terry draw on the gold reward, K(K−1)/2
    pairs per prompt (InstructGPT's K-wise comparisons: more labels per sampled response).
    Returns ``n_pairs`` pairs grouped by prompt, and their Bayes accuracy."""
    if responses_per_prompt < 2:
        raise ValueError(f"responses_per_prompt: must be >= 2, got {responses_per_prompt}")
    model_spec = ModelSpec(name_or_path=spec.policy)
    tokenizer = load_tokenizer(model_spec)
    if expected_vocab is not None and tokenizer.get_vocab() != expected_vocab:
        raise ValueError(
            f"EmbeddedPreferenceSpec.policy: {spec.policy!r} uses another tokenizer than the reward model"
        )
    policy = build_causal_lm(model_spec, tokenizer)
    temperatures, k = spec.sampling_temperatures, responses_per_prompt
    rng = random.Random(seed)
    torch.manual_seed(seed)
    groups: list[list[Pair]] = []
    made, ceiling = 0, 0.0
    per_prompt = math.comb(k, 2)
    n_prompts = math.ceil(n_pairs / per_prompt)
    prompts = task.prompts(split, n_prompts)
    for attempt in range(4):  # identical responses are dropped; top up a few times
        need = n_pairs - made
        if need == 0:
            break
        batch_prompts = [prompts[(attempt * n_prompts + i) % len(prompts)] for i in range(math.ceil(need / per_prompt))]
        examples: list[Encoded] = [None] * (k * len(batch_prompts))  # type: ignore[list-item]
        ended: list[bool] = [False] * len(examples)
        for t, temperature in enumerate(temperatures):
            rows = [r for i in range(t, len(batch_prompts), len(temperatures)) for r in range(k * i, k * i + k)]
            if not rows:
                continue
            ids = [tokenizer(batch_prompts[r // k], add_special_tokens=True)["input_ids"] for r in rows]
            sampling = SamplingSpec(max_new_tokens=spec.max_new_tokens, temperature=temperature)
            sampled = sample_responses(policy, tokenizer, ids, sampling, spec.generation_batch_size)
            for r, example, stop in zip(rows, sampled.examples, sampled.ended):
                examples[r], ended[r] = example, stop
        for i, prompt in enumerate(batch_prompts):
            distinct = {tuple(examples[r].response_ids): r for r in reversed(range(k * i, k * i + k))}
            rows = sorted(distinct.values())  # the first of identical responses, in sampling order
            gold = {
                r: task.gold_reward(prompt, tokenizer.decode(examples[r].response_ids, skip_special_tokens=True), ended[r])
                for r in rows
            }
            group = []
            for a, b in itertools.combinations(rows, 2):
                if made == n_pairs:
                    break
                p_a = _sigmoid((gold[a] - gold[b]) / spec.label_temperature)
                ceiling += max(p_a, 1.0 - p_a)
                group.append(draw_label(examples[a], examples[b], p_a, rng))
                made += 1
            if group:
                groups.append(group)
    if not groups:
        raise RuntimeError(f"{spec.policy}: every sampled pair was identical; the SFT policy is degenerate")
    return groups, ceiling / made


def draw_label(a: Encoded, b: Encoded, p_a: float, rng: random.Random) -> Pair:
    """One labeller's verdict on ``a`` against ``b``: ``a`` is chosen with probability ``p_a``,
    and the pair keeps the probability of its chosen side as ``preference``."""
    return Pair(a, b, preference=p_a) if rng.random() < p_a else Pair(b, a, preference=1.0 - p_a)


def _sigmoid(x: float) -> float:
    """``1 / (1 + e^-x)`` without overflow: tiny label temperatures make ``|x|`` huge."""
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)
    return z / (1.0 + z)
