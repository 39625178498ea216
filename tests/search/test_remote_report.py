"""A report folder on object storage (a local S3-compatible server, moto on 127.0.0.1): what a
search writes goes to the bucket, whole, and a laptop reads it back from there."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

import raypo.reports as reports
from raypo.cli import app
from raypo.reports.writer import ReportWriter, read_table
from raypo.storage import RemotePath, StorageError, location


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.mark.timeout(60)
def test_a_remote_path_writes_whole_objects_and_copies_folders(s3_server, tmp_path):
    root = location(s3_server.uri("unit"))
    assert isinstance(root, RemotePath) and str(root) == "s3://raypo-test/unit"
    (root / "a" / "b.txt").write_text("hello")
    assert (root / "a" / "b.txt").read_text() == "hello"
    assert (root / "a").is_dir() and not (root / "a").is_file()
    assert not (root / "missing").exists()
    assert [p.name for p in (root / "a").iterdir()] == ["b.txt"]
    local = tmp_path / "model"
    (local / "sub").mkdir(parents=True)
    (local / "sub" / "w.bin").write_bytes(b"x" * 1000)
    (local / "raypo.json").write_text("{}")
    assert (root / "m").upload(local, last="raypo.json") == 1002
    (root / "m").copy_tree(root / "n", last="raypo.json")
    assert sorted((root / "n").files()) == [("raypo.json", 2), ("sub/w.bin", 1000)]
    (root / "n").download(tmp_path / "back")
    assert (tmp_path / "back" / "sub" / "w.bin").read_bytes() == b"x" * 1000
    (root / "n").rmtree()
    assert not (root / "n").exists()
    with pytest.raises(StorageError, match="ftp://"):
        location("ftp://host/x")
    assert location("~/r") == Path("~/r").expanduser()


@pytest.mark.timeout(60)
def test_tables_on_s3_are_read_back_by_load_select_and_pandas(s3_server):
    folder = location(s3_server.uri("tables", "demo"))
    writer = ReportWriter(folder, search="demo")
    writer.write_trial({"trial_id": "t1", "status": "ok", "objective": 0.5, "loss": "dpo"},
                       [{"step": 1, "train_loss": 0.7}])
    writer.write_trial({"trial_id": "t2", "status": "ok", "objective": 0.75, "loss": "dpo"})
    writer.write_meta({"kind": "search", "name": "demo", "status": "finished",
                       "objectives": [{"metric": "objective", "mode": "max"}]})
    assert sorted(s3_server.keys("tables/demo/")) == [
        "tables/demo/search.json", "tables/demo/steps.parquet", "tables/demo/trials.parquet"]
    report = reports.load(str(folder))
    assert list(report.trials["trial_id"]) == ["t1", "t2"] and report.status == "finished"
    assert report.best()["trial_id"] == "t2"
    assert read_table(folder / "steps.parquet")["train_loss"].tolist() == [0.7]
    # pandas reads the bucket itself, through pyarrow's S3 file system (the endpoint and
    # credentials from the environment alone)
    import pyarrow.fs

    fs, path = pyarrow.fs.FileSystem.from_uri(f"{folder}/trials.parquet")
    frame = pd.read_parquet(path, filesystem=fs)
    assert len(frame) == 2
    result = cli("select", str(folder), "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output.strip().splitlines()[-1])["best"][0]["trial_id"] == "t2"


@pytest.mark.timeout(30)
def test_an_unknown_scheme_for_reports_exits_2_naming_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    space = tmp_path / "s.yaml"
    space.write_text(yaml.safe_dump({"name": "x", "steps": 4}))
    result = cli("search", space, "--reports", "ftp://host/reports")
    assert result.exit_code == 2
    assert "--reports ftp://host/reports: unsupported storage ftp://" in result.output
    assert list(tmp_path.iterdir()) == [space]  # no folder named "ftp:" or anything else


# A whole search on S3 (kept models, caches, `raypo report` and `export` from the bucket):
# tests/cluster/test_multinode_search.py, on a cluster whose nodes share no disk.
