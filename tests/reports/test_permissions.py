"""Report files and saved models are readable by whoever the user's umask lets read new files
(a report folder shared on a team's NFS mount), not tempfile's private 0600 / 0700."""

from __future__ import annotations

import os
import stat

import pandas as pd
import pytest

import raypo.reports as reports
from raypo.models.save import ModelSave
from raypo.models.tiny import tiny_model, tiny_tokenizer
from raypo.reports.html import write_html
from raypo.reports.writer import write_json_atomic
from raypo.train.config import load_config


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture(params=[0o022, 0o002], ids=["umask-022", "umask-002"])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def test_reports_and_models_get_the_mode_of_any_new_file(tmp_path, umask):
    writer = reports.ReportWriter(tmp_path / "r", search="r")
    writer.write_trial({"trial_id": "a", "status": "ok", "objective": 0.5, "loss": "dpo"},
                       [{"step": 1, "loss": 0.6}])
    writer.update_trial("a", model_path=None)
    write_json_atomic(tmp_path / "r" / "search.json", {"name": "r"})
    page = write_html(reports.load(tmp_path / "r"), tmp_path / "r" / "report.html")
    written = [tmp_path / "r" / n for n in ("trials.parquet", "steps.parquet", "search.json")]
    for path in (*written, page):
        assert mode(path) == 0o666 & ~umask, path.name
    assert pd.read_parquet(written[0]).loc[0, "trial_id"] == "a"

    tok = tiny_tokenizer()
    save = ModelSave(tmp_path / "model")
    save.write_weights(tiny_model(tok), tok, load_config(None))
    folder = save.finish(load_config(None), {"status": "ok", "objective": 0.5})
    assert mode(folder) == 0o777 & ~umask
    assert {mode(p) for p in folder.iterdir()} == {0o666 & ~umask}
