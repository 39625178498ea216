"""One writer per report folder: a lock file held for a search's or a training run's lifetime.

    with ReportLock(folder, "search"):   # LockedError if another live run holds it
        ...

The lock is `<folder>/.raypo.lock`, created atomically (written to a temporary file, then
hard-linked into place, which fails if the lock exists), and holds the owner's host, pid, the
pid's start time and its command line. It is removed when the `with` block ends, however it
ends. A lock left by a killed run is stale: on the same host its pid is gone, or now belongs to
a process that started later (a reused pid); a stale lock is taken over. A lock from another
host cannot be checked, so it is reported with how to remove it by hand.

Folders the lock had to create are removed again if the run left nothing in them, so a run
that fails on bad input leaves no empty report behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

from raypo.reports.writer import ReportWriteError

NAME = ".raypo.lock"


class LockedError(RuntimeError):
    """Another run writes this report folder."""


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _stale(owner: dict) -> bool:
    if owner.get("host") != socket.gethostname():
        return False
    pid = int(owner.get("pid", -1))
    if pid <= 0 or not _alive(pid):
        return True
    started = owner.get("started_ticks")
    return started is not None and _start_time(pid) not in (None, started)


class ReportLock:
    """The lock on one report folder; `what` (search, train) names the holder's kind."""

    def __init__(self, folder: str | Path, what: str):
        self.folder = Path(folder)
        self.what = what
        self.path = self.folder / NAME
        self._created: list[Path] = []
        self._held = False

    def _make_folders(self) -> None:
        missing = []
        for parent in (self.folder, *self.folder.parents):
            if parent.exists():
                break
            missing.append(parent)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ReportWriteError(f"{self.folder}: cannot create the report folder: "
                                   f"{e.strerror or e}") from None
        self._created = missing  # deepest first

    def acquire(self) -> ReportLock:
        self._make_folders()
        me = {"host": socket.gethostname(), "pid": os.getpid(),
              "started_ticks": _start_time(os.getpid()), "what": self.what,
              "command": " ".join(sys.argv), "since": time.strftime("%Y-%m-%dT%H:%M:%S")}
        for _ in range(5):
            if self._try_create(me):
                self._held = True
                return self
            owner = self._owner()
            if owner == "gone":  # released between our attempt and our look
                continue
            if owner is None or _stale(owner):
                self._take_over(owner)
                continue
            self._forget_folders()
            where = (f"pid {owner.get('pid')}" if owner.get("host") == me["host"]
                     else f"pid {owner.get('pid')} on host {owner.get('host')}")
            raise LockedError(
                f"{self.folder}: a {owner.get('what', 'run')} already writes this report "
                f"({where}, since {owner.get('since', '?')}: {owner.get('command', '?')}); "
                f"wait for it, choose another --name, or remove {self.path} if that run is "
                "gone")
        self._forget_folders()
        raise LockedError(f"{self.path}: could not take the lock (it keeps changing)")

    def _try_create(self, me: dict) -> bool:
        try:
            fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=".raypo.lock.", suffix=".tmp")
        except OSError as e:
            self._forget_folders()
            raise ReportWriteError(f"{self.folder}: cannot write there: {e.strerror or e}"
                                   ) from None
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            os.link(tmp, self.path)  # atomic: fails if a lock exists
            return True
        except FileExistsError:
            return False
        except OSError as e:
            self._forget_folders()
            raise ReportWriteError(f"{self.folder}: cannot write there: {e.strerror or e}"
                                   ) from None
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)

    def _owner(self) -> dict | str | None:
        """The holder's record; "gone" if there is no lock any more; None if it cannot be
        read (the lock is written whole before it appears, so that means damaged)."""
        try:
            owner = json.loads(self.path.read_text())
        except FileNotFoundError:
            return "gone"
        except (OSError, ValueError):
            return None
        return owner if isinstance(owner, dict) else None

    def _take_over(self, stale: dict | None) -> None:
        # rename first: of two runs taking over the same stale lock only one renames it;
        # one that renamed a fresh lock instead (another run took over first) puts it back
        aside = self.path.with_name(f"{NAME}.stale.{os.getpid()}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        try:
            fresh = json.loads(aside.read_text()) != stale
        except (OSError, ValueError):
            fresh = False
        if fresh:
            with contextlib.suppress(OSError):
                os.link(aside, self.path)
        with contextlib.suppress(OSError):
            os.unlink(aside)

    def release(self) -> None:
        if self._held:
            with contextlib.suppress(OSError):
                self.path.unlink()
            self._held = False
        self._forget_folders()

    def _forget_folders(self) -> None:
        for folder in self._created:  # deepest first; only the ones left empty
            with contextlib.suppress(OSError):
                folder.rmdir()
        self._created = []

    def __enter__(self) -> ReportLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
