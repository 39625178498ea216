"""One Tune trial: the training engine run on the trial's config, reporting at each evaluation.

It runs inside a Ray Tune trial process. Every evaluation is reported (the scheduler may stop
the trial there); the last report carries the trial's whole row and its step history, which
the driver writes to the report (raypo.search.recorder). A run that fails (an exception, a NaN
loss) is reported as a failed row rather than raised, so the search goes on and the failure is
not retried as if a worker had died.

A one-worker trial checkpoints through Tune: every `checkpoint_every` steps (default: at every
evaluation) the loop writes a checkpoint to a local folder, and the next report carries it to
the search's storage (each evaluation is reported after the next optimizer step, once the
checkpoint written after the evaluation exists), uploaded from the trial's own node. A trial
whose process or node dies is retried by Tune (FailureConfig), on any node, and resumes from
it: same steps, same data order, optimizer, learning-rate schedule, the loss's adaptive state
and RNG (raypo.train.loop); its row says where (`resumed_from_step`). A trial with several
workers checkpoints inside its Ray Train run, kept under the report's Tune folder, which Ray
Train restores from. Confirmation runs do the same.

With `keep:` the finished trial writes its model to the report's staging folder (on object
storage: uploads it there), and the driver's recorder decides whether it is kept
(raypo.search.keep).
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import tempfile
from pathlib import Path

from ray import tune

from raypo.reports.schema import trial_row
from raypo.search.keep import staged_save
from raypo.search.reach import check_marker
from raypo.search.space import SearchSpace
from raypo.storage import location
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
    result, history = checkpointed_run(cfg, trial_id, report_dir, "tune", space,
                                       save=_model_save(space, report_dir, trial_id))
    row = trial_row(cfg, result, searched=config)
    final = history[-1] if history else {}
    payload = json.dumps({"row": row, "steps": history}, default=str)
    tune.report({**scalar_metrics(final), **scalar_metrics(row), "step": cfg.steps,
                 **objective_values(row if row["status"] == "ok" else {}, space),
                 FINAL: payload})


def checkpointed_run(cfg: TrainConfig, run_id: str, report_dir: str | None, experiment: str,
                     space: SearchSpace | None, save=None) -> tuple[dict, list[dict]]:
    """Train `cfg` inside a Tune trial, checkpointing through Tune to the report's storage
    and resuming from the trial's last checkpoint when Tune retries it (on this node or
    another); (result, evaluations). A multi-worker run keeps its Ray Train run under the
    report's `experiment` folder instead. Before anything, the report folder must be
    reachable from this node (raypo.search.reach)."""
    if report_dir is not None:
        check_marker(report_dir, run_id)
    if cfg.num_workers == 1 and not cfg.checkpoint_every:
        cfg = cfg.model_copy(update={"checkpoint_every": cfg.eval_every})

    def log(message: str) -> None:
        print(message, file=sys.stderr)

    one = cfg.num_workers == 1
    train_storage = (str(location(report_dir) / experiment / "ray_train")
                     if report_dir is not None and not one else None)
    local = Path(tempfile.mkdtemp(prefix=f"raypo-{run_id}-"))  # checkpoints, before Tune's
    try:
        resumed, before = _resume(local, log) if one else (None, [])
        if resumed is not None:
            log(f"{run_id}: resumed from step {resumed} (its last checkpoint)")
        reports = _Reports(space, local if one else None, cfg.steps)
        result, history = run_trial(cfg, run_id, log=log, on_eval=reports.on_eval,
                                    progress=reports.flush, save=save,
                                    checkpoint_dir=local if one else None,
                                    train_storage=train_storage)
    finally:
        shutil.rmtree(local, ignore_errors=True)
    history = [*(h for h in before if h["step"] <= resumed), *history] if before else history
    result["resumed_from_step"] = resumed
    return result, history


def _model_save(space: SearchSpace, report_dir: str | None, trial_id: str):
    if report_dir is None or space.settings.keep.count == 0:
        return None
    return staged_save(report_dir, trial_id,
                       {"report": report_dir, "search": space.name, "trial_id": trial_id})


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

    def __init__(self, space: SearchSpace | None, local: Path | None, last_step: int):
        self.space, self.local, self.last_step = space, local, last_step
        self.pending: dict | None = None
        self.sent = None  # mtime of the checkpoint last sent

    def on_eval(self, step: int, metrics: dict) -> None:
        self.flush()
        if step < self.last_step:
            objectives = objective_values(metrics, self.space) if self.space else {}
            self.pending = {**scalar_metrics(metrics), "step": step, **objectives}

    def flush(self, *progress) -> None:
        if self.pending is None:
            return
        metrics, self.pending = self.pending, None
        # to the search's storage, from this node (a node that cannot reach it never got
        # here: raypo.search.reach)
        tune.report(metrics, checkpoint=self._new_checkpoint())

    def _new_checkpoint(self):
        path = self.local / checkpoint.NAME if self.local else None
        if path is None or not path.is_file() or path.stat().st_mtime_ns == self.sent:
            return None
        self.sent = path.stat().st_mtime_ns
        return tune.Checkpoint.from_directory(str(self.local))


def confirm_trial(config: dict, report_dir: str, keep: bool = False) -> None:
    """The Tune function trainable of one confirmation run: `config["run"]` is a run of the
    plan (raypo.search.confirm), with its whole training config. It checkpoints and resumes
    as a search's trial does; its last report carries its row. With `keep` (the space keeps
    models), a finalist's run stages its model in the report for the driver's keeper."""
    spec = config["run"]
    cfg = TrainConfig.model_validate(spec["config"])
    save = None
    if keep and spec["role"] == "finalist":
        save = staged_save(report_dir, spec["run_id"],
                           {"report": report_dir, "confirmation_run": spec["run_id"],
                            "config_id": spec["config_id"], "seed": spec["seed"]})
    result, history = checkpointed_run(cfg, spec["run_id"], report_dir, "confirm_tune", None,
                                       save=save)
    row = trial_row(cfg, result, searched=spec["searched"])
    row.update({k: spec[k] for k in ("config_id", "role")})
    payload = json.dumps({"row": row, "steps": history}, default=str)
    tune.report({**scalar_metrics(row), "step": cfg.steps, FINAL: payload})
