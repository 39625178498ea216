"""Reading a report back: `load(path).trials`, `.steps`, `.selection`, `.confirm` as
DataFrames, and the queries a person asks of them (`best`, `pairs`, `pivot`, `pareto`,
`confirmation`). Column meanings: raypo.reports.schema."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from raypo.reports.writer import read_table
from raypo.storage import location


@dataclass
class Report:
    path: Path
    trials: pd.DataFrame
    steps: pd.DataFrame
    selection: pd.DataFrame
    meta: dict
    confirm: pd.DataFrame = field(default_factory=pd.DataFrame)  # one row per confirmation run
    confirm_stats: pd.DataFrame = field(default_factory=pd.DataFrame)

    @property
    def status(self) -> str:
        """finished, incomplete or running (search.json), or unknown."""
        return str(self.meta.get("status", "unknown"))

    def confirmation(self) -> pd.DataFrame:
        """One row per finalist of the confirmation stage (empty without one): `rank`, `label`,
        its objective's `n`, `mean`, `std`, `ci_low`, `ci_high`, the same with `baseline_`,
        the paired difference `diff_mean`, `diff_ci_low`, `diff_ci_high`, `t`, `p`, `p_holm`,
        `effect_size` (d_z) and `beats_baseline` (raypo.search.confirm)."""
        return self.confirm_stats.copy()

    @property
    def verdict(self) -> str | None:
        """The confirmation's verdict line, or None without a confirmation."""
        return (self.meta.get("confirmation") or {}).get("verdict")

    @property
    def objective(self) -> dict:
        """The first objective of the search: {"metric": ..., "mode": "max" | "min"}."""
        objectives = self.meta.get("objectives") or [{"metric": "objective", "mode": "max"}]
        return objectives[0]

    @property
    def ok(self) -> pd.DataFrame:
        """The trials that finished (status ok) with an objective."""
        t = self.trials
        if t.empty or "status" not in t:
            return t
        return t[(t["status"] == "ok") & t["objective"].notna()]

    def best(self, metric: str = "objective", mode: str | None = None) -> pd.Series:
        """The best finished trial by `metric` (in the search's direction by default)."""
        ok = self.ok
        if ok.empty:
            raise ValueError(f"{self.path}: no finished trial")
        mode = mode or self.objective["mode"]
        return ok.loc[ok[metric].idxmax() if mode == "max" else ok[metric].idxmin()]

    def pareto(self) -> pd.DataFrame:
        """The finished trials no other finished trial beats on every objective (a Pareto
        search's answer; with one objective, the best trial)."""
        objectives = self.meta.get("objectives") or [self.objective]
        ok = self.ok.dropna(subset=[o["metric"] for o in objectives])
        # as maximisation: a trial is dominated by one at least as good on all, better on one
        values = ok[[o["metric"] for o in objectives]].to_numpy(dtype=float) * [
            1.0 if o["mode"] == "max" else -1.0 for o in objectives]
        keep = [not any((other >= row).all() and (other > row).any() for other in values)
                for row in values]
        return ok[keep]

    def pairs(self, metric: str = "objective") -> pd.DataFrame:
        """One row per (kernel, divergence) the kernel trials used: the objective's mean,
        spread (std) and best over the finished trials, the trial count, and the selection
        rule's predicted rank; best first. A kernel trial with no divergence penalty counts
        as divergence "none"; hmk_dpo's learned mixture as kernel "hmk"."""
        t = self.ok
        if t.empty or "kernel" not in t:
            return pd.DataFrame(columns=["kernel", "divergence", metric, "std", "best",
                                         "trials", "predicted_rank"])
        t = t[t["kernel"].notna()].assign(
            divergence=lambda d: d.get("divergence", pd.Series(index=d.index, dtype=object))
            .fillna("none"))
        ascending = self.objective["mode"] == "min"
        grouped = t.groupby(["kernel", "divergence"])[metric]
        table = pd.DataFrame({metric: grouped.mean(), "std": grouped.std(ddof=1),
                              "best": grouped.min() if ascending else grouped.max(),
                              "trials": grouped.size()}).reset_index()
        ranks = self._ranks()
        table["predicted_rank"] = [ranks.get((k, d)) for k, d in
                                   zip(table["kernel"], table["divergence"], strict=True)]
        table["predicted_rank"] = table["predicted_rank"].astype(float)
        return table.sort_values([metric, "trials"], ascending=[ascending, False],
                                 ignore_index=True)

    def selected(self, top: int = 1) -> pd.DataFrame:
        """The chosen kernel-divergence pair(s): the best `top` rows of `pairs()`."""
        return self.pairs().head(top)

    def pivot(self, metric: str = "objective", aggfunc: str = "mean") -> pd.DataFrame:
        """Kernel x divergence table of `metric` over the finished kernel trials."""
        t = self.ok
        if t.empty or "kernel" not in t:
            return pd.DataFrame()
        t = t[t["kernel"].notna()].assign(divergence=lambda d: d["divergence"].fillna("none"))
        return t.pivot_table(index="kernel", columns="divergence", values=metric,
                             aggfunc=aggfunc)

    def _ranks(self) -> dict:
        s = self.selection
        if s.empty or "predicted_rank" not in s:
            return {}
        return {(k, d): r for k, d, r in zip(s["kernel"], s["divergence"], s["predicted_rank"],
                                             strict=True)}


def read_meta(path) -> dict:
    """search.json ({} if absent); ValueError naming the file if it is not a JSON object."""
    if not path.is_file():
        return {}
    try:
        meta = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"{path}: not valid JSON ({' '.join(str(e).split())}); restore or "
                         "remove it") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(meta).__name__}")
    return meta


def load(path) -> Report:
    """The report at `path`: a local folder, or `s3://...` / `gs://...` (read from the
    bucket, with the credentials of the environment)."""
    path = location(path)
    if not (path / "trials.parquet").is_file():
        raise FileNotFoundError(f"{path}: no trials.parquet (is this a raypo report folder?)")

    def read(name: str) -> pd.DataFrame:
        return read_table(path / name)  # ValueError naming a damaged file

    meta = read_meta(path / "search.json")
    return Report(path, read("trials.parquet"), read("steps.parquet"),
                  read("selection.parquet"), meta, confirm=read("confirm.parquet"),
                  confirm_stats=read("confirm_stats.parquet"))
