"""Reading a report back: `load(path).trials`, `.steps`, `.selection`, `.confirm` as
DataFrames, and every query asked of them (`best`, `ranked`, `at_common_step`, `pairs`,
`selected`, `pivot`, `pareto`, `confirmation`, ...): `raypo select`, the HTML page and the
importances ask these, and compute none of their own. Column meanings: raypo.reports.schema.

Trials the scheduler stopped early (pruned) ran fewer steps than the finished ones, so their
last values and the finished trials' final values are not comparable. `at_common_step` puts
them side by side at one step: the highest evaluation step that every trial with a value
reached (from steps.parquet, one row per trial per evaluation); `pairs`, `pivot`, `raypo
select` and the page's heatmap use it."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from raypo.reports.writer import read_table
from raypo.storage import location

# the trials compared at a common step: finished ones and the ones the scheduler stopped (a
# failed trial's values may be a diverging run's; an interrupted one runs again on --resume)
COMPARED = ("ok", "pruned")


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
    def objectives(self) -> list[dict]:
        """The search's objectives (search.json), each {"metric": ..., "mode": "max" | "min"}
        (a mode other than min is max); one "objective" to maximise when it names none."""
        given = self.meta.get("objectives") or [{"metric": "objective", "mode": "max"}]
        return [{**o, "metric": o.get("metric", "objective"),
                 "mode": "min" if str(o.get("mode", "max")).lower() == "min" else "max"}
                for o in given]

    @property
    def objective(self) -> dict:
        """The first objective of the search: {"metric": ..., "mode": "max" | "min"}."""
        return self.objectives[0]

    @property
    def ok(self) -> pd.DataFrame:
        """The trials that finished (status ok) with an objective."""
        t = self.trials
        if t.empty or "status" not in t:
            return t
        return t[(t["status"] == "ok") & t["objective"].notna()]

    def finished(self) -> pd.DataFrame:
        """The finished trials with a numeric objective (as floats), in the order they
        started (`number`): what a chart over trials and the importances use."""
        t = self.trials
        if t.empty or "status" not in t or "objective" not in t:
            return t.iloc[0:0]
        ok = self.ok
        ok = ok[pd.to_numeric(ok["objective"], errors="coerce").notna()].copy()
        ok["objective"] = ok["objective"].astype(float)
        return by_number(ok)

    def ranked(self, at_common_step: bool = False) -> pd.DataFrame:
        """Trials best first in the search's direction, ties in the order they started: the
        finished ones by their final objective (`finished`), or with `at_common_step` every
        trial of `at_common_step()` (pruned ones too) by its `value` there (its `.attrs`)."""
        ascending = self.objective["mode"] == "min"
        if at_common_step:
            common = self.at_common_step()
            return _described_as(common.sort_values("value", ascending=ascending,
                                                    kind="stable"), common)
        return self.finished().sort_values("objective", ascending=ascending, kind="stable")

    def best(self, metric: str = "objective", mode: str | None = None) -> pd.Series:
        """The best finished trial by `metric` (in the search's direction by default)."""
        ok = self.ok
        if ok.empty:
            raise ValueError(f"{self.path}: no finished trial")
        mode = mode or self.objective["mode"]
        return ok.loc[ok[metric].idxmax() if mode == "max" else ok[metric].idxmin()]

    def hyperparameter_columns(self) -> list[str]:
        """The trials table's hyperparameter columns: the searched parameters named in
        search.json (each is its own column, raypo.reports.schema), else every parameter
        column of the schema; never the seed, which is noise to average over, not a
        parameter."""
        from raypo.reports.schema import NOT_PARAMETERS, is_parameter  # imports the losses

        trials = self.trials
        named = [p for p in self.meta.get("params") or [] if p in trials.columns
                 and p not in NOT_PARAMETERS]
        if named:
            return named
        return [c for c in trials.columns if is_parameter(c)]

    def varied_parameters(self) -> list[str]:
        """The hyperparameter columns that take more than one value (missing counts as a
        value) over the finished trials."""
        ok = self.finished()
        return [c for c in self.hyperparameter_columns() if c in ok
                and ok[c].astype(object).where(ok[c].notna(), None).map(repr).nunique() > 1]

    def measured(self, metrics: list[str]) -> pd.DataFrame:
        """The trials that finished (status ok) with a number for every one of `metrics`
        (whatever their objective), those columns as floats."""
        t = self.trials
        if t.empty or "status" not in t:
            return t.iloc[0:0]
        done = t[t["status"] == "ok"]
        values = {m: _numbers(done, m) for m in metrics}
        has = pd.concat(values, axis=1).notna().all(axis=1) if metrics else done["status"].notna()
        return done.assign(**values)[has]

    def pareto(self, objectives: list[dict] | None = None) -> pd.DataFrame:
        """The finished trials no other finished trial beats on every objective (a Pareto
        search's answer; with one objective, the best trial), in the trials table's order.
        `objectives`: [{"metric": ..., "mode": ...}], the search's by default (the page's
        frontier asks true_reward max, kl min); trials without a number for one are left
        out (`measured`)."""
        objectives = objectives or self.objectives
        done = self.measured([o["metric"] for o in objectives])
        # as maximisation: a trial is dominated by one at least as good on all, better on one
        signs = [-1.0 if str(o.get("mode", "max")).lower() == "min" else 1.0
                 for o in objectives]
        values = done[[o["metric"] for o in objectives]].to_numpy(dtype=float) * signs
        return done[undominated(values)]

    def at_common_step(self, metric: str | None = None) -> pd.DataFrame:
        """One row per trial that finished or was pruned, with `metric`'s `value` at the
        common step and the `step` it is from (replacing trial columns of those names), in
        the trials table's order; its `status` tells the pruned ones apart.

        The common step is the highest evaluation step that every such trial with a value
        reached (the earliest a pruned trial stopped at); each trial's value is its last
        evaluation at or before it (steps.parquet; a trial without rows there counts with its
        own row's value, at the step its row says it reached). Without a pruned trial, each
        trial's final value (every trial ran its whole budget, even where budgets differ).
        A trial with no value at all (failed before its first evaluation) is left out.
        Without any per-evaluation value of `metric` (a report from before steps.parquet),
        the finished trials' final values, pruned ones left out.

        `metric`: a metric (the first objective's by default; "objective" means it too).
        `.attrs` says what the values are: `metric`, `basis` ("common": at `step`, "final":
        no trial was pruned, "no_steps": the fallback), `step` (the common step, or None),
        `pruned` (pruned trials included) and `left_out` (pruned trials left out by the
        fallback); `common_step_note` puts it in words."""
        first = self.objective["metric"]
        metric = first if metric in (None, "objective") else metric
        final = ("objective" if metric == first else
                 metric if metric in self.trials else f"final_{metric}")
        t = self.trials
        if t.empty or "status" not in t or "trial_id" not in t:
            return _described(t.assign(value=pd.Series(dtype=float),
                                       step=pd.Series(dtype=float)),
                              metric, "no_steps", None, 0, 0)
        rows = t[t["status"].isin(COMPARED)]
        own = rows[["trial_id"]].assign(
            value=_numbers(rows, final),
            step=_numbers(rows, "step").where(rows["status"] == "pruned",
                                              _numbers(rows, "steps")))
        own = own[np.isfinite(own["value"])]
        points = _evaluations(self.steps, metric, rows["trial_id"])
        pruned = rows["status"] == "pruned"
        if points.empty:  # no per-evaluation values: the finished trials' final values
            ok = own[own["trial_id"].isin(rows.loc[~pruned, "trial_id"])]
            out = _joined(rows, ok.assign(step=np.nan))
            left_out = int(own["trial_id"].isin(rows.loc[pruned, "trial_id"]).sum())
            return _described(out, metric, "no_steps", None, 0, left_out)
        # a trial without evaluations in steps.parquet: its own row's value at its step
        extra = own[~own["trial_id"].isin(points["trial_id"]) & own["step"].notna()]
        points = pd.concat([points, extra], ignore_index=True)
        last = points.groupby("trial_id")["step"].max()
        stopped = set(rows.loc[pruned, "trial_id"]) & set(last.index)
        common = float(last.min()) if stopped else None
        chosen = points if common is None else points[points["step"] <= common]
        chosen = chosen.loc[chosen.groupby("trial_id")["step"].idxmax()]
        out = _joined(rows, chosen)
        step = None if common is None else (int(common) if common.is_integer() else common)
        return _described(out, metric, "common" if stopped else "final", step,
                          int((out["status"] == "pruned").sum()), 0)

    def pairs(self, metric: str = "objective") -> pd.DataFrame:
        """One row per (kernel, divergence) the kernel trials used: `metric`'s mean, spread
        (std) and best over the trials at the common step (`at_common_step`: the finished
        trials and the pruned ones, compared at the highest step all of them reached), the
        trial count and how many of them were `pruned`, and the selection rule's predicted
        rank; best first. A kernel trial with no divergence penalty counts as divergence
        "none"; hmk_dpo's learned mixture as kernel "hmk". `.attrs` is at_common_step's."""
        common = self.at_common_step(metric)
        columns = ["kernel", "divergence", metric, "std", "best", "trials", "pruned",
                   "predicted_rank"]
        t = common
        if t.empty or "kernel" not in t:
            return _described_as(pd.DataFrame(columns=columns), common)
        t = t[t["kernel"].notna()].assign(
            divergence=lambda d: d.get("divergence", pd.Series(index=d.index, dtype=object))
            .fillna("none"), pruned=lambda d: d["status"] == "pruned")
        ascending = self.objective["mode"] == "min"
        grouped = t.groupby(["kernel", "divergence"])
        values = grouped["value"]
        table = pd.DataFrame({metric: values.mean(), "std": values.std(ddof=1),
                              "best": values.min() if ascending else values.max(),
                              "trials": values.size(),
                              "pruned": grouped["pruned"].sum().astype(int)}).reset_index()
        ranks = self._selection_ranks()
        table["predicted_rank"] = [ranks.get((k, d)) for k, d in
                                   zip(table["kernel"], table["divergence"], strict=True)]
        table["predicted_rank"] = table["predicted_rank"].astype(float)
        table = table.sort_values([metric, "trials"], ascending=[ascending, False],
                                  ignore_index=True)
        return _described_as(table[columns], common)

    def selected(self, top: int = 1) -> pd.DataFrame:
        """The chosen kernel-divergence pair(s), what `raypo select` shows: the best `top`
        rows of `pairs()`; `.attrs` is pairs()'s and `tried`, how many pairs were tried."""
        pairs = self.pairs()
        chosen = pairs.head(top)
        chosen.attrs = {**pairs.attrs, "tried": len(pairs)}
        return chosen

    def predicted_ranks(self) -> dict[tuple[str, str], float]:
        """The selection rule's predicted rank (1 = tried first) of each (kernel, divergence)
        pair, a missing divergence "none": every pair selection.parquet ranks, tried or not;
        without it, the rank the first of a pair's kernel trials at the common step carries
        (NaN where none does; {} when the trials have no predicted_rank). `pairs()` gives
        selection.parquet's only."""
        ranks = self._selection_ranks()
        if ranks:
            return ranks
        t = self.at_common_step()
        if "kernel" not in t or "predicted_rank" not in t:
            return {}
        t = t[t["kernel"].notna()]
        cells = pd.DataFrame({
            "kernel": t["kernel"].map(_label),
            "divergence": t.get("divergence", pd.Series(None, index=t.index, dtype=object))
            .map(_label), "rank": _numbers(t, "predicted_rank")})
        return dict(cells.groupby(["kernel", "divergence"])["rank"].first().items())

    def _selection_ranks(self) -> dict[tuple[str, str], float]:
        s = self.selection
        if s.empty or not {"kernel", "divergence", "predicted_rank"} <= set(s.columns):
            return {}
        return {(_label(k), _label(d)): r for k, d, r in
                zip(s["kernel"], s["divergence"], s["predicted_rank"], strict=True)}

    def pivot(self, metric: str = "objective", aggfunc: str = "mean") -> pd.DataFrame:
        """Kernel x divergence table of `metric` over the kernel trials at the common step
        (`at_common_step`)."""
        t = self.at_common_step(metric)
        if t.empty or "kernel" not in t:
            return pd.DataFrame()
        t = t[t["kernel"].notna()].assign(divergence=lambda d: d["divergence"].fillna("none"))
        return t.pivot_table(index="kernel", columns="divergence", values="value",
                             aggfunc=aggfunc)


def _numbers(frame: pd.DataFrame, column: str) -> pd.Series:
    """`column` as floats (NaN where missing or not a number; all NaN without the column)."""
    if column not in frame:
        return pd.Series(np.nan, index=frame.index, dtype=float)
    return pd.to_numeric(frame[column], errors="coerce").astype(float)


def _label(value) -> str:
    """A kernel or divergence name as a cell label: "none" where missing."""
    return "none" if value is None or (isinstance(value, float) and np.isnan(value)) \
        else str(value)


def by_number(frame: pd.DataFrame) -> pd.DataFrame:
    """`frame`'s trials in the order they started (`number`), when every row has one."""
    if "number" in frame and frame["number"].notna().all():
        return frame.sort_values("number", kind="stable")
    return frame


def undominated(values) -> np.ndarray:
    """Which rows of `values` (one column per objective, larger is better) no other row
    beats: at least as good on every column and better on one. The one Pareto test:
    Report.pareto and pareto_front use it."""
    values = np.asarray(values, dtype=float)
    keep = np.ones(len(values), dtype=bool)
    for i, row in enumerate(values):
        keep[i] = not ((values >= row).all(axis=1) & (values > row).any(axis=1)).any()
    return keep


def pareto_front(kl, reward) -> np.ndarray:
    """Indices of the points no other point beats on both (lower KL, higher true reward),
    ordered by KL (the page's frontier, as Report.pareto finds it for trials)."""
    kl, reward = np.asarray(kl, dtype=float), np.asarray(reward, dtype=float)
    order = np.lexsort((-reward, kl))
    return order[undominated(np.column_stack([-kl, reward]))[order]].astype(int)


def _evaluations(steps: pd.DataFrame, metric: str, trial_ids) -> pd.DataFrame:
    """(trial_id, step, value) of each evaluation of `metric` with a finite value, of the
    trials `trial_ids`; a step written twice (a retried trial) counted once, the last."""
    if steps.empty or not {"trial_id", "step", metric} <= set(steps.columns):
        return pd.DataFrame({"trial_id": pd.Series(dtype=object),
                             "step": pd.Series(dtype=float), "value": pd.Series(dtype=float)})
    rows = steps[steps["trial_id"].isin(trial_ids)]
    points = rows[["trial_id"]].assign(step=_numbers(rows, "step"),
                                       value=_numbers(rows, metric))
    points = points[np.isfinite(points["value"]) & points["step"].notna()]
    return points.drop_duplicates(["trial_id", "step"], keep="last")


def _joined(rows: pd.DataFrame, values: pd.DataFrame) -> pd.DataFrame:
    """`rows` (in order) that have a value, with `value` and `step` from `values`."""
    by_trial = values.set_index("trial_id")
    out = rows.drop(columns=["value", "step"], errors="ignore")
    out = out[out["trial_id"].isin(by_trial.index)].copy()
    out["value"] = out["trial_id"].map(by_trial["value"]).astype(float)
    out["step"] = out["trial_id"].map(by_trial["step"]).astype(float)
    return out


def _described(frame: pd.DataFrame, metric: str, basis: str, step, pruned: int,
               left_out: int) -> pd.DataFrame:
    frame.attrs = {"metric": metric, "basis": basis, "step": step, "pruned": pruned,
                   "left_out": left_out}
    return frame


def _described_as(frame: pd.DataFrame, common: pd.DataFrame) -> pd.DataFrame:
    frame.attrs = dict(common.attrs)
    return frame


def common_step_note(frame: pd.DataFrame, marked: str | None = None) -> str:
    """What the values of `Report.at_common_step` (or of `pairs`, which carries its
    `.attrs`) are, in words: "true_reward at step 75, the highest step every trial reached
    (...); 4 pruned trials, marked p". `marked`: how the pruned trials are shown, after the
    count ("marked p")."""
    a = frame.attrs
    metric = a.get("metric", "the objective")
    pruned, left_out = a.get("pruned", 0), a.get("left_out", 0)

    def trials(n: int) -> str:
        return f"{n} pruned trial{'s' * (n != 1)}"

    if a.get("basis") == "common":
        how = f", {marked}" if marked else ""
        return (f"{metric} at step {a['step']}, the highest step every trial reached (the "
                f"finished ones and those the scheduler stopped); {trials(pruned)}{how}")
    if a.get("basis") == "final":
        return f"{metric}: each trial's final value (no trial was pruned)"
    if left_out:
        return (f"{metric}: the finished trials' final values; this report has no "
                f"per-evaluation values (steps.parquet), so its {trials(left_out)}, stopped "
                f"at earlier steps, {'is' if left_out == 1 else 'are'} left out")
    return (f"{metric}: the finished trials' final values (this report has no per-evaluation "
            "values, steps.parquet)")


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
