"""Preference data: every parser on its fixture (tests/fixtures/prefs), every bad row strict and
skipped, loading from files, save_to_disk and load_dataset directories, SFT parsing, the
PreferenceDataModule's encoding and load_prompts."""

from __future__ import annotations

import gzip
import json
import logging
import re
from pathlib import Path

import pytest
import torch
from helpers import write_jsonl

from lit_p3o.data.encoding import Encoded
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
from lit_p3o.data.preferences import PreferenceDataModule, collate_pairs
from lit_p3o.data.prompts import load_prompts
from lit_p3o.data.sources import load_rows
from lit_p3o.tasks import get_task

PREFS = Path(__file__).parent / "fixtures" / "prefs"
HH, TLDR, TRL = PREFS / "hh.jsonl", PREFS / "tldr.jsonl", PREFS / "trl.jsonl"
CONV, IMPLICIT = PREFS / "trl_conversational.jsonl", PREFS / "trl_conversational_implicit.jsonl"
CHAT_TEMPLATE = (
    "{% for message in messages %}<{{ message['role'] }}> {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)
DATA_LOG = "lit_p3o.data"


@pytest.fixture(scope="module")
def tokenizer():
    """The embedded task's word-level tokenizer (no chat template)."""
    return get_task("reviews").build_tokenizer()


@pytest.fixture(scope="module")
def chat_tokenizer():
    tok = get_task("reviews").build_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    return tok


def rows_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# --------------------------------------------------------------------------- expected records

H, A = "\n\nHuman:", "\n\nAssistant:"
BREAD = (
    f"{H} I want to bake bread at home for the first time. What do I need?{A} Flour, water, salt and "
    f"yeast are enough for a basic loaf. A large bowl and an oven-safe pan help too.{H} How long does "
    f"the dough need to rise?{A}"
)
PLANT = (
    f"{H} My basil plant keeps wilting.{A} Is it in a pot or in the ground, and how often do you water "
    f"it?{H} In a pot on the windowsill, I water it every day.{A}"
)
CODE = (
    f"{H} How do I reverse a list in Python?{A} You can call my_list.reverse() to reverse it in place.{H} "
    f"What if I want to keep the original?{A}"
)
HH_RECORDS = [
    PreferenceRecord(
        BREAD,
        " Usually one to two hours at room temperature, until it has roughly doubled in size.",
        " Bread is one of the oldest prepared foods.",
    ),
    PreferenceRecord(
        PLANT,
        " Daily watering is probably too much. Let the top of the soil dry out between waterings and make "
        "sure the pot drains.",
        " Water it twice a day.",
    ),
    PreferenceRecord(
        CODE,
        " Use reversed(my_list) or the slice my_list[::-1]; both leave the original list unchanged.",
        " You can't.",
    ),
    PreferenceRecord(
        BREAD,
        " About an hour in a warm kitchen; poke it gently, and if the dent springs back slowly it is ready.",
        " Overnight, always.",
    ),
]
HH_BAD = {
    3: ("chosen/rejected", "the transcripts differ before the final Assistant reply"),
    4: ("chosen/rejected", "identical responses"),
    5: ("rejected", "empty response"),
    6: ("rejected", "missing"),
    7: ("chosen", "no '\\n\\nAssistant:' turn"),
}

TLDR_RECORDS = [
    PreferenceRecord(
        "SUBREDDIT: r/relationships\nTITLE: My roommate never cleans up after cooking\nPOST: We share a small "
        "kitchen and every evening the sink is full of his pans. I have asked him twice.\nTL;DR:",
        " roommate leaves dirty pans every night, asked twice, nothing changed.",
        " I have a roommate.",
    ),
    PreferenceRecord(  # choice 1, and the first summary gains its leading space
        "SUBREDDIT: r/personalfinance\nTITLE: Should I pay off my car loan early?\nPOST: The loan is at 6% and I "
        "have six months of savings in an account earning 4%.\nTL;DR:",
        " paying off car loan early makes sense since it costs more than savings earn",
        " car loan at 6%, savings at 4%, pay it early?",
    ),
    PreferenceRecord(
        "SUBREDDIT: r/books\nTITLE: Looking for sci-fi recommendations\nPOST: I loved The Left Hand of Darkness "
        "and want more like it.\nTL;DR:",
        " liked Le Guin, want similar sci-fi",
        " books?",
    ),
]
TLDR_BAD = {
    2: ("choice", "out of range (0 or 1)"),
    3: ("choice", "not an integer"),
    4: ("summaries", "expected a list of two summaries"),
    5: ("info", "missing"),
    6: ("chosen/rejected", "identical responses"),
}

TRL_RECORDS = [
    PreferenceRecord(
        "write a review of the pizza :", "the pizza is very tasty . i would order it again .", "the pizza is stale ."
    ),
    PreferenceRecord("what do you think of the lamp ?", "i really like the lamp .", "i hate it ."),
    PreferenceRecord(
        "please write a review of the soup for my blog :",
        "i tried the soup today . it is delicious .",
        "the soup is bland . i would not order it again . it is awful .",
    ),
    PreferenceRecord("rate the bike :", "i would recommend the bike .", "the bike is flimsy ."),
    PreferenceRecord("write a review of the pizza :", "i love the pizza .", "i dislike it ."),
]

CONV_RECORDS = [
    PreferenceRecord("<user> review the pizza :\n<assistant>", "the pizza is great .", "the pizza is bad ."),
    PreferenceRecord("<system> be brief\n<user> rate the mug :\n<assistant>", "i like it .", "it is noisy ."),
]
CONV_BAD = {
    2: ("chosen", "expected exactly one assistant message"),
    3: ("rejected", "the last message is not the assistant's"),
}
IMPLICIT_RECORDS = [
    PreferenceRecord("<user> review the cake :\n<assistant>", "the cake is delicious .", "the cake is stale ."),
    PreferenceRecord(
        "<user> rate the desk :\n<assistant> which desk ?\n<user> the desk\n<assistant>",
        "it is sturdy .",
        "it is flimsy .",
    ),
]
IMPLICIT_BAD = {
    2: ("chosen/rejected", "the conversations differ before the final assistant reply"),
    3: ("chosen", "no turns before the final assistant reply"),
}

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


# --------------------------------------------------------------------------- loading


def test_malformed_json_line_names_file_and_line():
    path = PREFS / "malformed.jsonl"  # line 2 is blank, line 3 is cut short
    with pytest.raises(DataFormatError) as info:
        load_rows(str(path))
    # the line has 53 characters and ends where the next `,` was expected: column 54, not the
    # "column 1" of the line break that json would see as a line of its own
    assert str(info.value) == f"{path}: line 3: malformed JSON (Expecting ',' delimiter, column 54)"


def test_non_object_json_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"prompt": "a"}\n"just text"\n')
    with pytest.raises(DataFormatError) as info:
        load_rows(str(path))
    assert str(info.value) == f"{path}: line 2: expected a JSON object, got str"


def test_json_array_and_gzip_files(tmp_path):
    rows = rows_of(TRL)
    array = tmp_path / "trl.json"
    array.write_text(json.dumps(rows, indent=2))
    assert load_rows(str(array)) == (rows, str(array))
    zipped = tmp_path / "trl.jsonl.gz"
    with gzip.open(zipped, "wt", encoding="utf-8") as f:
        f.write(TRL.read_text(encoding="utf-8"))
    assert load_rows(str(zipped)) == (rows, str(zipped))


def test_missing_file_is_not_looked_up_on_the_hub(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError, match=re.escape(f"no such data file or directory: {missing}")):
        load_rows(str(missing))
    with pytest.raises(FileNotFoundError):
        load_rows("./no/such/dir")
    with pytest.raises(FileNotFoundError):
        load_rows("data/prefs.parquet")


def test_save_to_disk_round_trip_and_split_selection(tmp_path, chat_tokenizer):
    import datasets

    train, test = rows_of(TRL)[:3], rows_of(TRL)[3:]
    directory = tmp_path / "saved"
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(train), "test": datasets.Dataset.from_list(test)}
    ).save_to_disk(str(directory))
    assert load_rows(str(directory)) == (train, f"{directory} [train]")
    rows, origin = load_rows(str(directory), "test")
    assert (rows, origin) == (test, f"{directory} [test]")
    assert list(parse_preferences(rows, origin)) == TRL_RECORDS[3:]
    with pytest.raises(DataFormatError) as info:
        load_rows(str(directory), "validation")
    assert str(info.value) == f"{directory}: no split 'validation'; available splits: train, test"
    # a single saved Dataset: the split is moot
    single = tmp_path / "single"
    datasets.Dataset.from_list(train).save_to_disk(str(single))
    assert load_rows(str(single), "validation") == (train, str(single))


def test_load_dataset_on_a_directory_of_jsonl_files(tmp_path, monkeypatch, chat_tokenizer):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    directory = tmp_path / "hh"
    directory.mkdir()
    (directory / "train.jsonl").write_text(HH.read_text(encoding="utf-8"), encoding="utf-8")
    write_jsonl(directory / "test.jsonl", rows_of(HH)[:2])
    rows, origin = load_rows(str(directory), "test")
    assert origin == f"{directory} [test]"
    assert list(parse_preferences(rows, origin)) == HH_RECORDS[:2]
    rows, origin = load_rows(str(directory), "train")
    assert list(parse_preferences(rows, origin, strict=False)) == HH_RECORDS
    with pytest.raises(DataFormatError) as info:
        load_rows(str(directory), "validation")
    message = str(info.value)
    assert message.startswith(f"{directory}: ") and "validation" in message
    assert "'train'" in message and "'test'" in message


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


# --------------------------------------------------------------------------- PreferenceDataModule


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def datamodule(tokenizer, train=TRL, **kwargs) -> PreferenceDataModule:
    kwargs = {"val_fraction": 0.0, "batch_size": 2, "strict": True, **kwargs}
    dm = PreferenceDataModule(train=str(train), tokenizer=tokenizer, **kwargs)
    dm.setup("fit")
    return dm


def test_datamodule_encodes_pairs_and_batches_chosen_first(tokenizer):
    dm = datamodule(tokenizer, val=str(TRL), max_length=64)
    eos = tokenizer.eos_token_id
    assert len(dm.train_pairs) == len(dm.val_pairs) == 5
    for (chosen, rejected), record in zip(dm.train_pairs, TRL_RECORDS):
        assert chosen == Encoded(ids(tokenizer, record.prompt), ids(tokenizer, record.chosen) + [eos])
        assert rejected == Encoded(ids(tokenizer, record.prompt), ids(tokenizer, record.rejected) + [eos])
        assert 2 not in chosen.prompt_ids + chosen.response_ids + rejected.response_ids  # no <unk>
    assert dm.truncation.truncated_prompts == 0
    batch = next(iter(dm.val_dataloader()))  # unshuffled: pairs 0 and 1
    direct = collate_pairs(dm.val_pairs[:2], tokenizer.pad_token_id)
    assert torch.equal(batch.input_ids, direct.input_ids)
    texts = [
        tokenizer.decode(row[mask.bool()].tolist(), skip_special_tokens=True)
        for row, mask in zip(batch.input_ids, batch.response_mask)
    ]
    assert texts == [TRL_RECORDS[0].chosen, TRL_RECORDS[1].chosen, TRL_RECORDS[0].rejected, TRL_RECORDS[1].rejected]
    assert batch.prompt_width == 8  # "what do you think of the lamp ?"
    assert batch.attention_mask[0].tolist()[:8] == [0] + [1] * 7  # the 7-token pizza prompt, left padded
    assert batch.attention_mask[2].tolist()[:8] == [0] + [1] * 7
    assert batch.response_mask[:, :8].sum() == 0
    assert len(next(iter(dm.train_dataloader())).input_ids) == 4


def test_datamodule_truncates_the_shared_prompt_and_counts_it(tokenizer, caplog):
    with caplog.at_level(logging.WARNING, logger="lit_p3o.data.preferences"):
        dm = datamodule(tokenizer, max_length=20)
    assert len(dm.train_pairs) == 5 and dm.val_pairs == [] and dm.val_dataloader() == []
    # row 2: 11 prompt tokens, chosen 10 + EOS, rejected 16 + EOS: both sides keep the same 3 prompt tokens
    soup = next(pair for pair in dm.train_pairs if len(pair[1].response_ids) == 17)
    assert soup[0].prompt_ids == soup[1].prompt_ids == ids(tokenizer, "my blog :")
    assert len(soup[0].response_ids) == 11
    assert (dm.truncation.examples, dm.truncation.truncated_prompts, dm.truncation.removed_tokens) == (5, 1, 8)
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [
        "preference data: 1 of 5 prompts truncated from the left (8 tokens removed)"
    ]
    for chosen, rejected in dm.train_pairs:
        assert len(chosen.prompt_ids) + max(len(chosen.response_ids), len(rejected.response_ids)) <= 20


@pytest.mark.parametrize("val_fraction", [0.0, 0.4])
def test_datamodule_response_too_long_strict_names_the_file_row(tokenizer, val_fraction):
    """Row 2's rejected response is 16 tokens + EOS; the error names it by its row in the file,
    also when a validation share is split off (the split happens after encoding)."""
    with pytest.raises(DataFormatError) as info:
        datamodule(tokenizer, max_length=17, val_fraction=val_fraction, strict=True)
    assert str(info.value) == (
        f"{TRL}: row 2: field `rejected`: response too long for max_length=17 "
        "(EOS included; a prompt token must fit too)"
    )


def test_datamodule_response_too_long_skipped(tokenizer, caplog):
    with caplog.at_level(logging.WARNING, logger=DATA_LOG):
        dm = datamodule(tokenizer, max_length=17, strict=False)
    assert sorted(len(r.response_ids) for _, r in dm.train_pairs) == [5, 5, 6, 6]  # row 2 is gone
    assert [r.getMessage() for r in caplog.records if r.name == DATA_LOG] == [
        f"skipped 1 of 5 rows of {TRL}: 1 × rejected: response too long for max_length=17 "
        "(EOS included; a prompt token must fit too) (rows 2)"
    ]


def test_datamodule_skips_are_named_by_their_row_in_the_source(tokenizer, tmp_path, caplog):
    rows = [
        {"prompt": "rate the tea :", "chosen": "it is good .", "rejected": "it is bad ."},
        {"prompt": "rate the tea :", "chosen": "it is good .", "rejected": "it is good ."},  # parser skips
        {"prompt": "rate the tea :", "chosen": "it is good . i like it . i would order it again .", "rejected": "no ."},
    ]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    with caplog.at_level(logging.WARNING, logger=DATA_LOG):
        dm = datamodule(tokenizer, train=path, max_length=10, strict=False)
    assert len(dm.train_pairs) == 1
    messages = [r.getMessage() for r in caplog.records if r.name == DATA_LOG]
    assert messages[0] == f"skipped 1 of 3 rows of {path}: 1 × chosen/rejected: identical responses (rows 1)"
    assert messages[1].startswith(f"skipped 1 of 2 rows of {path}: 1 × chosen: response too long")
    assert messages[1].endswith("(rows 2)")


def test_datamodule_conversational_with_chat_template(chat_tokenizer):
    dm = datamodule(chat_tokenizer, train=CONV, max_length=64, strict=False)
    expected = {tuple(ids(chat_tokenizer, r.prompt)): ids(chat_tokenizer, r.chosen) for r in CONV_RECORDS}
    assert {tuple(c.prompt_ids): c.response_ids[:-1] for c, _ in dm.train_pairs} == expected


def test_datamodule_rejects_bad_val_fraction(tokenizer):
    with pytest.raises(ValueError, match="val_fraction"):
        PreferenceDataModule(train=str(TRL), tokenizer=tokenizer, val_fraction=1.0)


@pytest.mark.parametrize(
    "field, value", [("batch_size", 0), ("batch_size", -2), ("max_length", 1), ("num_workers", -1)]
)
def test_datamodule_rejects_bad_sizes(tokenizer, field, value):
    """batch_size 0 was accepted (a multiple of every K-wise group size) and became one group per batch."""
    with pytest.raises(ValueError, match=rf"^PreferenceDataModule\.{field}: must be >= \d+.*got {value}$"):
        PreferenceDataModule(train=str(TRL), tokenizer=tokenizer, **{field: value})


# --------------------------------------------------------------------------- load_prompts


def test_load_prompts_from_a_prompt_column(tmp_path):
    path = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "rate the tea :"}, {"prompt": "rate the mug :"}])
    assert load_prompts(str(path)) == ["rate the tea :", "rate the mug :"]
    assert load_prompts(str(path), limit=1) == ["rate the tea :"]
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "rate the tea :"}, {"text": "rate the mug :"}])
    with pytest.raises(ValueError) as info:
        load_prompts(str(bad))
    assert str(info.value) == f"{bad}: row 1: field `prompt`: missing"


def test_load_prompts_from_preference_data_are_distinct_and_in_order(caplog):
    assert load_prompts(str(TRL)) == [
        "write a review of the pizza :",
        "what do you think of the lamp ?",
        "please write a review of the soup for my blog :",
        "rate the bike :",
    ]
    with caplog.at_level(logging.WARNING, logger=DATA_LOG):
        assert load_prompts(str(HH)) == [BREAD, PLANT, CODE]  # row 8 repeats row 0's prompt
        assert load_prompts(str(TLDR), limit=2) == [r.prompt for r in TLDR_RECORDS[:2]]


def test_load_prompts_embedded_needs_a_limit():
    assert load_prompts("embedded:reviews", "test", 3) == get_task("reviews").prompts("test", 3)
    with pytest.raises(ValueError, match="give `limit`"):
        load_prompts("embedded:reviews")
