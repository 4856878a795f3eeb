"""Raw rows of real datasets → uniform records, one small parser per format.

Loading (:func:`load_rows`) accepts JSONL/JSON files (read line by line, so a malformed line
is reported with its number), ``datasets.save_to_disk`` directories, and anything
``datasets.load_dataset`` reads (hub names, local data directories). Parsers turn rows into
:class:`SFTRecord` or :class:`PreferenceRecord`; a bad row raises :class:`DataFormatError`
naming origin, row (0-based) and field when ``strict``, or is skipped, counted and logged.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from lit_p3o.data.issues import DataFormatError, RowIssues

HH_ASSISTANT = "\n\nAssistant:"
TLDR_TEMPLATE = "SUBREDDIT: r/{subreddit}\nTITLE: {title}\nPOST: {post}\nTL;DR:"


@dataclass(frozen=True)
class SFTRecord:
    prompt: str
    completion: str


@dataclass(frozen=True)
class PreferenceRecord:
    prompt: str
    chosen: str
    rejected: str


class BadRow(ValueError):
    """Raised by a row parser; carries the offending field."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(reason)
        self.field = field


# --------------------------------------------------------------------------- loading


def load_rows(source: str, split: str = "train") -> tuple[list[dict[str, Any]], str]:
    """Rows of ``source`` and a label naming it in messages."""
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix not in (".jsonl", ".json"):
            raise DataFormatError(f"{source}: expected a .jsonl or .json file")
        return _read_json(path), str(path)
    if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "dataset_info.json").is_file()):
        return _read_saved(path, split), f"{path} [{split}]"
    if not path.exists() and (path.suffix or source.startswith((".", "/", "~")) or source.count("/") > 1):
        raise FileNotFoundError(f"no such data file or directory: {source!r}")
    import datasets

    try:
        dataset = datasets.load_dataset(source, split=split)
    except ValueError as err:  # unknown split and friends
        raise DataFormatError(f"{source}: {err}") from err
    return list(dataset), f"{source} [{split}]"


def _read_json(path: Path) -> list[dict[str, Any]]:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json" and text.lstrip().startswith("["):
        rows = json.loads(text)
    else:
        rows = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise DataFormatError(f"{path}: line {number}: malformed JSON ({err.msg})") from err
    for number, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataFormatError(f"{path}: row {number}: expected a JSON object, got {type(row).__name__}")
    return rows


def _read_saved(path: Path, split: str) -> list[dict[str, Any]]:
    import datasets

    saved = datasets.load_from_disk(str(path))
    if isinstance(saved, datasets.DatasetDict):
        if split not in saved:
            raise DataFormatError(f"{path}: no split {split!r}; available splits: {', '.join(saved)}")
        saved = saved[split]
    return list(saved)


# --------------------------------------------------------------------------- shared helpers


def _parse_all(rows: list[dict[str, Any]], origin: str, strict: bool, parse_row: Callable[[dict], Any]) -> list[Any]:
    """Run ``parse_row`` on every row with the strict/skip bookkeeping done once."""
    issues = RowIssues(origin, strict)
    records = []
    for number, row in enumerate(rows):
        try:
            records.append(parse_row(row))
        except BadRow as err:
            issues.add(number, err.field, str(err))
    issues.report(total=len(rows))
    return records


def _text(row: dict[str, Any], field: str, allow_empty: bool = False) -> str:
    if field not in row or row[field] is None:
        raise BadRow(field, f"missing (columns present: {', '.join(sorted(row))})")
    value = row[field]
    if not isinstance(value, str):
        raise BadRow(field, f"expected text, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise BadRow(field, "empty")
    return value


def _messages(row: dict[str, Any], field: str) -> list[dict[str, str]]:
    value = row.get(field)
    if not isinstance(value, list) or not value:
        raise BadRow(field, "expected a non-empty list of {role, content} messages")
    for m in value:
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise BadRow(field, "every message needs `role` and `content`")
    return value


def _final_assistant(messages: list[dict[str, str]], field: str) -> str:
    if messages[-1]["role"] != "assistant":
        raise BadRow(field, "the last message must be the assistant's")
    if not str(messages[-1]["content"]).strip():
        raise BadRow(field, "empty assistant response")
    return messages[-1]["content"]


def render_chat_prompt(tokenizer: PreTrainedTokenizerBase | None, messages: list[dict[str, str]]) -> str:
    """Messages before the response, in the tokenizer's chat template, ready for the reply."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise DataFormatError(
            "conversational rows need a tokenizer with a chat template; this tokenizer has none "
            "(use plain-text prompt/completion columns instead)"
        )
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


# --------------------------------------------------------------------------- SFT


def detect_sft_format(columns: set[str] | list[str]) -> str:
    """``"messages"`` or ``"prompt_completion"`` from the column names."""
    columns = set(columns)
    if "messages" in columns:
        return "messages"
    if {"prompt", "completion"} <= columns:
        return "prompt_completion"
    raise DataFormatError(
        f"cannot tell the SFT format from columns {sorted(columns)}: expected `prompt`+`completion` or `messages`"
    )


def parse_sft(
    rows: list[dict[str, Any]],
    origin: str,
    tokenizer: PreTrainedTokenizerBase | None = None,
    strict: bool = True,
    format: str = "auto",
) -> list[SFTRecord]:
    """SFT records from prompt/completion rows (text or message lists) or ``messages`` rows."""
    if not rows:
        raise DataFormatError(f"{origin}: no rows")
    fmt = detect_sft_format(rows[0].keys()) if format == "auto" else format

    def prompt_completion(row: dict[str, Any]) -> SFTRecord:
        if isinstance(row.get("prompt"), list):  # TRL conversational prompt-completion
            completion = _final_assistant(_messages(row, "completion"), "completion")
            return SFTRecord(render_chat_prompt(tokenizer, _messages(row, "prompt")), completion)
        return SFTRecord(_text(row, "prompt", allow_empty=True), _text(row, "completion"))

    def messages(row: dict[str, Any]) -> SFTRecord:
        turns = _messages(row, "messages")
        completion = _final_assistant(turns, "messages")
        return SFTRecord(render_chat_prompt(tokenizer, turns[:-1]), completion)

    parsers = {"prompt_completion": prompt_completion, "messages": messages}
    if fmt not in parsers:
        raise DataFormatError(f"unknown SFT format {fmt!r}; known: auto, {', '.join(parsers)}")
    if fmt == "messages" or isinstance(rows[0].get("prompt"), list):
        render_chat_prompt(tokenizer, [{"role": "user", "content": "probe"}])  # fail once, early
    return _parse_all(rows, origin, strict, parsers[fmt])


# --------------------------------------------------------------------------- preferences


def split_hh(transcript: str, field: str) -> tuple[str, str]:
    """HH transcript → (prompt up to and including the last ``\\n\\nAssistant:``, response)."""
    cut = transcript.rfind(HH_ASSISTANT)
    if cut < 0:
        raise BadRow(field, "no '\\n\\nAssistant:' turn in the transcript")
    cut += len(HH_ASSISTANT)
    return transcript[:cut], transcript[cut:]


def _distinct(prompt: str, chosen: str, rejected: str) -> PreferenceRecord:
    for field, text in (("chosen", chosen), ("rejected", rejected)):
        if not text.strip():
            raise BadRow(field, "empty final response")
    if chosen == rejected:
        raise BadRow("chosen/rejected", "identical chosen and rejected responses")
    return PreferenceRecord(prompt, chosen, rejected)


def _parse_hh(row: dict[str, Any]) -> PreferenceRecord:
    prompt, chosen = split_hh(_text(row, "chosen"), "chosen")
    other, rejected = split_hh(_text(row, "rejected"), "rejected")
    if prompt != other:
        raise BadRow("chosen/rejected", "the two transcripts do not share a prompt")
    return _distinct(prompt, chosen, rejected)


def _parse_tldr(row: dict[str, Any]) -> PreferenceRecord:
    info = row.get("info")
    if not isinstance(info, dict):
        raise BadRow("info", "missing or not an object")
    fields = {}
    for name in ("subreddit", "title", "post"):
        if not isinstance(info.get(name), str):
            raise BadRow(f"info.{name}", "missing or not text")
        fields[name] = info[name]
    summaries = row.get("summaries")
    if not isinstance(summaries, list) or len(summaries) < 2:
        raise BadRow("summaries", "expected a list of two summaries")
    texts = []
    for i, s in enumerate(summaries[:2]):
        if not isinstance(s, dict) or not isinstance(s.get("text"), str):
            raise BadRow(f"summaries[{i}].text", "missing or not text")
        texts.append(s["text"] if s["text"].startswith(" ") else " " + s["text"])
    choice = row.get("choice")
    if not isinstance(choice, int) or isinstance(choice, bool) or choice not in (0, 1):
        raise BadRow("choice", f"expected 0 or 1, got {choice!r}")
    return _distinct(TLDR_TEMPLATE.format(**fields), texts[choice], texts[1 - choice])


def _parse_trl(row: dict[str, Any]) -> PreferenceRecord:
    return _distinct(_text(row, "prompt", allow_empty=True), _text(row, "chosen"), _text(row, "rejected"))


def _conversational_parser(tokenizer: PreTrainedTokenizerBase | None) -> Callable[[dict], PreferenceRecord]:
    def parse(row: dict[str, Any]) -> PreferenceRecord:
        chosen_turns, rejected_turns = _messages(row, "chosen"), _messages(row, "rejected")
        if "prompt" in row:
            prompt_turns = _messages(row, "prompt")
        else:  # implicit prompt: the turns both conversations share
            prompt_turns = chosen_turns[:-1]
            if rejected_turns[:-1] != prompt_turns:
                raise BadRow("chosen/rejected", "the two conversations do not share a prompt")
        chosen = _final_assistant(chosen_turns, "chosen")
        rejected = _final_assistant(rejected_turns, "rejected")
        return _distinct(render_chat_prompt(tokenizer, prompt_turns), chosen, rejected)

    return parse


PREFERENCE_FORMATS = ("hh", "tldr", "trl", "trl_conversational")


def detect_preference_format(row: dict[str, Any]) -> str:
    """One of :data:`PREFERENCE_FORMATS`, from the first row."""
    if {"info", "summaries", "choice"} <= set(row):
        return "tldr"
    if isinstance(row.get("chosen"), list):
        return "trl_conversational"
    if "prompt" in row and {"chosen", "rejected"} <= set(row):
        return "trl"
    if {"chosen", "rejected"} <= set(row):
        return "hh"
    raise DataFormatError(
        f"cannot tell the preference format from columns {sorted(row)}; known formats: {', '.join(PREFERENCE_FORMATS)}"
    )


def parse_preferences(
    rows: list[dict[str, Any]],
    origin: str,
    format: str = "auto",
    tokenizer: PreTrainedTokenizerBase | None = None,
    strict: bool = True,
) -> list[PreferenceRecord]:
    """Preference records from HH, TL;DR comparisons, TRL standard or conversational rows."""
    if not rows:
        raise DataFormatError(f"{origin}: no rows")
    fmt = detect_preference_format(rows[0]) if format == "auto" else format
    parsers = {"hh": _parse_hh, "tldr": _parse_tldr, "trl": _parse_trl}
    if fmt == "trl_conversational":
        render_chat_prompt(tokenizer, [{"role": "user", "content": "probe"}])  # fail once, early
        return _parse_all(rows, origin, strict, _conversational_parser(tokenizer))
    if fmt not in parsers:
        raise DataFormatError(f"unknown preference format {fmt!r}; known: auto, {', '.join(PREFERENCE_FORMATS)}")
    return _parse_all(rows, origin, strict, parsers[fmt])
