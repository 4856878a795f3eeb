"""lit_p3o.data.sources: preference rows from JSONL, JSON and gzip files, save_to_disk and load_dataset directories."""

from __future__ import annotations

import gzip
import json
import re

import pytest
from helpers import write_jsonl
from prefs_fixtures import HH, HH_RECORDS, PREFS, TRL, TRL_RECORDS, rows_of

from lit_p3o.data.formats import DataFormatError, parse_preferences
from lit_p3o.data.sources import load_rows

DATA_LOG = "lit_p3o.data"


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
