"""A one-worker trial survives its process: killed mid-trial (SIGKILL, as a reclaimed spot
node would), Tune retries it, it resumes from its last checkpoint, and it ends where the same
trial run without a kill ends."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from raypo.cli import app
from raypo.reports.schema import trial_row
from raypo.search.space import load_space
from raypo.train.run import run_trial

# beta_dpo: the loss has adaptive state (its margin EMA moves beta) that a resume must restore
SPACE = {"task": {"variant": "graded", "train_pairs": 64, "eval_pairs": 16, "base_steps": 20},
         "steps": 40, "batch_size": 8, "eval_every": 4, "eval_samples": 8, "warmup_steps": 2,
         "seed": 0, "loss": "beta_dpo", "selection": {"enabled": False},
         "budget": {"trials": 1, "concurrency": 1}, "keep": 0}


def kill_after_first_checkpoint(tune_dir: Path, killed: dict, stop: threading.Event) -> None:
    """SIGKILL the trial's process (the pid Tune records with each result) as soon as a
    result that carried a checkpoint is in the trial's result.json."""
    while not stop.is_set():
        for results in tune_dir.glob("*/result.json"):
            for line in results.read_text().splitlines():
                try:
                    result = json.loads(line)
                except json.JSONDecodeError:  # a line being written
                    continue
                if result.get("checkpoint_dir_name"):
                    os.kill(result["pid"], signal.SIGKILL)
                    killed.update(pid=result["pid"], step=result["step"])
                    return
        time.sleep(0.05)


@pytest.mark.slow
def test_a_killed_trial_resumes_from_its_checkpoint_and_ends_as_an_uninterrupted_one(
        ray_session, tmp_path):
    path = tmp_path / "preempted.yaml"
    path.write_text(yaml.safe_dump({"name": "preempted", **SPACE}))
    folder = tmp_path / "reports" / "preempted"
    killed, stop = {}, threading.Event()
    killer = threading.Thread(target=kill_after_first_checkpoint,
                              args=(folder / "tune", killed, stop), daemon=True)
    killer.start()
    try:
        result = CliRunner().invoke(app, ["search", str(path), "--reports",
                                          str(tmp_path / "reports")])
    finally:
        stop.set()
        killer.join(timeout=10)
    assert result.exit_code == 0, result.output
    assert killed, "the trial ended before a checkpoint was reported"
    (row,) = pd.read_parquet(folder / "trials.parquet").to_dict("records")
    assert row["status"] == "ok", row["error"]
    # it went on from a checkpoint at or after the one reported before the kill (the last
    # report before a hard kill may be lost, never one after it), not from step 0
    assert killed["step"] <= row["resumed_from_step"] < SPACE["steps"], (killed, row)

    cfg = load_space(path).fixed_config()
    result, history = run_trial(cfg, "straight", log=lambda m: None)
    straight = trial_row(cfg, result)  # named as the report names them
    for key in ("train_loss", "eval_loss", "pref_accuracy", "current_beta", "margin_ema",
                "true_reward", "final_steps"):
        assert row[key] == pytest.approx(straight[key], rel=1e-5, abs=1e-7), key
    # a difference of two sequence log-probs (~10 each): float noise of 1e-6 shows at 1e-5
    assert row["kl"] == pytest.approx(straight["kl"], abs=1e-5)
    steps = pd.read_parquet(folder / "steps.parquet")
    assert list(steps["step"]) == [h["step"] for h in history]  # every evaluation, once
    assert steps["eval_loss"].to_numpy() == pytest.approx([h["eval_loss"] for h in history],
                                                          rel=1e-5)
    # ended trials keep no checkpoint (empty folders stay for Tune's experiment state)
    assert not [f for f in (folder / "tune").glob("*/checkpoint_*/**/*") if f.is_file()]
