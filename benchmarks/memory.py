"""Peak memory and tokens/s of a training step, before and after chunked log-probs (issue 15).

Before (commit c8e8d6c, `--before`) the training forward materialised the output head's logits
at every response position (rows x positions x vocabulary, float32) and took the log-softmax
over them; after (the working tree, `--after`), `raypo.train.forward.token_outputs` applies
the head to the real response tokens only, `logits_chunk` tokens at a time, recomputed in the
backward (for `loss: dpo` through `raypo.train.chunked_head.LinearLogProbs`, by vocabulary
blocks). This script runs both on the same models and data, in one run, so the ratios compare
like with like.

The code. Each version's `raypo/` package is exported to a temporary folder: the before
commit with `git archive`, the working tree copied as it is when the script starts (others may
edit it meanwhile: every after run uses that one snapshot), or a commit given to `--after`.
A child process imports raypo from there (PYTHONPATH; it checks `raypo.__file__`).

The models. Qwen2.5-0.5B's width (hidden 896, SwiGLU intermediate 4864, 14 attention heads,
2 key-value heads, tied input and output embeddings, as that model has) with 2 layers and with
4 (`--layers`), and a vocabulary of 151,936 (Qwen's) and of 32,000 (`--vocabs`); random
weights (seed 0) from a transformers `Qwen2Config`, saved with `save_pretrained` to a
temporary folder. The tokenizer, saved beside it, is a byte-level BPE made with `tokenizers`
with exactly the vocabulary's size (transformers loads any tokenizer beside a qwen2 config as
`Qwen2Tokenizer`, which rebuilds a byte-level BPE from the vocabulary and merges, so a
WordLevel one would tokenize to nothing): the byte symbols, then words of 1 to 4 letters
with a leading space, one token each. Nothing is downloaded (HF_HUB_OFFLINE=1).

The data. A JSONL of preference pairs to train on (`batch_size` x `steps`, each trained on
once), each with its own prompt of 200 words and responses of 299 (`--prompt-tokens`,
`--response-tokens`): raypo adds BOS to the prompt and EOS to the responses, so every row is
201 + 300 tokens, with no padding. The words are drawn (seeded) from 4-letter words that both
vocabularies have, with the same ids. raypo requires a held-out split of at least 8 pairs:
8 short pairs (4 words each) sharing one prompt are placed so that raypo's seeded split holds
out exactly them (checked in every run), which keeps the reference precompute short. Training:
`batch_size: 4` pairs (8 rows), `--steps` (default 2) steps, `loss: dpo`, float32, CPU, lr
1e-5, `htsr: off` (a key the before code accepts and ignores).

The measurement. Every run is its own fresh Python process (`--child`), through raypo's real
training path, `raypo.train.setup.prepare` then `raypo.train.loop.train` (the same functions
and signatures at both commits), with an empty RAYPO_CACHE. `train`'s progress callback,
called after every optimizer step, raises after the last one: the final evaluation and HT-SR
metrics (not what is measured) are skipped.

- memory: the process's resident set size (RSS) read just before `prepare` (imports done,
  no model built: "base"), and its peak (`resource.getrusage(RUSAGE_SELF).ru_maxrss`) read
  after the last optimizer step: "peak" covers the model load, the reference precompute and
  the training steps. "used" = peak - base. The differences between the vocabularies are
  differences of "used";
- tokens/s: the non-padding tokens of every batch trained on (counted from the batches
  `train` collates: chosen and rejected rows, prompt included) over the wall time from the
  call of `train` to the end of the last step. raypo's own `tokens_per_s` is not used: its
  `train_seconds` starts from the reference precompute's time, which is set-up here. The
  first step's lazy allocations are included; `s/step` is the last step's wall time alone.
  `tok/CPU-s`: the same tokens over the process's CPU time in those steps (all threads),
  steadier than wall time on a machine that other jobs load;
- loss: the last step's loss; before and after start from the same weights and data, so
  they agree to float32 rounding (a check that both did the same work).

Before and after alternate (before first at one vocabulary, after first at the next), so that a
load that drifts falls on both; the load average is printed with every run. Then, unless
`--no-checkpointing`, the after code with `gradient_checkpointing: true` at the large
vocabulary of each shape; the table says whether the policy reported checkpointing as on
(`is_gradient_checkpointing`). `--profile` adds, per version, one more run at the first shape
and the large vocabulary whose last step runs under `torch.profiler`, and prints the ops with
the most self CPU time, overall and by input shapes (which matrix products are the output
head's); these runs are not in the tables (the profiler costs time and memory).
`--profile-only` makes only those. `--logits-chunk` sets raypo's `logits_chunk` (after
only: the before code ignores the key).

    python benchmarks/memory.py [--layers 2,4] [--vocabs 151936,32000] [--steps 2]
                                [--batch-size 4] [--prompt-tokens 200] [--response-tokens 300]
                                [--before c8e8d6c] [--after REF] [--threads N]
                                [--no-checkpointing] [--profile] [--profile-only]
                                [--logits-chunk N] [--versions before,after] [--quick]
                                [--timeout 3600]

`--quick`: the 2-layer shape only, no checkpointing runs. The full run is 10 child processes
(12 with `--profile`); see the end of this docstring for what it takes here.

Targets (issue 15, item 7): used(151,936) - used(32,000) after <= 1.15 x what the larger
embedding itself needs in float32 with its gradient and AdamW's two moments,
(151,936 - 32,000) x 896 x 4 bytes x 4 = 1.72 GB, so <= 1.98 GB (before: about 8 GB); and
tokens/s at 151,936 after >= before.

On this 2-core machine, shared with other jobs: the full run with `--profile` took 16 minutes
at a load average of about 2 (21 minutes without `--profile` when the load fell from 7 to 2);
`--quick` takes 5 to 12 minutes. A before run at 151,936 takes 1.5 minutes at load 2 and 12
at load 8, so compare tokens/s within one run, and read the tok/CPU-s column beside it.
"""

# ruff: noqa: E402  (the environment is set before Hugging Face libraries read it at import)

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import gc
import itertools
import json
import random
import resource
import shutil
import string
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
QWEN_WIDTH = {"hidden_size": 896, "intermediate_size": 4864, "num_attention_heads": 14,
              "num_key_value_heads": 2}
SPECIALS = ("<pad>", "<s>", "<unk>", "</s>")
HELD_OUT, SHORT = 8, 4  # raypo's minimum held-out split is 8 pairs; their words
SPACE = "\u0120"  # byte-level BPE's symbol for a space ("Ġ")
QWEN_PRETOKENIZE = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"""
                    r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
# the 4-letter words that a 32,000 vocabulary has, with the same ids in a larger one
COMMON_WORDS = 32_000 - len(SPECIALS) - 256 - sum(26 ** k for k in range(1, 4))
RESULT = "RESULT "
GB = 1e9


def uptime() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load {one:.1f}/{five:.1f}/{fifteen:.1f}"


# ----------------------------------------------------------------------------- inputs


def _words(level: int) -> list[str]:
    """The `level`-letter lowercase words in the tokenizer's order."""
    return ["".join(w) for w in itertools.product(string.ascii_lowercase, repeat=level)]


def save_tokenizer(folder: Path, vocab: int) -> None:
    """A byte-level BPE tokenizer of exactly `vocab` entries, loadable as Qwen2Tokenizer (what
    AutoTokenizer makes of any tokenizer beside a qwen2 config): the specials, the 256 byte
    symbols, then " a".." z", " aa".." zz", " aaa".." zzz" and as many 4-letter words " aaaa",
    " aaab", ... as fill the vocabulary, each word with the merges that build it."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    ids = {tok: i for i, tok in enumerate(SPECIALS)}
    ids.update({ch: len(SPECIALS) + i
                for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))})
    merges = []
    for level in range(1, 5):
        for word in _words(level):
            if len(ids) == vocab:
                break
            ids[SPACE + word] = len(ids)
            merges.append((SPACE + word[:-1], word[-1]))
    if len(ids) != vocab:
        raise ValueError(f"vocabulary {vocab}: between {len(ids) - len(_words(4))} and "
                         f"{len(ids)} only")
    core = Tokenizer(models.BPE(vocab=ids, merges=merges, fuse_unk=False))
    core.normalizer = normalizers.NFC()
    core.pre_tokenizer = pre_tokenizers.Sequence([  # Qwen2Tokenizer's
        pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    core.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>",
                            unk_token="<unk>", eos_token="</s>",
                            padding_side="right").save_pretrained(folder)


def save_model(folder: Path, vocab: int, layers: int, seed: int, data: Path) -> int:
    """A Qwen2 of Qwen2.5-0.5B's width with `layers` layers and random weights, saved with its
    tokenizer; returns the parameter count. Checks that the tokenizer, loaded back as raypo
    loads it, makes one token of each word of `data`."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=vocab, num_hidden_layers=layers, tie_word_embeddings=True,
                         max_position_embeddings=32768, rms_norm_eps=1e-6,
                         pad_token_id=0, bos_token_id=1, eos_token_id=3, **QWEN_WIDTH)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    n = sum(p.numel() for p in model.parameters())
    model.save_pretrained(folder)
    save_tokenizer(folder, vocab)
    tok = AutoTokenizer.from_pretrained(folder)
    row = max((json.loads(line) for line in data.read_text().splitlines()),
              key=lambda r: len(r["prompt"]))
    for column in ("prompt", "chosen"):
        ids = tok(row[column], add_special_tokens=False)["input_ids"]
        if len(ids) != len(row[column].split()) or tok.unk_token_id in ids:
            raise RuntimeError(f"{type(tok).__name__}: {len(ids)} tokens for "
                               f"{len(row[column].split())} words")
    del model
    gc.collect()
    return n


def write_pairs(path: Path, pairs: int, prompt_words: int, response_words: int,
                seed: int, data_seed: int) -> None:
    """`pairs` pairs to train on, each with its own prompt of `prompt_words` words and
    responses of `response_words`, and HELD_OUT short pairs that share one prompt, placed so
    that raypo's split (prompt groups in a `data_seed` permutation, the first groups held out
    until eval_fraction is reached) holds out exactly those: the held-out split that raypo
    requires costs little reference precompute then."""
    rng = random.Random(seed)
    words = _words(4)[:COMMON_WORDS]

    def text(n: int) -> str:  # one token per word, a leading space included
        return "".join(" " + rng.choice(words) for _ in range(n))

    rows = [{"prompt": text(prompt_words), "chosen": text(response_words),
             "rejected": text(response_words)} for _ in range(pairs)]
    prompt = text(SHORT)
    short = [{"prompt": prompt, "chosen": text(SHORT), "rejected": text(SHORT)}
             for _ in range(HELD_OUT)]
    first = int(np.random.default_rng(data_seed).permutation(pairs + 1)[0])
    rows = rows[:first] + short + rows[first:]  # the short group is group `first`
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def export_code(ref: str | None, dest: Path) -> Path:
    """`raypo/` at commit `ref` (None: the working tree as it is now) under `dest`."""
    dest.mkdir(parents=True)
    if ref is None:
        shutil.copytree(REPO / "raypo", dest / "raypo",
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        return dest
    archive = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", ref, "raypo"],
                             check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def describe(ref: str | None) -> str:
    if ref is None:
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "raypo"],
                               capture_output=True, text=True).stdout.strip()
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True).stdout.strip()
        changes = ", with uncommitted changes in raypo/" if dirty else ""
        return f"working tree (HEAD {head}{changes})"
    out = subprocess.run(["git", "-C", str(REPO), "log", "-1", "--format=%h %s", ref],
                         capture_output=True, text=True).stdout.strip()
    return out[:90]


# ----------------------------------------------------------------------------- the child


def rss_now() -> int:
    """Current resident set size in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def max_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


class _Finished(Exception):
    """Raised in train's progress callback after the last step: the final evaluation and
    HT-SR metrics are not measured."""


def child(spec: dict) -> None:
    """One measured training run (see the module's docstring); prints RESULT + JSON."""
    import warnings

    import torch

    warnings.filterwarnings("ignore")
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    import raypo
    import raypo.train.loop as loop
    from raypo.train.config import load_config
    from raypo.train.setup import prepare

    where = Path(raypo.__file__).resolve()
    if not where.is_relative_to(Path(spec["code"]).resolve()):
        raise SystemExit(f"raypo imported from {where}, not from {spec['code']}")
    base = rss_now()
    cfg = load_config(None, spec["overrides"])
    setup = prepare(cfg, log=lambda *_: None)
    after_prepare = max_rss()
    lengths = set(setup.train_pairs.lengths().tolist())
    if len(setup.eval_pairs) != HELD_OUT or lengths != {spec["pair_length"]}:
        raise SystemExit(f"split: {len(setup.eval_pairs)} pairs held out, training pairs of "
                         f"{sorted(lengths)} tokens; expected {HELD_OUT}, {spec['pair_length']}")
    policy = setup.policy
    checkpointing = bool(getattr(policy, "is_gradient_checkpointing", False))
    tokens, losses, profiler = [], [], {}
    collate = loop.collate

    def counting_collate(*a, **kw):  # the tokens of every batch trained on
        batch = collate(*a, **kw)
        tokens.append(int(batch.n_tokens))
        return batch

    loop.collate = counting_collate
    marks, cpu, peaks = [time.perf_counter()], [time.process_time()], []

    def progress(step: int, loss: float) -> None:
        marks.append(time.perf_counter())
        cpu.append(time.process_time())
        peaks.append(max_rss())
        losses.append(loss)
        if spec["profile"] and step == cfg.steps - 1:
            from torch.profiler import ProfilerActivity, profile
            profiler["p"] = profile(activities=[ProfilerActivity.CPU], record_shapes=True)
            profiler["p"].__enter__()
        if step < cfg.steps:
            return
        if spec["profile"]:
            p = profiler["p"]
            p.__exit__(None, None, None)
            averages = p.key_averages()
            profiler["table"] = averages.table(sort_by="self_cpu_time_total",
                                               row_limit=spec["profile_rows"])
            profiler["shapes"] = p.key_averages(group_by_input_shape=True).table(
                sort_by="self_cpu_time_total", row_limit=spec["profile_rows"],
                max_name_column_width=40, max_shapes_column_width=70)
            profiler["total_s"] = sum(e.self_cpu_time_total for e in averages) / 1e6
        raise _Finished

    try:
        loop.train(setup, progress=progress)
        raise SystemExit("train() returned without calling progress after its last step")
    except _Finished:
        pass
    result = {
        "raypo": str(where.parent), "base": base, "after_prepare": after_prepare,
        "peak": peaks[-1], "tokens": sum(tokens), "steps": len(marks) - 1,
        "step_seconds": marks[-1] - marks[0], "reference_seconds": setup.reference_seconds,
        "step_times": [b - a for a, b in zip(marks, marks[1:], strict=False)],
        "cpu_seconds": cpu[-1] - cpu[0], "loss": losses[-1], "checkpointing": checkpointing,
        "threads": torch.get_num_threads(),
        "params": sum(p.numel() for p in policy.parameters()),
    }
    if profiler:
        print(f"profile of step {cfg.steps} ({profiler['total_s']:.1f} s self CPU time in all):")
        print(profiler["table"])
        print("the same, by input shapes:")
        print(profiler["shapes"])
    print(RESULT + json.dumps(result), flush=True)


# ----------------------------------------------------------------------------- the parent


@dataclass
class Run:
    version: str  # before | after | after+gc
    layers: int
    vocab: int
    ok: bool
    seconds: float  # the child's wall time
    load: str
    base: int = 0
    peak: int = 0
    tokens: int = 0
    step_seconds: float = 0.0  # the steps' wall time (reference precompute excluded)
    last_step: float = 0.0
    cpu_seconds: float = 0.0  # the steps' CPU time, all threads of the process
    loss: float = float("nan")
    checkpointing: bool = False
    error: str = ""

    @property
    def used(self) -> int:
        return self.peak - self.base

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.step_seconds if self.step_seconds else float("nan")

    @property
    def tokens_per_cpu_s(self) -> float:
        return self.tokens / self.cpu_seconds if self.cpu_seconds else float("nan")


def pairs(args) -> int:
    """Pairs trained on: each once."""
    return args.batch_size * args.steps


def overrides(args, model: Path, data: Path, checkpointing: bool) -> list[str]:
    length = args.prompt_tokens + 1 + args.response_tokens  # BOS and EOS added by raypo
    return [f"model={model}", f"data={data}", f"steps={args.steps}",
            f"batch_size={args.batch_size}", "loss.name=dpo", "dtype=float32", "device=cpu",
            f"eval_fraction={HELD_OUT / (HELD_OUT + pairs(args))}", "lr=1e-5", "data_seed=0",
            "warmup_steps=0", f"seed={args.seed}", f"max_length={length}",
            f"max_prompt_length={args.prompt_tokens + 1}", "htsr=off",
            *([f"logits_chunk={args.logits_chunk}"] if args.logits_chunk else []),
            *(["gradient_checkpointing=true"] if checkpointing else [])]


def measure(args, version: str, code: Path, model: Path, data: Path, layers: int, vocab: int,
            root: Path, profile: bool = False) -> Run:
    spec = {"code": str(code), "threads": args.threads, "profile": profile,
            "pair_length": args.prompt_tokens + 1 + args.response_tokens,
            "profile_rows": args.profile_rows,
            "overrides": overrides(args, model, data, version.endswith("+gc"))}
    env = dict(os.environ, PYTHONPATH=str(code),
               RAYPO_CACHE=tempfile.mkdtemp(dir=root, prefix="cache-"))
    load = uptime()
    start = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, str(root / "memory.py"), "--child",
                               json.dumps(spec)],
                              capture_output=True, text=True, env=env, cwd=root,
                              timeout=args.timeout)
        out, err, rc = proc.stdout, proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
        out, err, rc = e.stdout or "", f"timed out after {args.timeout} s", -1
        out = out.decode() if isinstance(out, bytes) else out
    seconds = time.perf_counter() - start
    shutil.rmtree(env["RAYPO_CACHE"], ignore_errors=True)
    line = next((x for x in out.splitlines() if x.startswith(RESULT)), None)
    if rc != 0 or line is None:
        tail = "\n".join((err or out).strip().splitlines()[-15:])
        print(f"  {version} {layers} layers, vocab {vocab}: FAILED (exit {rc})\n{tail}",
              flush=True)
        return Run(version, layers, vocab, False, seconds, load, error=tail)
    if profile:
        print(out[:out.index(RESULT)].rstrip(), flush=True)
    r = json.loads(line[len(RESULT):])
    run = Run(version, layers, vocab, True, seconds, load, base=r["base"], peak=r["peak"],
              tokens=r["tokens"], step_seconds=r["step_seconds"],
              last_step=r["step_times"][-1], cpu_seconds=r["cpu_seconds"], loss=r["loss"],
              checkpointing=r["checkpointing"])
    expected = 2 * args.batch_size * args.steps * (args.prompt_tokens + args.response_tokens + 1)
    if run.tokens != expected:
        print(f"  note: {run.tokens} tokens trained on, {expected} expected (truncation?)")
    print(f"  {version:<9}{layers} layers, vocab {vocab:>7,}: used {run.used / GB:5.2f} GB "
          f"(peak {run.peak / GB:.2f}, base {run.base / GB:.2f}), {run.tokens_per_s:6.1f} "
          f"tokens/s ({run.tokens_per_cpu_s:.1f} per CPU-second), loss {run.loss:.6f}; "
          f"{seconds:.0f} s in all; {load} before, {uptime()} after", flush=True)
    return run


def table(runs: list[Run], layers: int, vocabs: list[int]) -> None:
    print(f"\n{layers} layers: {'version':<10}{'vocab':>9}{'base GB':>9}{'peak GB':>9}"
          f"{'used GB':>9}{'tokens/s':>10}{'tok/CPU-s':>10}{'s/step':>8}{'last loss':>12}"
          "  checkpointing")
    for r in runs:
        if r.layers != layers:
            continue
        if not r.ok:
            print(f"{'':>10}{r.version:<10}{r.vocab:>9,}  failed: {r.error.splitlines()[-1:]}")
            continue
        gc_note = ("on" if r.checkpointing else "NOT on (the key had no effect)") \
            if r.version.endswith("+gc") else ("on" if r.checkpointing else "off")
        print(f"{'':>10}{r.version:<10}{r.vocab:>9,}{r.base / GB:>9.2f}{r.peak / GB:>9.2f}"
              f"{r.used / GB:>9.2f}{r.tokens_per_s:>10.1f}{r.tokens_per_cpu_s:>10.1f}"
              f"{r.last_step:>8.1f}{r.loss:>12.6f}"
              f"  {gc_note}")
    get = {(r.version, r.vocab): r for r in runs if r.layers == layers and r.ok}
    big, small = max(vocabs), min(vocabs)
    budget = 1.15 * (big - small) * QWEN_WIDTH["hidden_size"] * 4 * 4
    diffs = {}
    for version in ("before", "after", "after+gc"):
        if (version, big) in get and (version, small) in get:
            diffs[version] = get[version, big].used - get[version, small].used
            print(f"  {version}: used at {big:,} - used at {small:,} = "
                  f"{diffs[version] / GB:.2f} GB")
    if "after" in diffs and len(vocabs) > 1:
        met = diffs["after"] <= budget
        print(f"  target used({big:,}) - used({small:,}) <= {budget / GB:.2f} GB (1.15 x the "
              f"embedding's weights, gradient and 2 AdamW moments): "
              f"{'met' if met else 'NOT met'} ({diffs['after'] / GB:.2f} GB"
              + (f"; before {diffs['before'] / GB:.2f} GB, after/before "
                 f"{diffs['after'] / diffs['before']:.2f}x" if "before" in diffs else "") + ")")
    for vocab in vocabs:
        if ("before", vocab) in get and ("after", vocab) in get:
            b, a = get["before", vocab], get["after", vocab]
            print(f"  vocab {vocab:,}: after/before used memory {a.used / b.used:.2f}x, "
                  f"peak {a.peak / b.peak:.2f}x, tokens/s {a.tokens_per_s / b.tokens_per_s:.2f}x"
                  f" (per CPU-second {a.tokens_per_cpu_s / b.tokens_per_cpu_s:.2f}x; last step "
                  f"{a.last_step / b.last_step:.2f}x the time); "
                  f"loss difference {abs(a.loss - b.loss):.1e}")
    if ("before", big) in get and ("after", big) in get:
        b, a = get["before", big], get["after", big]
        ratio = a.tokens_per_s / b.tokens_per_s
        cpu = a.tokens_per_cpu_s / b.tokens_per_cpu_s
        print(f"  target tokens/s at {big:,} after >= before: "
              f"{'met' if ratio >= 1 else 'NOT met'} ({ratio:.2f}x; per CPU-second {cpu:.2f}x)")
    if ("after+gc", big) in get and ("after", big) in get:
        g, a = get["after+gc", big], get["after", big]
        print(f"  gradient checkpointing at {big:,}: used {g.used / a.used:.2f}x, tokens/s "
              f"{g.tokens_per_s / a.tokens_per_s:.2f}x of after without it")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--layers", default="2,4", help="comma-separated layer counts (shapes)")
    ap.add_argument("--vocabs", default="151936,32000", help="comma-separated vocabulary sizes")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=4, help="pairs per step (2x rows)")
    ap.add_argument("--prompt-tokens", type=int, default=200, help="words per prompt (+BOS)")
    ap.add_argument("--response-tokens", type=int, default=300,
                    help="tokens per response, EOS included")
    ap.add_argument("--before", default="c8e8d6c", help="commit of the before code")
    ap.add_argument("--after", default=None,
                    help="commit of the after code (default: the working tree, copied at start)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads in each run (default: torch's own, one per core)")
    ap.add_argument("--no-checkpointing", action="store_true",
                    help="skip the gradient_checkpointing: true runs of the after code")
    ap.add_argument("--profile", action="store_true",
                    help="also profile the last step of each version (first shape, large "
                         "vocabulary) with torch.profiler")
    ap.add_argument("--profile-rows", type=int, default=25)
    ap.add_argument("--profile-only", action="store_true",
                    help="only the --profile runs (first shape, large vocabulary)")
    ap.add_argument("--logits-chunk", type=int, default=None,
                    help="raypo's logits_chunk in every run (default: raypo's own, 512; the "
                         "before code accepts the key and ignores it)")
    ap.add_argument("--quick", action="store_true",
                    help="the 2-layer shape only, no checkpointing runs")
    ap.add_argument("--versions", default="before,after",
                    help="which code to run: before, after or both (comma-separated)")
    ap.add_argument("--timeout", type=int, default=3600, help="seconds per run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="also write every run's figures to this file")
    return ap


def _checked(ap: argparse.ArgumentParser, args) -> tuple[list[int], list[int]]:
    """(layer counts, vocabularies) of the command line, its options checked and filled."""
    args.profile = args.profile or args.profile_only
    args.versions = {v.strip() for v in args.versions.split(",") if v.strip()}
    if not args.versions or args.versions - {"before", "after"}:
        ap.error("--versions: before, after or both")
    if args.steps < 2 and args.profile:
        ap.error("--profile needs --steps >= 2 (the last step is profiled)")
    layer_counts = [int(x) for x in args.layers.split(",") if x.strip()]
    vocabs = [int(x) for x in args.vocabs.split(",") if x.strip()]
    if args.quick:
        layer_counts, args.no_checkpointing = layer_counts[:1], True
    if min(vocabs) < 32_000:
        ap.error("--vocabs: at least 32000 (the data's words are the first 31,996)")
    return layer_counts, vocabs


def main() -> None:
    ap = _parser()
    args = ap.parse_args()
    if args.child:
        return child(json.loads(args.child))
    layer_counts, vocabs = _checked(ap, args)

    begin = time.perf_counter()
    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="raypo-memory-") as tmp:
        root = Path(tmp)
        code = {"before": export_code(args.before, root / "before"),
                "after": export_code(args.after, root / "after")}
        code["after+gc"] = code["after"]
        data = root / "pairs.jsonl"
        write_pairs(data, pairs(args), args.prompt_tokens, args.response_tokens - 1, args.seed,
                    data_seed=0)
        shutil.copy(__file__, root / "memory.py")  # the children's code, whatever happens here
        print(f"before: {describe(args.before)}\nafter: {describe(args.after)}\n"
              f"Qwen2.5-0.5B width (hidden 896, SwiGLU 4864, 14 heads, 2 KV heads, tied "
              f"embeddings), float32, loss dpo, batch {args.batch_size} pairs "
              f"({2 * args.batch_size} rows) of {args.prompt_tokens + 1} + "
              f"{args.response_tokens} tokens, {args.steps} steps, threads "
              f"{args.threads or 'default'}, {os.cpu_count()} CPUs; {uptime()}", flush=True)
        order = 0
        for layers in layer_counts:
            models = {}
            for vocab in vocabs:
                models[vocab] = root / f"model-{layers}-{vocab}"
                n = save_model(models[vocab], vocab, layers, args.seed, data)
                print(f"model: {layers} layers, vocabulary {vocab:,}: {n / 1e6:.0f}M parameters",
                      flush=True)
            for vocab in [] if args.profile_only else vocabs:
                versions = ["before", "after"] if order % 2 == 0 else ["after", "before"]
                order += 1
                for version in (v for v in versions if v in args.versions):
                    runs.append(measure(args, version, code[version], models[vocab], data,
                                        layers, vocab, root))
            if not (args.no_checkpointing or args.profile_only or "after" not in args.versions):
                big = max(vocabs)
                runs.append(measure(args, "after+gc", code["after"], models[big], data, layers,
                                    big, root))
            if args.profile and layers == layer_counts[0]:
                big = max(vocabs)
                for version in (v for v in ("before", "after") if v in args.versions):
                    print(f"\n-- profile: {version}, {layers} layers, vocabulary {big:,}")
                    measure(args, version, code[version], models[big], data, layers, big, root,
                            profile=True)
            for folder in models.values():
                shutil.rmtree(folder, ignore_errors=True)
    for layers in layer_counts:
        table(runs, layers, vocabs)
    print(f"\nwall time {time.perf_counter() - begin:.0f} s; {uptime()}")
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in runs], indent=1))


if __name__ == "__main__":
    main()
