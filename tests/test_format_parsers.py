"""lit_p3o.data.formats on tests/fixtures/prefs: every preference parser on its fixture, every bad row strict and
skipped, and SFT parsing."""

from __future__ import annotations

import logging
import re

import pytest
from prefs_fixtures import (
    CONV,
    CONV_BAD,
    CONV_RECORDS,
    HH,
    HH_BAD,
    HH_RECORDS,
    IMPLICIT,
    IMPLICIT_BAD,
    IMPLICIT_RECORDS,
    TLDR,
    TLDR_BAD,
    TLDR_RECORDS,
    TRL,
    TRL_RECORDS,
    A,
    H,
    rows_of,
)

from lit_p3o.data.formats import (
    TLDR_PROMPT_TEMPLATE,
    DataFormatError,
    PreferenceRecord,
    SFTRecord,
    detect_preference_format,
    detect_sft_format,
    parse_hh,
    parse_preferences,
    parse_sft,
    parse_tldr,
    parse_trl,
    parse_trl_conversational,
)
from lit_p3o.data.sources import load_rows

DATA_LOG = "lit_p3o.data"


# (fixture, parser(rows, origin, tokenizer, strict), good records, bad rows)
CASES = {
    "hh": (HH, lambda rows, o, tok, strict: parse_hh(rows, o, strict=strict), HH_RECORDS, HH_BAD),
    "tldr": (TLDR, lambda rows, o, tok, strict: parse_tldr(rows, o, strict=strict), TLDR_RECORDS, TLDR_BAD),
    "trl": (TRL, lambda rows, o, tok, strict: parse_trl(rows, o, strict=strict), TRL_RECORDS, {}),
    "trl_conversational": (CONV, parse_trl_conversational, CONV_RECORDS, CONV_BAD),
    "trl_implicit": (IMPLICIT, parse_trl_conversational, IMPLICIT_RECORDS, IMPLICIT_BAD),
}


# --------------------------------------------------------------------------- parsers


@pytest.mark.parametrize("name", list(CASES))
def test_parser_records_in_skip_mode(name, chat_tokenizer, caplog):
    path, parse, records, bad = CASES[name]
    rows, origin = load_rows(str(path))
    assert origin == str(path)
    with caplog.at_level(logging.WARNING, logger=DATA_LOG):
        parsed = parse(rows, origin, chat_tokenizer, False)
    assert list(parsed) == records
    assert parsed.row_numbers == [i for i in range(len(rows)) if i not in bad]
    assert parsed.issues.skipped == len(bad)
    assert dict(parsed.issues.rows) == {f"{field}: {reason}": [row] for row, (field, reason) in bad.items()}
    warnings = [r.getMessage() for r in caplog.records if r.name == DATA_LOG]
    if not bad:
        assert warnings == []
        return
    parts = "; ".join(f"1 × {field}: {reason} (rows {row})" for row, (field, reason) in bad.items())
    assert warnings == [f"skipped {len(bad)} of {len(rows)} rows of {origin}: {parts}"]


def test_parse_preferences_detects_every_fixture(chat_tokenizer):
    expected = {"hh": HH, "tldr": TLDR, "trl": TRL, "trl_conversational": CONV}
    for format, path in expected.items():
        rows, origin = load_rows(str(path))
        assert detect_preference_format(rows[0], origin) == format
        parsed = parse_preferences(rows, origin, tokenizer=chat_tokenizer, strict=False)
        assert list(parsed) == CASES[format][2]
    assert detect_preference_format(rows_of(IMPLICIT)[0]) == "trl_conversational"
    rows, origin = load_rows(str(IMPLICIT))
    assert list(parse_preferences(rows, origin, tokenizer=chat_tokenizer, strict=False)) == IMPLICIT_RECORDS


def _strict_cases():
    for name, (_, _, _, bad) in CASES.items():
        for row, (field, reason) in bad.items():
            yield pytest.param(name, row, field, reason, id=f"{name}-row{row}")


@pytest.mark.parametrize("name,row,field,reason", list(_strict_cases()))
def test_every_bad_row_in_strict_mode(name, row, field, reason, chat_tokenizer):
    """Each bad row, with the bad rows before it replaced by a good one, so it is the first
    error and keeps its row number; the message names origin, row and field."""
    path, parse, _, bad = CASES[name]
    rows = rows_of(path)
    rows = [rows[0] if (i in bad and i != row) else r for i, r in enumerate(rows)]
    with pytest.raises(DataFormatError) as info:
        parse(rows, str(path), chat_tokenizer, True)
    assert str(info.value) == f"{path}: row {row}: field `{field}`: {reason}"
    # the same through the auto-detecting entry point
    with pytest.raises(DataFormatError, match=re.escape(f"{path}: row {row}: field `{field}`: {reason}")):
        parse_preferences(rows, str(path), tokenizer=chat_tokenizer, strict=True)


def test_split_hh_keeps_the_leading_space_and_concatenates_back():
    rows = rows_of(HH)
    record = parse_hh(rows[:1], "hh")[0]
    assert record.prompt + record.chosen == rows[0]["chosen"]
    assert record.prompt + record.rejected == rows[0]["rejected"]
    assert record.prompt.endswith("\n\nAssistant:") and record.chosen.startswith(" Usually")


@pytest.mark.parametrize(
    "row,field,reason",
    [
        (
            {"chosen": f"{H} hi{A} hello{H} bye", "rejected": f"{H} hi{A} yo"},
            "chosen",
            "ends with a Human turn, not an Assistant reply",
        ),
        ({"chosen": 3, "rejected": f"{H} hi{A} yo"}, "chosen", "expected text, got int"),
        ({"chosen": "   ", "rejected": f"{H} hi{A} yo"}, "chosen", "empty"),
    ],
)
def test_hh_more_bad_rows(row, field, reason):
    with pytest.raises(DataFormatError) as info:
        parse_hh([row], "hh.jsonl")
    assert str(info.value) == f"hh.jsonl: row 0: field `{field}`: {reason}"


def _tldr_row(**change):
    row = rows_of(TLDR)[0]
    row.update(change)
    return row


@pytest.mark.parametrize(
    "row,field,reason",
    [
        (_tldr_row(info={"post": "p", "subreddit": "s"}), "info.title", "missing"),
        (_tldr_row(info="text"), "info", "expected an object"),
        (_tldr_row(choice=True), "choice", "not an integer"),
        (_tldr_row(choice=1.0), "choice", "not an integer"),
        (_tldr_row(choice=-1), "choice", "out of range (0 or 1)"),
        (_tldr_row(choice=None), "choice", "missing"),
        (
            _tldr_row(summaries=[{"text": " a"}, {"text": " b"}, {"text": " c"}]),
            "summaries",
            "expected a list of two summaries",
        ),
        (_tldr_row(summaries=[{"text": " a"}, {"summary": " b"}]), "summaries[1].text", "missing"),
        (_tldr_row(summaries=[{"text": " a"}, {"text": "  "}]), "summaries[1].text", "empty"),
    ],
)
def test_tldr_more_bad_rows(row, field, reason):
    with pytest.raises(DataFormatError) as info:
        parse_tldr([row], "tldr.jsonl")
    assert str(info.value) == f"tldr.jsonl: row 0: field `{field}`: {reason}"


def test_tldr_prompt_template():
    assert (
        TLDR_PROMPT_TEMPLATE.format(subreddit="a", title="b", post="c") == "SUBREDDIT: r/a\nTITLE: b\nPOST: c\nTL;DR:"
    )


@pytest.mark.parametrize(
    "row,field,reason",
    [
        ({"prompt": "p", "chosen": "", "rejected": "b"}, "chosen", "empty response"),
        ({"prompt": "p", "chosen": "a", "rejected": " \n"}, "rejected", "empty response"),
        ({"prompt": "p", "chosen": 7, "rejected": "b"}, "chosen", "expected text, got int"),
        ({"prompt": None, "chosen": "a", "rejected": "b"}, "prompt", "missing"),
        ({"prompt": "p", "chosen": " same ", "rejected": "same"}, "chosen/rejected", "identical responses"),
    ],
)
def test_trl_bad_rows(row, field, reason):
    with pytest.raises(DataFormatError) as info:
        parse_trl([row], "trl.jsonl")
    assert str(info.value) == f"trl.jsonl: row 0: field `{field}`: {reason}"


def test_trl_allows_an_empty_prompt():
    assert list(parse_trl([{"prompt": "", "chosen": "a", "rejected": "b"}], "o")) == [PreferenceRecord("", "a", "b")]


@pytest.mark.parametrize(
    "row,field,reason",
    [
        (
            {
                "prompt": [{"role": "user"}],
                "chosen": [{"role": "assistant", "content": "a"}],
                "rejected": [{"role": "assistant", "content": "b"}],
            },
            "prompt",
            "every message needs a text `role` and `content`",
        ),
        (
            {
                "prompt": [{"role": "user", "content": "q"}],
                "chosen": [],
                "rejected": [{"role": "assistant", "content": "b"}],
            },
            "chosen",
            "expected a non-empty list of messages",
        ),
        (
            {
                "prompt": [{"role": "user", "content": "q"}],
                "chosen": [{"role": "assistant", "content": " "}],
                "rejected": [{"role": "assistant", "content": "b"}],
            },
            "chosen",
            "empty assistant reply",
        ),
    ],
)
def test_trl_conversational_more_bad_rows(row, field, reason, chat_tokenizer):
    with pytest.raises(DataFormatError) as info:
        parse_trl_conversational([row], "conv.jsonl", chat_tokenizer)
    assert str(info.value) == f"conv.jsonl: row 0: field `{field}`: {reason}"


@pytest.mark.parametrize("path", [CONV, IMPLICIT], ids=["explicit", "implicit"])
def test_conversational_rows_need_a_chat_template(path, tokenizer):
    rows, origin = load_rows(str(path))
    for tok, lack in ((tokenizer, "this tokenizer has no chat template"), (None, "no tokenizer was given")):
        # whatever strict says: the setup is at fault, not a row
        with pytest.raises(DataFormatError) as info:
            parse_preferences(rows, origin, tokenizer=tok, strict=False)
        assert str(info.value).startswith(
            f"{origin}: conversational rows (lists of messages) are rendered with the tokenizer's chat "
            f"template, but {lack}; "
        )


def test_whole_source_problems_always_raise(chat_tokenizer):
    with pytest.raises(DataFormatError) as info:
        detect_preference_format({"question": "q", "answer": "a"}, "qa.jsonl")
    assert str(info.value).startswith(
        "cannot tell the preference format of qa.jsonl from its columns (answer, question); "
    )
    with pytest.raises(DataFormatError, match=re.escape("empty.jsonl: no rows")):
        parse_preferences([], "empty.jsonl", strict=False)
    with pytest.raises(DataFormatError) as info:
        parse_preferences(rows_of(TRL), "trl.jsonl", format="ultrafeedback")
    assert str(info.value) == (
        "trl.jsonl: unknown preference format 'ultrafeedback'; known: auto, hh, tldr, trl, trl_implicit, trl_conversational"
    )
    # a forced format names the columns it lacks
    with pytest.raises(DataFormatError) as info:
        parse_preferences(rows_of(HH), "hh.jsonl", format="trl", strict=False)
    assert str(info.value) == "hh.jsonl: no column `prompt` (columns present: chosen, rejected)"
    with pytest.raises(DataFormatError) as info:
        parse_preferences(rows_of(TRL), "trl.jsonl", format="tldr", strict=False)
    assert str(info.value) == (
        "trl.jsonl: no column `info`, `summaries`, `choice` (columns present: chosen, prompt, rejected)"
    )


# --------------------------------------------------------------------------- SFT


def test_parse_sft_prompt_completion_text():
    rows = [{"prompt": "rate the tea :", "completion": "it is good ."}, {"prompt": "", "completion": "i like tea ."}]
    assert detect_sft_format(rows[0].keys()) == "prompt_completion"
    assert list(parse_sft(rows, "sft.jsonl")) == [
        SFTRecord("rate the tea :", "it is good ."),
        SFTRecord("", "i like tea ."),
    ]


def test_parse_sft_messages_and_conversational_prompt_completion(chat_tokenizer, tokenizer):
    messages = [
        {
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": "rate the mug :"},
                {"role": "assistant", "content": "i like it ."},
            ]
        },
    ]
    assert list(parse_sft(messages, "m.jsonl", tokenizer=chat_tokenizer)) == [
        SFTRecord("<system> be brief\n<user> rate the mug :\n<assistant>", "i like it .")
    ]
    conversational = [
        {
            "prompt": [{"role": "user", "content": "rate the tea :"}],
            "completion": [{"role": "assistant", "content": "ok ."}],
        }
    ]
    assert list(parse_sft(conversational, "c.jsonl", tokenizer=chat_tokenizer)) == [
        SFTRecord("<user> rate the tea :\n<assistant>", "ok .")
    ]
    for rows in (messages, conversational):
        with pytest.raises(DataFormatError, match="this tokenizer has no chat template"):
            parse_sft(rows, "x.jsonl", tokenizer=tokenizer)
    bad = [{"messages": [{"role": "user", "content": "rate the tea :"}]}]
    with pytest.raises(DataFormatError) as info:
        parse_sft(bad, "m.jsonl", tokenizer=chat_tokenizer)
    assert str(info.value) == "m.jsonl: row 0: field `messages`: the last message is not the assistant's"


def test_parse_sft_missing_column_lists_columns():
    rows = [{"prompt": "rate the tea :", "text": "it is good ."}]
    with pytest.raises(DataFormatError) as info:
        parse_sft(rows, "sft.jsonl")
    assert str(info.value) == (
        "cannot tell the SFT format of sft.jsonl from its columns (prompt, text): "
        "expected `prompt` and `completion`, `messages`, `text` (without `prompt`), or a preference "
        "dataset's `chosen` and `rejected`"
    )
    with pytest.raises(DataFormatError) as info:
        parse_sft(rows, "sft.jsonl", format="prompt_completion", strict=False)
    assert str(info.value) == "sft.jsonl: no column `completion` (columns present: prompt, text)"
    with pytest.raises(DataFormatError, match="unknown SFT format 'chat'"):
        parse_sft(rows, "sft.jsonl", format="chat")


def test_parse_sft_empty_completion_strict_and_skipped(caplog):
    rows = [
        {"prompt": "rate the tea :", "completion": "it is good ."},
        {"prompt": "rate the mug :", "completion": "  "},
        {"prompt": "rate the pie :"},
    ]
    with pytest.raises(DataFormatError) as info:
        parse_sft(rows, "sft.jsonl")
    assert str(info.value) == "sft.jsonl: row 1: field `completion`: empty"
    with caplog.at_level(logging.WARNING, logger=DATA_LOG):
        parsed = parse_sft(rows, "sft.jsonl", strict=False)
    assert list(parsed) == [SFTRecord("rate the tea :", "it is good .")]
    assert [r.getMessage() for r in caplog.records] == [
        "skipped 2 of 3 rows of sft.jsonl: 1 × completion: empty (rows 1); 1 × completion: missing (rows 2)"
    ]
