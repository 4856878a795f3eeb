"""Checkpoints and runs: reading a ``--ckpt_path`` safely, checking that it resumes the
configured run, and the run marker that tells one run's export from another's.

* :func:`read_checkpoint` reads a Lightning checkpoint with torch's safe loader only and says
  what a file is when it is not one; :func:`check_resume` compares its hyperparameters with the
  config, except those in :data:`CHANGEABLE_ON_RESUME`;
* :class:`RunMarker` keeps the run id in every checkpoint and writes :data:`RUN_MARKER` into the
  export directory; :func:`check_export_dir` refuses to export over another run's files;
* :func:`keep_csv_history` keeps a resumed run's earlier CSV metrics, and :class:`SignalCheckpoint`
  saves the point at which SIGTERM stopped a run.

The CLI (:mod:`lit_p3o.cli`) and ``lit-p3o export`` (:mod:`lit_p3o.commands.export`) use them.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import pickle
import re
import warnings
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lit_p3o.errors import ConfigError
from lit_p3o.runs import atomic_file

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

_RUN_ID_KEY = "lit_p3o_run_id"  # where checkpoints keep the run id
_COMMAND_MODULES = ("os", "posix", "nt", "sys", "subprocess", "builtins")  # in a checkpoint: an attack


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
            advice = (
                "they can run commands: do not load this file"
                if commands
                else "if you trust the file and these classes, allow them with torch.serialization.add_safe_globals"
            )
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
    owner = f"files without a {RUN_MARKER} (not exported by a lit-p3o run)" if marker is None else _export_of(marker)
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


def _short(class_path: str) -> str:
    """``lit_p3o.stages.p3o.P3OModule`` and ``lit_p3o.P3OModule`` name one class."""
    return class_path.rsplit(".", 1)[-1]
