"""The Tune callbacks of raypo.search.tracking: Ray's own MLflow, W&B and TensorBoard
loggers, each made to add to a trial's existing run when the trial starts again (a resumed
search, a retried trial) and to step by the trial's training step. Imported only when a
search tracks (importing Ray's integrations imports MLflow and W&B)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from ray.air.integrations.mlflow import MLflowLoggerCallback
from ray.air.integrations.wandb import WandbLoggerCallback
from ray.tune.logger import TBXLoggerCallback

TRIAL_TAG = "raypo.trial_id"
SEARCH_TAG = "raypo.search"
STATUS_TAG = "raypo.status"
# what Tune adds to every result that is not a measurement of the trial
SKIPPED = {"config", "done", "trial_id", "date", "hostname", "node_ip", "pid",
           "experiment_tag", "checkpoint_dir_name", "should_checkpoint"}


def run_id(search: str, trial_id: str) -> str:
    """A trial's W&B run id: the same on every start of the trial (a resume, a retry)."""
    return f"{search}-{trial_id}"


def _numbers(result: dict) -> dict[str, float]:
    """The numeric values of a Tune result, nested ones flattened (`a/b`)."""
    out = {}
    for key, value in result.items():
        if key in SKIPPED:
            continue
        if isinstance(value, dict):
            out.update({f"{key}/{k}": v for k, v in _numbers(value).items()})
        elif isinstance(value, int | float) and not isinstance(value, bool):
            out[key] = float(value)
    return out


def final_row(trial, failed: bool) -> dict:
    """The trial's row as the report will have it: its final report's, else only a status:
    pruned (the scheduler stopped it), failed or interrupted."""
    from raypo.search import interrupt
    from raypo.search.trial import FINAL

    last = trial.last_result or {}
    if FINAL in last:
        try:
            row = json.loads(last[FINAL])["row"]
            return {**row, "status": row.get("status") or "ok"}
        except (ValueError, KeyError, TypeError):
            pass
    if interrupt.requested():
        return {"status": "interrupted"}
    return {"status": "failed" if failed else "pruned"}


def _step(result: dict) -> int:
    """The training step of a result (raypo's trials report it); Tune's iteration else."""
    step = result.get("step")
    if isinstance(step, int | float) and not isinstance(step, bool) and math.isfinite(step):
        return int(step)
    return int(result.get("training_iteration") or 0)


class MLflowCallback(MLflowLoggerCallback):
    """Ray's MLflowLoggerCallback, one run per trial found again by its `raypo.trial_id` tag
    (a resumed or retried trial adds to its run), metrics at the trial's training step,
    sent in batches, and the run's end status the row's (`raypo.status` tag)."""

    raypo_tracker = True

    def __init__(self, search: str, tracking_uri: str, experiment: str, tags: dict,
                 artifact_location: str | None = None):
        super().__init__(tracking_uri, experiment_name=experiment, tags=tags)
        self.search = search
        self.artifact_location = artifact_location
        self._client = None

    def __getstate__(self):
        return {**self.__dict__, "_client": None, "_trial_runs": {}}

    def setup(self, *args, **kwargs) -> None:
        from mlflow.tracking import MlflowClient

        self._client = MlflowClient(tracking_uri=self.tracking_uri)
        found = self._client.get_experiment_by_name(self.experiment_name)
        self.experiment_id = (found.experiment_id if found is not None else
                              self._client.create_experiment(
                                  self.experiment_name,
                                  artifact_location=self.artifact_location))
        self.tags = dict(self.tags or {})
        self._trial_runs = {}

    def _existing_run(self, trial_id: str):
        runs = self._client.search_runs(
            [self.experiment_id], max_results=1,
            filter_string=(f"tags.`{TRIAL_TAG}` = '{trial_id}' and "
                           f"tags.`{SEARCH_TAG}` = '{self.search}'"))
        return runs[0] if runs else None

    def log_trial_start(self, trial) -> None:
        from mlflow.entities import Param

        if trial in self._trial_runs:
            run_id = self._trial_runs[trial]
            logged = set(self._client.get_run(run_id).data.params)
        else:
            run = self._existing_run(trial.trial_id)
            if run is None:
                tags = {**self.tags, "trial_name": str(trial), TRIAL_TAG: trial.trial_id,
                        SEARCH_TAG: self.search}
                run = self._client.create_run(self.experiment_id, tags=tags,
                                              run_name=str(trial))
                logged = set()
            else:  # a restored trial: its run goes on
                self._client.update_run(run.info.run_id, status="RUNNING")
                logged = set(run.data.params)
            run_id = self._trial_runs[trial] = run.info.run_id
        params = [Param(k, str(v)[:6000]) for k, v in _flat(trial.config).items()
                  if k not in logged]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params a batch
            self._client.log_batch(run_id, params=params[i:i + 100])

    def log_trial_result(self, iteration: int, trial, result: dict) -> None:
        from mlflow.entities import Metric

        if trial not in self._trial_runs:
            self.log_trial_start(trial)
        now, step = int(time.time() * 1000), _step(result)
        metrics = [Metric(k, v, now, step) for k, v in _numbers(result).items()]
        for i in range(0, len(metrics), 1000):  # at most 1000 metrics a batch
            self._client.log_batch(self._trial_runs[trial], metrics=metrics[i:i + 1000])

    def log_trial_end(self, trial, failed: bool = False) -> None:
        from mlflow.entities import RunTag

        if trial not in self._trial_runs:
            return
        run_id = self._trial_runs.pop(trial)
        row = final_row(trial, failed)
        status = row["status"]
        # the row's numbers are the final report's metrics; its words go in as tags
        tags = [RunTag(f"raypo.row.{k}", v[:5000]) for k, v in row.items()
                if isinstance(v, str) and v and k != "status"]
        self._client.log_batch(run_id, tags=[RunTag(STATUS_TAG, status), *tags[:99]])
        self._client.set_terminated(run_id, {"failed": "FAILED", "interrupted": "KILLED"}
                                    .get(status, "FINISHED"))

    def on_experiment_end(self, trials, **info) -> None:
        # trials still running when the search stopped (Ctrl-C): a resume reopens their runs
        for run_id in self._trial_runs.values():
            self._client.set_tag(run_id, STATUS_TAG, "interrupted")
            self._client.set_terminated(run_id, "KILLED")
        self._trial_runs = {}


class WandbCallback(WandbLoggerCallback):
    """Ray's WandbLoggerCallback, each trial's run with the id `<search>-<trial_id>` and
    `resume="allow"`: a resumed or retried trial adds to its run."""

    raypo_tracker = True

    def __init__(self, search: str, **kwargs):
        super().__init__(**kwargs)
        self.search = search

    def setup(self, *args, **kwargs) -> None:
        if self.kwargs.get("mode") in ("offline", "disabled"):
            return  # no API key to look for (Ray looks only at WANDB_MODE for this)
        super().setup(*args, **kwargs)

    def _start_logging_actor(self, trial, exclude_results, **wandb_init_kwargs):
        wandb_init_kwargs.update(id=run_id(self.search, trial.trial_id), resume="allow")
        wandb_init_kwargs.pop("reinit", None)  # one run per logging actor
        super()._start_logging_actor(trial, exclude_results, **wandb_init_kwargs)

    def on_experiment_end(self, trials, **info) -> None:
        # Ray waits (up to upload_timeout, 30 minutes) for every logging actor to finish, and
        # the actors of trials still running when the search stopped (Ctrl-C) finish only
        # when told: their runs end here, and a resume goes on in them
        for trial in list(self._trial_queues):
            self._signal_logging_actor_stop(trial)
        super().on_experiment_end(trials, **info)


class TensorBoardCallback(TBXLoggerCallback):
    """Ray's TBXLoggerCallback, each trial's events under `<logdir>/<trial name>/` (one
    logdir for `tensorboard --logdir`; None: Tune's trial folder), at the trial's training
    step."""

    raypo_tracker = True

    def __init__(self, logdir: str | None = None):
        super().__init__()
        self.logdir = logdir

    def log_trial_start(self, trial) -> None:
        if self.logdir is None:
            return super().log_trial_start(trial)
        if trial in self._trial_writer:
            self._trial_writer[trial].close()
        folder = Path(self.logdir) / str(trial)
        folder.mkdir(parents=True, exist_ok=True)
        self._trial_writer[trial] = self._summary_writer_cls(str(folder), flush_secs=30)
        self._trial_result[trial] = {}

    def log_trial_result(self, iteration: int, trial, result: dict) -> None:
        # Tune's logger steps by timesteps_total when a result has it: the training step
        super().log_trial_result(iteration, trial, {**result, "timesteps_total": _step(result)})


def _flat(config: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}/"))
        else:
            out[f"{prefix}{key}"] = value
    return out
