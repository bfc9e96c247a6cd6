"""The run folder: the names of what evolora writes there, the marker that proves evolora made the folder, and
the lock that keeps two processes out of one folder.

evolora replaces a run folder (`output.overwrite`) only when the marker says evolora made it and every entry
in it is one evolora writes; anything else (a user's data, notes, another program's output) is refused by name
and never touched."""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
from pathlib import Path
from typing import Optional

from evolora import atomic
from evolora.errors import EvoloraError

MARKER = ".evolora-run"
LOCK = ".lock"
CONFIG = "config.yaml"
PROGRESS = "progress.json"
METRICS = "metrics.json"
STEPS = "steps.jsonl"
EVAL = "eval.json"
REPORT = "report.html"
CHECKPOINTS, STATE, PREDICTIONS, PLOTS, TENSORBOARD = "checkpoints", "state", "predictions", "plots", "tensorboard"
MLRUNS, MLFLOW_DB, WANDB = "mlruns", "mlflow.db", "wandb"
"""The trackers' folders (MLflow's file store, W&B's offline runs) when they write into the run folder."""
METHOD_FILES = {"cmoe_plan.json"}
"""Files a method writes into the run folder (each method's module names its own)."""

WRITTEN = {MARKER, LOCK, CONFIG, PROGRESS, METRICS, STEPS, EVAL, REPORT, CHECKPOINTS, STATE, PREDICTIONS, PLOTS,
           TENSORBOARD, MLRUNS, MLFLOW_DB, WANDB} | METHOD_FILES
_TEMPORARY = re.compile(r"^\.(.+)\.[^.]+\.tmp$")
"""An atomic write's temporary file, left by a crash (atomic.atomic_path names it `.<name>.<random>.tmp`)."""

def _ours(entry: Path) -> bool:
    match = _TEMPORARY.match(entry.name)
    return entry.name in WRITTEN or bool(match and match.group(1) in WRITTEN)


def is_marked(run_dir: Path) -> bool:
    return (Path(run_dir) / MARKER).is_file()


def check_replaceable(run_dir: Path, overwrite: bool) -> None:
    """Raises unless the folder is missing, empty (but for the lock), or a run folder evolora marked that holds
    only what evolora writes and `overwrite` is set. Reads only; nothing is deleted here."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise EvoloraError(f"{run_dir}: output.dir is a file, not a folder")
    if not run_dir.is_dir():
        return
    entries = [p for p in run_dir.iterdir() if p.name != LOCK]
    if not entries:
        return
    if not is_marked(run_dir):
        raise EvoloraError(f"{run_dir}: folder is not empty and is not a run folder evolora made (no {MARKER}); "
                           "evolora never replaces it: choose another output.dir")
    if not overwrite:
        raise EvoloraError(f"{run_dir}: run folder exists and is not empty; choose another output.dir, set "
                           "output.overwrite=true, or continue it with --resume")
    foreign = sorted(p.name for p in entries if not _ours(p))
    if foreign:
        raise EvoloraError(f"{run_dir}: holds {foreign[0]!r}" + (f" and {len(foreign) - 1} more" if len(foreign) > 1
                                                                 else "")
                           + ", which evolora did not write; move it out before overwriting this run folder")


def clear(run_dir: Path) -> None:
    """Deletes what evolora wrote in a run folder that `check_replaceable` accepted (the lock stays)."""
    run_dir = Path(run_dir)
    check_replaceable(run_dir, overwrite=True)
    for entry in run_dir.iterdir():
        if entry.name in (LOCK, MARKER) or not _ours(entry):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def mark(run_dir: Path, name: str) -> None:
    atomic.write_json(Path(run_dir) / MARKER, {"evolora_run": name})


class RunLock:
    """An exclusive lock on a run folder, held with flock on `.lock`: the kernel drops it when the holder
    exits, however it exits, so a crashed run's lock is never stale and taking it over is atomic. The file
    names the holder's pid for the error message; it is never deleted (a deleted lock file would let a second
    process lock a new file while the first still holds the old one)."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK
        self.fd: Optional[int] = None

    def __enter__(self) -> "RunLock":
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise EvoloraError(f"{self.path}: cannot create the run-folder lock ({exc.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            raise EvoloraError(f"{self.path.parent}: run folder is in use by process {owner or '(unknown)'}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def read_json(path: Path, what: str, shape: type = dict):
    """A run-folder JSON file of the expected top-level shape, or one line naming the file."""
    path = Path(path)
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:  # file:line, as the report's reader gave before this helper served it
        raise EvoloraError(f"{path}:{exc.lineno}: {what} is corrupt (invalid JSON: {exc.msg})") from None
    except (UnicodeDecodeError, RecursionError):
        raise EvoloraError(f"{path}: {what} is corrupt (not UTF-8 JSON, or nested too deeply)") from None
    if not isinstance(value, shape):
        raise EvoloraError(f"{path}: {what} is not a JSON {shape.__name__}")
    return value
