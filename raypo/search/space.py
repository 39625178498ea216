"""A search space: one YAML file, validated at the edge, turned into an Optuna define-by-run space.

The file is a training config (raypo.train.config) in which any value may be a range, plus the
search's own sections. A value is

- fixed: `lr: 0.001`, `kernel: rbf`, `scales: [0.1, 1.0]`;
- a range: `{low: 1e-4, high: 1e-2, log: true}` (float; int when both ends are ints or with
  `type: int`; `step:` for a grid);
- a choice: `{choice: [rbf, polynomial, null]}`;
- conditional, with `when:` on any of those, or `{value: X, when: ...}` for a fixed value:
  `sigma: {low: 0.1, high: 10, log: true, when: {kernel: rbf}}`. A condition names another
  parameter, a sibling (`kernel`) or a dotted path from the top (`loss.name`), and the values
  it may take (one or a list); the parameter exists only in trials where every condition
  holds (and the parameters it names exist).

Each searched value becomes one Optuna parameter whose name is its report column
(raypo.reports.schema): `lr`, `loss` (the loss name), `kernel_dpo.gamma`, `beta_schedule.end_beta`.
A loss parameter means something different for each loss (fdpo's `alpha` is an order, tdpo's a
weight), so a loss parameter searched while the loss itself is searched becomes one Optuna
parameter per loss it applies to (`fdpo.alpha`, `tdpo.alpha`), each active only in that loss's
trials; parameters a loss declares in its report identity (`kernel`, `divergence`, `prior`) mean
one thing wherever they appear and stay one parameter. Inside a list of loss terms (a
mixture's `terms`), each term's values are searched like any other
(`terms: [{name: dpo, weight: {low: 0, high: 1}}]` -> `mixture.dpo.weight`).

Search sections: `objective` (or `objectives`, two for a Pareto search), `budget`,
`scheduler`, `resources`, `sampler`, `selection`, `confirm`, `keep`, `tracking`; see the models
below.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from raypo.losses import DEFAULT_LOSS
from raypo.reports.schema import parameter_column
from raypo.train.config import (
    SEARCH_SECTIONS,
    ConfigError,
    TrainConfig,
    format_validation_error,
    read_yaml_mapping,
    set_dotted,
    set_path,
)

RANGE_KEYS = {"low", "high", "log", "step", "type", "when"}
CHOICE_KEYS = {"choice", "when"}
VALUE_KEYS = {"value", "when"}


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


SEARCH_KEYS = set(SEARCH_SECTIONS)  # what `raypo train` reads past


@dataclass
class Condition:
    """A parameter exists in a trial only where `target` takes one of `allowed`: a searched
    parameter (by name) or a fixed value of the config (by path)."""

    target: str  # the searched parameter's name, or the fixed value's dotted path
    allowed: list
    path: tuple  # the target's path in the config tree
    searched: bool


@dataclass
class Param:
    """One searched parameter: `path` in the config tree, `name` (the Optuna parameter and the
    report column), its distribution and the conditions under which it exists."""

    path: tuple
    kind: Literal["float", "int", "choice", "value"]
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: list = field(default_factory=list)
    when: list[Condition] = field(default_factory=list)
    name: str = ""
    losses: tuple[str, ...] = ()  # for a loss parameter: the losses it applies to

    def __post_init__(self):
        # a loss parameter is named once the losses it applies to are known (_split_by_loss)
        if not self.name:
            is_loss = self.path[0] == "loss" and tuple(self.path) != ("loss", "name")
            self.name = self.dotted if is_loss else parameter_column(self.path)

    @property
    def dotted(self) -> str:
        """Where it sits in the space file (`loss.gamma`), for messages."""
        return ".".join(map(str, self.path))

    @property
    def values(self) -> list:
        """Values that stand for the whole range when the space is checked."""
        if self.kind == "choice":
            return list(self.choices)
        if self.kind == "value":
            return list(self.choices)
        return [self.low, self.high]

    @property
    def largest(self):
        """The largest value it can draw: a range's high end (the last step a grid reaches),
        the largest of numeric choices; None for other choices."""
        if self.kind in ("choice", "value"):
            numbers = [v for v in self.choices if _is_number(v)]
            return max(numbers) if numbers and len(numbers) == len(self.choices) else None
        if self.step:
            return self.low + int((self.high - self.low) // self.step) * self.step
        return self.high

    def suggest(self, trial) -> Any:
        if self.kind == "choice":
            return trial.suggest_categorical(self.name, self.choices)
        if self.kind == "value":
            return self.choices[0]
        if self.kind == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log,
                                     step=int(self.step or 1))
        return trial.suggest_float(self.name, self.low, self.high, log=self.log, step=self.step)


class SpaceError(ConfigError):
    """A bad search space: the message names the file, the key and what is allowed."""


def _is_number(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _parse_param(path: tuple, node: dict, where: str) -> Param | None:
    """A Param if `node` is a range, a choice or a conditional value; None if a plain mapping."""
    keys = set(node)
    name = ".".join(map(str, path))
    if "choice" in keys:
        if not keys <= CHOICE_KEYS:
            raise SpaceError(f"{where}: {name}: a choice takes only `choice` and `when`, "
                             f"not {', '.join(sorted(keys - CHOICE_KEYS))}")
        choices = node["choice"]
        if not isinstance(choices, list) or not choices:
            raise SpaceError(f"{where}: {name}.choice: expected a non-empty list of values")
        if any(isinstance(c, dict | list) for c in choices):
            raise SpaceError(f"{where}: {name}.choice: choices must be plain values "
                             "(strings, numbers, true/false, null); use `when:` on the "
                             "parameters that belong to one choice")
        if len(set(map(repr, choices))) != len(choices):
            raise SpaceError(f"{where}: {name}.choice: repeated values")
        return Param(path, "choice", choices=list(choices))
    if "low" in keys or "high" in keys:
        if not keys <= RANGE_KEYS or not {"low", "high"} <= keys:
            extra = ", ".join(sorted(keys - RANGE_KEYS)) or "low and high both"
            raise SpaceError(f"{where}: {name}: a range takes low, high, log, step, type, "
                             f"when (problem: {extra})")
        low, high = node["low"], node["high"]
        if not (_is_number(low) and _is_number(high)):
            raise SpaceError(f"{where}: {name}: low and high must be numbers, got "
                             f"{low!r} and {high!r}")
        kind = node.get("type") or ("int" if isinstance(low, int) and isinstance(high, int)
                                    else "float")
        if kind not in ("int", "float"):
            raise SpaceError(f"{where}: {name}.type: expected int or float, got {kind!r}")
        if not low < high:
            raise SpaceError(f"{where}: {name}: low ({low}) must be smaller than high ({high})")
        log = node.get("log", False)
        if not isinstance(log, bool):
            raise SpaceError(f"{where}: {name}.log: expected true or false")
        if log and low <= 0:
            raise SpaceError(f"{where}: {name}: a log range needs low > 0, got {low}")
        step = node.get("step")
        if step is not None and (not _is_number(step) or step <= 0):
            raise SpaceError(f"{where}: {name}.step: expected a positive number")
        if step is not None and log:
            raise SpaceError(f"{where}: {name}: step and log cannot be combined (Optuna)")
        return Param(path, kind, low=low, high=high, log=log, step=step)
    if "value" in keys and "when" in keys:
        if not keys <= VALUE_KEYS:
            raise SpaceError(f"{where}: {name}: a conditional value takes only `value` and "
                             f"`when`, not {', '.join(sorted(keys - VALUE_KEYS))}")
        return Param(path, "value", choices=[node["value"]])
    if "when" in keys:
        raise SpaceError(f"{where}: {name}: `when` needs a value, a range or a choice beside "
                         "it (e.g. {choice: [...], when: {...}})")
    return None


def _walk(tree: dict, path: tuple, where: str, params: list[Param],
          conditions: dict[tuple, Any]) -> dict:
    """The tree with every searched value removed (the fixed part); Params appended, their
    raw `when:` in `conditions` by path. Lists of mappings (a mixture's terms) are walked
    element by element."""
    fixed: dict = {}
    for key, node in tree.items():
        if not isinstance(key, str):
            raise SpaceError(f"{where}: key {key!r} under {'.'.join(map(str, path)) or 'the top'}"
                             ": keys must be strings")
        sub = (*path, key)
        if isinstance(node, dict):
            param = _parse_param(sub, node, where)
            if param is None:
                fixed[key] = _walk(node, sub, where, params, conditions)
            else:
                params.append(param)
                if "when" in node:
                    conditions[param.path] = node["when"]
        elif isinstance(node, list) and node and all(isinstance(x, dict) for x in node):
            fixed[key] = [_walk(x, (*sub, i), where, params, conditions)
                          for i, x in enumerate(node)]
        else:
            fixed[key] = node
    return fixed


def _get(tree: dict, path: tuple):
    for key in path:
        if isinstance(tree, str) and key == "name":
            return tree  # the `loss: <name>` shorthand
        if isinstance(tree, list) and isinstance(key, int) and key < len(tree):
            tree = tree[key]
            continue
        if not isinstance(tree, dict) or key not in tree:
            raise KeyError(path)
        tree = tree[key]
    return tree


@dataclass
class SearchSpace:
    """A parsed space: the fixed config tree, the searched parameters (in an order where
    every condition's parameter comes first) and the search settings."""

    source: str
    raw: dict
    fixed: dict
    params: list[Param]
    settings: SearchSettings

    @property
    def name(self) -> str:
        return self.fixed.get("name", "search")

    @property
    def builtin(self) -> bool:
        return self.fixed.get("data") is None

    @property
    def objectives(self) -> list[Objective]:
        s = self.settings
        if s.objectives:
            return s.objectives
        if s.objective:
            return [s.objective]
        if self.fixed.get("judge") is not None:  # what aligned models are judged by
            return [Objective(metric="judge_win_rate")]
        return [Objective(metric="true_reward" if self.builtin else "pref_accuracy")]

    def param(self, name: str) -> Param | None:
        """The searched parameter called `name` (its Optuna name and report column)."""
        return next((p for p in self.params if p.name == name), None)

    def param_at(self, path: tuple, loss: str | None = None) -> Param | None:
        """The searched parameter at config `path` that applies to loss `loss`."""
        return next((p for p in self.params if p.path == tuple(path)
                     and (loss is None or not p.losses or loss in p.losses)), None)

    @property
    def loss_names(self) -> list[str]:
        """The losses the space's trials can use."""
        searched = self.param_at(("loss", "name"))
        return list(searched.choices) if searched else [_fixed_loss(self.fixed)]

    def _active(self, p: Param, values: dict) -> bool:
        for c in p.when:
            if c.searched:
                if c.target not in values or values[c.target] not in c.allowed:
                    return False  # absent: the parameter it depends on is not in this trial
            elif _get(self.fixed, c.path) not in c.allowed:
                return False
        return True

    def define(self, trial) -> dict:
        """The define-by-run space: suggests each active parameter on an Optuna trial;
        returns {dotted name: value} (Ray's OptunaSearch passes it on as the trial config)."""
        values: dict = {}
        for p in self.params:
            if self._active(p, values):
                values[p.name] = p.suggest(trial)
        return values

    def config(self, values: dict, **overrides) -> TrainConfig:
        """The training config of one trial from its {dotted name: value}."""
        tree = copy.deepcopy(self.fixed)
        for name, value in values.items():
            param = self.param(name)
            if param is None:
                known = ", ".join(p.name for p in self.params) or "(none)"
                raise SpaceError(f"{self.source}: no searched parameter {name!r}; the space "
                                 f"searches: {known}")
            set_path(tree, param.path, value)
        for key, value in overrides.items():
            if value is not None:
                set_dotted(tree, key, value)
        return TrainConfig.model_validate(tree)

    def fixed_config(self, **overrides) -> TrainConfig:
        """The training config when nothing is searched (`raypo train` on a space)."""
        if self.params:
            names = ", ".join(p.name for p in self.params)
            raise SpaceError(f"{self.source}: {names}: a range or choice; `raypo train` needs "
                             "every value fixed (use `raypo search` for a space)")
        try:
            return self.config({}, **overrides)
        except ValidationError as e:
            raise SpaceError(format_validation_error(self.source, e)) from None

    def representative_values(self) -> list[dict]:
        """Assignments that together give every choice value and both ends of every range
        (each with the conditions it needs made true): checking these checks the space."""
        out = []
        for p in self.params:
            for v in p.values:
                out.append(self._complete({p.name: v}))
        return out or [{}]

    def _complete(self, forced: dict) -> dict:
        """An assignment with `forced` values, the conditions they need, and first values
        (low ends) elsewhere."""
        forced = dict(forced)
        changed = True
        while changed:  # make the conditions of forced parameters true, transitively
            changed = False
            for name in list(forced):
                p = self.param(name)
                for c in p.when:
                    if c.searched and c.target not in forced:
                        forced[c.target] = c.allowed[0]
                        changed = True
        values = {}
        for p in self.params:
            if self._active(p, values):
                values[p.name] = forced.get(p.name, p.values[0])
        return values

    def at_largest(self, paths) -> list[dict]:
        """The representative assignments (every choice value, both ends of every range)
        with each searched parameter at one of `paths` (config paths such as
        ("batch_size",)) raised to the largest value it can draw: together they hold the
        space's most demanding trials in those keys."""
        wanted = {tuple(p) for p in paths}
        out = []
        for values in self.representative_values():
            raised = dict(values)
            for name in values:
                p = self.param(name)
                if p.path in wanted and p.largest is not None:
                    raised[name] = p.largest
            out.append(raised)
        return out

    def check(self) -> None:
        """Every representative configuration must be a valid training config."""
        seen = set()
        for values in self.representative_values():
            key = repr(sorted(values.items(), key=lambda kv: kv[0]))
            if key in seen:
                continue
            seen.add(key)
            try:
                self.config(values)
            except ValidationError as e:
                shown = ", ".join(f"{k}={v!r}" for k, v in values.items())
                message = format_validation_error(self.source, e)
                if shown:
                    message += f"\n  (in the trial with {shown})"
                raise SpaceError(message) from None
            except ValueError as e:  # a loss's own check of its parameters
                raise SpaceError(f"{self.source}: {e}") from None
        self._check_judged()

    def _check_judged(self) -> None:
        """A judged objective needs a judge: said now, not after the caches are computed."""
        key = "objectives" if self.settings.objectives else "objective.metric"
        for objective in self.objectives:
            if objective.metric.startswith("judge_") and self.fixed.get("judge") is None:
                raise SpaceError(
                    f"{self.source}: {key}: {objective.metric} is judged by a reward model and "
                    "the space has no `judge:` section; add judge: {model: PATH_OR_HUB_NAME} "
                    "(a sequence classifier with one output), or judge: builtin on the "
                    "built-in task")

    def grid(self) -> dict[str, list]:
        """{name: values} for Optuna's GridSampler: only choices and int ranges, no
        conditions (a grid has one shape)."""
        out = {}
        for p in self.params:
            if p.when:
                why = (" (a loss parameter while the loss is searched exists only in its "
                       "loss's trials)" if p.losses else "")
                raise SpaceError(f"{self.source}: {p.dotted}: the grid sampler takes no "
                                 f"conditional parameters{why}")
            if p.kind == "float":
                raise SpaceError(f"{self.source}: {p.name}: the grid sampler needs a choice "
                                 "list here, not a float range")
            out[p.name] = p.values if p.kind in ("choice", "value") else list(
                range(int(p.low), int(p.high) + 1, int(p.step or 1)))
        return out

    def grid_size(self) -> float:
        """How many distinct trials the space holds (inf with a continuous range)."""
        if any(p.kind == "float" and p.step is None for p in self.params):
            return float("inf")
        return float(len({repr(v) for v in self._all_assignments()}))

    def _all_assignments(self):
        options = []
        for p in self.params:
            if p.kind == "choice" or p.kind == "value":
                options.append(p.values)
            else:
                step = p.step or 1
                n = int(round((p.high - p.low) / step)) + 1
                options.append([p.low + i * step for i in range(n)])
        for combo in itertools.product(*options):
            values = {}
            for p, v in zip(self.params, combo, strict=True):
                if self._active(p, values):
                    values[p.name] = v
            yield sorted(values.items())


def _exists(tree: dict, path: tuple) -> bool:
    try:
        _get(tree, path)
    except KeyError:
        return False
    return True


def _fixed_loss(fixed: dict) -> str:
    loss = fixed.get("loss", DEFAULT_LOSS)
    return loss if isinstance(loss, str) else loss.get("name", DEFAULT_LOSS)


def _resolve_conditions(params: list[Param], conditions: dict, fixed: dict, where: str
                        ) -> None:
    """Each raw `when:` into Conditions on the paths it names (a sibling first, then a dotted
    path from the top)."""
    by_path = {p.path: p for p in params}
    for p in params:
        when = conditions.get(p.path)
        if when is None:
            continue
        if not isinstance(when, dict) or not when:
            raise SpaceError(f"{where}: {p.dotted}.when: expected a mapping of parameter -> "
                             "value(s), e.g. {name: [a, b]}")
        for ref, allowed in when.items():
            candidates = [(*p.path[:-1], str(ref)), tuple(str(ref).split("."))]
            target = next((c for c in candidates if c in by_path or _exists(fixed, c)), None)
            if target is None:
                known = ", ".join(q.dotted for q in params) or "(none)"
                raise SpaceError(f"{where}: {p.dotted}.when: condition on unknown parameter "
                                 f"{ref!r}; searched parameters are: {known}")
            allowed = allowed if isinstance(allowed, list) else [allowed]
            other = by_path.get(target)
            dotted = ".".join(map(str, target))
            if other is not None and other.kind in ("choice", "value"):
                bad = [a for a in allowed if a not in other.choices]
                if bad:
                    raise SpaceError(f"{where}: {p.dotted}.when: {dotted} never takes "
                                     f"{bad!r}; its values are {other.choices!r}")
            p.when.append(Condition(dotted, allowed, target, searched=other is not None))


LOSS_NAME = ("loss", "name")


def _term_name(fixed: dict, path: tuple, where: str) -> str | None:
    """For a value inside a list of loss terms (loss.terms.<i>.<key>), the term's loss name."""
    if len(path) == 4 and path[0] == "loss" and isinstance(path[2], int):
        try:
            name = _get(fixed, (*path[:3], "name"))
        except KeyError:
            name = None
        if not isinstance(name, str):
            raise SpaceError(f"{where}: {'.'.join(map(str, path[:3]))}.name: a term's loss "
                             "must be fixed (list each candidate term, with weight 0 to "
                             "switch one off)")
        return name
    return None


def _split_by_loss(params: list[Param], fixed: dict, where: str) -> list[Param]:
    """Name every parameter by its report column; a loss parameter becomes one Param per
    column it takes across the losses it applies to (module docstring)."""
    loss_param = next((p for p in params if p.path == LOSS_NAME), None)
    if loss_param is not None and loss_param.kind != "choice":
        loss_param = None
    fixed_loss = _fixed_loss(fixed)
    split: dict[tuple, list[Param]] = {}  # raw path -> its Params
    out = []
    for p in params:
        if p.path[0] != "loss" or p.path == LOSS_NAME:
            out.append(p)
            split[p.path] = [p]
            continue
        term = _term_name(fixed, p.path, where)
        if term is not None and loss_param is not None:
            raise SpaceError(f"{where}: {p.dotted}: a value inside the loss's terms can be "
                             "searched only when the loss itself is fixed (loss: {name: <a "
                             "loss with terms>, terms: [...]}); with the loss searched, give "
                             "the terms as fixed values: {value: [...], when: {name: ...}}")
        on_loss = [c for c in p.when if c.path == LOSS_NAME]
        others = [c for c in p.when if c.path != LOSS_NAME]
        if loss_param is None:  # a fixed loss: its conditions stay as they are
            losses, others = [fixed_loss], list(p.when)
        else:
            losses = [n for n in loss_param.choices
                      if all(n in c.allowed for c in on_loss)]
        groups: dict[str, list[str]] = {}
        for loss in losses:
            try:
                column = parameter_column(p.path, loss, term=term)
            except ValueError as e:  # an unknown loss name
                raise SpaceError(f"{where}: loss.name: {e}") from None
            groups.setdefault(column, []).append(loss)
        split[p.path] = []
        for column, group in groups.items():
            q = copy.copy(p)
            q.name, q.losses, q.when = column, tuple(group), list(others)
            if loss_param is not None:
                q.when.append(Condition(loss_param.name, group, LOSS_NAME, searched=True))
            split[p.path].append(q)
            out.append(q)
    # conditions on a searched parameter point to its Param for the same losses; a Param
    # whose condition names a parameter none of its losses has can never exist: dropped
    kept = []
    for q in out:
        reachable = True
        for i, c in enumerate(q.when):
            if not c.searched:
                continue
            targets = split[c.path]
            match = [t for t in targets if not t.losses or set(q.losses or t.losses)
                     <= set(t.losses)]
            if not match and q.losses and not any(set(q.losses) & set(t.losses)
                                                  for t in targets):
                reachable = False
                break
            if len(match) != 1:
                raise SpaceError(f"{where}: {q.dotted}.when: {c.target} is searched "
                                 f"separately for each loss; give {q.dotted} a "
                                 "`when: {name: ...}` with one loss")
            q.when[i] = Condition(match[0].name, c.allowed, c.path, searched=True)
        if reachable:
            kept.append(q)
    return kept


def _order(params: list[Param], where: str) -> list[Param]:
    """Parameters ordered so that each comes after those its conditions name."""
    by_name = {p.name: p for p in params}
    ordered, state = [], {}

    def visit(p: Param, trail: tuple[str, ...]):
        if state.get(p.name) == "done":
            return
        if state.get(p.name) == "visiting":
            raise SpaceError(f"{where}: conditions form a cycle: {' -> '.join(trail)}")
        state[p.name] = "visiting"
        for c in p.when:
            if c.searched and c.target in by_name:
                visit(by_name[c.target], (*trail, c.target))
        state[p.name] = "done"
        ordered.append(p)

    for p in params:
        visit(p, (p.name,))
    return ordered


def _apply_resources(fixed: dict, resources: Resources, where: str) -> None:
    """A trial's workers and GPUs are the training config's num_workers and use_gpu: one
    place to set them (resources), checked against the other if both are given."""
    for key, value, given in (("num_workers", resources.workers, resources.workers > 1),
                              ("use_gpu", True, resources.gpus > 0)):
        if not given:
            continue
        if key in fixed and fixed[key] != value:
            raise SpaceError(f"{where}: {key}: {fixed[key]!r} disagrees with resources "
                             f"({value!r}); set it in one place")
        fixed[key] = value


def parse_space(tree: dict, source: str = "<space>") -> SearchSpace:
    """Parse and check a space given as a mapping (what the YAML file holds)."""
    if not isinstance(tree, dict):
        raise SpaceError(f"{source}: expected a mapping of keys at the top level")
    settings_tree = {k: v for k, v in tree.items() if k in SEARCH_KEYS}
    try:
        settings = SearchSettings.model_validate(settings_tree)
    except ValidationError as e:
        raise SpaceError(format_validation_error(source, e)) from None
    config_tree = {k: v for k, v in tree.items() if k not in SEARCH_KEYS}
    params: list[Param] = []
    conditions: dict = {}
    fixed = _walk(config_tree, (), source, params, conditions)
    _apply_resources(fixed, settings.resources, source)
    _resolve_conditions(params, conditions, fixed, source)
    params = _split_by_loss(params, fixed, source)
    names = [p.name for p in params]
    if len(set(names)) != len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise SpaceError(f"{source}: {', '.join(twice)}: searched twice (two values of the "
                         "space set the same report column)")
    space = SearchSpace(source=source, raw=tree, fixed=fixed, params=_order(params, source),
                        settings=settings)
    space.check()
    if settings.sampler.name == "grid":
        space.grid()  # its own errors
    return space


def load_space(path: str | Path, overrides: dict | None = None) -> SearchSpace:
    """Read and check a search space file; SpaceError names the file and the key.

    `overrides` ({dotted key: value}, e.g. from --model/--data) replace values before the
    check."""
    tree = read_yaml_mapping(path, SpaceError)
    tree.setdefault("name", Path(path).stem)
    for key, value in (overrides or {}).items():
        if value is not None:
            set_dotted(tree, key, value)
    return parse_space(tree, str(path))
