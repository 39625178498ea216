"""The memory plan (raypo.train.plan): its estimate against measured CPU peaks of raypo's own
training steps, the shipped real-model space against one A10G, and the plan's place in the
command line (`--plan`, exit 2 before any trial)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import huggingface_hub.constants
import pytest
import yaml
from typer.testing import CliRunner

from raypo.cli import app
from raypo.search.checks import check_live_memory, check_memory, space_plan
from raypo.search.space import SpaceError, load_space, parse_space
from raypo.train.config import TrainConfig
from raypo.train.plan import GB, PlanError, estimate
from tests.train.peak_memory import RESULT, config

REPO = Path(__file__).resolve().parents[2]
SPACES = REPO / "search_spaces"

# The shapes the plan's measured constants were fitted on (not run here): CHUNK_COPIES (5.0:
# the allocator's live bytes at logits_chunk 256 and 1024 of F, with epsilon_dpo, tdpo and
# kernel_dpo alike: the chunk loop of the losses with token terms), the CPU's float32
# temporary of 2-byte matrix products in `fused_chunk_bytes` (G and H: 16.8 MB, one float32
# chunk x block, at vocabularies 12,000 and 24,000 alike) and CPU_HEADROOM_BYTES (5 MB: the
# mean of measured minus estimated peaks of A to F, each between -25 and +27 MB). The
# activations' per-token counts come from the architecture, checked against autograd's saved
# tensors, not from a fit.
FITTED = [
    {"name": "A", "vocab": 16000, "hidden": 32, "intermediate": 1024, "heads": 4,
     "kv_heads": 2, "layers": 4, "max_length": 192, "max_prompt_length": 7,
     "config": {"batch_size": 8, "logits_chunk": 512}},
    {"name": "B", "vocab": 16000, "hidden": 64, "intermediate": 512, "heads": 4,
     "kv_heads": 2, "layers": 3, "max_length": 320, "max_prompt_length": 7,
     "config": {"batch_size": 4, "logits_chunk": 2048, "dtype": "bfloat16"}},
    {"name": "C", "vocab": 8000, "hidden": 64, "intermediate": 1024, "heads": 4,
     "kv_heads": 4, "layers": 6, "max_length": 256, "max_prompt_length": 7,
     "config": {"batch_size": 8, "logits_chunk": 512,
                "lora": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.05}}},
    {"name": "D", "vocab": 32000, "hidden": 96, "intermediate": 256, "heads": 4,
     "kv_heads": 2, "layers": 4, "max_length": 256, "max_prompt_length": 7,
     "config": {"batch_size": 8, "logits_chunk": 256, "gradient_checkpointing": True,
                "loss": "epsilon_dpo"}},
    {"name": "E", "vocab": 64000, "hidden": 256, "intermediate": 512, "heads": 4,
     "kv_heads": 4, "layers": 2, "max_length": 64, "max_prompt_length": 7,
     "config": {"batch_size": 1, "grad_accum": 2, "logits_chunk": 128}},
    {"name": "F", "vocab": 32000, "hidden": 32, "intermediate": 128, "heads": 4,
     "kv_heads": 2, "layers": 2, "max_length": 256, "max_prompt_length": 7,
     "config": {"batch_size": 4, "logits_chunk": 1024}},
    {"name": "G", "vocab": 12000, "hidden": 32, "intermediate": 128, "heads": 4,
     "kv_heads": 2, "layers": 2, "max_length": 128, "max_prompt_length": 3,
     "config": {"batch_size": 4, "logits_chunk": 512, "dtype": "bfloat16"}},
    {"name": "H", "vocab": 24000, "hidden": 32, "intermediate": 128, "heads": 4,
     "kv_heads": 2, "layers": 2, "max_length": 128, "max_prompt_length": 3,
     "config": {"batch_size": 4, "logits_chunk": 512, "dtype": "bfloat16"}},
]

# The shapes the test measures: other sizes, each led by another part of the plan (its peak
# moment and its largest part), 140 to 190 MB each, seconds of CPU each.
SHAPES = [
    {"name": "activations", "vocab": 2000, "hidden": 16, "intermediate": 2048, "heads": 2,
     "kv_heads": 1, "layers": 4, "max_length": 128, "max_prompt_length": 3,
     "config": {"batch_size": 4, "logits_chunk": 512},
     "expect": ("backward", "activations")},
    {"name": "bfloat16", "vocab": 20000, "hidden": 48, "intermediate": 128, "heads": 4,
     "kv_heads": 2, "layers": 2, "max_length": 160, "max_prompt_length": 3,
     "config": {"batch_size": 4, "logits_chunk": 256, "dtype": "bfloat16"},
     "expect": ("backward", "logits chunk")},
    {"name": "lora", "vocab": 2000, "hidden": 16, "intermediate": 2048, "heads": 2,
     "kv_heads": 1, "layers": 4, "max_length": 128, "max_prompt_length": 3,
     "config": {"batch_size": 4, "logits_chunk": 512,
                "lora": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.05}},
     "expect": ("backward", "activations")},
    {"name": "checkpointing", "vocab": 6000, "hidden": 32, "intermediate": 256, "heads": 4,
     "kv_heads": 2, "layers": 4, "max_length": 128, "max_prompt_length": 3,
     "config": {"batch_size": 4, "logits_chunk": 1024, "gradient_checkpointing": True,
                "loss": "epsilon_dpo"},
     "expect": ("backward", "logits chunk")},
    {"name": "embedding", "vocab": 32000, "hidden": 192, "intermediate": 384, "heads": 4,
     "kv_heads": 4, "layers": 1, "max_length": 12, "max_prompt_length": 3,
     "config": {"batch_size": 1, "grad_accum": 2, "logits_chunk": 128},
     "expect": ("embedding's backward", "gradients")},
]

# Qwen2.5-0.5B-Instruct's published config.json (the shape; nothing is downloaded)
QWEN_05B = {"vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864,
            "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
            "tie_word_embeddings": True, "max_position_embeddings": 32768,
            "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "bos_token_id": 151643,
            "eos_token_id": 151645}
# Skywork-Reward-V2-Qwen3-0.6B's published config.json (real_model.yaml's judge)
SKYWORK_06B = {"vocab_size": 151936, "hidden_size": 1024, "intermediate_size": 3072,
               "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8,
               "head_dim": 128, "tie_word_embeddings": True, "max_position_embeddings": 40960,
               "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "num_labels": 1,
               "architectures": ["Qwen3ForSequenceClassification"], "pad_token_id": 151643}
A10G = 24 * GB


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def measure(root: Path, shapes: list[dict]) -> dict[str, dict]:
    """{name: result} of tests/train/peak_memory.py, run in a fresh interpreter."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(2**20), "HF_HUB_OFFLINE": "1",
           "TQDM_DISABLE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "tests.train.peak_memory", str(root),
                           json.dumps(shapes)], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=540)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads(line[len(RESULT):]) for line in proc.stdout.splitlines()
               if line.startswith(RESULT)]
    return {r["name"]: r for r in results}


@pytest.mark.timeout(600)
def test_the_estimate_is_within_25_percent_of_measured_cpu_peaks_on_unfitted_shapes(
        tmp_path):
    fitted = {json.dumps({k: v for k, v in s.items() if k != "name"}, sort_keys=True)
              for s in FITTED}
    assert not any(json.dumps({k: v for k, v in s.items() if k not in ("name", "expect")},
                              sort_keys=True) in fitted for s in SHAPES)
    measured = measure(tmp_path, SHAPES)
    rows, bad = [], []
    for s in SHAPES:
        got = measured[s["name"]]["measured"]
        plan = estimate(config(tmp_path / s["name"], s), device="cpu")
        ratio = plan.total / got
        largest = max(plan.parts, key=plan.parts.get)
        rows.append(f"{s['name']:<14}{got / 1e6:>9.0f} MB{plan.total / 1e6:>9.0f} MB"
                    f"{ratio:>7.2f}  {plan.moment}, largest part {largest}")
        if not 0.75 <= ratio <= 1.25 or (plan.moment, largest) != s["expect"]:
            bad.append(s["name"])
    table = "\n".join([f"{'shape':<14}{'measured':>12}{'estimate':>12}{'ratio':>7}", *rows])
    print(table)
    assert not bad, f"{bad}:\n{table}"


def qwen_folder(tmp_path: Path) -> Path:
    from transformers import Qwen2Config

    folder = tmp_path / "qwen2.5-0.5b-shape"
    Qwen2Config(**QWEN_05B).save_pretrained(folder)
    return folder


def judge_folder(tmp_path: Path) -> Path:
    from transformers import Qwen3Config

    folder = tmp_path / "skywork-reward-v2-qwen3-0.6b-shape"
    Qwen3Config(**SKYWORK_06B).save_pretrained(folder)
    return folder


def test_the_real_model_space_fits_one_a10g_and_its_former_settings_did_not(tmp_path):
    model, judge = str(qwen_folder(tmp_path)), str(judge_folder(tmp_path))
    space = load_space(SPACES / "real_model.yaml", {"model": model, "judge.model": judge})
    assert space.settings.resources.gpu_memory_gb == 24
    plan, _ = space_plan(space)
    assert plan.shape.params == 494_032_768 + plan.shape.trainable  # the model, its LoRA
    # the judge beside it: Qwen3-0.6B's 596M parameters and a one-output score head, bfloat16
    assert plan.parts["judge"] == 2 * (596_049_920 + 1024)
    # a judge that cannot fit beside the policy is refused with the numbers, before any trial
    big = dict(SKYWORK_06B, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
               num_attention_heads=32, tie_word_embeddings=False)  # a Qwen3-8B reward model
    from transformers import Qwen3Config

    Qwen3Config(**big).save_pretrained(tmp_path / "8b-judge")
    heavy = load_space(SPACES / "real_model.yaml",
                       {"model": model, "judge.model": str(tmp_path / "8b-judge")})
    with pytest.raises(SpaceError) as e:
        check_memory(heavy, A10G, "resources.gpu_memory_gb: 24")
    message = str(e.value)
    assert "does not fit" in message and "judge 15." in message, message
    assert "a smaller judge (judge.model; this one takes 15." in message
    assert plan.shape.lora_targets == ["q_proj", "v_proj"]
    assert plan.cfg.batch_size * plan.cfg.grad_accum == 64  # the effective batch kept
    assert plan.total <= 0.75 * A10G  # with a quarter of the GPU to spare
    check_memory(space, A10G, "resources.gpu_memory_gb: 24", log=lambda m: None)

    former = load_space(SPACES / "real_model.yaml",
                        {"model": model, "judge.model": judge, "batch_size": 32, "grad_accum": 2,
                         "gradient_checkpointing": False})
    before, _ = space_plan(former)
    assert before.total > 3 * A10G and before.parts["activations"] > A10G
    with pytest.raises(SpaceError) as e:
        check_memory(former, A10G, "resources.gpu_memory_gb: 24")
    message = str(e.value)
    assert message.startswith(f"{SPACES / 'real_model.yaml'}: the trial's memory plan does "
                              "not fit")
    for part in ("weights", "activations", "logits chunk", "headroom",
                 "batch_size: 4 with grad_accum: 16", "gradient_checkpointing: true"):
        assert part in message, message


def test_search_plan_prints_the_most_demanding_trial_and_a_search_that_cannot_fit_exits_2(
        tmp_path):
    model, judge = qwen_folder(tmp_path), judge_folder(tmp_path)
    result = cli("search", SPACES / "real_model.yaml", "--model", model, "--judge", judge,
                 "--plan")
    assert result.exit_code == 0, result.output
    assert "8 rows x 1024 tokens" in result.output and "judge" in result.output
    assert "of 24.00 GB (resources.gpu_memory_gb: 24): fits" in result.output

    tree = yaml.safe_load((SPACES / "real_model.yaml").read_text())
    tree.update(model=str(model), judge={"model": str(judge)}, batch_size={"choice": [4, 32]},
                grad_accum=2,
                gradient_checkpointing=False, max_length={"low": 768, "high": 1024})
    space = tmp_path / "big.yaml"
    space.write_text(yaml.safe_dump(tree))
    result = cli("search", space, "--plan")
    assert result.exit_code == 2
    assert "batch_size 32" in result.output and "64 rows x 1024 tokens" in result.output
    assert "does NOT fit" in result.output
    # without --plan: the same verdict before Ray, any cache or any report
    result = cli("search", space, "--reports", tmp_path / "reports")
    assert result.exit_code == 2, result.output
    error = result.output.strip().splitlines()[-1]
    assert error.startswith(f"error: {space}: the trial's memory plan does not fit")
    assert "Try: batch_size:" in error and "gradient_checkpointing: true" in error
    assert not (tmp_path / "reports").exists()


def test_the_most_demanding_point_takes_the_largest_values_a_space_can_draw():
    space = parse_space({
        "data": "x.jsonl", "model": None, "batch_size": {"choice": [2, 8, 4]},
        "max_length": {"low": 128, "high": 1000, "step": 128},
        "max_prompt_length": 64, "lr": {"low": 1e-4, "high": 1e-2, "log": True},
        "gradient_checkpointing": {"choice": [True, False]}})
    plan, values = space_plan(space, device="cpu")
    assert values == {"batch_size": 8, "max_length": 896, "gradient_checkpointing": False}
    assert plan.cfg.batch_size == 8 and plan.cfg.max_length == 896


def test_train_plan_prints_a_cpu_runs_plan_and_a_gpu_run_that_cannot_fit_exits_2(
        tmp_path, monkeypatch):
    result = cli("train", SPACES / "builtin_dpo.yaml", "--plan")
    assert result.exit_code == 0, result.output
    assert "model tiny built-in" in result.output and "not checked" in result.output
    import raypo.train.plan

    monkeypatch.setattr(raypo.train.plan, "local_gpu", lambda cfg: (0.2 * GB, "a small GPU"))
    result = cli("train", SPACES / "builtin_dpo.yaml", "--set", f"reports={tmp_path}")
    assert result.exit_code == 2
    assert "memory plan does not fit" in result.output and "a small GPU" in result.output
    assert not list(tmp_path.iterdir())  # nothing trained, nothing written


def test_a_gpu_search_with_no_gpu_up_needs_gpu_memory_gb(ray_session):
    space = parse_space({"data": "x.jsonl", "resources": {"gpus": 1}})
    with pytest.raises(SpaceError, match="resources.gpu_memory_gb: needed to check"):
        check_live_memory(space, timeout_s=5)


def test_a_hub_name_that_cannot_be_read_offline_is_a_plan_error(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import
    with pytest.raises(PlanError, match="model: the memory plan reads the model's config "
                       "and could not: model_config: name_or_path='nobody/no-such-model'"):
        estimate(TrainConfig(model="nobody/no-such-model", data="x.jsonl"))


def test_float16_counts_float32_master_weights_and_the_autocast_copies():
    base = TrainConfig(data="x.jsonl", sft_steps=0)
    bf16 = estimate(base.model_copy(update={"dtype": "bfloat16"}))
    fp16 = estimate(base.model_copy(update={"dtype": "float16"}))
    s = fp16.shape
    assert s.weight_bytes == 4 * s.params
    assert fp16.parts["weights"] == 4 * s.params + 2 * s.linear_params
    assert bf16.parts["weights"] == 2 * s.params
