"""Report folders: one writer at a time (a lock, stale locks taken over), a training run never
writes into a search's report, read-only and damaged folders fail before any work, a full
disk leaves the previous tables whole, and `select` and the HTML page say when a report is
incomplete."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pandas as pd
import pytest

import raypo.train.setup as train_setup
from raypo.reports import ReportWriter, load
from raypo.reports.html import render_html
from raypo.reports.lock import NAME, LockedError, ReportLock
from raypo.reports.writer import ReportWriteError, write_json_atomic
from tests.faults.conftest import TINY, cli, files_under, last_error, write_yaml

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def no_model(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("training started before the report folder was checked")

    monkeypatch.setattr(train_setup, "fit_base_model", refuse)
    monkeypatch.setattr(train_setup, "load_policy", refuse)


def _config(tmp_path, name="run"):
    return write_yaml(tmp_path / f"{name}.yaml", name=name, **TINY)


def _snapshot(folder):
    return {p: (folder / p).read_bytes() for p in files_under(folder) if (folder / p).is_file()}


def _search_report(folder):
    writer = ReportWriter(folder, search=folder.name)
    writer.write_trial({"trial_id": "a_00000", "status": "ok", "objective": 0.5, "loss": "dpo"},
                       [{"step": 2, "loss": 0.6}])
    writer.write_meta({"kind": "search", "name": folder.name, "status": "finished",
                       "objectives": [{"metric": "true_reward", "mode": "max"}]})


def test_a_second_writer_of_a_report_is_refused_naming_the_holder(tmp_path, no_model):
    reports = tmp_path / "reports"
    with ReportLock(reports / "run", "search"):  # a live search of this name (this process)
        before = _snapshot(reports / "run")
        result = cli("train", _config(tmp_path), "--set", f"reports={reports}")
        assert result.exit_code == 2
        error = last_error(result)
        assert f"{reports / 'run'}: a search already writes this report" in error
        assert f"pid {os.getpid()}" in error
        result = cli("search", _config(tmp_path), "--reports", reports)
        assert result.exit_code == 2 and "a search already writes this report" in last_error(
            result)
        assert _snapshot(reports / "run") == before  # only the holder's lock
    assert not (reports / "run" / NAME).exists()


def test_a_lock_left_by_a_dead_run_is_taken_over_and_one_from_another_host_is_not(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (folder / NAME).write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid,
                                           "what": "search", "command": "raypo search x"}))
    with ReportLock(folder, "train") as lock:  # the dead pid's lock is stale
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    assert not (folder / NAME).exists()
    (folder / NAME).write_text(json.dumps({"host": "elsewhere", "pid": 1, "what": "search"}))
    with pytest.raises(LockedError, match="pid 1 on host elsewhere.*remove .*raypo.lock"):
        ReportLock(folder, "train").acquire()


def test_a_run_that_fails_releases_its_lock_and_leaves_no_empty_folder(tmp_path):
    reports = tmp_path / "reports"
    result = cli("train", _config(tmp_path), "--set", f"reports={reports}",
                 "--set", f"data={tmp_path / 'missing.jsonl'}")
    assert result.exit_code == 2 and "missing.jsonl" in last_error(result)
    assert not reports.exists()


def test_train_never_writes_into_a_search_report(tmp_path, no_model):
    reports = tmp_path / "reports"
    _search_report(reports / "run")
    before = _snapshot(reports / "run")
    result = cli("train", _config(tmp_path), "--set", f"reports={reports}")
    assert result.exit_code == 2
    assert f"{reports / 'run'}: the report of a search" in last_error(result)
    assert _snapshot(reports / "run") == before


@pytest.mark.parametrize("damaged", ["trials.parquet", "steps.parquet", "search.json"])
def test_train_with_a_damaged_report_fails_before_training(tmp_path, no_model, damaged):
    reports = tmp_path / "reports"
    (reports / "run").mkdir(parents=True)
    (reports / "run" / damaged).write_text("{not a table")
    result = cli("train", _config(tmp_path), "--set", f"reports={reports}")
    assert result.exit_code == 2
    error = last_error(result)
    assert f"{reports / 'run' / damaged}: not" in error and "restore or remove it" in error
    assert files_under(reports) == ["run", f"run/{damaged}"]


def test_train_into_a_read_only_folder_fails_before_training(tmp_path, no_model, readonly):
    reports = tmp_path / "reports"
    reports.mkdir()
    readonly(reports)
    result = cli("train", _config(tmp_path), "--set", f"reports={reports}")
    assert result.exit_code == 2
    assert f"{reports / 'run'}: cannot create the report folder" in last_error(result)


def test_search_into_a_read_only_folder_fails_before_any_work(tmp_path, no_model, readonly):
    reports = tmp_path / "reports"
    (reports / "run").mkdir(parents=True)
    readonly(reports)
    result = cli("search", _config(tmp_path), "--reports", reports)
    assert result.exit_code == 2
    assert f"{reports / 'run'}: cannot write there" in last_error(result)
    assert files_under(reports) == ["run"]


def test_report_to_a_read_only_out_folder_exits_2(tmp_path, readonly):
    _search_report(tmp_path / "run")
    out = tmp_path / "pages"
    out.mkdir()
    readonly(out)
    result = cli("report", tmp_path / "run", "--out", out / "page.html")
    assert result.exit_code == 2
    assert f"{out / 'page.html'}: cannot write" in last_error(result)
    assert files_under(out) == []


def test_a_damaged_search_json_is_named(tmp_path):
    _search_report(tmp_path / "run")
    (tmp_path / "run" / "search.json").write_text('{"kind": "search", "sta')
    for command in ("select", "report"):
        result = cli(command, tmp_path / "run")
        assert result.exit_code == 2
        assert f"{tmp_path / 'run' / 'search.json'}: not valid JSON" in last_error(result)


def test_a_full_disk_leaves_the_previous_tables_whole(tmpfs):
    disk = tmpfs("disk", size="1m")
    folder = disk.path / "run"
    writer = ReportWriter(folder, search="run")
    writer.write_trial({"trial_id": "a", "status": "ok", "objective": 0.5}, [{"step": 1}])
    before = _snapshot(folder)
    with open(disk.path / "filler", "wb") as f:  # fill the disk to the last block
        try:
            while True:
                f.write(b"\0" * 65536)
        except OSError:
            pass
    big = [{"step": i, "text": "x" * 1000} for i in range(2000)]
    with pytest.raises(ReportWriteError, match=r"steps.parquet: cannot write: No space left "
                                               r"on device \(the file is unchanged\)"):
        writer.write_trial({"trial_id": "b", "status": "ok", "objective": 0.7}, big)
    with pytest.raises(ReportWriteError, match=r"search.json: cannot write: No space left"):
        write_json_atomic(folder / "search.json", {"x": "y" * 2_000_000})
    assert _snapshot(folder) == before  # no temporary files, the old tables as they were
    assert list(writer.trials["trial_id"]) == ["a"]  # memory follows the disk
    os.unlink(disk.path / "filler")
    writer.write_trial({"trial_id": "b", "status": "ok", "objective": 0.7}, big[:10])
    assert sorted(load(folder).trials["trial_id"]) == ["a", "b"]


def test_select_and_the_html_page_say_a_report_is_incomplete(tmp_path):
    folder = tmp_path / "run"
    writer = ReportWriter(folder, search="run")
    for i, status in enumerate(["ok", "ok", "interrupted"]):
        writer.write_trial({"trial_id": f"t{i}", "status": status, "objective": 0.5 + i / 10,
                            "loss": "kernel_dpo", "kernel": "rbf", "divergence": "kl"})
    resume = "raypo search s.yaml --name run --reports r --samples 4 --resume"
    writer.write_meta({"kind": "search", "name": "run", "status": "incomplete",
                       "interrupted_by": "SIGINT", "resume": resume,
                       "settings": {"budget": {"trials": 4}},
                       "objectives": [{"metric": "true_reward", "mode": "max"}]})
    result = cli("select", folder)
    assert result.exit_code == 0, result.output
    note = ("note: this search is incomplete (interrupted by SIGINT): 2 of 4 trials ended; "
            f"1 interrupted; continue with: {resume}")
    assert note in result.output
    assert "incomplete (interrupted by SIGINT): 2 of 4 trials ended" in render_html(
        load(folder))
    meta = json.loads((folder / "search.json").read_text())
    write_json_atomic(folder / "search.json", {**meta, "status": "finished"})
    assert "incomplete" not in cli("select", folder).output
    assert "incomplete" not in render_html(load(folder))
    assert pd.read_parquet(folder / "trials.parquet")["status"].tolist()[-1] == "interrupted"
