"""Fit the tiny model before DPO (the "SFT" stage), cached: to the built-in task's base
distribution, or to the responses of the user's own data when no `model` is given.

This is the stage every real pipeline runs before DPO: the reference and initial policy is a
model of the responses, not random weights. Fitting takes seconds to a few minutes on a laptop
CPU; the weights are cached under RAYPO_CACHE/base_models/<hash>.pt, written atomically, so the
runs of a search and every later run share one fit.

- Built-in task (`fit_base_model`): base responses of the task, `task.base_steps` steps.
- Own data, no model (`fit_to_pairs`): the training split's responses, chosen and rejected
  alike (each after its prompt, the loss on response tokens only), `sft_steps` steps; keyed by
  the tokenized split's fingerprint (data, tokenizer, length limits, split) and the tiny
  model's config. Useful to try the platform and the losses on one's own data without a GPU;
  a 330k-parameter character model says nothing about how a real model would respond.
"""

from __future__ import annotations

import torch

from raypo.data.builtin import TaskSpec, base_corpus
from raypo.data.cache import atomic_torch_save, cache_root, cached, hash_json
from raypo.models.tiny import tiny_model

FIT_VERSION = 1
DATA_FIT_VERSION = 1


def _encode(tokenizer, prompt: str, response: str) -> tuple[list[int], int]:
    prompt_ids = [tokenizer.bos_token_id, *tokenizer(prompt, add_special_tokens=False).input_ids]
    response_ids = tokenizer(response, add_special_tokens=False).input_ids
    return prompt_ids + response_ids + [tokenizer.eos_token_id], len(prompt_ids)


def fit_key(spec: TaskSpec, steps: int, seed: int) -> str:
    # only what shapes the base distribution: every variant shares one fitted base model
    base = {"prompt_digits": spec.prompt_digits, "response_digits": spec.response_digits,
            "sorted_share": spec.sorted_share, "task_seed": spec.seed}
    return hash_json({"base": base, "steps": steps, "seed": seed, "v": FIT_VERSION})[:16]


def fit_base_model(spec: TaskSpec, tokenizer, steps: int = 400, seed: int = 0,
                   batch_size: int = 64, lr: float = 3e-3, log=None):
    """The tiny model fitted to the base distribution (from cache when it exists).

    Returns (model, key): `key` identifies the fit and is part of the reference cache key.
    """
    key = fit_key(spec, steps, seed)
    path = cache_root() / "base_models" / f"{key}.pt"
    model = tiny_model(tokenizer, seed=seed)
    if cached(path):
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval(), key
    corpus = base_corpus(spec, n=steps * batch_size // 4 + 1000)
    encoded = [_encode(tokenizer, x["prompt"], x["response"]) for x in corpus]
    fit_responses(model, encoded, tokenizer.pad_token_id, steps=steps, seed=seed,
                  batch_size=batch_size, lr=lr, log=log, what="base model")
    atomic_torch_save(model.state_dict(), path)
    return model.eval(), key


def fit_to_pairs(pairs, tokenizer, steps: int, seed: int = 0, batch_size: int = 32,
                 lr: float = 3e-3, log=None) -> dict[str, torch.Tensor]:
    """The tiny model's state dict fitted to the responses of `pairs` (a TokenizedPairs: the
    training split), from cache when it exists. Prompt ids already start with BOS and
    responses end with EOS (raypo.data.tokenize)."""
    config = tiny_model(tokenizer, seed=seed).config.to_dict()
    config.pop("transformers_version", None)
    key = hash_json({"pairs": pairs.fingerprint, "model": config, "steps": steps,
                     "seed": seed, "batch_size": batch_size, "lr": lr,
                     "v": DATA_FIT_VERSION})[:16]
    path = cache_root() / "base_models" / f"data-{key}.pt"
    say = log or (lambda message: None)
    if cached(path):
        say(f"tiny model fitted to the data's responses: read from cache ({path.name})")
        return torch.load(path, weights_only=True)
    say(f"no model given: fitting the tiny built-in model to the {2 * len(pairs)} responses "
        f"(chosen and rejected) of the {len(pairs)} training pairs, {steps} steps (sft_steps); "
        "it is the reference and the starting policy")
    encoded = [(prompt + response, len(prompt))
               for prompt, chosen, rejected in zip(pairs.prompt_ids, pairs.chosen_ids,
                                                   pairs.rejected_ids, strict=True)
               for response in (chosen, rejected)]
    model = tiny_model(tokenizer, seed=seed)
    with torch.random.fork_rng():  # the run's own random stream is not consumed here
        loss = fit_responses(model, encoded, tokenizer.pad_token_id, steps=steps, seed=seed,
                             batch_size=batch_size, lr=lr, log=log, what="fit to the data")
    say(f"fit to the data: done, loss {loss:.3f} nats per response token; cached as {path.name}")
    atomic_torch_save(model.state_dict(), path)
    return model.state_dict()


def fit_responses(model, encoded: list[tuple[list[int], int]], pad_id: int, *, steps: int,
                  seed: int, batch_size: int, lr: float, log=None, what: str) -> float:
    """Plain next-token training of `model` on sequences `(ids, prompt length)`, the loss on
    the tokens after the prompt; batches drawn with replacement (seeded). Returns the last
    batch's loss."""
    g = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 20))
    model.train()
    loss = torch.tensor(float("nan"))
    for step in range(steps):
        picks = torch.randint(0, len(encoded), (batch_size,), generator=g).tolist()
        rows = [encoded[i] for i in picks]
        L = max(len(ids) for ids, _ in rows)
        ids = torch.full((batch_size, L), pad_id)
        labels = torch.full((batch_size, L), -100)
        for r, (seq, n_prompt) in enumerate(rows):
            ids[r, :len(seq)] = torch.tensor(seq)
            labels[r, n_prompt:len(seq)] = torch.tensor(seq[n_prompt:])  # loss on responses
        loss = model(input_ids=ids, attention_mask=(ids != pad_id).long(), labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        sched.step()
        optimizer.zero_grad(set_to_none=True)
        if log and (step + 1) % 100 == 0:
            log(f"{what}: step {step + 1}/{steps}, loss {loss.item():.3f}")
    model.eval()
    return loss.item()
