"""Writing files whole: every file raypo writes, local or on object storage, goes through
`write_whole` (or, for a stream such as Tune's, `temporary_beside` then `replace_whole`): a
reader sees the old file, the new one, or none, never half of one, and a failed write leaves
the old one in place.

- On the local file system: a temporary file beside the target, flushed to disk, given the
  permissions the user's umask gives any new file, then renamed over the target (`os.replace`
  is atomic on one file system).
- On object storage (any other pyarrow file system): the file is finished locally, then sent
  in one upload; an object is replaced whole by its PUT.

`tempfile` makes its files 0600 and its folders 0700, which is right for a secret and wrong for
a report folder or a saved model on a team's NFS mount: after the rename they would stay
private. Every writer here gives them the mode `open` or `mkdir` would have (0644 / 0755 under
umask 022, 0664 / 0775 under 002).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import pyarrow.fs as pafs


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


def temporary_beside(path: str | Path) -> str:
    """A new empty temporary file in `path`'s folder (made if missing), for `replace_whole`."""
    folder = os.path.dirname(os.fspath(path)) or "."
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    os.close(fd)
    return tmp


def replace_whole(tmp: str, path: str | Path) -> None:
    """The finished temporary file `tmp` on disk, shared as a new file would be, renamed
    over `path`."""
    with open(tmp, "rb") as f:  # on disk before the rename: a crash leaves old or new
        os.fsync(f.fileno())
    share_as_new(tmp)  # mkstemp's 0600 is too private for reports, models and caches
    os.replace(tmp, path)


def write_whole(path: str | Path, write: Callable[[str], None],
                fs: pafs.FileSystem | None = None) -> None:
    """`write(temporary local path)`, then that file becomes `path` whole: renamed over it on
    the local file system (`fs` None or local), uploaded in one piece to it on another pyarrow
    file system (`path` is then that file system's path). The temporary file never outlives
    the call; a failure propagates with `path` as it was."""
    local = fs is None or isinstance(fs, pafs.LocalFileSystem)
    if local:
        tmp = temporary_beside(path)
    else:
        folder = tempfile.mkdtemp(prefix="raypo-upload-")
        tmp = os.path.join(folder, os.path.basename(os.fspath(path)))
    try:
        write(tmp)
        if local:
            replace_whole(tmp, path)
        else:
            pafs.copy_files(tmp, os.fspath(path), source_filesystem=pafs.LocalFileSystem(),
                            destination_filesystem=fs)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if not local:
            with contextlib.suppress(OSError):
                os.rmdir(folder)


def atomic_write(path: Path, write, mode: str = "w") -> None:
    """`write(f)` into a file opened in `mode` (text: UTF-8) that becomes `path` whole."""
    def to_file(tmp: str) -> None:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            write(f)

    write_whole(path, to_file)
