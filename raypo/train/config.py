"""The training configuration: one YAML file, validated at the edge, plain values inside.

A search space is this schema with any value searched, plus the search's own sections
(raypo.search.settings); `raypo train` reads its file through the same parser, as a space
with nothing searched.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from raypo.data.builtin import VARIANTS
from raypo.errors import RaypoError
from raypo.losses import DEFAULT_LOSS, LOSSES, SCHEDULES
from raypo.models.encoder import check_available, encoder_name
from raypo.train import yaml12


class ConfigError(RaypoError, ValueError):
    """A bad configuration: the message names the file, the key and what was expected."""


class _Strict(BaseModel):
    # inf and nan are never what a config means (an infinite lr passes `gt=0`)
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


# Far beyond any run raypo makes, short of absurd (`steps: 1.0e+12` would run for ever).
MAX_STEPS = 10_000_000
SFT_STEPS = 300  # own data, no model: the tiny model's fit before DPO
MAX_PAIRS = 100_000_000
# A report name is one folder under the reports folder: no separators, no `..`.
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def name_problem(name: str) -> str | None:
    """What is wrong with a report name, or None."""
    if isinstance(name, str) and NAME_PATTERN.match(name) and ".." not in name:
        return None
    return (f"expected a plain folder name (letters, digits, '.', '_', '-'; no path "
            f"separators or '..'), got {name!r}")


class TaskConfig(_Strict):
    """The built-in task (used when `data` is absent): see raypo.data.builtin."""

    variant: str = "graded"
    train_pairs: int = Field(2000, ge=8, le=MAX_PAIRS)
    eval_pairs: int = Field(256, ge=8, le=MAX_PAIRS)
    flip: float = Field(0.2, ge=0.0, lt=0.5)
    length_bias: float = Field(1.0, ge=0.0)
    bt_temperature: float = Field(0.0, ge=0.0)
    seed: int = 0
    # steps fitting the tiny model to the base distribution
    base_steps: int = Field(400, ge=1, le=MAX_STEPS)

    @field_validator("variant")
    @classmethod
    def _known_variant(cls, v: str) -> str:
        if v not in VARIANTS:
            raise ValueError(f"must be one of {', '.join(VARIANTS)}")
        return v


def _existing_folder(v: str, what: str) -> str:
    """`v` unless it is a path (not a hub name) that is not there: said now, not after a hub
    look-up."""
    if v.startswith(("/", "./", "../", "~")) and not Path(v).expanduser().is_dir():
        raise ValueError(f"{v}: no such folder ({what} is a folder with config.json, as "
                         "save_pretrained writes)")
    return v


class JudgeConfig(_Strict):
    """`judge: {model: PATH_OR_HUB_NAME}` (a reward model: a sequence classifier with one
    output) or `judge: builtin` (the built-in task's fitted tiny judge): at every evaluation
    the policy samples one response to each of `prompts` held-out prompts, the judge scores
    them, and they are compared with the reference's samples (raypo.train.judging)."""

    model: str
    prompts: int = Field(64, ge=2, le=100_000)
    max_new_tokens: int = Field(256, ge=1, le=100_000)
    temperature: float = Field(1.0, gt=0, le=10)
    top_p: float = Field(1.0, gt=0, le=1)
    # prompts generated (and pairs scored) at once
    batch_size: int = Field(16, ge=1, le=100_000)

    @field_validator("model")
    @classmethod
    def _named(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("expected a reward model's folder or hub name, or builtin")
        return _existing_folder(v, "a reward model")

    @property
    def builtin(self) -> bool:
        return self.model == "builtin"


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
    steps: int = Field(300, ge=1, le=MAX_STEPS)
    batch_size: int = Field(32, ge=1, le=1_000_000)
    grad_accum: int = Field(1, ge=1, le=1_000_000)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(10, ge=0, le=MAX_STEPS)
    max_grad_norm: float = Field(1.0, gt=0)
    seed: int = 0  # training: batch order, initial values of learned loss parts, LoRA, sampling
    # what stays fixed across a confirmation's seeds: the built-in base model's fit, the
    # held-out split of a dataset and the selection metrics' subset
    data_seed: int = 0
    eval_every: int = Field(50, ge=1, le=MAX_STEPS)
    # built-in task: policy samples scored per evaluation
    eval_samples: int = Field(128, ge=1, le=1_000_000)
    eval_fraction: float = Field(0.05, gt=0, lt=1)  # own data: held-out share of the pairs
    max_length: int = Field(512, ge=2, le=10_000_000)
    max_prompt_length: int = Field(256, ge=1, le=10_000_000)
    truncate_responses: bool = False
    # reference logits cached in top-k form for token losses
    topk: int = Field(64, ge=1, le=1_000_000)
    # policy | reference | encoder:<sentence-transformers model>, for the kernel losses
    embedding_source: str = "policy"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    # response tokens whose vocabulary logits are computed at once: log-probs (and what the
    # losses read from the distributions) are taken a chunk at a time and the chunk's logits
    # recomputed in the backward pass, so no tokens x vocabulary tensor outlives its chunk
    logits_chunk: int = Field(512, ge=1, le=1_000_000)
    # Hugging Face's gradient checkpointing (non-reentrant): activations recomputed in backward
    gradient_checkpointing: bool = False
    # heavy-tailed self-regularization metrics at the end of a run: off, the transformer
    # blocks' weight matrices (layers), or every 2-D weight including embeddings and head (all)
    htsr: Literal["off", "layers", "all"] = "layers"
    device: str = "auto"
    num_workers: int = Field(1, ge=1, le=10_000)
    use_gpu: bool = False
    # how Ray Train workers share the policy (num_workers > 1): ddp replicates it, fsdp shards
    # parameters, gradients and optimizer state across workers
    parallel: Literal["ddp", "fsdp"] = "ddp"
    checkpoint_every: int = Field(0, ge=0, le=MAX_STEPS)  # 0: only at the end (a search
    # trial: every evaluation)
    # own data without a model: steps fitting the tiny model to the data's responses first
    # (raypo.train.base_model); 0 keeps random weights as the start and the reference
    sft_steps: int = Field(SFT_STEPS, ge=0, le=MAX_STEPS)
    lora: dict[str, Any] | None = None
    judge: JudgeConfig | None = None  # a reward model judging sampled responses
    reports: str = "reports"

    @field_validator("loss", mode="before")
    @classmethod
    def _loss_shorthand(cls, v):
        return {"name": v} if isinstance(v, str) else v

    @field_validator("beta_schedule", mode="before")
    @classmethod
    def _schedule_shorthand(cls, v):
        return {"name": v} if isinstance(v, str) else v

    @field_validator("judge", mode="before")
    @classmethod
    def _judge_shorthand(cls, v):
        return {"model": v} if isinstance(v, str) else v

    @field_validator("task", mode="before")
    @classmethod
    def _task_shorthand(cls, v):
        return {"variant": v} if isinstance(v, str) else v

    @field_validator("name")
    @classmethod
    def _plain_name(cls, v: str) -> str:
        problem = name_problem(v)
        if problem:
            raise ValueError(problem)
        return v

    @field_validator("model")
    @classmethod
    def _local_model_exists(cls, v: str | None) -> str | None:
        return v if v is None else _existing_folder(v, "a local model")

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
        if self.batch_size % self.num_workers:
            # each worker takes an equal share of a batch (a worker with none never steps)
            raise ValueError(f"batch_size ({self.batch_size}) must be a multiple of "
                             f"num_workers ({self.num_workers})")
        if self.builtin and self.task.train_pairs < self.batch_size:
            # a batch never fills (batches drop their last partial one): say so before any
            # model is fitted rather than loop for ever
            raise ValueError(f"batch_size ({self.batch_size}) is larger than the built-in "
                             f"task's task.train_pairs ({self.task.train_pairs}); lower "
                             f"batch_size to at most {self.task.train_pairs} or raise "
                             "task.train_pairs")
        if self.judge is not None and self.judge.builtin and not self.builtin:
            raise ValueError("judge: builtin is fitted to the built-in task's true reward and "
                             "judges only it; with your own data name a reward model "
                             "(judge: {model: PATH_OR_HUB_NAME})")
        # (not "was it given": a dumped and re-read config gives every key)
        if self.sft_steps != SFT_STEPS and (self.model is not None or self.builtin):
            raise ValueError("sft_steps fits the tiny built-in model to your data: it needs "
                             "`data` and no `model` (the built-in task has task.base_steps)")
        return self

    @property
    def builtin(self) -> bool:
        return self.data is None


# the key a section's one-word shorthand stands for (`task: length`, `judge: builtin`); the
# others' is `name` (`loss: dpo`, `beta_schedule: cosine`)
SHORTHAND_KEYS = {"task": "variant", "judge": "model"}


def set_path(tree: dict, path: tuple, value: Any) -> None:
    """`tree[a][b][i] = value` for the path (a, b, i): keys of mappings and indices of lists
    (ints or digit strings); a `loss: <name>` shorthand becomes a mapping on the way.
    ConfigError when a step holds a plain value (`steps.x` with `steps: 300`)."""
    dotted = ".".join(map(str, path))
    if not all(str(k).strip() for k in path):
        raise ConfigError(f"{dotted!r}: expected a key such as loss.beta (no empty parts)")
    node = tree
    for depth, key in enumerate(path[:-1]):
        if isinstance(node, list):
            if not str(key).isdigit() or int(key) >= len(node):
                raise ConfigError(f"{dotted}: {key!r} is not an index of the list at "
                                  f"{'.'.join(map(str, path[:depth]))} ({len(node)} items)")
            node = node[int(key)]
            continue
        child = node.get(key)
        if isinstance(child, str):  # the `loss: <name>` shorthand gains parameters
            child = {SHORTHAND_KEYS.get(key, "name"): child}
        if isinstance(child, list) and str(path[depth + 1]).isdigit():
            node[key] = child = list(child)
        elif child is not None and not isinstance(child, dict):
            where = ".".join(map(str, path[:depth + 1]))
            raise ConfigError(f"{dotted}: {where} is a value ({child!r}), not a section with "
                              "keys")
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
    """`key=value` strings (values read as YAML 1.2 scalars, see raypo.train.yaml12: 0.1,
    1e-1, true, null, rbf, [0.1, 1.0])."""
    out = []
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"--set {pair!r}: expected key=value, e.g. loss.beta=0.2")
        key, raw = pair.split("=", 1)
        key = key.strip()
        if not key or not all(k.strip() for k in key.split(".")):
            raise ConfigError(f"--set {pair!r}: expected a key such as loss.beta before '='")
        try:
            value, problem = yaml12.load(raw)
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {pair!r}: the value is not valid YAML: "
                              f"{yaml12.one_line(e)}") from None
        if problem:
            raise ConfigError(f"--set {key}: {problem.removeprefix(': ')}")
        out.append((key, value))
    return out


def format_validation_error(source: str, error: ValidationError) -> str:
    """One line: the file, then each bad key and what was expected."""
    problems = []
    for e in error.errors():
        where = ".".join(str(p) for p in e["loc"])  # none: a check of several keys
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        if e["type"] == "finite_number":
            msg = "expected a finite number"
        problems.append(f"{where}: {msg}" if where else msg)
    return f"{source}: " + "; ".join(problems)


def read_yaml_mapping(path: str | Path, error: type[Exception] = ConfigError) -> dict:
    """The mapping a YAML file holds (YAML 1.2, see raypo.train.yaml12); `error` names the
    file otherwise (no file, not UTF-8, not YAML, empty, not a mapping)."""
    source, p = str(path), Path(path)
    if not p.is_file():
        raise error(f"{source}: no such file")
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        line = p.read_bytes()[:e.start].count(b"\n") + 1
        raise error(f"{source}: line {line}: not UTF-8 text (byte "
                    f"0x{e.object[e.start]:02x}); save the file as UTF-8") from None
    except OSError as e:
        raise error(f"{source}: cannot read: {e.strerror or e}") from None
    try:
        loaded, problem = yaml12.load(text)
    except yaml.YAMLError as e:
        raise error(f"{source}: not valid YAML: {yaml12.one_line(e)}") from None
    if problem:
        raise error(f"{source}: {problem}")
    if loaded is None:
        raise error(f"{source}: the file is empty; expected a mapping of keys (see "
                    "search_spaces/builtin_dpo.yaml)")
    if not isinstance(loaded, dict):
        raise error(f"{source}: expected a mapping of keys at the top level, got "
                    f"{type(loaded).__name__}")
    return dict(loaded)


def load_config(path: str | Path | None, overrides: list[str] = (),
                raw: dict | None = None) -> TrainConfig:
    """Read, override and validate a plain training config (no search sections, no ranges:
    `raypo train` reads a file through the search-space parser, raypo.search.space.load_fixed);
    ConfigError names file and key."""
    source = str(path) if path is not None else "<config>"
    tree: dict = dict(raw or {})
    if path is not None:
        tree.update(read_yaml_mapping(path))
    for key, value in parse_overrides(list(overrides)):
        set_dotted(tree, key, value)
    tree.setdefault("name", Path(path).stem if path is not None else "train")
    try:
        return TrainConfig.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(format_validation_error(source, e)) from None
