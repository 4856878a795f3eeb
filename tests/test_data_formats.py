"""lit_p3o.data.sources and lit_p3o.data.formats: loading sources, each parser on its fixture, every bad row strict and skipped."""

from __future__ import annotations

import dataclasses
import gzip
import json
import logging
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from helpers import write_jsonl
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit
from transformers import PreTrainedTokenizerFast

from lit_p3o.data.formats import (
    DataFormatError,
    PreferenceRecord,
    SFTRecord,
    detect_preference_format,
    detect_sft_format,
    parse_hh,
    parse_messages,
    parse_preferences,
    parse_prompt_completion,
    parse_sft,
    parse_tldr,
    parse_trl,
    parse_trl_conversational,
)
from lit_p3o.data.sources import load_rows

FIXTURES = Path(__file__).parent / "fixtures"
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def make_tokenizer(chat_template: str | None) -> PreTrainedTokenizerFast:
    """A word-level tokenizer: only its chat template matters here."""
    words = Tokenizer(WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    words.pre_tokenizer = WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, unk_token="[UNK]")
    tokenizer.chat_template = chat_template
    return tokenizer


@pytest.fixture(scope="module")
def chat_tokenizer() -> PreTrainedTokenizerFast:
    return make_tokenizer(CHAT_TEMPLATE)


# --------------------------------------------------------------------------- fixtures and what they hold


@dataclass
class Case:
    """A fixture file, the parser for it, and what must come out: records and bad rows by row number."""

    fixture: str
    format: str
    parse: Callable  # (rows, origin, tokenizer, strict) -> Parsed
    records: dict[int, SFTRecord | PreferenceRecord]
    bad: dict[int, tuple[str, str]] = field(default_factory=dict)  # row -> (field, reason)


EGG_PROMPT = (
    "\n\nHuman: How long should I boil an egg if I want a runny yolk?"
    "\n\nAssistant: About six minutes, starting once the water is at a rolling boil."
    "\n\nHuman: And for a firm one?\n\nAssistant:"
)
HIKE_PROMPT = (
    "\n\nHuman: Can you help me plan a short hike?"
    "\n\nAssistant: Sure. How long would you like to walk, and where are you?"
    "\n\nHuman: About two hours, near Boulder."
    "\n\nAssistant: The Royal Arch trail in Chautauqua Park is about that long and has a great view."
    "\n\nHuman: Is it hard?\n\nAssistant:"
)

CASES = [
    Case(
        "hh_sample.jsonl",
        "hh",
        lambda rows, origin, tok, strict: parse_hh(rows, origin, strict=strict),
        {
            0: PreferenceRecord(
                EGG_PROMPT,
                " Around ten minutes. Cool it in cold water afterwards so it peels easily.",
                " Eggs are a good source of protein.",
            ),
            1: PreferenceRecord(
                "\n\nHuman: What's the capital of Australia?\n\nAssistant:",
                " Canberra. Many people guess Sydney, but Canberra was chosen as a compromise.",
                " Sydney.",
            ),
            2: PreferenceRecord(
                HIKE_PROMPT,
                " It's steep in places, so bring water and good shoes, but most people manage it fine.",
                " Yes.",
            ),
            9: PreferenceRecord(
                "\n\nHuman: How many legs does a spider have?\n\nAssistant:", " Eight.", " Six, like all insects."
            ),
        },
        {
            3: ("chosen/rejected", "identical responses"),
            4: ("chosen/rejected", "the transcripts differ before the final Assistant reply"),
            5: ("rejected", "empty response"),
            6: ("rejected", "missing"),
            7: ("chosen", "no '\\n\\nAssistant:' turn"),
            8: ("chosen", "ends with a Human turn, not an Assistant reply"),
        },
    ),
    Case(
        "tldr_sample.jsonl",
        "tldr",
        lambda rows, origin, tok, strict: parse_tldr(rows, origin, strict=strict),
        {
            0: PreferenceRecord(
                "SUBREDDIT: r/cooking\nTITLE: My sourdough never rises\nPOST: I've fed my starter twice a day for "
                "two weeks. It bubbles, but my loaves come out flat and dense. What am I doing wrong?\nTL;DR:",
                " Starter bubbles but my sourdough loaves stay flat and dense.",
                " Bread is hard.",
            ),
            1: PreferenceRecord(
                "SUBREDDIT: r/relationships\nTITLE: Roommate never does the dishes\nPOST: We agreed to split chores. "
                "I (24F) end up washing everything because my roommate (25F) leaves plates for days.\nTL;DR:",
                " Roommate (25F) ignores our chore deal and leaves me all the dishes; how do I bring it up?",
                " I do dishes.",
            ),
            8: PreferenceRecord(
                "SUBREDDIT: r/personalfinance\nTITLE: Should I pay off my car loan early?\n"
                "POST: The rate is 3% and I have an emergency fund.\nTL;DR:",
                " 3% car loan, emergency fund in place: pay it off early or invest?",
                " Car loan.",
            ),
        },
        {
            2: ("choice", "out of range (0 or 1)"),
            3: ("choice", "not an integer"),
            4: ("summaries", "expected a list of two summaries"),
            5: ("info.title", "missing"),
            6: ("chosen/rejected", "identical responses"),
            7: ("summaries[1].text", "empty"),
        },
    ),
    Case(
        "trl_preference.jsonl",
        "trl",
        lambda rows, origin, tok, strict: parse_trl(rows, origin, strict=strict),
        {
            0: PreferenceRecord(
                "The best way to learn to swim is", " to take lessons in a shallow pool.", " to jump into the ocean."
            ),
            1: PreferenceRecord("Q: Is a tomato a fruit?\nA:", " Botanically, yes.", " No, it is a vegetable."),
        },
        {
            2: ("chosen/rejected", "identical responses"),  # they differ only by a trailing space
            3: ("rejected", "empty response"),
            4: ("prompt", "missing"),
        },
    ),
    Case(
        "trl_conversational_preference.jsonl",
        "trl_conversational",
        lambda rows, origin, tok, strict: parse_trl_conversational(rows, origin, tok, strict=strict),
        {
            0: PreferenceRecord(
                "<|user|>Is the moon a planet?\n<|assistant|>", "No, it is Earth's natural satellite.", "Yes."
            ),
            1: PreferenceRecord(
                "<|user|>Hi!\n<|assistant|>Hello! How can I help?\n<|user|>Suggest a pet.\n<|assistant|>",
                "A cat: independent and low-maintenance.",
                "A tiger.",
            ),
        },
        {
            2: ("chosen", "expected exactly one assistant message"),
            3: ("chosen", "the last message is not the assistant's"),
        },
    ),
    Case(
        "trl_implicit_preference.jsonl",
        "trl_conversational",
        lambda rows, origin, tok, strict: parse_trl_conversational(rows, origin, tok, strict=strict),
        {
            0: PreferenceRecord("<|user|>What's 10 divided by 4?\n<|assistant|>", "2.5", "2"),
            2: PreferenceRecord(
                "<|user|>Good morning!\n<|assistant|>", "Good morning! Did you sleep well?", "What do you want?"
            ),
        },
        {1: ("chosen/rejected", "the conversations differ before the final assistant reply")},
    ),
    Case(
        "trl_prompt_completion.jsonl",
        "prompt_completion",
        lambda rows, origin, tok, strict: parse_prompt_completion(rows, origin, strict=strict),
        {
            0: SFTRecord("The capital of France is", " Paris."),
            1: SFTRecord("Translate to German: good morning\n", "Guten Morgen"),
            2: SFTRecord("", "An unconditional sentence."),
            5: SFTRecord("Water boils at", " 100 degrees Celsius at sea level."),
        },
        {3: ("completion", "empty"), 4: ("completion", "missing")},
    ),
    Case(
        "trl_conversational_prompt_completion.jsonl",
        "prompt_completion",
        lambda rows, origin, tok, strict: parse_prompt_completion(rows, origin, tok, strict=strict),
        {
            0: SFTRecord("<|user|>What is 3 times 4?\n<|assistant|>", "12"),
            2: SFTRecord("<|system|>Be terse.\n<|user|>Largest planet?\n<|assistant|>", "Jupiter."),
        },
        {1: ("completion", "expected exactly one assistant message")},
    ),
    Case(
        "trl_messages.jsonl",
        "messages",
        lambda rows, origin, tok, strict: parse_messages(rows, origin, tok, strict=strict),
        {
            0: SFTRecord("<|user|>Name a prime number.\n<|assistant|>", "Seven."),
            1: SFTRecord(
                "<|system|>Answer briefly.\n<|user|>What colour is the sky?\n<|assistant|>Blue.\n"
                "<|user|>At sunset?\n<|assistant|>",
                "Often orange or red.",
            ),
        },
        {
            2: ("messages", "the last message is not the assistant's"),
            3: ("messages", "empty assistant reply"),
            4: ("messages", "no turns before the final assistant reply"),
            5: ("messages", "every message needs a text `role` and `content`"),
        },
    ),
]
CASE_IDS = [c.fixture.removesuffix(".jsonl") for c in CASES]
BAD_ROWS = [(c, row) for c in CASES for row in c.bad]
BAD_IDS = [f"{c.fixture.removesuffix('.jsonl')}-row{row}" for c, row in BAD_ROWS]


def read_fixture(name: str) -> tuple[list[dict], str]:
    return load_rows(str(FIXTURES / name))


def test_fixtures_hold_exactly_the_rows_the_cases_describe():
    for case in CASES:
        rows, _ = read_fixture(case.fixture)
        assert sorted([*case.records, *case.bad]) == list(range(len(rows))), case.fixture


# --------------------------------------------------------------------------- parsers on their fixtures


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_parser_gives_the_expected_records(case, chat_tokenizer):
    rows, origin = read_fixture(case.fixture)
    records = case.parse(rows, origin, chat_tokenizer, False)
    assert records == [case.records[row] for row in sorted(case.records)]


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_detection_and_dispatch_agree_with_the_parser(case, chat_tokenizer):
    rows, origin = read_fixture(case.fixture)
    if isinstance(next(iter(case.records.values())), SFTRecord):
        assert detect_sft_format(rows[0]) == case.format
        via_dispatch = parse_sft(rows, origin, tokenizer=chat_tokenizer, strict=False)
    else:
        assert detect_preference_format(rows[0]) == case.format
        via_dispatch = parse_preferences(rows, origin, tokenizer=chat_tokenizer, strict=False)
    assert via_dispatch == case.parse(rows, origin, chat_tokenizer, False)


@pytest.mark.parametrize(("case", "bad_row"), BAD_ROWS, ids=BAD_IDS)
def test_strict_mode_names_origin_row_and_field(case, bad_row, chat_tokenizer):
    rows, origin = read_fixture(case.fixture)
    good = rows[min(case.records)]
    # earlier bad rows become good ones, so this row is the first bad one and keeps its number
    rows = [good if row in case.bad and row < bad_row else r for row, r in enumerate(rows)]
    field_name, reason = case.bad[bad_row]
    with pytest.raises(DataFormatError) as raised:
        case.parse(rows, origin, chat_tokenizer, True)
    assert str(raised.value) == f"{origin}: row {bad_row}: field `{field_name}`: {reason}"
    assert origin.endswith(case.fixture)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_skip_mode_counts_and_logs_bad_rows(case, chat_tokenizer, caplog):
    rows, origin = read_fixture(case.fixture)
    with caplog.at_level(logging.WARNING, logger="lit_p3o"):
        records = case.parse(rows, origin, chat_tokenizer, False)

    expected: dict[str, list[int]] = defaultdict(list)
    for row, (field_name, reason) in sorted(case.bad.items()):
        expected[f"{field_name}: {reason}"].append(row)
    assert dict(records.issues.rows) == expected
    assert records.issues.skipped == len(case.bad) == len(rows) - len(records)

    (warning,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    message = warning.getMessage()
    assert message.startswith(f"skipped {len(case.bad)} of {len(rows)} rows of {origin}: ")
    for reason, numbers in expected.items():
        assert f"{reason} (rows {', '.join(map(str, numbers))})" in message


def test_clean_rows_log_nothing(caplog):
    rows, origin = read_fixture("hh_sample.jsonl")
    with caplog.at_level(logging.WARNING, logger="lit_p3o"):
        records = parse_hh(rows[:3], origin, strict=False)
    assert len(records) == 3 and records.issues.skipped == 0
    assert not caplog.records


def test_records_are_frozen():
    record = SFTRecord("a prompt", " a completion")
    with pytest.raises(dataclasses.FrozenInstanceError):
        record.prompt = "another"  # type: ignore[misc]


# --------------------------------------------------------------------------- problems of a whole source


@pytest.mark.parametrize("strict", [True, False])
def test_missing_column_names_it_and_the_columns_present(strict):
    rows = [{"prompt": "Q:", "answer": " A."}, {"prompt": "Q2:", "answer": " B."}]
    no_completion = r"^data\.jsonl: no column `completion` \(columns present: answer, prompt\)$"
    with pytest.raises(DataFormatError, match=no_completion):
        parse_prompt_completion(rows, "data.jsonl", strict=strict)
    undetected = r"^cannot tell the SFT format of data\.jsonl from its columns \(answer, prompt\): expected `prompt`"
    with pytest.raises(DataFormatError, match=undetected):
        parse_sft(rows, "data.jsonl", strict=strict)
    with pytest.raises(DataFormatError, match=r"^data\.jsonl: no column `rejected` \(columns present: chosen\)$"):
        parse_preferences([{"chosen": "\n\nHuman: hi\n\nAssistant: yo"}], "data.jsonl", format="hh", strict=strict)


def test_unknown_preference_format_lists_known_formats_and_columns():
    rows = [{"question": "Q", "good": "A", "bad": "B"}]
    with pytest.raises(DataFormatError) as raised:
        parse_preferences(rows, "prefs.jsonl")
    message = str(raised.value)
    assert "prefs.jsonl" in message and "columns (bad, good, question)" in message
    for name in ("hh", "tldr", "trl", "trl_conversational"):
        assert name in message
    with pytest.raises(DataFormatError) as raised:
        parse_preferences(rows, "prefs.jsonl", format="shp")
    known = "auto, hh, tldr, trl, trl_implicit, trl_conversational"
    assert str(raised.value) == f"prefs.jsonl: unknown preference format 'shp'; known: {known}"
    with pytest.raises(DataFormatError) as raised:
        parse_sft(rows, "prefs.jsonl", format="alpaca")
    assert (
        str(raised.value)
        == "prefs.jsonl: unknown SFT format 'alpaca'; known: auto, prompt_completion, messages, text, chosen"
    )


def test_no_rows_is_an_error():
    with pytest.raises(DataFormatError, match=r"^empty\.jsonl: no rows$"):
        parse_preferences([], "empty.jsonl")
    with pytest.raises(DataFormatError, match=r"^empty\.jsonl: no rows$"):
        parse_hh([], "empty.jsonl")


def test_explicit_sft_format_wins_over_detection():
    rows = [{"prompt": "P", "completion": " C", "messages": [{"role": "user", "content": "x"}]}]
    assert detect_sft_format(rows[0]) == "messages"
    assert parse_sft(rows, "both.jsonl", format="prompt_completion") == [SFTRecord("P", " C")]


@pytest.mark.parametrize(
    ("fixture", "parse"),
    [
        ("trl_messages.jsonl", lambda rows, origin, tok: parse_sft(rows, origin, tokenizer=tok, strict=False)),
        ("trl_conversational_prompt_completion.jsonl", lambda rows, origin, tok: parse_sft(rows, origin, tok)),
        ("trl_conversational_preference.jsonl", lambda rows, origin, tok: parse_preferences(rows, origin, "auto", tok)),
        ("trl_implicit_preference.jsonl", lambda rows, origin, tok: parse_trl_conversational(rows, origin, tok, False)),
    ],
    ids=["messages", "conversational_prompt_completion", "conversational_preference", "implicit_preference"],
)
@pytest.mark.parametrize("has_tokenizer", [True, False], ids=["no_template", "no_tokenizer"])
def test_conversational_rows_need_a_chat_template(fixture, parse, has_tokenizer):
    rows, origin = read_fixture(fixture)
    tokenizer = make_tokenizer(None) if has_tokenizer else None
    with pytest.raises(DataFormatError) as raised:
        parse(rows, origin, tokenizer)
    message = str(raised.value)
    assert message.startswith(f"{origin}: conversational rows")
    assert "chat template" in message and "prompt/completion columns" in message


def test_text_rows_need_no_tokenizer():
    rows, origin = read_fixture("trl_preference.jsonl")
    assert len(parse_preferences(rows, origin, tokenizer=None, strict=False)) == 2


# --------------------------------------------------------------------------- loading


def test_jsonl_rows_and_origin():
    path = FIXTURES / "trl_preference.jsonl"
    rows, origin = load_rows(str(path))
    assert origin == str(path)
    assert len(rows) == 5 and rows[1] == {
        "prompt": "Q: Is a tomato a fruit?\nA:",
        "chosen": " Botanically, yes.",
        "rejected": " No, it is a vegetable.",
    }


def test_json_array_json_lines_named_json_and_gzip(tmp_path):
    rows = [{"prompt": "a", "completion": " b"}, {"prompt": "c", "completion": " d"}]
    (tmp_path / "array.json").write_text(json.dumps(rows, indent=2))
    write_jsonl(tmp_path / "lines.json", rows)  # OpenAI's TL;DR comparison files look like this
    with gzip.open(tmp_path / "packed.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    for name in ("array.json", "lines.json", "packed.jsonl.gz"):
        assert load_rows(str(tmp_path / name)) == (rows, str(tmp_path / name)), name


def test_parquet_file(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"prompt": "p", "chosen": " c", "rejected": " r"}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "prefs.parquet")
    assert load_rows(str(tmp_path / "prefs.parquet")) == (rows, str(tmp_path / "prefs.parquet"))


def test_lines_break_only_at_newlines(tmp_path):
    rows = [
        {"prompt": "line\u2028separator, paragraph\u2029separator", "completion": " ok"},
        {"prompt": "x", "completion": " y"},
    ]
    path = write_jsonl(tmp_path / "unicode.jsonl", rows)
    assert "\u2028" in path.read_text(encoding="utf-8")  # written raw, not escaped
    assert load_rows(str(path))[0] == rows


def test_malformed_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"prompt": "a", "completion": " b"}\n\n{"prompt": "c", "completion": \n')
    with pytest.raises(DataFormatError, match=rf"^{path}: line 3: malformed JSON \(Expecting value, column \d+\)$"):
        load_rows(str(path))
    path.write_text('{"prompt": "a", "completion": " b"}\n["not", "an", "object"]\n')
    with pytest.raises(DataFormatError, match=rf"^{path}: line 2: expected a JSON object, got list$"):
        load_rows(str(path))
    array = tmp_path / "broken.json"
    array.write_text('[\n  {"prompt": "a"},\n  {"prompt": }\n]\n')
    with pytest.raises(DataFormatError, match=rf"^{array}: line 3: malformed JSON"):
        load_rows(str(array))
    array.write_text('[{"prompt": "a"}, "b"]')
    with pytest.raises(DataFormatError, match=rf"^{array}: item 1: expected a JSON object, got str$"):
        load_rows(str(array))


@pytest.mark.parametrize("name", ["latin1.jsonl", "latin1.json", "latin1.jsonl.gz"])
def test_non_utf8_bytes_name_file_and_line(tmp_path, name):
    text = '{"prompt": "a", "completion": " b"}\r\n\n{"prompt": "caf\u00e9", "completion": " b"}\n'
    data = text.encode("latin-1")  # é as the single byte 0xe9
    path = tmp_path / name
    path.write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    with pytest.raises(
        DataFormatError, match=rf"^{path}: line 3: byte 0xe9 is not UTF-8 text \(invalid continuation byte\)"
    ):
        load_rows(str(path))
    path.write_bytes(gzip.compress(text.encode()) if name.endswith(".gz") else text.encode())
    assert load_rows(str(path))[0][1] == {"prompt": "caf\u00e9", "completion": " b"}


@pytest.mark.parametrize("name", ["missing.jsonl", "./missing_dir", "data/sub/missing", "prefs.parquet", "~/missing"])
def test_missing_file_raises_file_not_found(tmp_path, monkeypatch, name):
    """Clearly a path, so not looked up as a hub dataset (``owner/name`` would be)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=f"no such data file or directory: {name}"):
        load_rows(name)


def test_unsupported_file_type(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello\n")
    with pytest.raises(DataFormatError, match=rf"^{path}: unsupported file type"):
        load_rows(str(path))


def test_save_to_disk_round_trip_with_split_selection(tmp_path):
    import datasets

    rows, _ = read_fixture("trl_preference.jsonl")
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(rows[:3]), "test": datasets.Dataset.from_list(rows[3:4])}
    ).save_to_disk(str(tmp_path / "dict"))
    assert load_rows(str(tmp_path / "dict"), split="test") == (rows[3:4], f"{tmp_path / 'dict'} [test]")
    assert load_rows(str(tmp_path / "dict"))[0] == rows[:3]
    with pytest.raises(DataFormatError, match=r"dict: no split 'validation'; available splits: train, test$"):
        load_rows(str(tmp_path / "dict"), split="validation")

    datasets.Dataset.from_list(rows[:2]).save_to_disk(str(tmp_path / "single"))
    assert load_rows(str(tmp_path / "single"), split="ignored") == (rows[:2], str(tmp_path / "single"))


@pytest.fixture
def datasets_cache(tmp_path, monkeypatch):
    """Keep ``load_dataset``'s Arrow cache inside the test's directory."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")


def test_load_dataset_reads_a_local_directory_of_jsonl_files(tmp_path, monkeypatch, datasets_cache):
    rows, _ = read_fixture("hh_sample.jsonl")
    folder = tmp_path / "hh"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", rows[:3])
    write_jsonl(folder / "test.jsonl", rows[9:])
    test_rows, origin = load_rows(str(folder), split="test")
    assert (test_rows, origin) == (rows[9:], f"{folder} [test]")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert load_rows("~/hh", split="train") == (rows[:3], f"{folder} [train]")
    assert parse_preferences(test_rows, origin) == [CASES[0].records[9]]
    with pytest.raises(DataFormatError, match=rf"^{folder}: Unknown split \"validation\".*'train'"):
        load_rows(str(folder), split="validation")


def test_load_dataset_reads_a_local_directory_of_parquet_files(tmp_path, datasets_cache):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows, _ = read_fixture("trl_prompt_completion.jsonl")
    rows = [r for r in rows if "completion" in r]
    (tmp_path / "sft" / "data").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "sft" / "data" / "train-00000-of-00001.parquet")
    loaded, origin = load_rows(str(tmp_path / "sft"))
    assert (loaded, origin) == (rows, f"{tmp_path / 'sft'} [train]")


@pytest.mark.parametrize("fixture", ["hh_sample.jsonl", "tldr_sample.jsonl", "trl_preference.jsonl"])
def test_a_preference_dataset_is_sft_data_on_its_chosen_replies(fixture, chat_tokenizer):
    """SFT on HH's preferred transcripts (or TL;DR's preferred summaries): each good pair's
    prompt and chosen reply, bad pairs skipped under the same row numbers and reasons."""
    rows, origin = read_fixture(fixture)
    assert detect_sft_format(rows[0]) == "chosen"
    pairs = parse_preferences(rows, origin, tokenizer=chat_tokenizer, strict=False)
    records = parse_sft(rows, origin, tokenizer=chat_tokenizer, strict=False)
    assert records == [SFTRecord(p.prompt, p.chosen) for p in pairs] and len(records) > 0
    assert records.row_numbers == pairs.row_numbers
    assert dict(records.issues.rows) == dict(pairs.issues.rows)
