"""Loading preference data: the three TRL formats, every file kind, fingerprints, and errors
that name the file, the column and the row."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import datasets
import pandas as pd
import pytest

from raypo.data import DataError, data_fingerprint, load_preferences
from raypo.data import preference as preference_module


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


STANDARD = [
    {"prompt": "2+2=", "chosen": "4", "rejected": "5"},
    {"prompt": "Capital of France?", "chosen": "Paris", "rejected": "Lyon", "score": 3},
]
CONVERSATIONAL = [
    {"prompt": [user("hi")], "chosen": [assistant("hello")], "rejected": [assistant("go away")]},
    {
        "prompt": [{"role": "system", "content": "be brief"}, user("2+2?")],
        "chosen": [assistant("4")],
        "rejected": [assistant("5")],
    },
]
IMPLICIT = [
    {
        "chosen": [user("hi"), assistant("hello"), user("name?"), assistant("raypo")],
        "rejected": [user("hi"), assistant("hello"), user("name?"), assistant("no")],
    },
]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_json(path: Path, rows: list) -> Path:
    path.write_text(json.dumps(rows))
    return path


def write_parquet(path: Path, rows: list) -> Path:
    pd.DataFrame(rows).to_parquet(path)
    return path


WRITERS = {"jsonl": write_jsonl, "json": write_json, "parquet": write_parquet}


@pytest.mark.parametrize("kind", WRITERS)
def test_standard_text_loads_from_every_file_kind(tmp_path, kind):
    path = WRITERS[kind](tmp_path / f"prefs.{kind}", STANDARD)
    ds = load_preferences(path)
    assert ds.column_names == ["prompt", "chosen", "rejected"]  # extra columns dropped
    assert ds.to_list() == [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in STANDARD]


@pytest.mark.parametrize("kind", WRITERS)
def test_conversational_loads_from_every_file_kind(tmp_path, kind):
    path = WRITERS[kind](tmp_path / f"prefs.{kind}", CONVERSATIONAL)
    assert load_preferences(path).to_list() == CONVERSATIONAL


def test_implicit_prompt_is_the_longest_shared_prefix_of_messages(tmp_path):
    ds = load_preferences(write_jsonl(tmp_path / "p.jsonl", IMPLICIT))
    assert ds.to_list() == [
        {
            "prompt": [user("hi"), assistant("hello"), user("name?")],
            "chosen": [assistant("raypo")],
            "rejected": [assistant("no")],
        }
    ]


def test_implicit_prompt_of_identical_conversations_leaves_the_last_message(tmp_path):
    row = {"chosen": [user("hi"), assistant("yo")], "rejected": [user("hi"), assistant("yo")]}
    ds = load_preferences(write_jsonl(tmp_path / "p.jsonl", [row]))
    assert ds[0] == {"prompt": [user("hi")], "chosen": [assistant("yo")],
                     "rejected": [assistant("yo")]}


def test_chosen_identical_to_rejected_is_allowed(tmp_path):
    row = {"prompt": "p", "chosen": "same", "rejected": "same"}
    assert len(load_preferences(write_jsonl(tmp_path / "p.jsonl", [row]))) == 1


def test_json_object_of_columns_is_read_like_records(tmp_path):
    path = tmp_path / "p.json"
    columns = {"prompt": ["a", "b"], "chosen": ["c", "d"], "rejected": ["e", "f"]}
    path.write_text(json.dumps(columns))
    assert load_preferences(path)["chosen"][:] == ["c", "d"]


def test_folder_is_read_in_name_order_and_ignores_other_files(tmp_path):
    write_parquet(tmp_path / "b.parquet", STANDARD[1:])
    write_parquet(tmp_path / "a.parquet", STANDARD[:1])
    (tmp_path / "README.md").write_text("not data")
    assert load_preferences(tmp_path)["prompt"][:] == ["2+2=", "Capital of France?"]


def test_fingerprint_of_a_file_is_the_sha256_of_its_bytes(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", STANDARD)
    expected = hashlib.sha256(path.read_bytes()).hexdigest()
    assert data_fingerprint(path) == expected
    assert load_preferences(path)._fingerprint == expected


def test_folder_fingerprint_changes_with_names_and_contents(tmp_path):
    folder = tmp_path / "prefs"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", STANDARD)
    first = data_fingerprint(folder)
    assert load_preferences(folder)._fingerprint == first
    assert data_fingerprint(folder) == first  # stable
    (folder / "a.jsonl").rename(folder / "b.jsonl")
    renamed = data_fingerprint(folder)
    write_jsonl(folder / "b.jsonl", STANDARD[:1])
    changed = data_fingerprint(folder)
    assert len({first, renamed, changed}) == 3


def test_hub_name_is_loaded_with_datasets_and_keeps_its_fingerprint(monkeypatch):
    hub = datasets.Dataset.from_list(CONVERSATIONAL)
    calls = []

    def fake_load(name, split):
        calls.append((name, split))
        return hub

    monkeypatch.setattr(preference_module.datasets, "load_dataset", fake_load)
    ds = load_preferences("someone/prefs")
    assert calls == [("someone/prefs", "train")]
    assert ds.to_list() == CONVERSATIONAL
    assert ds._fingerprint == hub._fingerprint == data_fingerprint("someone/prefs")


def test_missing_local_path_and_failed_hub_load_say_both(monkeypatch, tmp_path):
    def offline(name, split):
        raise ConnectionError("no network here")

    monkeypatch.setattr(preference_module.datasets, "load_dataset", offline)
    missing = str(tmp_path / "nope.jsonl")
    with pytest.raises(DataError) as err:
        load_preferences(missing)
    message = str(err.value)
    assert missing in message
    assert "does not exist locally" in message
    assert "no network here" in message


# Each case: rows, the column and row the error must name, and a phrase of what was expected.
ROW_ERRORS = {
    "chosen is a number": (
        [STANDARD[0], {"prompt": "p", "chosen": 42, "rejected": "r"}], "chosen", 1, "string"),
    "prompt is a list in text data": (
        [STANDARD[0], {"prompt": [user("x")], "chosen": "c", "rejected": "r"}], "prompt", 1,
        "string"),
    "prompt is missing in one row": (
        [STANDARD[0], {"chosen": "c", "rejected": "r"}], "prompt", 1, "got NoneType"),
    "empty prompt string": (
        [{"prompt": "", "chosen": "c", "rejected": "r"}], "prompt", 0, "non-empty"),
    "empty chosen string": (
        [STANDARD[0], {"prompt": "p", "chosen": "", "rejected": "r"}], "chosen", 1, "non-empty"),
    "empty rejected string": (
        [{"prompt": "p", "chosen": "c", "rejected": ""}], "rejected", 0, "non-empty"),
    "message without content": (
        [CONVERSATIONAL[0], {**CONVERSATIONAL[0], "prompt": [{"role": "user"}]}], "prompt", 1,
        "'role' and 'content'"),
    "message without role": (
        [CONVERSATIONAL[0], {**CONVERSATIONAL[0], "chosen": [{"content": "x"}]}], "chosen", 1,
        "'role' and 'content'"),
    "unknown role": (
        [{**CONVERSATIONAL[0], "rejected": [{"role": "assitant", "content": "x"}]}], "rejected",
        0, "unknown role 'assitant'"),
    "empty response message list": (
        [CONVERSATIONAL[1], {**CONVERSATIONAL[0], "rejected": []}], "rejected", 1,
        "non-empty list"),
    "empty prompt message list": (
        [{**CONVERSATIONAL[0], "prompt": []}], "prompt", 0, "non-empty list"),
    "text response in conversational data": (
        [CONVERSATIONAL[0], {**CONVERSATIONAL[0], "chosen": "hello"}], "chosen", 1,
        "list of"),
    "response opens with a user message": (
        [{**CONVERSATIONAL[0], "chosen": [user("x")]}], "chosen", 0, "expected 'assistant'"),
    "chosen is neither text nor messages": (
        [{"prompt": "p", "chosen": {"a": 1}, "rejected": "r"}], "chosen", 0,
        "string (standard format) or a list of messages"),
    "implicit prompt with nothing shared": (
        [IMPLICIT[0], {"chosen": [user("a"), assistant("b")],
                       "rejected": [user("c"), assistant("d")]}], "chosen", 1,
        "add a 'prompt' column"),
}


@pytest.mark.parametrize("kind", ["jsonl", "json"])
@pytest.mark.parametrize("case", ROW_ERRORS)
def test_bad_rows_are_reported_with_file_column_and_row(tmp_path, kind, case):
    rows, column, row, expected = ROW_ERRORS[case]
    path = WRITERS[kind](tmp_path / f"bad.{kind}", rows)
    with pytest.raises(DataError) as err:
        load_preferences(path)
    message = str(err.value)
    assert str(path) in message
    assert f"column {column!r}" in message
    assert f"row {row}:" in message
    assert expected in message


def test_null_in_parquet_is_reported_with_file_column_and_row(tmp_path):
    path = write_parquet(
        tmp_path / "bad.parquet",
        [STANDARD[0], {"prompt": "p", "chosen": "c", "rejected": None}],
    )
    with pytest.raises(DataError, match=r"bad\.parquet, column 'rejected', row 1: .*NoneType"):
        load_preferences(path)


def test_error_in_a_folder_names_the_file_inside_it(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", STANDARD)
    write_jsonl(tmp_path / "b.jsonl", [{"prompt": "p", "chosen": 1.5, "rejected": "r"}])
    with pytest.raises(DataError, match=r"b\.jsonl, column 'chosen', row 0: expected a string"):
        load_preferences(tmp_path)


def test_missing_columns_are_listed_with_the_present_ones(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "p", "answer": "a"}])
    with pytest.raises(DataError) as err:
        load_preferences(path)
    message = str(err.value)
    assert str(path) in message
    assert "missing column(s) 'chosen', 'rejected'" in message
    assert "present columns: 'prompt', 'answer'" in message


def test_text_data_without_prompt_column_is_a_missing_column(tmp_path):
    path = write_parquet(tmp_path / "p.parquet", [{"chosen": "c", "rejected": "r"}])
    with pytest.raises(DataError, match=r"p\.parquet: missing column\(s\) 'prompt'"):
        load_preferences(path)


def test_empty_dataset_is_an_error(tmp_path):
    path = tmp_path / "empty.parquet"
    pd.DataFrame({"prompt": [], "chosen": [], "rejected": []}).to_parquet(path)
    with pytest.raises(DataError, match=r"empty\.parquet: the dataset has no rows"):
        load_preferences(path)


def test_invalid_json_line_is_reported_with_its_row_and_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(STANDARD[0]) + "\n\n{not json\n")
    with pytest.raises(DataError, match=r"p\.jsonl, row 1: invalid JSON on line 3"):
        load_preferences(path)


def test_folder_mixing_file_kinds_is_an_error(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", STANDARD)
    write_parquet(tmp_path / "b.parquet", STANDARD)
    with pytest.raises(DataError, match=r"mixes file types \(\.jsonl, \.parquet\)"):
        load_preferences(tmp_path)


def test_folder_mixing_formats_is_an_error(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", STANDARD)
    write_jsonl(tmp_path / "b.jsonl", CONVERSATIONAL)
    with pytest.raises(DataError, match=r"b\.jsonl: the rows are in conversational format"):
        load_preferences(tmp_path)


def test_unsupported_file_type_is_an_error(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("prompt,chosen,rejected\n")
    with pytest.raises(DataError, match=r"p\.csv: unsupported file type '\.csv'"):
        load_preferences(path)
