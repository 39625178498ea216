"""One Tune trial: the training engine run on the trial's config, reporting at each evaluation.

It runs inside a Ray Tune trial process. Every evaluation is reported (the scheduler may stop
the trial there); the last report carries the trial's whole row and its step history, which
the driver writes to the report (raypo.search.recorder). A run that fails (an exception, a NaN
loss) is reported as a failed row rather than raised, so the search goes on and the failure is
not retried as if a worker had died.
"""

from __future__ import annotations

import json
import math
import sys

from ray import tune

from raypo.reports.schema import trial_row
from raypo.search.space import SearchSpace
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


def search_trial(config: dict, space: SearchSpace) -> None:
    """The Tune function trainable (given `space` by tune.with_parameters)."""
    trial_id = tune.get_context().get_trial_id()
    cfg = space.config(config)
    last_step = cfg.steps

    def on_eval(step: int, metrics: dict) -> None:
        if step < last_step:  # the last evaluation goes out with the final report
            tune.report({**scalar_metrics(metrics), "step": step,
                         **objective_values(metrics, space)})

    def log(message: str) -> None:
        print(message, file=sys.stderr)

    result, history = run_trial(cfg, trial_id, log=log, on_eval=on_eval)
    row = trial_row(cfg, result, searched=config)
    final = history[-1] if history else {}
    payload = json.dumps({"row": row, "steps": history}, default=str)
    tune.report({**scalar_metrics(final), **scalar_metrics(row), "step": last_step,
                 **objective_values(row if row["status"] == "ok" else {}, space),
                 FINAL: payload})


def confirm_trial(config: dict) -> None:
    """The Tune function trainable of one confirmation run: `config["run"]` is a run of the
    plan (raypo.search.confirm), with its whole training config; one final report."""
    spec = config["run"]
    cfg = TrainConfig.model_validate(spec["config"])

    def log(message: str) -> None:
        print(message, file=sys.stderr)

    result, history = run_trial(cfg, spec["run_id"], log=log)
    row = trial_row(cfg, result, searched=spec["searched"])
    row.update({k: spec[k] for k in ("config_id", "role")})
    payload = json.dumps({"row": row, "steps": history}, default=str)
    tune.report({**scalar_metrics(row), "step": cfg.steps, FINAL: payload})
