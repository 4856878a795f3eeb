"""What ``lit-p3o`` reports as the user's mistake: one line naming the config path or the
file, exit code 2, and the traceback only under ``LIT_P3O_DEBUG=1``.

A user error is one of :data:`USER_ERRORS` (bad config, bad data rows, an unknown embedded
task or a reward function that misbehaves, named by the config paths that hold it, a guard
that stopped a run, a path the operating system refused, Lightning's refusal of a trainer
setting) or a spec's validation ``ValueError("RolloutSpec.num_responses: ...")``, which
:func:`locate` rewrites with the field's config path (``model.init_args.rollout.num_responses``).
Anything else is a bug of the library and keeps its traceback.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import re
import sys
import types
import typing
from collections.abc import Iterator, Sequence
from typing import Any, NoReturn

from lightning.fabric.utilities.exceptions import MisconfigurationException

from lit_p3o.data.issues import DataFormatError
from lit_p3o.guards import NoGradientError, TooManySkippedError

DEBUG_VARIABLE = "LIT_P3O_DEBUG"


class UserError(Exception):
    """An error in the user's input or environment whose message names the field or file."""


class ConfigError(UserError):
    """A config or command line that cannot run; ``lit-p3o`` prints it without a traceback."""


class SourceError(UserError, ValueError):
    """A source string that cannot be used (``embedded:<unknown task>``, a reward function);
    :func:`user_error` names the config paths that hold ``source``."""

    def __init__(self, source: str, message: str) -> None:
        super().__init__(message)
        self.source = source


class RewardFunctionError(SourceError):
    """A Python reward function that cannot be imported, raised, or returned unusable values."""

    def __init__(self, source: str, message: str) -> None:
        super().__init__(source, f"reward function {source}: {message}")


USER_ERRORS: tuple[type[BaseException], ...] = (
    UserError,
    DataFormatError,
    NoGradientError,
    TooManySkippedError,
    OSError,
    MisconfigurationException,
)

_SPEC_MESSAGE = re.compile(r"(?P<cls>[A-Z]\w*)(?:\.(?P<field>\w+))?: ")


def user_error(err: BaseException, config: dict[str, Any] | None = None) -> BaseException | None:
    """The user error behind ``err`` (itself, or one that jsonargparse or Lightning wrapped with
    ``raise ... from``), with a spec's ``Class.field`` replaced by its path in ``config``;
    None when ``err`` is a bug."""
    while err is not None:
        if isinstance(err, SourceError) and config is not None:
            paths = list(_paths_holding(config, err.source))
            return UserError(f"{' or '.join(paths)}: {err}") if paths else err
        if isinstance(err, USER_ERRORS) or type(err) is ValueError:
            located = locate(str(err), config) if config is not None else None
            if located is not None:
                return UserError(located)
            if isinstance(err, USER_ERRORS):
                return err
        err = err.__cause__
    return None


def locate(message: str, config: dict[str, Any]) -> str | None:
    """``"SamplingSpec.temperature: must be > 0"`` → ``"model.init_args.rollout.sampling.temperature:
    must be > 0"`` where a class of that name in ``config`` holds the bad value (its dataclass
    raises the same message, or the message quotes the configured value); several such places
    are all named; None when no configured place fits (e.g. a ModelSpec built internally).
    Where one place fits, the class's other fields the message names (``RolloutSpec.sampling.
    max_new_tokens``) get the same path."""
    match = _SPEC_MESSAGE.match(message)
    if match is None:
        return None
    name, field = match["cls"], match["field"]
    places = [
        path
        for path, cls, values in configured_classes(config)
        if cls.__name__ == name and (field is None or _holds_bad_value(cls, values, field, message))
    ]
    if not places:
        return None
    paths = [f"{path}.{field}" if field else path for path in places]
    rest = message[match.end() :]
    if len(places) == 1:
        rest = re.sub(rf"\b{name}\.(?=\w)", f"{places[0]}.", rest)
    return f"{' or '.join(paths)}: {rest}"


def _holds_bad_value(cls: type, values: dict[str, Any], field: str, message: str) -> bool:
    """Whether the configured ``values`` of ``cls`` are what ``message`` is about: building the
    dataclass raises that message, or its ``field`` value appears in it (classes that would load
    models are never built here)."""
    if dataclasses.is_dataclass(cls):
        try:
            cls(**values)
        except ValueError as err:
            if str(err) == message:
                return True
        except Exception:  # other fields of a partially given spec: cannot tell
            pass
    value = values.get(field)
    return value is not None and str(value) in message[len(cls.__name__) + len(field) + 1 :]


def _paths_holding(config: Any, value: str, path: str = "") -> Iterator[str]:
    """The config paths whose value is the string ``value`` (or a list entry's ``source``)."""
    if isinstance(config, dict):
        for key, item in config.items():
            yield from _paths_holding(item, value, f"{path}.{key}" if path else key)
    elif isinstance(config, list):
        for i, item in enumerate(config):
            yield from _paths_holding(item, value, f"{path}[{i}]")
    elif config == value:
        yield path


def configured_classes(config: dict[str, Any], path: str = "") -> Iterator[tuple[str, type, dict[str, Any]]]:
    """``(config path, class, its values)`` of every class a parsed config builds: sections and
    callbacks named by ``class_path`` (values under ``init_args``) and the dataclasses nested
    in their arguments, found from the constructors' type hints."""
    if isinstance(config, list):
        for i, item in enumerate(config):
            yield from configured_classes(item, f"{path}[{i}]")
        return
    if not isinstance(config, dict):
        return
    if isinstance(config.get("class_path"), str):
        cls = _import(config["class_path"])
        init_args = config.get("init_args") or {}
        if cls is not None:
            where = f"{path}.init_args" if path else "init_args"
            yield where, cls, init_args
            yield from _nested(cls, init_args, where)
        return
    for key, value in config.items():
        yield from configured_classes(value, f"{path}.{key}" if path else key)


def _nested(owner: Any, values: dict[str, Any], path: str) -> Iterator[tuple[str, type, dict[str, Any]]]:
    """The dataclasses among the arguments of ``owner`` (a configured class or a dataclass)."""
    hints = _argument_hints(owner)
    for name, value in values.items():
        for cls in _dataclasses_in(hints.get(name)):
            items = value if isinstance(value, list) else [value]
            for i, item in enumerate(items):
                if isinstance(item, dict) and set(item) <= {f.name for f in dataclasses.fields(cls)}:
                    where = f"{path}.{name}" + (f"[{i}]" if isinstance(value, list) else "")
                    yield where, cls, item
                    yield from _nested(cls, item, where)
        if isinstance(value, (dict, list)) and not _dataclasses_in(hints.get(name)):
            yield from configured_classes(value, f"{path}.{name}")  # e.g. a callback list


def _argument_hints(owner: type) -> dict[str, Any]:
    """The type hints of what ``owner`` is built from: a dataclass's fields, or the arguments of
    a class's constructor and of its bases' (a stage passes the shared ones on as ``**shared``,
    and jsonargparse reads them from the base). An annotation that does not resolve leaves its
    nested specs unnamed."""
    if dataclasses.is_dataclass(owner):
        owners = [owner]
    else:
        owners = [c.__init__ for c in reversed(owner.__mro__) if "__init__" in vars(c)]
    hints: dict[str, Any] = {}
    for item in owners:
        try:
            hints.update(typing.get_type_hints(item))
        except Exception:
            continue
    return hints


def _dataclasses_in(hint: Any) -> list[type]:
    """The dataclasses a type hint accepts (through Optional, unions and lists)."""
    if hint is None:
        return []
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        return [hint]
    if typing.get_origin(hint) in (typing.Union, types.UnionType, list, tuple, Sequence):
        return [cls for arg in typing.get_args(hint) for cls in _dataclasses_in(arg)]
    return []


def _import(class_path: str) -> type | None:
    module, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None


def exit_with(command: str, err: BaseException, raised: BaseException | None = None) -> NoReturn:
    """Print ``lit-p3o <command>: error: <message of err>`` and exit 2; under ``LIT_P3O_DEBUG=1``
    the traceback of what was ``raised`` (``err`` or an exception wrapping it) is printed first."""
    if os.environ.get(DEBUG_VARIABLE, "") not in ("", "0"):
        import traceback

        traceback.print_exception(raised or err)
    message = str(err).removeprefix("[lit-p3o] ")
    if isinstance(err, OSError):  # often transformers' or the hub's, over several lines
        message = " ".join(message.split())
        if err.filename is not None and str(err.filename) not in message:
            message = f"{err.filename}: {message}"
    sys.stderr.write(f"{f'lit-p3o {command}'.strip()}: error: {message}\n")
    sys.exit(2)
