"""The objects plugins register. Plain Python: importing this module loads no ML library.

Heavy libraries (torch, transformers, datasets, ...) are imported inside the methods that need them,
so that ``qtune --help`` and config validation stay fast.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:  # pragma: no cover
    from .config import Config
    from .run import RunContext


class PromptTemplate:
    """Turns one example (a mapping with the template's ``fields``) into prompt and completion text.

    The core tokenizes ``prompt + completion`` and appends the tokenizer's EOS token itself, so a
    template never writes EOS: training text is exactly ``prompt + completion + EOS``.
    """

    name: ClassVar[str]
    description: ClassVar[str] = ""
    #: fields an example must carry; ``optional_fields`` may be missing or empty
    fields: ClassVar[tuple[str, ...]] = ()
    optional_fields: ClassVar[tuple[str, ...]] = ()
    #: text that opens the response; training on responses only masks everything before it
    response_marker: ClassVar[str] = ""

    def render_prompt(self, example: Mapping[str, Any]) -> str:
        raise NotImplementedError

    def render_completion(self, example: Mapping[str, Any]) -> str:
        raise NotImplementedError

    def chat_template(self) -> str | None:
        """A Jinja chat template equal to ``render_prompt`` for one user turn (for GGUF/Ollama)."""
        return None

    def stop_strings(self) -> list[str]:
        """Strings besides EOS at which generation should stop (Ollama ``stop`` parameters)."""
        return []


class DatasetLoader:
    """Loads rows for training. ``load`` returns a ``datasets.Dataset``."""

    name: ClassVar[str]
    description: ClassVar[str] = ""

    def load(self, spec: Any) -> Any:
        """``spec`` is the config's ``dataset`` section (:class:`qtune.config.DatasetConfig`)."""
        raise NotImplementedError


@dataclass(frozen=True)
class ModelEntry:
    """A short model name. ``source`` is a hub id; ``materialize`` (instead) builds a local
    directory once and returns its path (for models that ship inside a Python package)."""

    name: str
    source: str | None = None
    materialize: Callable[[], Path] | None = None
    family: str = ""
    params_b: float = 0.0
    #: GPU memory needed to fine-tune with QLoRA, in GiB (rough, at max_seq_length 2048)
    memory_4bit_gib: float | None = None
    description: str = ""

    def resolve(self) -> str:
        if self.materialize is not None:
            return str(self.materialize())
        assert self.source is not None
        return self.source


class Backend:
    """Loads a model and tokenizer, adds LoRA adapters and prepares the model for generation.

    Training itself is shared: the core drives trl's SFTTrainer for every backend.
    """

    name: ClassVar[str]
    description: ClassVar[str] = ""
    #: whether importing this backend patches trl/transformers (it must then load first)
    patches_trainer: ClassVar[bool] = False
    #: how it can train on several processes: "ddp" (a whole model per process, placed on the
    #: device of LOCAL_RANK), "fsdp" (sharded; docs/distributed.md)
    strategies: ClassVar[tuple[str, ...]] = ("ddp",)

    def unavailable_reason(self, config: Config) -> str | None:
        """Why this backend cannot run here with this config, or None when it can."""
        return None

    def load(self, config: Config, model_path: str) -> tuple[Any, Any]:
        """Return ``(model, tokenizer)`` ready for ``add_lora``."""
        raise NotImplementedError

    def add_lora(self, model: Any, config: Config) -> Any:
        raise NotImplementedError

    def load_trained(self, config: Config, model_path: str, adapter_dir: Path) -> tuple[Any, Any]:
        """Return ``(model, tokenizer)`` with the trained adapter loaded, ready for generation."""
        raise NotImplementedError

    def for_inference(self, model: Any) -> Any:
        return model


class TrainingCallback:
    """Lifecycle hooks of one run. Subclass, set ``name``, override what you need.

    Instances are created per run from the config's ``callbacks`` list; ``options`` holds that
    entry's settings. Anything put into ``run.summary`` is printed at the end and saved in the run
    directory's ``summary.json``.
    """

    name: ClassVar[str]
    description: ClassVar[str] = ""
    #: on several processes callbacks run on rank 0 only, unless this is True (then on every rank;
    #: ``run.is_main`` tells which one reports, ``run.gather`` collects values from all)
    every_rank: ClassVar[bool] = False

    def __init__(self, **options: Any) -> None:
        if options:
            raise TypeError(f"callback {self.name!r} takes no options, got {sorted(options)}")

    def on_run_start(self, run: RunContext) -> None: ...

    def on_train_start(self, run: RunContext) -> None: ...

    def on_step_end(self, run: RunContext, step: int, metrics: dict[str, float]) -> None: ...

    def on_evaluate(self, run: RunContext, metrics: dict[str, Any]) -> None: ...

    def on_save(self, run: RunContext, path: Path) -> None: ...

    def on_train_end(self, run: RunContext) -> None: ...

    def on_run_end(self, run: RunContext) -> None: ...

    def on_error(self, run: RunContext, error: BaseException) -> None: ...


@dataclass
class ExportResult:
    format: str
    path: Path
    files: list[Path] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)


class Exporter:
    """Writes a finished run in one format. ``export`` writes under ``out_dir`` (which it must
    create through :func:`qtune.fsutil.atomic_dir` so a crash leaves nothing half-written)."""

    name: ClassVar[str]
    description: ClassVar[str] = ""
    #: the quantizations ``--quant`` accepts (empty: the option is refused)
    quantizations: ClassVar[tuple[str, ...]] = ()
    default_quantization: ClassVar[str | None] = None

    def unavailable_reason(self) -> str | None:
        return None

    def export(self, run: Any, out_dir: Path, quantization: str | None) -> ExportResult:
        raise NotImplementedError

    def verify(self, run: Any, result: ExportResult) -> Any:
        """Load the artefact in its target runtime and compare it with the trained model."""
        raise NotImplementedError
