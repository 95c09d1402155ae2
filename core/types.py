"""The objects plugins register. Plain Python: importing this module loads no ML library.

Heavy libraries (torch, transformers, datasets, ...) are imported inside the methods that need them,
so that ``qtune --help`` and config validation stay fast.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from .profiles import PLAIN_KERNELS, MemoryTraits

if TYPE_CHECKING:  # pragma: no cover
    from .config import Config
    from .profiles import ModelShape
    from .run import FinishedRun, RunContext
    from .verify import VerifyReport


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


class ChatTemplate(PromptTemplate):
    """A template that renders whole conversations with a Jinja chat template.

    A conversation is a list of messages ``{"role": ..., "content": ...}`` with roles ``system``,
    ``user``, ``assistant`` and ``tool`` (an assistant message may carry ``tool_calls``), plus an
    optional list of tool schemas. ``source(tokenizer)`` gives the Jinja text; the core renders it
    through transformers' chat-template renderer (the one ``tokenizer.apply_chat_template`` uses,
    with ``bos_token``, ``eos_token``, ``raise_exception``, ``tojson`` and ``{% generation %}``).

    Training renders each conversation once and trains the tokens of every assistant turn, its
    end-of-turn token included; everything else is masked (``training.train_on_responses_only``
    ``false`` trains every token instead). The assistant turns are found from the template's
    structure, never by searching the text: a template whose source wraps each assistant turn in
    ``{% generation %}...{% endgeneration %}`` marks them itself (every built-in does); any other
    template is rendered message by message, and each assistant turn is the text that the turn adds
    to the conversation rendered up to it with ``add_generation_prompt``. Such a template must render
    a conversation's start the same whatever follows it (preflight refuses one that does not).

    Instruction rows (``instruction``, optional ``input`` and ``system``, ``output``) are trained as a
    one-turn conversation (:meth:`example_messages`), so ``render_prompt`` and ``render_completion``
    keep working for the Alpaca-shaped paths (evaluation, export).
    """

    fields: ClassVar[tuple[str, ...]] = ("instruction", "output")
    optional_fields: ClassVar[tuple[str, ...]] = ("input", "system")
    #: the Jinja chat template; None means the tokenizer's own ``chat_template``
    jinja: ClassVar[str | None] = None
    #: the token that ends an assistant turn (trained with it); None means the tokenizer's EOS
    end_of_turn: ClassVar[str | None] = None
    #: special tokens the Jinja text uses, for rendering without a tokenizer (export, tests)
    special_tokens: ClassVar[Mapping[str, str]] = {}
    #: whether the template renders a ``system`` message (else :attr:`system_handling` says what happens)
    system_role: ClassVar[bool] = True
    system_handling: ClassVar[str] = ""
    #: whether the template renders the ``tools`` it is given
    supports_tools: ClassVar[bool] = False
    #: a default system prompt the template adds when a conversation has none (said by ``qtune validate``)
    default_system: ClassVar[str | None] = None

    def source(self, tokenizer: Any = None) -> str:
        """The Jinja text to render with: :attr:`jinja`, else the tokenizer's own chat template."""
        if self.jinja is not None:
            return self.jinja
        from .errors import QtuneError

        own = getattr(tokenizer, "chat_template", None) if tokenizer is not None else None
        if isinstance(own, dict):  # several named templates: the default one
            own = own.get("default")
        if not own:
            raise QtuneError(
                f"template {self.name!r} uses the tokenizer's own chat template, and this tokenizer has none; "
                f"choose a built-in chat template (`qtune plugins` lists them), e.g. template: chatml"
            )
        return own

    def end_of_turn_token(self, tokenizer: Any = None) -> str | None:
        if self.end_of_turn is not None:
            return self.end_of_turn
        return getattr(tokenizer, "eos_token", None) if tokenizer is not None else self.special_tokens.get("eos_token")

    def render(self, messages: list[dict[str, Any]], tokenizer: Any = None, *, tools: list[dict] | None = None,
               add_generation_prompt: bool = False) -> str:
        """The conversation as text (special tokens written out), as ``apply_chat_template`` renders it."""
        from .chat import render_conversation

        return render_conversation(self, messages, tokenizer, tools=tools, add_generation_prompt=add_generation_prompt)[0]

    def example_messages(self, example: Mapping[str, Any]) -> list[dict[str, Any]]:
        """An instruction row as a conversation: system (if any), user (instruction, a blank line,
        input), assistant (output, when the row has one)."""
        user = str(example["instruction"])
        if example.get("input"):
            user += "\n\n" + str(example["input"])
        messages = [{"role": "system", "content": str(example["system"])}] if example.get("system") else []
        messages.append({"role": "user", "content": user})
        if example.get("output") is not None and "output" in example:
            messages.append({"role": "assistant", "content": str(example["output"])})
        return messages

    def render_prompt(self, example: Mapping[str, Any]) -> str:
        messages = [m for m in self.example_messages(example) if m["role"] != "assistant"]
        return self.render(messages, add_generation_prompt=True)

    def render_completion(self, example: Mapping[str, Any]) -> str:
        return str(example["output"])

    def chat_template(self) -> str | None:
        """:attr:`jinja` without its ``{% generation %}`` blocks (which only transformers knows), for
        GGUF, Ollama and the merged model's tokenizer; it renders the same text."""
        if self.jinja is None:
            return None
        import re

        return re.sub(r"\{%-?\s*(?:end)?generation\s*-?%\}", "", self.jinja)

    def stop_strings(self) -> list[str]:
        return [self.end_of_turn] if self.end_of_turn else []


class DatasetLoader:
    """Loads rows for training. ``load`` returns a ``datasets.Dataset``."""

    name: ClassVar[str]
    description: ClassVar[str] = ""

    def load(self, spec: Any) -> Any:
        """``spec`` is the config's ``dataset`` section (:class:`qtune.config.DatasetConfig`)."""
        raise NotImplementedError


class DataFormat:
    """A shape of dataset rows (``dataset.format``): turns the rows a loader returned into what the
    template trains on.

    An instruction format (``conversations = False``) implements :meth:`rows`, returning rows with
    the template's fields as columns. A conversation format implements :meth:`conversation`, one row
    at a time; the core then checks the order of the roles, so a format need not.
    """

    name: ClassVar[str]
    description: ClassVar[str] = ""
    #: rows become conversations, which need a chat template
    conversations: ClassVar[bool] = False
    #: ``dataset.format: auto`` takes the format with the highest priority whose :meth:`detect` says yes
    auto_priority: ClassVar[int] = 0

    def detect(self, columns: list[str], fields: Mapping[str, str], first_row: Mapping[str, Any] | None) -> bool:
        """Whether rows with these ``columns`` (``first_row`` is the first of them, ``fields`` is
        ``dataset.fields``) are in this format."""
        return False

    def rows(self, rows: Any, template: PromptTemplate, spec: Any) -> Any:
        """``rows`` (a ``datasets.Dataset``) as the template trains on them; ``spec`` is the config's
        ``dataset`` section. Raise QtuneError for a missing column or a ``dataset.fields`` key that
        the format does not map. For a conversation format: :meth:`conversation` of every row."""
        if not self.conversations:
            raise NotImplementedError
        from .chat import MESSAGES, TOOLS, conversation_features

        def convert(batch):  # batched: half a row-by-row map's time (20,000 ShareGPT rows, 2-core CPU: 0.46 s against 1.07 s)
            names = list(batch)
            done = [self.conversation(dict(zip(names, values, strict=True)), spec.fields) for values in zip(*batch.values(), strict=True)]
            return {column: [row[column] for row in done] for column in (MESSAGES, TOOLS, "problem")}

        return rows.map(convert, batched=True, remove_columns=rows.column_names, features=conversation_features(), desc=None)

    def conversation(self, row: Mapping[str, Any], fields: Mapping[str, str]) -> dict[str, Any]:
        """One row as ``{"messages": [...], "tools": "...", "problem": "..."}``: messages
        ``{"role", "content", "tool_calls"}`` (roles system, user, assistant, tool; content text;
        tool_calls a JSON list or ""), tools a JSON list of tool schemas or "", and problem what is
        wrong with the row ("" when nothing: preflight lists such rows, training refuses them)."""
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
    #: the model's layer shapes (:class:`qtune.api.ModelShape`), when known: the fast profile and
    #: the memory estimates use it before anything is downloaded
    shape: ModelShape | None = None

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
    #: ``model.backend: auto`` takes the available backend with the highest priority above 0
    auto_priority: ClassVar[int] = 0
    #: how its kernels spend memory per token, for the fast profile's estimate (:class:`qtune.api.MemoryTraits`)
    memory_traits: ClassVar[MemoryTraits] = PLAIN_KERNELS
    #: how it can train on several processes: "ddp" (a whole model per process, placed on the
    #: device of LOCAL_RANK), "fsdp" (sharded; docs/distributed.md)
    strategies: ClassVar[tuple[str, ...]] = ("ddp",)

    def unavailable_reason(self, config: Config) -> str | None:
        """Why this backend cannot run here with this config, or None when it can."""
        return None

    def import_first(self) -> bool:
        """For a backend that ``patches_trainer``: import the patching library now and return True,
        so the core may load the tokenizer (and so transformers) before the model. False (the
        default) makes the core check the tokens only after ``load``."""
        return False

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

    def varlen_reason(self, config: Config, shape: ModelShape | None) -> str | None:
        """Why the fast profile should keep this backend's own attention for ``config``'s model here
        (one clause, printed as a note), or None to choose ``model.attention: varlen`` (one
        variable-length attention call per layer on packed batches, which ``load`` then honours).
        ``shape`` is the model's, when known. Called before the model loads: import no ML library."""
        return f"backend {self.name!r} has no variable-length attention"

    def attention_in_use(self, model: Any, config: Config) -> str | None:
        """One line naming the attention ``model`` (just loaded) trains with, printed and kept in the
        run's summary: ``varlen (...)`` where ``config.model.attention`` got it, else the backend's
        default and, when varlen was asked for, why not. None: say nothing."""
        return None


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

    def on_evaluate_start(self, run: RunContext, name: str, total: int) -> None:
        """An evaluation begins: ``name`` says which ("validation loss"), ``total`` counts its batches."""

    def on_evaluate_step(self, run: RunContext, done: int, total: int) -> None:
        """``done`` of the evaluation's ``total`` batches are through."""

    def on_evaluate(self, run: RunContext, metrics: dict[str, Any]) -> None:
        """An evaluation's result: the validation loss (``eval_loss``, ``step``, ``rows``, ``seconds``)
        or the exact match (``accuracy``, ``correct``, ``total``, ``when``)."""

    def on_save(self, run: RunContext, path: Path) -> None: ...

    def on_train_end(self, run: RunContext) -> None: ...

    def on_run_end(self, run: RunContext) -> None: ...

    def on_error(self, run: RunContext, error: BaseException) -> None: ...


class Tracker:
    """An experiment tracker that ``training.report_to`` names. It logs what the trainer logs (the
    loss, learning rate, grad norm, validation loss, and qtune's tokens/s and memory) through
    transformers' callback interface: either transformers' own integration of that name
    (``integration``) or the ``TrainerCallback`` objects :meth:`callbacks` returns.
    """

    name: ClassVar[str]
    description: ClassVar[str] = ""
    #: modules of which one must be importable (looked up, not imported, before any model loads)
    modules: ClassVar[tuple[str, ...]] = ()
    #: what ``pip install`` gives one of ``modules``
    requirement: ClassVar[str] = ""
    #: transformers' ``report_to`` name when transformers' integration does the logging, else None
    integration: ClassVar[str | None] = None

    def callbacks(self, run: RunContext) -> list[Any]:
        """``transformers.TrainerCallback`` instances to add to this run's trainer, on every process
        (log where ``state.is_world_process_zero``). Import transformers inside."""
        return []


@dataclass
class ExportResult:
    """What ``Exporter.export`` returns: the format, the folder (or file) written, the files in it
    (the core lists the folder when empty) and details recorded in exports.json (JSON-able)."""

    format: str
    path: Path
    files: list[Path] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)


class Exporter:
    """Writes a finished run in one format and, optionally, checks the result in its runtime.

    The core picks the exporter by ``name``, resolves ``--quant`` (:meth:`resolve_quantization`),
    refuses options it does not declare, calls ``export``, records the result in exports.json and
    calls ``verify``. Raise :class:`qtune.api.QtuneError` for a problem the user can fix; any other
    exception is reported as a failure of the plugin, in one line naming it and its distribution.
    """

    name: ClassVar[str]
    description: ClassVar[str] = ""
    #: the quantizations ``--quant`` accepts (empty: the option is refused)
    quantizations: ClassVar[tuple[str, ...]] = ()
    default_quantization: ClassVar[str | None] = None
    #: other spellings of a quantization (``{"float16": "fp16"}``), matched case-insensitively
    quantization_aliases: ClassVar[Mapping[str, str]] = {}
    #: keyword options ``export`` takes besides the quantization, with a line of help each
    #: (``qtune export --option NAME=VALUE``; built-in flags such as ``--max-shard-size`` map here)
    options: ClassVar[Mapping[str, str]] = {}
    #: the suffix of a file this format's runtime can generate from (``".gguf"``): ``qtune generate
    #: FILE`` then calls :meth:`stream_generate`
    artifact_suffix: ClassVar[str | None] = None

    def unavailable_reason(self) -> str | None:
        """Why this format cannot be written here (a missing package, with the pip command), or None."""
        return None

    def resolve_quantization(self, quantization: str | None) -> str | None:
        """The spelling of ``quantization`` in :attr:`quantizations` (aliases and case allowed), the
        default when None; a one-line error naming the choices otherwise."""
        from .errors import QtuneError

        if quantization is None:
            return self.default_quantization
        if not self.quantizations:
            raise QtuneError(f"export format {self.name!r} takes no --quant; leave it out")
        key = quantization.strip().lower()
        key = {alias.lower(): name for alias, name in self.quantization_aliases.items()}.get(key, key)
        for known in self.quantizations:
            if known.lower() == key:
                return known
        raise QtuneError(f"export format {self.name!r} has no quantization {quantization!r}; choose one of: {', '.join(self.quantizations)}")

    def export(self, run: FinishedRun, out_dir: Path, quantization: str | None, **options: Any) -> ExportResult:
        """Write ``run`` into ``out_dir`` through :func:`qtune.api.atomic_dir` (a crash must leave
        nothing under that name) and return what was written."""
        raise NotImplementedError

    def verify(self, run: FinishedRun, result: ExportResult) -> VerifyReport:
        """Load the artefact in its target runtime and compare it with the trained model; return a
        :class:`qtune.api.VerifyReport` (build it with :func:`qtune.api.verify_with`). A report that
        did not pass makes the export fail. Formats without a check leave this out."""
        raise NotImplementedError

    def stream_generate(self, path: Path, prompt: str, *, max_new_tokens: int, stop: list[str]) -> Iterator[str]:
        """Generate from the file ``path`` (with :attr:`artifact_suffix`) for ``prompt``, yielding text
        pieces as they come (greedy)."""
        raise NotImplementedError
