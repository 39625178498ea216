"""Atomic Parquet writers: a table is rewritten whole to a temporary file in the same folder
and renamed over the old one, so a reader (or a killed writer) never sees half a table. Files
get the mode the user's umask gives a new file (raypo.files), so a report folder can be
shared.

On object storage (a raypo.storage.RemotePath) there is no rename: a table is serialised in
memory and sent in one upload (one PUT, or a multipart upload completed at the end), and the
storage makes an object visible only once its upload has completed, so a reader sees the old
table or the new one, never half of one."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import pandas as pd

from raypo.errors import RaypoError
from raypo.files import write_whole
from raypo.storage import RemotePath, location


def _parquet_safe(frame: pd.DataFrame) -> pd.DataFrame:
    """A column whose values mix text and numbers (a choice of [null, 0.1, "auto"]) is
    stored as text: Parquet columns have one type."""
    mixed = [c for c in frame.columns if frame[c].dtype == object
             and len({type(v) for v in frame[c].dropna()} - {bool}) > 1]
    if not mixed:
        return frame
    frame = frame.copy()
    for c in mixed:
        frame[c] = frame[c].map(lambda v: None if v is None or v is pd.NA else str(v))
    return frame


class ReportWriteError(RaypoError, OSError):
    """A report file could not be written (a full disk, a read-only folder); the message
    names the file, and the file as it was before is unchanged."""

    def __init__(self, message: str, code: int | None = None):
        super().__init__(message)
        self.errno = code

    def __str__(self) -> str:
        return self.args[0]


def _reason(error: OSError) -> tuple[str, int | None]:
    """(the system's words for the error, its errno): pyarrow's errors carry the errno only
    in their text."""
    code = error.errno
    if code is None:
        found = re.search(r"\[errno (\d+)\]", str(error))
        code = int(found.group(1)) if found else None
    return (os.strerror(code) if code else " ".join(str(error).split())), code


def _atomic(path: Path | RemotePath, write) -> None:
    """`write(temporary path)`, then that file becomes `path` whole (raypo.files.write_whole:
    a rename, or one upload to object storage); on a failure ReportWriteError says which
    file and why, and the file is as it was."""
    remote = isinstance(path, RemotePath)
    before = "object is unchanged" if remote else (
        "file is unchanged" if path.exists() else "file was not written")
    try:
        if remote:
            write_whole(path.key, write, fs=path.fs)
        else:
            write_whole(path, write)
    except OSError as e:
        reason, code = _reason(e)
        raise ReportWriteError(f"{path}: cannot write: {reason} (the {before})", code) from e


def write_parquet_atomic(path: Path | RemotePath, frame: pd.DataFrame) -> None:
    frame = _parquet_safe(frame)
    _atomic(path, lambda tmp: frame.to_parquet(tmp, index=False))


def write_json_atomic(path: Path | RemotePath, payload: dict) -> None:
    text = json.dumps(payload, indent=2, default=str)

    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)

    _atomic(path, write)


def check_writable(folder: Path | RemotePath, min_free_mb: float = 1.0) -> None:
    """Before any work: a file can be written in `folder` (which must exist), and the disk
    has some room; ReportWriteError otherwise."""
    if isinstance(folder, RemotePath):  # object storage: write and remove a probe object
        probe = folder / f".raypo.probe.{os.getpid()}"
        try:
            probe.write_bytes(b"\0")
            probe.unlink(missing_ok=True)
        except OSError as e:
            raise ReportWriteError(f"{folder}: cannot write the report there: "
                                   f"{' '.join(str(e).split())}") from None
        return
    probe = None
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".raypo.probe.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(b"\0" * 4096)
            f.flush()
            os.fsync(f.fileno())
        free = shutil.disk_usage(folder).free / 2**20
    except OSError as e:
        raise ReportWriteError(f"{folder}: cannot write the report there: "
                               f"{e.strerror or e}", e.errno) from None
    finally:
        if probe is not None and os.path.exists(probe):
            os.unlink(probe)
    if free < min_free_mb:
        raise ReportWriteError(f"{folder}: only {free:.2f} MiB free; the report needs "
                               "room", errno.ENOSPC)


def read_table(path: Path | RemotePath) -> pd.DataFrame:
    """A report's Parquet table (empty if absent); ValueError naming the file if it is not
    a readable Parquet file."""
    if not path.is_file():
        return pd.DataFrame()
    try:
        if isinstance(path, RemotePath):
            import io

            return pd.read_parquet(io.BytesIO(path.read_bytes()))
        return pd.read_parquet(path)
    except Exception as e:  # pyarrow raises its own types for a damaged file
        raise ValueError(f"{path}: not a readable Parquet table ({type(e).__name__}: "
                         f"{' '.join(str(e).split())[:200]}); restore or remove it") from None


class ReportWriter:
    """trials.parquet (one row per trial, replaced when the same trial_id is written again)
    and steps.parquet (one row per trial per evaluation) under `directory`. Rows already on
    disk are kept: a resumed search appends to them. `table` names another pair of files
    (`confirm` -> confirm.parquet and confirm_steps.parquet)."""

    def __init__(self, directory: str | Path | RemotePath, search: str,
                 table: str = "trials"):
        self.directory = location(directory)
        self.search = search
        self.trials_file = f"{table}.parquet"
        self.steps_file = "steps.parquet" if table == "trials" else f"{table}_steps.parquet"
        self.trials = self._read(self.trials_file)
        self.steps = self._read(self.steps_file)

    def _read(self, name: str) -> pd.DataFrame:
        return read_table(self.directory / name)

    def write_trial(self, row: dict, steps: list[dict] = ()) -> None:
        """Write the row (and its steps); the tables in memory change only once on disk."""
        row = {"search": self.search, **row}
        trial_id = row["trial_id"]
        keep = self.trials[self.trials["trial_id"] != trial_id] if len(self.trials) else None
        trials = pd.concat([keep, pd.DataFrame([row])], ignore_index=True)
        if steps:
            rows = pd.DataFrame([{"search": self.search, "trial_id": trial_id, **s}
                                 for s in steps])
            old = self.steps[self.steps["trial_id"] != trial_id] if len(self.steps) else None
            steps_table = pd.concat([old, rows], ignore_index=True)
            # steps first: a row in trials.parquet promises its steps are on disk
            write_parquet_atomic(self.directory / self.steps_file, steps_table)
            self.steps = steps_table
        write_parquet_atomic(self.directory / self.trials_file, trials)
        self.trials = trials

    def update_trial(self, trial_id: str, **values) -> None:
        """Set columns of a row already written (a kept model that a better trial replaced
        gets `model_path` null)."""
        if not len(self.trials) or not (self.trials["trial_id"] == trial_id).any():
            return
        for column, value in values.items():
            if column not in self.trials:
                self.trials[column] = None
            self.trials[column] = self.trials[column].astype(object)
            self.trials.loc[self.trials["trial_id"] == trial_id, column] = value
        write_parquet_atomic(self.directory / self.trials_file, self.trials)

    def write_meta(self, payload: dict) -> None:
        write_json_atomic(self.directory / "search.json", payload)
