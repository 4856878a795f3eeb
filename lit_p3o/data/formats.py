"""Raw rows of real datasets → uniform records, one small parser per format.

:func:`lit_p3o.data.sources.load_rows` reads a source into a list of dict rows plus an *origin*
label for messages. The parsers here turn rows into :class:`SFTRecord` or :class:`PreferenceRecord`:

============================  =====================================================================
SFT format                    columns
============================  =====================================================================
``prompt_completion``         ``prompt``/``completion`` text, or TRL conversational: ``prompt`` a
                              list of messages and ``completion`` one assistant message
``messages``                  ``messages``: a conversation ending with the assistant's reply
``text``                      ``text``: plain language modelling (empty prompt, the whole text trained)
``chosen``                    any preference format below: the chosen reply after its prompt (SFT on
                              HH's preferred transcripts or TL;DR's preferred summaries)
============================  =====================================================================

============================  =====================================================================
prompt-only format            columns
============================  =====================================================================
``prompt``                    ``prompt`` text, or TRL conversational prompt-only: a list of messages
                              ending with the turn the model answers
============================  =====================================================================

============================  =====================================================================
preference format             columns
============================  =====================================================================
``hh``                        Anthropic HH-RLHF: ``chosen``/``rejected`` Human/Assistant transcripts
``tldr``                      OpenAI summarize-from-feedback comparisons: ``info``, ``summaries``,
                              ``choice``
``trl``                       TRL standard preference: ``prompt``/``chosen``/``rejected`` text
``trl_implicit``              TRL implicit prompt: ``chosen``/``rejected`` texts sharing a prefix
                              (the prompt, split off as TRL's ``extract_prompt`` does)
``trl_conversational``        TRL conversational: ``chosen``/``rejected`` message lists, with an
                              explicit ``prompt`` list or an implicit one (their shared turns)
============================  =====================================================================

Every preference format may add TRL's ``margin`` column, a number per pair that the reward
model's loss subtracts from the reward difference (0 where a row has none). A message's
``content`` may be text or a list of parts, whose text parts are joined; other parts (images)
are refused.

Every parser has the signature ``(rows, origin, [tokenizer,] strict=True)`` (those that can
meet conversational rows also take ``chat_template_kwargs``) and returns :class:`Parsed`, a
list of records whose ``issues`` attribute (a :class:`RowIssues`) holds the rows it skipped, by
reason. With ``strict`` the first bad row raises :class:`DataFormatError`
instead. Rows are numbered from 0 in the order read, so row ``n`` is ``rows[n]`` (and
``dataset[n]``); only malformed JSON is named by its 1-based line in the file, as it never
became a row. Problems of the whole source (no rows, a missing column, an unknown format, a
tokenizer without chat template) always raise, whatever ``strict`` says.

Conversational prompts are rendered with the tokenizer's chat template, ending with the
generation prompt, so that ``prompt + response`` is what the model is trained on. A BOS the
template writes is left out of the text when the tokenizer adds it while encoding, so it is
not doubled.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Generic, TypeVar

from transformers import PreTrainedTokenizerBase

from lit_p3o.data.issues import DataFormatError, RowIssues

__all__ = [
    "HH_ASSISTANT",
    "HH_HUMAN",
    "PREFERENCE_FORMATS",
    "SFT_FORMATS",
    "TLDR_PROMPT_TEMPLATE",
    "DataFormatError",
    "Parsed",
    "PreferenceRecord",
    "RowIssues",
    "SFTRecord",
    "detect_preference_format",
    "detect_sft_format",
    "parse_chosen",
    "parse_hh",
    "parse_messages",
    "parse_preferences",
    "parse_prompt_completion",
    "parse_prompts",
    "parse_sft",
    "parse_text",
    "parse_tldr",
    "parse_trl",
    "parse_trl_conversational",
    "parse_trl_implicit",
]

Row = Mapping[str, Any]
Message = Mapping[str, Any]
R = TypeVar("R")

HH_ASSISTANT = "\n\nAssistant:"
HH_HUMAN = "\n\nHuman:"
#: How a TL;DR post becomes a prompt; the summaries follow ``TL;DR:`` after a space.
TLDR_PROMPT_TEMPLATE = "SUBREDDIT: r/{subreddit}\nTITLE: {title}\nPOST: {post}\nTL;DR:"
SFT_FORMATS = ("prompt_completion", "messages", "text", "chosen")
PREFERENCE_FORMATS = ("hh", "tldr", "trl", "trl_implicit", "trl_conversational")


@dataclass(frozen=True)
class SFTRecord:
    prompt: str
    completion: str


@dataclass(frozen=True)
class PreferenceRecord:
    prompt: str
    chosen: str
    rejected: str
    margin: float = 0.0


class Parsed(list[R], Generic[R]):
    """The records of one source; a plain list, so callers that only want records need not
    care, plus :attr:`issues`, the skipped rows, for callers that report them, and
    :attr:`row_numbers`, each record's row number in the source (they differ from the
    records' positions once rows were skipped)."""

    def __init__(self, records: Iterable[R], issues: RowIssues, row_numbers: Iterable[int] | None = None) -> None:
        super().__init__(records)
        self.issues = issues
        self.row_numbers = list(range(len(self))) if row_numbers is None else list(row_numbers)
        if len(self.row_numbers) != len(self):
            raise ValueError(f"Parsed: {len(self)} records but {len(self.row_numbers)} row numbers")


class _BadRow(Exception):
    """One row cannot be used; ``reason`` is the same for all rows with the same fault, so
    skips group into counts."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


# --------------------------------------------------------------------------- shared row logic


def _parse_rows(
    rows: Sequence[Row], origin: str, strict: bool, columns: Sequence[str], parse_row: Callable[[Row], R]
) -> Parsed[R]:
    """Every row through ``parse_row``, with the checks and the strict/skip bookkeeping that
    all formats share."""
    _first_row(rows, origin)
    present = set().union(*rows)  # JSON lines need not agree on their keys
    missing = [column for column in columns if column not in present]
    if missing:
        raise DataFormatError(
            f"{origin}: no column {', '.join(f'`{c}`' for c in missing)} "
            f"(columns present: {', '.join(sorted(present))})"
        )
    issues = RowIssues(origin, strict)
    records, numbers = [], []
    for number, row in enumerate(rows):
        try:
            records.append(parse_row(row))
        except _BadRow as bad:
            issues.add(number, bad.field, bad.reason)
            continue
        numbers.append(number)
    issues.report(total=len(rows))
    return Parsed(records, issues, numbers)


def _first_row(rows: Sequence[Row], origin: str) -> Row:
    """Formats are told from the first row, as TRL does; no rows is an error, not an empty dataset."""
    if not rows:
        raise DataFormatError(f"{origin}: no rows")
    return rows[0]


def _as_text(value: Any, field: str, allow_empty: bool = False) -> str:
    if value is None:
        raise _BadRow(field, "missing")
    if not isinstance(value, str):
        raise _BadRow(field, f"expected text, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise _BadRow(field, "empty")
    return value


def _as_messages(value: Any, field: str) -> list[Message]:
    """A non-empty message list with text roles; ``content`` given as a list of parts becomes
    the text of its text parts, joined (as multimodal chat templates print them)."""
    if value is None:
        raise _BadRow(field, "missing")
    if not isinstance(value, list) or not value:
        raise _BadRow(field, "expected a non-empty list of messages")
    messages = []
    for message in value:
        if not (isinstance(message, Mapping) and isinstance(message.get("role"), str)):
            raise _BadRow(field, "every message needs a text `role` and `content`")
        content = message.get("content")
        if isinstance(content, list):
            content = _text_of_parts(content, field)
        if not isinstance(content, str):
            raise _BadRow(field, "every message needs a text `role` and `content`")
        messages.append({**message, "content": content})
    return messages


def _text_of_parts(parts: list[Any], field: str) -> str:
    """``[{"type": "text", "text": ...}, ...]`` → the texts joined; any other part is refused."""
    texts = []
    for part in parts:
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind != "text" or not isinstance(part.get("text"), str):
            what = f"a part of type {kind!r}" if kind is not None else "a part without a `type`"
            raise _BadRow(field, f"message content holds {what}; only text parts are supported")
        texts.append(part["text"])
    return "".join(texts)


def _assistant_reply(messages: list[Message], field: str) -> str:
    """The final message's text, which must be a non-empty assistant turn."""
    if messages[-1]["role"] != "assistant":
        raise _BadRow(field, "the last message is not the assistant's")
    if not messages[-1]["content"].strip():
        raise _BadRow(field, "empty assistant reply")
    return messages[-1]["content"]


def _only_reply(messages: list[Message], field: str) -> str:
    """A TRL completion list holds the reply alone; further turns would be silently lost."""
    if len(messages) != 1:
        raise _BadRow(field, "expected exactly one assistant message")
    return _assistant_reply(messages, field)


def _context(messages: list[Message], field: str) -> list[Message]:
    """The turns before a conversation's final reply; there must be some to condition on."""
    if len(messages) < 2:
        raise _BadRow(field, "no turns before the final assistant reply")
    return messages[:-1]


def _require_chat_template(tokenizer: PreTrainedTokenizerBase | None, origin: str) -> None:
    """Fail once, up front: a missing template is the setup's fault, not any row's."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        lack = "no tokenizer was given" if tokenizer is None else "this tokenizer has no chat template"
        raise DataFormatError(
            f"{origin}: conversational rows (lists of messages) are rendered with the tokenizer's chat "
            f"template, but {lack}; use a tokenizer that has one, or plain-text prompt/completion columns"
        )


def _render(
    tokenizer: PreTrainedTokenizerBase, messages: list[Message], chat_template_kwargs: Mapping[str, Any] | None = None
) -> str:
    """The conversation as the model sees it, ending where the assistant's reply begins.

    ``chat_template_kwargs`` go to ``apply_chat_template`` (e.g. ``enable_thinking``). A
    leading BOS written by the template (Llama-3's) is dropped when encoding adds it anyway.
    """
    text = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, **(chat_template_kwargs or {})
    )
    bos = tokenizer.bos_token
    if bos and text.startswith(bos) and tokenizer("")["input_ids"][:1] == [tokenizer.bos_token_id]:
        text = text[len(bos) :]
    return text


def render_user_turn(
    tokenizer: PreTrainedTokenizerBase, text: str, chat_template_kwargs: Mapping[str, Any] | None = None
) -> str:
    """A plain prompt as the one user message of a conversation, rendered as conversational
    prompts are (generation prompt, no doubled BOS)."""
    return _render(tokenizer, [{"role": "user", "content": text}], chat_template_kwargs)


def _pair(row: Row, prompt: str, chosen: str, rejected: str) -> PreferenceRecord:
    """The checks all preference formats share: two non-empty responses that differ (beyond
    surrounding whitespace), since an indistinguishable pair teaches a reward model nothing;
    and the row's optional ``margin``, a finite number (0 when absent or null)."""
    for field, response in (("chosen", chosen), ("rejected", rejected)):
        if not response.strip():
            raise _BadRow(field, "empty response")
    if chosen.strip() == rejected.strip():
        raise _BadRow("chosen/rejected", "identical responses")
    margin = row.get("margin")
    if margin is None:
        return PreferenceRecord(prompt, chosen, rejected)
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin):
        raise _BadRow("margin", "not a finite number")
    return PreferenceRecord(prompt, chosen, rejected, float(margin))


# --------------------------------------------------------------------------- SFT


def detect_sft_format(columns: Iterable[str], origin: str = "the data") -> str:
    """One of :data:`SFT_FORMATS`, from the column names; ``origin`` is named in the error."""
    columns = set(columns)
    if "messages" in columns:
        return "messages"
    if {"prompt", "completion"} <= columns:
        return "prompt_completion"
    if "text" in columns and "prompt" not in columns:  # a prompt without completion is more likely a slip
        return "text"
    if {"chosen", "rejected"} <= columns or {"info", "summaries", "choice"} <= columns:
        return "chosen"
    raise DataFormatError(
        f"cannot tell the SFT format of {origin} from its columns ({', '.join(sorted(columns))}): "
        "expected `prompt` and `completion`, `messages`, `text` (without `prompt`), or a preference "
        "dataset's `chosen` and `rejected`"
    )


def _text_prompt_completion(row: Row) -> SFTRecord:
    prompt = _as_text(row.get("prompt"), "prompt", allow_empty=True)
    return SFTRecord(prompt, _as_text(row.get("completion"), "completion"))


def _conversational_prompt_completion(
    row: Row, tokenizer: PreTrainedTokenizerBase, chat_template_kwargs: Mapping[str, Any] | None = None
) -> SFTRecord:
    prompt = _as_messages(row.get("prompt"), "prompt")
    completion = _only_reply(_as_messages(row.get("completion"), "completion"), "completion")
    return SFTRecord(_render(tokenizer, prompt, chat_template_kwargs), completion)


def _conversation(
    row: Row, tokenizer: PreTrainedTokenizerBase, chat_template_kwargs: Mapping[str, Any] | None = None
) -> SFTRecord:
    messages = _as_messages(row.get("messages"), "messages")
    completion = _assistant_reply(messages, "messages")
    return SFTRecord(_render(tokenizer, _context(messages, "messages"), chat_template_kwargs), completion)


def parse_prompt_completion(
    rows: Sequence[Row],
    origin: str,
    tokenizer: PreTrainedTokenizerBase | None = None,
    strict: bool = True,
    chat_template_kwargs: Mapping[str, Any] | None = None,
) -> Parsed[SFTRecord]:
    """``prompt``/``completion`` rows: plain text (the prompt may be empty, the completion not),
    or, when the first row's prompt is a message list, TRL conversational prompt-completion,
    whose prompt is rendered with ``tokenizer``'s chat template (``chat_template_kwargs`` passed
    to ``apply_chat_template``, as for every conversational format)."""
    if isinstance(_first_row(rows, origin).get("prompt"), list):
        _require_chat_template(tokenizer, origin)
        parse_row = partial(
            _conversational_prompt_completion, tokenizer=tokenizer, chat_template_kwargs=chat_template_kwargs
        )
    else:
        parse_row = _text_prompt_completion
    return _parse_rows(rows, origin, strict, ("prompt", "completion"), parse_row)


def parse_messages(
    rows: Sequence[Row],
    origin: str,
    tokenizer: PreTrainedTokenizerBase | None,
    strict: bool = True,
    chat_template_kwargs: Mapping[str, Any] | None = None,
) -> Parsed[SFTRecord]:
    """``messages`` conversations: the completion is the final assistant message, the prompt
    everything before it in ``tokenizer``'s chat template."""
    _require_chat_template(tokenizer, origin)
    parse_row = partial(_conversation, tokenizer=tokenizer, chat_template_kwargs=chat_template_kwargs)
    return _parse_rows(rows, origin, strict, ("messages",), parse_row)


def parse_text(rows: Sequence[Row], origin: str, strict: bool = True) -> Parsed[SFTRecord]:
    """``text`` rows (TRL's language-modelling format): an empty prompt and the whole text as
    the completion, so every token of it (and EOS) is trained on."""
    return _parse_rows(rows, origin, strict, ("text",), lambda row: SFTRecord("", _as_text(row.get("text"), "text")))


def parse_chosen(
    rows: Sequence[Row],
    origin: str,
    tokenizer: PreTrainedTokenizerBase | None = None,
    strict: bool = True,
    chat_template_kwargs: Mapping[str, Any] | None = None,
) -> Parsed[SFTRecord]:
    """A preference dataset as SFT data: each pair's prompt and chosen reply (the rejected one
    is not trained on), as SFT on HH-RLHF's preferred transcripts is usually done."""
    pairs = parse_preferences(
        rows, origin, tokenizer=tokenizer, strict=strict, chat_template_kwargs=chat_template_kwargs
    )
    return Parsed((SFTRecord(p.prompt, p.chosen) for p in pairs), pairs.issues, pairs.row_numbers)


def parse_sft(
    rows: Sequence[Row],
    origin: str,
    tokenizer: PreTrainedTokenizerBase | None = None,
    strict: bool = True,
    format: str = "auto",
    chat_template_kwargs: Mapping[str, Any] | None = None,
) -> Parsed[SFTRecord]:
    """SFT records in any of :data:`SFT_FORMATS`, told from the first row's columns unless
    ``format`` names one (when a source has both ``messages`` and prompt/completion)."""
    parsers = {
        "prompt_completion": parse_prompt_completion,
        "messages": parse_messages,
        "text": lambda rows, origin, tokenizer, strict, chat_template_kwargs: parse_text(rows, origin, strict),
        "chosen": parse_chosen,
    }
    if format == "auto":
        format = detect_sft_format(_first_row(rows, origin).keys(), origin)
    elif format not in parsers:
        raise DataFormatError(f"{origin}: unknown SFT format {format!r}; known: auto, {', '.join(SFT_FORMATS)}")
    return parsers[format](rows, origin, tokenizer=tokenizer, strict=strict, chat_template_kwargs=chat_template_kwargs)


# --------------------------------------------------------------------------- prompts


def _prompt(row: Row) -> str:
    return _as_text(row.get("prompt"), "prompt")


def _conversational_prompt(
    row: Row, tokenizer: PreTrainedTokenizerBase, chat_template_kwargs: Mapping[str, Any] | None
) -> str:
    messages = _as_messages(row.get("prompt"), "prompt")
    if messages[-1]["role"] == "assistant":
        raise _BadRow("prompt", "the last message is the assistant's; a prompt ends with the turn the model answers")
    return _render(tokenizer, messages, chat_template_kwargs)


def parse_prompts(
    rows: Sequence[Row],
    origin: str,
    tokenizer: PreTrainedTokenizerBase | None = None,
    strict: bool = True,
    chat_template_kwargs: Mapping[str, Any] | None = None,
) -> Parsed[str]:
    """Prompt-only rows: ``prompt`` as non-empty text or, when the first row's prompt is a
    message list (TRL conversational prompt-only), rendered with ``tokenizer``'s chat template
    and the generation prompt, ``chat_template_kwargs`` passed to ``apply_chat_template``."""
    if isinstance(_first_row(rows, origin).get("prompt"), list):
        _require_chat_template(tokenizer, origin)
        parse_row = partial(_conversational_prompt, tokenizer=tokenizer, chat_template_kwargs=chat_template_kwargs)
    else:
        parse_row = _prompt
    return _parse_rows(rows, origin, strict, ("prompt",), parse_row)


# --------------------------------------------------------------------------- preferences


def _split_hh(transcript: str, field: str) -> tuple[str, str]:
    """(everything up to and including the last ``\\n\\nAssistant:``, the reply after it), so
    that the two parts concatenate back to the transcript."""
    cut = transcript.rfind(HH_ASSISTANT)
    if cut < 0:
        raise _BadRow(field, "no '\\n\\nAssistant:' turn")
    cut += len(HH_ASSISTANT)
    if HH_HUMAN in transcript[cut:]:
        raise _BadRow(field, "ends with a Human turn, not an Assistant reply")
    return transcript[:cut], transcript[cut:]


def _hh(row: Row) -> PreferenceRecord:
    prompt, chosen = _split_hh(_as_text(row.get("chosen"), "chosen"), "chosen")
    rejected_prompt, rejected = _split_hh(_as_text(row.get("rejected"), "rejected"), "rejected")
    if rejected_prompt != prompt:
        raise _BadRow("chosen/rejected", "the transcripts differ before the final Assistant reply")
    return _pair(row, prompt, chosen, rejected)


def _tldr(row: Row) -> PreferenceRecord:
    info = row.get("info")
    if not isinstance(info, Mapping):
        raise _BadRow("info", "missing" if info is None else "expected an object")
    prompt = TLDR_PROMPT_TEMPLATE.format(
        **{name: _as_text(info.get(name), f"info.{name}") for name in ("subreddit", "title", "post")}
    )
    summaries = row.get("summaries")
    if not isinstance(summaries, list) or len(summaries) != 2:
        raise _BadRow("summaries", "expected a list of two summaries")
    texts = []
    for index, summary in enumerate(summaries):
        text = _as_text(summary.get("text") if isinstance(summary, Mapping) else None, f"summaries[{index}].text")
        texts.append(text if text.startswith(" ") else " " + text)
    choice = row.get("choice")
    if choice is None:
        raise _BadRow("choice", "missing")
    if not isinstance(choice, int) or isinstance(choice, bool):
        raise _BadRow("choice", "not an integer")
    if choice not in (0, 1):
        raise _BadRow("choice", "out of range (0 or 1)")
    return _pair(row, prompt, texts[choice], texts[1 - choice])


def _trl(row: Row) -> PreferenceRecord:
    return _pair(
        row,
        _as_text(row.get("prompt"), "prompt", allow_empty=True),
        _as_text(row.get("chosen"), "chosen", allow_empty=True),
        _as_text(row.get("rejected"), "rejected", allow_empty=True),
    )


def _trl_conversational(
    row: Row, tokenizer: PreTrainedTokenizerBase, chat_template_kwargs: Mapping[str, Any] | None = None
) -> PreferenceRecord:
    chosen = _as_messages(row.get("chosen"), "chosen")
    rejected = _as_messages(row.get("rejected"), "rejected")
    if row.get("prompt") is not None:
        prompt = _as_messages(row["prompt"], "prompt")
        prompt_text = _render(tokenizer, prompt, chat_template_kwargs)
        return _pair(row, prompt_text, _only_reply(chosen, "chosen"), _only_reply(rejected, "rejected"))
    prompt = _context(chosen, "chosen")  # implicit prompt: the turns both conversations share
    if rejected[:-1] != prompt:
        raise _BadRow("chosen/rejected", "the conversations differ before the final assistant reply")
    prompt_text = _render(tokenizer, prompt, chat_template_kwargs)
    return _pair(row, prompt_text, _assistant_reply(chosen, "chosen"), _assistant_reply(rejected, "rejected"))


def shared_prefix_length(chosen: str, rejected: str) -> int:
    """Where TRL's ``extract_prompt`` cuts an implicit prompt: the longest common prefix,
    less a final space (which then starts both responses)."""
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    return n - 1 if n > 0 and chosen[n - 1] == " " and n < min(len(chosen), len(rejected)) else n


def _trl_implicit(row: Row) -> PreferenceRecord:
    chosen = _as_text(row.get("chosen"), "chosen")
    rejected = _as_text(row.get("rejected"), "rejected")
    cut = shared_prefix_length(chosen, rejected)
    return _pair(row, chosen[:cut], chosen[cut:], rejected[cut:])


def parse_hh(rows: Sequence[Row], origin: str, strict: bool = True) -> Parsed[PreferenceRecord]:
    """Anthropic HH-RLHF transcripts; the prompt is the part both share up to and including the
    last ``\\n\\nAssistant:``, the responses what follows it (with their leading space)."""
    return _parse_rows(rows, origin, strict, ("chosen", "rejected"), _hh)


def parse_tldr(rows: Sequence[Row], origin: str, strict: bool = True) -> Parsed[PreferenceRecord]:
    """TL;DR comparisons; the prompt is :data:`TLDR_PROMPT_TEMPLATE` filled from ``info``, the
    responses the two summaries (given a leading space if they lack one), ordered by ``choice``."""
    return _parse_rows(rows, origin, strict, ("info", "summaries", "choice"), _tldr)


def parse_trl(rows: Sequence[Row], origin: str, strict: bool = True) -> Parsed[PreferenceRecord]:
    """TRL standard preference rows: ``prompt``, ``chosen`` and ``rejected`` as plain text."""
    return _parse_rows(rows, origin, strict, ("prompt", "chosen", "rejected"), _trl)


def parse_trl_implicit(rows: Sequence[Row], origin: str, strict: bool = True) -> Parsed[PreferenceRecord]:
    """TRL implicit-prompt rows: ``chosen``/``rejected`` texts whose shared prefix is the prompt
    (:func:`shared_prefix_length`); a pair where one text contains the other whole leaves an
    empty response and is a bad row."""
    return _parse_rows(rows, origin, strict, ("chosen", "rejected"), _trl_implicit)


def parse_trl_conversational(
    rows: Sequence[Row],
    origin: str,
    tokenizer: PreTrainedTokenizerBase | None,
    strict: bool = True,
    chat_template_kwargs: Mapping[str, Any] | None = None,
) -> Parsed[PreferenceRecord]:
    """TRL conversational preference rows. With a ``prompt`` message list, ``chosen`` and
    ``rejected`` each hold one assistant message; without, they are whole conversations whose
    turns before the final reply are the (shared) prompt. Prompts use ``tokenizer``'s chat template."""
    _require_chat_template(tokenizer, origin)
    parse_row = partial(_trl_conversational, tokenizer=tokenizer, chat_template_kwargs=chat_template_kwargs)
    return _parse_rows(rows, origin, strict, ("chosen", "rejected"), parse_row)


def detect_preference_format(row: Row, origin: str = "the data") -> str:
    """One of :data:`PREFERENCE_FORMATS`, from a (first) row: its columns, and whether
    ``chosen`` is text or a message list; ``origin`` is named in the error."""
    columns = set(row)
    if {"info", "summaries", "choice"} <= columns:
        return "tldr"
    if {"chosen", "rejected"} <= columns:
        if isinstance(row["chosen"], list):
            return "trl_conversational"
        if "prompt" in columns:
            return "trl"
        return "hh" if isinstance(row["chosen"], str) and HH_ASSISTANT in row["chosen"] else "trl_implicit"
    raise DataFormatError(
        f"cannot tell the preference format of {origin} from its columns ({', '.join(sorted(columns))}); "
        "known formats: hh (chosen, rejected transcripts), tldr (info, summaries, choice), "
        "trl (prompt, chosen, rejected text), trl_implicit (chosen, rejected text sharing a prompt), trl_conversational (chosen, rejected messages, optional prompt)"
    )


def parse_preferences(
    rows: Sequence[Row],
    origin: str,
    format: str = "auto",
    tokenizer: PreTrainedTokenizerBase | None = None,
    strict: bool = True,
    chat_template_kwargs: Mapping[str, Any] | None = None,
) -> Parsed[PreferenceRecord]:
    """Preference records in any of :data:`PREFERENCE_FORMATS`, detected from the first row
    unless ``format`` names one; ``chat_template_kwargs`` go to ``apply_chat_template`` for
    conversational rows."""
    parsers: dict[str, Callable[..., Parsed[PreferenceRecord]]] = {
        "hh": parse_hh,
        "tldr": parse_tldr,
        "trl": parse_trl,
        "trl_implicit": parse_trl_implicit,
        "trl_conversational": partial(
            parse_trl_conversational, tokenizer=tokenizer, chat_template_kwargs=chat_template_kwargs
        ),
    }
    if format == "auto":
        format = detect_preference_format(_first_row(rows, origin), origin)
    elif format not in parsers:
        raise DataFormatError(
            f"{origin}: unknown preference format {format!r}; known: auto, {', '.join(PREFERENCE_FORMATS)}"
        )
    return parsers[format](rows, origin, strict=strict)
