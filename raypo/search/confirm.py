"""The confirmation stage: do the search's best configurations beat the baseline beyond seed
noise?

A search's trials run once each, under one seed, and its best trial is partly the luckiest
one. The confirmation takes the best `top` distinct configurations of the search (the
finalists) and, for each, a baseline that differs only in the loss (by default DPO with the
finalist's beta, learning rate, schedule and every other setting), and trains every one of
them under the same fresh seeds. The runs go through Ray Tune like trials (concurrency,
resources, cluster, retries of dead workers); each run's row is written to confirm.parquet as it
ends, so an interrupted confirmation resumes by running only the runs that have no row.

Then, per finalist, raypo.reports.stats: the mean and 95% interval of its objective and its
baseline's, the paired difference by seed with its interval, the paired t-test, Holm's
correction across the finalists and the effect size; confirm_stats.parquet holds them and
search.json the verdict:
"<finalist> beats <baseline> by ... (95% CI ..., Holm p ..., N seeds)", or
"no finalist beats <baseline> beyond seed noise (N seeds)".

With `keep:` (default 1), the model of the recommended finalist's best seed stays under
`models/<run_id>/` (`best_finalist`: the verdict's winner, else the best mean), so the answer
ends with a model to load (`raypo export REPORT DIR`).
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from dataclasses import dataclass, field

import pandas as pd

from raypo.losses import LOSSES
from raypo.reports.schema import distinct_labels, metric_bounds, searched_values
from raypo.reports.stats import ALPHA, holm, paired, summary
from raypo.reports.writer import read_table, write_json_atomic, write_parquet_atomic
from raypo.search import tuning
from raypo.search.settings import Confirm
from raypo.search.space import SearchSpace, SpaceError
from raypo.storage import location
from raypo.train.config import TrainConfig

PLAN = "confirm_plan.json"
RUNS = "confirm.parquet"
STATS = "confirm_stats.parquet"


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def config_id(cfg: TrainConfig) -> str:
    """What identifies a configuration across seeds: a hash of every setting but the seed
    and the run's name, the loss's defaults filled in (`{name: dpo}` is `{name: dpo, beta:
    0.1}`)."""
    import inspect

    tree = cfg.model_dump(mode="json", exclude={"seed", "name"})
    defaults = {k: v for k, v in LOSSES.parameters(cfg.loss.name).items()
                if v is not inspect.Parameter.empty}
    tree["loss"] = {**json.loads(json.dumps(defaults, default=str)), **tree["loss"]}
    return hashlib.sha256(json.dumps(tree, sort_keys=True, default=str).encode()).hexdigest()[:10]


def baseline_config(cfg: TrainConfig, baseline: dict) -> TrainConfig:
    """`cfg` with its loss replaced by `baseline`, which keeps the finalist's beta unless it
    gives its own (and takes a beta at all)."""
    loss = dict(baseline)
    takes_beta = "beta" in LOSSES.parameters(loss["name"]) if loss["name"] in LOSSES else False
    beta = cfg.loss.params.get("beta", LOSSES.parameters(cfg.loss.name).get("beta"))
    if takes_beta and "beta" not in loss and isinstance(beta, int | float):
        loss["beta"] = beta
    tree = cfg.model_dump(mode="json")
    tree["loss"] = loss
    return TrainConfig.model_validate(tree)


@dataclass
class Plan:
    """The finalists, their baselines and every run (configuration x seed) to train."""

    seeds: list[int]
    metric: str
    mode: str
    baseline: str
    finalists: list[dict] = field(default_factory=list)
    runs: list[dict] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"seeds": self.seeds, "metric": self.metric, "mode": self.mode,
                "baseline": self.baseline, "finalists": self.finalists, "runs": self.runs}

    @classmethod
    def from_json(cls, data: dict) -> Plan:
        return cls(**data)

    def same_as(self, other: Plan) -> bool:
        key = lambda p: ([f["config_id"] for f in p.finalists], p.seeds)  # noqa: E731
        return key(self) == key(other)


def finalists(trials: pd.DataFrame, space: SearchSpace, top: int) -> list[tuple[dict, dict]]:
    """The best `top` distinct configurations among the finished trials, best first, as
    (trial row, searched values)."""
    objective = space.objectives[0]
    if trials.empty or "status" not in trials:
        return []
    ok = trials[(trials["status"] == "ok") & trials["objective"].notna()]
    ok = ok.sort_values("objective", ascending=objective.mode == "min", kind="stable")
    picked, seen = [], set()
    for _, row in ok.iterrows():
        if "searched" not in row or not isinstance(row["searched"], str):
            raise SpaceError(f"trial {row['trial_id']}: the report does not record its searched "
                             "values (a report from an older raypo); run the search again")
        values = searched_values(row)
        cid = config_id(space.config(values))
        if cid in seen:
            continue
        seen.add(cid)
        picked.append((row.to_dict(), values))
        if len(picked) == top:
            break
    return picked


def make_plan(trials: pd.DataFrame, space: SearchSpace, settings: Confirm) -> Plan:
    objective = space.objectives[0]
    search_seed = space.representative_config.seed
    seeds = settings.seed_list(search_seed)
    plan = Plan(seeds=seeds, metric=objective.metric, mode=objective.mode,
                baseline=str(settings.baseline["name"]))
    configs: dict[str, tuple[TrainConfig, str, dict]] = {}
    picked = finalists(trials, space, settings.top)
    labels = distinct_labels([row for row, _ in picked], [values for _, values in picked])
    for rank, ((row, values), label) in enumerate(zip(picked, labels, strict=True), 1):
        cfg = space.config(values)
        try:
            base = baseline_config(cfg, settings.baseline)
        except ValueError as e:
            raise SpaceError(f"{space.source}: confirm.baseline: {e}") from None
        fid, bid = config_id(cfg), config_id(base)
        configs[fid] = (cfg, "finalist", values)
        configs.setdefault(bid, (base, "baseline", {}))
        plan.finalists.append({"rank": rank, "trial_id": row["trial_id"], "config_id": fid,
                               "baseline_id": bid, "label": label,
                               "search_objective": float(row["objective"])})
    for cid, (cfg, role, values) in configs.items():
        for seed in seeds:
            run_cfg = cfg.model_copy(update={"seed": seed})
            plan.runs.append({"run_id": f"{cid}-s{seed}", "config_id": cid, "role": role,
                              "seed": seed, "searched": values,
                              "config": run_cfg.model_dump(mode="json")})
    return plan


def run_config(directory, run_id: str) -> TrainConfig | None:
    """The training config of confirmation run `run_id` (seed included), from the plan."""
    path = location(directory) / PLAN
    if not path.is_file():
        return None
    runs = Plan.from_json(json.loads(path.read_text())).runs
    return next((TrainConfig.model_validate(r["config"]) for r in runs
                 if r["run_id"] == run_id), None)


def _done_runs(directory) -> pd.DataFrame:
    return read_table(directory / RUNS)


def run_confirmation(space: SearchSpace, directory, settings: Confirm, *,
                     address: str | None = None, log=_log, interrupts=None) -> dict:
    """Plan (or re-read the plan), train the runs that have no row yet, compute the
    statistics; returns the confirmation's summary (also in search.json). Raises
    Interrupted after SIGINT/SIGTERM (search.json then says the confirmation is incomplete,
    and how to go on) and ReportWriteError when confirm.parquet cannot be written."""
    from raypo.search.interrupt import Interrupts

    if interrupts is None:
        with Interrupts() as own:
            return run_confirmation(space, directory, settings, address=address, log=log,
                                    interrupts=own)
    directory = location(directory)
    trials_path = directory / "trials.parquet"
    if not trials_path.is_file():
        raise SpaceError(f"{directory}: no trials.parquet: nothing to confirm")
    plan = make_plan(read_table(trials_path), space, settings)
    if not plan.finalists:
        raise SpaceError(f"{directory}: no finished trial to confirm")
    plan_path = directory / PLAN
    if plan_path.is_file():
        earlier = Plan.from_json(json.loads(plan_path.read_text()))
        if not earlier.same_as(plan) and not _done_runs(directory).empty:
            raise SpaceError(
                f"{plan_path}: a confirmation of other finalists or seeds is recorded here "
                f"(finalists {[f['config_id'] for f in earlier.finalists]}, seeds "
                f"{earlier.seeds}); remove {RUNS}, {STATS} and {PLAN} to start another")
    write_json_atomic(plan_path, plan.to_json())
    done = _done_runs(directory)
    finished = set(done["trial_id"]) if not done.empty else set()
    todo = [r for r in plan.runs if r["run_id"] not in finished]
    log(f"confirmation: {len(plan.finalists)} finalist(s) against {plan.baseline}, "
        f"{len(plan.seeds)} seeds: {len(plan.runs)} runs, {len(todo)} to train")
    if todo:
        _train(space, directory, plan, todo, address, log, interrupts)
    rows = _done_runs(directory)
    stats = confirmation_stats(plan, rows)
    write_parquet_atomic(directory / STATS, stats)
    missing = [r["run_id"] for r in plan.runs
               if rows.empty or r["run_id"] not in set(rows["trial_id"])]
    result = {"status": "incomplete" if missing else "finished", "seeds": plan.seeds,
              "top": len(plan.finalists), "baseline": plan.baseline, "metric": plan.metric,
              "runs": len(plan.runs), "missing_runs": len(missing),
              "verdict": verdict(stats, plan)}
    if not missing and space.settings.keep.count != 0:
        result.update(_keep_best_finalist(space, directory, plan, stats, log))
    if missing:
        result["resume"] = f"raypo confirm {directory}"
        log(f"confirmation incomplete: {len(missing)} of {len(plan.runs)} runs missing; "
            f"continue with: raypo confirm {directory}")
    if interrupts.signum is not None:
        import signal

        result["interrupted_by"] = signal.Signals(interrupts.signum).name
    _record_in_meta(directory, result)
    if interrupts.signum is not None:
        from raypo.search.interrupt import Interrupted

        raise Interrupted(interrupts.signum, f"confirmation interrupted by "
                          f"{result['interrupted_by']}: {len(missing)} of {len(plan.runs)} runs "
                          f"missing; continue with: raypo confirm {directory}")
    return result


def _train(space: SearchSpace, directory, plan: Plan, todo: list[dict], address, log,
           interrupts) -> None:
    from ray import tune

    from raypo.reports.writer import ReportWriteError
    from raypo.search.reach import StorageUnreachable, check_storage
    from raypo.search.recorder import ConfirmRecorder
    from raypo.search.trial import confirm_trial

    tuning.start_ray(space, address, directory.parent)
    check_storage(directory, local=address is None, log=log)
    keep = space.settings.keep.count
    recorder = ConfirmRecorder(str(directory), space.name, plan.metric, total=len(plan.runs),
                               mode=plan.mode, keep=keep)
    trainable = tune.with_parameters(confirm_trial, report_dir=str(directory),
                                     keep=keep != 0)
    # each attempt its own experiment: what a killed attempt finished is in confirm.parquet,
    # and the next attempt runs only the rest
    tuner = tuning.build_tuner(
        trainable, space, folder=directory / "confirm_tune",
        name=f"attempt-{time.strftime('%Y%m%dT%H%M%S')}", callbacks=[recorder],
        param_space={"run": tune.grid_search(todo)},
        tune_config=tune.TuneConfig(num_samples=1,
                                    max_concurrent_trials=space.settings.budget.concurrency,
                                    reuse_actors=True))
    with interrupts.tuning():  # Ctrl-C, SIGTERM: Tune stops the runs and returns
        tuner.fit()
    error = interrupts.failure
    if isinstance(error, StorageUnreachable):
        raise error
    if error is not None:  # the recorder could not write confirm.parquet
        raise ReportWriteError(f"{error}; the confirmation stopped; confirm.parquet holds the "
                               f"runs recorded before; free space, then continue with: "
                               f"raypo confirm {directory}", getattr(error, "errno", None))


def _by_seed(rows: pd.DataFrame, cid: str, seeds: list[int], metric: str) -> list[float]:
    if rows.empty:
        return [math.nan] * len(seeds)
    mine = rows[(rows["config_id"] == cid) & (rows["status"] == "ok")]
    values = dict(zip(mine["seed"].astype(int), pd.to_numeric(mine[metric], errors="coerce"),
                      strict=True)) if metric in mine else {}
    return [float(values.get(s, math.nan)) for s in seeds]


def confirmation_stats(plan: Plan, rows: pd.DataFrame) -> pd.DataFrame:
    """One row per finalist: its and its baseline's summary, the paired comparison, the Holm
    adjusted p-value and whether it beats the baseline (better in the objective's direction
    with Holm p < 0.05)."""
    out = []
    for f in plan.finalists:
        a = _by_seed(rows, f["config_id"], plan.seeds, plan.metric)
        b = _by_seed(rows, f["baseline_id"], plan.seeds, plan.metric)
        bounds = metric_bounds(plan.metric)  # a share's interval stays within [0, 1]
        mine, base = summary(a, bounds=bounds), summary(b, bounds=bounds)
        diff = paired(a, b, bounds=bounds)
        out.append({
            "rank": f["rank"], "trial_id": f["trial_id"], "label": f["label"],
            "config_id": f["config_id"], "baseline_id": f["baseline_id"],
            "baseline": plan.baseline, "metric": plan.metric, "mode": plan.mode,
            "search_objective": f["search_objective"], "seeds": len(plan.seeds),
            **{f"{k}": v for k, v in mine.items()},
            **{f"baseline_{k}": v for k, v in base.items()},
            **diff, "same_as_baseline": f["config_id"] == f["baseline_id"]})
    stats = pd.DataFrame(out)
    if stats.empty:
        return stats
    stats["p_holm"] = holm(stats["p"].tolist())
    sign = 1.0 if plan.mode == "max" else -1.0
    stats["beats_baseline"] = (sign * stats["diff_mean"] > 0) & (stats["p_holm"] < ALPHA)
    return stats


def best_finalist(stats: pd.DataFrame, mode: str) -> pd.Series | None:
    """The finalist the confirmation recommends: of those that beat the baseline, the one
    with the largest paired difference; when none does, the best mean objective (None when
    no finalist has one)."""
    if stats.empty:
        return None
    sign = 1.0 if mode == "max" else -1.0
    winners = stats[stats["beats_baseline"]]
    key = sign * (winners["diff_mean"] if not winners.empty else stats["mean"])
    key = pd.to_numeric(key, errors="coerce").dropna()
    return None if key.empty else stats.loc[key.idxmax()]


def _keep_best_finalist(space: SearchSpace, directory, plan: Plan, stats: pd.DataFrame,
                        log) -> dict:
    """The confirmation's model: the best finalist's best seed stays in models/ (with
    `keep: all`, every finalist's every seed); the other finalists' models go, and
    confirm.parquet's `model_path` says which is kept."""
    from raypo.reports.writer import ReportWriter
    from raypo.search.keep import finalist_keeper, forget_missing

    best = best_finalist(stats, plan.mode)
    writer = ReportWriter(directory, search=space.name, table="confirm")
    kept: dict[str, float] = {}
    for f in plan.finalists:
        keeper = finalist_keeper(directory, f["config_id"], space.settings.keep.count,
                                 plan.mode, plan.metric)
        if best is not None and f["config_id"] == best["config_id"]:
            kept, best_keeper = keeper.kept(), keeper
        elif space.settings.keep.count is not None:
            for run_id in keeper.drop_all():
                writer.update_trial(run_id, model_path=None)
    forget_missing(writer)
    if best is None or not kept:
        return {"model_path": None}
    sign = 1.0 if plan.mode == "max" else -1.0
    run_id = max(kept, key=lambda k: sign * kept[k])
    path = best_keeper.relative(run_id)
    log(f"confirmation: the model of {best['label']}'s best seed ({run_id}, {plan.metric} "
        f"{kept[run_id]:.4f}) is kept: {directory / path}")
    return {"model_path": path, "model_run": run_id}


def verdict(stats: pd.DataFrame, plan: Plan) -> str:
    """The one line `raypo select` prints (module docstring)."""
    n = len(plan.seeds)
    if stats.empty:
        return f"no finalist to compare with {plan.baseline}"
    winners = stats[stats["beats_baseline"]]
    if winners.empty:
        seeds = int(stats["n"].min()) if stats["n"].notna().all() else n
        return f"no finalist beats {plan.baseline} beyond seed noise ({seeds} seeds)"
    best = best_finalist(stats, plan.mode)
    direction = "higher" if plan.mode == "max" else "lower"
    return (f"{best['label']} beats {plan.baseline} by {abs(best['diff_mean']):.4g} "
            f"{plan.metric} ({direction}; 95% CI {best['diff_ci_low']:+.4g} to "
            f"{best['diff_ci_high']:+.4g}, Holm p {best['p_holm']:.3g}, {int(best['n'])} seeds)")


def _record_in_meta(directory, result: dict) -> None:
    path = directory / "search.json"
    meta = json.loads(path.read_text()) if path.is_file() else {}
    meta["confirmation"] = result
    write_json_atomic(path, meta)
