"""A trained policy as a Hugging Face folder, with `raypo.json` beside its files.

    save = ModelSave("out/aligned", merge=False, meta={"report": "reports/builtin_dpo"})
    save.check()                                  # before training: a bad target fails in seconds
    save.write_weights(policy, tokenizer, cfg)    # after training (model + tokenizer files)
    save.finish(cfg, row)                         # raypo.json, then the folder appears whole

What the folder holds, and what reads it:
- full fine-tuning: the model and its tokenizer (`AutoModelForCausalLM.from_pretrained(DIR)`,
  `AutoTokenizer.from_pretrained(DIR)`), in the dtype it trained in (bf16 stays bf16);
- LoRA: the adapter and the tokenizer (`peft.AutoPeftModelForCausalLM.from_pretrained(DIR)`,
  which loads the base model the adapter names: an absolute path for a local folder); with
  `merge` the adapter is merged into the base weights and the folder is a full model. LoRA on
  the tiny built-in model is always saved merged: the tiny base has no name peft could load.
- `raypo.json`: the training config, the run's metrics (its trials.parquet row), where the
  report is, the format and how to load it.

The folder is written into a temporary one beside it and renamed into place, so a reader (or a
killed run) never sees half a model. An existing folder is replaced only if it is a previous
raypo save (it has raypo.json); any other non-empty folder is refused (SaveError), before
training when `check()` is called first.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from raypo.errors import RaypoError
from raypo.files import atomic_write, share_as_new
from raypo.models.load import _is_peft_model
from raypo.storage import is_remote, location

META = "raypo.json"


class SaveError(RaypoError, ValueError):
    """The target folder cannot take a model: the message says which and why."""


def check_target(directory: str | Path) -> None:
    """Refuse a folder that holds anything but a previous raypo save."""
    path = Path(directory)
    if path.exists() and not path.is_dir():
        raise SaveError(f"{path}: exists and is not a folder")
    if path.is_dir() and any(path.iterdir()) and not (path / META).is_file():
        raise SaveError(f"{path}: not empty and not a previous raypo save (no {META}); "
                        "give a new or empty folder")


def is_saved_model(directory) -> bool:
    """Whether `directory` (local, or a raypo.storage.RemotePath) holds a whole raypo save:
    raypo.json is written last."""
    return (location(directory) / META).is_file()


def read_meta(directory) -> dict:
    return json.loads((location(directory) / META).read_text())


def write_weights(policy, tokenizer, folder: str | Path, *, merge: bool = False,
                  base: str | None = None) -> str:
    """The policy's files and its tokenizer's into `folder`; returns the format written:
    "full", "lora" (the adapter only) or "merged". `base` is the model the policy was loaded
    from (None: the tiny built-in model). A merged save merges the adapters in place: call it
    once training is over."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fmt = "full"
    if _is_peft_model(policy):
        if merge or base is None:
            policy = policy.merge_and_unload()
            fmt = "merged"
        else:
            for config in policy.peft_config.values():  # peft loads the base from here
                local = Path(base).expanduser()
                config.base_model_name_or_path = str(local.resolve()) if local.is_dir() else base
            fmt = "lora"
    policy.save_pretrained(folder)  # safetensors; tensors leave the GPU in their own dtype
    tokenizer.save_pretrained(folder)
    return fmt


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, str):  # numpy scalars
        return _json_safe(value.item())
    return value


def write_meta(folder, meta: dict) -> None:
    """raypo.json, atomically (the keeper rewrites it in a kept folder; on object storage one
    upload)."""
    meta = _json_safe(meta)
    folder = location(folder)
    if is_remote(folder):
        (folder / META).write_text(json.dumps(meta, indent=2, default=str))
        return
    atomic_write(folder / META, lambda f: json.dump(meta, f, indent=2, default=str))


def loader_of(fmt: str) -> str:
    return ("peft.AutoPeftModelForCausalLM.from_pretrained(DIR)" if fmt == "lora"
            else "transformers.AutoModelForCausalLM.from_pretrained(DIR)")


def publish(staging: Path, directory: Path) -> Path:
    """Rename a complete `staging` folder to `directory`, replacing a previous raypo save
    there (renamed aside first, then removed: readers see the old model or the new one)."""
    for path in (staging, *staging.rglob("*")):  # mkdtemp made it private
        share_as_new(path, directory=path.is_dir())
    directory.parent.mkdir(parents=True, exist_ok=True)
    old = None
    if directory.exists():
        check_target(directory)
        old = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.old-"))
        os.replace(directory, old / "model")
    os.replace(staging, directory)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return directory


def staging_beside(directory: Path) -> Path:
    """A new private folder next to `directory` (same file system, so the rename is atomic)."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.tmp-"))


@dataclass
class ModelSave:
    """Where a run's trained policy goes (`directory`), merged or not, and what raypo.json
    says besides the config and the metrics (`meta`: the report, the trial)."""

    directory: Path
    merge: bool = False
    meta: dict = field(default_factory=dict)
    _staging: Path | None = None
    _format: str | None = None

    def __post_init__(self):
        self.directory = Path(self.directory).expanduser().absolute()

    def check(self) -> None:
        check_target(self.directory)

    def staging(self) -> Path:
        """The temporary folder the weights are written to (made on first call)."""
        if self._staging is None:
            self.check()
            self._staging = staging_beside(self.directory)
        return self._staging

    def write_weights(self, policy, tokenizer, cfg) -> None:
        try:
            self._format = write_weights(policy, tokenizer, self.staging(), merge=self.merge,
                                         base=cfg.model)
        except BaseException:  # a full disk, Ctrl-C: no half-written folder stays behind
            self.discard()
            raise

    def discard(self) -> None:
        if self._staging is not None:
            shutil.rmtree(self._staging, ignore_errors=True)
        self._staging = self._format = None

    def weights_written(self, fmt: str) -> None:
        """Record that another process (a Ray Train worker) wrote the weights into
        `staging()` in format `fmt`."""
        self._format = fmt

    def finish(self, cfg, row: dict) -> Path | None:
        """raypo.json and the rename, when the run finished and its weights were written;
        otherwise the staging folder is removed. Returns the folder, or None."""
        staging, self._staging = self._staging, None
        if staging is None:
            return None
        if self._format is None or row.get("status") != "ok":
            shutil.rmtree(staging, ignore_errors=True)
            return None
        import raypo

        try:
            write_meta(staging, {
                "format": self._format, "load": loader_of(self._format),
                "base_model": cfg.model or "tiny", "raypo": raypo.__version__,
                "saved": time.strftime("%Y-%m-%dT%H:%M:%S"), **self.meta,
                "config": cfg.model_dump(mode="json"), "metrics": row})
            return publish(staging, self.directory)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
