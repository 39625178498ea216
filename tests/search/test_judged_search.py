"""A judged search end to end on the built-in task: the built-in judge, `judge_win_rate` as
the objective (the default with a judge), the confirmation against DPO on it, and `select`."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from tests.search.test_search import cli, write_space


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_judged_search_confirms_its_winner_against_dpo_on_the_judged_win_rate(
        ray_session, tmp_path):
    space = write_space(tmp_path, "judged", judge={"model": "builtin", "prompts": 32},
                        loss={"name": {"choice": ["ipo", "simpo"]}, "beta": 0.1},
                        lr={"low": 1e-3, "high": 3e-3, "log": True}, batch_size=16,
                        budget={"trials": 2, "concurrency": 2}, selection={"enabled": False},
                        confirm={"top": 1, "seeds": 2})
    reports = tmp_path / "reports"
    result = cli("search", space, "--reports", reports)
    assert result.exit_code == 0, result.output
    folder = reports / "judged"
    trials = pd.read_parquet(folder / "trials.parquet")
    assert set(trials["status"]) == {"ok"} and len(trials) == 2
    assert trials["objective"].equals(trials["judge_win_rate"])  # the default objective
    for column in ("judge_reward", "judge_reward_se", "judge_win_rate_se", "judge_lc_win_rate",
                   "ref_judge_reward", "kl", "true_reward", "eval_seconds", "eval_share"):
        assert trials[column].notna().all(), column
    assert trials["ref_judge_reward"].nunique() == 1  # one reference judgement per search
    stats = pd.read_parquet(folder / "confirm_stats.parquet")
    assert len(stats) == 1 and stats.loc[0, "n"] == 2
    runs = pd.read_parquet(folder / "confirm.parquet")
    assert set(runs["role"]) == {"finalist", "baseline"}
    assert runs["judge_win_rate"].between(0, 1).all()
    assert "judge_win_rate" in result.output  # the verdict names the metric
    chosen = cli("select", folder, "--json")
    assert chosen.exit_code == 0, chosen.output
    assert "judge_win_rate" in json.dumps(json.loads(chosen.output.strip().splitlines()[-1]))
