"""The run configuration: one YAML file holding every knob of the seed notebook.

Validation happens before any model loads: unknown keys and bad values are refused with the key's
path and the closest valid key. Names that plugins provide (template, loader, backend, callbacks,
export formats) are checked against the loaded plugins.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ConfigError, QtuneError, first_line

SEED_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class Section(BaseModel):
    # NaN and infinity are never a setting (a NaN learning rate passes every bound check)
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class ModelConfig(Section):
    #: a catalogue short name (`qtune models`), a hub id, or a local directory
    name: str = "unsloth/Qwen2.5-7B"
    #: auto: Unsloth when a CUDA GPU and unsloth are present, else transformers
    backend: str = "auto"
    max_seq_length: int = Field(2048, gt=0, le=1_048_576)
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    load_in_4bit: bool = True
    trust_remote_code: bool = False
    #: auto: the fast profile picks varlen where it runs, else the backend's default; varlen: one
    #: variable-length attention call per layer on packed batches (the backend's); default: the
    #: backend's own attention
    attention: Literal["auto", "default", "varlen"] = "auto"


class LoraConfig(Section):
    r: int = Field(16, gt=0, le=4096)
    alpha: int = Field(16, gt=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    bias: Literal["none", "all", "lora_only"] = "none"
    target_modules: list[str] = Field(default_factory=lambda: list(SEED_TARGET_MODULES), min_length=1)
    #: true, false, or "unsloth" (Unsloth's offloaded checkpointing; plain checkpointing elsewhere)
    gradient_checkpointing: Union[bool, Literal["unsloth"]] = "unsloth"
    use_rslora: bool = False


class DatasetConfig(Section):
    #: a dataset loader name (`qtune plugins`); auto picks "files" for a local path, else "hub"
    loader: str = "auto"
    #: hub id or local file / directory
    path: Optional[str] = "yahma/alpaca-cleaned"
    #: hub dataset configuration name
    subset: Optional[str] = None
    split: str = "train"
    #: a data format plugin's name (`qtune plugins` lists them); built in: alpaca (instruction rows:
    #: the template's fields), messages (OpenAI role/content), sharegpt (from/value). auto: messages
    #: or sharegpt when a `messages` or `conversations` column is there, else alpaca
    format: str = "auto"
    #: template field -> column in the data (conversations: `messages` and `tools` -> column)
    fields: dict[str, str] = Field(default_factory=dict)
    #: use only the first N rows (after shuffling when shuffle is on)
    limit: Optional[int] = Field(None, gt=0)
    shuffle: bool = False
    #: rows held out from training (taken from the end): the validation loss and exact match use them;
    #: with eval_path or eval_split, at most this many of those rows (0: all)
    eval_size: int = Field(0, ge=0)
    #: held-out rows from their own file or hub id, read like path (same loader, format and fields)
    eval_path: Optional[str] = None
    #: the split the held-out rows come from (e.g. test or validation), of eval_path or else of path
    eval_split: Optional[str] = None
    #: let numbers and booleans stand where the template expects text (rendered with str());
    #: off: such values are refused, since a number in a text field is usually a column mix-up
    numbers_as_text: bool = False
    #: loader-specific settings (the demo task generator reads size and seed here)
    options: dict[str, Any] = Field(default_factory=dict)


class TrainingConfig(Section):
    per_device_train_batch_size: int = Field(2, gt=0)
    gradient_accumulation_steps: int = Field(4, gt=0)
    warmup_steps: int = Field(5, ge=0)
    #: stop after this many optimizer steps; 0 or less trains num_train_epochs instead
    max_steps: int = 60
    num_train_epochs: float = Field(1.0, gt=0)
    learning_rate: float = Field(2e-4, gt=0, lt=1.0)
    optim: str = "adamw_8bit"
    weight_decay: float = Field(0.01, ge=0)
    lr_scheduler_type: str = "linear"
    #: numpy takes seeds from 0 to 2**32 - 1 (transformers' set_seed seeds numpy too)
    seed: int = Field(3407, ge=0, lt=2**32)
    logging_steps: int = Field(1, gt=0)
    packing: bool = False
    #: seed: the settings as written; fast: packing, a bigger micro-batch and, where memory allows,
    #: no gradient checkpointing (qtune.profiles.apply_profile; docs/benchmarks.md)
    profile: Literal["seed", "fast"] = "seed"
    #: GPU memory (GiB) the fast profile plans for when less than the card's (a shared GPU, or
    #: sizing a run for a smaller card on a larger one); none: the whole card
    memory_budget_gib: Optional[float] = Field(None, gt=0)
    #: on several processes (qtune run --gpus N): ddp keeps a whole model per GPU, fsdp shards it;
    #: auto picks ddp when a replica fits one GPU, else fsdp (qtune.distributed.plan; docs/distributed.md)
    distributed: Literal["auto", "ddp", "fsdp"] = "auto"
    #: true: train the response (every assistant turn) and its end token only; false: every token;
    #: auto: assistant turns only with a chat template, every token with an instruction template (the seed)
    train_on_responses_only: Union[bool, Literal["auto"]] = "auto"
    #: runs are written to OUTPUT_DIR/RUN_NAME
    output_dir: str = "runs"
    #: save a resumable checkpoint every N steps (0: only at the end)
    save_steps: int = Field(0, ge=0)
    save_total_limit: Optional[int] = Field(2, gt=0)
    max_grad_norm: float = Field(1.0, ge=0)
    #: validation loss on the held-out rows every N steps (0: once, at the end); needs dataset.eval_size
    eval_steps: int = Field(0, ge=0)
    #: rows per validation batch (none: per_device_train_batch_size)
    per_device_eval_batch_size: Optional[int] = Field(None, gt=0)
    #: stop when the validation loss has not improved for N evaluations in a row (0: never)
    early_stopping_patience: int = Field(0, ge=0)
    #: how much lower than the best so far a validation loss must be to count as an improvement
    early_stopping_threshold: float = Field(0.0, ge=0)
    #: experiment trackers (tracker plugins: tensorboard, trackio, wandb, mlflow, ...; `qtune plugins` lists them)
    report_to: list[str] = Field(default_factory=list)

    @field_validator("report_to", mode="before")
    @classmethod
    def _report_to_as_list(cls, value: Any) -> Any:
        # `report_to: tensorboard` is shorthand for `[tensorboard]`; "none" (transformers' word) is []
        if isinstance(value, str):
            value = [value]
        if isinstance(value, list):
            value = [v for v in value if v != "none"]
        return value

    @field_validator("report_to")
    @classmethod
    def _each_once(cls, value: list[str]) -> list[str]:
        return list(dict.fromkeys(value))


class EvaluationConfig(Section):
    #: generate answers for the held-out rows and score exact match, before and after training
    exact_match: bool = False
    before_training: bool = True
    max_new_tokens: int = Field(32, gt=0)
    batch_size: int = Field(16, gt=0)


class CallbackEntry(Section):
    name: str
    options: dict[str, Any] = Field(default_factory=dict)


class ExportEntry(Section):
    format: str
    quant: Optional[str] = None
    verify: bool = True


class Config(Section):
    #: the run's name; the run directory is training.output_dir/name (a timestamp when empty)
    name: Optional[str] = None
    model: ModelConfig = Field(default_factory=ModelConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    template: str = "alpaca"
    dataset: DatasetConfig = Field(default_factory=DatasetConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    callbacks: list[CallbackEntry] = Field(default_factory=lambda: [CallbackEntry(name="memory_monitor")])
    exports: list[ExportEntry] = Field(default_factory=list)

    @field_validator("callbacks", mode="before")
    @classmethod
    def _callbacks_as_names(cls, value: Any) -> Any:
        # `callbacks: [memory_monitor]` is shorthand for `[{name: memory_monitor}]`
        if isinstance(value, list):
            return [{"name": v} if isinstance(v, str) else v for v in value]
        return value

    @field_validator("exports", mode="before")
    @classmethod
    def _exports_as_formats(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [{"format": v} if isinstance(v, str) else v for v in value]
        return value

    @model_validator(mode="after")
    def _check_consistency(self) -> Config:
        held_out = self.dataset.eval_size or self.dataset.eval_path or self.dataset.eval_split
        if self.evaluation.exact_match and not held_out:
            raise ValueError("evaluation.exact_match needs held-out rows: set dataset.eval_size or dataset.eval_path")
        if self.training.eval_steps and not held_out:
            raise ValueError("training.eval_steps needs held-out rows for the validation loss: set dataset.eval_size or dataset.eval_path")
        if self.training.early_stopping_patience and not self.training.eval_steps:
            raise ValueError("training.early_stopping_patience needs a validation loss during training: set training.eval_steps")
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# --- loading -------------------------------------------------------------------------------------


def seed_config() -> Config:
    """The configuration of Unsloth's Qwen2.5-7B Alpaca notebook."""
    return Config()


def load_config(path: Union[str, Path, None], overrides: tuple[str, ...] = (), check_plugins: bool = True) -> Config:
    data: dict[str, Any] = {}
    if path is not None:
        data = read_yaml(Path(path))
    for item in overrides:
        apply_override(data, item)
    config = validate(data)
    if check_plugins:
        check_plugin_names(config)
    return config


def read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} not found; create one with `qtune init {path}`")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"config file {str(path)!r} is not UTF-8 text; save it as UTF-8") from None
    try:
        data = yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 - a SafeLoader that refuses repeated keys
    except DuplicateKeyError as exc:
        raise ConfigError(f"config file {str(path)!r}: {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or first_line(exc)
        raise ConfigError(f"config file {str(path)!r} is not valid YAML{where}: {problem}; fix the syntax there") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of sections (model:, lora:, ...), not a {type(data).__name__}")
    return data


class DuplicateKeyError(yaml.YAMLError):
    pass


class UniqueKeyLoader(yaml.SafeLoader):
    """yaml's SafeLoader, except that a key repeated in one mapping is an error naming both lines
    (plain YAML keeps the last one silently: a second `lora:` section would replace the first)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise DuplicateKeyError(f"key {key!r} at line {line} repeats the one at line {seen[key]}; "
                                        f"keep one and merge their settings")
            seen.setdefault(key, line) if isinstance(key, (str, int, float, bool)) else None
        return super().construct_mapping(node, deep=deep)


def apply_override(data: dict[str, Any], item: str) -> None:
    """Apply one ``--set key.path=value``; the value is parsed as YAML (``10``, ``true``, ``[a, b]``)."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {item!r} is not KEY=VALUE; write it like --set training.max_steps=10")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    parts = key.strip().split(".")
    node: Any = data
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"--set {key}: {'.'.join(parts[: depth + 1])} is not a section")
        node = child
    node[parts[-1]] = value


def validate(data: dict[str, Any]) -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc, data)) from None


def describe_validation_error(exc: ValidationError, data: Any) -> str:
    first = exc.errors()[0]
    loc = [str(p) for p in first["loc"]]
    path = ".".join(loc) or "config"
    more = f" (and {exc.error_count() - 1} more problem{'s' if exc.error_count() > 2 else ''})" if exc.error_count() > 1 else ""
    if first["type"] == "extra_forbidden":
        valid = _fields_at(loc[:-1])
        meant = key_synonym(loc[-1])
        if meant and meant != path:
            hint = f"did you mean {meant!r}?"
        else:
            close = difflib.get_close_matches(loc[-1], valid, n=2, cutoff=0.5)
            # two keys about as close (batch_size: the train and the eval batch sizes): name both
            ratios = [difflib.SequenceMatcher(None, loc[-1], key).ratio() for key in close]
            close = close if len(close) == 2 and ratios[0] - ratios[1] < 0.05 else close[:1]
            names = " or ".join(repr(".".join(loc[:-1] + [key])) for key in close)
            hint = f"did you mean {names}?" if close else f"valid keys here: {', '.join(valid)}"
        return f"unknown config key {path!r}; {hint}{more}"
    value = first.get("input")
    shown = repr(value) if not isinstance(value, dict) else "a mapping"
    message = first["msg"]
    if message.startswith("Value error, "):
        message = message[len("Value error, ") :]
        return f"invalid config: {message}{more}"
    return f"invalid value {shown} for {path!r}: {message}{more}"


#: what other fine-tuning tools (peft, transformers, axolotl, LLaMA-Factory) call qtune's keys
KEY_SYNONYMS = {
    "rank": "lora.r", "lora_r": "lora.r", "lora_rank": "lora.r",
    "lora_alpha": "lora.alpha", "lora_dropout": "lora.dropout", "lora_target_modules": "lora.target_modules",
    "lr": "training.learning_rate", "learning_rate": "training.learning_rate",
    "epochs": "training.num_train_epochs", "num_epochs": "training.num_train_epochs", "epoch": "training.num_train_epochs",
    "batch_size": "training.per_device_train_batch_size", "micro_batch_size": "training.per_device_train_batch_size",
    "train_batch_size": "training.per_device_train_batch_size",
    "grad_accum": "training.gradient_accumulation_steps", "gradient_accumulation": "training.gradient_accumulation_steps",
    "steps": "training.max_steps", "warmup": "training.warmup_steps", "optimizer": "training.optim",
    "scheduler": "training.lr_scheduler_type", "lr_scheduler": "training.lr_scheduler_type",
    "max_length": "model.max_seq_length", "max_seq_len": "model.max_seq_length", "seq_len": "model.max_seq_length",
    "sequence_len": "model.max_seq_length", "cutoff_len": "model.max_seq_length",
    "base_model": "model.name", "model_name": "model.name", "model_name_or_path": "model.name", "model_id": "model.name",
    "data_path": "dataset.path", "dataset_path": "dataset.path", "data_files": "dataset.path",
}


def key_synonym(key: str) -> str | None:
    """The full path of the qtune key another tool calls ``key``, or of the one field named ``key``
    in another section (``training.max_seq_length`` -> ``model.max_seq_length``); None otherwise."""
    if key in KEY_SYNONYMS:
        return KEY_SYNONYMS[key]
    homes = [f"{section}.{key}" for section in _section_names() if key in _fields_at([section])]
    return homes[0] if len(homes) == 1 else None


def _section_names() -> list[str]:
    return [name for name in Config.model_fields if _fields_at([name])]


def _fields_at(loc: list[str]) -> list[str]:
    model: Any = Config
    for part in loc:
        if part.isdigit():
            continue
        field = model.model_fields.get(part)
        if field is None:
            return []
        annotation = field.annotation
        inner = getattr(annotation, "__args__", None)
        if inner:  # list[X] / Optional[X]
            annotation = next((a for a in inner if isinstance(a, type) and issubclass(a, BaseModel)), annotation)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return sorted(model.model_fields)


def check_plugin_names(config: Config) -> None:
    """Refuse names no loaded plugin provides (template, loader, format, backend, callbacks, trackers, exports)."""
    from .plugin_manager import get_host, normalize_format, suggest

    host = get_host()
    checks = [("template", config.template, host.templates)]
    if config.model.backend != "auto":
        checks.append(("model.backend", config.model.backend, host.backends))
    if config.dataset.loader != "auto":
        checks.append(("dataset.loader", config.dataset.loader, host.dataset_loaders))
    if config.dataset.format != "auto":
        checks.append(("dataset.format", config.dataset.format, host.data_formats))
    checks += [(f"callbacks[{i}].name", c.name, host.callbacks) for i, c in enumerate(config.callbacks)]
    checks += [("training.report_to", name, host.trackers) for name in config.training.report_to]
    for path, name, registry in checks:
        if name not in registry:
            raise ConfigError(f"unknown {registry.kind} {name!r} at {path!r}{suggest(name, registry.items)}")
    for i, entry in enumerate(config.exports):
        name = normalize_format(entry.format)  # the seed's "merged_16bit" and "Q4_K_M" are accepted
        if name not in host.exporters:
            raise ConfigError(f"unknown export format {entry.format!r} at 'exports[{i}].format'{suggest(name, host.exporters.items)}")
        try:
            host.exporters.get(name).resolve_quantization(entry.quant)
        except QtuneError as error:
            raise ConfigError(f"{error} (at 'exports[{i}].quant')") from None
