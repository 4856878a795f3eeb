"""``lit-p3o``: a LightningCLI over every stage and data module of the library.

Configs name their classes (``class_path: lit_p3o.SFTModule``), so the same YAML files
work under any user's LightningCLI; ``lit-p3o fit --print_config`` documents every knob.

Before any model is built or step taken, the CLI checks what would otherwise fail late or
silently (a :class:`ConfigError` names the config field):

* local model paths exist and hold a model and a tokenizer;
* the export, log and checkpoint directories can be written;
* ``--ckpt_path`` is a Lightning checkpoint of the configured stage whose hyperparameters
  match the config, except those in :data:`CHANGEABLE_ON_RESUME` (trainer settings, such as
  epochs, logging, evaluation callbacks and checkpointing, come from the config anyway);
  a resumed run refuses an export directory that holds another run's export (runs are told
  apart by the id in :data:`RUN_MARKER`) and appends to its CSV metrics instead of replacing them.
  Lightning's names (``--ckpt_path last``, ``hpc``, …) are resolved to their file and checked alike;
* a new run refuses an export directory that holds files but no run's export, and a second
  run (or ``lit-p3o export``) on an export directory in use is stopped (:class:`~lit_p3o.runs.OutputLock`).

A run stopped by SIGTERM saves a checkpoint (:class:`SignalCheckpoint`) and exits with status 143
and one line saying how to resume.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import pickle
import re
import signal
import sys
import tempfile
import uuid
import warnings
from argparse import RawDescriptionHelpFormatter
from collections.abc import Iterator
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any, Literal, NoReturn

import lightning as L
import torch
from jsonargparse import DefaultHelpFormatter
from lightning.pytorch.callbacks import ModelCheckpoint, OnExceptionCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lit_p3o.errors import UserError, exit_with, user_error
from lit_p3o.models import check_model_source
from lit_p3o.runs import OutputLock, atomic_file, is_launching_process
from lit_p3o.tasks import resolve_embedded

log = logging.getLogger(__name__)

CHANGEABLE_ON_RESUME = (
    "save_dir",
    "rollout.log_samples",
    "rollout.generation_batch_size",
    "rollout.forward_batch_size",
)
"""Model fields a resumed run takes from the config: where to export, what to print, and
memory knobs. Any other difference from the checkpoint's hyperparameters is refused."""

RUN_MARKER = "lit_p3o_run.json"
"""Written next to every export made through the CLI: the id of the run that made it."""

_LIGHTNING_CKPT_NAMES = ("last", "best", "hpc", "registry")  # --ckpt_path values that are no file name
_RUN_ID_KEY = "lit_p3o_run_id"  # where checkpoints keep the run id
_MODEL_DIR_ARGS = ("reward_model", "policy")  # string arguments naming a saved model directory
_COMMAND_MODULES = ("os", "posix", "nt", "sys", "subprocess", "builtins")  # in a checkpoint: an attack
_TRAINER_MINIMUMS = {
    "accumulate_grad_batches": 1,  # 0: ZeroDivisionError in the first batch; < 0: runs on, meaning nothing
    "check_val_every_n_epoch": 1,  # 0: ZeroDivisionError after the first epoch (None: no epoch-based checks)
    "log_every_n_steps": 0,  # 0 logs nothing; < 0 silently logs every step
    "num_sanity_val_steps": -1,  # -1 runs all validation batches; below it, silently none
}
"""Lightning trainer counts it does not check itself (it does ``max_epochs``, ``max_steps``,
``limit_*_batches``, ``num_nodes``, ``reload_dataloaders_every_n_epochs``): their minimum values."""

class ConfigError(UserError):
    """A config or command line that cannot run; ``lit-p3o`` prints it without a traceback."""


class LitP3OCLI(LightningCLI):
    """LightningCLI over any LightningModule/DataModule named by ``class_path``.

    ``data`` is optional: RL stages feed themselves from their replay buffer.

    Optimizers: every stage builds its own from its ``optimizer`` block
    (:class:`lit_p3o.OptimizerSpec`: AdamW or bitsandbytes' 8-bit/paged AdamW, warm-up,
    cosine). LightningCLI's ``--optimizer`` (any ``torch.optim`` class or import path) and
    ``--lr_scheduler`` work as in plain LightningCLI instead: they replace the stage's
    ``configure_optimizers`` (over ``model.parameters()``; frozen ones get no gradient and so
    no update; the scheduler steps once per epoch, i.e. per rollout in RL stages). Giving both
    that and the stage's ``optimizer`` block is refused, as is ``--lr_scheduler`` alone
    (LightningCLI would ignore it silently).
    """

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("parser_class", _OneLineErrorParser)
        parser_kwargs = kwargs.setdefault("parser_kwargs", {})
        parser_kwargs.setdefault("epilog", _extra_commands())
        parser_kwargs.setdefault("formatter_class", _RawEpilogFormatter)
        self.checkpoint: dict[str, Any] | None = None  # the --ckpt_path checkpoint, once read
        _read_paths_only_as_configs()
        try:
            super().__init__(model_class=None, datamodule_class=None, **kwargs)
        except Exception as err:  # name a spec's or reward function's field by its config path
            config = self._section(None) if getattr(self, "config", None) is not None else None
            located = user_error(err, config)
            if located is None or located is err or located in _causes(err):
                raise
            raise located from err

    def _section(self, name: str | None) -> dict[str, Any]:
        """One section of the subcommand's config (``None``: all of it) as plain dicts."""
        config = self.config[self.config.subcommand] if self.config.get("subcommand") else self.config
        value = config if name is None else config.get(name)
        return {} if value is None else _plain(value)

    def _parse_ckpt_path(self) -> None:
        """Replaces LightningCLI's, which overwrites the config with the checkpoint's
        hyperparameters (so the checkpoint's stage, reward model and export directory win
        silently): here they are compared, and the config is used when they agree. A name
        Lightning resolves (``last``, ``hpc``, ...) is checked in :meth:`before_fit`, once the
        trainer that resolves it exists."""
        if not self.config.get("subcommand"):
            return
        ckpt_path = self.config[self.config.subcommand].get("ckpt_path")
        if ckpt_path and not _is_lightning_name(ckpt_path):
            self._check_checkpoint(ckpt_path)

    def _check_checkpoint(self, ckpt_path: str | Path) -> None:
        """Read the checkpoint a run resumes from and compare its settings with the config."""
        self.checkpoint = read_checkpoint(ckpt_path)
        config = {section: self._section(section) for section in ("model", "data")}
        for key, (saved, given) in check_resume(config, self.checkpoint, ckpt_path).items():
            log.info("resuming %s with %s = %r (the checkpoint had %r)", ckpt_path, key, given, saved)

    def _resolve_ckpt_name(self) -> None:
        """``--ckpt_path last|hpc|best|registry`` (or none under SLURM with an ``hpc`` checkpoint
        to requeue from): the file Lightning would load, checked like a path and then passed to
        ``fit`` in place of the name, so the checked file is the one resumed."""
        fit_args = self.config_init[self.subcommand]
        name = fit_args.get("ckpt_path")
        if name is not None and not _is_lightning_name(name):
            return
        if name is None and any(isinstance(cb, OnExceptionCheckpoint) for cb in self.trainer.callbacks):
            name = "last"  # what Lightning's fit loads by itself then
        connector = self.trainer._checkpoint_connector  # Lightning's own resolution (private API)
        try:
            path = connector._parse_ckpt_path(TrainerFn.FITTING, name, model_provided=True, model_connected=False)
        except ValueError as err:  # "best" before any fit, "hpc" without an hpc checkpoint
            raise ConfigError(f"--ckpt_path {name}: {err}") from err
        if path is None:
            return  # `last` before the first checkpoint: a new run, as in Lightning
        log.info("--ckpt_path %s: resuming from %s", name or "(none, SLURM requeue)", path)
        self._check_checkpoint(path)
        fit_args["ckpt_path"] = str(path)

    def before_instantiate_classes(self) -> None:
        self._check_optimizer_flags()
        self._check_trainer_counts()
        problems = [
            line
            for section in ("model", "data")
            for line in check_model_sources(self._section(section).get("init_args") or {}, f"{section}.init_args")
        ]
        if problems:  # all at once: one run to find every missing or incomplete path
            raise ConfigError("\n".join(problems))

    def _check_optimizer_flags(self) -> None:
        """LightningCLI's ``--optimizer``/``--lr_scheduler`` work with every stage; refuse the
        combinations LightningCLI would silently ignore."""
        config = self.config.get(str(self.subcommand), self.config)
        cli_optimizer, cli_scheduler = config.get("optimizer"), config.get("lr_scheduler")
        if cli_scheduler is not None and cli_optimizer is None:
            self.parser.error(
                "--lr_scheduler needs --optimizer; with the stage's own optimizer use "
                "model.init_args.optimizer.schedule/warmup_steps instead"
            )
        if cli_optimizer is not None and config.get("model.init_args.optimizer") is not None:
            self.parser.error(
                "--optimizer replaces the stage's `optimizer` block (model.init_args.optimizer), which "
                "would then be ignored; give one of them (e.g. add --model.init_args.optimizer null)"
            )

    def _check_trainer_counts(self) -> None:
        """The trainer counts of :data:`_TRAINER_MINIMUMS`, which Lightning takes unchecked."""
        config = self.config.get(str(self.subcommand), self.config)
        for name, minimum in _TRAINER_MINIMUMS.items():
            value = config.get(f"trainer.{name}")
            if isinstance(value, int) and value < minimum:
                raise ConfigError(f"trainer.{name}: must be >= {minimum}, got {value}")

    def before_fit(self) -> None:
        save_dir = getattr(self.model, "save_dir", None)
        problems = check_writable(self.trainer, save_dir)
        if problems:
            raise ConfigError("\n".join(problems))
        self._resolve_ckpt_name()
        run_id = (self.checkpoint or {}).get(_RUN_ID_KEY)
        new_id = run_id or uuid.uuid4().hex[:12]
        lock = None  # one run writes save_dir at a time, until it ends
        if save_dir is not None and is_launching_process():
            lock = OutputLock(save_dir, "model.init_args.save_dir", f"run {new_id} (lit-p3o fit)").acquire()
            self.trainer.callbacks.append(lock)
        try:
            if self.checkpoint is not None:
                check_export_dir(save_dir, run_id)
                keep_csv_history(self.trainer, self.checkpoint)
            elif save_dir is not None and (marker := read_run_marker(Path(save_dir))) is not None:
                log.warning("%s holds the export of run %s; this new run will replace it", save_dir, marker.get("run_id"))
            else:  # the export replaces save_dir whole: never a directory of other files
                check_export_dir(save_dir, None, writer=f"this new run (run {new_id})")
        except BaseException:
            if lock is not None:
                lock.release()
            raise
        self.trainer.callbacks.append(RunMarker(new_id, type(self.model).__qualname__, save_dir))
        self.trainer.callbacks.append(SignalCheckpoint())

    def _run_subcommand(self, subcommand: str) -> None:
        """A run stopped by SIGTERM ends with exit status 143 (128 + SIGTERM) and one line saying
        where its checkpoint is, instead of Lightning's silent exit 0 (its ``SIGTERMException``
        is a ``SystemExit`` without a code)."""
        try:
            super()._run_subcommand(subcommand)
        except SIGTERMException:
            if self.trainer.is_global_zero:
                sys.stderr.write(f"lit-p3o {subcommand}: error: {self._stopped_by_signal()}\n")
            sys.exit(128 + signal.SIGTERM)

    def _stopped_by_signal(self) -> str:
        saved = next((cb.path for cb in self.trainer.callbacks if isinstance(cb, SignalCheckpoint) and cb.path), None)
        where = f"stopped by SIGTERM after {self.trainer.global_step} optimizer steps (epoch {self.trainer.current_epoch})"
        if saved is None:
            return (f"{where}; no checkpoint was written (no ModelCheckpoint in trainer.callbacks) and nothing "
                    "was exported: the run cannot be resumed")  # fmt: skip
        return (f"{where}; nothing was exported. Checkpoint: {saved}; resume by running the same command with "
                f"--ckpt_path {saved}")  # fmt: skip


class _OneLineErrorParser(LightningArgumentParser):
    """jsonargparse's errors as one line naming the config path: it prints the subcommand's
    whole usage (60 lines) and then the nested union/class_path attempts behind a bad value.
    Flags must be spelt in full: argparse took the misspelt ``--trainer.max_epoch 2`` for
    ``--trainer.max_epochs``, which it abbreviates."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error:
            super().error(message, ex)
        words = (getattr(ex, "subcommand_parser", None) or self).prog.replace(" [options]", "").split()
        command = words[-1] if len(words) > 1 else ""  # "lit-p3o fit" names the subcommand
        exit_with(command, ConfigError(condense_parser_error(message)), ex)


def condense_parser_error(message: str) -> str:
    """``Parser key "model": … class_path 'lit_p3o.P3OModule': Parser key "rollout": … Expected a
    <class 'int'>. Got value: abc`` → ``model.init_args.rollout.num_responses: Expected a <class
    'int'>. Got value: abc``: the first innermost problem, under the path of keys above it
    (a class's arguments sit under ``init_args``, a dataclass's directly). A message without
    that structure is returned as it is."""
    path: list[tuple[int, str]] = []  # (indent, key) of the enclosing parser keys
    for line in message.splitlines():
        text, indent = line.strip(), len(line) - len(line.lstrip())
        if not text:
            continue
        while path and path[-1][0] >= indent:
            path.pop()
        key = re.fullmatch(r'Parser key "([^"]+)"(?: element \d+)?:(.*)', text)
        class_path = re.fullmatch(r"- Problem with given class_path '([^']+)':", text)
        if key:
            path.append((indent, key[1]))
            if key[2].strip():
                return f"{'.'.join(k for _, k in path)}: {key[2].strip()}"
        elif class_path:
            cls = _import_class(class_path[1])
            if not (cls is None or is_dataclass(cls)):
                path.append((indent, "init_args"))
        elif path and not text.removeprefix("- ").startswith(_PARSER_NOISE):
            return f"{'.'.join(k for _, k in path)}: {text.removeprefix('- ')}"
    return message


_PARSER_NOISE = ("Does not validate", "Subtypes:", "Errors:", "Given value", "Expected a <class 'NoneType'>",
                 "Expected a path but")  # fmt: skip


def _import_class(class_path: str) -> type | None:
    from jsonargparse._util import import_object

    try:
        return import_object(class_path)
    except Exception:  # a class that does not import is reported by the message itself
        return None


class _RawEpilogFormatter(RawDescriptionHelpFormatter, DefaultHelpFormatter):
    """Keeps the epilog's list of extra commands as written."""


def _extra_commands() -> str:
    """``lit-p3o --help``'s list of the commands beside LightningCLI's: each one's synopsis."""
    from lit_p3o.commands import COMMANDS

    lines = [fn.__doc__.strip().splitlines()[0].replace("``", "").removesuffix(".") for fn in COMMANDS.values()]
    return "more commands (each has its own --help):\n" + "\n".join(f"  {line}" for line in lines)


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``lit-p3o`` console script and ``python -m lit_p3o``.

    ``lit-p3o frontier|winrate|report …`` compare finished runs, ``lit-p3o export`` turns a
    checkpoint into a transformers/peft directory
    (:mod:`lit_p3o.commands`); every other subcommand (``fit``, ``validate``, …) is LightningCLI's.
    """
    from lit_p3o.commands import COMMANDS

    argv = sys.argv[1:] if args is None else list(args)
    command = next((a for a in argv if not a.startswith("-")), "")
    if "" not in sys.path and os.getcwd() not in sys.path:  # as `python -m`: `module:function` rewards in the cwd
        sys.path.insert(0, os.getcwd())
    try:
        if argv and argv[0] in COMMANDS:
            COMMANDS[argv[0]](argv[1:])
            return
        import lit_p3o  # noqa: F401  (registers the classes' import paths for short names)

        _show_our_logs()
        LitP3OCLI(args=args)
    except Exception as err:  # the user's mistake, named in one line (errors.py); a bug keeps its traceback
        located = user_error(err)
        if located is None:
            raise
        exit_with(command, located, err)
    finally:
        close_process_group()


def _causes(err: BaseException) -> Iterator[BaseException]:
    """The exceptions ``err`` was raised from (``raise ... from``), innermost last."""
    while err.__cause__ is not None:
        err = err.__cause__
        yield err


def _read_paths_only_as_configs() -> None:
    """jsonargparse reads a string that names an existing file as the file's contents wherever
    the argument's type also accepts a config (``reward_model``: a list of RewardSpec;
    ``train``: a Dataset), so a CSV or text file's contents became the data source or the hub
    id to download. Keep the string as the path unless the file holds a mapping or a list."""
    import jsonargparse._typehints as typehints

    parse = typehints.parse_value_or_config
    if getattr(parse, "keeps_paths", False):
        return

    def parse_value_or_config(value: Any, enable_path: bool = True, simple_types: bool = False) -> tuple[Any, Any]:
        parsed, path = parse(value, enable_path=enable_path, simple_types=simple_types)
        if path is not None and isinstance(value, str) and not isinstance(parsed, (dict, list)):
            return value, None
        return parsed, path

    parse_value_or_config.keeps_paths = True
    typehints.parse_value_or_config = parse_value_or_config


def close_process_group() -> None:
    """Destroy the process group a multi-process run opened, while the interpreter is alive.

    Lightning leaves it open; left to interpreter shutdown, gloo's worker threads are destroyed
    still joinable and the process aborts ("terminate called without an active exception",
    exit -6) after a run that succeeded.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _show_our_logs() -> None:
    """The library logs through ``logging`` (counted skips, clamps, resume notes); the command
    line shows them, as Lightning does its own, unless the user configured logging."""
    logger = logging.getLogger("lit_p3o")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[lit-p3o] %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


# --------------------------------------------------------------------------- checkpoints and resuming


def read_checkpoint(path: str | Path, flag: str = "--ckpt_path") -> dict[str, Any]:
    """A Lightning checkpoint, read with torch's safe loader only, or a :class:`ConfigError`
    naming ``flag`` and saying what the file is instead: missing, truncated or corrupted,
    holding objects the safe loader refuses (named), or not a checkpoint at all. Never
    suggests ``weights_only=False``: that would run whatever the file holds."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"{flag} {path}: no such file")
    try:
        checkpoint = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types; its own message advises weights_only=False
        unsafe = _unsafe_globals(file, err)
        if unsafe:
            commands = any(name.split(".")[0] in _COMMAND_MODULES for name in unsafe)
            advice = ("they can run commands: do not load this file" if commands else "if you trust the file and "
                      "these classes, allow them with torch.serialization.add_safe_globals")  # fmt: skip
            raise ConfigError(
                f"{flag} {path}: holds {', '.join(unsafe)}, which torch's safe loader refuses to load (loading "
                f"would run or build them); lit-p3o checkpoints hold no such objects, and {advice}"
            ) from None
        kind = describe_file(file)
        if kind == "a zip archive":  # the format torch.save writes
            unpickler = re.search(r"WeightsUnpickler error:\s*([^\n]+)", str(err))  # not torch's advice around it
            reason = unpickler[1] if unpickler else str(err).split(". ", 1)[0].splitlines()[0]
            raise ConfigError(f"{flag} {path}: is truncated or corrupted (torch cannot read it: {reason})") from None
        raise ConfigError(
            f"{flag} {path}: is {kind}, not a Lightning checkpoint (the .ckpt files ModelCheckpoint writes)"
        ) from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint or "loops" not in checkpoint:
        raise ConfigError(f"{flag} {path}: a torch file but not a Lightning checkpoint (no `state_dict`/`loops`)")
    return checkpoint


def _unsafe_globals(file: Path, err: Exception) -> list[str]:
    """The classes and functions in a torch file that its safe loading refused (empty when
    the load failed for another reason, such as a truncated file)."""
    if not isinstance(err, pickle.UnpicklingError):
        return []
    try:
        return sorted(torch.serialization.get_unsafe_globals_in_checkpoint(file))
    except Exception:  # not a zip archive (legacy format) or a corrupted one: read torch's message
        return sorted(set(re.findall(r"GLOBAL ([\w.]+)", str(err))))


def describe_file(path: Path) -> str:
    """'a text file (first line: …)', 'a zip archive' or 'a binary file': what a user gave."""
    with path.open("rb") as f:
        head = f.read(4096)
    if not head:
        return "an empty file"
    if head.startswith(b"PK\x03\x04"):
        return "a zip archive"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return "a binary file"
    if "\x00" in text:
        return "a binary file"
    first = next((line for line in text.splitlines() if line.strip()), "")
    return f"a text file (first line: {first[:60]!r})"


def check_resume(
    config: dict[str, dict[str, Any]], checkpoint: dict[str, Any], path: str | Path
) -> dict[str, tuple[Any, Any]]:
    """Compare the configured ``model`` and ``data`` with the checkpoint's hyperparameters;
    return the differences to apply (``{"model.init_args.save_dir": (saved, given)}``).

    A different class, or any difference outside :data:`CHANGEABLE_ON_RESUME`, raises a
    :class:`ConfigError` that lists every such difference.
    """
    differences: dict[str, tuple[Any, Any]] = {}
    for section, key in (("model", "hyper_parameters"), ("data", "datamodule_hyper_parameters")):
        hparams = _plain(dict(checkpoint.get(key) or {}))
        saved_class = hparams.pop("_class_path", None)
        hparams.pop("_instantiator", None)
        given_class = config.get(section, {}).get("class_path")
        if saved_class is not None and given_class is not None and _short(saved_class) != _short(given_class):
            raise ConfigError(
                f"--ckpt_path {path}: the checkpoint is a {saved_class} run but the config's {section} is "
                f"{given_class}; a checkpoint resumes only its own stage (drop --ckpt_path to start a new run)"
            )
        if not hparams:  # a run without this section, or saved without hyperparameters
            continue
        given = config.get(section, {}).get("init_args") or {}
        differences.update(_differences(hparams, given, f"{section}.init_args."))
    changeable = {f"model.init_args.{name}" for name in CHANGEABLE_ON_RESUME}
    refused = {k: v for k, v in differences.items() if k not in changeable}
    if refused:
        lines = "\n".join(f"  {k}: checkpoint {a!r}, config {b!r}" for k, (a, b) in refused.items())
        raise ConfigError(
            f"--ckpt_path {path}: the config differs from the checkpoint's run in settings a resumed run "
            f"cannot change:\n{lines}\nSet them as the checkpoint has them, or drop --ckpt_path to start a "
            f"new run. May change on resume: trainer settings, model.init_args.{{{', '.join(CHANGEABLE_ON_RESUME)}}}."
        )
    return differences


def check_export_dir(
    save_dir: str | Path | None,
    run_id: str | None,
    flag: str = "model.init_args.save_dir",
    writer: str | None = None,
    checkpoint: str | None = None,
) -> None:
    """An export goes only into a missing or empty directory, or over an export of its own run:
    one whose :data:`RUN_MARKER` names ``run_id`` (or, for a checkpoint that holds no run id,
    the same ``checkpoint`` file). Anything else is refused with one line naming ``flag``, what
    the directory holds and ``writer`` (default: this resumed run)."""
    if save_dir is None:
        return
    directory = Path(save_dir).expanduser()
    if not directory.is_dir() or not any(directory.iterdir()):
        return
    marker = read_run_marker(directory)
    if marker is not None and _same_run(marker, run_id, checkpoint):
        return
    owner = (
        f"files without a {RUN_MARKER} (not exported by a lit-p3o run)" if marker is None else _export_of(marker)
    )
    writer = writer or f"this resumed run (run {run_id or 'without an id'})"
    option = flag if flag.startswith("-") else f"--{flag}"
    raise ConfigError(
        f"{flag} {save_dir}: holds {owner}; {writer} would overwrite it. Give another {option}, or move that "
        "directory away"
    )


def _same_run(marker: dict[str, Any], run_id: str | None, checkpoint: str | None) -> bool:
    if run_id is not None:
        return marker.get("run_id") == run_id
    return checkpoint is not None and marker.get("checkpoint") == checkpoint


def _export_of(marker: dict[str, Any]) -> str:
    """'the export of run 3f2a… (P3OModule)', plus how it was made when not by ``fit`` itself."""
    text = f"the export of run {marker.get('run_id') or 'without an id'} ({marker.get('stage')})"
    if marker.get("checkpoint"):
        text += f" made by `lit-p3o export` of {marker['checkpoint']}"
    return text


def run_marker(run_id: str | None, stage: str, checkpoint: str | None = None) -> str:
    """The text of :data:`RUN_MARKER`: the run, its stage and, for ``lit-p3o export``, the
    checkpoint (absolute path) the export was made from."""
    marker: dict[str, Any] = {"run_id": run_id, "stage": stage}
    if checkpoint is not None:
        marker |= {"exported_by": "lit-p3o export", "checkpoint": checkpoint}
    return json.dumps(marker) + "\n"


def read_run_marker(directory: Path) -> dict[str, Any] | None:
    marker = directory / RUN_MARKER
    if not marker.is_file():
        return None
    try:
        return json.loads(marker.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"{marker}: unreadable run marker ({err})") from err


class RunMarker(L.Callback):
    """Keeps the run id in every checkpoint and marks the run's export directory with it."""

    def __init__(self, run_id: str, stage: str, save_dir: str | None) -> None:
        self.run_id, self.stage, self.save_dir = run_id, stage, save_dir

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        checkpoint[_RUN_ID_KEY] = self.run_id

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """After the stage's export (``on_train_end``), on success only."""
        if self.save_dir is None or not trainer.is_global_zero or not Path(self.save_dir).is_dir():
            return
        with atomic_file(Path(self.save_dir, RUN_MARKER)) as f:
            f.write(run_marker(self.run_id, self.stage).encode())


def resumed_log_step(checkpoint: dict[str, Any]) -> int:
    """The logging step at which a run resumed from ``checkpoint`` writes its first metrics.

    Lightning keeps it as ``_batches_that_stepped``, which a checkpoint written in
    ``on_train_batch_end`` holds before that update's own increment (its metrics rows carry
    the stored step); Lightning adds the missing one when it restarts from such a checkpoint.
    """
    loop = checkpoint["loops"]["fit_loop"]
    step = loop["epoch_loop.state_dict"].get("_batches_that_stepped", 0)
    batches = loop["epoch_loop.batch_progress"]["total"]
    saved_on_batch_end = batches["ready"] == batches["started"] == batches["processed"] == batches["completed"] + 1
    return step + int(saved_on_batch_end)


class SignalCheckpoint(L.Callback):
    """Checkpoints the point at which Lightning stops a run on SIGTERM.

    Lightning's signal handler only notes the signal; the loop stops at the end of the current
    update (a rollout under way is finished and its first update applied) by raising
    ``SIGTERMException``. Here that point, a consistent one to resume from exactly, is written
    as the ``ModelCheckpoint``'s last checkpoint (``last.ckpt`` in its directory; a
    ``save_last: link`` link is replaced, not written through). Without a ModelCheckpoint no
    file is written. Lightning's other handlers (SLURM requeue on SIGUSR1) are unchanged.
    """

    def __init__(self) -> None:
        self.path: str | None = None

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        callback = trainer.checkpoint_callback
        if not isinstance(exception, SIGTERMException) or not isinstance(callback, ModelCheckpoint):
            return
        if trainer.state.fn != TrainerFn.FITTING or callback.dirpath is None:
            return
        last = callback.CHECKPOINT_NAME_LAST + callback.FILE_EXTENSION
        path = callback.last_model_path or os.path.join(callback.dirpath, last)
        if trainer.is_global_zero and os.path.islink(path):
            os.remove(path)
        trainer.save_checkpoint(path)
        self.path = str(Path(path).resolve())


def keep_csv_history(trainer: L.Trainer, checkpoint: dict[str, Any]) -> None:
    """A CSVLogger writing into an existing version deletes its ``metrics.csv``; on resume,
    keep the rows logged before the resumed run's first step (:func:`resumed_log_step`), so
    the new ones are appended to them: no row is lost and none is written twice."""
    step = resumed_log_step(checkpoint)
    for logger in trainer.loggers:
        if not isinstance(logger, CSVLogger) or trainer.global_rank != 0:
            continue
        path = Path(logger.log_dir) / "metrics.csv"
        if not path.is_file():
            continue
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            header = list(reader.fieldnames or [])
            rows = [r for r in reader if r.get("step", "") == "" or int(float(r["step"])) < step]
        with warnings.catch_warnings():  # its warning that the old rows will be deleted is moot here
            warnings.filterwarnings("ignore", message="Experiment logs directory .* exists and is not empty")
            writer = logger.experiment  # created now: this is what deletes the old file
        with path.open("w", newline="", encoding="utf-8") as f:
            out = csv.DictWriter(f, fieldnames=header)
            out.writeheader()
            out.writerows(rows)
        writer.metrics_keys = header
        log.info("resuming: kept %d rows of %s logged before step %d", len(rows), path, step)


# --------------------------------------------------------------------------- up-front checks


def check_model_sources(init_args: dict[str, Any], prefix: str) -> list[str]:
    """Problems with local model/tokenizer paths in a config section, one line each naming
    the config field (hub ids and ``embedded:`` sources pass through)."""
    problems: list[str] = []
    for source, field, needs in _model_paths(init_args, prefix):
        try:
            check_model_source(source, field, needs)
        except OSError as err:
            if str(err) not in problems:  # a missing directory fails both the model and tokenizer check
                problems.append(str(err))
    return problems


def _model_paths(init_args: dict[str, Any], prefix: str) -> Iterator[tuple[str, str, Literal["model", "tokenizer"]]]:
    """(path, config field, what it must hold) for every model source in a config section."""
    for key, value in init_args.items():
        field = f"{prefix}.{key}"
        if isinstance(value, dict) and "name_or_path" in value and "architecture" in value:  # a ModelSpec
            if value.get("name_or_path"):
                yield value["name_or_path"], f"{field}.name_or_path", "model"
            token_field = "tokenizer" if value.get("tokenizer") else "name_or_path"
            if value.get(token_field):
                yield value[token_field], f"{field}.{token_field}", "tokenizer"
        elif isinstance(value, dict):
            yield from _model_paths(value, field)
        elif key in _MODEL_DIR_ARGS and isinstance(value, str) and resolve_embedded(value) is None:
            yield value, field, "model"
            yield value, field, "tokenizer"


def check_writable(trainer: L.Trainer, save_dir: str | None) -> list[str]:
    """Problems with the export directory and the trainer's log and checkpoint directories
    (each must be creatable and writable), so a run does not fail after its last epoch."""
    places = {"model.init_args.save_dir": save_dir, "trainer.default_root_dir": trainer.default_root_dir}
    for logger in trainer.loggers:
        places[f"trainer.logger ({type(logger).__name__}) save_dir"] = logger.save_dir
    checkpoint = trainer.checkpoint_callback
    if checkpoint is not None:
        places["ModelCheckpoint.dirpath"] = getattr(checkpoint, "dirpath", None)
    problems = []
    for field, directory in places.items():
        if directory is None:
            continue
        existing = Path(directory).expanduser().absolute()
        while not existing.exists():
            existing = existing.parent
        if not existing.is_dir():
            problems.append(f"{field} {directory}: cannot create a directory there, {existing} is a file")
            continue
        try:  # os.access alone misses read-only mounts for root, ACLs, full quotas
            if not os.access(existing, os.W_OK | os.X_OK):
                raise PermissionError("permission denied")
            tempfile.TemporaryFile(dir=existing).close()
        except OSError as err:
            problems.append(f"{field} {directory}: {existing} is not writable ({err.strerror or err})")
    return problems


# --------------------------------------------------------------------------- helpers

_ABSENT = "<absent>"


def _plain(value: Any) -> Any:
    """Namespaces, dataclasses and mappings as plain nested dicts."""
    if hasattr(value, "as_dict"):
        value = value.as_dict()
    if is_dataclass(value) and not isinstance(value, type):
        value = asdict(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _differences(saved: Any, given: Any, prefix: str) -> dict[str, tuple[Any, Any]]:
    """Dotted names whose values differ, descending into dicts on both sides. A name the
    checkpoint never stored (``save_hyperparameters(ignore=...)``) cannot be compared."""
    if not (isinstance(saved, dict) and isinstance(given, dict)):
        return {} if _same(saved, given) else {prefix.rstrip("."): (saved, given)}
    out: dict[str, tuple[Any, Any]] = {}
    for key in sorted(saved):
        out.update(_differences(saved[key], given.get(key, _ABSENT), f"{prefix}{key}."))
    return out


def _same(a: Any, b: Any) -> bool:
    """Equal values, or two spellings of one existing path."""
    if a == b:
        return True
    if isinstance(a, str) and isinstance(b, str) and Path(a).expanduser().exists():
        return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()
    return False


def _is_lightning_name(ckpt_path: str | Path) -> bool:
    """``--ckpt_path`` values Lightning resolves itself (``last``, ``hpc``, ``registry:…``), unless a file has that name."""
    name = str(ckpt_path)
    return not Path(name).exists() and (name in _LIGHTNING_CKPT_NAMES or name.startswith("registry"))


def _short(class_path: str) -> str:
    """``lit_p3o.stages.p3o.P3OModule`` and ``lit_p3o.P3OModule`` name one class."""
    return class_path.rsplit(".", 1)[-1]


if __name__ == "__main__":
    main()
