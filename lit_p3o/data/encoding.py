"""Token-level plumbing shared by every stage: one truncation policy, one padding layout.

Layout of a batch of (prompt, response) pairs: prompts are **left**-padded and responses
**right**-padded, so every prompt ends at the same column ``P`` and every response starts
there. Generation needs exactly this (new tokens are appended at column ``P``), and keeping
the update's forward on the same layout makes ``logp_old`` and the update's log-probs come
from the same code path.

Truncation policy (SFT, preferences, prompts alike): a prompt that does not fit is cut from
the **left** (the end of a prompt is what the response answers), a leading BOS is kept, and
each cut is counted. A response that alone exceeds the budget is a bad row, or, for SFT
(``truncate``), cut at its **end** as TRL's ``SFTTrainer`` does (its EOS goes with it, so the
model is not taught to stop there) after a one-token prompt, and counted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100


class ResponseTooLong(ValueError):
    """A response that cannot fit ``max_length`` even with a one-token prompt."""


@dataclass
class TruncationStats:
    """How many prompts were cut from the left (and SFT responses at their end), for the stage to log."""

    examples: int = 0
    truncated_prompts: int = 0
    removed_tokens: int = 0
    truncated_responses: int = 0
    removed_response_tokens: int = 0

    def describe(self) -> str:
        return (
            f"{self.truncated_prompts} of {self.examples} prompts truncated from the left "
            f"({self.removed_tokens} tokens removed)"
        )

    def describe_responses(self) -> str:
        return (
            f"{self.truncated_responses} of {self.examples} responses truncated at the end, EOS included "
            f"({self.removed_response_tokens} tokens removed)"
        )


@dataclass
class Encoded:
    """One example's ids, split at the prompt/response boundary."""

    prompt_ids: list[int]
    response_ids: list[int] = field(default_factory=list)


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str) -> list[int]:
    """Prompt ids with the tokenizer's own special tokens (e.g. Llama's BOS).

    A prompt is never empty: with nothing to condition on (an empty prompt and a tokenizer
    that adds no BOS) it is ``[BOS]``, or ``[EOS]`` (GPT-2's document separator) without a
    BOS token, so the first response token is predicted from a real position rather than
    from padding, and generation has a token to start from."""
    ids = list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    if not ids:
        ids = [tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id]
    return ids


def encode_response(tokenizer: PreTrainedTokenizerBase, response: str, add_eos: bool = True) -> list[int]:
    """Response ids, no special prefix; EOS appended so the model learns to stop."""
    ids = list(tokenizer(response, add_special_tokens=False)["input_ids"])
    return ids + [tokenizer.eos_token_id] if add_eos else ids


def fit_prompt(
    prompt_ids: list[int], budget: int, bos_token_id: int | None, stats: TruncationStats | None = None
) -> list[int]:
    """Cut ``prompt_ids`` from the left to at most ``budget`` tokens, keeping a leading BOS."""
    if budget < 1:
        raise ValueError(f"prompt budget must be at least 1 token, got {budget}")
    if stats is not None:
        stats.examples += 1
    if len(prompt_ids) <= budget:
        return prompt_ids
    if stats is not None:
        stats.truncated_prompts += 1
        stats.removed_tokens += len(prompt_ids) - budget
    keep_bos = bos_token_id is not None and prompt_ids[0] == bos_token_id and budget > 1
    return [bos_token_id, *prompt_ids[len(prompt_ids) - budget + 1 :]] if keep_bos else prompt_ids[-budget:]


def encode_example(
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    response: str,
    max_length: int,
    stats: TruncationStats | None = None,
    truncate: bool = False,
) -> Encoded:
    """Prompt and response ids fitted into ``max_length`` by the module's policy; a response
    too long for it is cut at its end with ``truncate``, else refused."""
    response_ids = encode_response(tokenizer, response)
    if len(response_ids) >= max_length and truncate:
        if stats is not None:
            stats.truncated_responses += 1
            stats.removed_response_tokens += len(response_ids) - (max_length - 1)
        response_ids = response_ids[: max_length - 1]
    elif len(response_ids) >= max_length:
        raise ResponseTooLong(
            f"response has {len(response_ids)} tokens (EOS included); max_length={max_length} "
            "leaves no room for the prompt"
        )
    prompt_ids = fit_prompt(
        encode_prompt(tokenizer, prompt), max_length - len(response_ids), tokenizer.bos_token_id, stats
    )
    return Encoded(prompt_ids, response_ids)


@dataclass
class Batch:
    """Padded tensors for a list of :class:`Encoded` in the module's layout.

    ``response_mask`` marks response tokens (EOS included); ``position_ids`` count real tokens
    only, so left padding does not shift positions.
    """

    input_ids: Tensor
    attention_mask: Tensor
    position_ids: Tensor
    response_mask: Tensor
    prompt_width: int

    def labels(self) -> Tensor:
        """Token ids on response positions, ``IGNORE_INDEX`` elsewhere (for SFT)."""
        return self.input_ids.masked_fill(~self.response_mask.bool(), IGNORE_INDEX)

    def to(self, device: torch.device | str) -> Batch:
        return Batch(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.position_ids.to(device),
            self.response_mask.to(device),
            self.prompt_width,
        )


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """0, 1, 2, … over real tokens; padding gets 0 (it is masked anyway)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def collate(examples: list[Encoded], pad_token_id: int) -> Batch:
    """Left-pad prompts to a common width, right-pad responses after it."""
    if not examples:
        raise ValueError("cannot collate an empty list of examples")
    prompt_width = max(len(e.prompt_ids) for e in examples)
    response_width = max(len(e.response_ids) for e in examples)
    n, width = len(examples), prompt_width + response_width
    input_ids = torch.full((n, width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((n, width), dtype=torch.long)
    response_mask = torch.zeros((n, width), dtype=torch.long)
    for row, e in enumerate(examples):
        start, end = prompt_width - len(e.prompt_ids), prompt_width + len(e.response_ids)
        input_ids[row, start:prompt_width] = torch.tensor(e.prompt_ids, dtype=torch.long)
        input_ids[row, prompt_width:end] = torch.tensor(e.response_ids, dtype=torch.long)
        attention_mask[row, start:end] = 1
        response_mask[row, prompt_width:end] = 1
    return Batch(input_ids, attention_mask, position_ids_from_mask(attention_mask), response_mask, prompt_width)


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
    return PairBatch(
        **vars(batch), chosen_rows=chosen_rows, rejected_rows=rejected_rows, margin=margin, preference=preference
    )
