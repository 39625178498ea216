"""Frozen sentence-encoder embeddings for the kernel losses (`embedding_source: encoder:NAME`).

    emb = encoder_embeddings("sentence-transformers/all-MiniLM-L6-v2", pairs, tokenizer)
    emb["prompt"], emb["chosen"], emb["rejected"]     # (N, D) float32, D the encoder's size

NAME is anything `sentence_transformers.SentenceTransformer(NAME)` loads: a hub name or a local
folder. The embeddings are computed once per (encoder, tokenized dataset) and cached on disk by
fingerprint under RAYPO_CACHE/encoder/, like the reference outputs, so every trial of a search
reads them. Needs the optional extra `pip install 'raypo[encoder]'` (sentence-transformers),
imported only here and only when an encoder is asked for.

What is encoded: the prompt, the chosen response and the rejected response, each alone, as
text decoded from the token ids the policy trains on (so after truncation and chat templating,
special tokens dropped). Responses are encoded without their prompt because the kernel compares
K(e_x, e_w) with K(e_x, e_l): prompt+response texts would share the prompt's words on both sides,
pull both embeddings towards e_x and shrink the semantic margin the kernel is there to measure;
the policy and reference sources likewise pool over response tokens only.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import Tensor

from raypo.data.cache import atomic_torch_save, cache_root, cached, hash_json

PREFIX = "encoder:"
EXTRA_HINT = "pip install 'raypo[encoder]'"
ENCODE_VERSION = 1
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".onnx")


def encoder_name(embedding_source: str) -> str | None:
    """NAME of an `encoder:NAME` embedding source; None for `policy` or `reference`."""
    return embedding_source[len(PREFIX):] if embedding_source.startswith(PREFIX) else None


def check_available(key: str = "embedding_source") -> None:
    """Raise ImportError naming the config `key` and the extra when sentence-transformers is
    missing (checked without importing it: the import takes seconds)."""
    if importlib.util.find_spec("sentence_transformers") is None:
        raise ImportError(f"{key}: an encoder:<model> embedding source needs "
                          f"sentence-transformers, an optional dependency: {EXTRA_HINT}")


def load_encoder(name: str, device: str | torch.device = "cpu"):
    check_available()
    from sentence_transformers import SentenceTransformer

    local = Path(name).expanduser()
    try:
        return SentenceTransformer(str(local) if local.is_dir() else name, device=str(device))
    except (OSError, ValueError) as exc:
        raise ValueError(f"embedding_source: encoder {name!r} could not be loaded (not a "
                         f"sentence-transformers folder, or an unknown or unreachable hub name): "
                         f"{exc}") from exc


def encoder_fingerprint(name: str) -> dict:
    """What names the encoder in cache keys: the name, and for a local folder its weight files'
    names, sizes and mtimes (a rewritten checkpoint gets a new key without reading it)."""
    local = Path(name).expanduser()
    if not local.is_dir():
        return {"hub": name}
    files = sorted(p for p in local.rglob("*") if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))
    return {"folder": str(local.resolve()),
            "files": [(str(p.relative_to(local)), p.stat().st_size, p.stat().st_mtime_ns)
                      for p in files]}


def texts_of(pairs, tokenizer) -> dict[str, list[str]]:
    """The prompt, chosen and rejected texts of every pair, decoded from their token ids."""
    def decode(ids_list):
        return tokenizer.batch_decode(ids_list, skip_special_tokens=True)

    return {"prompt": decode(pairs.prompt_ids), "chosen": decode(pairs.chosen_ids),
            "rejected": decode(pairs.rejected_ids)}


def encode(model, texts: list[str], batch_size: int = 64) -> Tensor:
    """(len(texts), D) float32 on the CPU; each distinct text is encoded once (pairs often
    share a prompt)."""
    unique = list(dict.fromkeys(texts))
    out = model.encode(unique, batch_size=batch_size, convert_to_tensor=True,
                       show_progress_bar=False)
    where = {text: i for i, text in enumerate(unique)}
    return out.float().cpu()[torch.tensor([where[t] for t in texts], dtype=torch.long)]


def encoder_embeddings(name: str, pairs, tokenizer, *, device: str | torch.device = "cpu",
                       log=None) -> dict[str, Tensor]:
    """{"prompt", "chosen", "rejected"}: (N, D) frozen encoder embeddings of `pairs`, from the
    cache when they were computed before for this encoder and these tokenized pairs."""
    key = hash_json({"encoder": encoder_fingerprint(name), "data": pairs.fingerprint,
                     "version": ENCODE_VERSION})[:24]
    path = cache_root() / "encoder" / f"{key}.pt"
    if cached(path):
        if log:
            log(f"encoder embeddings: read from cache ({len(pairs)} pairs)")
        return torch.load(path, weights_only=True)
    check_available()
    if log:
        log(f"encoder embeddings: computing with {name} for {len(pairs)} pairs (cached afterwards)")
    model = load_encoder(name, device)
    embeddings = {part: encode(model, texts) for part, texts in texts_of(pairs, tokenizer).items()}
    atomic_torch_save(embeddings, path)
    return embeddings

