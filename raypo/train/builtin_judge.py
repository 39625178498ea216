"""The built-in task's judge: a tiny reward model fitted to the task's true reward, cached.

It plays the part a reward model plays on real data (raypo.models.judge): a sequence
classifier with one output, reading a prompt and a response, never the true reward itself. It
is regressed (mean squared error) on the sortedness of responses drawn from the task's base
distribution and beyond it (raypo.data.builtin.judge_corpus), so a search's judged metrics on
the built-in task can be checked against the true reward they stand in for
(tests/train/test_judge.py: Spearman >= 0.8 over policies of different quality).

The weights are cached like the base model's (RAYPO_CACHE/base_models/judge-<key>.pt).
"""

from __future__ import annotations

import torch
from transformers import LlamaForSequenceClassification

from raypo.data.builtin import TaskSpec, judge_corpus
from raypo.data.cache import atomic_torch_save, cache_root, cached, hash_json
from raypo.models.judge import Judge
from raypo.models.tiny import tiny_llama_config, tiny_tokenizer

JUDGE_VERSION = 1
# a judge smaller than the policy: it reads digits, it does not write them
JUDGE_SHAPE = {"hidden_size": 64, "layers": 2, "heads": 4, "intermediate_size": 128}
JUDGE_FIT = {"steps": 400, "batch_size": 64, "lr": 3e-3, "examples": 20000}


def judge_config(tokenizer=None):
    """The built-in judge's transformers config (a tiny Llama with one output)."""
    config = tiny_llama_config(len(tokenizer or tiny_tokenizer()), **JUDGE_SHAPE)
    config.num_labels = 1
    config.architectures = ["LlamaForSequenceClassification"]
    return config


def builtin_judge(spec: TaskSpec, device="cpu", seed: int = 0, log=print) -> Judge:
    """The fitted built-in judge (from the cache when it is there)."""
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = None  # prompt and response as a text pair: "52817>" "1234"
    base = {"prompt_digits": spec.prompt_digits, "response_digits": spec.response_digits,
            "sorted_share": spec.sorted_share, "task_seed": spec.seed}
    key = hash_json({"base": base, "shape": JUDGE_SHAPE, "fit": JUDGE_FIT, "seed": seed,
                     "v": JUDGE_VERSION})[:16]
    path = cache_root() / "base_models" / f"judge-{key}.pt"
    with torch.random.fork_rng(devices=[]):  # a run's own random stream is not consumed
        torch.manual_seed(seed)
        model = LlamaForSequenceClassification(judge_config(tokenizer))
    judge = Judge(model, tokenizer, "builtin", f"builtin-{key}", log=lambda message: None)
    if cached(path):
        model.load_state_dict(torch.load(path, weights_only=True))
    else:
        log(f"built-in judge: fitting a {sum(p.numel() for p in model.parameters()):,}-"
            f"parameter reward model to the task's true reward ({JUDGE_FIT['steps']} steps; "
            "cached afterwards)")
        loss = _fit(judge, judge_corpus(spec, JUDGE_FIT["examples"]), seed)
        log(f"built-in judge: done, mean squared error {loss:.4f}; cached as {path.name}")
        atomic_torch_save(model.state_dict(), path)
    model.to(device).eval().requires_grad_(False)
    return judge


def _fit(judge: Judge, corpus: list[dict], seed: int) -> float:
    """Regress the judge's score on the true reward; the last 50 steps' mean loss."""
    model, fit = judge.model, JUDGE_FIT
    g = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=fit["lr"], weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / 20) * (1 - s / fit["steps"]))
    model.train()
    losses = []
    for _ in range(fit["steps"]):
        rows = [corpus[i] for i in torch.randint(0, len(corpus), (fit["batch_size"],),
                                                 generator=g).tolist()]
        batch = judge.encode([r["prompt"] for r in rows], [r["response"] for r in rows])
        target = torch.tensor([r["reward"] for r in rows])
        loss = torch.nn.functional.mse_loss(model(**batch).logits[:, 0], target)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        sched.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    return sum(losses[-50:]) / len(losses[-50:])
