"""Whether a report is whole: what `raypo select` and the HTML page say of an incomplete one
(interrupted, stopped by its time limit, or still running or killed), and how to go on."""

from __future__ import annotations

import pandas as pd

from raypo.reports.tables import Report


def incomplete_note(report: Report) -> str | None:
    """One line saying the search is incomplete, or None if it finished (or is not a
    search)."""
    meta = report.meta
    status = meta.get("status")
    if meta.get("kind", "search") != "search" or status in (None, "finished"):
        return None
    trials = report.trials
    interrupted = int((trials.get("status", pd.Series(dtype=object)) == "interrupted").sum())
    planned = (meta.get("settings") or {}).get("budget", {}).get("trials")
    ended = len(trials) - interrupted
    why = (f"interrupted by {meta['interrupted_by']}" if meta.get("interrupted_by")
           else "still running, or stopped without saying so" if status == "running"
           else status)
    parts = [f"this search is incomplete ({why}): {ended} of {planned or '?'} trials ended"]
    if interrupted:
        parts.append(f"{interrupted} interrupted")
    if meta.get("resume"):
        parts.append(f"continue with: {meta['resume']}")
    return "; ".join(parts)
