"""Preflight: what can be checked before any model weights load, so bad input costs no GPU time.

``qtune validate`` runs it and prints the findings; ``qtune run`` runs it before it creates the run
directory and stops on any error. It needs the tokenizer (``AutoTokenizer`` on the resolved model
path) but never the weights, and it tokenizes through :func:`qtune.data.encode_rows`, the very
function training uses, so the checked tokens are the trained tokens.

Each finding is one line: where (a key path or a dataset row), what is wrong, and how to fix it.
Errors stop the run; warnings and notes are printed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from .config import Config
from .errors import QtuneError, first_line

ERROR, WARNING, NOTE = "error", "warning", "note"
#: the format of RUN_DIR/preflight.json
PREFLIGHT_VERSION = 1
#: rows named one by one before the rest are counted
ROWS_LISTED = 5
#: findings of one kind (one per row) before the rest are summed up in one line
FINDINGS_PER_KIND = 10
#: file names of pickled weights, which qtune never loads (unpickling runs arbitrary code)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
RUN_NAME = re.compile(r"[A-Za-z0-9._-]+")


@dataclass(frozen=True)
class Finding:
    level: str
    #: a key path (``model.max_seq_length``) or a place in the data (``dataset row 3, field 'output'``)
    where: str
    what: str
    fix: str = ""

    def __str__(self) -> str:
        text = f"{self.where}: {self.what}" if self.where else self.what
        if self.fix:
            text += f"; {self.fix}"
        return " ".join(text.split())  # one line, whatever a message from a library held


class PreflightError(QtuneError):
    """Preflight found errors. ``findings`` holds them; the message has one line per error."""

    def __init__(self, findings: list[Finding]) -> None:
        self.findings = findings
        super().__init__("\n".join(str(f) for f in findings))


@dataclass
class Report:
    config: Config
    findings: list[Finding] = field(default_factory=list)
    template: Any = None
    model_path: Optional[str] = None
    train_rows: Any = None
    held_out: Any = None
    tokenizer: Any = None
    #: :func:`qtune.data.encode_rows` of the training rows (with the check columns)
    encoded: Any = None
    stats: dict[str, Any] = field(default_factory=dict)
    #: the exception behind the first error that came from one (a plugin's): --debug prints it
    cause: Optional[BaseException] = None

    def add(self, level: str, where: str, what: str, fix: str = "") -> None:
        self.findings.append(Finding(level, where, what, fix))

    def add_error(self, error: QtuneError) -> None:
        """A QtuneError as an error finding, keeping what caused it for --debug."""
        self.add(ERROR, "", str(error))
        self.cause = self.cause or error.__cause__

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.level == ERROR]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.level != ERROR]

    def raise_for_errors(self) -> None:
        if self.errors:
            raise PreflightError(self.errors) from self.cause

    def to_json(self) -> dict[str, Any]:
        return {"findings": [{"level": f.level, "message": str(f)} for f in self.findings], "data": self.stats}


def rows_text(rows: list[int]) -> str:
    shown = ", ".join(str(r) for r in rows[:ROWS_LISTED])
    more = f" and {len(rows) - ROWS_LISTED} more" if len(rows) > ROWS_LISTED else ""
    return f"row{'s' if len(rows) > 1 else ''} {shown}{more}"


# --------------------------------------------------------------------------- the checks


def preflight(config: Config, *, load_tokenizer: bool = True, resuming: bool = False) -> Report:
    """Check ``config`` (already schema-valid) and its data; with ``load_tokenizer`` also the tokens.

    Never writes anything. Raises nothing for problems it can name: they become findings.
    """
    from .plugin_manager import get_host

    report = Report(config=config)
    report.template = get_host().templates.get(config.template)
    if not check_hub(report):
        return report  # one line: nothing else can be checked without the hub
    check_settings(report, resuming=resuming)
    check_data(report)
    # The token checks need the tokenizer (a few seconds to import and load): they run once the
    # settings and the data are clean, so a typo is answered at once.
    if load_tokenizer and not report.errors and report.model_path is not None and report.train_rows is not None:
        check_model_skeleton(report)
    if load_tokenizer and not report.errors and report.model_path is not None and report.train_rows is not None:
        tokenizer = _load_tokenizer(report)
        if tokenizer is not None:
            check_tokens(report, tokenizer)
    return report


def check_hub(report: Report) -> bool:
    """The hub ids the config names (model, dataset) can be fetched or are cached; one attempt to
    reach the hub, a few seconds (:mod:`qtune.hub`). False, with one finding, when they cannot."""
    from .data import eval_source, pick_loader
    from .hub import check_reachable
    from .models import resolve_model

    config = report.config
    wanted = []
    try:
        model = resolve_model(config.model.name)
    except QtuneError:
        model = None  # _check_model names the problem
    if model is not None and not Path(model).exists():
        wanted.append((model, "model", "model.name"))
    # the training rows, and held-out rows with a file of their own: the same rule picks their loader
    for source, setting in ((config, "dataset.path"), (eval_source(config), "dataset.eval_path")):
        path = source.dataset.path if source is not None else None
        try:
            hub_data = bool(path) and pick_loader(source).name == "hub"
        except QtuneError:
            hub_data = False
        # a local path given to the hub loader is refused by the loader itself, in one line
        if hub_data and not Path(path).expanduser().exists() and all(path != id_ for id_, _, _ in wanted):
            wanted.append((path, "dataset", setting))
    problem = check_reachable(wanted)
    if problem:
        report.add(ERROR, "", problem)
    return problem is None


def check_settings(report: Report, resuming: bool = False) -> None:
    """The output folder, the run name, the model folder and its weights: file-system checks only."""
    config = report.config
    if config.model.trust_remote_code:
        report.add(WARNING, "model.trust_remote_code", f"is on: loading {config.model.name!r} runs Python code shipped with it",
                   "turn it off unless you have read that code")
    if not resuming:
        _check_output(report)
    _check_model(report)
    _check_exports(report)
    _check_callbacks(report)
    _check_trackers(report)


def _check_trackers(report: Report) -> None:
    """Each tracker's package can be imported (found without importing it: wandb or mlflow take seconds)."""
    from .plugin_manager import get_host

    for name in report.config.training.report_to:
        tracker = get_host().trackers.get(name)
        if tracker.modules and not any(_find_spec(module) for module in tracker.modules):
            report.add(ERROR, "training.report_to", f"tracker {name!r} is not installed",
                       f"install it with `pip install {tracker.requirement or tracker.modules[0]}` or take it out of the list")


def _find_spec(module: str):
    import importlib.util

    try:
        return importlib.util.find_spec(module)
    except (ImportError, ValueError):  # a parent package missing, or a module without a spec
        return None


def _check_output(report: Report) -> None:
    config = report.config
    if config.name is not None and not RUN_NAME.fullmatch(config.name):
        report.add(ERROR, "name", f"{config.name!r} may hold only letters, digits, '.', '_' and '-'", "change `name`")
        return
    root = Path(config.training.output_dir).expanduser()
    if config.name is not None and (root / config.name).exists():
        report.add(ERROR, "name", f"run directory {str(root / config.name)!r} already exists",
                   "choose another `name`, remove that folder, or continue it with `qtune run --resume`")
    existing = root
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        report.add(ERROR, "training.output_dir", f"{str(existing)!r} is a file, so {str(root)!r} cannot be a folder",
                   "choose a folder path")
    elif not os.access(existing, os.W_OK | os.X_OK):
        report.add(ERROR, "training.output_dir", f"cannot write to {str(existing)!r} (permission denied)", "choose a writable folder")
    elif _file_system_type(existing) in PSEUDO_FILE_SYSTEMS:
        report.add(ERROR, "training.output_dir", f"{str(existing)!r} is on the kernel's {_file_system_type(existing)} file system, "
                   "which holds no files", "choose a folder on a disk")


def _check_model(report: Report) -> None:
    from .models import resolve_model

    name = report.config.model.name
    try:
        path = resolve_model(name)
    except QtuneError as exc:
        report.add(ERROR, "model.name", str(exc))
        return
    report.model_path = path
    folder = Path(path)
    if not folder.is_dir():
        return  # a hub id: the backend loads it with use_safetensors=True
    names = [p.name for p in folder.iterdir() if p.is_file()]
    if "config.json" not in names:
        report.add(ERROR, "model.name", f"{path!r} is not a model folder (no config.json)",
                   "point model.name at a folder written by save_pretrained, a hub id, or a name from `qtune models`")
        return
    if any(n.endswith(".safetensors") for n in names):
        _check_safetensors(report, folder, sorted(n for n in names if n.endswith(".safetensors")))
        return
    pickles = sorted(n for n in names if n.endswith(PICKLE_SUFFIXES))
    if pickles:
        report.add(
            ERROR, "model.name",
            f"{path!r} holds only pickled weights ({pickles[0]}), and qtune loads safetensors only because unpickling runs code",
            "if you trust the file, convert it once with python -c \"from transformers import AutoModelForCausalLM as M; "
            f"M.from_pretrained('{path}', use_safetensors=False).save_pretrained('{path}-safetensors')\" "
            "and set model.name to the new folder",
        )
    else:
        report.add(ERROR, "model.name", f"{path!r} holds no weights (*.safetensors)", "copy the model's .safetensors files there")


#: file systems that hold no files of their own (the kernel's views); writing a run there fails
PSEUDO_FILE_SYSTEMS = frozenset({"proc", "sysfs", "devtmpfs", "devpts", "cgroup", "cgroup2", "debugfs", "securityfs", "tracefs",
                                 "configfs", "pstore", "bpf", "fusectl", "mqueue", "hugetlbfs", "binfmt_misc", "efivarfs"})
#: bytes per element of each safetensors dtype
SAFETENSORS_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "I16": 2, "U16": 2, "F16": 2,
                           "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8, "C64": 8}


def _file_system_type(path: Path) -> str:
    """The type of the file system holding ``path`` (from /proc/self/mounts), or "" when unknown."""
    try:
        mounts = Path("/proc/self/mounts").read_text(encoding="utf-8").splitlines()
    except OSError:
        return ""
    target, best, kind = Path(path).resolve(), -1, ""
    for line in mounts:
        fields = line.split()
        if len(fields) < 3:
            continue
        point = Path(fields[1].replace("\\040", " "))
        if (target == point or point in target.parents) and len(point.parts) > best:
            best, kind = len(point.parts), fields[2]
    return kind


def _check_safetensors(report: Report, folder: Path, names: list[str]) -> None:
    """Each weights file's header, read without loading a tensor: not empty, a JSON header of the
    stated length, every tensor's bytes inside the file (a copy cut short fails here, not after the
    run has started), and the shards an index names all present."""
    problems = []
    for name in names:
        problem = safetensors_problem(folder / name)
        if problem:
            problems.append(f"{name} {problem}")
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text(encoding="utf-8")).get("weight_map", {}).values())
        except (ValueError, AttributeError):
            shards = set()
            problems.append("model.safetensors.index.json is not a JSON index")
        missing = sorted(shard for shard in shards if not (folder / shard).is_file())
        if missing:
            problems.append(f"model.safetensors.index.json names {missing[0]}, which is missing")
    if problems:
        report.add(ERROR, "model.name", f"{str(folder)!r}: {problems[0]}" + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""),
                   "copy the model's files again (a download or copy was cut short)")


def safetensors_problem(path: Path) -> str | None:
    """What is wrong with the safetensors file ``path`` (header and sizes only), or None."""
    size = path.stat().st_size
    if size == 0:
        return "is empty (0 bytes)"
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            return f"is {size} bytes, too short for a safetensors header"
        length = int.from_bytes(head, "little")
        if length > size - 8:
            return f"is cut short or not safetensors: its header claims {length:,} bytes of a {size:,}-byte file"
        try:
            header = json.loads(handle.read(length))
        except (ValueError, UnicodeDecodeError):
            return "has no valid safetensors header (not JSON)"
    if not isinstance(header, dict):
        return "has no valid safetensors header"
    data_bytes = size - 8 - length
    for tensor, info in header.items():
        if tensor == "__metadata__":
            continue
        try:
            start, end = info["data_offsets"]
            count = 1
            for dim in info["shape"]:
                count *= int(dim)
            expected = count * SAFETENSORS_DTYPE_BYTES.get(info["dtype"], 0)
        except (KeyError, TypeError, ValueError):
            return f"has a malformed entry for tensor {tensor!r}"
        if end > data_bytes:
            return f"is cut short: tensor {tensor!r} ends at byte {end:,} of {data_bytes:,} data bytes"
        if SAFETENSORS_DTYPE_BYTES.get(info["dtype"]) and end - start != expected:
            return f"has tensor {tensor!r} whose size does not match its shape"
    return None


def _check_callbacks(report: Report) -> None:
    """The config's callbacks start with their options (as `qtune run` starts them, before the
    model loads); the instances are dropped."""
    from .plugin_manager import make_callbacks

    try:
        make_callbacks(report.config, [])
    except QtuneError as exc:
        report.add(ERROR, "", str(exc))


def _check_exports(report: Report) -> None:
    """Each ``exports:`` entry can run here (its packages installed): found now, not after training."""
    from .plugin_manager import get_host, normalize_format

    exporters = get_host().exporters
    for index, entry in enumerate(report.config.exports):
        name = normalize_format(entry.format)
        if name not in exporters:
            continue  # refused with the config
        reason = exporters.get(name).unavailable_reason()
        if reason:
            report.add(ERROR, f"exports[{index}]", f"export format {name!r} cannot run here: {reason}",
                       "or remove the entry and export later with `qtune export`")


def check_model_skeleton(report: Report, model: Any = None) -> None:
    """What the model's config says, checked without weights: the config loads (a custom model type
    needs model.trust_remote_code), and every lora.target_modules entry names a module of the model,
    built on the meta device (no memory) or taken from ``model`` when already loaded."""
    config = report.config
    if model is None:
        try:
            from transformers import AutoConfig

            model_config = AutoConfig.from_pretrained(report.model_path, trust_remote_code=config.model.trust_remote_code)
        except Exception as exc:  # ValueError (remote code, unknown type), OSError (missing, offline)
            text = first_line(exc)
            if "trust_remote_code" in text or "custom code" in text:
                report.add(ERROR, "model.name", f"{report.model_path!r} is a custom model type whose code ships with the model",
                           "read that code, then set model.trust_remote_code: true, or choose a model transformers knows")
            elif not Path(report.model_path).is_dir() and isinstance(exc, OSError):
                return  # a hub id not reachable here: the tokenizer check names it
            else:
                report.add(ERROR, "model.name", f"cannot read the config of {report.model_path!r}: {text}",
                           "point model.name at a folder written by save_pretrained")
            return
        model = _meta_skeleton(model_config, config.model.trust_remote_code)
        if model is None:
            return
    names = [name for name, _ in model.named_modules()]
    targets = config.lora.target_modules
    if targets in (["all-linear"], ["all_linear"]):
        return
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        import torch

        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n})
        report.add(ERROR, "lora.target_modules", f"{', '.join(repr(t) for t in missing)} match no module of {report.model_path!r}",
                   f"choose among its linear layers: {', '.join(linear[:20])}")


def _meta_skeleton(model_config: Any, trust_remote_code: bool) -> Any:
    """The model built from its config on the meta device: module names and shapes, no memory."""
    try:
        from accelerate import init_empty_weights
        from transformers import AutoModelForCausalLM

        with init_empty_weights():
            return AutoModelForCausalLM.from_config(model_config, trust_remote_code=trust_remote_code)
    except Exception:  # a config transformers cannot build as a causal LM: the backend will say so
        return None


def check_data(report: Report) -> None:
    """Load the rows (no tokenizer): the fields the template needs, present and non-empty; the same
    for held-out rows that have a file or split of their own (dataset.eval_path / eval_split)."""
    from .data import eval_source, split_rows

    rows = _read_checked(report, report.config, "dataset", "dataset.path")
    if rows is None:
        return
    eval_rows, eval_config = None, eval_source(report.config)
    if eval_config is not None:
        eval_rows = _read_checked(report, eval_config, "eval dataset", "dataset.eval_path")
        if eval_rows is None:
            return
    try:
        report.train_rows, report.held_out = split_rows(rows, report.config, eval_rows)
    except QtuneError as exc:
        report.add(ERROR, "", str(exc))


def _read_checked(report: Report, config: Config, where: str, path_key: str):
    """The rows ``config.dataset`` names, or None after a finding: ``where`` names them in findings
    ("dataset", "eval dataset"), ``path_key`` is the setting that points at them."""
    from .data import ROW_COLUMN, looks_local, read_rows

    template = report.template
    spec = config.dataset
    if spec.path and (spec.loader == "files" or (spec.loader == "auto" and looks_local(spec.path))):
        from .fsutil import missing_path_reason

        path = Path(spec.path).expanduser()
        if not path.exists():
            report.add(ERROR, path_key, f"{spec.path!r} {missing_path_reason(path)}", "fix the path")
            return None
        if path.is_file() and not _check_file_start(report, path, path_key):
            return None
    try:
        rows = read_rows(config, template)
    except QtuneError as exc:
        report.add_error(exc)
        return None
    indices = rows[ROW_COLUMN]
    columns = {f: spec.fields.get(f, f) for f in template.fields}
    columns.update({f: spec.fields.get(f, f) for f in template.optional_fields})
    for name in template.fields + template.optional_fields:
        if name not in rows.column_names:
            continue
        optional = name not in template.fields
        empty, wrong, numbers = [], [], []
        for index, value in zip(indices, rows[name], strict=True):
            if value is None or (isinstance(value, str) and not value.strip()):
                empty.append(index)
            elif isinstance(value, (list, dict)):
                wrong.append(index)
            elif not isinstance(value, str):
                numbers.append(index)
        column = f" (column {columns[name]!r})" if columns[name] != name else ""
        if numbers and not spec.numbers_as_text:
            report.add(ERROR, f"{where} field {name!r}{column}", f"holds numbers or booleans, not text ({rows_text(numbers)})",
                       "quote them in the data, or set dataset.numbers_as_text: true to let the template convert them")
        if optional:
            if wrong:
                report.add(ERROR, f"{where} field {name!r}{column}",
                           f"holds lists or mappings, not text ({rows_text(wrong)}); the prompt would show their Python form",
                           "make those values text or map the field to a text column with dataset.fields")
            continue
        for index in empty[:FINDINGS_PER_KIND]:
            report.add(ERROR, f"{where} row {index}, field {name!r}{column}", "is empty", "fill it in or remove the row")
        if len(empty) > FINDINGS_PER_KIND:
            report.add(ERROR, f"{where}, field {name!r}{column}", f"{len(empty) - FINDINGS_PER_KIND} more rows are empty",
                       "fill them in or remove them")
        if wrong:
            report.add(ERROR, f"{where} field {name!r}{column}", f"holds lists or mappings, not text ({rows_text(wrong)})",
                       "map the field to a text column with dataset.fields")
    _check_conversations(report, rows, where)
    return rows


def _check_conversations(report: Report, rows, where: str = "dataset") -> None:
    """Conversation rows: what reading them found (no messages, an unknown role or speaker, empty or
    non-text content, roles out of order, no assistant turn), one finding per row up to a limit,
    and what the template does with system messages and tools."""
    from .chat import MESSAGES, PROBLEM_COLUMN, TOOLS
    from .data import ROW_COLUMN

    if PROBLEM_COLUMN not in rows.column_names:
        return
    template = report.template
    columns = rows.select_columns([ROW_COLUMN, PROBLEM_COLUMN, TOOLS]).to_dict()
    bad = [(row, problem) for row, problem in zip(columns[ROW_COLUMN], columns[PROBLEM_COLUMN], strict=True) if problem]
    for row, problem in bad[:FINDINGS_PER_KIND]:
        fix = ("convert the row to text-only messages or remove it" if "only text" in problem
               else "fix the row or remove it")
        report.add(ERROR, f"{where} row {row}", f"the conversation {problem}", fix)
    if len(bad) > FINDINGS_PER_KIND:
        report.add(ERROR, where, f"{len(bad) - FINDINGS_PER_KIND} more conversations have problems", "fix or remove them")
    with_tools = [row for row, tools in zip(columns[ROW_COLUMN], columns[TOOLS], strict=True) if tools]
    if with_tools and not template.supports_tools:
        report.add(WARNING, f"{where} {rows_text(with_tools)}", f"carry tools, and template {template.name!r} does not render tools",
                   "choose a template that does (chat, qwen2.5, llama-3.1, mistral-v0.3, mistral-nemo) or drop the tools column")
    firsts = [turns[0]["role"] if turns else "" for turns in rows[MESSAGES]]
    with_system = [row for row, role in zip(columns[ROW_COLUMN], firsts, strict=True) if role == "system"]
    if with_system and template.system_handling:
        report.add(NOTE, "template", f"{template.name!r}: a system message is {template.system_handling} ({rows_text(with_system)})")
    without = len(firsts) - len(with_system)
    if template.default_system and without:
        report.add(NOTE, "template", f"{template.name!r} adds its default system prompt {template.default_system!r} to the "
                   f"{without} conversations without one", "give them a system message, or use chatml for a model that is not Qwen")


def _check_file_start(report: Report, path: Path, path_key: str = "dataset.path") -> bool:
    """What a parser would only say obscurely: a file of blank lines, a JSON file that is not a
    list or an object. Reads the first 64 KiB."""
    with open(path, "rb") as handle:
        head = handle.read(65536)
    start = head.removeprefix(b"\xef\xbb\xbf").lstrip()[:1]
    suffix = path.suffix.lower()
    if head and not start and path.stat().st_size <= len(head):
        report.add(ERROR, path_key, f"{str(path)!r} holds only blank lines, no rows", f"add rows or fix {path_key}")
        return False
    if suffix == ".json" and start and start not in (b"[", b"{"):
        report.add(ERROR, path_key, f"{str(path)!r} is not a JSON list of rows (it starts with {start.decode('latin-1')!r})",
                   "write a list of objects, [{\"instruction\": ..., \"output\": ...}, ...]")
        return False
    if suffix == ".jsonl" and start and start != b"{":
        report.add(ERROR, path_key, f"{str(path)!r} is not JSON Lines of rows (it starts with {start.decode('latin-1')!r})",
                   "write one JSON object per line")
        return False
    return True


def _load_tokenizer(report: Report):
    config = report.config
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(report.model_path, trust_remote_code=config.model.trust_remote_code)
    except Exception as exc:  # OSError (missing files, offline), ValueError (unknown class), ...
        from .hub import offline_requested

        fetch = ", or unset HF_HUB_OFFLINE to fetch it once" if offline_requested() and not Path(report.model_path).exists() else ""
        report.add(ERROR, "model.name", f"cannot load the tokenizer of {report.model_path!r}: {first_line(exc)}",
                   f"point model.name at a folder with the tokenizer files{fetch}")
        return None


def check_tokens(report: Report, tokenizer) -> None:
    """EOS, pad, truncation, masking and the response marker, on the tokens training will use."""
    from .data import encode_rows, encoded_stats, ensure_distinct_pad, responses_only
    from .types import ChatTemplate

    config, template = report.config, report.template
    chat = isinstance(template, ChatTemplate)
    report.tokenizer = tokenizer
    max_length = config.model.max_seq_length
    if tokenizer.eos_token_id is None:
        report.add(ERROR, "tokenizer", f"{report.model_path!r} has no EOS token, so the model cannot learn to stop",
                   "set eos_token in its tokenizer_config.json")
        return
    note = ensure_distinct_pad(tokenizer)
    if note:
        report.add(NOTE, "tokenizer", note)
    elif tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        report.add(WARNING, "tokenizer", f"the pad token is {tokenizer.pad_token!r}, the same as EOS, and no distinct one is in the vocabulary",
                   "add a pad token to the tokenizer (Unsloth refuses pad == EOS)")

    encoded = encode_rows(report.train_rows, template, tokenizer, config)
    report.encoded = encoded
    columns = encoded.select_columns(["row", "length", "truncated", "trained", "eos_trained", "had_eos", "marker_found", "error",
                                      "problem", "turns", "turns_cut", "turns_end_missing", "turns_end_masked",
                                      "turns_empty"]).to_dict()
    rows = columns["row"]
    n = len(rows)

    failed = [(r, e) for r, e in zip(rows, columns["error"], strict=True) if e]
    for row, error in failed[:FINDINGS_PER_KIND]:
        report.add(ERROR, f"dataset row {row}", f"template {template.name!r} failed to render it: {error}", "fix the row or the template")
    if len(failed) > FINDINGS_PER_KIND:
        report.add(ERROR, "dataset", f"template {template.name!r} failed on {len(failed) - FINDINGS_PER_KIND} more rows", "fix them")
    ok = [not e and not p for e, p in zip(columns["error"], columns["problem"], strict=True)]

    if responses_only(config, template) and template.response_marker:
        missing = [r for r, found, good in zip(rows, columns["marker_found"], ok, strict=True) if good and not found]
        if missing:
            report.add(ERROR, f"dataset {rows_text(missing)}",
                       f"the response marker {template.response_marker!r} of template {template.name!r} is not in the rendered prompt",
                       "fix the template's response_marker or turn off training.train_on_responses_only")

    truncated = [r for r, cut, good in zip(rows, columns["truncated"], ok, strict=True) if good and cut]
    no_eos = [r for r, eos, cut, good in zip(rows, columns["eos_trained"], columns["truncated"], ok, strict=True) if good and not cut and not eos]
    if chat:
        _check_turns(report, columns, ok, tokenizer)
        no_eos = []
    if no_eos:
        report.add(ERROR, f"dataset {rows_text(no_eos)}", "the labels do not end in a trained EOS token, so the model would not learn to stop",
                   "check the template (it must not mask the completion's end)")
    if truncated:
        longest = max(length for length, cut, good in zip(columns["length"], columns["truncated"], ok, strict=True) if good and cut)
        share = len(truncated) / n
        level = ERROR if len(truncated) == sum(ok) else WARNING
        if chat:
            cut_turns = sum(c for c, good in zip(columns["turns_cut"], ok, strict=True) if good)
            all_turns = sum(t for t, good in zip(columns["turns"], ok, strict=True) if good)
            what = (f"{len(truncated)} of {n} conversations ({share:.0%}; {rows_text(truncated)}) are longer than {max_length} "
                    f"tokens and will be cut: {cut_turns} of their {all_turns} assistant turns lose their end or all of "
                    f"their tokens (the longest has {longest})")
        else:
            what = (f"{len(truncated)} of {n} examples ({share:.0%}; {rows_text(truncated)}) are longer than {max_length} tokens "
                    f"and will be cut, losing their EOS (the longest has {longest})")
        report.add(level, "model.max_seq_length", what, f"raise model.max_seq_length to {longest} or shorten those rows")

    masked = [r for r, count, good in zip(rows, columns["trained"], ok, strict=True) if good and count == 0]
    if masked:
        level = ERROR if len(masked) == sum(ok) else WARNING
        consequence = "no example is left to train on" if level == ERROR else "these rows are left out of training"
        cause = (f"no assistant turn starts within model.max_seq_length ({max_length})" if chat
                 else f"the prompt fills model.max_seq_length ({max_length})")
        report.add(level, f"dataset {rows_text(masked)}",
                   f"every label is masked (-100) because {cause}; {consequence}",
                   "raise model.max_seq_length, shorten the prompts or turn off training.train_on_responses_only")

    had_eos = [r for r, flag, good in zip(rows, columns["had_eos"], ok, strict=True) if good and flag]
    if had_eos:
        report.add(NOTE, f"dataset {rows_text(had_eos)}", "the text already ends in the EOS token; qtune appends none there, so EOS is never doubled")

    report.stats = encoded_stats(encoded)
    if chat:
        report.stats["assistant_turns"] = int(sum(columns["turns"]))
    report.stats.update({"eos_token": tokenizer.eos_token, "pad_token": tokenizer.pad_token})


def _check_turns(report: Report, columns: dict, ok: list[bool], tokenizer) -> None:
    """Chat templates: every assistant turn trains at least one token and ends in its end-of-turn
    token, trained (both unless truncation cut the turn)."""
    template = report.template
    eot = template.end_of_turn_token(tokenizer)
    rows = columns["row"]

    def rows_with(key):
        return [r for r, count, good in zip(rows, columns[key], ok, strict=True) if good and count]

    empty = rows_with("turns_empty")
    if empty:
        report.add(ERROR, f"dataset {rows_text(empty)}", "an assistant turn has no trained token (the template renders it as nothing)",
                   "give every assistant message text, or fix the template's {% generation %} blocks")
    missing = rows_with("turns_end_missing")
    if missing:
        report.add(ERROR, f"dataset {rows_text(missing)}",
                   f"an assistant turn does not end in the end-of-turn token {eot!r}, so the model would not learn to stop",
                   "use the chat template of the model's family, or set the template's end_of_turn to the token its turns end with")
    masked = rows_with("turns_end_masked")
    if masked:
        report.add(ERROR, f"dataset {rows_text(masked)}",
                   f"an assistant turn's end-of-turn token {eot!r} is masked, so the model would not learn to stop",
                   "put the end-of-turn token inside the template's {% generation %} block")


# --------------------------------------------------------------------------- reuse and fingerprint


def same_tokenizer(a, b) -> bool:
    """Whether two tokenizers turn every text into the same ids (same class, vocabulary, rules and
    special tokens), so preflight's encoded rows can be trained as they are."""
    if a is b:
        return True
    if type(a) is not type(b):
        return False
    for attr in ("eos_token_id", "pad_token_id", "bos_token_id", "unk_token_id"):
        if getattr(a, attr, None) != getattr(b, attr, None):
            return False
    backend_a, backend_b = getattr(a, "backend_tokenizer", None), getattr(b, "backend_tokenizer", None)
    if backend_a is None or backend_b is None:
        return False
    return backend_a.to_str() == backend_b.to_str()


def data_fingerprint(dataset) -> str:
    """sha256 of the training ids and labels: a resumed run refuses data that changed."""
    digest = hashlib.sha256()
    for batch in dataset.select_columns(["input_ids", "labels"]).iter(batch_size=1000):
        digest.update(json.dumps(batch["input_ids"], separators=(",", ":")).encode())
        digest.update(json.dumps(batch["labels"], separators=(",", ":")).encode())
    return digest.hexdigest()


# --------------------------------------------------------------------------- printing


def print_findings(report: Report, out) -> None:
    """Warnings and notes on ``out`` (a Rich console); errors are the caller's (they stop the run)."""
    for finding in report.warnings:
        colour = "yellow" if finding.level == WARNING else "cyan"
        out.print(f"[{colour}]{finding.level}:[/] ", end="", soft_wrap=True)
        out.print(str(finding), markup=False, highlight=False, soft_wrap=True)  # one line, never wrapped
