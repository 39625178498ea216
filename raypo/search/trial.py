"""One Tune trial: the training engine run on the trial's config, reporting at each evaluation.

It runs inside a Ray Tune trial process. Every evaluation is reported (the scheduler may stop
the trial there); the last report carries the trial's whole row and its step history, which
the driver writes to the report (raypo.search.recorder). A run that fails (an exception, a NaN
loss) is reported as a failed row rather than raised, so the search goes on and the failure is
not retried as if a worker had died.

A one-worker trial checkpoints through Tune: every `checkpoint_every` steps (default: at every
evaluation) the loop writes a checkpoint to a local folder, and the next report carries it to
the search's storage (each evaluation is reported after the next optimizer step, once the
checkpoint written after the evaluation exists). A trial whose process dies is retried by Tune
(FailureConfig) and resumes from it: same steps, same data order, optimizer, learning-rate
schedule, the loss's adaptive state and RNG (raypo.train.loop); its row says where
(`resumed_from_step`). A trial with several workers checkpoints inside its Ray Train run.

With `keep:` the finished trial writes its model to the report's staging folder, and the
driver's recorder decides whether it is kept (raypo.search.keep).
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import tempfile
from pathlib import Path

from ray import tune

from raypo.models.save import ModelSave
from raypo.reports.schema import trial_row
from raypo.search.keep import staging_path
from raypo.search.space import SearchSpace
from raypo.train import checkpoint
from raypo.train.config import TrainConfig
from raypo.train.run import run_trial

FINAL = "raypo_final"  # marks the last report of a trial: it holds the row and the history


def scalar_metrics(metrics: dict) -> dict:
    """The numeric metrics of a row (what Tune and the schedulers see)."""
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, int | float) and not isinstance(v, bool)}


def objective_values(metrics: dict, space: SearchSpace) -> dict:
    """`objective` (the first objective's metric: what schedulers compare), and every
    objective's metric present even when this evaluation lacks it (NaN), as Tune and
    Optuna read them from every report."""
    objectives = space.objectives
    out = {o.metric: _number(metrics.get(o.metric)) for o in objectives}
    out["objective"] = out[objectives[0].metric]
    return out


def _number(value) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return math.nan
    return value


def search_trial(config: dict, space: SearchSpace, report_dir: str | None = None) -> None:
    """The Tune function trainable (given `space` and the report folder by
    tune.with_parameters)."""
    trial_id = tune.get_context().get_trial_id()
    cfg = space.config(config)
    if cfg.num_workers == 1 and not cfg.checkpoint_every:
        cfg = cfg.model_copy(update={"checkpoint_every": cfg.eval_every})

    def log(message: str) -> None:
        print(message, file=sys.stderr)

    local = Path(tempfile.mkdtemp(prefix=f"raypo-{trial_id}-"))  # checkpoints, before Tune's
    try:
        resumed, before = _resume(local, log) if cfg.num_workers == 1 else (None, [])
        if resumed is not None:
            log(f"{trial_id}: resumed from step {resumed} (its last checkpoint)")
        reports = _Reports(space, local if cfg.num_workers == 1 else None, cfg.steps)
        result, history = run_trial(cfg, trial_id, log=log, on_eval=reports.on_eval,
                                    progress=reports.flush,
                                    save=_model_save(space, report_dir, trial_id),
                                    checkpoint_dir=local if cfg.num_workers == 1 else None)
    finally:
        shutil.rmtree(local, ignore_errors=True)
    history = [*(h for h in before if h["step"] <= resumed), *history] if before else history
    result["resumed_from_step"] = resumed
    row = trial_row(cfg, result, searched=config)
    final = history[-1] if history else {}
    payload = json.dumps({"row": row, "steps": history}, default=str)
    tune.report({**scalar_metrics(final), **scalar_metrics(row), "step": cfg.steps,
                 **objective_values(row if row["status"] == "ok" else {}, space),
                 FINAL: payload})


def _model_save(space: SearchSpace, report_dir: str | None, trial_id: str):
    if report_dir is None or space.settings.keep.count == 0:
        return None
    return ModelSave(staging_path(report_dir, trial_id),
                     meta={"report": report_dir, "search": space.name, "trial_id": trial_id})


def _resume(local: Path, log) -> tuple[int | None, list[dict]]:
    """The trial's last checkpoint (a retry after its process died), copied into `local`
    where the loop resumes from it: (its step, the evaluations before it), or (None, [])."""
    found = tune.get_checkpoint()
    if found is None:
        return None, []
    try:
        found.to_directory(str(local))
        saved = checkpoint.load(local)  # weights_only: tensors and numbers only
    except (OSError, RuntimeError) as error:  # unreadable: start over
        log(f"checkpoint {found.path} cannot be read ({error}); starting from step 0")
        saved = None
    if saved is None:  # also an emptied one (the trial had ended, raypo.search.recorder)
        shutil.rmtree(local, ignore_errors=True)
        local.mkdir()
        return None, []
    return int(saved["state"]["step"]), list(saved["state"]["history"])


class _Reports:
    """What the trial tells Tune: each evaluation but the last (that one goes out with the
    final row), with the newest checkpoint if one was written since the last report.

    The loop writes a checkpoint right after evaluating, so an evaluation is held until the
    next call (the next optimizer step's `progress`, or the next evaluation) and sent with the
    checkpoint of its own step."""

    def __init__(self, space: SearchSpace, local: Path | None, last_step: int):
        self.space, self.local, self.last_step = space, local, last_step
        self.pending: dict | None = None
        self.sent = None  # mtime of the checkpoint last sent

    def on_eval(self, step: int, metrics: dict) -> None:
        self.flush()
        if step < self.last_step:
            self.pending = {**scalar_metrics(metrics), "step": step,
                            **objective_values(metrics, self.space)}

    def flush(self, *progress) -> None:
        if self.pending is None:
            return
        metrics, self.pending = self.pending, None
        found = self._new_checkpoint()
        try:
            tune.report(metrics, checkpoint=found)
        except RuntimeError as error:
            if found is None or "storage" not in str(error):
                raise
            # a trial on a node that does not see the search's storage (a local report folder
            # on a multi-node cluster): it goes on without checkpoints rather than failing
            print(f"checkpoints off for this trial: {str(error).splitlines()[0]} (put the "
                  "report folder on shared storage, see the README)", file=sys.stderr)
            self.local = None
            tune.report(metrics)

    def _new_checkpoint(self):
        path = self.local / checkpoint.NAME if self.local else None
        if path is None or not path.is_file() or path.stat().st_mtime_ns == self.sent:
            return None
        self.sent = path.stat().st_mtime_ns
        return tune.Checkpoint.from_directory(str(self.local))


def confirm_trial(config: dict, report_dir: str | None = None) -> None:
    """The Tune function trainable of one confirmation run: `config["run"]` is a run of the
    plan (raypo.search.confirm), with its whole training config; one final report. Given
    `report_dir` (the space keeps models), a finalist's run stages its model there for the
    driver's keeper."""
    spec = config["run"]
    cfg = TrainConfig.model_validate(spec["config"])

    def log(message: str) -> None:
        print(message, file=sys.stderr)

    save = None
    if report_dir is not None and spec["role"] == "finalist":
        save = ModelSave(staging_path(report_dir, spec["run_id"]),
                         meta={"report": report_dir, "confirmation_run": spec["run_id"],
                               "config_id": spec["config_id"], "seed": spec["seed"]})
    result, history = run_trial(cfg, spec["run_id"], log=log, save=save)
    row = trial_row(cfg, result, searched=spec["searched"])
    row.update({k: spec[k] for k in ("config_id", "role")})
    payload = json.dumps({"row": row, "steps": history}, default=str)
    tune.report({**scalar_metrics(row), "step": cfg.steps, FINAL: payload})
