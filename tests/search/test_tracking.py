"""Watching a search: `tracking:` / `--track` send each trial's config, evaluations and final
row to MLflow (a local SQLite store), W&B (offline) and TensorBoard through Ray Tune's logger
callbacks; a resumed search adds to its runs; a tracker whose package is missing stops the
search before anything runs; the per-trial line shows an ETA."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from raypo.search.interrupt import Interrupted, resume_command
from raypo.search.recorder import eta_seconds, format_duration
from raypo.search.space import SpaceError, parse_space
from raypo.search.tracking import parse_track, with_tracking

TINY = {"task": {"variant": "graded", "train_pairs": 64, "eval_pairs": 16, "base_steps": 20},
        "steps": 12, "batch_size": 8, "eval_every": 4, "eval_samples": 8, "warmup_steps": 2,
        "seed": 0, "loss": "dpo", "selection": {"enabled": False}}


@pytest.mark.timeout(10)
def test_eta_is_the_remaining_trials_over_concurrency_times_the_mean_wall_time():
    # 7 left, 2 at a time, trials of 30 s and 50 s (mean 40): 7 / 2 * 40 = 140 s
    assert eta_seconds(7, [30.0, 50.0], 2) == pytest.approx(140.0)
    assert eta_seconds(7, [30.0, 50.0], 2, time_left=100.0) == pytest.approx(100.0)  # capped
    assert eta_seconds(7, [30.0, 50.0], 2, time_left=-5.0) == 0.0  # the limit has passed
    assert eta_seconds(3, [10.0, 20.0, 60.0], 1) == pytest.approx(90.0)  # 3 x 30
    assert eta_seconds(0, [10.0], 4) == 0.0
    assert eta_seconds(5, [], 2) is None  # no trial ended: nothing to go by
    assert [format_duration(s) for s in (0.4, 45, 190, 3600 + 5 * 60 + 20)] == [
        "0s", "45s", "3m10s", "1h05m"]


@pytest.mark.timeout(10)
def test_tracking_shorthands_the_track_option_and_the_resume_command():
    base = {"name": "w", "loss": "dpo"}
    assert parse_space({**base, "tracking": "mlflow"}).settings.tracking.names == ["mlflow"]
    listed = parse_space({**base, "tracking": ["tensorboard", "mlflow"]}).settings.tracking
    assert listed.names == ["mlflow", "tensorboard"]
    full = parse_space({**base, "tracking": {"wandb": {"mode": "offline", "project": "p"},
                                             "mlflow": None}}).settings.tracking
    assert full.names == ["mlflow", "wandb"] and full.wandb.project == "p"
    with pytest.raises(SpaceError, match="tracking: unknown tracker 'comet'"):
        parse_space({**base, "tracking": ["comet"]}, "s.yaml")
    with pytest.raises(SpaceError, match=r"s.yaml: tracking.mlflow.uri: unknown key"):
        parse_space({**base, "tracking": {"mlflow": {"uri": "x"}}}, "s.yaml")

    assert parse_track(["mlflow,wandb", "mlflow", " tensorboard"]) == [
        "mlflow", "wandb", "tensorboard"]
    with pytest.raises(SpaceError, match="--track: unknown tracker 'tb'"):
        parse_track(["tb"])
    # --track adds to the space's trackers and keeps their settings
    space = with_tracking(parse_space({**base, "tracking": {"wandb": {"mode": "offline"}}}),
                          ["mlflow", "wandb"])
    assert space.settings.tracking.names == ["mlflow", "wandb"]
    assert space.settings.tracking.wandb.mode == "offline"
    assert "--track mlflow --track wandb --resume" in resume_command(space, "reports", None)
    # `raypo train` reads past the section
    assert parse_space({**base, "tracking": ["mlflow"]}).fixed_config().loss.name == "dpo"


MISSING = """
import json, sys
for module in {modules!r}:
    sys.modules[module] = None  # `import module` raises ImportError, as when not installed
from typer.testing import CliRunner
from raypo.cli import app
for args in {cases!r}:
    result = CliRunner().invoke(app, args)
    print(json.dumps([result.exit_code, result.output]))
"""


@pytest.mark.timeout(120)
def test_a_tracker_whose_package_is_missing_exits_2_naming_its_key_before_anything_runs(
        raypo_cache, tmp_path):
    space = tmp_path / "missing.yaml"
    space.write_text(yaml.safe_dump({"name": "missing", **TINY,
                                     "tracking": {"tensorboard": {}}}))
    bare = tmp_path / "bare.yaml"
    bare.write_text(yaml.safe_dump({"name": "bare", **TINY}))
    reports = str(tmp_path / "reports")
    cases = [["search", str(bare), "--reports", reports, "--track", "mlflow"],
             ["search", str(space), "--reports", reports]]
    env = {**os.environ, "RAYPO_CACHE": str(raypo_cache), "RAY_USAGE_STATS_ENABLED": "0"}
    # one process for both (its imports take seconds): a real failed import of each package
    done = subprocess.run(
        [sys.executable, "-c", MISSING.format(modules=["mlflow", "tensorboardX"],
                                              cases=cases)],
        env=env, capture_output=True, text=True, timeout=100)
    assert done.returncode == 0, done.stderr[-3000:]
    (code, output), (code2, output2) = (json.loads(line) for line in
                                        done.stdout.strip().splitlines()[-2:])
    assert code == 2 and ("tracking.mlflow: needs the mlflow package: pip install "
                          "'raypo[mlflow]'") in output, output
    assert code2 == 2 and ("tracking.tensorboard: needs the tensorboardX package: pip "
                           "install 'raypo[tensorboard]'") in output2, output2
    # nothing ran: no report folder, no caches, no Ray
    assert not (tmp_path / "reports").exists()
    assert "shared caches" not in output + output2 + done.stderr


def read_events(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value)]} of the TensorBoard event files under `folder` (TFRecord
    framing: length, its CRC, the Event proto, its CRC), read with tensorboardX's protos."""
    from tensorboardX.proto.event_pb2 import Event

    scalars: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(folder.rglob("events.out.tfevents.*")):
        data, at = path.read_bytes(), 0
        while at + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[at:at + 8])
            event = Event.FromString(data[at + 12:at + 12 + length])
            at += 12 + length + 4
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def wandb_runs(folder: Path) -> dict[str, list[Path]]:
    """{run id: its offline run folders} (`offline-run-<time>-<id>`: one per start)."""
    runs: dict[str, list[Path]] = {}
    for run in sorted(folder.glob("wandb/offline-run-*")):
        runs.setdefault(run.name.split("-", 3)[3], []).append(run)
    return runs


def wandb_history(run: Path) -> list[dict]:
    """The rows `wandb.log` wrote to an offline run's `.wandb` file (LevelDB's log format:
    32 KiB blocks of records with a 7-byte header, after W&B's own 7-byte header), with W&B's
    protos."""
    from wandb.proto import wandb_internal_pb2

    (path,) = run.glob("*.wandb")
    data, at, pending, rows = path.read_bytes(), 7, b"", []
    while at + 7 <= len(data):
        if 32768 - at % 32768 < 7:  # a block's tail too short for a header is padding
            at += 32768 - at % 32768
            continue
        length, kind = struct.unpack("<HB", data[at + 4:at + 7])
        chunk, at = data[at + 7:at + 7 + length], at + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk  # full/first, middle/last
        if kind in (1, 4):
            record = wandb_internal_pb2.Record.FromString(pending)
            if record.WhichOneof("record_type") == "history":
                rows.append({"/".join(i.nested_key) or i.key: json.loads(i.value_json)
                             for i in record.history.item})
    return rows


def interrupt_when(condition, timeout: float = 120) -> threading.Thread:
    """SIGINT to this process (Ctrl-C to the search) once `condition()` holds."""
    def watch():
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if condition():
                    os.kill(os.getpid(), signal.SIGINT)
                    return
            except Exception:  # the store is being created: try again
                pass
            time.sleep(0.1)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_trials_reach_mlflow_wandb_and_tensorboard_and_a_resume_adds_to_their_runs(
        ray_session, tmp_path, monkeypatch, capfd):
    from mlflow.tracking import MlflowClient

    from raypo.search.run import run_search

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tree = {"name": "watched", **TINY, "steps": 24, "eval_every": 6,
            "budget": {"trials": 3, "concurrency": 1}, "sampler": {"name": "grid"},
            "lr": {"choice": [1.0e-3, 3.0e-3, 1.0e-2]},
            "tracking": {"mlflow": {}, "tensorboard": {}}}
    space = with_tracking(parse_space(tree, "watched.yaml"), ["wandb"])  # as --track wandb
    report = tmp_path / "reports" / "watched"
    store = f"sqlite:///{report}/tracking/mlflow.db"

    def runs():
        client = MlflowClient(tracking_uri=store)
        experiment = client.get_experiment_by_name("watched")
        return client.search_runs([experiment.experiment_id]) if experiment else []

    # Ctrl-C while the second trial runs (its MLflow run started), then --resume: the
    # restored trial must go on in its run, not start another
    watcher = interrupt_when(lambda: len(runs()) >= 2 and (report / "trials.parquet").exists())
    with pytest.raises(Interrupted):
        run_search(space, reports=tmp_path / "reports")
    watcher.join(timeout=5)
    first = pd.read_parquet(report / "trials.parquet")
    assert (first["status"] == "interrupted").any(), first[["trial_id", "status"]]
    assert len(runs()) == 2

    directory, finished = run_search(space, reports=tmp_path / "reports", resume=True)
    assert finished
    trials = pd.read_parquet(report / "trials.parquet").set_index("trial_id")
    assert len(trials) == 3 and set(trials["status"]) == {"ok"}

    # MLflow: one run per trial, the experiment named after the search
    client = MlflowClient(tracking_uri=store)
    found = runs()
    by_trial = {r.data.tags["raypo.trial_id"]: r for r in found}
    assert len(found) == 3 and set(by_trial) == set(trials.index)
    for trial_id, run in by_trial.items():
        assert run.info.status == "FINISHED" and run.data.tags["raypo.status"] == "ok"
        assert run.data.tags["raypo.search"] == "watched"
        assert run.data.tags["raypo.row.loss"] == "dpo"  # the row's words, as tags
        assert float(run.data.params["lr"]) == trials.loc[trial_id, "lr"]  # the config
        # the final objective, and every evaluation at its training step
        assert run.data.metrics["objective"] == pytest.approx(trials.loc[trial_id,
                                                                         "objective"])
        history = client.get_metric_history(run.info.run_id, "true_reward")
        assert sorted({m.step for m in history}) == [6, 12, 18, 24], history
    steps = pd.read_parquet(report / "steps.parquet")
    last = steps[steps["step"] == 18].set_index("trial_id")["true_reward"]
    for trial_id, run in by_trial.items():
        history = client.get_metric_history(run.info.run_id, "true_reward")
        assert [m.value for m in history if m.step == 18][-1] == pytest.approx(
            last[trial_id])

    # TensorBoard: a folder per trial under the report, the evaluations at their steps
    board = report / "tracking" / "tensorboard"
    folders = sorted(p for p in board.iterdir() if p.is_dir())
    assert len(folders) == 3
    for folder in folders:
        trial_id = next(t for t in trials.index if t in folder.name)
        scalars = read_events(folder)
        assert sorted({s for s, _ in scalars["ray/tune/true_reward"]}) == [6, 12, 18, 24]
        assert scalars["ray/tune/objective"][-1][1] == pytest.approx(
            trials.loc[trial_id, "objective"])

    # W&B (offline): a run id per trial, `<search>-<trial_id>`, the resumed trial's second
    # start under the same id; its files hold the config and the metrics
    offline = wandb_runs(tmp_path / "wandb-dir")
    assert set(offline) == {f"watched-{t}" for t in trials.index}, offline
    assert sum(len(v) for v in offline.values()) in (3, 4)  # the resumed trial's restart
    for name, folders_of_run in offline.items():
        trial_id = name.removeprefix("watched-")
        rows = [r for f in folders_of_run for r in wandb_history(f)]
        assert {r["step"] for r in rows} == {6, 12, 18, 24}, rows
        assert rows[-1]["objective"] == pytest.approx(trials.loc[trial_id, "objective"])
        assert rows[-1]["lr"] == trials.loc[trial_id, "lr"]

    # the terminal's line per trial, with the ETA while trials remain
    err = capfd.readouterr().err
    assert "[1/3] " in err and "ETA " in err, err[-3000:]
