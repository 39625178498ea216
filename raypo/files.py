"""Writing files that others read: atomically (a temporary file beside the target, then a
rename) and with the permissions the user's umask gives any new file.

`tempfile` makes its files 0600 and its folders 0700, which is right for a secret and wrong for
a report folder or a saved model on a team's NFS mount: after the rename they would stay
private. Every writer here gives them the mode `open` or `mkdir` would have (0644 / 0755 under
umask 022, 0664 / 0775 under 002).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def umask() -> int:
    """The process's umask, read without changing it (os.umask sets as it reads, which would
    race with other threads creating files)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # no /proc (macOS): the only portable way
    os.umask(mask)
    return mask


def share_as_new(path: str | Path, directory: bool = False) -> None:
    """Give `path` the mode a new file (or folder) gets under the umask: what `open` or
    `mkdir` would have made, where `tempfile` made it private."""
    os.chmod(path, (0o777 if directory else 0o666) & ~umask())


def atomic_write(path: Path, write, mode: str = "w") -> None:
    """`write(f)` into a temporary file beside `path`, then renamed over it; readable as any
    new file of the user's would be."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            write(f)
        share_as_new(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
