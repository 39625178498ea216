"""What a run checks of its report folder before any work (under the folder's lock,
raypo.reports.lock): it can write there, and the folder is its kind's. So a read-only folder,
a damaged table or a search's report fails in a second, not after a training run, and a
training run never writes into a search's report."""

from __future__ import annotations

from pathlib import Path

from raypo.errors import RaypoError
from raypo.reports.tables import read_meta
from raypo.reports.writer import ReportWriter, check_writable, read_table


class ReportFolderError(RaypoError, ValueError):
    """A report folder this run must not or cannot write; the message says which and why."""


def _meta(folder: Path) -> dict:
    try:
        return read_meta(folder / "search.json")
    except ValueError as e:
        raise ReportFolderError(str(e)) from None


def _tables(folder: Path) -> None:
    for name in ("trials.parquet", "steps.parquet"):
        try:
            read_table(folder / name)
        except ValueError as e:
            raise ReportFolderError(str(e)) from None


def train_folder(folder: Path, name: str) -> ReportWriter:
    """The writer of a training run's report in `folder` (the run's own earlier report is
    replaced row by row); ReportFolderError for another kind's report or a damaged one."""
    check_writable(folder)
    kind = _meta(folder).get("kind")
    if kind not in (None, "train"):
        raise ReportFolderError(f"{folder}: the report of a {kind} (search.json); raypo train "
                                "never writes into it; choose another name (--name)")
    try:
        writer = ReportWriter(folder, search=name)
    except ValueError as e:
        raise ReportFolderError(str(e)) from None
    ids = set(writer.trials.get("trial_id", []))
    if ids - {"train"}:
        raise ReportFolderError(f"{folder}/trials.parquet: holds trials of another run "
                                f"({len(ids - {'train'})} not from raypo train); choose another "
                                "name (--name)")
    return writer


def search_folder(folder: Path, resume: bool) -> None:
    """A search may write `folder`: writable, not a training run's report, its tables and
    search.json readable (a resume reads them back)."""
    check_writable(folder)
    kind = _meta(folder).get("kind")
    if kind not in (None, "search"):
        raise ReportFolderError(f"{folder}: the report of a {kind} run (search.json); choose "
                                "another name (--name)")
    if resume:
        _tables(folder)
