"""The report row schema: what every column of trials.parquet and confirm.parquet is called and
means. The trial recorder, `raypo train`, `select`, the pandas queries and the HTML page read it
from here, and a search space names its Optuna parameters with it, so a searched parameter,
its Optuna name and its column are one name with one meaning.

Columns of a row, by kind:

- bookkeeping: `search`, `trial_id`, `number` (creation order), `status` (ok, failed, pruned,
  interrupted), `error`, `objective`, `predicted_rank`, `searched` (JSON of the trial's
  searched values, by parameter name), `model_path` (the kept model's folder, relative to the
  report; null when not kept), `resumed_from_step` (where a retried trial went on from);
  confirmation rows add `config_id` and `role`.
- identity, the short columns users query, each with one meaning in every row: `loss` (its
  registry name), `family`, and the parts a loss declares in its `identity()`: `kernel` and
  `divergence` (the kernel and the token-level divergence penalty of a kernel loss: empty
  elsewhere), `prior` (MI-DPO's prior), `terms` (a mixture's members).
- loss parameters, qualified by the loss: `<loss>.<parameter>`, e.g. `kernel_dpo.gamma`,
  `fdpo.alpha` (its divergence order), `tdpo.alpha` (its KL weight), `fdpo.divergence` (its
  f-divergence), and for a loss made of terms `<loss>.<term>.<parameter>`
  (`mixture.bco_pair.weight`); every parameter of the loss, its defaults included.
- the beta schedule: `beta_schedule` (its name) and `beta_schedule.<parameter>`.
- the run: `lr`, `batch_size`, `grad_accum`, `steps`, `warmup_steps`, `weight_decay`, `seed`,
  `data_seed`, `model`, `data`; other config keys by their dotted path (`task.variant`).
- metrics: everything else (the final evaluation's metrics, `tokens_per_s`, `wall_s`, ...);
  a metric whose name is taken by a column above is stored as `final_<name>`.
"""

from __future__ import annotations

import json
from typing import Any

from raypo.losses import LOSSES, identity

BOOKKEEPING = ("search", "trial_id", "number", "status", "error", "objective",
               "predicted_rank", "searched", "config_id", "role", "model_path",
               "resumed_from_step")
IDENTITY = ("loss", "family", "kernel", "divergence", "prior", "terms")
RUN = ("lr", "batch_size", "grad_accum", "steps", "warmup_steps", "weight_decay", "seed",
       "data_seed", "model", "data")
SCHEDULE = "beta_schedule"
STATUSES = ("ok", "failed", "pruned", "interrupted")
# Columns that never take part in parameter importances: bookkeeping, and the seed, which
# is noise to average over, not a parameter to choose.
NOT_PARAMETERS = frozenset(BOOKKEEPING) | {"seed", "data_seed"}
# The metrics that cannot leave a range, and the range: shares (accuracy, the judge's win
# rates, the evaluation's share of a trial), and the built-in task's true reward (the share
# of adjacent digits in order, raypo.data.builtin.sortedness). An interval of their mean is
# clipped to it (raypo.reports.stats). A reward model's score has no bounds.
METRIC_BOUNDS: dict[str, tuple[float, float]] = {
    "pref_accuracy": (0.0, 1.0),
    "true_reward": (0.0, 1.0),
    "ref_true_reward": (0.0, 1.0),
    "judge_win_rate": (0.0, 1.0),
    "judge_lc_win_rate": (0.0, 1.0),
    "eval_share": (0.0, 1.0),
}


def metric_bounds(metric: str) -> tuple[float, float] | None:
    """The range `metric` cannot leave, or None (a `final_<name>` column is `name`'s)."""
    return METRIC_BOUNDS.get(metric.removeprefix("final_"))


def _scalar(value: Any) -> bool:
    return value is None or isinstance(value, bool | int | float | str)


def identity_keys(loss: str) -> frozenset[str]:
    """The identity columns loss `loss` fills besides `loss` and `family`."""
    return frozenset(identity(loss)) - {"loss", "family"}


def loss_parameter_column(loss: str, parameter: str, term: str | None = None) -> str:
    """The column of `parameter` of loss `loss` (of its member `term`, for a loss of terms):
    an identity column where the loss declares one of that name, else qualified."""
    if term is not None:
        return f"{loss}.{term}.{parameter}"
    if parameter in identity_keys(loss):
        return parameter
    return f"{loss}.{parameter}"


def parameter_column(path: tuple, loss: str | None = None, term: str | None = None) -> str:
    """The column (and Optuna parameter name) of the config value at `path` (a tuple of keys
    and list indices) in a run of loss `loss`; `term` names the member at a terms index."""
    head, rest = path[0], path[1:]
    if head == "loss":
        if rest == ("name",):
            return "loss"
        if len(rest) == 3 and isinstance(rest[1], int):  # loss.terms.<i>.<parameter>
            return loss_parameter_column(loss, str(rest[2]), term=term or str(rest[1]))
        return loss_parameter_column(loss, ".".join(map(str, rest)))
    if head == SCHEDULE:
        return SCHEDULE if rest == ("name",) else ".".join(map(str, path))
    return ".".join(map(str, path))


def _loss_columns(name: str, params: dict) -> dict[str, Any]:
    defaults = {k: v for k, v in LOSSES.parameters(name).items()
                if _scalar(v) and v is not None and k not in identity_keys(name)}
    given = {k: v for k, v in params.items() if _scalar(v) and k not in identity_keys(name)}
    out = {loss_parameter_column(name, k): v for k, v in {**defaults, **given}.items()}
    for value in params.values():  # a list of member losses (a mixture's terms)
        if isinstance(value, list) and all(isinstance(t, dict) and "name" in t for t in value):
            for member in value:
                term = str(member["name"])
                member_defaults = {k: v for k, v in LOSSES.parameters(term).items()
                                   if _scalar(v) and v is not None} if term in LOSSES else {}
                for k, v in {**member_defaults, **member}.items():
                    if k != "name" and _scalar(v):
                        out[loss_parameter_column(name, k, term=term)] = v
    return out


def config_columns(cfg) -> dict[str, Any]:
    """The identity, parameter and run columns of a training config (a TrainConfig)."""
    row: dict[str, Any] = dict(identity(cfg.loss.name, **cfg.loss.params))
    row[SCHEDULE] = cfg.beta_schedule.name
    row.update({f"{SCHEDULE}.{k}": v for k, v in cfg.beta_schedule.params.items()
                if _scalar(v)})
    row.update(_loss_columns(cfg.loss.name, cfg.loss.params))
    row.update(lr=cfg.lr, batch_size=cfg.batch_size, grad_accum=cfg.grad_accum,
               steps=cfg.steps, warmup_steps=cfg.warmup_steps, weight_decay=cfg.weight_decay,
               seed=cfg.seed, data_seed=cfg.data_seed, model=cfg.model or "tiny",
               data=cfg.data or f"builtin:{cfg.task.variant}")
    return row


_OWN = {"trial_id", "status", "error", "objective", "number", "predicted_rank",
        "resumed_from_step"}


def _taken(columns) -> set[str]:
    return set(columns) | set(BOOKKEEPING) | set(IDENTITY) | set(RUN)


def metric_columns(cfg, names) -> set[str]:
    """The columns metrics called `names` take in a row of a run of `cfg` (see trial_row)."""
    taken = _taken(config_columns(cfg))
    return {f"final_{n}" if n in taken and n not in _OWN else n for n in names}


def trial_row(cfg, result: dict, searched: dict | None = None) -> dict[str, Any]:
    """A trial's row: the config's columns, then `result` (trial_id, status, error, objective
    and the metrics of raypo.train.run.run_trial), a metric whose name a column already has
    stored as `final_<name>`."""
    row = config_columns(cfg)
    taken = _taken(row)
    for key, value in result.items():
        row[f"final_{key}" if key in taken and key not in _OWN else key] = value
    if searched is not None:
        row["searched"] = json.dumps(searched, sort_keys=True, default=str)
    return row


def searched_values(row) -> dict[str, Any]:
    """The searched values a row was trained with ({} for a row without them)."""
    text = row.get("searched") if hasattr(row, "get") else None
    if not isinstance(text, str):
        return {}
    return json.loads(text)


def is_parameter(column: str, loss_names=None) -> bool:
    """Whether `column` is a hyperparameter column (identity, loss, schedule or run), not a
    metric or bookkeeping."""
    if column in NOT_PARAMETERS:
        return False
    if column in IDENTITY or column in RUN or column == SCHEDULE:
        return True
    head = column.split(".", 1)[0]
    return "." in column and (head in (loss_names or LOSSES) or head in (SCHEDULE, "task"))


def describe(row) -> str:
    """A row's variant in words: `kernel_dpo (kernel polynomial, divergence kl)`."""
    parts = [f"{key} {row[key]}" for key in IDENTITY[2:]
             if key in row and isinstance(row[key], str)]
    return f"{row['loss']} ({', '.join(parts)})" if parts else str(row["loss"])


def distinct_labels(rows: list, searched: list[dict]) -> list[str]:
    """`describe` of each row, and where two rows would read the same, the searched values
    that set them apart (`kernel_dpo (kernel polynomial, divergence kl) [kernel_dpo.beta
    0.12, lr 0.0031]`): finalists that differ only in beta and learning rate are told apart.
    `searched`: each row's searched values by parameter name."""
    labels = [describe(row) for row in rows]
    out = list(labels)
    for label in set(labels):
        group = [i for i, other in enumerate(labels) if other == label]
        if len(group) < 2:
            continue
        keys = [k for k in dict.fromkeys(k for i in group for k in searched[i])
                if len({repr(searched[i].get(k)) for i in group}) > 1]
        for i in group:
            parts = ", ".join(f"{k} {_short(searched[i].get(k))}" for k in keys)
            out[i] = f"{label} [{parts}]" if parts else label
    return out


def _short(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)

