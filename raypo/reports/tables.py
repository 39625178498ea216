"""Reading a report back: `load(path).trials`, `.steps`, `.selection` as DataFrames."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd


@dataclass
class Report:
    path: Path
    trials: pd.DataFrame
    steps: pd.DataFrame
    selection: pd.DataFrame
    meta: dict

    def best(self, metric: str = "objective", mode: str = "max") -> pd.Series:
        """The best finished trial by `metric`."""
        ok = self.trials[self.trials["status"] == "ok"]
        if ok.empty:
            raise ValueError(f"{self.path}: no finished trial")
        return ok.loc[ok[metric].idxmax() if mode == "max" else ok[metric].idxmin()]


def load(path: str | Path) -> Report:
    path = Path(path)
    if not (path / "trials.parquet").is_file():
        raise FileNotFoundError(f"{path}: no trials.parquet (is this a raypo report folder?)")

    def read(name: str) -> pd.DataFrame:
        p = path / name
        return pd.read_parquet(p) if p.is_file() else pd.DataFrame()

    meta_path = path / "search.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    return Report(path, read("trials.parquet"), read("steps.parquet"),
                  read("selection.parquet"), meta)
