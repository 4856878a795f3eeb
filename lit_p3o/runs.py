"""Outputs that survive crashes, full disks and a second run: locks and atomic writes.

* :class:`OutputLock`: one writer per export directory. ``lit-p3o fit`` holds it on
  ``model.init_args.save_dir`` from ``before_fit`` to the end of the run, ``lit-p3o export`` on
  ``--out``; a second writer is stopped with a message naming the first. The lock is an
  ``flock`` on a file beside the directory, so the kernel releases it when its process dies
  (``kill -9`` included): a lock file left behind by a dead run is simply taken over.
* :func:`replaced_directory`: an export is written into a temporary sibling and renamed into
  place, so a failure (full disk, crash) leaves the previous export whole.
* :class:`AtomicCheckpointIO`: checkpoints are written to a temporary file in their own
  directory and renamed over the old one. Lightning's ``TorchCheckpointIO`` stages the file
  in the system temporary directory (``$TMPDIR``) and moves it; across filesystems that move
  is a copy onto the old checkpoint, which a full disk leaves truncated. Every lit-p3o stage
  installs it in ``setup`` (:func:`use_atomic_checkpoints`), under any Trainer.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import lightning as L
import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import get_filesystem

from lit_p3o.errors import ConfigError


def write_error(what: str, path: str | Path, err: OSError) -> Exception:
    """The one-line error for an output that could not be written: the path and the cause
    (e.g. "No space left on device"); ``lit-p3o`` prints it without a traceback."""
    cause = err.strerror or str(err)
    return ConfigError(f"{what} {path}: could not be written ({cause}); the previous one there, if any, is unchanged")


# --------------------------------------------------------------------------- one writer per directory


def is_launching_process() -> bool:
    """True in the process a multi-process run is started from (global rank 0), and in every
    single-process run: before ``fit`` the trainer's ranks are not set up yet, but the
    launchers' environment variables are."""
    return all(os.environ.get(name, "0") == "0" for name in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"))


class OutputLock(L.Callback):
    """An exclusive lock on writing ``directory``, held by one process; as a callback it is
    released when the run ends, however it ends (``teardown``/``on_exception``)."""

    def __init__(self, directory: str | Path, field: str, holder: str) -> None:
        """``field`` names the setting in messages (``--out``); ``holder`` describes this
        process's work to whoever is stopped by the lock (``run 3f2a… (lit-p3o fit)``)."""
        self.directory, self.field, self.holder = Path(directory).expanduser(), field, holder
        self.path = lock_path(self.directory)
        self._fd: int | None = None

    def acquire(self) -> OutputLock:
        """Take the lock or raise a ConfigError naming the process that holds it."""
        while True:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as err:  # a read-only or full place: the export could not be written either
                raise write_error(self.field, self.directory, err) from err
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                other = _read_holder(fd)
                os.close(fd)
                raise ConfigError(
                    f"{self.field} {self.directory}: {other} is writing there; wait until it ends, "
                    f"or give another {_flag(self.field)}"
                ) from None
            if _same_file(fd, self.path):  # not a lock file its holder removed while we waited
                break
            os.close(fd)
        self._fd = fd
        info = {
            "holder": self.holder,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        }
        try:  # who holds it, for the message of whoever is stopped
            os.ftruncate(fd, 0)
            os.write(fd, (json.dumps(info) + "\n").encode())
        except OSError as err:
            self.release()
            raise write_error(self.field, self.directory, err) from err
        return self

    def release(self) -> None:
        """Remove the lock file and drop the lock (removing first: a process that opened the
        old file and then gets the lock sees the file is gone and retries)."""
        if self._fd is None:
            return
        if _same_file(self._fd, self.path):
            self.path.unlink()
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.release()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self.release()


def lock_path(directory: Path) -> Path:
    """The lock file of an output directory: beside it, so the directory can be replaced whole."""
    directory = directory.expanduser().absolute()
    return directory.parent / f".{directory.name}.lit_p3o.lock"


def _flag(field: str) -> str:
    return field if field.startswith("-") else f"--{field}"


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


def _read_holder(fd: int) -> str:
    """``run 3f2a… (lit-p3o fit, pid 123 on host, since …)`` from a held lock file."""
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (UnicodeDecodeError, json.JSONDecodeError):
        info = {}
    if not info:
        return "another process (it is still starting)"
    return f"{info.get('holder', 'another process')} (pid {info.get('pid')} on {info.get('host')}, since {info.get('since')})"


# --------------------------------------------------------------------------- atomic writes


@contextmanager
def atomic_file(path: str | Path) -> Iterator[IO[bytes]]:
    """A binary file that replaces ``path`` only once it is completely written and on disk;
    on any error ``path`` is left as it was and the partial file is removed."""
    path = Path(path)
    partial = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.partial")
    try:
        with open(partial, "xb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


@contextmanager
def replaced_directory(target: str | Path) -> Iterator[Path]:
    """An empty directory beside ``target`` to write into; once the block succeeds it takes
    ``target``'s place (the previous ``target`` is removed), otherwise it is removed and
    ``target`` is left as it was.

    A ``target`` that is a mount point cannot be renamed: the staging directory is made inside
    it and its entries are moved into place once written (renames only, which need no space)."""
    target = Path(target).expanduser()
    token = uuid.uuid4().hex[:8]
    mounted = os.path.ismount(target)
    staging = target / f".{token}.partial" if mounted else target.with_name(f".{target.name}.{token}.partial")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging.mkdir()
    try:
        yield staging
        if mounted:
            _move_entries_into(target, staging, token)
            return
        try:
            os.rename(staging, target)  # a missing or empty target is replaced in one step
        except OSError as err:
            if err.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            previous = target.with_name(f".{target.name}.{token}.previous")
            os.rename(target, previous)
            os.rename(staging, target)
            shutil.rmtree(previous, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _move_entries_into(target: Path, staging: Path, token: str) -> None:
    """Replace ``target``'s entries with ``staging``'s (which lies inside it), then remove ``staging``."""
    previous = target / f".{token}.previous"
    previous.mkdir()
    for entry in target.iterdir():
        if entry not in (staging, previous):
            os.rename(entry, previous / entry.name)
    for entry in staging.iterdir():
        os.rename(entry, target / entry.name)
    staging.rmdir()
    shutil.rmtree(previous, ignore_errors=True)


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local checkpoints are written beside their path and renamed
    over it (see the module docstring); a failed write raises one line naming the path."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or not isinstance(get_filesystem(path), LocalFileSystem):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_file(path) as f:
                torch.save(checkpoint, f)
        except OSError as err:
            raise write_error("checkpoint", path, err) from err


def use_atomic_checkpoints(trainer: L.Trainer) -> None:
    """Make the trainer write checkpoints atomically, unless the user chose how they are written."""
    if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
        trainer.strategy.checkpoint_io = AtomicCheckpointIO()
