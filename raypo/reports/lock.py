"""One writer per report folder: a lock held for a search's or a training run's lifetime.

    with ReportLock(folder, "search"):   # LockedError if another live run holds it
        ...

The lock is `<folder>/.raypo.lock`, a JSON record of its holder: host, pid, the pid's start
time, the command line, when it was taken (`since`) and, as a lease, when it was last renewed
(`renewed`, epoch seconds) and after how long without a renewal it is gone (`lease_s`). It is
removed when the `with` block ends, however it ends.

`folder` is a local folder (a `pathlib.Path`; one machine, or a network file system several
hosts mount) or a folder on object storage (a `raypo.storage.RemotePath`):

- Locally the lock is created atomically: written to a temporary file, then hard-linked into
  place, which fails if a lock exists.
- On S3 it is created with a conditional write (`If-None-Match: *`), which pyarrow lacks, so
  it goes through boto3, the `s3` extra (`pip install 'raypo[s3]'`); boto3 finds the endpoint
  (`AWS_ENDPOINT_URL`), region and credentials itself, raypo keeps none. On Google Cloud
  Storage the same goes through `google-cloud-storage` (`if_generation_match=0`).

While it is held, a background thread renews the lock every `lease_s / 4` seconds (a whole new
record; locally a temporary file renamed into place), after checking that the lock is still
this run's (its random `token`): if it is not, another run took it over, and the renewal stops
and records that the lock was lost (`ReportLock.lost`).

A lock left by a killed run is stale and is taken over:

- on the same host, when its pid is gone or now belongs to a process that started later (a
  reused pid), as it always was;
- from another host (a shared folder, or object storage, where a resumed search may run on a
  new head with another host name), and on object storage from any holder, when it has not
  been renewed for its `lease_s`: `now - renewed > lease_s`. Hosts compare their own clock
  with the holder's, so their clocks must agree to well within the lease (NTP).

The lease, the stated time, is 120 s, or `RAYPO_LOCK_LEASE_S` seconds when that is set: a
killed run's report can be resumed from another host that long after it died. A lock from
another host written without a renewal time (an older raypo) cannot be judged, so it is
reported with how to remove it by hand.

Folders the lock had to create (local ones; object storage has none) are removed again if the
run left nothing in them, so a run that fails on bad input leaves no empty report behind.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

from raypo.errors import RaypoError
from raypo.reports.lock_remote import RemoteLock, object_key, remote_store
from raypo.reports.writer import ReportWriteError
from raypo.storage import RemotePath, location

__all__ = ["LEASE_ENV", "LEASE_S", "NAME", "LockedError", "ReportLock", "lease_seconds",
           "object_key"]

NAME = ".raypo.lock"
LEASE_S = 120.0  # the default stated time; RAYPO_LOCK_LEASE_S overrides it
LEASE_ENV = "RAYPO_LOCK_LEASE_S"

log = logging.getLogger(__name__)


class LockedError(RaypoError, RuntimeError):
    """Another run writes this report folder."""


def lease_seconds() -> float:
    """The stated time after which a lock that was not renewed is gone."""
    text = os.environ.get(LEASE_ENV)
    if text is None or not text.strip():
        return LEASE_S
    try:
        lease = float(text)
    except ValueError:
        lease = float("nan")
    if not lease > 0 or lease == float("inf"):
        raise LockedError(f"{LEASE_ENV}={text!r}: expected a positive number of seconds")
    return lease


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


def _number(value) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _lease_of(owner: dict, default: float) -> float:
    """The holder's stated lease (it renews at its own pace), else ours."""
    lease = _number(owner.get("lease_s"))
    return lease if lease is not None and lease > 0 else default


def _pid_gone(owner: dict) -> bool:
    """A lock of this host whose pid is gone or was reused."""
    pid = int(owner.get("pid", -1))
    if pid <= 0 or not _alive(pid):
        return True
    started = owner.get("started_ticks")
    return started is not None and _start_time(pid) not in (None, started)


def _leased(owner: dict, remote: bool) -> bool:
    """Whether the lease, not the pid, tells if this holder is alive."""
    return remote or owner.get("host") != socket.gethostname()


def _stale(owner: dict, remote: bool = False, lease: float = LEASE_S) -> bool:
    if owner.get("host") == socket.gethostname() and _pid_gone(owner):
        return True
    if not _leased(owner, remote):
        return False
    renewed = _number(owner.get("renewed"))
    if renewed is None:  # an older raypo's lock: it cannot be judged
        return False
    return time.time() - renewed > _lease_of(owner, lease)


class ReportLock:
    """The lock on one report folder; `what` (search, train) names the holder's kind. `folder`
    is a local folder or a `RemotePath`; `lease_s` defaults to `lease_seconds()`."""

    def __init__(self, folder: str | Path | RemotePath, what: str,
                 lease_s: float | None = None):
        self.folder = location(folder)
        self.what = what
        self.path = self.folder / NAME
        self.remote = isinstance(self.folder, RemotePath)
        self.lease_s = lease_s
        self.lost: str | None = None  # why the lock was lost while held, if it was
        self._created: list[Path] = []
        self._held = False
        self._store: RemoteLock | None = None
        self._record: dict = {}
        self._mutex = threading.Lock()  # a renewal and the release never overlap
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def _make_folders(self) -> None:
        if self.remote:  # object storage has no folders to make
            return
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
        if self.lease_s is None:
            self.lease_s = lease_seconds()
        if self.remote and self._store is None:
            self._store = remote_store(self.folder, self.path)
        self._make_folders()
        me = {"host": socket.gethostname(), "pid": os.getpid(),
              "started_ticks": _start_time(os.getpid()), "what": self.what,
              "command": " ".join(sys.argv), "since": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "renewed": round(time.time(), 3), "lease_s": self.lease_s,
              "token": secrets.token_hex(8)}
        for _ in range(5):
            me["renewed"] = round(time.time(), 3)
            if self._try_create(me):
                self._record = me
                self._held = True
                self.lost = None
                self._start_renewing()
                return self
            owner, version = self._owner()
            if owner == "gone":  # released between our attempt and our look
                continue
            if owner is None or _stale(owner, self.remote, self.lease_s):
                self._take_over(owner, version)
                continue
            self._forget_folders()
            raise LockedError(self._refusal(owner))
        self._forget_folders()
        raise LockedError(f"{self.path}: could not take the lock (it keeps changing)")

    def _refusal(self, owner: dict) -> str:
        where = (f"pid {owner.get('pid')}" if owner.get("host") == socket.gethostname()
                 else f"pid {owner.get('pid')} on host {owner.get('host')}")
        text = (f"{self.folder}: a {owner.get('what', 'run')} already writes this report "
                f"({where}, since {owner.get('since', '?')}: {owner.get('command', '?')}); ")
        if not _leased(owner, self.remote):
            return text + (f"wait for it, choose another --name, or remove {self.path} if that "
                           "run is gone")
        renewed = _number(owner.get("renewed"))
        if renewed is None:
            return text + ("its lock records no renewal (an older raypo), so it is never "
                           "considered gone: wait for it, choose another --name, or remove "
                           f"{self.path} by hand if that run is gone")
        lease = _lease_of(owner, self.lease_s)
        return text + (f"its lock was renewed {max(time.time() - renewed, 0):.0f} s ago and is "
                       f"considered gone {lease:g} s after its last renewal; wait for it, "
                       f"choose another --name, or remove {self.path} if that run is gone")

    # -- creating, reading, taking over -----------------------------------------------------
    def _try_create(self, me: dict) -> bool:
        if self._store is not None:
            return self._store.create(json.dumps(me).encode())
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

    def _owner(self) -> tuple[dict | str | None, object]:
        """(the holder's record, its version on object storage); the record is "gone" if
        there is no lock any more, None if it cannot be read (the lock is written whole before
        it appears, so that means damaged)."""
        if self._store is not None:
            return self._store.read()
        try:
            owner = json.loads(self.path.read_text())
        except FileNotFoundError:
            return "gone", None
        except (OSError, ValueError):
            return None, None
        return (owner if isinstance(owner, dict) else None), None

    def _take_over(self, stale: dict | None, version: object = None) -> None:
        if self._store is not None:  # only that version of it: not one written since
            self._store.delete(version)
            return
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

    # -- the lease ---------------------------------------------------------------------------
    def _start_renewing(self) -> None:
        self._stop.clear()
        self._renewer = threading.Thread(target=self._renew_loop, name="raypo-lock-renew",
                                         daemon=True)
        self._renewer.start()

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.lease_s / 4):
            with self._mutex:
                if self._stop.is_set():
                    return
                record = {**self._record, "renewed": round(time.time(), 3)}
                try:
                    ours = self._renew(record)
                except Exception as e:  # storage trouble: try again at the next renewal
                    log.warning("%s: could not renew the lock: %s", self.path, e)
                    continue
                if not ours:
                    self.lost = (f"{self.path}: the lock was taken over or removed by another "
                                 "run while this one held it")
                    log.warning("%s", self.lost)
                    return
                self._record = record

    def _ours(self, owner) -> bool:
        return isinstance(owner, dict) and owner.get("token") == self._record.get("token")

    def _renew(self, record: dict) -> bool:
        """Rewrite the lock with `record` if it is still ours; False if it is not."""
        owner, version = self._owner()
        if not self._ours(owner):
            return False
        if self._store is not None:
            return self._store.replace(json.dumps(record).encode(), version)
        fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=".raypo.lock.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(record, f)
            os.replace(tmp, self.path)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        return True

    def release(self) -> None:
        self._stop.set()
        with self._mutex:  # waits for a renewal in flight
            if self._held:
                with contextlib.suppress(Exception):  # best effort: the run's outcome stands
                    owner, version = self._owner()
                    if self._ours(owner):
                        if self._store is not None:
                            self._store.delete(version)
                        else:
                            self.path.unlink()
                self._held = False
        if self._renewer is not None:
            self._renewer.join(timeout=5)
            self._renewer = None
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
