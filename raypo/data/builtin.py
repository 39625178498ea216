"""The built-in task: digit sequences with a known true reward.

A prompt is a few digits followed by ">" (e.g. "52817>"); a response is a digit string. The true
reward of a response is its *sortedness*: the share of adjacent digit pairs in non-decreasing
order (1 for "1 3 3 8", about 0.55 for uniform random digits). A tiny model is first fitted to
a base distribution of responses (a mixture of random and nearly sorted strings of varied
length, so sortedness varies widely); preference pairs are two base responses to one prompt,
labelled by a reward. Evaluation samples from the trained policy and scores the samples with
the true reward, and estimates the KL to the reference from the same samples: the
reward-vs-KL frontier of the DPO paper's controlled-sentiment experiment, at laptop scale.

Variants (each with a different structure, so different losses should win):
- `graded`: labels by sortedness (Bradley-Terry sampling when `bt_temperature` > 0). Plain
  DPO-style losses should do well; it is the control.
- `length`: the labeller is biased toward length: labels come from sortedness +
  length_bias * len/12 (default 1.0),
  while the true reward is sortedness alone, and longer random strings are less sorted.
  A loss that rewards the summed log-ratio learns "longer is better"; length-normalised or
  length-regularised losses (simpo, ipo, rdpo, mi_dpo with the rdpo or simpo prior) should
  keep more of the true reward.
- `noisy`: labels by sortedness with a share `flip` (default 0.2) flipped at random. Losses
  built for label noise (robust, cdpo) should degrade least.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass

VARIANTS = ("graded", "length", "noisy")
# Part of every task fingerprint: bump when the generation or labelling rules change, so that
# cached tokenized pairs and reference outputs of the old rules are not reused.
TASK_VERSION = 2
SEPARATOR = ">"


def sortedness(response: str) -> float:
    """Share of adjacent digit pairs in non-decreasing order; non-digits count as unsorted.

    Responses shorter than two characters have no pairs and score 0: a degenerate policy that
    stops at once earns nothing.
    """
    if len(response) < 2:
        return 0.0
    ordered = sum(a.isdigit() and b.isdigit() and a <= b
                  for a, b in zip(response, response[1:], strict=False))
    return ordered / (len(response) - 1)


@dataclass(frozen=True)
class TaskSpec:
    """A built-in task, fully determined by these values (they are its cache key)."""

    variant: str = "graded"
    train_pairs: int = 2000
    eval_pairs: int = 256
    prompt_digits: tuple[int, int] = (3, 6)
    response_digits: tuple[int, int] = (2, 12)
    sorted_share: float = 0.35  # share of base responses drawn nearly sorted
    flip: float = 0.2  # noisy variant: share of flipped labels
    length_bias: float = 1.0  # length variant: weight of len/12 in the labeller's reward
    bt_temperature: float = 0.0  # > 0: sample labels from Bradley-Terry instead of argmax
    seed: int = 0

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ValueError(f"task: variant must be one of {', '.join(VARIANTS)}, "
                             f"got {self.variant!r}")
        if self.train_pairs < 1 or self.eval_pairs < 1:
            raise ValueError("task: train_pairs and eval_pairs must be >= 1")
        if not 0.0 <= self.flip < 0.5:
            raise ValueError(f"task: flip must be in [0, 0.5), got {self.flip}")

    def fingerprint(self) -> str:
        payload = {**asdict(self), "version": TASK_VERSION}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    def true_reward(self, response: str) -> float:
        return sortedness(response)

    def label_reward(self, response: str) -> float:
        """What the (possibly biased) labeller scores; equals the true reward except for
        the length variant."""
        bias = self.length_bias * len(response) / 12 if self.variant == "length" else 0.0
        return sortedness(response) + bias


def _base_response(rng: random.Random, spec: TaskSpec) -> str:
    n = rng.randint(*spec.response_digits)
    digits = [rng.randint(0, 9) for _ in range(n)]
    if rng.random() < spec.sorted_share:
        digits.sort()
        for _ in range(rng.randint(0, 2)):  # a few swaps: nearly, not perfectly, sorted
            i, j = rng.randrange(n), rng.randrange(n)
            digits[i], digits[j] = digits[j], digits[i]
    return "".join(map(str, digits))


def _prompt(rng: random.Random, spec: TaskSpec) -> str:
    n = rng.randint(*spec.prompt_digits)
    return "".join(str(rng.randint(0, 9)) for _ in range(n)) + SEPARATOR


def base_corpus(spec: TaskSpec, n: int, seed_offset: int = 0) -> list[dict[str, str]]:
    """n (prompt, response) samples of the base distribution, for fitting the base model."""
    rng = random.Random(f"{spec.seed}-base-{seed_offset}")
    return [{"prompt": _prompt(rng, spec), "response": _base_response(rng, spec)}
            for _ in range(n)]


def judge_corpus(spec: TaskSpec, n: int) -> list[dict]:
    """n (prompt, response, true reward) examples for fitting the built-in judge
    (raypo.train.builtin_judge): base responses, and beyond them what a trained policy may
    write (empty, one digit, longer and fully sorted strings), so that the judge has seen the
    rewards it will be asked about."""
    rng = random.Random(f"{spec.seed}-judge")
    low, high = spec.response_digits
    out = []
    for _ in range(n):
        if rng.random() < 0.5:
            response = _base_response(rng, spec)
        else:
            digits = [rng.randint(0, 9) for _ in range(rng.randint(0, high + 2))]
            if rng.random() < 0.5:
                digits.sort()
                for _ in range(rng.randint(0, 3)):
                    i, j = rng.randrange(len(digits) or 1), rng.randrange(len(digits) or 1)
                    if digits:
                        digits[i], digits[j] = digits[j], digits[i]
            response = "".join(map(str, digits))
        out.append({"prompt": _prompt(rng, spec), "response": response,
                    "reward": spec.true_reward(response)})
    return out


def _label(rng: random.Random, spec: TaskSpec, a: str, b: str) -> bool:
    """True when a is preferred over b."""
    ra, rb = spec.label_reward(a), spec.label_reward(b)
    if spec.bt_temperature > 0:
        import math

        a_wins = rng.random() < 1 / (1 + math.exp(-(ra - rb) / spec.bt_temperature))
    else:
        a_wins = ra > rb if ra != rb else rng.random() < 0.5
    if spec.variant == "noisy" and rng.random() < spec.flip:
        a_wins = not a_wins
    return a_wins


def preference_pairs(spec: TaskSpec, split: str) -> list[dict[str, str]]:
    """Pairs in TRL's standard format (`prompt`, `chosen`, `rejected`) for split train/eval.

    Pairs whose two responses have the same labeller reward carry no preference and are
    redrawn. Held-out (eval) labels are the labeller's preference without its random errors
    (no flips, no Bradley-Terry sampling): held-out accuracy measures agreement with what the
    labeller prefers (length bias included), the true reward of samples measures quality.
    """
    n = spec.train_pairs if split == "train" else spec.eval_pairs
    rng = random.Random(f"{spec.seed}-pairs-{split}")
    without_errors = TaskSpec(**{**asdict(spec), "flip": 0.0, "bt_temperature": 0.0})
    labeller = spec if split == "train" else without_errors
    pairs = []
    while len(pairs) < n:
        prompt = _prompt(rng, spec)
        a, b = _base_response(rng, spec), _base_response(rng, spec)
        if labeller.label_reward(a) == labeller.label_reward(b):
            continue
        a_wins = _label(rng, labeller, a, b)
        chosen, rejected = (a, b) if a_wins else (b, a)
        pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return pairs


def eval_prompts(spec: TaskSpec, n: int) -> list[str]:
    """Prompts for sampling the policy at evaluation (fixed per spec)."""
    rng = random.Random(f"{spec.seed}-sample-prompts")
    return [_prompt(rng, spec) for _ in range(n)]


def response_text(decoded: str) -> str:
    """The response part of a decoded generation: digits up to the first non-digit."""
    out = []
    for ch in decoded:
        if not ch.isdigit():
            break
        out.append(ch)
    return "".join(out)
