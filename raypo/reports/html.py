"""One self-contained HTML page for a report: `raypo report reports/<name>`.

The page reads without a network: every figure is an inline SVG drawn by matplotlib, the style
sheet is inline, and nothing is loaded from elsewhere. Sections, top to bottom:

- summary: search name, objective(s), trials by status, the best trial and its hyperparameters;
- the kernel x divergence heatmap of the objective (mean per cell over the trials at the
  common step, Report.at_common_step: the finished trials and the pruned ones, compared at the
  highest step all of them reached; the number of trials, how many were pruned, and the
  selection rule's predicted rank in each cell);
- the objective over trials (by trial number) with the best-so-far line;
- the true-reward-vs-KL frontier of the built-in task, Pareto front highlighted;
- parameter importances from Optuna, on an in-memory study rebuilt from the trials table;
- the ten best trials, and the failed ones with their errors.

matplotlib is imported when a page is drawn, never when raypo is: figures are `Figure` objects
rendered straight to SVG, so no pyplot, no GUI backend and no global state is touched (the
way matplotlib recommends for web servers).
"""

from __future__ import annotations

import html
import io
import math
import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from raypo.files import atomic_write
from raypo.reports.schema import NOT_PARAMETERS, is_parameter, metric_bounds
from raypo.reports.status import incomplete_note
from raypo.reports.tables import Report, common_step_note

# Shown beside the objective in the best-trials table, when present.
TABLE_METRICS = ("true_reward", "kl", "pref_accuracy", "reward_margin", "tokens_per_s", "wall_s")
TOP = 10
TEXT_COLOR = "#222222"
ACCENT = "#1f77b4"
BEST = "#d62728"


# --- what the report says about itself ----------------------------------------------------

def objective_mode(report: Report) -> str:
    """"max" or "min": the first objective's mode in search.json (max when absent)."""
    objectives = report.meta.get("objectives") or []
    mode = objectives[0].get("mode", "max") if objectives else "max"
    return "min" if str(mode).lower() == "min" else "max"


def objective_label(report: Report) -> str:
    objectives = report.meta.get("objectives") or []
    if not objectives:
        return f"objective ({objective_mode(report)})"
    return ", ".join(f"{o.get('metric', '?')} ({o.get('mode', 'max')})" for o in objectives)


def hyperparameter_columns(report: Report) -> list[str]:
    """The trials table's hyperparameter columns: the searched parameters named in search.json
    (each is its own column, raypo.reports.schema), else every parameter column of the
    schema; never the seed, which is noise to average over, not a parameter."""
    trials = report.trials
    named = [p for p in report.meta.get("params") or [] if p in trials.columns
             and p not in NOT_PARAMETERS]
    if named:
        return named
    return [c for c in trials.columns if is_parameter(c)]


def varying(frame: pd.DataFrame, columns: list[str]) -> list[str]:
    """The columns that take more than one value (missing counts as a value) in `frame`."""
    return [c for c in columns if c in frame
            and frame[c].astype(object).where(frame[c].notna(), None).map(repr).nunique() > 1]


def finished(report: Report) -> pd.DataFrame:
    """The ok trials with a finite objective, in the order they started."""
    trials = report.trials
    if trials.empty or "status" not in trials or "objective" not in trials:
        return trials.iloc[0:0]
    ok = trials[(trials["status"] == "ok")
                & pd.to_numeric(trials["objective"], errors="coerce").notna()].copy()
    ok["objective"] = ok["objective"].astype(float)
    return _by_number(ok)


def _by_number(frame: pd.DataFrame) -> pd.DataFrame:
    if "number" in frame and frame["number"].notna().all():
        return frame.sort_values("number", kind="stable")
    return frame


def ranked(report: Report) -> pd.DataFrame:
    """Finished trials, best first by the objective's mode."""
    return finished(report).sort_values("objective", ascending=objective_mode(report) == "min",
                                        kind="stable")


# --- formatting ---------------------------------------------------------------------------

def esc(value) -> str:
    return html.escape(str(value), quote=True)


def fmt(value) -> str:
    """A cell's text: numbers to 4 significant digits, missing as an empty cell."""
    if value is None:
        return ""
    if isinstance(value, bool | np.bool_):
        return str(bool(value))
    if isinstance(value, int | np.integer):
        return str(int(value))
    if isinstance(value, float | np.floating):
        if math.isnan(value):
            return ""
        return f"{value:.4g}"
    return str(value)


def note(text: str) -> str:
    return f'<p class="note">{esc(text)}</p>'


def table(frame: pd.DataFrame, classes: str = "") -> str:
    head = "".join(f"<th>{esc(c)}</th>" for c in frame.columns)
    rows = "".join("<tr>" + "".join(f"<td>{esc(fmt(v))}</td>" for v in row) + "</tr>"
                   for row in frame.itertuples(index=False))
    return (f'<div class="scroll"><table class="{esc(classes)}"><thead><tr>{head}</tr></thead>'
            f"<tbody>{rows}</tbody></table></div>")


# --- figures ------------------------------------------------------------------------------

def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def svg(fig) -> str:
    """The figure as an inline <svg> element: no XML prolog, no DOCTYPE, no metadata (their
    URLs are namespaces, not loads, but a self-contained page has no use for them)."""
    from matplotlib import rc_context

    buffer = io.StringIO()
    # text as <text> (small, selectable, searchable) rather than glyph paths
    with rc_context({"svg.fonttype": "none", "font.family": "sans-serif"}):
        fig.savefig(buffer, format="svg", metadata={"Date": None})
    text = buffer.getvalue()
    text = text[text.index("<svg"):]
    text = re.sub(r"<metadata>.*?</metadata>", "", text, flags=re.S)
    return text


def heatmap_section(report: Report) -> str:
    common = report.at_common_step()  # finished and pruned trials, at one step
    selection = report.selection
    has_selection = not selection.empty and {"kernel", "divergence", "predicted_rank"} <= set(
        selection.columns)
    kernel_trials = common[common["kernel"].notna()] if "kernel" in common else common.iloc[0:0]
    if kernel_trials.empty:
        return note("No kernel trials: no trial with a value has a kernel, so there is no "
                    "kernel x divergence heatmap." + (" The selection rule's ranking is in "
                    "selection.parquet." if has_selection else ""))

    def label(value) -> str:
        return "none" if value is None or (isinstance(value, float) and math.isnan(value)) \
            else str(value)

    cells = kernel_trials.assign(
        _k=kernel_trials["kernel"].map(label),
        _d=(kernel_trials["divergence"] if "divergence" in kernel_trials
            else pd.Series(None, index=kernel_trials.index, dtype=object)).map(label),
        _pruned=kernel_trials["status"] == "pruned")
    stats = cells.groupby(["_k", "_d"]).agg(mean=("value", "mean"), count=("value", "size"),
                                            pruned=("_pruned", "sum"))
    ranks: dict[tuple[str, str], float] = {}
    if has_selection:
        for row in selection.itertuples(index=False):
            ranks[(label(row.kernel), label(row.divergence))] = row.predicted_rank
    elif "predicted_rank" in cells:
        for (k, d), rank in cells.groupby(["_k", "_d"])["predicted_rank"].first().items():
            ranks[(k, d)] = rank
    kernels = list(dict.fromkeys([*sorted({k for k, _ in ranks}), *sorted(cells["_k"].unique())]))
    divergences = list(dict.fromkeys([*sorted({d for _, d in ranks}),
                                      *sorted(cells["_d"].unique())]))

    values = np.full((len(kernels), len(divergences)), np.nan)
    for (k, d), row in stats.iterrows():
        values[kernels.index(k), divergences.index(d)] = row["mean"]

    import matplotlib as mpl

    fig = _figure(max(6.0, 1.1 * len(divergences) + 2.5), max(3.0, 0.8 * len(kernels) + 1.5))
    ax = fig.add_subplot()
    cmap = mpl.colormaps["viridis"].with_extremes(bad="#eeeeee")
    if objective_mode(report) == "min":
        cmap = cmap.reversed()
    image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, aspect="auto")
    finite = values[np.isfinite(values)]
    lo, hi = (finite.min(), finite.max()) if finite.size else (0.0, 1.0)
    for i, k in enumerate(kernels):
        for j, d in enumerate(divergences):
            lines = []
            if (k, d) in stats.index:
                mean, count, pruned = stats.loc[(k, d), ["mean", "count", "pruned"]]
                lines += [f"{mean:.3g}", f"n={int(count)}"
                          + (f" ({int(pruned)} pruned)" if pruned else "")]
            rank = ranks.get((k, d))
            if rank is not None and not (isinstance(rank, float) and math.isnan(rank)):
                rank = float(rank)
                lines.append(f"rank {int(rank)}" if rank.is_integer() else f"rank {rank:.3g}")
            if not lines:
                continue
            value = values[i, j]
            dark = np.isfinite(value) and hi > lo and (value - lo) / (hi - lo) < 0.55
            if objective_mode(report) == "min":
                dark = np.isfinite(value) and hi > lo and (value - lo) / (hi - lo) > 0.45
            if np.isfinite(value) and hi == lo:
                dark = True
            ax.text(j, i, "\n".join(lines), ha="center", va="center", fontsize=8,
                    color="white" if dark else TEXT_COLOR)
    ax.set_xticks(range(len(divergences)), divergences, rotation=30, ha="right")
    ax.set_yticks(range(len(kernels)), kernels)
    ax.set_xlabel("divergence")
    ax.set_ylabel("kernel")
    fig.colorbar(image, ax=ax, label=f"mean objective ({objective_mode(report)} is better)")
    caption = ("Mean objective of the trials in each kernel-divergence cell; n is the number "
               "of trials, of which the pruned ones (stopped early by the scheduler) are "
               "counted in brackets")
    caption += (", rank the selection rule's predicted rank (1 = tried first); grey cells "
                "were not tried." if ranks else ".")
    caption += f" Values: {common_step_note(common, 'counted per cell')}."
    return f"<figure>{svg(fig)}<figcaption>{esc(caption)}</figcaption></figure>"


def progress_section(report: Report) -> str:
    trials = _by_number(report.trials)
    ok = finished(report)
    if ok.empty:
        return note("No finished trial with an objective yet.")
    position = (trials["number"] if "number" in trials and trials["number"].notna().all()
                else pd.Series(range(len(trials)), index=trials.index))
    fig = _figure(8.0, 3.6)
    ax = fig.add_subplot()
    x = position.loc[ok.index].astype(float).to_numpy()
    y = ok["objective"].to_numpy()
    ax.scatter(x, y, s=22, color=ACCENT, label="finished trial", zorder=3)
    best = np.maximum.accumulate(y) if objective_mode(report) == "max" else np.minimum.accumulate(y)
    ax.step(x, best, where="post", color=BEST, linewidth=1.6, label="best so far", zorder=2)
    for status, marker, color in (("pruned", "o", "#999999"), ("failed", "x", BEST)):
        rows = trials[trials["status"] == status] if "status" in trials else trials.iloc[0:0]
        if rows.empty:
            continue
        ys = pd.to_numeric(rows["objective"], errors="coerce")
        if status == "pruned" and ys.notna().any():
            ax.scatter(position.loc[rows.index][ys.notna()], ys[ys.notna()], s=22,
                       facecolors="none", edgecolors=color, label="pruned (last value)")
        else:  # no value: a mark along the bottom edge
            ax.scatter(position.loc[rows.index], np.full(len(rows), 0.03), marker=marker,
                       color=color, s=28, label=status, transform=ax.get_xaxis_transform())
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if np.ptp(position.to_numpy(dtype=float)) < 2:  # a trial or two: whole numbers, not 0.015
        ax.set_xlim(position.min() - 1, position.max() + 1)
    ax.set_xlabel("trial number (order started)")
    ax.set_ylabel("objective")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return (f"<figure>{svg(fig)}<figcaption>Each trial's objective in the order trials "
            f"started; the line is the best value found so far. Failed trials (no value) "
            f"are marked along the bottom edge.</figcaption></figure>")


def pareto_front(kl: np.ndarray, reward: np.ndarray) -> np.ndarray:
    """Indices of the points no other point beats on both (lower KL, higher true reward),
    ordered by KL."""
    order = np.lexsort((-reward, kl))
    front, best = [], -np.inf
    for i in order:
        if reward[i] > best:
            front.append(i)
            best = reward[i]
    return np.array(front, dtype=int)


def frontier_section(report: Report) -> str:
    ok = report.trials[report.trials["status"] == "ok"] if "status" in report.trials \
        else report.trials.iloc[0:0]
    if "true_reward" not in ok or "kl" not in ok:
        return note("No true_reward column: this search did not run on the built-in task, "
                    "so there is no true-reward-vs-KL frontier.")
    points = ok[["trial_id"]].assign(
        true_reward=pd.to_numeric(ok["true_reward"], errors="coerce"),
        kl=pd.to_numeric(ok["kl"], errors="coerce")).dropna(subset=["true_reward", "kl"])
    if points.empty:
        return note("No finished trial has both true_reward and kl.")
    kl = points["kl"].astype(float).to_numpy()
    reward = points["true_reward"].astype(float).to_numpy()
    front = pareto_front(kl, reward)
    fig = _figure(7.0, 4.2)
    ax = fig.add_subplot()
    ax.scatter(kl, reward, s=22, color="#9ecae1", label="finished trial", zorder=2)
    ax.plot(kl[front], reward[front], "-o", color=BEST, markersize=5, linewidth=1.4,
            label="Pareto front", zorder=3)
    ref = pd.to_numeric(ok.get("ref_true_reward", pd.Series(dtype=float)), errors="coerce")
    if ref.notna().any():
        ax.axhline(ref.mean(), color="#555555", linestyle="--", linewidth=1,
                   label="reference policy")
    ax.set_xlabel("KL(policy || reference)")
    ax.set_ylabel("true reward")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    ids = ", ".join(points["trial_id"].astype(str).iloc[front])
    return (f"<figure>{svg(fig)}<figcaption>True reward of what each finished policy "
            f"generates against its KL to the reference (the DPO paper's frontier); on the "
            f"front: {esc(ids)}.</figcaption></figure>")


# --- parameter importances ----------------------------------------------------------------

def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA


def distributions_of(frame: pd.DataFrame, columns: list[str]) -> dict:
    """An Optuna distribution per column, from the values observed: floats -> Float (log when
    all positive and spanning more than two decades), ints -> Int, anything else ->
    Categorical (missing strings are the choice None)."""
    from optuna.distributions import (
        CategoricalDistribution,
        FloatDistribution,
        IntDistribution,
    )

    out = {}
    for column in columns:
        series = frame[column]
        present = series.dropna()
        if pd.api.types.is_bool_dtype(series) or not pd.api.types.is_numeric_dtype(series):
            choices = [None if _missing(v) else (v.item() if hasattr(v, "item") else v)
                       for v in series.astype(object)]
            out[column] = CategoricalDistribution(list(dict.fromkeys(choices)))
        elif present.empty:
            continue
        elif pd.api.types.is_integer_dtype(series):
            out[column] = IntDistribution(int(present.min()), int(present.max()))
        else:
            lo, hi = float(present.min()), float(present.max())
            out[column] = FloatDistribution(lo, hi, log=lo > 0 and hi / lo > 100)
    return out


def target_quantile(n: int) -> float:
    """PED-ANOVA's "good trials" share: Optuna's default 0.1 when there are 50 trials or more,
    else enough for five good trials (at most half). With the default 10% of a 16-trial
    search, PED-ANOVA compares one or two trials with the rest, and a noise parameter can
    come out first; five good trials rank the parameter that sets the objective first."""
    return min(0.5, max(0.1, 5 / max(n, 1)))


def min_trials_for_importances(searched: int) -> int:
    """The finished trials below which importances are not shown: max(8, 2 x the searched
    parameters). PED-ANOVA compares the best quantile with the rest; from two trials it
    gives 0.5 and 0.5 to two parameters whatever they do."""
    return max(8, 2 * searched)


def importances(report: Report) -> dict[str, float] | str:
    """Optuna's parameter importances on the finished trials, or the reason there are none.
    The evaluator is Optuna's default, PED-ANOVA, which (unlike fANOVA) also ranks conditional
    parameters (a `gamma` only some losses have), with its quantile sized to the search."""
    ok = finished(report)
    searched = hyperparameter_columns(report)
    need = min_trials_for_importances(len(searched))
    if len(ok) < need:
        return (f"Parameter importances need at least {need} finished trials (8, or two per "
                f"searched parameter: {len(searched)} here); this search has {len(ok)}. With "
                "fewer, one or two trials decide them, and the numbers would look like "
                "evidence that they are not.")
    columns = varying(ok, searched)
    if not columns:
        return "No hyperparameter varied across the finished trials: nothing to rank."
    import optuna

    distributions = distributions_of(ok, columns)
    direction = "minimize" if objective_mode(report) == "min" else "maximize"
    trials = []
    for _, row in ok.iterrows():
        params, dists = {}, {}
        for column, dist in distributions.items():
            value = row[column]
            if isinstance(dist, optuna.distributions.CategoricalDistribution):
                params[column] = None if _missing(value) else (
                    value.item() if hasattr(value, "item") else value)
            elif _missing(value):
                continue  # a conditional parameter this trial did not have
            else:
                is_int = isinstance(dist, optuna.distributions.IntDistribution)
                params[column] = int(value) if is_int else float(value)
            dists[column] = dist
        trials.append(optuna.trial.create_trial(state=optuna.trial.TrialState.COMPLETE,
                                                value=float(row["objective"]), params=params,
                                                distributions=dists))
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.create_study(direction=direction)
        study.add_trials(trials)
        evaluator = optuna.importance.PedAnovaImportanceEvaluator(
            target_quantile=target_quantile(len(trials)))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return dict(optuna.importance.get_param_importances(study, evaluator=evaluator))
    except (ValueError, RuntimeError) as error:
        return f"Optuna could not compute importances: {error}"
    finally:
        optuna.logging.set_verbosity(verbosity)


def importance_section(report: Report) -> str:
    result = importances(report)
    if isinstance(result, str):
        return note(result)
    names = list(result)[::-1]
    values = [result[n] for n in names]
    fig = _figure(7.0, max(2.0, 0.45 * len(names) + 1.0))
    ax = fig.add_subplot()
    ax.barh(names, values, color=ACCENT)
    for i, v in enumerate(values):
        ax.text(v, i, f" {v:.2f}", va="center", fontsize=8, color=TEXT_COLOR)
    ax.set_xlabel("importance (sums to 1)")
    ax.set_xlim(0, max(values) * 1.15 if max(values) > 0 else 1)
    ax.grid(axis="x", alpha=0.3)
    rows = pd.DataFrame({"parameter": list(result), "importance": list(result.values())})
    return (f"<figure>{svg(fig)}<figcaption>How much of the objective's variation each "
            f"searched parameter explains: optuna.importance.get_param_importances "
            f"(PED-ANOVA, best {target_quantile(len(finished(report))):.0%} of the "
            f"{len(finished(report))} finished trials against all of them).</figcaption></figure>"
            + table(rows, "importances"))


# --- tables -------------------------------------------------------------------------------

def best_section(report: Report) -> str:
    best = ranked(report).head(TOP)
    if best.empty:
        return note("No finished trial yet.")
    params = varying(finished(report), hyperparameter_columns(report)) or [
        c for c in hyperparameter_columns(report) if c in best][:6]
    metrics = [m for m in TABLE_METRICS if m in best and m != "objective"]
    shown = best[["trial_id", "objective", *params, *metrics]].copy()
    shown.insert(0, "rank", range(1, len(shown) + 1))
    return table(shown, "best")


def failed_section(report: Report) -> str:
    trials = report.trials
    if "status" not in trials:
        return ""
    failed = _by_number(trials[trials["status"] == "failed"])
    if failed.empty:
        return ""
    errors = failed.get("error", pd.Series("", index=failed.index)).fillna("").astype(str)
    rows = pd.DataFrame({"trial_id": failed["trial_id"].astype(str),
                         "error": errors.map(lambda e: e if len(e) <= 400 else e[:400] + "...")})
    return "<h3>Failed trials</h3>" + table(rows.head(50), "failed")


def summary_section(report: Report) -> str:
    trials = report.trials
    counts = trials["status"].value_counts().to_dict() if "status" in trials else {}
    by_status = ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "none"
    items = [("search", report.meta.get("name") or _search_name(report)),
             ("status", report.status if report.status == "finished" else
              f"{report.status}: not every trial has run (raypo search --resume)"),
             ("report folder", str(report.path)),
             ("objective", objective_label(report)),
             ("trials", f"{len(trials)} ({by_status})")]
    best = ranked(report)
    body = ""
    if best.empty:
        items.append(("best", "no finished trial"))
    else:
        top = best.iloc[0]
        items.append(("best objective", f"{fmt(top['objective'])} (trial {top['trial_id']})"))
        params = [c for c in hyperparameter_columns(report) if c in top and not _missing(top[c])]
        body = ("<h3>Best trial's hyperparameters</h3>"
                + table(pd.DataFrame([{c: top[c] for c in params}]), "params"))
    versions = report.meta.get("versions") or {}
    if versions:
        items.append(("versions", ", ".join(f"{k} {v}" for k, v in versions.items())))
    dl = "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in items)
    return f"<dl>{dl}</dl>{body}"


def confirmation_section(report: Report) -> str:
    """Each finalist's mean objective with its 95% interval beside its baseline's, and the
    paired difference with its interval, from confirm_stats.parquet."""
    stats = report.confirmation()
    if stats.empty:
        return note("No confirmation has run: the trials above ran once each, under one seed, "
                    "so their order may be seed noise. `raypo confirm " + str(report.path)
                    + "` trains the best configurations and their baseline under several seeds.")
    metric = str(stats["metric"].iloc[0])
    baseline = str(stats["baseline"].iloc[0])
    fig = _figure(10.0, max(2.2, 0.7 * len(stats) + 1.2))
    left, right = fig.subplots(1, 2, sharey=True)
    y = np.arange(len(stats))[::-1].astype(float)
    for offset, prefix, color, label in ((0.15, "", BEST, "finalist"),
                                          (-0.15, "baseline_", "#7f7f7f", baseline)):
        mean = stats[f"{prefix}mean"].to_numpy(float)
        err = np.vstack([mean - stats[f"{prefix}ci_low"].to_numpy(float),
                         stats[f"{prefix}ci_high"].to_numpy(float) - mean])
        left.errorbar(mean, y + offset, xerr=np.nan_to_num(err), fmt="o", color=color,
                      capsize=3, label=label)
    left.set_yticks(y, [f"{r}. {lab}" for r, lab in zip(stats["rank"], stats["label"],
                                                         strict=True)])
    left.set_xlabel(f"{metric} (mean, 95% CI)")
    left.legend(fontsize=8)
    diff = stats["diff_mean"].to_numpy(float)
    err = np.vstack([diff - stats["diff_ci_low"].to_numpy(float),
                     stats["diff_ci_high"].to_numpy(float) - diff])
    right.errorbar(diff, y, xerr=np.nan_to_num(err), fmt="s", color=ACCENT, capsize=3)
    right.axvline(0.0, color="#999999", linewidth=1)
    right.set_xlabel(f"finalist - {baseline}, paired by seed (95% CI)")
    for ax in (left, right):
        ax.grid(axis="x", alpha=0.3)
    shown = stats[["rank", "label", "n", "mean", "ci_low", "ci_high", "baseline_mean",
                   "diff_mean", "diff_ci_low", "diff_ci_high", "p", "p_holm", "effect_size",
                   "beats_baseline"]]
    caption = (f"Each finalist against {baseline} (same settings but the loss), "
               f"{int(stats['seeds'].iloc[0])} seeds each; the paired t-test by seed, Holm's "
               "correction across finalists, d_z the paired effect size.")
    flags = [c for c in ("ci_clipped", "baseline_ci_clipped", "diff_ci_clipped")
             if c in stats]
    if flags and stats[flags].to_numpy(bool).any():
        low, high = metric_bounds(metric)
        caption += (f" {metric} lies in [{low:g}, {high:g}]: intervals that reached past it "
                    f"are clipped to it (a difference to [{low - high:g}, {high - low:g}]), "
                    "as the clipped columns say.")
        shown = stats[[*shown.columns, *flags]]
    return (f"<p><strong>{esc(report.verdict or '')}</strong></p><figure>{svg(fig)}"
            f"<figcaption>{esc(caption)}</figcaption></figure>" + table(shown, "confirmation"))


def _search_name(report: Report) -> str:
    if "search" in report.trials and len(report.trials):
        return str(report.trials["search"].iloc[0])
    return report.path.name


# --- the page -----------------------------------------------------------------------------

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; color: #222;
       max-width: 1100px; margin: 2em auto; padding: 0 1em; line-height: 1.45; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2em;
       margin-top: 2em; }
dl { display: grid; grid-template-columns: max-content auto; gap: 0.2em 1.2em; }
dt { font-weight: 600; } dd { margin: 0; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.8em 0; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #f4f4f4; } td { font-variant-numeric: tabular-nums; }
table.failed td:last-child { font-family: ui-monospace, monospace; white-space: pre-wrap;
       word-break: break-word; max-width: 60em; }
figure { margin: 1em 0; } figure svg { max-width: 100%; height: auto; }
figcaption { font-size: 0.85em; color: #555; }
.note { background: #f7f7f0; border-left: 4px solid #c9c27a; padding: 0.5em 0.8em; }
nav a { margin-right: 1em; }
.scroll { overflow-x: auto; max-width: 100%; }
"""

SECTIONS = (("summary", "Summary", summary_section),
            ("confirmation", "Confirmation over seeds", confirmation_section),
            ("heatmap", "Kernel x divergence", heatmap_section),
            ("progress", "Objective over trials", progress_section),
            ("frontier", "True reward vs KL", frontier_section),
            ("importance", "Parameter importances", importance_section),
            ("best", f"Best {TOP} trials", lambda r: best_section(r) + failed_section(r)))


def render_html(report: Report) -> str:
    """The report as one self-contained HTML page (a string)."""
    name = report.meta.get("name") or _search_name(report)
    nav = "".join(f'<a href="#{key}">{esc(title)}</a>' for key, title, _ in SECTIONS)
    body = "".join(f'<section id="{key}"><h2>{esc(title)}</h2>{render(report)}</section>'
                   for key, title, render in SECTIONS)
    if incomplete_note(report):  # half a search must not read as a whole one
        body = f'<p class="note incomplete">{esc(incomplete_note(report))}</p>' + body
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>raypo report: {esc(name)}</title><style>{STYLE}</style></head><body>"
            f"<h1>raypo report: {esc(name)}</h1><nav>{nav}</nav>{body}</body></html>\n")


def write_html(report: Report, out_path: str | Path) -> Path:
    """Render and write atomically (temporary file in the same folder, then rename)."""
    out_path = Path(out_path)
    page = render_html(report)
    atomic_write(out_path, lambda f: f.write(page))  # with the user's umask: shared pages
    return out_path
