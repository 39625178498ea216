"""Training throughput: raypo against TRL's DPOTrainer, and raypo's kernel losses against dpo.

Both trainers run in this one process, on the same tiny Llama saved to a local folder, the same
preference pairs (a JSONL file in TRL's standard format, lengths varied), the same batch size,
max length, learning rate, number of steps and device, in float32:

- raypo, `loss: dpo`, with an empty reference cache (the reference precompute is timed);
- TRL `DPOTrainer` with its defaults for the reference (a frozen copy run at every step);
- TRL with `precompute_ref_log_probs=True` (the precompute, done at construction, is timed).

Tokens per second = the non-padding tokens of prompt+chosen and prompt+rejected of every pair
trained on, counted from each trainer's own batches, over the wall time of training plus any
reference precompute. Then the step time of raypo's kernel_dpo and hmk_dpo (policy embeddings)
and of kernel_dpo with a divergence penalty, as ratios to dpo's (reference precompute excluded).

    python benchmarks/throughput.py [--steps 60] [--batch-size 8] [--pairs 512] [--repeats 1]
                                    [--threads N] [--device cpu]

A short untimed run of each trainer goes first (lazy initialisation). On a machine that other
processes share, pass `--threads 1`: torch's threads wait for each other at every operation, so
one that loses its core stalls the rest, and with several threads the timings swing by many
times; `--repeats 3` reports the median run. The last line says how busy the CPUs were.

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
import dataclasses
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


def save_model(folder: Path) -> int:
    """The tiny tokenizer (made to add BOS, as Llama's does) and a fresh tiny Llama, saved to
    `folder`; returns the parameter count."""
    tok = tiny_tokenizer()
    bos = tok.convert_tokens_to_ids(BOS)
    # TRL tokenizes with the tokenizer's own special tokens; raypo adds BOS to prompts itself
    # unless it is there already. With BOS added here both produce the same ids.
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, bos)])
    model = tiny_model(tok)
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
    return load_config(None, [
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--pairs", type=int, default=512)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=5,
                    help="untimed steps of raypo and of TRL run first (lazy initialisation)")
    ap.add_argument("--repeats", type=int, default=1,
                    help="run every configuration this many times and report the median run")
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
    begin = time.perf_counter()
    load_before, cpu_before = os.getloadavg()[0], time.process_time()
    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    # TRL 1.16 calls transformers APIs that transformers 5 renamed; the notices are not ours
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    torch.manual_seed(args.seed)
    trl = _trl()

    with tempfile.TemporaryDirectory(prefix="raypo-throughput-") as tmp:
        root = Path(tmp)
        model_dir, data, cache = root / "model", root / "pairs.jsonl", root / "raypo-cache"
        cache.mkdir()
        n_params = save_model(model_dir)
        write_pairs(data, args.pairs, args.seed)
        print(f"raypo vs TRL {trl.__version__} DPOTrainer: tiny Llama ({n_params:,} parameters, "
              f"character-level tokenizer), {args.pairs} pairs (prompt {PROMPT_CHARS[0]}-"
              f"{PROMPT_CHARS[1]}, responses {RESPONSE_CHARS[0]}-{RESPONSE_CHARS[1]} tokens), "
              f"{args.steps} steps x batch {args.batch_size}, max_length {args.max_length}, "
              f"lr {args.lr}, float32, {args.device}, torch {torch.__version__} with "
              f"{torch.get_num_threads()} threads, {args.repeats} repeat(s)", flush=True)

        def trl_run(label: str, steps: int, precompute: bool) -> tuple[Run, object]:
            # a fresh datasets cache each time: TRL keeps precomputed log-probs there, and a
            # warm cache would skip the precompute that is being timed
            dataset = datasets.load_dataset(
                "json", data_files=str(data), split="train",
                cache_dir=tempfile.mkdtemp(dir=root, prefix="hf-datasets-"))
            return run_trl(label, args, model_dir, dataset,
                           Path(tempfile.mkdtemp(dir=root, prefix="trl-")), steps, precompute)

        # warm-up: one short run of each trainer, untimed, so that the first timed run does not
        # pay for lazy initialisation (imports, kernel selection, allocator) that later runs skip
        run_raypo("warm-up", args, model_dir, data, cache, args.warmup, ["loss.name=dpo"])
        _, trainer = trl_run("warm-up", args.warmup, False)
        ids_match = same_token_ids(trainer, args, model_dir, data, cache)
        del trainer

        # the configurations alternate between the trainers, so that a change in what else
        # runs on the machine does not fall on one of them only
        runs: dict[str, list[Run]] = {}
        for _ in range(args.repeats):
            for label, extra in LOSS_CONFIGS:
                run = run_raypo(label, args, model_dir, data, cache, args.steps, extra)
                runs.setdefault(label, []).append(run)
                if label == "dpo":
                    runs.setdefault(TRL_DEFAULT, []).append(
                        trl_run(TRL_DEFAULT, args.steps, False)[0])
                    runs.setdefault(TRL_PRECOMPUTE, []).append(
                        trl_run(TRL_PRECOMPUTE, args.steps, True)[0])

    print(f"token ids: {'identical' if ids_match else 'DIFFERENT'} in raypo and TRL "
          f"(all {args.pairs} pairs compared)")
    print("tokens: non-padding tokens of prompt+chosen and prompt+rejected of every pair trained "
          "on, counted from each trainer's own batches; seconds: wall time of training plus "
          "reference precompute (ref s, an empty cache for each run); evaluation and set-up "
          "excluded\n")
    by_rate = {label: median_run(r, key=lambda run: run.tokens_per_s) for label, r in runs.items()}
    raypo, trl_default, trl_pre = by_rate["dpo"], by_rate[TRL_DEFAULT], by_rate[TRL_PRECOMPUTE]
    print(f"{'configuration':<38}{'pairs':>7}{'tokens':>9}{'seconds':>9}{'ref s':>8}"
          f"{'tokens/s':>10}{'pairs/s':>9}{'raypo/this':>12}")
    # what a later run reading the reference cache would do (a search's second trial): the same
    # run with its precompute left out; shown for context, the targets use the cold numbers
    warm = dataclasses.replace(raypo, seconds=raypo.seconds - raypo.reference_seconds,
                               reference_seconds=0.0)
    for label, run in (("raypo dpo", raypo), (TRL_DEFAULT, trl_default),
                       (TRL_PRECOMPUTE, trl_pre), ("(raypo dpo, precompute left out)", warm)):
        ratio = f"{raypo.tokens_per_s / run.tokens_per_s:>11.2f}x" if run is not warm else ""
        print(f"{label:<38}{run.pairs:>7}{run.tokens:>9}{run.seconds:>9.2f}"
              f"{run.reference_seconds:>8.2f}{run.tokens_per_s:>10.0f}{run.pairs_per_s:>9.1f}"
              f"{ratio}")

    steps = {label: median_run(runs[label], key=lambda run: run.mean_step)
             for label, _ in LOSS_CONFIGS}
    base = steps["dpo"]
    print(f"\nraypo step time, reference precompute excluded: mean over the {args.steps} steps, "
          f"and the median step beside")
    print(f"{'loss':<38}{'ms/step':>9}{'x dpo':>8}{'median ms':>11}{'x dpo':>8}")
    for label, run in steps.items():
        median = statistics.median(run.step_times)
        print(f"{label:<38}{run.mean_step * 1e3:>9.2f}{run.mean_step / base.mean_step:>7.2f}x"
              f"{median * 1e3:>11.2f}{median / statistics.median(base.step_times):>7.2f}x")

    # a ratio inside one run: steadier than tokens/s when other processes share the CPUs
    print(f"\nraypo reference precompute (cold, {args.pairs} pairs, both splits): "
          f"{raypo.reference_seconds:.2f} s = {raypo.reference_seconds / base.mean_step:.1f} dpo "
          f"steps of batch {args.batch_size}")
    kernel, hmk = (steps[label] for label, _ in LOSS_CONFIGS[1:3])
    targets = [
        ("raypo tokens/s vs TRL default", raypo.tokens_per_s / trl_default.tokens_per_s,
         TARGETS["trl_default"], True),
        ("vs TRL precompute", raypo.tokens_per_s / trl_pre.tokens_per_s,
         TARGETS["trl_precompute"], True),
        ("kernel_dpo step vs dpo", kernel.mean_step / base.mean_step, TARGETS["kernel"], False),
        ("hmk_dpo step vs dpo", hmk.mean_step / base.mean_step, TARGETS["kernel"], False),
    ]
    print("\ntargets: " + "; ".join(f"{name} {verdict(*rest)}" for name, *rest in targets))
    wall = time.perf_counter() - begin
    busy = (time.process_time() - cpu_before) / wall
    # how much of the machine this run had: other processes on the same CPUs slow both
    # trainers, but not necessarily evenly, so the ratios are noisier when they ran
    print(f"total time: {wall:.0f} s, this process busy on {busy:.2f} of {os.cpu_count()} CPUs "
          f"on average; 1-minute load average before the run {load_before:.2f}")


if __name__ == "__main__":
    main()
