"""A tiny local model folder and random pairs: the overrides of an own-data run."""

from __future__ import annotations

import json
import random


def own_data(tmp_path) -> list[str]:
    """Overrides for a tiny local model folder and 40 random pairs (no built-in task)."""
    from raypo.models.tiny import tiny_model, tiny_tokenizer

    tok = tiny_tokenizer()
    tok.save_pretrained(tmp_path / "model")
    tiny_model(tok).save_pretrained(tmp_path / "model")
    rng = random.Random(0)
    with (tmp_path / "pairs.jsonl").open("w") as f:
        for _ in range(40):
            row = {k: "".join(rng.choices("abcdefgh", k=rng.randint(2, 20)))
                   for k in ("prompt", "chosen", "rejected")}
            f.write(json.dumps(row) + "\n")
    return [f"model={tmp_path / 'model'}", f"data={tmp_path / 'pairs.jsonl'}", "batch_size=4",
            "eval_fraction=0.2", "max_length=64", "max_prompt_length=32", "htsr=off"]
