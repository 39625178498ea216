"""Bad configs, `--set` values and data files: exit 2 with one line naming the file (and key,
column or row) and what was expected, before any model loads and with nothing written; or,
where the input means something, it runs as documented (YAML 1.2: `1e-1` is 0.1)."""

from __future__ import annotations

import json
import math

import pytest

import raypo.train.setup as train_setup
from raypo.data.checks import DataWarning
from raypo.data.preference import load_preferences
from raypo.train.config import load_config
from tests.faults.conftest import TINY, cli, files_under, last_error, write_yaml

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def no_model(monkeypatch):
    """Fails the test if a model is loaded: bad data must be reported before."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the data was checked")

    monkeypatch.setattr(train_setup, "load_policy", refuse)
    monkeypatch.setattr(train_setup, "fit_base_model", refuse)


CONFIG_FILES = [
    ("empty", b"", ["the file is empty"]),
    ("comments_only", b"# a config with nothing in it\n", ["the file is empty"]),
    ("not_utf8", b"steps: 5\nloss: d\xffpo\n", ["line 2", "not UTF-8"]),
    ("not_yaml", b"steps: [5\n", ["not valid YAML", "line 2"]),
    ("a_list", b"- steps\n- 5\n", ["expected a mapping", "list"]),
    ("twice", b"steps: 5\nsteps: 6\n", ["'steps' is given twice", "line 2"]),
    ("absurd_steps", b"steps: 1.0e+12\n", ["steps:", "less than or equal to 10000000"]),
    ("infinite_lr", b"lr: .inf\n", ["lr: expected a finite number"]),
    ("hex_seed", b"seed: 0x10\n", ["seed: '0x10' is a hexadecimal literal", "16"]),
    ("octal_seed", b"seed: 010\n", ["seed: '010' has a leading zero", "write 10"]),
    ("yes_seed", b"seed: yes\n", ["seed: Input should be a valid integer"]),
    ("escaping_name", b"name: ../../x\n", ["name: expected a plain folder name"]),
    ("absolute_name", b"name: /tmp/x\n", ["name: expected a plain folder name"]),
    ("missing_model", b"model: /nonexistent\ndata: d.jsonl\n",
     ["model: /nonexistent: no such folder"]),
    ("batch_over_pairs", b"task: {train_pairs: 8, eval_pairs: 8}\nsteps: 5\n",
     ["batch_size (32) is larger than", "task.train_pairs (8)"]),
    ("batch_over_workers", b"batch_size: 3\nnum_workers: 2\n",
     ["batch_size (3) must be a multiple of num_workers (2)"]),
]


@pytest.mark.parametrize(("stem", "content", "expected"), CONFIG_FILES,
                         ids=[c[0] for c in CONFIG_FILES])
def test_a_bad_config_file_exits_2_naming_the_file_and_key(tmp_path, no_model, stem, content,
                                                         expected):
    config = tmp_path / f"{stem}.yaml"
    config.write_bytes(content)
    result = cli("train", config, "--set", f"reports={tmp_path / 'reports'}")
    assert result.exit_code == 2, result.output
    error = last_error(result)
    assert f"{stem}.yaml" in error
    for part in expected:
        assert part in error, error
    assert "Traceback" not in result.output
    assert not (tmp_path / "reports").exists()  # nothing written


SETS = [
    (["steps.x=5"], ["steps.x: steps is a value (2), not a section"]),
    (["lr=[1,"], ["--set 'lr=[1,'", "not valid YAML"]),
    (["seed=0x10"], ["--set seed: '0x10' is a hexadecimal literal; write the decimal 16"]),
    (["seed=010"], ["--set seed: '010' has a leading zero", "write 10"]),
    (["seed=yes"], ["seed: Input should be a valid integer"]),
    (["=5"], ["expected a key"]),
    (["loss..beta=1"], ["expected a key"]),
    (["steps=1.0e+12"], ["steps: Input should be less than or equal to 10000000"]),
    (["task.train_pairs=8", "task.eval_pairs=8", "steps=5", "batch_size=32"],
     ["batch_size (32) is larger than the built-in task's task.train_pairs (8)"]),
]


@pytest.mark.parametrize(("sets", "expected"), SETS, ids=[" ".join(s) for s, _ in SETS])
def test_a_bad_set_exits_2_naming_the_key(tmp_path, no_model, sets, expected):
    config = write_yaml(tmp_path / "tiny.yaml", **TINY)
    args = [a for s in sets for a in ("--set", s)]
    result = cli("train", config, *args, "--set", f"reports={tmp_path / 'reports'}")
    assert result.exit_code == 2, result.output
    error = last_error(result)
    for part in expected:
        assert part in error, error
    assert not (tmp_path / "reports").exists()


def test_yaml_is_read_as_yaml_1_2_in_files_and_sets(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("loss: {name: dpo, beta: 1e-1}\nlr: 5e-4\ntruncate_responses: false\n"
                      "name: yes\n")
    cfg = load_config(config, ["loss.beta=2e-1", "eval_every=07".replace("0", "")])
    assert cfg.loss.params["beta"] == pytest.approx(0.2) and cfg.lr == pytest.approx(5e-4)
    assert cfg.name == "yes" and cfg.eval_every == 7  # YAML 1.1 would say True, and fail
    assert load_config(config).loss.params["beta"] == pytest.approx(0.1)  # not "1e-1"


def test_search_spaces_and_the_metrics_config_share_the_reader(tmp_path):
    space = write_yaml(tmp_path / "space.yaml", **TINY)
    space.write_text(space.read_text() + "sampler: {seed: 010}\n")
    result = cli("search", space, "--reports", tmp_path / "reports")
    assert result.exit_code == 2
    assert "space.yaml: sampler.seed: '010' has a leading zero" in last_error(result)
    assert not (tmp_path / "reports").exists()
    config = tmp_path / "metrics.yaml"
    config.write_bytes(b"task: {train_pairs: 0x40}\n")
    result = cli("metrics", "--config", config)
    assert result.exit_code == 2
    assert "metrics.yaml: task.train_pairs: '0x40' is a hexadecimal literal" in last_error(
        result)
    result = cli("metrics", "--set", "seed=0o7")
    assert result.exit_code == 2
    assert "--set seed: '0o7' is an octal literal; write the decimal 7" in last_error(result)


@pytest.mark.parametrize("name", ["../../x", "/abs", "a/b", ".."])
def test_a_name_option_that_leaves_the_reports_folder_exits_2(tmp_path, name):
    config = write_yaml(tmp_path / "tiny.yaml", **TINY)
    reports = tmp_path / "deep" / "reports"
    for args in (["train", config, "--set", f"reports={reports}"],
                 ["search", config, "--reports", reports]):
        result = cli(*args, "--name", name)
        assert result.exit_code == 2, (args, result.output)
        assert "--name: expected a plain folder name" in last_error(result)
    assert files_under(tmp_path) == ["tiny.yaml"]


# --- data files ------------------------------------------------------------------------------

def _rows(n: int, prompt=lambda i: f"p{i}>", chosen=lambda i: "ab", rejected=lambda i: "ba"):
    return [{"prompt": prompt(i), "chosen": chosen(i), "rejected": rejected(i)}
            for i in range(n)]


def _jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


DATA = [
    ("not_utf8.jsonl", lambda p: p.write_bytes(b'{"prompt": "a", "chosen": "b", '
                                               b'"rejected": "c"}\n{"prompt": "\xff"}\n'),
     [], ["not_utf8.jsonl", "line 2: not UTF-8"]),
    ("not_parquet.parquet", lambda p: p.write_text("prompt,chosen,rejected\na,b,c\n"),
     [], ["not_parquet.parquet", "not a readable Parquet file"]),
    ("same_prompt.jsonl", lambda p: _jsonl(p, _rows(40, prompt=lambda i: "same>")),
     [], ["held-out split has 0 pair(s)", "40 pairs with 1 distinct prompts"]),
    ("duplicates.jsonl", lambda p: _jsonl(p, _rows(1) * 40),
     [], ["held-out split has 0 pair(s)", "40 pairs with 1 distinct prompts"]),
    ("one_held_out.jsonl", lambda p: _jsonl(p, _rows(20)),
     [], ["held-out split has 1 pair(s)", "fewer than the 8"]),
    ("small.jsonl", lambda p: _jsonl(p, _rows(24)), ["eval_fraction=0.34"],
     ["16 training pairs (after 8 held out) are fewer than batch_size=32"]),
    ("all_ties.jsonl", lambda p: _jsonl(p, _rows(10, rejected=lambda i: "ab")),
     [], ["all_ties.jsonl", "every pair (10) has rejected equal to chosen"]),
]


@pytest.mark.parametrize(("name", "make", "sets", "expected"), DATA,
                         ids=[d[0] for d in DATA])
def test_bad_data_exits_2_before_a_model_loads(tmp_path, no_model, name, make, sets, expected):
    data = tmp_path / name
    make(data)
    config = write_yaml(tmp_path / "own.yaml", steps=2, eval_every=2)
    args = [a for s in sets for a in ("--set", s)]
    result = cli("train", config, "--set", f"data={data}", *args,
                 "--set", f"reports={tmp_path / 'reports'}")
    assert result.exit_code == 2, result.output
    error = last_error(result)
    for part in expected:
        assert part in error, error
    assert "Traceback" not in result.output
    assert not (tmp_path / "reports").exists()


def test_pairs_whose_chosen_equals_rejected_are_left_out_with_one_warning(tmp_path):
    rows = _rows(40)
    rows[3]["rejected"] = rows[3]["chosen"]
    rows[7]["rejected"] = rows[7]["chosen"]
    path = _jsonl(tmp_path / "ties.jsonl", rows)
    assert len(load_preferences(path)) == 40  # the loader is faithful; training leaves out
    cfg = load_config(None, [f"data={path}", "eval_fraction=0.25", "batch_size=4", "sft_steps=0",
                             "max_length=32", "max_prompt_length=16"])
    with pytest.warns(DataWarning) as caught:
        setup = train_setup.prepare(cfg, log=lambda m: None)
    assert len(setup.train_pairs) + len(setup.eval_pairs) == 38
    (warning,) = [w for w in caught if "chosen equals rejected" in str(w.message)]
    assert f"{path}: 2 pair(s) whose chosen equals rejected" in str(warning.message)
    assert "rows 3, 7" in str(warning.message)


def test_a_small_held_out_split_is_trained_on_with_its_size_said(tmp_path):
    path = _jsonl(tmp_path / "forty.jsonl", _rows(40))
    cfg = load_config(None, [f"data={path}", "eval_fraction=0.25", "batch_size=4", "sft_steps=0",
                             "steps=1", "eval_every=1", "max_length=32", "max_prompt_length=16"])
    with pytest.warns(DataWarning, match="held-out split has only 10 pairs"):
        setup = train_setup.prepare(cfg, log=lambda m: None)
    assert (len(setup.train_pairs), len(setup.eval_pairs)) == (30, 10)
    assert math.isfinite(setup.ref_eval.logps["chosen"].sum().item())
