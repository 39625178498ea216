"""Reference outputs, computed once per (model, dataset) and shared by every run.

The reference model is run over the whole tokenized dataset once, before training; what the
loss needs is kept per pair (sequence log-probs always; per-token log-probs, top-k logits,
hidden states and embeddings only when asked) and cached on disk by fingerprint, so every
later run, every trial of a search, with the same model and data reads it instead of holding
and running a second model. Token-level outputs are stored flat with offsets (responses have
different lengths): memory is proportional to the real tokens, not to the padded batch.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from raypo.data.cache import atomic_torch_save, cache_root, cached, hash_json
from raypo.losses.batch import TopKLogits
from raypo.train.forward import DEFAULT_CHUNK, token_outputs

SIDES = ("chosen", "rejected")

# Padded tokens per batch of the reference precompute (no activations are kept for a backward
# pass, so batches can be larger than training's). On a CPU with the tiny model 1k-8k tokens run
# alike and 16k is ~2x slower (attention scores leave the cache); an accelerator wants more.
REFERENCE_BATCH_TOKENS = {"cpu": 4096, "accelerator": 16384}


@dataclass
class ReferenceOutputs:
    """Per-pair reference outputs; `fields(index, T)` gives the ref_* batch fields."""

    logps: dict[str, Tensor]  # side -> (N,)
    lengths: dict[str, Tensor]  # side -> (N,) response lengths
    token_logps: dict[str, Tensor] = field(default_factory=dict)  # side -> (sum len,)
    topk_values: dict[str, Tensor] = field(default_factory=dict)  # side -> (sum len, k)
    topk_indices: dict[str, Tensor] = field(default_factory=dict)
    hidden: dict[str, Tensor] = field(default_factory=dict)  # side -> (sum len, H)
    embeddings: dict[str, Tensor] = field(default_factory=dict)  # prompt/chosen/rejected (N, H)

    def _gather(self, flat: Tensor, side: str, index: Tensor, T: int, fill: float = 0.0):
        lengths = self.lengths[side][index]
        offsets = torch.cumsum(self.lengths[side], 0) - self.lengths[side]
        pos = torch.arange(T)
        valid = pos[None, :] < lengths[:, None]
        flat_idx = (offsets[index][:, None] + pos[None, :]).clamp_max(flat.shape[0] - 1)
        values = flat[flat_idx]
        shape = (*valid.shape, *([1] * (values.dim() - 2)))
        return torch.where(valid.reshape(shape), values, torch.full((), fill, dtype=values.dtype))

    def fields(self, index: Tensor, T: int, device) -> dict:
        index = index.cpu()
        out = {}
        for side in SIDES:
            out[f"ref_{side}_logps"] = self.logps[side][index].to(device)
            if side in self.token_logps:
                out[f"ref_{side}_token_logps"] = self._gather(
                    self.token_logps[side], side, index, T).to(device)
            if side in self.topk_values:
                k = self.topk_values[side].shape[-1]
                # padding holds a valid uniform distribution over k tokens, so no NaN can
                # arise there even before the loss masks it out
                values = self._gather(self.topk_values[side], side, index, T, fill=0.0)
                spread = torch.arange(k).expand(*values.shape)
                indices = self._gather(self.topk_indices[side].long(), side, index, T)
                valid = torch.arange(T)[None, :] < self.lengths[side][index][:, None]
                indices = torch.where(valid[..., None], indices, spread)
                log_norm = torch.where(valid, torch.zeros(()),
                                       torch.full((), float(torch.log(torch.tensor(k)))))
                out[f"ref_{side}_logits"] = TopKLogits(values.to(device), indices.to(device),
                                                       log_norm.to(device))
            if side in self.hidden:
                out[f"ref_{side}_hidden"] = self._gather(
                    self.hidden[side], side, index, T).to(device)
        for name in ("prompt", "chosen", "rejected"):
            if name in self.embeddings:
                out[f"{name}_embeddings"] = self.embeddings[name][index].to(device)
        return out


def reference_key(model_fingerprint: str, data_fingerprint: str, want: dict) -> str:
    return hash_json({"model": model_fingerprint, "data": data_fingerprint, "want": want,
                      "version": 1})[:24]


@dataclass
class _Sequences:
    """The 2N sequences prompt+chosen (rows 0..N-1) and prompt+rejected (rows N..2N-1) as one
    flat token array with offsets, so a batch of any rows is laid out by indexing, not by a
    Python loop over rows."""

    tokens: np.ndarray  # (sum of lengths,) int64
    starts: np.ndarray  # (2N,) where each sequence begins in `tokens`
    prompt: np.ndarray  # (2N,) prompt lengths
    response: np.ndarray  # (2N,) response lengths

    @classmethod
    def of(cls, pairs) -> _Sequences:
        seqs = [p + r for side in (pairs.chosen_ids, pairs.rejected_ids)
                for p, r in zip(pairs.prompt_ids, side, strict=True)]
        lengths = np.fromiter(map(len, seqs), dtype=np.int64, count=len(seqs))
        prompt = np.tile(np.fromiter(map(len, pairs.prompt_ids), dtype=np.int64), 2)
        return cls(tokens=np.fromiter(itertools.chain.from_iterable(seqs), dtype=np.int64,
                                      count=int(lengths.sum())),
                   starts=np.cumsum(lengths) - lengths, prompt=prompt, response=lengths - prompt)

    def batches(self, tokens_per_batch: int) -> list[np.ndarray]:
        """Row indices, longest first, each batch at most `tokens_per_batch` padded tokens (at
        least one row): sorting all 2N rows by length leaves almost no padding."""
        lengths = self.prompt + self.response
        order = np.argsort(-lengths, kind="stable")
        out, start = [], 0
        while start < len(order):
            rows = max(1, tokens_per_batch // int(lengths[order[start]]))
            out.append(order[start:start + rows])
            start += rows
        return out

    def layout(self, rows: np.ndarray, pad_id: int) -> np.ndarray:
        """(R, W) ids, each row its sequence from column 0, right-padded."""
        lengths = self.prompt[rows] + self.response[rows]
        cols = np.arange(int(lengths.max()))
        flat = self.starts[rows][:, None] + cols[None, :]
        return np.where(cols[None, :] < lengths[:, None],
                        self.tokens[np.minimum(flat, len(self.tokens) - 1)], pad_id)


def compute_reference(model, pairs, *, pad_id: int, token_logps: bool, topk: int | None,
                      hidden: bool, embeddings: bool, device,
                      tokens_per_batch: int = 8192, chunk: int = DEFAULT_CHUNK
                      ) -> ReferenceOutputs:
    """Run `model` (eval mode, no grad) over every pair once; keep what is asked.

    Not the training layout (raypo.data.collate): nothing here needs chosen and rejected side
    by side, so the 2N sequences are sorted by length and batched alone, right-padded. Right
    padding comes after every real token, so a causal model's outputs at real positions cannot
    see it and no attention mask is passed, which lets SDPA take its causal fast path; the
    aligned training layout pads every row to the longest prompt plus the longest response,
    about twice the real tokens on data of varied lengths. Log-probs and top-k are taken
    `chunk` response tokens at a time (raypo.train.forward.token_outputs): no batch x
    positions x vocabulary tensor.
    """
    model.eval()
    N = len(pairs)
    seq = _Sequences.of(pairs)
    offsets = torch.from_numpy(np.cumsum(seq.response) - seq.response)  # flat, rows in order
    total = int(seq.response.sum())
    logps = torch.zeros(2 * N)
    flat: dict[str, Tensor] = {}
    if token_logps:
        flat["tok"] = torch.zeros(total)
    emb_response = emb_prompt = None
    with torch.inference_mode():
        for rows in seq.batches(tokens_per_batch):
            ids = torch.from_numpy(seq.layout(rows, pad_id)).to(device)
            p = torch.from_numpy(seq.prompt[rows]).to(device)
            n = torch.from_numpy(seq.response[rows]).to(device)
            T = int(n.max())
            t = torch.arange(T, device=device)
            valid = t[None, :] < n[:, None]
            r, at = valid.nonzero(as_tuple=True)  # row-major, as `dest` below
            # the column whose output predicts response token `at` of row r, and that token
            out = token_outputs(model, ids, r, p[r] - 1 + at, ids[r, p[r] + at], chunk=chunk,
                                topk=topk, output_hidden_states=hidden or embeddings,
                                use_cache=False)
            W = ids.shape[1]
            rows_t = torch.from_numpy(rows)
            logps[rows_t] = torch.zeros(valid.shape, device=device).masked_scatter(
                valid, out.logps).sum(-1).cpu()
            dest = (offsets[rows_t].to(device)[:, None] + t[None, :])[valid].cpu()
            if token_logps:
                flat["tok"][dest] = out.logps.cpu()
            if topk is not None:
                for name, values in (("val", out.topk.values),
                                     ("idx", out.topk.indices.to(torch.int32))):
                    _put(flat, name, total, dest, values)
            if hidden:  # the states that predict the response tokens
                last = out.model_output.hidden_states[-1]  # (R, W, H)
                at = ((p - 1)[:, None] + t[None, :]).clamp_max(W - 1)
                picked = last.gather(1, at[..., None].expand(-1, -1, last.shape[-1]))
                _put(flat, "hid", total, dest, picked[valid].float())
            if embeddings:
                if emb_response is None:
                    H = out.model_output.hidden_states[-1].shape[-1]
                    emb_response, emb_prompt = torch.zeros(2 * N, H), torch.zeros(N, H)
                _pool_rows(out.model_output.hidden_states[-1], p, n, rows_t, N, emb_response,
                           emb_prompt)
    lengths = {s: torch.from_numpy(seq.response[k * N:(k + 1) * N].copy())
               for k, s in enumerate(SIDES)}
    split = int(seq.response[:N].sum())
    # clones, outside inference mode: an inference tensor cannot be saved for a backward
    # pass (the loss may multiply by a reference value)
    ref = ReferenceOutputs(logps={s: logps[k * N:(k + 1) * N].clone() for k, s in enumerate(SIDES)},
                           lengths=lengths)
    for key, target in (("tok", ref.token_logps), ("val", ref.topk_values),
                        ("idx", ref.topk_indices), ("hid", ref.hidden)):
        if key in flat:
            target.update(chosen=flat[key][:split].clone(), rejected=flat[key][split:].clone())
    if embeddings:
        ref.embeddings = {"prompt": emb_prompt.clone(), "chosen": emb_response[:N].clone(),
                          "rejected": emb_response[N:].clone()}
    return ref


def _put(flat: dict[str, Tensor], name: str, total: int, dest: Tensor, values: Tensor) -> None:
    """`values` (one row per response token of a batch) at rows `dest` of the flat (total,
    ...) tensor `flat[name]`, made on first use in their dtype."""
    if name not in flat:
        flat[name] = torch.zeros(total, *values.shape[1:], dtype=values.dtype)
    flat[name][dest] = values.cpu()


def _pool_rows(last: Tensor, p: Tensor, n: Tensor, rows: Tensor, N: int,
               responses: Tensor, prompts: Tensor) -> None:
    """Mean-pool a batch's last hidden states (R, W, H) over each row's response into
    `responses` and, for the chosen rows, over its prompt into `prompts` (a prompt's states
    are the same in its chosen and its rejected row: the model is causal)."""
    cols = torch.arange(last.shape[1], device=last.device)[None, :]
    is_prompt = (cols < p[:, None]).float()
    is_response = ((cols >= p[:, None]) & (cols < (p + n)[:, None])).float()
    responses[rows] = _pool(last, is_response).cpu()
    chosen = rows < N
    on_device = chosen.to(last.device)
    prompts[rows[chosen]] = _pool(last[on_device], is_prompt[on_device]).cpu()


def _pool(states: Tensor, mask: Tensor) -> Tensor:
    """Mean of `states` (R, W, H) over the columns where `mask` (R, W) is 1, in float32."""
    return (states.float() * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp_min(1)


def reference_outputs(policy, pairs, *, model_fingerprint: str, want: dict, topk: int,
                      pad_id: int, device: torch.device, chunk: int = DEFAULT_CHUNK,
                      log=print) -> ReferenceOutputs:
    """What `want` asks of `policy` over `pairs` (the flags of raypo.train.forward.outputs_for:
    `token_logps`, `ref_logits` as the top `topk` per position, `ref_hidden`, `embeddings`),
    read from the cache under (model_fingerprint, the pairs' fingerprint, the flags) or
    computed once and cached; `log` says which. What a run's set-up and the selection evidence
    both read."""
    topk = topk if want["ref_logits"] else None
    flags = {"token_logps": want["token_logps"], "topk": topk, "hidden": want["ref_hidden"],
             "embeddings": want["embeddings"]}
    key = reference_key(model_fingerprint, pairs.fingerprint, flags)

    def compute():
        log(f"reference outputs: computing for {len(pairs)} pairs (cached afterwards)")
        return compute_reference(policy, pairs, pad_id=pad_id,
                                 token_logps=want["token_logps"], topk=topk,
                                 hidden=want["ref_hidden"], embeddings=want["embeddings"],
                                 device=device, chunk=chunk,
                                 tokens_per_batch=REFERENCE_BATCH_TOKENS[
                                     "cpu" if device.type == "cpu" else "accelerator"])

    ref, was_cached = load_or_compute(key, compute)
    if was_cached:
        log(f"reference outputs: read from cache ({len(pairs)} pairs)")
    return ref


def load_or_compute(key: str, compute) -> tuple[ReferenceOutputs, bool]:
    """The cached outputs under `key`, or `compute()`'s, written atomically. Returns
    (outputs, was_cached)."""
    path = cache_root() / "reference" / f"{key}.pt"
    if cached(path):
        return ReferenceOutputs(**torch.load(path, weights_only=True)), True
    ref = compute()
    atomic_torch_save(vars(ref), path)
    return ref, False
