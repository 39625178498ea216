"""A search and then its confirmation stage: the one module that knows both, so that neither
imports the other (raypo.search.run trains the search's trials, raypo.search.confirm the
finalists' seeds; both build their Tune runs through raypo.search.tuning)."""

from __future__ import annotations

import sys

from raypo.search.confirm import run_confirmation
from raypo.search.interrupt import Interrupts
from raypo.search.run import run_search
from raypo.search.settings import Confirm
from raypo.search.space import SearchSpace


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def search_and_confirm(space: SearchSpace, *, reports="reports", address: str | None = None,
                       resume: bool = False, confirm: bool | None = None, log=_log):
    """Run (or resume) the search, then its confirmation stage when the space has one (or
    `confirm` is True; False skips it) and the search finished; returns the report folder.
    A signal during either stops both (raypo.search.interrupt)."""
    with Interrupts() as interrupts:
        directory, finished = run_search(space, reports=reports, address=address,
                                         resume=resume, log=log, interrupts=interrupts)
        settings = space.settings.confirm
        if confirm is None:
            confirm = settings is not None
        if confirm and finished:
            run_confirmation(space, directory, settings or Confirm(), address=address,
                             log=log, interrupts=interrupts)
        elif confirm:
            log(f"confirmation not started: the search is incomplete; after --resume, or on "
                f"what finished: raypo confirm {directory}")
    return directory
