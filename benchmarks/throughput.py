"""Training throughput: raypo against TRL's DPOTrainer, and raypo's kernel losses against dpo.

Two workloads, each run by both trainers in this one process, interleaved (raypo, TRL default,
TRL precompute, in alternating order from one repeat to the next), so that whatever else runs
on the machine falls on both:

- `tiny`: the tiny built-in Llama (~340k parameters), 512 pairs, 60 steps. Python overhead
  weighs here as much as the arithmetic; the kernel losses' step times are measured on it.
- `scale`: a 4-layer, 256-wide Llama (~3.2M parameters, SwiGLU 688), 2000 pairs of varied
  lengths, one epoch (250 steps of 8), the reference precompute over exactly the pairs trained
  on. Here the arithmetic dominates and the reference forward weighs what it does for a real
  model: a third of a training step's work, done once per pair by both trainers (TRL's
  default runs it live at every step, raypo before training).

Both trainers get the same model saved to a local folder, the same preference pairs (JSONL in
TRL's standard format), batch size, max length, learning rate, steps and device, in float32:

- raypo, `loss: dpo`, with an empty reference cache (the reference precompute is timed);
- TRL `DPOTrainer` with its defaults for the reference (a frozen copy run at every step);
- TRL with `precompute_ref_log_probs=True` (the precompute, done at construction, is timed).

raypo holds out a few pairs for evaluation (`eval_fraction`); on the scale workload its data
is the 2000 pairs TRL trains on plus 16 held-out ones, whose reference precompute is counted
against raypo.

Tokens per second = the non-padding tokens of prompt+chosen and prompt+rejected of every pair
trained on, counted from each trainer's own batches, over the wall time of training plus any
reference precompute. Ratios are paired: raypo's rate over TRL's in the same repeat, then the
median over repeats with the spread (min-max); the load average (`uptime`) is printed before
and after each workload. Then the step time of raypo's kernel_dpo and hmk_dpo (policy
embeddings) and of kernel_dpo with a divergence penalty, as ratios to dpo's.

    python benchmarks/throughput.py [--workloads tiny,scale] [--repeats 3] [--threads 1]
                                    [--steps 60] [--batch-size 8] [--pairs 512]
                                    [--scale-pairs 2000] [--device cpu]

A short untimed run of each trainer goes first (lazy initialisation). On a machine that other
processes share, pass `--threads 1`: torch's threads wait for each other at every operation, so
one that loses its core stalls the rest, and with several threads the timings swing by many
times. The scale workload takes about 10 minutes per repeat on a quiet 2-core machine.

Needs the `bench` extra (`pip install 'raypo[bench]'`, which brings TRL). Nothing is downloaded.

Settings that are not TRL's defaults, so that both sides do the same work: float32 (`bf16=False`;
TRL defaults to bf16) and no gradient checkpointing (TRL defaults to it; raypo does not
checkpoint, and recomputing activations would slow TRL for a memory saving this model does not
need). The tokenizer saved with the model adds BOS, as Llama's does, so TRL's tokenization and
raypo's give the same token ids (checked below). No sequence is truncated by either trainer.
"""

# ruff: noqa: E402  (the environment is set before Hugging Face libraries read it at import)

from __future__ import annotations

import os

# everything is local: a hub lookup would be a bug, so make it fail instead of waiting
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import argparse
import json
import random
import statistics
import string
import tempfile
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import datasets
import torch
import transformers
from tokenizers import processors
from transformers.trainer_callback import PrinterCallback

from raypo.data.preference import load_preferences
from raypo.data.tokenize import tokenize_pairs
from raypo.models.tiny import BOS, tiny_model, tiny_tokenizer
from raypo.train.config import load_config
from raypo.train.loop import train
from raypo.train.setup import prepare

ALPHABET = string.digits + string.ascii_letters
PROMPT_CHARS = (5, 60)  # the tiny tokenizer is character-level: characters = tokens
RESPONSE_CHARS = (5, 120)
MAX_PROMPT_LENGTH = 128  # raypo's own limit; TRL 1.16 has only max_length. Neither is reached.

# raypo loss configurations timed against dpo: (label, config overrides)
LOSS_CONFIGS = (
    ("dpo", ["loss.name=dpo"]),
    ("kernel_dpo (rbf, policy embeddings)",
     ["loss.name=kernel_dpo", "loss.kernel=rbf", "embedding_source=policy"]),
    ("hmk_dpo (policy embeddings)", ["loss.name=hmk_dpo", "embedding_source=policy"]),
    ("kernel_dpo + js penalty (top-k ref)",
     ["loss.name=kernel_dpo", "loss.kernel=rbf", "loss.divergence=js",
      "embedding_source=policy"]),
)
TRL_DEFAULT = "TRL default (live reference model)"
TRL_PRECOMPUTE = "TRL precompute_ref_log_probs=True"
TARGETS = {"trl_default": 1.3, "trl_precompute": 1.0, "kernel": 1.15}


@dataclass(frozen=True)
class Workload:
    """A model and data size: `pairs` trained on for `steps` (None: one epoch)."""

    name: str
    what: str
    model: dict  # tiny_model keyword arguments (the tiny Llama's size)
    pairs: int
    steps: int | None
    held_out: int = 0  # extra pairs raypo holds out (TRL trains on exactly `pairs`)
    kernels: bool = False  # also time the kernel losses against dpo


def workloads(args) -> dict[str, Workload]:
    return {
        "tiny": Workload("tiny", "the tiny built-in Llama", {}, args.pairs, args.steps,
                         kernels=True),
        "scale": Workload("scale", "a 4-layer, 256-wide Llama",
                          {"hidden_size": 256, "layers": 4, "heads": 4,
                           "intermediate_size": 688}, args.scale_pairs, None, held_out=16),
    }


@dataclass
class Run:
    """One timed training run."""

    label: str
    tokens: int
    pairs: int
    steps: int
    seconds: float  # training wall time + reference precompute
    reference_seconds: float  # the precompute's share (0 when the reference runs live)
    step_times: list[float]  # per optimizer step, seconds (raypo only)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds

    @property
    def pairs_per_s(self) -> float:
        return self.pairs / self.seconds

    @property
    def mean_step(self) -> float:
        """Seconds per step, reference precompute excluded."""
        return (self.seconds - self.reference_seconds) / self.steps


# ----------------------------------------------------------------------------- inputs


def write_pairs(path: Path, n: int, seed: int) -> None:
    """`n` preference pairs in TRL's standard (text) format, lengths uniform in the ranges."""
    rng = random.Random(seed)

    def text(lo: int, hi: int) -> str:
        return "".join(rng.choices(ALPHABET, k=rng.randint(lo, hi)))

    with path.open("w") as f:
        for _ in range(n):
            row = {"prompt": text(*PROMPT_CHARS), "chosen": text(*RESPONSE_CHARS),
                   "rejected": text(*RESPONSE_CHARS)}
            f.write(json.dumps(row) + "\n")


def save_model(folder: Path, **size) -> int:
    """The tiny tokenizer (made to add BOS, as Llama's does) and a fresh Llama of `size`
    (tiny_model's keywords), saved to `folder`; returns the parameter count."""
    tok = tiny_tokenizer()
    bos = tok.convert_tokens_to_ids(BOS)
    # TRL tokenizes with the tokenizer's own special tokens; raypo adds BOS to prompts itself
    # unless it is there already. With BOS added here both produce the same ids.
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, bos)])
    model = tiny_model(tok, **size)
    tok.save_pretrained(folder)
    model.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------- raypo


@contextmanager
def raypo_cache(root: Path):
    """A new, empty RAYPO_CACHE under `root` for one run: tokenization and reference outputs
    start cold."""
    previous = os.environ.get("RAYPO_CACHE")
    os.environ["RAYPO_CACHE"] = tempfile.mkdtemp(dir=root)
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("RAYPO_CACHE", None)
        else:
            os.environ["RAYPO_CACHE"] = previous


def raypo_config(args, model_dir: Path, data: Path, steps: int, extra: list[str]):
    return load_config(None, [f"eval_fraction={args.eval_fraction}",
        f"model={model_dir}", f"data={data}", f"steps={steps}", f"batch_size={args.batch_size}",
        f"lr={args.lr}", f"max_length={args.max_length}", f"max_prompt_length={MAX_PROMPT_LENGTH}",
        f"seed={args.seed}", f"device={args.device}", "dtype=float32",
        f"eval_every={steps}",  # one evaluation, after the last step, outside train_seconds
        *extra,
    ])


def run_raypo(label: str, args, model_dir: Path, data: Path, cache: Path, steps: int,
              extra: list[str]) -> Run:
    with raypo_cache(cache):
        setup = prepare(raypo_config(args, model_dir, data, steps, extra), log=lambda *_: None)
        marks = [time.perf_counter()]
        # train() calls progress after every optimizer step, before any evaluation
        metrics = train(setup, progress=lambda step, loss: marks.append(time.perf_counter()))
    step_times = [b - a for a, b in zip(marks[1:], marks[2:], strict=False)]
    return Run(label, tokens=metrics["tokens"], pairs=metrics["steps"] * args.batch_size,
               steps=metrics["steps"], seconds=metrics["train_seconds"],
               reference_seconds=setup.reference_seconds, step_times=step_times)


# ----------------------------------------------------------------------------- TRL


def _trl():
    try:
        import trl
    except ImportError as e:
        raise SystemExit("benchmarks/throughput.py needs TRL: pip install 'raypo[bench]'") from e
    return trl


def trl_trainer_class():
    class CountingDPOTrainer(_trl().DPOTrainer):
        """DPOTrainer that counts the tokens it trains on and times its reference precompute."""

        def __init__(self, *a, **kw):
            self.precompute_seconds = 0.0
            self.trained_tokens = 0
            self.trained_pairs = 0
            super().__init__(*a, **kw)

        def _precompute_ref_logps(self, *a, **kw):
            start = time.perf_counter()
            try:
                return super()._precompute_ref_logps(*a, **kw)
            finally:
                self.precompute_seconds += time.perf_counter() - start

        def training_step(self, model, inputs, *a, **kw):
            # rows are chosen then rejected (prompt + response each), right-padded
            self.trained_tokens += int(inputs["attention_mask"].sum())
            self.trained_pairs += int(inputs["attention_mask"].shape[0]) // 2
            return super().training_step(model, inputs, *a, **kw)

    return CountingDPOTrainer


def trl_trainer(args, model_dir: Path, dataset, out: Path, steps: int, precompute: bool):
    config = _trl().DPOConfig(
        output_dir=str(out), max_steps=steps, per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr, lr_scheduler_type="constant_with_warmup", warmup_steps=10,
        max_grad_norm=1.0, weight_decay=0.0, loss_type=["sigmoid"], beta=0.1,
        max_length=args.max_length, precompute_ref_log_probs=precompute,
        use_cpu=args.device == "cpu", bf16=False, fp16=False, activation_checkpointing=False,
        seed=args.seed, data_seed=args.seed, dataloader_num_workers=0,
        dataloader_pin_memory=False, eval_strategy="no", save_strategy="no", report_to=[],
        logging_steps=10**9, disable_tqdm=True, model_init_kwargs={"dtype": torch.float32},
    )
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    trainer = trl_trainer_class()(model=str(model_dir), args=config, train_dataset=dataset,
                                  processing_class=tokenizer)
    trainer.remove_callback(PrinterCallback)  # it prints the end-of-training summary
    return trainer


def run_trl(label: str, args, model_dir: Path, dataset, out: Path, steps: int,
            precompute: bool) -> tuple[Run, object]:
    trainer = trl_trainer(args, model_dir, dataset, out, steps, precompute)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start + trainer.precompute_seconds
    run = Run(label, tokens=trainer.trained_tokens, pairs=trainer.trained_pairs,
              steps=trainer.state.global_step, seconds=seconds,
              reference_seconds=trainer.precompute_seconds, step_times=[])
    return run, trainer


def same_token_ids(trainer, args, model_dir: Path, data: Path, cache: Path) -> bool:
    """Whether TRL's tokenized dataset holds the ids raypo makes of the same rows."""
    from raypo.models.load import load_tokenizer

    with raypo_cache(cache):
        ours = tokenize_pairs(load_preferences(data), load_tokenizer(str(model_dir)),
                              max_length=args.max_length, max_prompt_length=MAX_PROMPT_LENGTH)
    theirs = trainer.train_dataset
    return (len(theirs) == len(ours)
            and theirs["prompt_ids"] == ours.prompt_ids
            and theirs["chosen_ids"] == ours.chosen_ids
            and theirs["rejected_ids"] == ours.rejected_ids)


# ----------------------------------------------------------------------------- report


def verdict(value: float, target: float, at_least: bool) -> str:
    met = value >= target if at_least else value <= target
    return f"{'met' if met else 'NOT met'} ({value:.2f}x, target {'>=' if at_least else '<='} " \
           f"{target:.2f}x)"


def median_run(runs: list[Run], key) -> Run:
    """The run in the middle of `runs` by `key` (the lower middle for an even count)."""
    return sorted(runs, key=key)[(len(runs) - 1) // 2]


def spread(values: list[float], fmt: str = ".2f") -> str:
    """`median [min-max]` of `values`."""
    return (f"{statistics.median(values):{fmt}} [{min(values):{fmt}}-{max(values):{fmt}}]"
            if len(values) > 1 else f"{values[0]:{fmt}}")


def uptime() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f}, {five:.2f}, {fifteen:.2f} on {os.cpu_count()} CPUs"


def split_for_trl(args, model_dir: Path, data: Path, out: Path, cache: Path) -> int:
    """Write to `out` the rows of `data` that raypo trains on (its training split), so that
    TRL trains on exactly those pairs; returns how many."""
    from raypo.models.load import load_tokenizer

    rows = [json.loads(line) for line in data.read_text().splitlines()]
    with raypo_cache(cache):
        pairs = tokenize_pairs(load_preferences(data), load_tokenizer(str(model_dir)),
                               max_length=args.max_length, max_prompt_length=MAX_PROMPT_LENGTH)
        train_split, _ = pairs.split(args.eval_fraction, seed=args.seed)

    def key(p, c, r):
        return tuple(p), tuple(c), tuple(r)

    where = {key(*ids): i for i, ids in enumerate(zip(pairs.prompt_ids, pairs.chosen_ids,
                                                       pairs.rejected_ids, strict=True))}
    picked = [where[key(*ids)] for ids in zip(train_split.prompt_ids, train_split.chosen_ids,
                                              train_split.rejected_ids, strict=True)]
    out.write_text("".join(json.dumps(rows[i]) + "\n" for i in picked))
    return len(picked)


def run_workload(work: Workload, args, trl, root: Path) -> dict:
    """Every repeat of `work`, printed; returns {name: (ratio, target)} for the summary."""
    root = Path(tempfile.mkdtemp(dir=root, prefix=f"{work.name}-"))
    model_dir, data, cache = root / "model", root / "pairs.jsonl", root / "raypo-cache"
    cache.mkdir()
    n_params = save_model(model_dir, **work.model)
    total = work.pairs + work.held_out
    wargs = argparse.Namespace(**vars(args))
    wargs.eval_fraction = work.held_out / total if work.held_out else 0.05
    write_pairs(data, total, args.seed)
    trl_data = data
    if work.held_out:
        trl_data = root / "trained.jsonl"
        trained = split_for_trl(wargs, model_dir, data, trl_data, cache)
        assert trained == work.pairs, (trained, work.pairs)
    steps = work.steps or work.pairs // args.batch_size
    load_before, cpu_before, begin = uptime(), time.process_time(), time.perf_counter()
    print(f"\n== workload {work.name}: {work.what} ({n_params:,} parameters, character-level "
          f"tokenizer), {work.pairs} pairs trained on (prompt {PROMPT_CHARS[0]}-"
          f"{PROMPT_CHARS[1]}, responses {RESPONSE_CHARS[0]}-{RESPONSE_CHARS[1]} tokens), "
          f"{steps} steps x batch {args.batch_size}"
          f"{' (one epoch)' if work.steps is None else ''}, max_length {args.max_length}, "
          f"lr {args.lr}, float32, {args.device}, {torch.get_num_threads()} threads, "
          f"{args.repeats} repeat(s); {load_before}", flush=True)

    def trl_run(label: str, n_steps: int, precompute: bool) -> tuple[Run, object]:
        # a fresh datasets cache each time: TRL keeps precomputed log-probs there, and a
        # warm cache would skip the precompute that is being timed
        dataset = datasets.load_dataset(
            "json", data_files=str(trl_data), split="train",
            cache_dir=tempfile.mkdtemp(dir=root, prefix="hf-datasets-"))
        return run_trl(label, wargs, model_dir, dataset,
                       Path(tempfile.mkdtemp(dir=root, prefix="trl-")), n_steps, precompute)

    # warm-up: one short run of each trainer, untimed, so that the first timed run does not
    # pay for lazy initialisation (imports, kernel selection, allocator) that later runs skip
    run_raypo("warm-up", wargs, model_dir, data, cache, args.warmup, ["loss.name=dpo"])
    _, trainer = trl_run("warm-up", args.warmup, False)
    ids_match = same_token_ids(trainer, wargs, model_dir, trl_data, cache)
    del trainer

    configs = LOSS_CONFIGS if work.kernels else LOSS_CONFIGS[:1]
    runs: dict[str, list[Run]] = {}
    for repeat in range(args.repeats):
        trainers = [("raypo", None), (TRL_DEFAULT, False), (TRL_PRECOMPUTE, True)]
        if repeat % 2:  # alternate who goes first: a load that drifts falls on both
            trainers.reverse()
        for label, precompute in trainers:
            if label != "raypo":
                runs.setdefault(label, []).append(trl_run(label, steps, precompute)[0])
                continue
            for name, extra in configs:
                runs.setdefault(name, []).append(
                    run_raypo(name, wargs, model_dir, data, cache, steps, extra))
        print(f"  repeat {repeat + 1}/{args.repeats}: raypo {runs['dpo'][-1].tokens_per_s:.0f}"
              f" tokens/s, TRL default {runs[TRL_DEFAULT][-1].tokens_per_s:.0f}, TRL "
              f"precompute {runs[TRL_PRECOMPUTE][-1].tokens_per_s:.0f}; {uptime()}",
              flush=True)

    print(f"token ids: {'identical' if ids_match else 'DIFFERENT'} in raypo and TRL "
          f"(all {work.pairs} pairs compared)")
    raypo, trl_default, trl_pre = runs["dpo"], runs[TRL_DEFAULT], runs[TRL_PRECOMPUTE]
    print(f"{'configuration':<38}{'pairs':>7}{'tokens':>9}{'seconds':>22}{'ref s':>8}"
          f"{'tokens/s':>22}")
    for label, rs in (("raypo dpo", raypo), (TRL_DEFAULT, trl_default),
                      (TRL_PRECOMPUTE, trl_pre)):
        print(f"{label:<38}{rs[0].pairs:>7}{rs[0].tokens:>9}"
              f"{spread([r.seconds for r in rs], '.1f'):>22}"
              f"{statistics.median(r.reference_seconds for r in rs):>8.1f}"
              f"{spread([r.tokens_per_s for r in rs], '.0f'):>22}")
    paired = {name: [a.tokens_per_s / b.tokens_per_s for a, b in zip(raypo, other, strict=True)]
              for name, other in (("TRL default", trl_default), ("TRL precompute", trl_pre))}
    for name, ratios in paired.items():
        print(f"raypo / {name} tokens/s, paired by repeat: "
              f"{' '.join(f'{r:.2f}' for r in ratios)} -> median {spread(ratios)}")
    warm = statistics.median(r.mean_step for r in raypo)
    print(f"raypo reference precompute (cold, {work.pairs + work.held_out} pairs, both splits):"
          f" {statistics.median(r.reference_seconds for r in raypo):.1f} s = "
          f"{statistics.median(r.reference_seconds for r in raypo) / warm:.1f} dpo steps")
    out = {f"{work.name}: raypo tokens/s vs TRL default":
           (statistics.median(paired["TRL default"]), TARGETS["trl_default"], True),
           f"{work.name}: vs TRL precompute":
           (statistics.median(paired["TRL precompute"]), TARGETS["trl_precompute"], True)}
    if work.kernels:
        out.update(kernel_steps(runs, args.steps))
    wall = time.perf_counter() - begin
    busy = (time.process_time() - cpu_before) / wall
    print(f"workload {work.name}: {wall:.0f} s, this process busy on {busy:.2f} of "
          f"{os.cpu_count()} CPUs on average; before: {load_before}; after: {uptime()}")
    return out


def kernel_steps(runs: dict[str, list[Run]], steps: int) -> dict:
    """The kernel losses' step time against dpo's (reference precompute excluded)."""
    med = {label: median_run(runs[label], key=lambda run: run.mean_step)
           for label, _ in LOSS_CONFIGS}
    base = med["dpo"]
    print(f"\nraypo step time, reference precompute excluded: mean over the {steps} steps, "
          f"and the median step beside")
    print(f"{'loss':<38}{'ms/step':>9}{'x dpo':>8}{'median ms':>11}{'x dpo':>8}")
    for label, run in med.items():
        median = statistics.median(run.step_times)
        print(f"{label:<38}{run.mean_step * 1e3:>9.2f}{run.mean_step / base.mean_step:>7.2f}x"
              f"{median * 1e3:>11.2f}{median / statistics.median(base.step_times):>7.2f}x")
    kernel, hmk = (med[label] for label, _ in LOSS_CONFIGS[1:3])
    return {"tiny: kernel_dpo step vs dpo": (kernel.mean_step / base.mean_step,
                                             TARGETS["kernel"], False),
            "tiny: hmk_dpo step vs dpo": (hmk.mean_step / base.mean_step, TARGETS["kernel"],
                                          False)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workloads", default="tiny,scale",
                    help="comma-separated: tiny (Python overhead weighs), scale (arithmetic "
                         "dominates, as for a real model)")
    ap.add_argument("--steps", type=int, default=60, help="tiny workload's steps")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--pairs", type=int, default=512, help="tiny workload's pairs")
    ap.add_argument("--scale-pairs", type=int, default=2000,
                    help="scale workload's pairs trained on (one epoch)")
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=5,
                    help="untimed steps of raypo and of TRL run first (lazy initialisation)")
    ap.add_argument("--repeats", type=int, default=3,
                    help="run every configuration this many times; ratios are medians")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: torch's own, one per core); 1 gives steadier "
                         "timings on a machine that other processes share")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if RESPONSE_CHARS[1] + PROMPT_CHARS[1] + 2 > args.max_length:
        ap.error(f"--max-length must be at least {RESPONSE_CHARS[1] + PROMPT_CHARS[1] + 2}, so "
                 "that no pair is truncated (the trainers truncate differently)")
    known = workloads(args)
    chosen = [w.strip() for w in args.workloads.split(",") if w.strip()]
    if not chosen or set(chosen) - set(known):
        ap.error(f"--workloads: expected some of {', '.join(known)}")
    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    # TRL 1.16 calls transformers APIs that transformers 5 renamed; the notices are not ours
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    # raypo's held-out split is small on purpose (TRL trains on every pair): not a finding
    warnings.filterwarnings("ignore", message=".*held-out split has only")
    torch.manual_seed(args.seed)
    trl = _trl()
    print(f"raypo vs TRL {trl.__version__} DPOTrainer, torch {torch.__version__}; {uptime()}")
    targets = {}
    with tempfile.TemporaryDirectory(prefix="raypo-throughput-") as tmp:
        for name in chosen:
            targets.update(run_workload(known[name], args, trl, Path(tmp)))
    print("\ntargets (median of paired ratios): " + "; ".join(
        f"{name} {verdict(*result)}" for name, result in targets.items()))


if __name__ == "__main__":
    main()
