"""Measured peak memory of raypo's training steps on the CPU, one fresh process per shape (the
memory plan's test, tests/train/test_plan.py).

    python -m tests.train.peak_memory ROOT SHAPES_JSON   # one `RESULT {json}` line per shape

This process imports torch, transformers, peft and raypo once; every shape then runs in
forked children of it (processes of their own that have built nothing): a first child writes
the shape's model (a Llama of random weights, `save_pretrained`), its WordLevel tokenizer and a
JSONL of preference pairs whose rows are exactly `max_length` tokens long, under ROOT/<name>;
a second child trains on them through raypo's own path, `raypo.train.setup.prepare` then
`raypo.train.loop.train`, two optimizer steps (the second's backward runs with AdamW's
moments allocated), and stops there (no final evaluation). The second step draws the first
one's pairs again: the data holds one step's pairs and raypo's smallest held-out split.

What is measured: the peak resident set (VmHWM, reset through /proc/self/clear_refs after
`prepare`) during the steps, less the resident set after `prepare`, plus the bytes of the
parameters `prepare` left in memory (the policy and a reference copy, counted from the
loaded modules). That is the memory the steps add to the loaded weights: gradients,
optimizer state, activations, the logits chunks. `prepare`'s other leftovers (tokenizer,
datasets, lazily imported code, about 60 MB) are not device memory and are left out. The
parent runs with MALLOC_MMAP_THRESHOLD_ set, so glibc maps every tensor of a MiB or more on
its own and returns it when freed: the resident set then follows the live tensors, as a
GPU's allocated memory does, rather than what the heap kept of earlier ones. The runs go two
at a time, with one torch thread each.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import sys
import time
import traceback
import warnings
from pathlib import Path

SPECIALS = ("<pad>", "<s>", "<unk>", "</s>")
EVAL_PAIRS = 8  # raypo's smallest held-out split
RESULT = "RESULT "
LANES = min(2, os.cpu_count() or 1)


def rss(key: str = "VmRSS") -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


def build(folder: Path, s: dict) -> None:
    """The shape's model, tokenizer and pairs (prompt + response = max_length tokens)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    vocab = s["vocab"]
    words = {t: i for i, t in enumerate(SPECIALS)}
    words.update({f"w{i}": len(SPECIALS) + i for i in range(vocab - len(SPECIALS))})
    core = Tokenizer(models.WordLevel(vocab=words, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>",
                            unk_token="<unk>", eos_token="</s>",
                            padding_side="right").save_pretrained(folder)
    config = LlamaConfig(vocab_size=vocab, hidden_size=s["hidden"],
                         intermediate_size=s["intermediate"], num_attention_heads=s["heads"],
                         num_key_value_heads=s["kv_heads"], num_hidden_layers=s["layers"],
                         tie_word_embeddings=True, max_position_embeddings=s["max_length"],
                         pad_token_id=0, bos_token_id=1, eos_token_id=3)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    rng = random.Random(0)
    prompt = s["max_prompt_length"] - 1  # raypo adds BOS to the prompt, EOS to a response
    response = s["max_length"] - s["max_prompt_length"] - 1

    def text(n: int) -> str:
        return " ".join(f"w{rng.randrange(vocab - len(SPECIALS))}" for _ in range(n))

    with (folder / "pairs.jsonl").open("w") as f:
        for _ in range(pairs(s)):
            f.write(json.dumps({"prompt": text(prompt), "chosen": text(response),
                                "rejected": text(response)}) + "\n")


def pairs(s: dict) -> int:
    """One step's training pairs (the second step draws them again) and the held-out ones."""
    return s["config"]["batch_size"] + EVAL_PAIRS


def config(folder: Path, s: dict):
    """The shape's TrainConfig: its `config` keys over a two-step run on its own folder."""
    from raypo.train.config import TrainConfig

    return TrainConfig.model_validate({
        "model": str(folder), "data": str(folder / "pairs.jsonl"), "steps": 2,
        "eval_every": 100, "eval_fraction": EVAL_PAIRS / pairs(s), "lr": 1e-5,
        "warmup_steps": 0, "device": "cpu", "htsr": "off", "max_length": s["max_length"],
        "max_prompt_length": s["max_prompt_length"], **s["config"]})


class Measured(Exception):
    """Raised after the second step: the run stops there."""


def measure(folder: Path, s: dict) -> dict:
    from raypo.train.loop import train
    from raypo.train.setup import prepare

    cfg = config(folder, s)
    start = time.process_time()
    setup = prepare(cfg, log=lambda *_: None)
    prepared = time.process_time()
    reference = setup.reference_model
    copy = None if reference is None or reference.shares_policy else reference.model
    held = sum(p.numel() * p.element_size() for m in (setup.policy, copy) if m is not None
               for p in m.parameters())
    after_prepare = rss()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak (VmHWM) starts again from the current resident set
    peaks = []

    def progress(step: int, loss: float) -> None:
        peaks.append(rss("VmHWM"))
        if step == 2:  # the steps are measured: the final evaluation is not needed
            raise Measured

    with contextlib.suppress(Measured):
        train(setup, progress=progress)
    return {"name": s["name"], "measured": max(peaks) - after_prepare + held, "held": held,
            "cpu_s": time.process_time() - start, "prepare_cpu_s": prepared - start,
            "params": sum(p.numel() for p in setup.policy.parameters())}


def in_child(work) -> int:
    """Fork; the child runs `work()` (its exceptions printed) and exits. Returns its pid."""
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            work()
        except BaseException:
            traceback.print_exc()
            code = 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    return pid


def wait(pid: int | None = None) -> int:
    """Wait for the child `pid` (None: any); SystemExit when it failed. Returns its pid."""
    pid, status = os.waitpid(pid or -1, 0)
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"a child failed (exit {os.waitstatus_to_exitcode(status)})")
    return pid


def measured(folder: Path, s: dict) -> None:
    import torch

    # one thread: two runs share the machine's cores, and OpenMP's threads would spin
    # against each other (the memory is the same; the time is a fifth)
    torch.set_num_threads(1)
    print(RESULT + json.dumps(measure(folder, s)), flush=True)


def main() -> None:
    root, shapes = Path(sys.argv[1]), json.loads(sys.argv[2])
    warnings.filterwarnings("ignore")
    # imported once here, before any child: the children start with the code loaded
    import peft  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401

    import raypo.train.loop  # noqa: F401
    import raypo.train.setup  # noqa: F401

    for s in shapes:
        wait(in_child(lambda s=s: build(root / s["name"], s)))
    running: set[int] = set()
    for s in shapes:  # two at a time: each counts only its own resident set
        if len(running) >= LANES:
            running.remove(wait())
        os.environ["RAYPO_CACHE"] = str(root / f"cache-{s['name']}")
        running.add(in_child(lambda s=s: measured(root / s["name"], s)))
    while running:
        running.remove(wait())


if __name__ == "__main__":
    main()
