"""Load a preference dataset (local file, folder or hub name) into prompt/chosen/rejected.

Local files are read with the standard library and pyarrow, not `datasets.load_dataset`, so
that a bad row is reported with its file and row number (Arrow's type inference would fail
first, with a message about casting) and so that nothing is written to the Hugging Face cache.
The returned `datasets.Dataset` carries the data fingerprint as its `_fingerprint`, which
`tokenize_pairs` uses as its cache key.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa
import pyarrow.parquet as pq

from raypo.data.errors import DataError
from raypo.data.formats import COLUMNS, Format, normalize_rows

SUFFIXES = (".jsonl", ".json", ".parquet")

_MESSAGES = datasets.List({"role": datasets.Value("string"), "content": datasets.Value("string")})
FEATURES: dict[Format, datasets.Features] = {
    "standard": datasets.Features({c: datasets.Value("string") for c in COLUMNS}),
    "conversational": datasets.Features({c: _MESSAGES for c in COLUMNS}),
}


def load_preferences(source: str | Path) -> datasets.Dataset:
    """The preference pairs of `source`, checked and normalised to prompt/chosen/rejected.

    `source` is a `.jsonl`, `.json` (a list of records or an object of columns) or `.parquet`
    file, a folder of such files (one kind; read in name order; other files are ignored), or
    else a hub dataset name, loaded with `datasets.load_dataset(name, split="train")`.
    Rows are in standard text or conversational format (see `raypo.data.formats`); implicit
    prompts are made explicit. Raises `DataError` naming the file, column and row of a bad value.
    `result._fingerprint == data_fingerprint(source)`.
    """
    path = Path(source).expanduser()
    if not path.exists():
        hub = _load_hub(str(source))
        fmt, columns = normalize_rows(hub.to_list(), hub.column_names, str(source))
        return _dataset(fmt, columns, hub._fingerprint)

    files = _data_files(path)
    fmt: Format | None = None
    merged: dict[str, list] = {c: [] for c in COLUMNS}
    digests = []
    for file in files:
        data = file.read_bytes()
        digests.append(hashlib.sha256(data).hexdigest())
        rows, present = _parse(data, file)
        if not rows and path.is_dir():
            continue  # an empty shard is harmless; an empty dataset is caught below
        file_fmt, columns = normalize_rows(rows, present, str(file))
        if fmt is not None and file_fmt != fmt:
            raise DataError.at(
                file, None, None,
                f"the rows are in {file_fmt} format but earlier files in {path} are {fmt}; "
                f"a folder must hold one format",
            )
        fmt = file_fmt
        for c in COLUMNS:
            merged[c].extend(columns[c])
    if fmt is None:
        raise DataError.at(path, None, None, "the dataset has no rows (every file is empty)")
    return _dataset(fmt, merged, _combine(path, files, digests))


def data_fingerprint(source: str | Path) -> str:
    """sha256 of a local file's bytes; for a folder, of its data files' names and contents;
    for a hub dataset, the `_fingerprint` `datasets` gives it."""
    path = Path(source).expanduser()
    if not path.exists():
        return _load_hub(str(source))._fingerprint
    files = _data_files(path)
    return _combine(path, files, [hashlib.sha256(f.read_bytes()).hexdigest() for f in files])


def _combine(path: Path, files: list[Path], digests: list[str]) -> str:
    if path.is_file():
        return digests[0]
    h = hashlib.sha256()
    for file, digest in zip(files, digests, strict=True):
        h.update(f"{file.name}\0{digest}\0".encode())
    return h.hexdigest()


def _dataset(fmt: Format, columns: dict[str, list], fingerprint: str) -> datasets.Dataset:
    dataset = datasets.Dataset.from_dict(columns, features=FEATURES[fmt])
    # `datasets` would hash the in-memory table; the source's own fingerprint says the same
    # thing more cheaply, and is what `data_fingerprint` returns without loading anything.
    dataset._fingerprint = fingerprint
    return dataset


def _data_files(path: Path) -> list[Path]:
    if path.is_file():
        if path.suffix not in SUFFIXES:
            raise DataError.at(
                path, None, None,
                f"unsupported file type {path.suffix!r}; expected one of {', '.join(SUFFIXES)}",
            )
        return [path]
    files = sorted(
        p for p in path.iterdir()
        if p.is_file() and p.suffix in SUFFIXES and not p.name.startswith(".")
    )
    if not files:
        raise DataError.at(
            path, None, None, f"the folder holds no {', '.join(SUFFIXES)} files"
        )
    kinds = sorted({p.suffix for p in files})
    if len(kinds) > 1:
        raise DataError.at(
            path, None, None,
            f"the folder mixes file types ({', '.join(kinds)}); expected files of one kind",
        )
    return files


def _parse(data: bytes, file: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """The rows of one file and its columns (ordered as first seen)."""
    if file.suffix == ".parquet":
        try:
            table = pq.read_table(io.BytesIO(data))
        except (pa.ArrowException, OSError) as e:
            raise DataError.at(file, None, None, f"not a readable Parquet file: {e}") from None
        return table.to_pylist(), table.column_names
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise DataError.at(file, None, None, f"line {line}: not UTF-8 text (byte "
                           f"0x{data[e.start]:02x}); JSON files must be UTF-8") from None
    if file.suffix == ".jsonl":
        rows = []
        for line_no, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError.at(
                    file, None, len(rows), f"invalid JSON on line {line_no}: {e}"
                ) from e
    else:
        try:
            loaded = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError.at(file, None, None, f"invalid JSON: {e}") from e
        rows = _json_records(loaded, file)
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError.at(file, None, i, f"expected a JSON object, got {type(row).__name__}")
    columns = list(dict.fromkeys(key for row in rows for key in row))
    return rows, columns


def _json_records(loaded: Any, file: Path) -> list[Any]:
    """A `.json` file is a list of records, or an object of equally long column lists (what
    `pandas.DataFrame.to_json(orient="columns")` would be without the index)."""
    if isinstance(loaded, list):
        return loaded
    if isinstance(loaded, dict) and all(isinstance(v, list) for v in loaded.values()):
        sizes = {len(v) for v in loaded.values()}
        if len(sizes) <= 1:
            n = sizes.pop() if sizes else 0
            return [{k: v[i] for k, v in loaded.items()} for i in range(n)]
    raise DataError.at(
        file, None, None,
        "expected a list of records or an object of equally long column lists",
    )


def _load_hub(name: str) -> datasets.Dataset:
    try:
        return datasets.load_dataset(name, split="train")
    except Exception as e:  # any failure means the same thing to the user: no such data
        raise DataError(
            f"{name}: does not exist locally, and loading it as a hub dataset "
            f"(split 'train') failed: {type(e).__name__}: {e}"
        ) from e

