"""Where raypo keeps derived data on disk, and how it writes there safely.

Several Ray workers may tokenize the same dataset at once and a run may be killed mid-write,
so a cache file is written to a temporary file in its own folder and renamed into place
(`os.replace` is atomic on one file system): a reader sees the old file, the new one, or none,
never half of one.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """`cache_dir`, else the environment variable RAYPO_CACHE, else ~/.cache/raypo."""
    root = cache_dir or os.environ.get("RAYPO_CACHE") or "~/.cache/raypo"
    return Path(root).expanduser()


def atomic_torch_save(obj: Any, path: Path) -> None:
    """`torch.save(obj, path)` through a temporary file in the same folder and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
