"""Models out: `raypo train --save DIR` writes a Hugging Face folder that transformers (or peft)
loads back to the same policy; the folder is written whole or not at all, and a folder that is
not a previous raypo save is never overwritten."""

from __future__ import annotations

import json
import random

import pandas as pd
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from raypo.cli import app
from raypo.models.save import META
from raypo.models.tiny import CHAT_TEMPLATE, tiny_model, tiny_tokenizer
from raypo.train.config import load_config
from raypo.train.evaluate import held_out_metrics
from raypo.train.setup import prepare

SMALL = ["task.train_pairs=64", "task.eval_pairs=16", "task.base_steps=50", "batch_size=8",
         "eval_samples=8", "steps=4", "eval_every=2"]


def _train(tmp_path, *args, config="search_spaces/builtin_dpo.yaml", sets=SMALL):
    sets = [x for s in [*sets, f"reports={tmp_path / 'reports'}"] for x in ("--set", s)]
    return CliRunner().invoke(app, ["train", config, *sets, *map(str, args)])


def test_a_saved_policy_loads_with_from_pretrained_and_reproduces_the_held_out_log_probs(
        tmp_path):
    out = tmp_path / "aligned"
    result = _train(tmp_path, "--save", out)
    assert result.exit_code == 0, result.output
    row = pd.read_parquet(tmp_path / "reports" / "builtin_dpo" / "trials.parquet").iloc[0]

    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    # the held-out pass of the run, again, through the loaded model: every implicit reward
    # beta * (log pi(y|x) - log pi_ref(y|x)) is a held-out log-prob of the trained policy
    setup = prepare(load_config("search_spaces/builtin_dpo.yaml", SMALL), log=lambda m: None)
    again = held_out_metrics(setup, model.eval())
    for key in ("eval_loss", "chosen_reward", "rejected_reward", "pref_accuracy"):
        assert again[key] == pytest.approx(row[key], rel=1e-5, abs=1e-7), key
    assert abs(again["chosen_reward"]) > 1e-6  # it did train

    # the tiny tokenizer round-trips through AutoTokenizer: same ids, specials, chat template
    tiny = tiny_tokenizer()
    text = "52817>12 <|user|>hi<|end|>"
    assert tokenizer(text).input_ids == tiny(text).input_ids
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (
        tiny.pad_token_id, tiny.bos_token_id, tiny.eos_token_id)
    assert tokenizer.chat_template == CHAT_TEMPLATE

    meta = json.loads((out / META).read_text())
    assert meta["format"] == "full" and meta["config"]["loss"]["name"] == "dpo"
    assert meta["metrics"]["eval_loss"] == pytest.approx(row["eval_loss"])
    assert meta["report"].endswith("builtin_dpo")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".aligned")]  # no temp left
    assert row["model_path"] == str(out)
    exported = CliRunner().invoke(app, ["export", str(tmp_path / "reports" / "builtin_dpo"),
                                        str(tmp_path / "copy")])
    assert exported.exit_code == 0, exported.output
    assert json.loads((tmp_path / "copy" / META).read_text())["format"] == "full"

    again = _train(tmp_path, "--save", out, sets=[*SMALL, "steps=2"])  # a raypo save: replaced
    assert again.exit_code == 0, again.output
    assert json.loads((out / META).read_text())["metrics"]["steps"] == 2


def test_a_folder_that_is_not_a_raypo_save_is_refused_before_training(tmp_path):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    result = _train(tmp_path, "--save", taken)
    assert result.exit_code == 2
    assert "taken: not empty and not a previous raypo save" in result.output
    assert not (tmp_path / "reports").exists()  # nothing trained, nothing written
    assert [p.name for p in taken.iterdir()] == ["notes.txt"]
    result = _train(tmp_path, "--merge")
    assert result.exit_code == 2 and "--merge: only with --save" in result.output


def _own_data(tmp_path):
    tok = tiny_tokenizer()
    tok.save_pretrained(tmp_path / "base")
    tiny_model(tok, seed=2).save_pretrained(tmp_path / "base")
    rng = random.Random(0)
    with (tmp_path / "pairs.jsonl").open("w") as f:
        for _ in range(40):  # 10 held out: enough for a held-out accuracy
            f.write(json.dumps({k: "".join(rng.choices("abcdefgh", k=rng.randint(2, 12)))
                                for k in ("prompt", "chosen", "rejected")}) + "\n")
    (tmp_path / "own.yaml").write_text("name: own\n")
    return ["lora={r: 4, alpha: 8}", f"data={tmp_path / 'pairs.jsonl'}", "steps=2",
            "eval_every=2", "batch_size=4", "eval_fraction=0.25", "max_length=64",
            "max_prompt_length=32"]


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_lora_saves_the_adapter_or_with_merge_the_merged_model(tmp_path):
    peft = pytest.importorskip("peft")
    sets = _own_data(tmp_path)
    own = str(tmp_path / "own.yaml")
    base = [f"model={tmp_path / 'base'}", *sets]
    ids = torch.tensor([[1, 20, 21, 22, 23]])

    result = _train(tmp_path, "--save", tmp_path / "adapter", config=own, sets=base)
    assert result.exit_code == 0, result.output
    meta = json.loads((tmp_path / "adapter" / META).read_text())
    assert meta["format"] == "lora" and (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert not (tmp_path / "adapter" / "model.safetensors").exists()  # the adapter only
    adapter = peft.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter")

    result = _train(tmp_path, "--save", tmp_path / "merged", "--merge", config=own, sets=base)
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "merged" / META).read_text())["format"] == "merged"
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    # the same trained policy both ways (training is seeded and deterministic)
    torch.testing.assert_close(_logits(merged, ids), _logits(adapter, ids), rtol=1e-4,
                               atol=1e-5)
    start = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    assert not torch.allclose(_logits(start, ids), _logits(merged, ids), atol=1e-5)

    # LoRA on the tiny built-in model: no base peft could find by name, so merged
    result = _train(tmp_path, "--save", tmp_path / "tiny", config=own,
                    sets=[*sets, "sft_steps=10"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "tiny" / META).read_text())["format"] == "merged"
    AutoModelForCausalLM.from_pretrained(tmp_path / "tiny")
