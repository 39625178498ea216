"""The grammar of a search space: which values of a training config are searched, and how.

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
from dataclasses import dataclass, field
from typing import Any, Literal

from raypo.losses import DEFAULT_LOSS
from raypo.reports.schema import parameter_column
from raypo.search.settings import Resources
from raypo.train.config import ConfigError

RANGE_KEYS = {"low", "high", "log", "step", "type", "when"}
CHOICE_KEYS = {"choice", "when"}
VALUE_KEYS = {"value", "when"}


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
        return _choice(path, node, f"{where}: {name}")
    if "low" in keys or "high" in keys:
        return _range(path, node, f"{where}: {name}")
    if "value" in keys and "when" in keys:
        if not keys <= VALUE_KEYS:
            raise SpaceError(f"{where}: {name}: a conditional value takes only `value` and "
                             f"`when`, not {', '.join(sorted(keys - VALUE_KEYS))}")
        return Param(path, "value", choices=[node["value"]])
    if "when" in keys:
        raise SpaceError(f"{where}: {name}: `when` needs a value, a range or a choice beside "
                         "it (e.g. {choice: [...], when: {...}})")
    return None


def _choice(path: tuple, node: dict, at: str) -> Param:
    """`{choice: [...], when: ...}`; `at` is "<file>: <key>" for messages."""
    keys = set(node)
    if not keys <= CHOICE_KEYS:
        raise SpaceError(f"{at}: a choice takes only `choice` and `when`, "
                         f"not {', '.join(sorted(keys - CHOICE_KEYS))}")
    choices = node["choice"]
    if not isinstance(choices, list) or not choices:
        raise SpaceError(f"{at}.choice: expected a non-empty list of values")
    if any(isinstance(c, dict | list) for c in choices):
        raise SpaceError(f"{at}.choice: choices must be plain values "
                         "(strings, numbers, true/false, null); use `when:` on the "
                         "parameters that belong to one choice")
    if len(set(map(repr, choices))) != len(choices):
        raise SpaceError(f"{at}.choice: repeated values")
    return Param(path, "choice", choices=list(choices))


def _range(path: tuple, node: dict, at: str) -> Param:
    """`{low:, high:, log:, step:, type:, when:}`; `at` is "<file>: <key>" for messages."""
    keys = set(node)
    if not keys <= RANGE_KEYS or not {"low", "high"} <= keys:
        extra = ", ".join(sorted(keys - RANGE_KEYS)) or "low and high both"
        raise SpaceError(f"{at}: a range takes low, high, log, step, type, "
                         f"when (problem: {extra})")
    low, high = node["low"], node["high"]
    if not (_is_number(low) and _is_number(high)):
        raise SpaceError(f"{at}: low and high must be numbers, got {low!r} and {high!r}")
    kind = node.get("type") or ("int" if isinstance(low, int) and isinstance(high, int)
                                else "float")
    if kind not in ("int", "float"):
        raise SpaceError(f"{at}.type: expected int or float, got {kind!r}")
    if not low < high:
        raise SpaceError(f"{at}: low ({low}) must be smaller than high ({high})")
    log = node.get("log", False)
    if not isinstance(log, bool):
        raise SpaceError(f"{at}.log: expected true or false")
    if log and low <= 0:
        raise SpaceError(f"{at}: a log range needs low > 0, got {low}")
    step = node.get("step")
    if step is not None and (not _is_number(step) or step <= 0):
        raise SpaceError(f"{at}.step: expected a positive number")
    if step is not None and log:
        raise SpaceError(f"{at}: step and log cannot be combined (Optuna)")
    return Param(path, kind, low=low, high=high, log=log, step=step)


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


def value_at(tree: dict, path: tuple):
    """The value at `path` in a config tree; KeyError when there is none."""
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


def _exists(tree: dict, path: tuple) -> bool:
    try:
        value_at(tree, path)
    except KeyError:
        return False
    return True


def fixed_loss(fixed: dict) -> str:
    """The loss a fixed config tree names (its default when it names none)."""
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
            name = value_at(fixed, (*path[:3], "name"))
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
    fixed_name = fixed_loss(fixed)
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
            losses, others = [fixed_name], list(p.when)
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
    return [q for q in out if _repoint(q, split, where)]


def _repoint(q: Param, split: dict[tuple, list[Param]], where: str) -> bool:
    """Point `q`'s conditions on a searched parameter to that parameter's Param for the same
    losses; False when a condition names a parameter none of `q`'s losses has (`q` can never
    exist and is dropped)."""
    for i, c in enumerate(q.when):
        if not c.searched:
            continue
        targets = split[c.path]
        match = [t for t in targets if not t.losses or set(q.losses or t.losses)
                 <= set(t.losses)]
        if not match and q.losses and not any(set(q.losses) & set(t.losses)
                                              for t in targets):
            return False
        if len(match) != 1:
            raise SpaceError(f"{where}: {q.dotted}.when: {c.target} is searched "
                             f"separately for each loss; give {q.dotted} a "
                             "`when: {name: ...}` with one loss")
        q.when[i] = Condition(match[0].name, c.allowed, c.path, searched=True)
    return True


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


def parse_tree(config_tree: dict, resources: Resources, where: str) -> tuple[dict, list[Param]]:
    """(fixed, params): a space's training-config tree split into its fixed values and its
    searched parameters, named by their report columns and ordered so that every condition's
    parameter comes first. SpaceError names the key."""
    params: list[Param] = []
    conditions: dict = {}
    fixed = _walk(config_tree, (), where, params, conditions)
    _apply_resources(fixed, resources, where)
    _resolve_conditions(params, conditions, fixed, where)
    params = _split_by_loss(params, fixed, where)
    names = [p.name for p in params]
    if len(set(names)) != len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise SpaceError(f"{where}: {', '.join(twice)}: searched twice (two values of the "
                         "space set the same report column)")
    return fixed, _order(params, where)
