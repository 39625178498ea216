"""Where a search's files live: a local folder (one machine, or an NFS/EFS mount every node
sees) or object storage (`s3://bucket/prefix`, `gs://bucket/prefix`), through pyarrow's file
systems, the ones Ray Tune's `storage_path` uses.

    root = location("s3://bucket/reports")      # or "reports", "/mnt/efs/reports"
    folder = root / "quickstart"                # a pathlib.Path, or a RemotePath
    (folder / "search.json").write_text(...)    # whole or not at all, on either

A local location is a plain `pathlib.Path`, so the one-machine behaviour is what it always was.
A remote one is a `RemotePath`: the few pathlib methods raypo's writers and readers use, over
pyarrow. Object storage has no rename; an object appears whole when its PUT (or multipart
upload) completes, so `write_bytes` is one upload of the whole file and a reader never sees
half of it. A folder of several files (a model) is uploaded with its marker file last
(`upload(..., last=...)`): a reader that finds the marker finds the rest.

An S3-compatible endpoint comes from the standard variables `AWS_ENDPOINT_URL` /
`AWS_ENDPOINT_URL_S3`, and credentials from the environment or the instance profile, as
pyarrow and boto3 read them; raypo keeps none.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path, PurePosixPath

import pyarrow.fs as pafs

from raypo.errors import RaypoError
from raypo.files import write_whole

SCHEMES = ("s3", "gs")


class StorageError(RaypoError, ValueError):
    """A storage location raypo cannot use: the message names it and what was expected."""


def is_uri(text: str | os.PathLike) -> bool:
    return "://" in str(text)


def location(text: str | os.PathLike | RemotePath) -> Path | RemotePath:
    """A report root or folder as given by a user: `s3://...` or `gs://...` (RemotePath), or a
    local folder (Path; `~` expanded). Any other scheme is a StorageError."""
    if isinstance(text, RemotePath | Path):
        return text
    text = str(text)
    if not is_uri(text):
        return Path(text).expanduser()
    scheme = text.split("://", 1)[0].lower()
    if scheme == "file":
        return Path(text.split("://", 1)[1])
    if scheme not in SCHEMES:
        raise StorageError(f"{text}: unsupported storage {scheme}://; expected a local folder, "
                           "s3://bucket/prefix or gs://bucket/prefix")
    return RemotePath(text)


def is_remote(path) -> bool:
    return isinstance(path, RemotePath)


class RemotePath:
    """A file or folder on object storage, named by its URI (`s3://bucket/a/b`)."""

    def __init__(self, uri: str, fs: pafs.FileSystem | None = None):
        scheme, rest = uri.split("://", 1)
        self.scheme = scheme.lower()
        self.key = str(PurePosixPath(rest.strip("/"))) if rest.strip("/") else ""
        if not self.key:
            raise StorageError(f"{uri}: expected {self.scheme}://bucket[/prefix]")
        self._fs = fs

    # -- naming --------------------------------------------------------------------------
    @property
    def fs(self) -> pafs.FileSystem:
        """pyarrow's file system for this bucket (made on first use, per process: it does not
        travel between processes, the URI does)."""
        if self._fs is None:
            try:
                self._fs, _ = pafs.FileSystem.from_uri(str(self))
            except (OSError, ValueError) as e:
                raise StorageError(f"{self}: cannot open the storage: "
                                   f"{' '.join(str(e).split())}") from None
        return self._fs

    @property
    def bucket(self) -> str:
        return self.key.split("/", 1)[0]

    @property
    def fs_path(self) -> str:
        """The path within `fs` (no scheme): what pyarrow's calls take."""
        return self.key

    def __truediv__(self, name: str) -> RemotePath:
        return RemotePath(f"{self.scheme}://{self.key}/{name}", self._fs)

    def __str__(self) -> str:
        return f"{self.scheme}://{self.key}"

    def __repr__(self) -> str:
        return f"RemotePath({str(self)!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, RemotePath) and str(other) == str(self)

    def __hash__(self) -> int:
        return hash(str(self))

    def __reduce__(self):
        return RemotePath, (str(self),)

    @property
    def name(self) -> str:
        return PurePosixPath(self.key).name

    @property
    def parent(self) -> RemotePath:
        return RemotePath(f"{self.scheme}://{PurePosixPath(self.key).parent}", self._fs)

    def resolve(self) -> RemotePath:
        return self

    def absolute(self) -> RemotePath:
        return self

    # -- reading ---------------------------------------------------------------------------
    def _info(self) -> pafs.FileInfo:
        return self.fs.get_file_info(self.key)

    def exists(self) -> bool:
        return self._info().type != pafs.FileType.NotFound

    def is_file(self) -> bool:
        return self._info().type == pafs.FileType.File

    def is_dir(self) -> bool:
        return self._info().type == pafs.FileType.Directory

    def iterdir(self) -> list[RemotePath]:
        selector = pafs.FileSelector(self.key, allow_not_found=True)
        return [RemotePath(f"{self.scheme}://{i.path}", self._fs)
                for i in self.fs.get_file_info(selector)]

    def files(self) -> list[tuple[str, int]]:
        """(path relative to this folder, size) of every file below it."""
        selector = pafs.FileSelector(self.key, recursive=True, allow_not_found=True)
        return [(i.path[len(self.key) + 1:], i.size) for i in self.fs.get_file_info(selector)
                if i.type == pafs.FileType.File]

    def read_bytes(self) -> bytes:
        with self.fs.open_input_stream(self.key) as f:
            return f.read()

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.read_bytes().decode(encoding)

    # -- writing ---------------------------------------------------------------------------
    def write_bytes(self, data: bytes) -> None:
        """One upload of the whole object: it appears complete or not at all."""
        with self.fs.open_output_stream(self.key) as f:
            f.write(data)

    def write_text(self, text: str, encoding: str = "utf-8") -> None:
        self.write_bytes(text.encode(encoding))

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        """Object storage has no folders to make: a key's prefix is its folder."""

    def unlink(self, missing_ok: bool = False) -> None:
        try:
            self.fs.delete_file(self.key)
        except FileNotFoundError:
            if not missing_ok:
                raise

    def rmtree(self) -> None:
        """The folder and everything below it (nothing if it does not exist)."""
        with contextlib.suppress(FileNotFoundError):
            self.fs.delete_dir(self.key)

    def upload_file(self, local: Path) -> int:
        """The local file `local` as this object (one upload); returns its bytes."""
        pafs.copy_files(str(Path(local).resolve()), self.key,
                        source_filesystem=pafs.LocalFileSystem(), destination_filesystem=self.fs)
        return Path(local).stat().st_size

    def upload(self, local: Path, last: str | None = None) -> int:
        """Copy the local folder `local` to this folder; the file `last` (relative to it) goes
        after every other, so its presence means the folder is whole. Returns the bytes sent."""
        local = Path(local)
        files = [p for p in sorted(local.rglob("*")) if p.is_file()]
        files.sort(key=lambda p: p.relative_to(local).as_posix() == last)
        sent = 0
        for path in files:
            sent += (self / path.relative_to(local).as_posix()).upload_file(path)
        return sent

    def download(self, local: Path) -> int:
        """Copy this folder into the local folder `local`; returns the bytes received."""
        local = Path(local)
        local.mkdir(parents=True, exist_ok=True)
        got = 0
        for relative, size in self.files():
            (local / relative).parent.mkdir(parents=True, exist_ok=True)
            pafs.copy_files(f"{self.key}/{relative}", str(local / relative),
                            source_filesystem=self.fs,
                            destination_filesystem=pafs.LocalFileSystem())
            got += size or 0
        return got

    def download_file(self, local: Path) -> int:
        """This object into the local file `local`, written whole (a rename)."""
        write_whole(local, lambda tmp: pafs.copy_files(
            self.key, tmp, source_filesystem=self.fs,
            destination_filesystem=pafs.LocalFileSystem()))
        return local.stat().st_size

    def copy_tree(self, target: RemotePath, last: str | None = None) -> None:
        """Copy this folder to `target` on the same storage (server-side), `last` last."""
        files = sorted(self.files(), key=lambda f: f[0] == last)
        for relative, _ in files:
            self.fs.copy_file(f"{self.key}/{relative}", f"{target.key}/{relative}")


# -- the operations raypo needs on either kind of location ----------------------------------
def rmtree(path: Path | RemotePath) -> None:
    """Remove a folder and its contents, wherever it is; nothing if it is not there."""
    if isinstance(path, RemotePath):
        path.rmtree()
    else:
        shutil.rmtree(path, ignore_errors=True)


def move_tree(source: Path | RemotePath, target: Path | RemotePath,
              last: str | None = None) -> None:
    """Move a whole folder: a rename on a local file system, a copy (with `last` last, so a
    reader sees the folder whole) then a delete on object storage. `target` must not exist."""
    if isinstance(source, RemotePath):
        source.copy_tree(target, last=last)
        source.rmtree()
    else:
        os.replace(source, target)


def tune_storage(folder: Path | RemotePath, local_fs: pafs.FileSystem | None = None
                 ) -> tuple[str, pafs.FileSystem | None]:
    """(storage_path, storage_filesystem) for Ray Tune or Ray Train runs under `folder`: on
    object storage the path within the bucket and the bucket's file system (Tune then writes
    experiment state and trial checkpoints there, from whichever node); locally the absolute
    path and `local_fs`."""
    if isinstance(folder, RemotePath):
        return folder.fs_path, folder.fs
    return str(Path(folder).resolve()), local_fs


def on_network_fs(path: Path) -> bool:
    """Whether the local `path` lies on a network file system (NFS, EFS, CIFS, Lustre, ...)
    that other machines may mount too, read from /proc/mounts (Linux)."""
    network = ("nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "gpfs", "ceph", "glusterfs",
               "beegfs", "9p", "fuse.s3fs", "fuse.gcsfuse", "fuse.mountpoint-s3", "efs")
    try:
        mounts = [line.split() for line in Path("/proc/mounts").read_text().splitlines()]
    except OSError:
        return False
    target = str(Path(path).resolve())
    best, kind = "", ""
    for fields in mounts:
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) > len(best):
            best, kind = point, fields[2]
    return kind in network
