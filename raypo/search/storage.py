"""The file system Tune's experiment state is written through: local files, written whole.

Tune writes its experiment state (trial statuses, the searcher's study, the callbacks) in a
staging folder and copies it to the storage path (reports/<name>/tune/) over a pyarrow file
system. A plain copy that runs out of space leaves a truncated file in place of the last good
one, and a resume from it starts a new experiment. Through this file system every file is
written to a temporary file beside it and renamed over the old one only once it is whole and
on disk, so a full disk leaves the previous state, from which `--resume` continues the same
experiment once space is freed.
"""

from __future__ import annotations

import contextlib
import os

import pyarrow.fs as pafs
from pyarrow import PythonFile

from raypo.files import replace_whole, temporary_beside


class _AtomicFile:
    """A binary file that replaces `path` when closed after writes that all succeeded."""

    def __init__(self, path: str):
        self.path = path
        self.tmp = temporary_beside(path)  # the one way a file is written whole (raypo.files)
        self.file = open(self.tmp, "wb")  # noqa: SIM115 (closed by close() or _discard())
        self.failed = False
        self.closed = False

    def write(self, data) -> int:
        try:
            return self.file.write(data)
        except BaseException:
            self._discard()
            raise

    def flush(self) -> None:
        try:
            self.file.flush()
        except BaseException:
            self._discard()
            raise

    def _discard(self) -> None:
        """A failed write: the temporary file goes now (the caller may never close us)."""
        self.failed = True
        with contextlib.suppress(OSError):
            self.file.close()
        with contextlib.suppress(OSError):
            os.unlink(self.tmp)

    def writable(self) -> bool:
        return True

    def readable(self) -> bool:
        return False

    def seekable(self) -> bool:
        return False

    def tell(self) -> int:
        return self.file.tell()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.failed:
            raise OSError(f"{self.path}: not replaced: an earlier write failed")
        try:
            self.file.close()
            replace_whole(self.tmp, self.path)
        except BaseException:
            self._discard()
            raise


class AtomicLocalHandler(pafs.FileSystemHandler):
    """pyarrow's local file system, but `open_output_stream` writes whole files or none."""

    def __init__(self):
        self.fs = pafs.LocalFileSystem()

    def __reduce__(self):  # Tune sends its storage context to trial processes
        return AtomicLocalHandler, ()

    def __eq__(self, other):
        return isinstance(other, AtomicLocalHandler)

    def __ne__(self, other):
        return not isinstance(other, AtomicLocalHandler)

    def __hash__(self):
        return hash(AtomicLocalHandler)

    def get_type_name(self) -> str:
        return "raypo-atomic-local"

    def normalize_path(self, path):
        return self.fs.normalize_path(path)

    def get_file_info(self, paths):
        return self.fs.get_file_info(paths)

    def get_file_info_selector(self, selector):
        return self.fs.get_file_info(selector)

    def create_dir(self, path, recursive):
        self.fs.create_dir(path, recursive=recursive)

    def delete_dir(self, path):
        self.fs.delete_dir(path)

    def delete_dir_contents(self, path, missing_dir_ok):
        self.fs.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self):
        raise OSError("raypo's storage never deletes the root folder's contents")

    def delete_file(self, path):
        self.fs.delete_file(path)

    def move(self, src, dest):
        self.fs.move(src, dest)

    def copy_file(self, src, dest):
        with self.fs.open_input_stream(src) as source, \
                PythonFile(_AtomicFile(dest), mode="w") as target:
            while chunk := source.read(1 << 20):
                target.write(chunk)

    def open_input_stream(self, path):
        return self.fs.open_input_stream(path)

    def open_input_file(self, path):
        return self.fs.open_input_file(path)

    def open_output_stream(self, path, metadata):
        return PythonFile(_AtomicFile(path), mode="w")

    def open_append_stream(self, path, metadata):
        return self.fs.open_append_stream(path)


def atomic_filesystem() -> pafs.PyFileSystem:
    """The storage file system of a search on local (or NFS-mounted) storage."""
    return pafs.PyFileSystem(AtomicLocalHandler())
