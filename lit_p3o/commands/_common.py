"""What the ``lit-p3o`` commands share: their argument parser and types, and the checks of
the models, judge and prompts they are given, made before anything is loaded or sampled."""

from __future__ import annotations

import argparse
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

from lit_p3o.errors import SourceError, UserError, exit_with
from lit_p3o.models import check_model_source, looks_local
from lit_p3o.scoring import is_function_source, load_function
from lit_p3o.tasks import resolve_embedded


class _CommandParser(argparse.ArgumentParser):
    """The commands' parsers: a flag must be spelt in full (argparse would take ``--max-new``
    for ``--max-new-tokens``, and a misspelt flag for whichever it abbreviates), and an error
    is one line ``lit-p3o <command>: error: …`` without the usage above it (``--help`` has it)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(allow_abbrev=False, **kwargs)

    def error(self, message: str) -> NoReturn:
        exit_with(self.prog.removeprefix("lit-p3o").strip(), UserError(message))


def _label_and_path(text: str) -> tuple[str, str]:
    """``LABEL=PATH``, where labels may contain ``=`` ("p3o beta=0.05=runs/a.csv"): the cut
    that leaves an existing path wins, else the last ``=`` (hub ids have none)."""
    cuts = [i for i, c in enumerate(text) if c == "="]
    existing = [i for i in cuts if Path(text[i + 1 :]).expanduser().exists()]
    cut = existing[0] if existing else (cuts[-1] if cuts else -1)
    label, path = text[:cut].strip(), text[cut + 1 :]
    if cut < 0 or not label or not path:
        raise argparse.ArgumentTypeError(f"expected LABEL=PATH, got {text!r}")
    return label, path


def _positive_int(text: str) -> int:
    """An argparse type: counts and sizes must be at least 1 (0 prompts would judge nothing)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _unique(pairs: list[tuple[str, str]], parser: argparse.ArgumentParser) -> dict[str, str]:
    labels = [label for label, _ in pairs]
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    if duplicates:
        parser.error(f"duplicate labels: {', '.join(duplicates)}")
    return dict(pairs)


def check_models(models: Mapping[str, str | Path]) -> None:
    """Before anything is loaded or sampled: every ``{argument: source}`` names a saved model
    (a local directory holding a model and a tokenizer, or a hub model that resolves), so a
    wrong path fails at once naming its argument, not minutes later naming ``ModelSpec``."""
    from transformers import AutoConfig

    for argument, source in models.items():
        source = str(source)
        try:
            if looks_local(source):
                check_model_source(source, argument, "model")
                check_model_source(source, argument, "tokenizer")
            else:
                AutoConfig.from_pretrained(source)
        except OSError as err:
            if str(err).startswith(argument):  # check_model_source's message names the argument
                raise UserError(str(err)) from err
            raise UserError(
                f"{argument}: {source!r} is neither a local model directory nor a reachable hub model"
            ) from err


def check_judge(judge: str) -> None:
    """``--judge``: a known embedded task, a ``module:function`` that imports, or a reward model."""
    with _named("--judge"):
        if resolve_embedded(judge) is not None:
            return
        if is_function_source(judge):
            load_function(judge)
            return
    check_models({"--judge": judge})


def check_prompts(prompts: str) -> None:
    """``--prompts``: an ``embedded:`` source names a known task (files are read later)."""
    with _named("--prompts"):
        resolve_embedded(prompts)


@contextmanager
def _named(argument: str) -> Iterator[None]:
    """A source given as ``argument`` that cannot be used (an unknown embedded task, a reward
    function that fails) is named by that argument."""
    try:
        yield
    except SourceError as err:
        raise UserError(f"{argument}: {err}") from err
