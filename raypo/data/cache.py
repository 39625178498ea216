"""Where raypo keeps derived data on disk, and how it writes there safely.

Several Ray workers may tokenize the same dataset at once and a run may be killed mid-write,
so a cache file is written to a temporary file in its own folder and renamed into place
(`os.replace` is atomic on one file system): a reader sees the old file, the new one, or none,
never half of one.

On a cluster whose nodes share no disk, the caches of a search are mirrored on its storage
(`<reports root>/.raypo-cache/`, named by RAYPO_CACHE_STORAGE, which the search sets for every
Ray process). Every cache file is named by its fingerprint, so the mirror is a plain copy of the
local layout: `cached(path)` finds a file locally or downloads it from the mirror on first use,
`atomic_torch_save` uploads what a process computed, and `publish_used` uploads what the search's
driver read from its own disk and the mirror lacks. A node therefore computes nothing another
node (or an earlier search on the same storage) has computed.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from raypo.files import write_whole

CACHE_STORAGE_ENV = "RAYPO_CACHE_STORAGE"
_used: set[Path] = set()  # cache files this process read or wrote (what publish_used uploads)


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """`cache_dir`, else the environment variable RAYPO_CACHE, else ~/.cache/raypo."""
    root = cache_dir or os.environ.get("RAYPO_CACHE") or "~/.cache/raypo"
    return Path(root).expanduser()


def atomic_torch_save(obj: Any, path: Path) -> None:
    """`torch.save(obj, path)`, written whole (raypo.files.write_whole); a cache file is then
    uploaded to the mirror (when there is one)."""
    write_whole(path, lambda tmp: torch.save(obj, tmp))
    remote = _mirrored(path)
    if remote is not None:
        _used.add(path)
        sent = remote.upload_file(path)
        # one line per cache file computed anywhere: how a search shows it computed each once
        print(f"cache: computed {_relative(path)} on {os.uname().nodename} ({sent} bytes, "
              f"uploaded to {remote})", file=sys.stderr, flush=True)


def mirror():
    """The caches' mirror on the search's storage (RemotePath), or None."""
    uri = os.environ.get(CACHE_STORAGE_ENV)
    if not uri:
        return None
    from raypo.storage import location

    return location(uri)


def _relative(path: Path) -> str | None:
    try:
        return Path(path).resolve().relative_to(cache_root().resolve()).as_posix()
    except ValueError:  # an explicit cache folder elsewhere: not mirrored
        return None


def _mirrored(path: Path):
    """The mirror's copy of the local cache file `path` (None without a mirror)."""
    root, relative = mirror(), _relative(path)
    return None if root is None or relative is None else root / relative


def cached(path: Path) -> bool:
    """Whether the cache file `path` is there to read: on this node's disk, or downloaded now
    from the mirror (written whole, by a rename)."""
    path = Path(path)
    if path.is_file():
        _used.add(path)
        return True
    remote = _mirrored(path)
    if remote is None or not remote.is_file():
        return False
    remote.download_file(path)
    _used.add(path)
    return True


def publish_used(log=print) -> None:
    """Upload every cache file this process used that the mirror lacks (a driver whose own
    disk had them from an earlier search), and say how many bytes that took and how long."""
    root = mirror()
    if root is None:
        return
    start, sent, files = time.perf_counter(), 0, 0
    for path in sorted(_used):
        remote = _mirrored(path)
        if remote is None or not path.is_file():
            continue
        info = remote.fs.get_file_info(remote.fs_path)
        if info.size == path.stat().st_size:
            continue
        sent += remote.upload_file(path)
        files += 1
    held = sum(size or 0 for _, size in root.files())
    log(f"shared caches on the storage ({root}): {held / 2**20:.1f} MiB; uploaded {files} "
        f"file(s), {sent} bytes, in {time.perf_counter() - start:.2f} s")


def hash_json(obj: Any) -> str:
    """sha256 of the canonical JSON form of `obj` (sorted keys), for cache keys."""
    text = json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of everything that decides how `tokenizer` turns text into ids.

    The vocabulary alone does not (BPE merges, normalisers and pre-tokenisers matter too), so
    a fast tokenizer's full serialised form is included, minus the padding and truncation
    settings that every call with `padding=`/`truncation=` rewrites in place.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    serialised = None
    if backend is not None:
        serialised = json.loads(backend.to_str())
        serialised.pop("padding", None)
        serialised.pop("truncation", None)
    return hash_json(
        {
            "class": type(tokenizer).__name__,
            "vocab": sorted(tokenizer.get_vocab().items()),
            "special_tokens": sorted(zip(tokenizer.all_special_tokens,
                                         tokenizer.all_special_ids, strict=True)),
            "bos": tokenizer.bos_token_id,
            "eos": tokenizer.eos_token_id,
            "chat_template": getattr(tokenizer, "chat_template", None),
            "backend": serialised,
        }
    )
