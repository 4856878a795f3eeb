"""``lit-p3o``: a LightningCLI over every stage and data module of the library.

Configs name their classes (``class_path: lit_p3o.SFTModule``), so the same YAML files
work under any user's LightningCLI; ``lit-p3o fit --print_config`` documents every knob.

Before any model is built or step taken, the CLI checks what would otherwise fail late or
silently (a :class:`ConfigError` names the config field):

* local model paths exist and hold a model and a tokenizer;
* the export, log and checkpoint directories can be written;
* ``--ckpt_path`` is a Lightning checkpoint of the configured stage whose hyperparameters
  match the config, except those in :data:`~lit_p3o.checkpoints.CHANGEABLE_ON_RESUME` (trainer settings, such as
  epochs, logging, evaluation callbacks and checkpointing, come from the config anyway);
  a resumed run refuses an export directory that holds another run's export (runs are told
  apart by the id in :data:`~lit_p3o.checkpoints.RUN_MARKER`) and appends to its CSV metrics instead of replacing them.
  Lightning's names (``--ckpt_path last``, ``hpc``, …) are resolved to their file and checked alike;
* a new run refuses an export directory that holds files but no run's export, and a second
  run (or ``lit-p3o export``) on an export directory in use is stopped (:class:`~lit_p3o.runs.OutputLock`).

A run stopped by SIGTERM saves a checkpoint (:class:`~lit_p3o.checkpoints.SignalCheckpoint`) and exits with status 143
and one line saying how to resume.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import sys
import tempfile
import uuid
from argparse import RawDescriptionHelpFormatter
from collections.abc import Iterator
from dataclasses import is_dataclass
from pathlib import Path
from typing import Any, Literal, NoReturn

import lightning as L
import torch
from jsonargparse import DefaultHelpFormatter
from lightning.pytorch.callbacks import OnExceptionCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lit_p3o.checkpoints import (
    _RUN_ID_KEY,
    RunMarker,
    SignalCheckpoint,
    _plain,
    check_export_dir,
    check_resume,
    keep_csv_history,
    read_checkpoint,
    read_run_marker,
)
from lit_p3o.errors import ConfigError, exit_with, user_error
from lit_p3o.models import check_model_source
from lit_p3o.runs import OutputLock, is_launching_process
from lit_p3o.tasks import resolve_embedded

log = logging.getLogger(__name__)

_LIGHTNING_CKPT_NAMES = ("last", "best", "hpc", "registry")  # --ckpt_path values that are no file name
_MODEL_DIR_ARGS = ("reward_model", "policy")  # string arguments naming a saved model directory
_TRAINER_MINIMUMS = {
    "accumulate_grad_batches": 1,  # 0: ZeroDivisionError in the first batch; < 0: runs on, meaning nothing
    "check_val_every_n_epoch": 1,  # 0: ZeroDivisionError after the first epoch (None: no epoch-based checks)
    "log_every_n_steps": 0,  # 0 logs nothing; < 0 silently logs every step
    "num_sanity_val_steps": -1,  # -1 runs all validation batches; below it, silently none
}
"""Lightning trainer counts it does not check itself (it does ``max_epochs``, ``max_steps``,
``limit_*_batches``, ``num_nodes``, ``reload_dataloaders_every_n_epochs``): their minimum values."""


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
                log.warning(
                    "%s holds the export of run %s; this new run will replace it", save_dir, marker.get("run_id")
                )
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
        where = (
            f"stopped by SIGTERM after {self.trainer.global_step} optimizer steps (epoch {self.trainer.current_epoch})"
        )
        if saved is None:
            return (
                f"{where}; no checkpoint was written (no ModelCheckpoint in trainer.callbacks) and nothing "
                "was exported: the run cannot be resumed"
            )
        return (
            f"{where}; nothing was exported. Checkpoint: {saved}; resume by running the same command with "
            f"--ckpt_path {saved}"
        )


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


_PARSER_NOISE = (
    "Does not validate",
    "Subtypes:",
    "Errors:",
    "Given value",
    "Expected a <class 'NoneType'>",
    "Expected a path but",
)


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
        _hide_lightning_tips()
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
    from lit_p3o.vllm_engine import release_engine  # vLLM's engine holds groups of it (backend: vllm)

    release_engine()
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


def _hide_lightning_tips() -> None:
    """Lightning prints "💡 Tip: ... try installing litlogger/litmodels" on every run: offers of
    its cloud services that say nothing about the run. It has no switch for them
    (Lightning-AI/pytorch-lightning#21294), so drop them where Lightning's rank-zero messages
    are logged; its other messages stay."""
    from lightning_utilities.core import rank_zero

    rank_zero.log.addFilter(_not_a_lightning_tip)  # adding the same function twice keeps one


def _not_a_lightning_tip(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("💡 Tip:")


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


def _is_lightning_name(ckpt_path: str | Path) -> bool:
    """``--ckpt_path`` values Lightning resolves itself (``last``, ``hpc``, ``registry:…``), unless a file has that name."""
    name = str(ckpt_path)
    return not Path(name).exists() and (name in _LIGHTNING_CKPT_NAMES or name.startswith("registry"))


if __name__ == "__main__":
    main()
