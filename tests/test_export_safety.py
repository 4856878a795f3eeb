"""Exports and checkpoints that survive a second writer, a full disk and bad files (issue 22,
part 1 items 6, 7 and 10, and part 2's checkpoint and export cases).

Every user-facing case runs ``python -m lit_p3o …`` in a subprocess, as a user meets it, and
checks the exit code, that stderr holds no traceback, and the one line naming the flag or field
and the file; a full disk is a file-size limit on that process. One micro P3O run (module
fixture) supplies the checkpoint and export; each case that writes copies what it needs first.
A few tests check the helpers of :mod:`lit_p3o.runs` in process (failures mid-write, a lock
left by a killed process, mount points).
"""

from __future__ import annotations

import errno
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import pytest
import torch
from test_bad_inputs import ENV, error_line, lit_p3o, p3o_config, p3o_run, write_yaml  # noqa: F401 (fixture)

from lit_p3o.runs import OutputLock, atomic_file, lock_path, replaced_directory


def run_cli(*args: str, cwd: Path, file_limit: int | None = None) -> subprocess.CompletedProcess:
    """``lit_p3o(...)``, optionally with no file written beyond ``file_limit`` bytes: a full disk
    without root (writes past it fail with EFBIG; Python ignores SIGXFSZ)."""
    if file_limit is None:
        return lit_p3o(*args, cwd=cwd)
    limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (file_limit, file_limit))  # noqa: E731
    return subprocess.run(
        [sys.executable, "-m", "lit_p3o", *args],
        cwd=cwd,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=limit,
    )


def refused(result: subprocess.CompletedProcess) -> str:
    """The error line of a run that must have stopped cleanly."""
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return error_line(result)


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def leftovers(directory: Path) -> list[str]:
    """Partial files, staging directories and lock files a failed write must not leave."""
    return sorted(p.name for p in directory.iterdir() if p.name.endswith((".partial", ".previous", ".lock")))


@pytest.fixture(scope="module")
def run(p3o_run):  # noqa: F811 (the imported fixture, by name)
    """A finished one-rollout P3O run: ``ckpt/last.ckpt`` and its marked ``export/``."""
    return p3o_run[0]


@pytest.fixture
def work(run, tmp_path) -> Path:
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run"


def run_id(work: Path) -> str:
    return json.loads((work / "export" / "lit_p3o_run.json").read_text())["run_id"]


# --------------------------------------------------------------------------- 6. export follows save_dir's rules


def test_export_into_a_directory_of_other_files_is_refused(run, tmp_path):
    out = tmp_path / "notes"
    out.mkdir()
    (out / "todo.txt").write_text("mine")
    result = run_cli("export", "--ckpt", str(run / "ckpt/last.ckpt"), "--out", str(out), cwd=run)
    assert refused(result).startswith(
        f"lit-p3o export: error: --out {out}: holds files without a lit_p3o_run.json (not exported by a lit-p3o run); "
        f"this export of {run / 'ckpt/last.ckpt'} (run {run_id(run)}) would overwrite it. Give another --out"
    )
    assert snapshot(out) == {"todo.txt": b"mine"} and leftovers(tmp_path) == []


def test_export_over_another_runs_export_is_refused_and_over_its_own_replaces_it(work):
    other = torch.load(work / "ckpt/last.ckpt", weights_only=False)
    other["lit_p3o_run_id"] = "0123456789ab"
    torch.save(other, work / "other.ckpt")
    first = run_cli("export", "--ckpt", "other.ckpt", "--out", "shared", cwd=work)
    assert first.returncode == 0, first.stderr[-3000:]
    marker = json.loads((work / "shared/lit_p3o_run.json").read_text())
    assert marker == {
        "run_id": "0123456789ab",
        "stage": "P3OModule",
        "exported_by": "lit-p3o export",
        "checkpoint": str(work / "other.ckpt"),
    }
    before = snapshot(work / "shared")

    result = run_cli("export", "--ckpt", "ckpt/last.ckpt", "--out", "shared", cwd=work)
    assert refused(result) == (
        "lit-p3o export: error: --out shared: holds the export of run 0123456789ab (P3OModule) made by "
        f"`lit-p3o export` of {work / 'other.ckpt'}; this export of ckpt/last.ckpt (run {run_id(work)}) would "
        "overwrite it. Give another --out, or move that directory away"
    )
    assert snapshot(work / "shared") == before

    # the run's own export (written by fit) may be replaced by an export of the run's checkpoint, whole
    (work / "export" / "stale.bin").write_bytes(b"from an earlier export")
    again = run_cli("export", "--ckpt", "ckpt/last.ckpt", "--out", "export", cwd=work)
    assert again.returncode == 0, again.stderr[-3000:]
    assert not (work / "export" / "stale.bin").exists()
    assert json.loads((work / "export/lit_p3o_run.json").read_text())["run_id"] == run_id(work)
    assert leftovers(work) == []


# --------------------------------------------------------------------------- 7. one writer per export directory

WAITING_REWARD = '''
import time
import zipfile
from pathlib import Path


def reward(prompts, completions, **kwargs):
    """Holds the run in its first rollout until the test creates `go`."""
    while not Path("go").exists():
        time.sleep(0.05)
    return [float(len(c)) for c in completions]
'''


@pytest.mark.slow  # two fits
def test_a_second_fit_on_the_same_save_dir_is_stopped(tmp_path):
    (tmp_path / "waiting.py").write_text(WAITING_REWARD)
    write_yaml(tmp_path / "p3o.yaml", p3o_config(reward_model="waiting:reward"))
    first = subprocess.Popen(
        [sys.executable, "-m", "lit_p3o", "fit", "--config", "p3o.yaml"],
        cwd=tmp_path,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lock = lock_path(tmp_path / "export")
    try:
        while not (lock.is_file() and lock.read_text()):  # the first run holds save_dir
            assert first.poll() is None, first.communicate()[1][-3000:]
            time.sleep(0.1)
        second = run_cli(
            "fit", "--config", "p3o.yaml", "--model.init_args.reward_model", "embedded:reviews", cwd=tmp_path
        )
    finally:
        (tmp_path / "go").touch()
        out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-3000:]
    first_id = json.loads((tmp_path / "export/lit_p3o_run.json").read_text())["run_id"]
    line = refused(second)
    assert line.startswith(
        f"lit-p3o fit: error: model.init_args.save_dir export: run {first_id} (lit-p3o fit) (pid {first.pid} on "
    )
    assert line.endswith("is writing there; wait until it ends, or give another --model.init_args.save_dir")
    assert "[lit-p3o] saved the policy" in out + err and "saved the policy" not in second.stdout + second.stderr
    assert not lock.exists()


def test_export_into_a_directory_in_use_is_stopped(run, tmp_path):
    out = tmp_path / "out"
    with OutputLock(out, "model.init_args.save_dir", "run 0123456789ab (lit-p3o fit)"):
        result = run_cli("export", "--ckpt", str(run / "ckpt/last.ckpt"), "--out", str(out), cwd=run)
    assert refused(result).startswith(
        f"lit-p3o export: error: --out {out}: run 0123456789ab (lit-p3o fit) (pid {os.getpid()} on "
    )
    assert not out.exists()


def test_a_lock_left_by_a_killed_process_is_taken_over(tmp_path):
    killed = subprocess.run(
        [
            sys.executable,
            "-c",
            (
                "import os, signal; from lit_p3o.runs import OutputLock; "
                f"OutputLock({str(tmp_path / 'out')!r}, '--out', 'killed').acquire(); os.kill(os.getpid(), signal.SIGKILL)"
            ),
        ],
        env=ENV,
        capture_output=True,
        text=True,
    )
    assert killed.returncode == -9, killed.stderr
    assert "killed" in lock_path(tmp_path / "out").read_text()  # left behind
    with OutputLock(tmp_path / "out", "--out", "next"):
        assert "next" in lock_path(tmp_path / "out").read_text()
    assert not lock_path(tmp_path / "out").exists()


def test_a_new_run_refuses_a_save_dir_of_other_files(tmp_path):
    write_yaml(tmp_path / "p3o.yaml", p3o_config())
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "todo.txt").write_text("mine")
    result = run_cli("fit", "--config", "p3o.yaml", cwd=tmp_path)
    assert refused(result).startswith(
        "lit-p3o fit: error: model.init_args.save_dir export: holds files without a lit_p3o_run.json (not exported "
        "by a lit-p3o run); this new run (run "
    )
    assert not (tmp_path / "ckpt").exists()  # stopped before training


# --------------------------------------------------------------------------- 10. full disks and read-only places


@pytest.mark.slow  # a resumed fit
def test_checkpoint_on_a_full_disk_keeps_the_last_good_one(work):
    config = p3o_config()  # a copied run: ModelCheckpoint would write last-v1.ckpt beside last.ckpt
    config["trainer"]["callbacks"][0]["init_args"]["enable_version_counter"] = False
    write_yaml(work / "p3o.yaml", config)
    good = (work / "ckpt/last.ckpt").read_bytes()
    assert len(good) > 150_000  # the limit below stops the checkpoint, not the small files of the run
    result = run_cli(
        "fit",
        "--config",
        "p3o.yaml",
        "--ckpt_path",
        "ckpt/last.ckpt",
        "--trainer.max_epochs",
        "2",
        cwd=work,
        file_limit=150_000,
    )
    assert refused(result) == (
        f"lit-p3o fit: error: checkpoint {work / 'ckpt/last.ckpt'}: could not be written (File too large); "
        "the previous one there, if any, is unchanged"
    )
    assert (work / "ckpt/last.ckpt").read_bytes() == good
    assert leftovers(work / "ckpt") == [] and leftovers(work) == []


def test_export_on_a_full_disk_keeps_the_previous_export(work):
    config = json.loads((work / "export/config.json").read_text())  # the previous export, told apart
    (work / "export/config.json").write_text(json.dumps({**config, "_previous_export": True}))
    before = snapshot(work / "export")
    result = run_cli("export", "--ckpt", "ckpt/last.ckpt", "--out", "export", cwd=work, file_limit=20_000)
    assert refused(result) == (
        "lit-p3o export: error: --out export: could not be written (File too large); "
        "the previous one there, if any, is unchanged"
    )
    assert snapshot(work / "export") == before and leftovers(work) == []


@pytest.mark.slow  # a fit
def test_fit_export_on_a_full_disk_keeps_the_previous_export(run, tmp_path):
    config = p3o_config()
    config["trainer"] |= {"callbacks": [], "enable_checkpointing": False}  # the export is the largest file
    write_yaml(tmp_path / "p3o.yaml", config)
    shutil.copytree(run / "export", tmp_path / "export")  # another run's export, which this run would replace
    before = snapshot(tmp_path / "export")
    result = run_cli("fit", "--config", "p3o.yaml", cwd=tmp_path, file_limit=20_000)
    assert refused(result) == (
        "lit-p3o fit: error: model.init_args.save_dir export: could not be written (File too large); "
        "the previous one there, if any, is unchanged"
    )
    assert snapshot(tmp_path / "export") == before and leftovers(tmp_path) == []


def read_only_directory(tmp_path: Path) -> Path:
    """A directory nobody can create files in: permissions, or (as root) a read-only system one."""
    candidate = tmp_path / "read_only"
    candidate.mkdir()
    candidate.chmod(0o555)
    for place in (candidate, Path("/sys"), Path("/proc")):
        try:
            tempfile.TemporaryFile(dir=place).close()
        except OSError:
            return place
    pytest.skip("no read-only directory here (root on writable mounts)")


def test_export_to_a_read_only_directory_names_out(run, tmp_path):
    out = read_only_directory(tmp_path) / "lit_p3o_export"
    result = run_cli("export", "--ckpt", str(run / "ckpt/last.ckpt"), "--out", str(out), cwd=run)
    line = refused(result)
    assert line.startswith(f"lit-p3o export: error: --out {out}: could not be written (")
    assert "Permission denied" in line or "Read-only file system" in line


def test_atomic_file_keeps_the_old_file_when_the_write_fails(tmp_path):
    target = tmp_path / "last.ckpt"
    target.write_bytes(b"good")
    with pytest.raises(OSError, match="No space left"):
        with atomic_file(target) as f:
            f.write(b"half a checkpoint")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert target.read_bytes() == b"good" and [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


# --------------------------------------------------------------------------- part 2: checkpoints named, never unpickled


class RunsACommand:
    def __reduce__(self):
        return (os.system, ("echo this ran",))


def bad_checkpoints(work: Path) -> dict[str, Path]:
    good = (work / "ckpt/last.ckpt").read_bytes()
    (work / "truncated.ckpt").write_bytes(good[: len(good) // 2])
    with zipfile.ZipFile(work / "ckpt/last.ckpt") as source, zipfile.ZipFile(work / "corrupted.ckpt", "w") as target:
        for item in source.infolist():  # the archive intact, its pickle stream garbled
            data = source.read(item)
            target.writestr(item, b"\x80\x02\xff" + data[3:] if item.filename.endswith("data.pkl") else data)
    checkpoint = torch.load(work / "ckpt/last.ckpt", weights_only=False)
    checkpoint["callbacks"] = {"Evil": RunsACommand()}
    torch.save(checkpoint, work / "unsafe.ckpt")
    return {
        "truncated": work / "truncated.ckpt",
        "corrupted": work / "corrupted.ckpt",
        "unsafe": work / "unsafe.ckpt",
        "text": work / "p3o.yaml",
    }


EXPECTED = {
    "corrupted": "is truncated or corrupted (torch cannot read it: Unsupported operand 255)",
    "truncated": "is truncated or corrupted (torch cannot read it: PytorchStreamReader failed reading zip archive: "
    "failed finding central directory)",
    "unsafe": "holds posix.system, which torch's safe loader refuses to load (loading would run or build them); "
    "lit-p3o checkpoints hold no such objects, and they can run commands: do not load this file",
    "text": "is a text file (first line: 'model:'), not a Lightning checkpoint (the .ckpt files ModelCheckpoint writes)",
}


@pytest.mark.parametrize("case", sorted(EXPECTED))
@pytest.mark.parametrize("command", ["fit", "export"])
def test_bad_checkpoints_are_named_for_fit_and_export(work, command, case):
    path = bad_checkpoints(work)[case].name
    args = (
        ["fit", "--config", "p3o.yaml", "--ckpt_path", path]
        if command == "fit"
        else ["export", "--ckpt", path, "--out", "out"]
    )
    result = run_cli(*args, cwd=work)
    flag = "--ckpt_path" if command == "fit" else "--ckpt"
    assert refused(result) == f"lit-p3o {command}: error: {flag} {path}: {EXPECTED[case]}"
    assert "weights_only" not in result.stderr and "this ran" not in result.stdout
    assert not (work / "out").exists()


@pytest.mark.parametrize("mounted", [False, True])
def test_replaced_directory_swaps_whole_or_not_at_all(tmp_path, monkeypatch, mounted):
    """A mount point cannot be renamed: its entries are swapped instead, with the same outcome."""
    target = tmp_path / "export"
    target.mkdir()
    (target / "old.bin").write_bytes(b"previous export")
    monkeypatch.setattr("lit_p3o.runs.os.path.ismount", lambda path: mounted and Path(path) == target)
    with pytest.raises(OSError, match="No space left"):
        with replaced_directory(target) as staging:
            (staging / "new.bin").write_bytes(b"half")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert snapshot(target) == {"old.bin": b"previous export"} and leftovers(tmp_path) == []
    with replaced_directory(target) as staging:
        (staging / "new.bin").write_bytes(b"new export")
    assert snapshot(target) == {"new.bin": b"new export"} and sorted(p.name for p in tmp_path.iterdir()) == ["export"]
