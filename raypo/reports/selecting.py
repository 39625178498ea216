"""What `raypo select` says about a report: the chosen variant of a search and how sure it is.

`selection(rep, report, top)` is the object `raypo select --json` prints; `select_output` what
the command prints, as JSON or as lines. Every number comes from Report's queries: the pairs from
`Report.selected`, the trials from `Report.ranked(at_common_step=True)`, the model from the
best finished trial (`Report.ranked`) or the confirmation."""

from __future__ import annotations

import json
import math

from raypo.errors import RaypoError
from raypo.losses import DEFAULT_LOSS
from raypo.reports.schema import describe
from raypo.reports.status import incomplete_note
from raypo.reports.tables import Report, common_step_note

SINGLE_SEED = ("this ranking is single-seed: each trial ran once, across different settings, "
               "so its order may be seed noise; `raypo confirm REPORT` (or `confirm:` in the "
               f"space) tests the best against {DEFAULT_LOSS} over several seeds")


class NothingToSelect(RaypoError, ValueError):
    """A report without a finished trial (nor a pruned one with a value)."""


def number(value):
    """A JSON-safe value: numpy scalars as Python numbers (whole numbers as ints), NaN and
    missing as None."""
    if value is None or isinstance(value, str | bool):
        return value
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, bool | int):
        return value
    try:
        value = float(value)
    except (TypeError, ValueError):
        return value
    return None if math.isnan(value) else value


def select_output(rep: Report, report: str, top: int = 1,
                  as_json: bool = False) -> tuple[str, str | None]:
    """What `raypo select` prints for `rep` (read from `report`, as the user named it): its
    output (one JSON object, or lines) and the note it gives first, on stderr, when the search
    is incomplete (or None). NothingToSelect when there is nothing to choose from."""
    out, tried = _selection(rep, report, top)
    return (json.dumps(out) if as_json else _text(rep, out, tried)), out["incomplete"]


def selection(rep: Report, report: str, top: int = 1) -> dict:
    """The object `raypo select --json` prints (see `_selection`)."""
    return _selection(rep, report, top)[0]


def _selection(rep: Report, report: str, top: int) -> tuple[dict, int]:
    """The chosen variant of `rep` (read from `report`, as the user named it): the
    confirmation's finalists and verdict or, without one, the best `top` kernel-divergence
    pairs (`Report.selected`) and trials at the common step, the values' basis, and the kept
    model's path; and how many pairs were tried. NothingToSelect when there is nothing to
    choose from."""
    metric, mode = rep.objective["metric"], rep.objective["mode"]
    pairs = rep.selected(top)  # at the common step, pruned trials counted per pair
    best = rep.ranked(at_common_step=True).head(top)
    if pairs.empty and best.empty:
        raise NothingToSelect(f"{report}: no finished trial to choose from (nor a pruned one "
                              f"with a value); {len(rep.trials)} trials in the report")
    values = common_step_note(best, "counted per pair" if not pairs.empty else "marked p")
    stats = rep.confirmation()
    confirmed = not stats.empty
    a = best.attrs
    out = {
        "report": str(report), "status": rep.status, "incomplete": incomplete_note(rep),
        "metric": metric, "mode": mode,
        "single_seed": not confirmed,
        "values": {"basis": a["basis"], "step": a["step"], "pruned": a["pruned"],
                   "left_out": a["left_out"], "note": values},
        "pairs": [{"kernel": r.kernel, "divergence": r.divergence, "objective": r.objective,
                   "metric": metric, "std": number(r.std), "best": r.best,
                   "trials": int(r.trials), "pruned": int(r.pruned),
                   "predicted_rank": number(r.predicted_rank)}
                  for r in pairs.itertuples()],
        "best": [{"trial_id": row["trial_id"], "variant": describe(row),
                  "status": row["status"],
                  "step": None if math.isnan(row["step"]) else int(row["step"]),
                  "objective": number(row["value"])} for _, row in best.iterrows()],
        "confirmation": [{k: number(v) for k, v in row.items()}
                         for row in stats.to_dict("records")]
        if confirmed else None,
        "verdict": rep.verdict if confirmed else
        "single-seed ranking: no confirmation has run (raypo confirm REPORT)",
        "model_path": chosen_model(rep),
    }
    return out, pairs.attrs.get("tried", 0)


def chosen_model(rep: Report) -> str | None:
    """The kept model of what `select` recommends: the confirmation's (its best finalist's
    best seed) or, without one, the best finished trial's (a pruned trial keeps none); a path
    relative to the report folder."""
    confirmation = rep.meta.get("confirmation") or {}
    if confirmation:
        return confirmation.get("model_path")
    best = rep.ranked().head(1)
    path = best.iloc[0].get("model_path") if len(best) else None
    return path if isinstance(path, str) and path else None


def _text(rep: Report, out: dict, tried: int) -> str:
    """`raypo select`'s lines for `selection(rep, ...)`'s `out`."""
    metric = out["metric"]
    lines = [f"{rep.meta.get('name', out['report'])}: {len(rep.trials)} trials; objective "
             f"{metric} ({out['mode']})"]
    if out["incomplete"]:
        lines.append(f"warning: {out['incomplete']}")
    if not out["single_seed"]:
        return "\n".join([*lines, *_confirmation_lines(rep, metric), *_model_line(
            out, "the best finalist's best seed")])
    lines.append(f"values: {out['values']['note']}")
    if out["pairs"]:
        lines.append(f"{tried} kernel-divergence pairs tried:")
        lines += [_pair_line(i, r, metric) for i, r in enumerate(out["pairs"], 1)]
    else:
        for i, r in enumerate(out["best"], 1):
            mark = " p" if r["status"] == "pruned" else ""
            lines.append(f"{i}.{mark} {r['trial_id']} {r['variant']}: {metric} "
                         f"{r['objective']:.4f}")
    lines.append(SINGLE_SEED)
    return "\n".join([*lines, *_model_line(out, "the best finished trial")])


def _pair_line(i: int, r: dict, metric: str) -> str:
    spread = "" if r["std"] is None else f" ± {r['std']:.4f}"
    rank = "-" if r["predicted_rank"] is None else int(r["predicted_rank"])
    pruned = f", {r['pruned']} pruned" if r["pruned"] else ""
    return (f"{i}. kernel {r['kernel']}, divergence {r['divergence']}: "
            f"{metric} {r['objective']:.4f}{spread} (best {r['best']:.4f}, "
            f"{r['trials']} trial{'s' * (r['trials'] != 1)}{pruned}, "
            f"predicted rank {rank})")


def _confirmation_lines(rep: Report, metric: str) -> list[str]:
    stats = rep.confirmation()
    row0 = stats.iloc[0]
    lines = [f"confirmation: {len(stats)} finalist(s) against {row0['baseline']}, "
             f"{int(row0['seeds'])} seeds each, paired by seed (paired t-test, "
             "Holm-corrected across finalists)"]
    for r in stats.itertuples():
        lines.append(
            f"{r.rank}. {r.label}: {metric} {r.mean:.4f} (95% CI {r.ci_low:.4f} to "
            f"{r.ci_high:.4f}{_clipped(r, '')}, n {r.n}); {r.baseline} "
            f"{r.baseline_mean:.4f} (95% CI {r.baseline_ci_low:.4f} to "
            f"{r.baseline_ci_high:.4f}{_clipped(r, 'baseline_')}); difference "
            f"{r.diff_mean:+.4f} (95% CI {r.diff_ci_low:+.4f} to {r.diff_ci_high:+.4f}"
            f"{_clipped(r, 'diff_')}), Holm p {r.p_holm:.3g}, d_z {r.effect_size:.2f}")
    lines.append(f"verdict: {rep.verdict}")
    return lines


def _clipped(row, prefix: str) -> str:
    """", clipped to the metric's range" where the interval was (raypo.reports.stats)."""
    return ", clipped to the metric's range" if getattr(row, f"{prefix}ci_clipped",
                                                         False) else ""


def _model_line(out: dict, what: str) -> list[str]:
    path = out["model_path"]
    if not path:
        return []
    report = out["report"]
    return [f"model ({what}): {report.rstrip('/')}/{path}; copy it out with: raypo export "
            f"{report} DIR"]
