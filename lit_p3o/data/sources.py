"""Where rows come from: JSON/JSONL (optionally gzipped) and Parquet files, ``save_to_disk``
directories, anything ``datasets.load_dataset`` reads (a hub name, a directory of data files),
or ``datasets`` objects given from Python. :func:`load_rows` returns plain dict rows and an
*origin* label that every error about them names; :mod:`lit_p3o.data.formats` parses the rows."""

from __future__ import annotations

import gzip
import io
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Union

from datasets import Dataset, DatasetDict

from lit_p3o.data.issues import DataFormatError

_JSON_FILES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")
_FILE_SUFFIXES = (*_JSON_FILES, ".parquet")
_SAVED_MARKERS = ("dataset_dict.json", "state.json")  # what save_to_disk writes at the top

DataSource = Union[str, Dataset, DatasetDict]
"""A data module's ``train``/``val``: a path or dataset name, or (from Python) a ``datasets``
object, whose ``split`` is picked when it is a ``DatasetDict``."""


_GIVEN_DATASET, _GIVEN_DATASET_DICT = "the Dataset given", "the DatasetDict given"


def source_label(source: DataSource, split: str) -> str:
    """How errors name a source: its path or name, or the kind of Python object given."""
    if isinstance(source, Dataset):
        return _GIVEN_DATASET
    return f"{_GIVEN_DATASET_DICT if isinstance(source, DatasetDict) else source} [{split}]"


def load_rows(source: DataSource, split: str = "train") -> tuple[list[dict[str, Any]], str]:
    """The rows of ``source`` and a label naming it (and the split, where one was chosen).

    ``source`` is a ``.jsonl``/``.json`` file (optionally ``.gz``) or a ``.parquet`` file; a
    directory written by ``save_to_disk``; anything ``datasets.load_dataset`` reads, such
    as a directory of data files or a hub name; or a ``datasets.Dataset``/``DatasetDict``. A
    missing source that is clearly a path raises :class:`FileNotFoundError` instead of being
    looked up on the hub.
    """
    if isinstance(source, (Dataset, DatasetDict)):
        return _dataset_rows(source, split, _GIVEN_DATASET_DICT if isinstance(source, DatasetDict) else _GIVEN_DATASET)
    if not isinstance(source, (str, Path)):
        raise TypeError(
            f"data source: expected a path, a dataset name, a datasets.Dataset or a DatasetDict, "
            f"got {type(source).__name__}"
        )
    path = Path(source).expanduser()
    if path.is_file():
        return _read_file(path), str(path)
    if path.is_dir():
        if any((path / marker).is_file() for marker in _SAVED_MARKERS):
            return _read_saved(path, split)
        if not any(f.is_file() and not f.name.startswith(".") for f in path.rglob("*")):
            raise DataFormatError(
                f"{source}: an empty directory; expected data files ({', '.join(_FILE_SUFFIXES)}) "
                "or a dataset written by save_to_disk"
            )
        source = str(path)  # a directory of data files
    elif _looks_like_path(source):
        raise FileNotFoundError(f"no such data file or directory: {source}")
    return _load_dataset(source, split), f"{source} [{split}]"


def _looks_like_path(source: str) -> bool:
    """Hub names are ``name`` or ``owner/name`` and may hold dots (``teknium/OpenHermes-2.5``),
    so only a data-file suffix or more path structure than that marks a local path."""
    return (
        source.endswith(_FILE_SUFFIXES) or source.startswith(("/", ".", "~")) or "\\" in source or source.count("/") > 1
    )


def _read_file(path: Path) -> list[dict[str, Any]]:
    if path.name.endswith(_JSON_FILES):
        return _read_json(path)
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    raise DataFormatError(f"{path}: unsupported file type; expected one of {', '.join(_FILE_SUFFIXES)}")


def read_text(path: Path) -> str:
    """A UTF-8 text file (optionally ``.gz``) as one string with universal newlines; bytes
    that are not UTF-8 raise :class:`DataFormatError` naming the file, line and byte."""
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise DataFormatError(
            f"{path}: line {line}: byte 0x{raw[err.start]:02x} is not UTF-8 text ({err.reason}); save the file as UTF-8"
        ) from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _read_json(path: Path) -> list[dict[str, Any]]:
    """A JSON array of objects, or one object per line, whatever the suffix says: OpenAI's
    TL;DR comparison files, for one, are JSON lines named ``.json``."""
    text = read_text(path)
    if text.lstrip().startswith("["):
        return _json_array(path, text)
    return _json_lines(path, io.StringIO(text, newline="\n"))


def _json_array(path: Path, text: str) -> list[dict[str, Any]]:
    try:
        items = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataFormatError(f"{path}: line {err.lineno}: malformed JSON ({err.msg})") from err
    for index, item in enumerate(items):
        if not isinstance(item, dict):
            raise DataFormatError(f"{path}: item {index}: expected a JSON object, got {type(item).__name__}")
    return items


def _json_lines(path: Path, lines: Iterable[str]) -> list[dict[str, Any]]:
    """Read line by line (not ``str.splitlines``, which would also break lines at the U+2028
    a JSON string may hold), naming a bad line by its 1-based number."""
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:  # without the line break, which json would count as a line of its own
            row = json.loads(line.rstrip("\r\n"))
        except json.JSONDecodeError as err:
            raise DataFormatError(f"{path}: line {number}: malformed JSON ({err.msg}, column {err.colno})") from err
        if not isinstance(row, dict):
            raise DataFormatError(f"{path}: line {number}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    return rows


def _read_saved(path: Path, split: str) -> tuple[list[dict[str, Any]], str]:
    """A ``save_to_disk`` directory; ``split`` picks from a ``DatasetDict`` and is otherwise moot."""
    import datasets

    return _dataset_rows(datasets.load_from_disk(str(path)), split, str(path))


def _dataset_rows(dataset: Dataset | DatasetDict, split: str, label: str) -> tuple[list[dict[str, Any]], str]:
    if not isinstance(dataset, DatasetDict):
        return dataset.to_list(), label
    if split not in dataset:
        raise DataFormatError(f"{label}: no split {split!r}; available splits: {', '.join(dataset)}")
    return dataset[split].to_list(), f"{label} [{split}]"


def _load_dataset(source: str, split: str) -> list[dict[str, Any]]:
    import datasets

    try:
        dataset = datasets.load_dataset(source, split=split)
    except ValueError as err:  # an unknown split, for one; datasets names the available ones
        raise DataFormatError(f"{source}: {err}") from err
    return dataset.to_list()
