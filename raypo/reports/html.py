"""One self-contained HTML page for a report: `raypo report reports/<name>`.

The page reads without a network: every figure is an inline SVG drawn by matplotlib, the style
sheet is inline, and nothing is loaded from elsewhere. Sections, top to bottom:

- summary: search name, objective(s), trials by status, the best trial and its hyperparameters;
- the confirmation over seeds: each finalist against the baseline, paired by seed, with the
  intervals and the verdict (or a note that none has run);
- the kernel x divergence heatmap of the objective (mean per cell over the trials at the
  common step, Report.at_common_step: the finished trials and the pruned ones, compared at the
  highest step all of them reached; the number of trials, how many were pruned, and the
  selection rule's predicted rank in each cell);
- the objective over trials (by trial number) with the best-so-far line;
- the true-reward-vs-KL frontier of the built-in task, Pareto front highlighted;
- parameter importances from Optuna (raypo.reports.importances);
- the ten best trials, and the failed ones with their errors.

Every number drawn comes from Report's queries (raypo.reports.tables); this module draws.
matplotlib is imported when a page is drawn, never when raypo is: figures are `Figure` objects
rendered straight to SVG, so no pyplot, no GUI backend and no global state is touched (the
way matplotlib recommends for web servers).
"""

from __future__ import annotations

import html
import io
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd

from raypo.files import atomic_write
from raypo.reports.importances import importances, missing, target_quantile
from raypo.reports.schema import metric_bounds
from raypo.reports.status import incomplete_note
from raypo.reports.tables import Report, by_number, common_step_note

# Shown beside the objective in the best-trials table, when present.
TABLE_METRICS = ("true_reward", "kl", "pref_accuracy", "reward_margin", "tokens_per_s", "wall_s")
TOP = 10
TEXT_COLOR = "#222222"
ACCENT = "#1f77b4"
BEST = "#d62728"


# --- what the report says about itself ----------------------------------------------------

FRONTIER = [{"metric": "true_reward", "mode": "max"}, {"metric": "kl", "mode": "min"}]


def objective_label(report: Report) -> str:
    return ", ".join(f"{o['metric']} ({o['mode']})" for o in report.objectives)


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
    pairs = report.pairs()  # finished and pruned trials, at one step
    if pairs.empty:
        return note("No kernel trials: no trial with a value has a kernel, so there is no "
                    "kernel x divergence heatmap." + (" The selection rule's ranking is in "
                    "selection.parquet." if report.predicted_ranks() else ""))
    ranks = report.predicted_ranks()  # every pair the rule ranked, tried or not
    cells = {(k, d): (mean, count, pruned) for k, d, mean, count, pruned in zip(
        pairs["kernel"].astype(str), pairs["divergence"].astype(str), pairs["objective"],
        pairs["trials"], pairs["pruned"], strict=True)}
    kernels = list(dict.fromkeys([*sorted({k for k, _ in ranks}),
                                  *sorted({k for k, _ in cells})]))
    divergences = list(dict.fromkeys([*sorted({d for _, d in ranks}),
                                      *sorted({d for _, d in cells})]))
    values = np.full((len(kernels), len(divergences)), np.nan)
    for (k, d), (mean, _, _) in cells.items():
        values[kernels.index(k), divergences.index(d)] = mean

    import matplotlib as mpl

    mode = report.objective["mode"]
    fig = _figure(max(6.0, 1.1 * len(divergences) + 2.5), max(3.0, 0.8 * len(kernels) + 1.5))
    ax = fig.add_subplot()
    cmap = mpl.colormaps["viridis"].with_extremes(bad="#eeeeee")
    image = ax.imshow(np.ma.masked_invalid(values), aspect="auto",
                      cmap=cmap.reversed() if mode == "min" else cmap)
    finite = values[np.isfinite(values)]
    lo, hi = (finite.min(), finite.max()) if finite.size else (0.0, 1.0)
    for i, k in enumerate(kernels):
        for j, d in enumerate(divergences):
            lines = _cell_lines(cells.get((k, d)), ranks.get((k, d)))
            if lines:
                ax.text(j, i, "\n".join(lines), ha="center", va="center", fontsize=8,
                        color="white" if _dark(values[i, j], lo, hi, mode) else TEXT_COLOR)
    ax.set_xticks(range(len(divergences)), divergences, rotation=30, ha="right")
    ax.set_yticks(range(len(kernels)), kernels)
    ax.set_xlabel("divergence")
    ax.set_ylabel("kernel")
    fig.colorbar(image, ax=ax, label=f"mean objective ({mode} is better)")
    caption = ("Mean objective of the trials in each kernel-divergence cell; n is the number "
               "of trials, of which the pruned ones (stopped early by the scheduler) are "
               "counted in brackets")
    caption += (", rank the selection rule's predicted rank (1 = tried first); grey cells "
                "were not tried." if ranks else ".")
    caption += f" Values: {common_step_note(pairs, 'counted per cell')}."
    return f"<figure>{svg(fig)}<figcaption>{esc(caption)}</figcaption></figure>"


def _cell_lines(cell, rank) -> list[str]:
    """A heatmap cell's text: its mean, trial count (pruned ones in brackets) and rank."""
    lines = []
    if cell is not None:
        mean, count, pruned = cell
        lines += [f"{mean:.3g}", f"n={int(count)}" + (f" ({int(pruned)} pruned)" if pruned
                                                      else "")]
    if rank is not None and not (isinstance(rank, float) and math.isnan(rank)):
        rank = float(rank)
        lines.append(f"rank {int(rank)}" if rank.is_integer() else f"rank {rank:.3g}")
    return lines


def _dark(value: float, lo: float, hi: float, mode: str) -> bool:
    """Whether a cell's colour is dark enough for white text (viridis: dark at its low end,
    reversed for a minimised objective)."""
    if not np.isfinite(value):
        return False
    if hi == lo:
        return True
    share = (value - lo) / (hi - lo)
    return share > 0.45 if mode == "min" else share < 0.55


def progress_section(report: Report) -> str:
    trials = by_number(report.trials)
    ok = report.finished()
    if ok.empty:
        return note("No finished trial with an objective yet.")
    position = (trials["number"] if "number" in trials and trials["number"].notna().all()
                else pd.Series(range(len(trials)), index=trials.index))
    fig = _figure(8.0, 3.6)
    ax = fig.add_subplot()
    x = position.loc[ok.index].astype(float).to_numpy()
    y = ok["objective"].to_numpy()
    ax.scatter(x, y, s=22, color=ACCENT, label="finished trial", zorder=3)
    maximise = report.objective["mode"] == "max"
    best = np.maximum.accumulate(y) if maximise else np.minimum.accumulate(y)
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


def frontier_section(report: Report) -> str:
    if "true_reward" not in report.trials or "kl" not in report.trials:
        return note("No true_reward column: this search did not run on the built-in task, "
                    "so there is no true-reward-vs-KL frontier.")
    points = report.measured(["true_reward", "kl"])
    if points.empty:
        return note("No finished trial has both true_reward and kl.")
    front = points.loc[report.pareto(FRONTIER).index].sort_values(
        ["kl", "true_reward"], ascending=[True, False], kind="stable")
    fig = _figure(7.0, 4.2)
    ax = fig.add_subplot()
    ax.scatter(points["kl"], points["true_reward"], s=22, color="#9ecae1",
               label="finished trial", zorder=2)
    ax.plot(front["kl"], front["true_reward"], "-o", color=BEST, markersize=5, linewidth=1.4,
            label="Pareto front", zorder=3)
    finished = report.measured([])
    ref = pd.to_numeric(finished.get("ref_true_reward", pd.Series(dtype=float)),
                        errors="coerce")
    if ref.notna().any():
        ax.axhline(ref.mean(), color="#555555", linestyle="--", linewidth=1,
                   label="reference policy")
    ax.set_xlabel("KL(policy || reference)")
    ax.set_ylabel("true reward")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    ids = ", ".join(front["trial_id"].astype(str))
    return (f"<figure>{svg(fig)}<figcaption>True reward of what each finished policy "
            f"generates against its KL to the reference (the DPO paper's frontier); on the "
            f"front: {esc(ids)}.</figcaption></figure>")


# --- parameter importances ----------------------------------------------------------------

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
    n = len(report.finished())
    return (f"<figure>{svg(fig)}<figcaption>How much of the objective's variation each "
            f"searched parameter explains: optuna.importance.get_param_importances "
            f"(PED-ANOVA, best {target_quantile(n):.0%} of the {n} finished trials against "
            f"all of them).</figcaption></figure>" + table(rows, "importances"))


# --- tables -------------------------------------------------------------------------------

def best_section(report: Report) -> str:
    best = report.ranked().head(TOP)
    if best.empty:
        return note("No finished trial yet.")
    params = report.varied_parameters() or [
        c for c in report.hyperparameter_columns() if c in best][:6]
    metrics = [m for m in TABLE_METRICS if m in best and m != "objective"]
    shown = best[["trial_id", "objective", *params, *metrics]].copy()
    shown.insert(0, "rank", range(1, len(shown) + 1))
    return table(shown, "best")


def failed_section(report: Report) -> str:
    trials = report.trials
    if "status" not in trials:
        return ""
    failed = by_number(trials[trials["status"] == "failed"])
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
    best = report.ranked()
    body = ""
    if best.empty:
        items.append(("best", "no finished trial"))
    else:
        top = best.iloc[0]
        items.append(("best objective", f"{fmt(top['objective'])} (trial {top['trial_id']})"))
        params = [c for c in report.hyperparameter_columns() if c in top and not missing(top[c])]
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
