"""A parsed search space: its fixed config, its searched parameters (raypo.search.grammar)
and its settings (raypo.search.settings), turned into an Optuna define-by-run space and into
each trial's training config.

    space = load_space("search_spaces/quickstart.yaml")
    space.define(optuna_trial)          # {parameter name: value}
    space.config(values)                # the trial's TrainConfig
"""

from __future__ import annotations

import copy
import functools
import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from raypo.search.grammar import Param, SpaceError, fixed_loss, parse_tree, value_at
from raypo.search.settings import SEARCH_KEYS, Objective, SearchSettings
from raypo.train.config import (
    TrainConfig,
    format_validation_error,
    read_yaml_mapping,
    set_dotted,
    set_path,
)


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
        return list(searched.choices) if searched else [fixed_loss(self.fixed)]

    def _active(self, p: Param, values: dict) -> bool:
        for c in p.when:
            if c.searched:
                if c.target not in values or values[c.target] not in c.allowed:
                    return False  # absent: the parameter it depends on is not in this trial
            elif value_at(self.fixed, c.path) not in c.allowed:
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
            names = ", ".join(p.dotted for p in self.params)
            raise SpaceError(f"{self.source}: {names}: a range or choice; `raypo train` needs "
                             "every value fixed (use `raypo search` for a space)")
        try:
            return self.config({}, **overrides)
        except ValidationError as e:
            raise SpaceError(format_validation_error(self.source, e)) from None

    def representative_values(self) -> list[dict]:
        """Assignments that together give every choice value and both ends of every range
        (each with the conditions it needs made true): checking these checks the space."""
        return [dict(values) for values in self._representative]

    @functools.cached_property
    def _representative(self) -> list[dict]:
        out = []
        for p in self.params:
            for v in p.values:
                out.append(self._complete({p.name: v}))
        return out or [{}]

    @functools.cached_property
    def representative_config(self) -> TrainConfig:
        """The space's representative config: its first representative assignment's (what
        every trial shares: the model, the data, the seeds, the fixed values)."""
        return self.config(self.representative_values()[0])

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
    fixed, params = parse_tree(config_tree, settings.resources, source)
    space = SearchSpace(source=source, raw=tree, fixed=fixed, params=params, settings=settings)
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


def load_fixed(path: str | Path, overrides: list[tuple[str, Any]] = ()) -> TrainConfig:
    """The training config of a file with nothing searched (`raypo train`), read by the same
    parser as a search space (its search sections are read past), after `overrides`
    ((dotted key, value) pairs, raypo.train.config.parse_overrides); SpaceError names the
    file and the key."""
    tree = read_yaml_mapping(path, SpaceError)
    for key, value in overrides:
        set_dotted(tree, key, value)
    tree.setdefault("name", Path(path).stem)
    return parse_space(tree, str(path)).fixed_config()
