"""The driver-side Tune callback that writes the report as trials end, and shows progress.

One writer (the driver) owns trials.parquet and steps.parquet, so trials running at once never
race on a file; each table is rewritten atomically when a trial ends. A trial that ends without
its final report was stopped by the scheduler (pruned), died (failed) or was running when a
signal stopped the search (interrupted): its row is made from its config and its last report.
A write that fails (a full disk) stops the search like Ctrl-C (raypo.search.interrupt). A
trial that ends twice (a resumed search re-runs a trial that was running when the driver died)
replaces its own row: every trial is in the table once.

As a trial ends, the recorder also decides whether its model is kept (`keep:`, through
raypo.search.keep.ModelKeeper: `model_path` in the row, null for the models pushed out) and
empties the trial's Tune checkpoints, which only a retry of a running trial needs (an
interrupted trial keeps them: a resume goes on from them).

The line printed per trial ends, while trials remain, with `[5/12 done, ETA 3m10s]`
(`eta_seconds`: from the wall times of the trials that ended and the budget).
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

from ray import tune

from raypo.losses import LOSSES
from raypo.reports import ReportWriter
from raypo.reports.schema import describe, trial_row
from raypo.reports.writer import ReportWriteError
from raypo.search import interrupt
from raypo.search.keep import ModelKeeper, finalist_keeper, remove_empty_staging
from raypo.search.reach import StorageUnreachable
from raypo.search.space import SearchSpace
from raypo.search.trial import FINAL

TUNE_KEYS = {"done", "training_iteration", "trial_id", "date", "timestamp", "time_this_iter_s",
             "time_total_s", "pid", "hostname", "node_ip", "config", "time_since_restore",
             "iterations_since_restore", "checkpoint_dir_name", "experiment_tag",
             "should_checkpoint", FINAL}


def trial_number(trial) -> int:
    """The trial's creation index (Tune's experiment tag starts with it: `3_lr=...`)."""
    head = str(getattr(trial, "experiment_tag", "")).split("_", 1)[0]
    return int(head) if head.isdigit() else -1


class ReportRecorder(tune.Callback):
    """Writes one row per trial (and its evaluations) under `directory` as trials end.

    `ranks` maps (kernel, divergence) to the selection rule's predicted rank. Kept small
    and picklable: Tune saves it with the experiment, and a resumed search reads the tables
    back from disk in `setup`, never from the pickle.
    """

    def __init__(self, directory: str, search: str, space: SearchSpace, ranks: dict,
                 total: int, echo=True):
        self.directory = directory
        self.search = search
        self.space = space
        self.ranks = dict(ranks)
        self.total = total
        self.echo = echo
        self._writer = None
        self._steps: dict[str, list[dict]] = {}
        self.write_error: Exception | None = None  # the report could not be written
        self._walls: list[float] = []  # the wall times of the trials that ended in this run
        self._starts: dict[str, float] = {}  # when the running trials started
        self._started = time.monotonic()  # this run's start (Tune's, from `setup`)

    @property
    def writer(self) -> ReportWriter:
        if self._writer is None:
            self._writer = ReportWriter(self.directory, search=self.search)
        return self._writer

    @property
    def keeper(self) -> ModelKeeper:
        objective = self.space.objectives[0]
        return ModelKeeper(self.directory, best=self.space.settings.keep.count,
                           mode=objective.mode, metric=objective.metric)

    def setup(self, **info) -> None:
        self._writer = None  # re-read the tables: after a resume they are newer than us
        self._steps = {}
        self._walls, self._starts, self._started = [], {}, time.monotonic()

    def __getstate__(self):
        return {**self.__dict__, "_writer": None, "_steps": {}, "write_error": None,
                "_walls": [], "_starts": {}}

    # -- Tune's hooks (driver process) ------------------------------------------------------
    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        if FINAL not in result:
            self._steps.setdefault(trial.trial_id, []).append(
                {k: v for k, v in result.items() if k not in TUNE_KEYS and k != "objective"})

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._timed(trial)
        row = self.record(trial.trial_id, trial.config, trial.last_result or {},
                          number=trial_number(trial))
        self._ended(trial, row)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        error = _error_text(trial)
        if stop_if_unreachable(error):
            return  # no row: the search stops, and the trial runs again after the fix
        self._timed(trial)
        row = self.record(trial.trial_id, trial.config, trial.last_result or {},
                          error=error, number=trial_number(trial),
                          status="interrupted" if interrupt.requested() else None)
        self._ended(trial, row)

    def on_trial_recover(self, iteration, trials, trial, **info) -> None:
        stop_if_unreachable(_error_text(trial))

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self._starts[trial.trial_id] = time.monotonic()

    def _timed(self, trial) -> None:
        """The wall time of a trial that ended (from its start as this driver saw it; else
        Tune's `time_total_s`), for the ETA; not of one a signal stopped."""
        started = self._starts.pop(trial.trial_id, None)
        seconds = (time.monotonic() - started if started is not None
                   else (trial.last_result or {}).get("time_total_s"))
        if (not interrupt.requested() and isinstance(seconds, int | float)
                and math.isfinite(seconds) and seconds > 0):
            self._walls.append(float(seconds))

    def _ended(self, trial, row: dict) -> None:
        if row.get("status") != "interrupted" and self.write_error is None:
            remove_checkpoints(trial)

    def on_experiment_end(self, trials, **info) -> None:
        remove_empty_staging(self.directory)

    # -- rows ---------------------------------------------------------------------------------
    def record(self, trial_id: str, config: dict, last: dict, error: str | None = None,
               number: int = -1, status: str | None = None) -> dict:
        """`status` replaces pruned/failed for a trial without its final report
        (interrupted: a signal stopped the search while it ran)."""
        if FINAL in last and error is None:
            payload = json.loads(last[FINAL])
            row, steps = payload["row"], payload["steps"]
        else:
            metrics = {k: v for k, v in last.items() if k not in TUNE_KEYS}
            row = trial_row(self.space.config(config),
                            {"trial_id": trial_id, **metrics,
                             "status": status or ("failed" if error else "pruned"),
                             "error": error}, searched=config)
            # a retried trial reports its steps since the checkpoint again: the last of each
            steps = list({s.get("step"): s for s in self._steps.get(trial_id, [])}.values())
        row = self._complete(row, config, number)
        if self.write_error is not None:  # stopping: a resume runs the trial again
            return row
        try:
            write_keeping_model(self.writer, self.keeper, row, steps)
        except ReportWriteError as e:  # a full disk: stop as after Ctrl-C, tables whole
            self.write_error = e
            interrupt.stop_tuning(e)
            return row
        self._steps.pop(trial_id, None)
        if self.echo:
            self._show(row)
        return row

    def _complete(self, row: dict, config: dict, number: int) -> dict:
        metric = self.space.objectives[0].metric
        value = row.get(metric)
        row["objective"] = (float(value) if row.get("status") != "failed"
                            and isinstance(value, int | float) and math.isfinite(value)
                            else None)
        row["number"] = number
        row["predicted_rank"] = self.predicted_rank(row)
        row.setdefault("error", None)
        return row

    def predicted_rank(self, row: dict) -> float | None:
        """The selection rule's rank of the row's (kernel, divergence), for a loss whose pair
        the rule ranks."""
        name = row.get("loss")
        if name not in LOSSES or not LOSSES.get_class(name).selection_params:
            return math.nan
        return float(self.ranks.get((row.get("kernel"), row.get("divergence")), math.nan))

    def _show(self, row: dict) -> None:
        trials = self.writer.trials
        done = len(trials)
        objective = self.space.objectives[0]
        ok = trials[trials["status"] == "ok"].dropna(subset=["objective"])
        best = ""
        if len(ok):
            i = ok["objective"].idxmax() if objective.mode == "max" else ok["objective"].idxmin()
            best = (f" | best {objective.metric} {ok.loc[i, 'objective']:.4f} "
                    f"({ok.loc[i, 'trial_id']}: {describe(ok.loc[i])})")
        value = "" if row["objective"] is None else f" {objective.metric} {row['objective']:.4f}"
        error = f" ({row['error'].splitlines()[0][:80]})" if row.get("error") else ""
        kept = f" [model kept: {row['model_path']}]" if row.get("model_path") else ""
        print(f"[{done}/{self.total}] {row['trial_id']} {row['status']}{value}{error}{kept}"
              f"{best}{self._eta(done)}",
              file=sys.stderr, flush=True)

    def _eta(self, done: int) -> str:
        """` [5/12 done, ETA 3m10s]`, from the wall times of the trials that ended in this
        run and the budget; empty when all are done or none has a wall time yet."""
        budget = self.space.settings.budget
        left = (None if budget.time_limit_s is None
                else budget.time_limit_s - (time.monotonic() - self._started))
        seconds = eta_seconds(self.total - done, self._walls, budget.concurrency, left)
        if seconds is None or done >= self.total:
            return ""
        capped = " (time limit)" if left is not None and seconds >= left else ""
        return f" [{done}/{self.total} done, ETA {format_duration(seconds)}{capped}]"


def eta_seconds(remaining: int, walls: list[float], concurrency: int,
                time_left: float | None = None) -> float | None:
    """How long the `remaining` trials should take: remaining / concurrency x the mean wall
    time of the trials that ended (`walls`), at most the `time_left` of the search's time
    limit (None: no limit). None when no trial has ended yet (nothing to go by)."""
    if remaining <= 0:
        return 0.0
    if not walls:
        return None
    eta = remaining / max(concurrency, 1) * (sum(walls) / len(walls))
    return eta if time_left is None else max(0.0, min(eta, time_left))


def format_duration(seconds: float) -> str:
    """`45s`, `3m10s`, `2h05m`."""
    total = int(round(seconds))
    if total < 60:
        return f"{total}s"
    minutes, secs = divmod(total, 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def stop_if_unreachable(error: str) -> bool:
    """A trial that failed because its node cannot reach the report's storage (raypo.search
    .reach) stops the whole search with that message: without the storage no trial keeps a
    checkpoint or a model. True when it did."""
    marker = f"{StorageUnreachable.__name__}: "
    if marker not in error:
        return False
    interrupt.stop_tuning(StorageUnreachable(error.split(marker, 1)[1]))
    return True


def _error_text(trial) -> str:
    """The last line of the trial's traceback (Tune keeps it in the trial's error file)."""
    path = getattr(trial, "error_file", None)
    try:
        text = Path(path).read_text().strip() if path else ""
    except OSError:
        text = ""
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "the trial's process failed"


class ConfirmRecorder(tune.Callback):
    """Writes confirm.parquet, one row per confirmation run, as runs end (the driver is the
    one writer). A run that dies is recorded failed with its config's columns; a run written
    again replaces its own row."""

    def __init__(self, directory: str, search: str, metric: str, total: int, echo=True,
                 mode: str = "max", keep: int | None = 0):
        self.directory = directory
        self.search = search
        self.metric = metric
        self.total = total
        self.echo = echo
        self.mode = mode
        self.keep = keep  # the space's keep.best: 0 none, None all of a finalist's seeds
        self._writer = None
        self.write_error: ReportWriteError | None = None

    @property
    def writer(self) -> ReportWriter:
        if self._writer is None:
            self._writer = ReportWriter(self.directory, search=self.search,
                                        table="confirm")
        return self._writer

    def __getstate__(self):
        return {**self.__dict__, "_writer": None}

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self.record(trial.config["run"], trial.last_result or {})

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        error = _error_text(trial)
        if not stop_if_unreachable(error):
            self.record(trial.config["run"], trial.last_result or {}, error=error)

    def on_trial_recover(self, iteration, trials, trial, **info) -> None:
        stop_if_unreachable(_error_text(trial))

    def record(self, spec: dict, last: dict, error: str | None = None) -> dict | None:
        """The run's row, written; None for a run a signal stopped (no row: `raypo confirm`
        runs it again) or one the report could not take."""
        from raypo.train.config import TrainConfig

        if FINAL not in last and interrupt.requested():
            return None
        if FINAL in last and error is None:
            payload = json.loads(last[FINAL])
            row, steps = payload["row"], payload["steps"]
        else:
            row = trial_row(TrainConfig.model_validate(spec["config"]),
                            {"trial_id": spec["run_id"], "status": "failed",
                             "error": error or "the run ended without its result",
                             "objective": None}, searched=spec["searched"])
            row.update({k: spec[k] for k in ("config_id", "role")})
            steps = []
        value = row.get(self.metric)
        row["objective"] = (float(value) if row.get("status") == "ok"
                            and isinstance(value, int | float) and math.isfinite(value)
                            else None)
        if self.write_error is not None:
            return None
        keeper = (finalist_keeper(self.directory, row["config_id"], self.keep, self.mode,
                                  self.metric)
                  if self.keep != 0 and row.get("role") == "finalist" else None)
        try:
            write_keeping_model(self.writer, keeper, row, steps)
        except ReportWriteError as e:  # a full disk: stop as after Ctrl-C, the table whole
            self.write_error = e
            interrupt.stop_tuning(e)
            return None
        if self.echo:
            shown = "" if row["objective"] is None else f" {self.metric} {row['objective']:.4f}"
            kept = f" [model kept: {row['model_path']}]" if row.get("model_path") else ""
            print(f"[confirm {len(self.writer.trials)}/{self.total}] {row['trial_id']} "
                  f"({row['role']}, seed {row['seed']}) {row['status']}{shown}{kept}",
                  file=sys.stderr, flush=True)
        return row

    def on_experiment_end(self, trials, **info) -> None:
        remove_empty_staging(self.directory)


def write_keeping_model(writer: ReportWriter, keeper: ModelKeeper | None, row: dict,
                        steps: list[dict]) -> None:
    """Write the row with its `model_path`: the keeper (None: the row keeps no model) keeps
    or drops what the run staged, and the models it pushes out get `model_path` null."""
    row["model_path"], evicted = None, []
    if keeper is not None:
        ok = row.get("status") == "ok"
        try:
            changes = keeper.offer(row["trial_id"], row["objective"] if ok else None)
        except OSError as e:  # a model that cannot be moved: the row still goes in
            print(f"{row['trial_id']}: its model could not be kept: {e}", file=sys.stderr)
            changes = {row["trial_id"]: None}
        row["model_path"] = changes.pop(row["trial_id"])
        evicted = list(changes)
    writer.write_trial(row, steps)
    for other in evicted:
        writer.update_trial(other, model_path=None)


def remove_checkpoints(trial) -> None:
    """The Tune checkpoints of a trial that ended (only a retry of a running trial reads
    them), so that a long search does not fill its storage; on any storage Tune writes to.

    The folders stay, empty: Tune saves its experiment state every few seconds, and a driver
    killed before the next save leaves the trial listed as running; `--resume` then restores
    it, which needs its checkpoint folder to exist, and an empty one makes the trial start
    again from step 0 (raypo.search.trial), as it did before trials checkpointed."""
    import pyarrow.fs

    storage = getattr(trial, "storage", None)
    if storage is None:
        return
    fs, root = storage.storage_filesystem, storage.trial_fs_path
    try:
        entries = fs.get_file_info(pyarrow.fs.FileSelector(root, allow_not_found=True))
        for entry in entries:
            if entry.type == pyarrow.fs.FileType.Directory and entry.base_name.startswith(
                    "checkpoint_"):
                fs.delete_dir_contents(entry.path)
    except OSError as error:  # the row is written; a checkpoint left behind only costs disk
        print(f"{trial.trial_id}: could not empty its checkpoints under {root}: {error}",
              file=sys.stderr)
