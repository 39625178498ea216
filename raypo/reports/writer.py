"""Atomic Parquet writers: a table is rewritten whole to a temporary file in the same folder
and renamed over the old one, so a reader (or a killed writer) never sees half a table.

Files get the permissions the user's umask gives a new file (0644 with umask 022, 0664 with
002), not `tempfile`'s private 0600: a report folder is shared (a team's NFS mount, a web
server)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from raypo.files import atomic_write


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


def write_parquet_atomic(path: Path, frame: pd.DataFrame) -> None:
    frame = _parquet_safe(frame)
    atomic_write(path, lambda f: frame.to_parquet(f, index=False), mode="wb")


def write_json_atomic(path: Path, payload: dict) -> None:
    atomic_write(path, lambda f: json.dump(payload, f, indent=2, default=str))


class ReportWriter:
    """trials.parquet (one row per trial, replaced when the same trial_id is written again)
    and steps.parquet (one row per trial per evaluation) under `directory`. Rows already on
    disk are kept: a resumed search appends to them. `table` names another pair of files
    (`confirm` -> confirm.parquet and confirm_steps.parquet)."""

    def __init__(self, directory: str | Path, search: str, table: str = "trials"):
        self.directory = Path(directory)
        self.search = search
        self.trials_file = f"{table}.parquet"
        self.steps_file = "steps.parquet" if table == "trials" else f"{table}_steps.parquet"
        self.trials = self._read(self.trials_file)
        self.steps = self._read(self.steps_file)

    def _read(self, name: str) -> pd.DataFrame:
        path = self.directory / name
        return pd.read_parquet(path) if path.is_file() else pd.DataFrame()

    def write_trial(self, row: dict, steps: list[dict] = ()) -> None:
        row = {"search": self.search, **row}
        trial_id = row["trial_id"]
        keep = self.trials[self.trials["trial_id"] != trial_id] if len(self.trials) else None
        self.trials = pd.concat([keep, pd.DataFrame([row])], ignore_index=True)
        write_parquet_atomic(self.directory / self.trials_file, self.trials)
        if steps:
            rows = pd.DataFrame([{"search": self.search, "trial_id": trial_id, **s}
                                 for s in steps])
            old = self.steps[self.steps["trial_id"] != trial_id] if len(self.steps) else None
            self.steps = pd.concat([old, rows], ignore_index=True)
            write_parquet_atomic(self.directory / self.steps_file, self.steps)

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
        write_parquet_atomic(self.directory / "trials.parquet", self.trials)

    def write_meta(self, payload: dict) -> None:
        write_json_atomic(self.directory / "search.json", payload)
