"""A search's own settings, the sections of a search space beside its training config:
`objective` (or `objectives`, two for a Pareto search), `budget`, `scheduler`, `resources`,
`sampler`, `selection`, `confirm`, `keep`, `tracking`. Every other key of a space is the
training config (raypo.train.config), whose values may be searched (raypo.search.grammar)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from raypo.losses import DEFAULT_LOSS


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Objective(_Strict):
    """The metric a trial is judged by (a key of the trial's final metrics) and its direction.
    Default: `true_reward` (max) on the built-in task, `pref_accuracy` (max) on a dataset."""

    metric: str
    mode: Literal["max", "min"] = "max"


class Budget(_Strict):
    trials: int = Field(12, ge=1, le=1_000_000)
    concurrency: int = Field(2, ge=1, le=100_000)  # trials running at once
    time_limit_s: float | None = Field(None, gt=0)  # no new trial starts after this


class Scheduler(_Strict):
    """Early stopping at each evaluation: `asha` (async successive halving), `median`
    (stop a trial below the median of others at the same step) or `none`."""

    name: Literal["asha", "median", "none"] = "none"
    grace_period: int = Field(1, ge=1)  # evaluations before a trial may be stopped
    reduction_factor: float = Field(2.0, gt=1)  # asha: 1/reduction_factor go on at each rung


class Resources(_Strict):
    cpus: float = Field(1.0, gt=0)
    gpus: float = Field(0.0, ge=0)
    workers: int = Field(1, ge=1)  # > 1: the trial runs Ray Train workers (DDP)
    # one GPU's memory in GB (1e9 bytes, as GPUs are sold: an A10G is 24): the memory plan
    # checks each trial against it before any trial (raypo.train.plan); without it a GPU
    # search reads a live GPU node's, and needs it when no GPU node is up yet
    gpu_memory_gb: float | None = Field(None, gt=0)


class Sampler(_Strict):
    """Optuna's sampler: TPE for one objective, NSGA-II for two (default by objectives);
    `random`; `grid` walks every combination of a space of choices (no conditions)."""

    name: Literal["tpe", "nsga2", "random", "grid"] | None = None  # grid: every combination
    seed: int = 0
    startup_trials: int = Field(4, ge=0)  # random trials before TPE models the space


class Selection(_Strict):
    """Data-driven selection of the kernel-divergence pair (raypo.selection)."""

    enabled: bool = True  # compute the metrics and the ranking before the trials
    warm_start: int = Field(3, ge=0)  # the predicted best pairs are tried first
    max_pairs: int = Field(512, ge=8)  # pairs the metrics are computed on


class Keep(_Strict):
    """The trained models a search keeps under reports/<name>/models/<trial_id>/ (see
    raypo.search.keep): the `best` best finished trials by the first objective, `all` of
    them, or 0 for none."""

    best: int | Literal["all"] = 1

    @model_validator(mode="after")
    def _count(self) -> Keep:
        if self.best != "all" and self.best < 0:
            raise ValueError("best: expected a number of trials >= 0, or all")
        return self

    @property
    def count(self) -> int | None:
        """How many to keep; None for all."""
        return None if self.best == "all" else self.best
class Confirm(_Strict):
    """The confirmation stage (raypo.search.confirm): the best `top` configurations of the
    search and, for each, a `baseline` that differs only in the loss, trained under the same
    `seeds` (a count, or the list of seeds), paired by seed. The baseline keeps the finalist's
    beta unless it gives its own. Seeds default to fresh ones (the search's seed + 1, + 2, ...):
    the search's own seed is the one its best trials won with."""

    top: int = Field(3, ge=1)
    seeds: int | list[int] = 5
    baseline: dict[str, Any] = Field(default_factory=lambda: {"name": DEFAULT_LOSS})

    @model_validator(mode="before")
    @classmethod
    def _baseline_shorthand(cls, data):
        if isinstance(data, dict) and isinstance(data.get("baseline"), str):
            data = {**data, "baseline": {"name": data["baseline"]}}
        return data

    @model_validator(mode="after")
    def _valid(self) -> Confirm:
        seeds = self.seed_list(0)
        if len(seeds) < 2:
            raise ValueError("seeds: a confirmation needs at least 2 seeds (an interval needs "
                             "two values)")
        if len(set(seeds)) != len(seeds):
            raise ValueError("seeds: repeated seeds")
        if "name" not in self.baseline:
            raise ValueError("baseline: needs a loss `name`")
        return self

    def seed_list(self, search_seed: int) -> list[int]:
        if isinstance(self.seeds, list):
            return list(self.seeds)
        return [search_seed + 1 + i for i in range(self.seeds)]


class MLflowTracking(_Strict):
    """MLflow (raypo.search.tracking): `tracking_uri` (default: MLFLOW_TRACKING_URI, else a
    SQLite store in the report's `tracking/` folder), `experiment` (default: the search's
    name), extra run `tags`."""

    tracking_uri: str | None = None
    experiment: str | None = None
    tags: dict[str, str] = Field(default_factory=dict)


class WandbTracking(_Strict):
    """Weights & Biases: `project` and `group` (default: the search's name), `entity`, `mode`
    (default: WANDB_MODE, else W&B's own: online) and `dir` (default: WANDB_DIR, else the
    report's `tracking/` folder)."""

    project: str | None = None
    group: str | None = None
    entity: str | None = None
    mode: Literal["online", "offline", "disabled"] | None = None
    dir: str | None = None


class TensorBoardTracking(_Strict):
    """TensorBoard event files, one folder per trial under `logdir` (default: the report's
    `tracking/tensorboard/`; on object storage, Tune's trial folders)."""

    logdir: str | None = None


TRACKERS = ("mlflow", "wandb", "tensorboard")


class Tracking(_Strict):
    """Where each trial's config, evaluations and final row also go, through Ray Tune's own
    logger callbacks (raypo.search.tracking). Shorthands: `tracking: mlflow`,
    `tracking: [mlflow, tensorboard]`, `tracking: {wandb: {mode: offline}, mlflow: {}}`."""

    mlflow: MLflowTracking | None = None
    wandb: WandbTracking | None = None
    tensorboard: TensorBoardTracking | None = None

    @model_validator(mode="before")
    @classmethod
    def _shorthands(cls, data):
        if isinstance(data, str):
            data = [data]
        if isinstance(data, list):
            unknown = [n for n in data if n not in TRACKERS]
            if unknown:
                raise ValueError(f"unknown tracker {unknown[0]!r}; expected one of "
                                 f"{', '.join(TRACKERS)}")
            data = {name: {} for name in data}
        if isinstance(data, dict):  # `mlflow:` (null) or `mlflow: true` turn one on
            data = {k: ({} if v is None or v is True else None if v is False else v)
                    for k, v in data.items()}
        return data

    @property
    def names(self) -> list[str]:
        """The trackers turned on, in TRACKERS' order."""
        return [n for n in TRACKERS if getattr(self, n) is not None]

    def adding(self, names) -> Tracking:
        """These settings with the trackers `names` turned on (with their defaults where this
        does not set them): what `raypo search --track` does."""
        return Tracking.model_validate({**{n: getattr(self, n).model_dump() for n in
                                           self.names}, **{n: {} for n in names
                                                           if n not in self.names}})


class SearchSettings(_Strict):
    objective: Objective | None = None
    objectives: list[Objective] | None = Field(None, min_length=1, max_length=2)
    budget: Budget = Budget()
    scheduler: Scheduler = Scheduler()
    resources: Resources = Resources()
    sampler: Sampler = Sampler()
    selection: Selection = Selection()
    keep: Keep = Keep()
    confirm: Confirm | None = None  # run the confirmation stage after the search
    tracking: Tracking = Tracking()  # MLflow, W&B, TensorBoard (raypo.search.tracking)

    @model_validator(mode="before")
    @classmethod
    def _shorthands(cls, data):
        if isinstance(data, dict) and isinstance(data.get("keep"), int | str):
            data = {**data, "keep": {"best": data["keep"]}}  # keep: 2, keep: all
        if isinstance(data, dict) and isinstance(data.get("scheduler"), str):
            data = {**data, "scheduler": {"name": data["scheduler"]}}
        if isinstance(data, dict) and isinstance(data.get("objective"), str):
            data = {**data, "objective": {"metric": data["objective"]}}
        return data

    @model_validator(mode="after")
    def _one_objective_key(self) -> SearchSettings:
        if self.objective is not None and self.objectives is not None:
            raise ValueError("give `objective` or `objectives`, not both")
        return self


# the keys of a space that are the search's own; every other key is the training config
SEARCH_KEYS = frozenset(SearchSettings.model_fields)
