"""Searches that go wrong: a misspelt objective metric and resources the cluster can never give
are errors before any trial; Ctrl-C records the unfinished trials as interrupted and exits 130,
a second search of the same name is refused meanwhile, a full disk stops the search with the
tables whole, and `--resume` finishes the same experiment, every trial once. SIGTERM stops a
training run with nothing written."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

import raypo.search.run  # noqa: F401 - imported before the clock runs (the lock checks)
from tests.faults.conftest import TINY, can_mount, cli, files_under, last_error, write_yaml

LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}


def _space(tmp_path, name, **tree):
    return write_yaml(tmp_path / f"{name}.yaml", name=name, **{**TINY, **tree})


@pytest.mark.timeout(300)
def test_a_misspelt_objective_metric_is_an_error_before_any_trial(tmp_path):
    space = _space(tmp_path, "typo", objective={"metric": "true_rewrd"},
                   selection={"enabled": False}, loss={"name": "dpo",
                                                       "beta": {"choice": [0.1, 0.2]}})
    result = cli("search", space, "--reports", tmp_path / "reports")
    assert result.exit_code == 2, result.output
    error = last_error(result)
    assert "typo.yaml: objective.metric: no trial reports a metric 'true_rewrd'" in error
    assert "did you mean true_reward" in error and "pref_accuracy" in error
    assert not (tmp_path / "reports").exists()  # no trial, no report


@pytest.mark.timeout(300)
@pytest.mark.parametrize(("resources", "expected"), [
    ({"cpus": 64}, "resources.cpus: a trial asks for 64 CPU(s) but the Ray cluster has 2"),
    ({"gpus": 1}, "resources.gpus: a trial asks for 1 GPU(s) but the Ray cluster has 0"),
    ({"workers": 4}, "resources.workers: a trial asks for 4 workers x 1 CPU(s)"),
])
def test_resources_a_local_cluster_can_never_give_are_an_error(ray_session, tmp_path,
                                                              resources, expected):
    space = _space(tmp_path, "big", resources=resources, selection={"enabled": False},
                   loss="dpo")
    result = cli("search", space, "--reports", tmp_path / "reports")
    assert result.exit_code == 2, result.output
    assert expected in last_error(result) and "would wait for ever" in last_error(result)
    assert files_under(tmp_path / "reports") in ([], ["big"])  # no table, no search.json


def test_a_missing_model_folder_in_a_search_is_an_error(tmp_path):
    space = _space(tmp_path, "m", loss="dpo")
    result = cli("search", space, "--model", "/nonexistent", "--data", space,
                 "--reports", tmp_path / "reports")
    assert result.exit_code == 2
    assert "m.yaml: model: /nonexistent: no such folder" in last_error(result)
    assert not (tmp_path / "reports").exists()


# --- processes --------------------------------------------------------------------------------

def _env(cache) -> dict:
    return {**os.environ, "RAYPO_CACHE": str(cache), "RAY_AUTH_MODE": "disabled",
            "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}


def _wait(predicate, timeout: float, process=None, what=""):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the process ended (rc {process.returncode}) before {what}")
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def _rows(folder: Path) -> pd.DataFrame:
    path = folder / "trials.parquet"
    for _ in range(5):  # a rename may land between exists() and read
        with contextlib.suppress(FileNotFoundError, OSError):
            return pd.read_parquet(path) if path.exists() else pd.DataFrame()
        time.sleep(0.1)
    return pd.DataFrame()


def _listening(pid: int) -> set[str]:
    import psutil

    tree = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    out = set()
    for process in tree:
        with contextlib.suppress(psutil.Error):
            for c in process.net_connections(kind="inet"):
                if c.status == psutil.CONN_LISTEN:
                    out.add(c.laddr.ip)
    return out


def _fill(folder: Path) -> Path:
    filler = folder / "filler"
    f = open(filler, "wb")  # noqa: SIM115 - its close may fail on the full disk too
    try:
        while True:
            f.write(b"\0" * 65536)
            f.flush()
    except OSError:
        pass
    with contextlib.suppress(OSError):
        f.close()
    return filler


@contextlib.contextmanager
def _process(command, env, log: Path):
    with open(log, "w") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    try:
        yield process
    finally:
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.skipif(not can_mount(), reason="the full-disk stage mounts a tmpfs (root)")
def test_interrupt_same_name_full_disk_and_resume(raypo_cache, tmp_path, tmpfs):
    disk = tmpfs("disk", size="24m")
    reports = disk.path / "reports"
    space = _space(tmp_path, "honest", steps=40, eval_every=20, budget={"trials": 4,
                   "concurrency": 1}, selection={"enabled": False},
                   loss={"name": "dpo", "beta": {"low": 0.05, "high": 0.5, "log": True}})
    folder = reports / "honest"
    command = [sys.executable, "-m", "raypo", "search", str(space), "--reports", str(reports)]
    env = _env(raypo_cache)

    # 1. Ctrl-C (SIGINT to the process group, as a terminal sends it) while trial 2 runs
    with _process(command, env, tmp_path / "first.log") as driver:
        _wait(lambda: len(_rows(folder)) >= 1, 300, driver, "the first trial's row")
        listening = _listening(driver.pid)
        assert listening and listening <= LOOPBACK, listening  # a local Ray: loopback only
        second = cli("search", space, "--reports", reports)  # the same name, meanwhile
        assert second.exit_code == 2 and "a search already writes this report" in (
            last_error(second))
        train = cli("train", space, "--set", f"reports={reports}")  # a space: not a config
        assert train.exit_code == 2 and "loss.beta: a range or choice" in last_error(train)
        fixed = write_yaml(tmp_path / "fixed.yaml", name="honest", **TINY)
        train = cli("train", fixed, "--set", f"reports={reports}")
        assert train.exit_code == 2 and "already writes this report" in last_error(train)
        os.killpg(driver.pid, signal.SIGINT)
        driver.wait(timeout=120)
    log = (tmp_path / "first.log").read_text()
    assert driver.returncode == 130, log[-3000:]
    assert "interrupted by SIGINT" in log and "--resume" in log
    first = _rows(folder)
    assert "pruned" not in set(first["status"]), first[["trial_id", "status"]]
    assert (first["status"] == "interrupted").sum() >= 1 and (first["status"] == "ok").sum() >= 1
    meta = json.loads((folder / "search.json").read_text())
    assert meta["status"] == "incomplete" and meta["interrupted_by"] == "SIGINT"
    assert meta["resume"].endswith("--resume") and not (folder / ".raypo.lock").exists()
    selected = cli("select", folder)
    assert "note: this search is incomplete (interrupted by SIGINT)" in selected.output
    resume = [sys.executable, "-m", "raypo", *meta["resume"].split()[1:]]

    # 2. a full disk: refused before any work; then filled mid-run: stopped, tables whole
    filler = _fill(disk.path)
    before = (folder / "trials.parquet").read_bytes()
    full = subprocess.run(resume, env=env, capture_output=True, text=True, timeout=120)
    assert full.returncode == 2 and "No space left on device" in full.stderr, full.stderr[-2000:]
    os.unlink(filler)
    with _process(resume, env, tmp_path / "second.log") as driver:
        _wait(lambda: (_rows(folder)["status"] == "ok").sum() > (first["status"] == "ok").sum(),
              300, driver, "a resumed trial's row")
        filler = _fill(disk.path)
        driver.wait(timeout=300)
    log = (tmp_path / "second.log").read_text()
    assert driver.returncode == 2, log[-3000:]
    assert "No space left on device" in log and "continue with: raypo search" in log
    middle = _rows(folder)  # readable, and every row it had before is still there
    assert set(first["trial_id"]) <= set(middle["trial_id"]) and before != b""
    assert not [p for p in files_under(folder) if p.endswith(".tmp")]
    os.unlink(filler)

    # 3. --resume after freeing space: the same experiment, every trial exactly once
    done = subprocess.run(resume, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    after = _rows(folder)
    assert len(after) == 4 and after["trial_id"].is_unique, after[["trial_id", "status"]]
    assert set(after["status"]) == {"ok"}
    assert sorted(after["number"]) == [1, 2, 3, 4]  # no trial repeated under a new number
    ok_first = first[first["status"] == "ok"].set_index("trial_id")["objective"]
    assert after.set_index("trial_id").loc[ok_first.index, "objective"].tolist() == (
        pytest.approx(ok_first.tolist()))
    assert json.loads((folder / "search.json").read_text())["status"] == "finished"
    assert "incomplete" not in cli("select", folder).output


@pytest.mark.timeout(300)
def test_sigterm_stops_a_training_run_with_nothing_written(raypo_cache, tmp_path):
    config = write_yaml(tmp_path / "long.yaml", name="long", **{**TINY, "steps": 100000,
                                                                 "eval_every": 100000})
    reports = tmp_path / "reports"
    command = [sys.executable, "-m", "raypo", "train", str(config), "--set",
               f"reports={reports}"]
    with _process(command, _env(raypo_cache), tmp_path / "train.log") as run:
        _wait(lambda: "train dpo" in (tmp_path / "train.log").read_text(), 240, run,
              "the first training step")
        run.send_signal(signal.SIGTERM)
        run.wait(timeout=60)
    log = (tmp_path / "train.log").read_text()
    assert run.returncode == 143, log[-2000:]
    assert "interrupted by SIGTERM" in log and "nothing was written" in log
    assert not reports.exists()  # no report, no lock, no empty folder
