"""`raypo report`: one self-contained HTML page from a report folder written by ReportWriter."""

from __future__ import annotations

import math
import re
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

import raypo.reports as reports
from raypo.cli import app
from raypo.reports.html import render_html, write_html
from raypo.reports.importances import importances, min_trials_for_importances
from raypo.reports.tables import Report, pareto_front
from raypo.reports.writer import write_parquet_atomic

hyperparameter_columns = Report.hyperparameter_columns

KERNELS = ("rbf", "polynomial")
DIVERGENCES = ("kl", "js")
SCRIPT_ERROR = "RuntimeError: bad <script>alert('x')</script> & more"


def objective_of(beta: float) -> float:
    """The objective depends on beta only (peak at beta = 0.1); gamma is noise."""
    return 0.8 - 0.2 * (math.log10(beta) + 1.0) ** 2


def write_search(directory, *, n=16, kernel=True, builtin=True, mode="max", selection=True):
    """A search's report as a search writes it: trials (one failed, one pruned), steps per
    trial, search.json, and the selection table."""
    rng = np.random.default_rng(0)
    writer = reports.ReportWriter(directory, search="demo")
    for i in range(n):
        beta = float(10 ** rng.uniform(-2.5, 0.5))
        k, d = (KERNELS[i % 2], DIVERGENCES[(i // 2) % 2]) if kernel else (None, None)
        row = {"trial_id": f"t{i:03d}", "number": i, "status": "ok", "error": None,
               "loss": "kernel_dpo" if kernel else "dpo", "kernel": k, "divergence": d,
               "kernel_dpo.beta": beta, "kernel_dpo.gamma": float(rng.uniform(0, 1)),
               "lr": 1e-3,
               "objective": objective_of(beta), "predicted_rank": float(i % 4 + 1),
               "pref_accuracy": float(rng.uniform(0.5, 0.9)), "wall_s": 1.0 + i,
               "tokens_per_s": 1000.0}
        if builtin:
            row.update(true_reward=row["objective"], kl=float(rng.uniform(0, 2)),
                       ref_true_reward=0.3)
        steps = [{"step": s, "train_loss": 0.7 - 0.1 * s, "current_beta": beta,
                  "pref_accuracy": 0.6}
                 for s in (1, 2)]
        writer.write_trial(row, steps)
    writer.write_trial({"trial_id": "failed1", "number": n, "status": "failed",
                        "error": SCRIPT_ERROR, "objective": None, "loss": "dpo",
                        "dpo.beta": 0.1, "lr": 1e-3})
    writer.write_trial({"trial_id": "pruned1", "number": n + 1, "status": "pruned",
                        "error": None, "objective": 0.1, "loss": "dpo", "dpo.beta": 0.5,
                        "lr": 1e-3})
    writer.write_meta({"kind": "search", "name": "demo",
                       "objectives": [{"metric": "true_reward", "mode": mode}],
                       "params": ["loss", "kernel", "divergence", "kernel_dpo.beta",
                                  "kernel_dpo.gamma", "lr"],
                       "versions": {"raypo": "0.1.0"}})
    if selection:
        pairs = [(k, d) for k in (*KERNELS, "mahalanobis") for d in (*DIVERGENCES, "hellinger")]
        write_parquet_atomic(directory / "selection.parquet", pd.DataFrame(
            {"kernel": [k for k, _ in pairs], "divergence": [d for _, d in pairs],
             "predicted_rank": np.arange(1.0, len(pairs) + 1), "score": np.linspace(1, 0, 9)}))
    return reports.load(directory)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    return write_search(tmp_path_factory.mktemp("report") / "demo")


@pytest.fixture(scope="module")
def page(report):
    return render_html(report)


def best_trial_id(report) -> str:
    ok = report.trials[report.trials["status"] == "ok"]
    return ok.loc[ok["objective"].idxmax(), "trial_id"]


def test_page_has_every_section_with_a_figure_each(page):
    for section in ("summary", "heatmap", "progress", "frontier", "importance", "best"):
        assert f'<section id="{section}">' in page, section
    assert page.count("<svg") == 4  # heatmap, objective over trials, frontier, importances
    assert "16 ok" in page and "1 failed" in page and "1 pruned" in page


def test_summary_and_table_name_the_best_trial(report, page):
    best = best_trial_id(report)
    summary = page.split('<section id="summary">')[1].split("</section>")[0]
    assert f"trial {best}" in summary
    table = page.split('<table class="best">')[1]
    first_row = table.split("<tbody>")[1].split("</tr>")[0]
    assert f"<td>{best}</td>" in first_row


def test_error_messages_are_escaped(page):
    assert "<script" not in page
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; more" in page


def test_page_loads_nothing_from_the_network(page):
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page, re.I)
    assert "<link" not in page and "<img" not in page and "@import" not in page
    assert not re.search(r"url\(\s*['\"]?\s*(https?:)?//", page, re.I)


def test_heatmap_shows_means_counts_and_predicted_ranks(report, page):
    heatmap = page.split('<section id="heatmap">')[1].split("</section>")[0]
    assert "n=4" in heatmap and "rank 9" in heatmap  # 16 trials over 4 cells; 9 pairs ranked
    assert "mahalanobis" in heatmap  # ranked but untried: a grey cell with its rank


def test_the_parameter_that_sets_the_objective_is_more_important_than_noise(report):
    result = importances(report)  # 16 finished trials, 6 searched parameters: enough
    assert isinstance(result, dict), result
    assert result["kernel_dpo.beta"] > result["kernel_dpo.gamma"]


def test_importances_wait_for_eight_or_two_finished_trials_per_searched_parameter(tmp_path):
    """11 finished trials and 6 searched parameters: fewer than 12, no importances and the
    page says why; 12: importances."""
    assert min_trials_for_importances(2) == 8 and min_trials_for_importances(6) == 12
    short = importances(write_search(tmp_path / "short", n=11))
    assert isinstance(short, str) and "at least 12 finished trials" in short, short
    assert "this search has 11" in short
    assert isinstance(importances(write_search(tmp_path / "enough", n=12)), dict)


def test_best_trials_follow_the_objectives_mode(tmp_path):
    report = write_search(tmp_path / "demo", mode="min")
    ok = report.trials[report.trials["status"] == "ok"]
    worst_first = ok.loc[ok["objective"].idxmin(), "trial_id"]
    table = render_html(report).split('<table class="best">')[1]
    assert f"<td>{worst_first}</td>" in table.split("<tbody>")[1].split("</tr>")[0]


def test_missing_kernels_true_reward_and_trials_give_notes(tmp_path):
    page = render_html(write_search(tmp_path / "plain", n=1, kernel=False, builtin=False,
                                    selection=False))
    assert "No kernel trials" in page
    assert "No true_reward column" in page
    # 1 finished trial, 6 searched parameters: importances need max(8, 2 x 6) = 12
    assert "need at least 12 finished trials" in page and "this search has 1." in page
    assert page.count("<svg") == 1  # only the objective over trials


def test_pareto_front_keeps_the_points_nothing_dominates():
    kl = np.array([0.1, 0.5, 0.4, 1.0, 2.0])
    reward = np.array([0.2, 0.1, 0.5, 0.5, 0.9])
    assert list(pareto_front(kl, reward)) == [0, 2, 4]


def test_write_html_replaces_the_file_atomically(report, tmp_path):
    out = tmp_path / "out" / "page.html"
    out.parent.mkdir()
    out.write_text("old")
    assert write_html(report, out) == out
    assert out.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    assert [p.name for p in out.parent.iterdir()] == ["page.html"]


def test_cli_writes_report_html_into_the_folder_by_default(tmp_path):
    folder = tmp_path / "demo"
    write_search(folder, n=3)
    result = CliRunner().invoke(app, ["report", str(folder)])
    assert result.exit_code == 0, result.output
    assert (folder / "report.html").read_text(encoding="utf-8").count("<svg") >= 3
    out = tmp_path / "elsewhere.html"
    result = CliRunner().invoke(app, ["report", str(folder), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert out.is_file()


def test_cli_exits_2_when_the_folder_is_not_a_report(tmp_path):
    result = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 2
    assert "not a raypo report" in result.output or "trials.parquet" in result.output
    assert not (tmp_path / "report.html").exists()


def test_without_searched_params_the_schema_says_which_columns_are_hyperparameters(tmp_path):
    writer = reports.ReportWriter(tmp_path, search="train")  # a `raypo train` row
    writer.write_trial({"trial_id": "train", "loss": "dpo", "lr": 1e-3, "seed": 0,
                        "dpo.beta": 0.1,
                        "status": "ok", "error": None, "objective": 0.5, "tokens": 918,
                        "htsr_alpha_min": 2.0, "kl": 0.1},
                       [{"step": 2, "train_loss": 0.6, "current_lr": 1e-3, "kl": 0.1}])
    # the seed is noise to average over, never a parameter to rank
    assert hyperparameter_columns(reports.load(tmp_path)) == ["loss", "lr", "dpo.beta"]


def test_hmk_trials_without_a_divergence_get_a_none_column(tmp_path):
    writer = reports.ReportWriter(tmp_path, search="hmk")
    for i, (kernel, divergence) in enumerate([("hmk", None), ("rbf", "kl")]):
        writer.write_trial({"trial_id": f"t{i}", "number": i, "status": "ok", "error": None,
                            "objective": 0.5 + i, "loss": "x", "kernel": kernel,
                            "divergence": divergence})
    heatmap = render_html(reports.load(tmp_path)).split('<section id="heatmap">')[1]
    assert "<svg" in heatmap.split("</section>")[0] and ">none<" in heatmap


def test_importing_raypo_and_its_cli_leaves_matplotlib_alone():
    code = "import sys, raypo.reports, raypo.cli; assert 'matplotlib' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.timeout(120)
def test_heatmap_compares_pruned_and_finished_trials_at_the_common_step(tmp_path):
    from tests.reports.test_tables import write_pruned_search

    rep = write_pruned_search(tmp_path)
    heatmap = render_html(rep).split('<section id="heatmap">')[1].split("</section>")[0]
    cells = re.findall(r"<text[^>]*>([^<]*)</text>", heatmap)
    # by hand, true_reward at step 50 (where the first pruned trial stopped): rbf/kl
    # (0.6 + 0.9) / 2 from its two finished trials; each polynomial cell one pruned trial
    assert cells[cells.index("0.75") + 1] == "n=2"
    assert cells[cells.index("0.95") + 1] == "n=1 (1 pruned)"  # polynomial/js
    assert cells[cells.index("0.2") + 1] == "n=1 (1 pruned)"  # polynomial/kl
    assert "0.8" not in cells[:cells.index("0.2")]  # not a's final value
    assert ("true_reward at step 50, the highest step every trial reached" in heatmap
            and "2 pruned trials, counted per cell" in heatmap)
