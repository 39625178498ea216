"""Ctrl-C (SIGINT) and SIGTERM, handled honestly.

    with Interrupts() as interrupts:          # a search or a training run
        ...                                   # a signal here raises Interrupted
        with interrupts.tuning():
            results = tuner.fit()             # a signal here stops Tune gracefully
        if interrupts.signum: ...             # record what did not finish, say so, exit 128+n

Outside `tuning()` a signal raises `Interrupted` (a KeyboardInterrupt, for SIGTERM too), so
`finally` blocks run: locks are released and nothing is half-written. Inside it the first
signal does what Tune's own Ctrl-C handler does: Tune saves its experiment state with the
running trials still running (so `--resume` runs them again), stops them and returns; the
driver then records those trials as `interrupted` (see `requested`) and search.json as
incomplete. A second signal raises `Interrupted` at once. Tune's SIGINT handler is turned off
(TUNE_DISABLE_SIGINT_HANDLER) so that SIGINT and SIGTERM take the same path; the graceful stop
goes through the SIGUSR1 handler Tune always installs for it.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import threading
from pathlib import Path

SIGNALS = (signal.SIGINT, signal.SIGTERM)
_requested: int | None = None  # the first signal of the running search, read by the recorder
_active: Interrupts | None = None  # the running search's, for stop_tuning


class Interrupted(KeyboardInterrupt):
    """A run stopped by a signal; `exit_code` is the shell's 128 + signal number."""

    def __init__(self, signum: int, message: str = ""):
        super().__init__(message or f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum
        self.exit_code = 128 + signum

    def __str__(self) -> str:
        return self.args[0]


def requested() -> int | None:
    """The signal that interrupted the running search (None if none): a trial that ends
    without its final report after it is `interrupted`, not pruned or failed."""
    return _requested


class Interrupts:
    def __init__(self):
        self.signum: int | None = None
        self.failure: Exception | None = None  # why stop_tuning stopped the fit
        self._old: dict = {}
        self._tune_handler_before = None
        self._in_tuning = False

    def __enter__(self) -> Interrupts:
        global _requested, _active
        _requested, _active = None, self
        if threading.current_thread() is threading.main_thread():
            self._old = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        global _requested, _active
        for s, handler in self._old.items():
            signal.signal(s, handler)
        self._old = {}
        _requested, _active = None, None

    def _tune_handler(self):
        """Tune's graceful-stop handler of the running fit, or None."""
        handler = signal.getsignal(signal.SIGUSR1) if hasattr(signal, "SIGUSR1") else None
        if self._in_tuning and callable(handler) and handler is not self._tune_handler_before:
            return handler
        return None

    def _handle(self, signum, frame) -> None:
        global _requested
        first = self.signum is None
        if first:
            self.signum = _requested = signum
        tune_handler = self._tune_handler()  # this fit's, not one left by an earlier fit
        if first and tune_handler is not None:
            tune_handler(signal.SIGUSR1, frame)
            return
        raise Interrupted(signum)

    @contextlib.contextmanager
    def tuning(self):
        """While Tune runs: the first signal stops it gracefully."""
        if self.signum is not None:
            raise Interrupted(self.signum)
        old_env = os.environ.get("TUNE_DISABLE_SIGINT_HANDLER")
        os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
        usr1 = hasattr(signal, "SIGUSR1")
        self._tune_handler_before = signal.getsignal(signal.SIGUSR1) if usr1 else None
        self._in_tuning = True
        try:
            yield self
        finally:
            self._in_tuning = False
            if usr1 and threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGUSR1, self._tune_handler_before or signal.SIG_DFL)
            if old_env is None:
                os.environ.pop("TUNE_DISABLE_SIGINT_HANDLER", None)
            else:
                os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = old_env


def stop_tuning(failure: Exception) -> bool:
    """Ask the running fit to stop as after Ctrl-C (its state saved, the running trials left
    to resume), for `failure` (kept as `Interrupts.failure`): what the recorder does when it
    cannot write the report. False outside a fit."""
    if _active is None:
        return False
    _active.failure = _active.failure or failure
    handler = _active._tune_handler()
    if handler is None:
        return False
    handler(signal.SIGUSR1, None)
    return True


def resume_command(space, reports: str | Path, address: str | None) -> str:
    """The command that continues this search (what search.json and the error print)."""
    args = ["raypo", "search", space.source, "--name", space.name, "--reports", str(reports),
            "--samples", str(space.settings.budget.trials)]
    for key in ("model", "data"):
        if space.fixed.get(key) is not None:
            args += [f"--{key}", str(space.fixed[key])]
    if address:
        args += ["--address", address]
    for name in space.settings.tracking.names:  # given by `--track`: the resume tracks too
        args += ["--track", name]
    return shlex.join([*args, "--resume"])
