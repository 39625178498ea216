"""Reference outputs, computed once per (model, dataset) and shared by every run.

The reference model is run over the whole tokenized dataset once, before training; what the
loss needs is kept per pair (sequence log-probs always; per-token log-probs, top-k logits,
hidden states and embeddings only when asked) and cached on disk by fingerprint, so every
later run, every trial of a search, with the same model and data reads it instead of holding
and running a second model. Token-level outputs are stored flat with offsets (responses have
different lengths): memory is proportional to the real tokens, not to the padded batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from raypo.data.cache import atomic_torch_save, cache_root, hash_json
from raypo.losses.batch import TopKLogits
from raypo.train.forward import sequence_forward

SIDES = ("chosen", "rejected")


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


@torch.no_grad()
def compute_reference(model, pairs, batches, collate_fn, *, token_logps: bool, topk: int | None,
                      hidden: bool, embeddings: bool, device) -> ReferenceOutputs:
    """Run `model` (eval mode, no grad) over every pair once; keep what is asked."""
    model.eval()
    N = len(pairs)
    lengths = {"chosen": torch.tensor([len(x) for x in pairs.chosen_ids]),
               "rejected": torch.tensor([len(x) for x in pairs.rejected_ids])}
    logps = {s: torch.zeros(N) for s in SIDES}
    pieces: dict[str, dict[str, list]] = {k: {s: [None] * N for s in SIDES}
                                          for k in ("tok", "val", "idx", "hid")}
    emb = {k: [None] * N for k in ("prompt", "chosen", "rejected")}
    for indices in batches:
        batch = collate_fn(pairs, indices).to(device)
        out = sequence_forward(model, batch, logits=topk is not None, hidden=hidden,
                               embeddings=embeddings)
        B = len(indices)
        if topk is not None:
            top = TopKLogits.from_logits(out.logits, topk)
        for row in range(2 * B):
            side, i = SIDES[row // B], indices[row % B]
            n = int(lengths[side][i])
            logps[side][i] = out.logps[row].float().cpu()
            if token_logps:
                pieces["tok"][side][i] = out.token_logps[row, :n].float().cpu()
            if topk is not None:
                pieces["val"][side][i] = top.values[row, :n].float().cpu()
                pieces["idx"][side][i] = top.indices[row, :n].to(torch.int32).cpu()
            if hidden:
                pieces["hid"][side][i] = out.hidden[row, :n].float().cpu()
            if embeddings:
                emb[side][i] = out.response_embeddings[row].cpu()
                if row < B:
                    emb["prompt"][i] = out.prompt_embeddings[row].cpu()
    ref = ReferenceOutputs(logps=logps, lengths=lengths)
    for key, target in (("tok", ref.token_logps), ("val", ref.topk_values),
                        ("idx", ref.topk_indices), ("hid", ref.hidden)):
        for side in SIDES:
            if pieces[key][side][0] is not None:
                target[side] = torch.cat(pieces[key][side])
    if embeddings:
        ref.embeddings = {k: torch.stack(v) for k, v in emb.items()}
    return ref


def load_or_compute(key: str, compute) -> tuple[ReferenceOutputs, bool]:
    """The cached outputs under `key`, or `compute()`'s, written atomically. Returns
    (outputs, was_cached)."""
    path = cache_root() / "reference" / f"{key}.pt"
    if path.is_file():
        return ReferenceOutputs(**torch.load(path, weights_only=True)), True
    ref = compute()
    atomic_torch_save(vars(ref), path)
    return ref, False
