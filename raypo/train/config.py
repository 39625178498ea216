"""The training configuration: one YAML file, validated at the edge, plain values inside.

The same schema is a search space with every parameter fixed (raypo.search builds on it), so a
search space with no ranges is a training config.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from raypo.data.builtin import VARIANTS
from raypo.losses import DEFAULT_LOSS, LOSSES, SCHEDULES
from raypo.models.encoder import check_available, encoder_name

# A search space's own sections (raypo.search.space); a training run reads past them, so a
# search space with every value fixed is a training config.
SEARCH_SECTIONS = ("objective", "objectives", "budget", "scheduler", "resources", "sampler",
                   "selection", "confirm", "keep")


class ConfigError(ValueError):
    """A bad configuration: the message names the file, the key and what was expected."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TaskConfig(_Strict):
    """The built-in task (used when `data` is absent): see raypo.data.builtin."""

    variant: str = "graded"
    train_pairs: int = Field(2000, ge=8)
    eval_pairs: int = Field(256, ge=8)
    flip: float = Field(0.2, ge=0.0, lt=0.5)
    length_bias: float = Field(1.0, ge=0.0)
    bt_temperature: float = Field(0.0, ge=0.0)
    seed: int = 0
    base_steps: int = Field(400, ge=1)  # steps fitting the tiny model to the base distribution

    @field_validator("variant")
    @classmethod
    def _known_variant(cls, v: str) -> str:
        if v not in VARIANTS:
            raise ValueError(f"must be one of {', '.join(VARIANTS)}")
        return v


class LossConfig(_Strict):
    """`loss: dpo` or `loss: {name: kernel_dpo, kernel: rbf, sigma: 1.0, ...}`."""

    model_config = ConfigDict(extra="allow")
    name: str = DEFAULT_LOSS

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})

    @model_validator(mode="after")
    def _buildable(self) -> LossConfig:
        if self.name not in LOSSES:
            raise ValueError(f"unknown loss {self.name!r}; expected one of "
                             f"{', '.join(sorted(LOSSES))}")
        LOSSES.create(self.name, **self.params)  # parameter names and values checked once
        return self


class ScheduleConfig(_Strict):
    """`beta_schedule: cosine` or `{name: cosine, end_beta: 0.01}`; total_steps defaults to
    the run's steps and beta to the loss's beta."""

    model_config = ConfigDict(extra="allow")
    name: str = "constant"

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in SCHEDULES:
            raise ValueError(f"unknown beta schedule {v!r}; expected one of "
                             f"{', '.join(sorted(SCHEDULES))}")
        return v


class TrainConfig(_Strict):
    name: str = "train"
    model: str | None = None  # hub name or local folder; None: the tiny built-in model
    data: str | None = None  # file, folder or hub name; None: the built-in task
    task: TaskConfig = TaskConfig()
    loss: LossConfig = LossConfig()
    beta_schedule: ScheduleConfig = ScheduleConfig()
    steps: int = Field(300, ge=1)
    batch_size: int = Field(32, ge=1)
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(10, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    seed: int = 0  # training: batch order, initial values of learned loss parts, LoRA, sampling
    # what stays fixed across a confirmation's seeds: the built-in base model's fit, the
    # held-out split of a dataset and the selection metrics' subset
    data_seed: int = 0
    eval_every: int = Field(50, ge=1)
    eval_samples: int = Field(128, ge=1)  # built-in task: policy samples scored per evaluation
    eval_fraction: float = Field(0.05, gt=0, lt=1)  # own data: held-out share of the pairs
    max_length: int = Field(512, ge=2)
    max_prompt_length: int = Field(256, ge=1)
    truncate_responses: bool = False
    topk: int = Field(64, ge=1)  # reference logits cached in top-k form for token losses
    # policy | reference | encoder:<sentence-transformers model>, for the kernel losses
    embedding_source: str = "policy"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = "auto"
    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    # how Ray Train workers share the policy (num_workers > 1): ddp replicates it, fsdp shards
    # parameters, gradients and optimizer state across workers
    parallel: Literal["ddp", "fsdp"] = "ddp"
    checkpoint_every: int = Field(0, ge=0)  # 0: only at the end (a search trial: every eval)
    # own data without a model: steps fitting the tiny model to the data's responses first
    # (raypo.train.base_model); 0 keeps random weights as the start and the reference
    sft_steps: int = Field(300, ge=0)
    lora: dict[str, Any] | None = None
    reports: str = "reports"

    @field_validator("loss", mode="before")
    @classmethod
    def _loss_shorthand(cls, v):
        return {"name": v} if isinstance(v, str) else v

    @field_validator("beta_schedule", mode="before")
    @classmethod
    def _schedule_shorthand(cls, v):
        return {"name": v} if isinstance(v, str) else v

    @field_validator("task", mode="before")
    @classmethod
    def _task_shorthand(cls, v):
        return {"variant": v} if isinstance(v, str) else v

    @field_validator("embedding_source")
    @classmethod
    def _embedding_source(cls, v: str) -> str:
        name = encoder_name(v)
        if name is None and v not in ("policy", "reference"):
            raise ValueError("must be 'policy', 'reference' or 'encoder:<sentence-transformers "
                             "model>'")
        if name is not None:
            if not name.strip():
                raise ValueError("encoder: needs a sentence-transformers model name or folder, "
                                 "e.g. encoder:sentence-transformers/all-MiniLM-L6-v2")
            # fail at validation, not after the base model and the reference are computed
            try:
                check_available()
            except ImportError as e:
                raise ValueError(str(e).removeprefix("embedding_source: ")) from None
        return v

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        if self.max_prompt_length >= self.max_length:
            raise ValueError("max_prompt_length must be smaller than max_length")
        if self.parallel == "fsdp" and self.lora is not None:
            # the LoRA reference is the policy with adapters off, which would run outside the
            # FSDP wrapper on sharded weights
            raise ValueError("parallel: fsdp does not support lora yet; use parallel: ddp")
        if "sft_steps" in self.model_fields_set and (self.model is not None or self.builtin):
            raise ValueError("sft_steps fits the tiny built-in model to your data: it needs "
                             "`data` and no `model` (the built-in task has task.base_steps)")
        return self

    @property
    def builtin(self) -> bool:
        return self.data is None


def set_path(tree: dict, path: tuple, value: Any) -> None:
    """`tree[a][b][i] = value` for the path (a, b, i): keys of mappings and indices of lists
    (ints or digit strings); a `loss: <name>` shorthand becomes a mapping on the way."""
    node = tree
    for depth, key in enumerate(path[:-1]):
        if isinstance(node, list):
            node = node[int(key)]
            continue
        child = node.get(key)
        if isinstance(child, str):  # the `loss: <name>` shorthand gains parameters
            child = {"name": child} if key != "task" else {"variant": child}
        if isinstance(child, list) and str(path[depth + 1]).isdigit():
            node[key] = child = list(child)
        else:
            node[key] = child = dict(child or {})
        node = child
    last = path[-1]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value


def set_dotted(tree: dict, dotted: str, value: Any) -> None:
    """`tree[a][b] = value` for `a.b` (see `set_path`; `loss.terms.0.weight` reaches a list)."""
    set_path(tree, tuple(dotted.split(".")), value)


def parse_overrides(pairs: list[str]) -> list[tuple[str, Any]]:
    """`key=value` strings (values parsed as YAML scalars: 0.1, true, null, rbf)."""
    out = []
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"--set {pair!r}: expected key=value, e.g. loss.beta=0.2")
        key, raw = pair.split("=", 1)
        out.append((key.strip(), yaml.safe_load(raw)))
    return out


def format_validation_error(source: str, error: ValidationError) -> str:
    lines = [f"{source}: invalid configuration"]
    for e in error.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"  {where}: {msg}")
    return "\n".join(lines)


def read_yaml_mapping(path: str | Path, error: type[Exception] = ConfigError) -> dict:
    """The mapping a YAML file holds (empty file: {}); `error` names the file otherwise."""
    source, p = str(path), Path(path)
    if not p.is_file():
        raise error(f"{source}: no such file")
    try:
        loaded = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise error(f"{source}: not valid YAML: {e}") from e
    if loaded is not None and not isinstance(loaded, dict):
        raise error(f"{source}: expected a mapping of keys at the top level")
    return dict(loaded or {})


def load_config(path: str | Path | None, overrides: list[str] = (),
                raw: dict | None = None) -> TrainConfig:
    """Read, override and validate a training config; ConfigError names file and key."""
    source = str(path) if path is not None else "<config>"
    tree: dict = dict(raw or {})
    if path is not None:
        tree.update(read_yaml_mapping(path))
    for key in SEARCH_SECTIONS:
        tree.pop(key, None)
    for key, value in parse_overrides(list(overrides)):
        set_dotted(tree, key, value)
    tree.setdefault("name", Path(path).stem if path is not None else "train")
    try:
        return TrainConfig.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(format_validation_error(source, e)) from None
