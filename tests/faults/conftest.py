"""Helpers of the fault tests: the CLI in-process, small file systems that fill up or refuse
writes (a tmpfs where this process may mount one, as root in CI; permission bits otherwise)."""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from raypo.cli import app

# the smallest built-in run that trains and evaluates (seconds on 2 cores)
TINY = {"task": {"variant": "graded", "train_pairs": 32, "eval_pairs": 8, "base_steps": 5},
        "steps": 2, "batch_size": 4, "eval_every": 2, "eval_samples": 4, "warmup_steps": 1,
        "seed": 0}


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def last_error(result) -> str:
    """The CLI's error line (what a user reads)."""
    lines = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert lines, result.output
    return lines[-1]


def write_yaml(path: Path, **tree) -> Path:
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


def files_under(folder: Path) -> list[str]:
    if not folder.exists():
        return []
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


class Mount:
    """A tmpfs of `size` at `path`; `readonly()` remounts it read-only."""

    def __init__(self, path: Path, size: str):
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                       check=True, capture_output=True)

    def readonly(self) -> None:
        subprocess.run(["mount", "-o", "remount,ro", str(self.path)], check=True,
                       capture_output=True)

    def writable(self) -> None:
        subprocess.run(["mount", "-o", "remount,rw", str(self.path)], check=True,
                       capture_output=True)

    def unmount(self) -> None:
        subprocess.run(["umount", "-l", str(self.path)], capture_output=True)


def can_mount() -> bool:
    return os.geteuid() == 0 and Path("/proc/mounts").exists()


@pytest.fixture
def tmpfs(tmp_path):
    """A factory of small tmpfs mounts under tmp_path (skips where mounting is not allowed)."""
    if not can_mount():
        pytest.skip("mounting a tmpfs needs root")
    mounts = []

    def make(name: str = "disk", size: str = "2m") -> Mount:
        try:
            mount = Mount(tmp_path / name, size)
        except subprocess.CalledProcessError as e:
            pytest.skip(f"cannot mount a tmpfs here: {e.stderr.decode()[:200]}")
        mounts.append(mount)
        return mount

    yield make
    for mount in mounts:
        mount.unmount()


@pytest.fixture
def readonly(tmp_path):
    """A factory: make_readonly(folder) makes an existing folder read-only (a read-only
    tmpfs holding a copy as root, which ignores permission bits; mode 0555 otherwise)."""
    undo = []

    def make(folder: Path) -> Path:
        if os.geteuid() != 0:
            folder.chmod(0o555)
            undo.append(lambda: folder.chmod(0o755))
            return folder
        if not can_mount():
            pytest.skip("a read-only folder as root needs a mount")
        import shutil

        keep = folder.with_name(folder.name + ".orig")
        shutil.copytree(folder, keep)
        shutil.rmtree(folder)
        mount = Mount(folder, "4m")
        shutil.copytree(keep, folder, dirs_exist_ok=True)
        mount.readonly()
        undo.append(mount.unmount)
        return folder

    yield make
    for step in reversed(undo):
        with contextlib.suppress(Exception):
            step()
