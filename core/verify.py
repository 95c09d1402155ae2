"""Comparison primitives for exporters: check an artefact against the trained model in its runtime.

The reference is the trained model as training left it: the base model with the run's adapter
loaded through peft, unmerged, in float32 (bfloat16 when float32 would not fit), or quantized on
load exactly as a QLoRA run trained (``quantization``, see :func:`qtune.quantization.training_quantization`).
A few prompts are rendered with the run's template; for each, the artefact's runtime tokenizes the
text (the token ids must be identical to the run's tokenizer's) and returns the logits at every
position. The report gives the share of positions whose arg max agrees with the reference (top-1),
the share whose arg max is among the reference's five best tokens (top-5), and the largest absolute
logit difference. Each exporter passes its own bounds (``bounds=(min_top1, min_top5)``), measured for
its formats and documented beside them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import QtuneError

if TYPE_CHECKING:  # pragma: no cover
    from .run import FinishedRun

# Instructions the check prompts are built from (plain text, one with digits and non-ASCII).
PROBE_TEXTS = (
    "Give three tips for staying healthy.",
    "What is the capital of France? Answer in one word.",
    "Übersetze 'good morning' ins Deutsche: 12 + 30 = ?",
)


@dataclass
class PromptResult:
    tokens: int
    tokenization_identical: bool
    top1: float
    top5: float
    max_abs_logit_diff: float


@dataclass
class VerifyReport:
    """What ``--verify`` measured for one artefact. ``passed`` is False when any bound or check fails."""

    format: str
    quant: str | None
    runtime: str
    reference: str
    prompts: list[PromptResult] = field(default_factory=list)
    #: named yes/no checks besides the logits (EOS id, chat template, ...)
    checks: dict[str, bool] = field(default_factory=dict)
    min_top1: float | None = None
    min_top5: float | None = None
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def tokenization_identical(self) -> bool:
        return all(p.tokenization_identical for p in self.prompts)

    @property
    def tokens(self) -> int:
        return sum(p.tokens for p in self.prompts)

    def _mean(self, attr: str) -> float:
        compared = [p for p in self.prompts if p.tokenization_identical]
        total = sum(p.tokens for p in compared)
        return sum(getattr(p, attr) * p.tokens for p in compared) / total if total else 0.0

    @property
    def top1(self) -> float:
        return self._mean("top1")

    @property
    def top5(self) -> float:
        return self._mean("top5")

    @property
    def max_abs_logit_diff(self) -> float:
        compared = [p.max_abs_logit_diff for p in self.prompts if p.tokenization_identical]
        return max(compared) if compared else float("nan")

    def failures(self) -> list[str]:
        problems = []
        if not self.prompts:
            problems.append("no prompt was compared")
        if not self.tokenization_identical:
            bad = sum(not p.tokenization_identical for p in self.prompts)
            problems.append(f"tokenization differs from the run's tokenizer on {bad} of {len(self.prompts)} prompts")
        if self.min_top1 is not None and self.top1 < self.min_top1:
            problems.append(f"top-1 agreement {self.top1:.3f} < {self.min_top1}")
        if self.min_top5 is not None and self.top5 < self.min_top5:
            problems.append(f"top-5 agreement {self.top5:.3f} < {self.min_top5}")
        problems += [f"check failed: {name}" for name, ok in self.checks.items() if not ok]
        return problems

    @property
    def passed(self) -> bool:
        return not self.failures()

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "quant": self.quant,
            "runtime": self.runtime,
            "reference": self.reference,
            "passed": self.passed,
            "failures": self.failures(),
            "tokenization_identical": self.tokenization_identical,
            "top1_agreement": round(self.top1, 4),
            "top5_agreement": round(self.top5, 4),
            "max_abs_logit_diff": round(float(self.max_abs_logit_diff), 6),
            "tokens": self.tokens,
            "min_top1": self.min_top1,
            "min_top5": self.min_top5,
            "checks": dict(self.checks),
            "prompts": [asdict(p) for p in self.prompts],
            "seconds": round(self.seconds, 2),
            "notes": list(self.notes),
        }

    def table(self):
        """A Rich table: one row per prompt, a total row, then the extra checks."""
        from rich.table import Table

        title = f"verify {self.format}{'-' + self.quant if self.quant else ''} in {self.runtime} vs {self.reference}"
        table = Table(title=title, title_justify="left")
        for column in ("prompt", "tokens", "same tokens", "top-1", "top-5", "max |Δlogit|"):
            table.add_column(column, justify="right" if column != "prompt" else "left")
        for index, p in enumerate(self.prompts, 1):
            table.add_row(str(index), str(p.tokens), _yes(p.tokenization_identical), f"{p.top1:.3f}", f"{p.top5:.3f}",
                          f"{p.max_abs_logit_diff:.2e}")
        need = lambda v: f" (≥{v})" if v is not None else ""  # noqa: E731
        table.add_row("all", str(self.tokens), _yes(self.tokenization_identical), f"{self.top1:.3f}{need(self.min_top1)}",
                      f"{self.top5:.3f}{need(self.min_top5)}", f"{self.max_abs_logit_diff:.2e}", style="bold")
        lines = [f"{name}: {_yes(ok)}" for name, ok in self.checks.items()]
        lines.append("[green]passed[/]" if self.passed else "[red]FAILED[/]: " + "; ".join(self.failures()))
        table.caption = "\n".join(lines)
        table.caption_justify = "left"
        return table

    def raise_if_failed(self, where: Path | str) -> None:
        if not self.passed:
            label = f"{self.format}{'-' + self.quant if self.quant else ''}"
            raise QtuneError(
                f"verification of the {label} export failed ({'; '.join(self.failures())}); the files are in "
                f"{str(where)!r}: inspect them, try a less lossy --quant, or export with --no-verify to keep them anyway"
            )


def _yes(value: bool) -> str:
    return "[green]yes[/]" if value else "[red]no[/]"


# --------------------------------------------------------------------------- prompts and reference


def probe_prompts(template, count: int = 3) -> list[str]:
    """``count`` prompts rendered with the run's template (every field filled, optional ones empty)."""
    prompts = []
    for text in PROBE_TEXTS[:count]:
        example: dict[str, Any] = {name: "" for name in template.optional_fields}
        example.update({name: text for name in template.fields})
        prompts.append(template.render_prompt(example))
    return prompts


def export_device() -> str:
    """Where exports load models: QTUNE_EXPORT_DEVICE, else the first CUDA GPU, else the CPU."""
    import os

    import torch

    wanted = os.environ.get("QTUNE_EXPORT_DEVICE")
    if wanted:
        return wanted
    return "cuda" if torch.cuda.is_available() else "cpu"


def reference_dtype(model_path: str, device: str):
    """float32 when it fits comfortably in the device's memory, else bfloat16."""
    import torch

    params = count_parameters(model_path)
    if params is None:
        return torch.float32 if device == "cpu" else torch.bfloat16
    if device.startswith("cuda"):
        total = torch.cuda.get_device_properties(torch.device(device)).total_memory
    else:
        import os

        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return torch.float32 if params * 4 < 0.4 * total else torch.bfloat16


def count_parameters(model_path: str | Path) -> int | None:
    """The number of weights in a local safetensors checkpoint, read from the file headers only."""
    import json
    import struct

    folder = Path(model_path)
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    if not files:
        return None
    total = 0
    for path in files:
        with open(path, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
        for name, info in header.items():
            if name == "__metadata__":
                continue
            count = 1
            for dim in info["shape"]:
                count *= dim
            total += count
    return total


@dataclass
class Reference:
    """The trained model's token ids and logits for each probe prompt."""

    prompts: list[str]
    token_ids: list[list[int]]
    logits: list[Any]  # numpy float32 arrays, tokens x vocab
    description: str
    tokenizer: Any


_reference_cache: dict[tuple, Reference] = {}


def reference_outputs(run: FinishedRun, count: int = 3, quantization: Mapping[str, Any] | None = None) -> Reference:
    """Run the trained model (base + adapter through peft, unmerged) on the probe prompts.

    The base is loaded in float32 (bfloat16 when that would not fit), or, with ``quantization``
    (:func:`training_quantization`), quantized on load exactly as QLoRA training loaded it. Cached
    per run directory, adapter file time and quantization within a process, so verifying several
    formats of one run computes each reference once.
    """
    adapter_file = next(iter(sorted(run.adapter_dir.glob("adapter_model.*"))), run.adapter_dir / "adapter_config.json")
    frozen = tuple(sorted(quantization.items())) if quantization else None
    key = (str(run.run_dir.resolve()), adapter_file.stat().st_mtime_ns, count, frozen)
    if key in _reference_cache:
        return _reference_cache[key]
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_path = run.model_path()
    device = export_device()
    remote = run.config.model.trust_remote_code
    tokenizer = AutoTokenizer.from_pretrained(run.adapter_dir, trust_remote_code=remote)
    if quantization:
        from .quantization import disable_bnb_cpu_repacking, nf4_config

        compute, kind, double = quantization["compute_dtype"], quantization["quant_type"], quantization["double_quant"]
        base = AutoModelForCausalLM.from_pretrained(
            model_path, dtype=compute, quantization_config=nf4_config(compute, kind, double), device_map={"": device},
            trust_remote_code=remote,
        )
        disable_bnb_cpu_repacking(base)
        description = f"peft over the {kind.upper()} base ({'double quant, ' if double else ''}compute {compute})"
    else:
        dtype = reference_dtype(model_path, device)
        base = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, device_map={"": device}, trust_remote_code=remote)
        if getattr(base, "is_quantized", False):
            # a pre-quantized base: its 4-bit layers compute in the reference dtype, not the checkpoint's
            for module in base.modules():
                if hasattr(module, "compute_dtype"):
                    module.compute_dtype = dtype
        description = f"peft {str(dtype).replace('torch.', '')}"
    model = PeftModel.from_pretrained(base, run.adapter_dir).eval()
    prompts = probe_prompts(run.template, count)
    token_ids = [tokenizer(p)["input_ids"] for p in prompts]
    logits = hf_logits(model, token_ids)
    del model, base
    free_memory()
    reference = Reference(prompts, token_ids, logits, description, tokenizer)
    _reference_cache.clear()
    _reference_cache[key] = reference
    return reference


def hf_logits(model, token_ids: Sequence[Sequence[int]]) -> list[Any]:
    import torch

    device = next(model.parameters()).device
    out = []
    with torch.inference_mode():
        for ids in token_ids:
            logits = model(torch.tensor([list(ids)], device=device)).logits[0]
            out.append(logits.float().cpu().numpy())
    return out


def free_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------- comparison


def compare(reference_ids: Sequence[int], reference_logits, ids: Sequence[int], logits) -> PromptResult:
    """Top-1 / top-5 agreement and max |Δlogit| of one prompt (vocabularies cut to the shorter)."""
    import numpy as np

    same = list(ids) == list(reference_ids)
    if not same:
        return PromptResult(len(ids), False, 0.0, 0.0, float("nan"))
    n = min(reference_logits.shape[-1], logits.shape[-1])
    ref = np.asarray(reference_logits[:, :n], dtype=np.float32)
    got = np.asarray(logits[: len(ids), :n], dtype=np.float32)
    ref_top1 = ref.argmax(-1)
    got_top1 = got.argmax(-1)
    top5 = np.argpartition(-ref, 5, axis=-1)[:, :5]
    in_top5 = (top5 == got_top1[:, None]).any(-1)
    return PromptResult(
        tokens=len(ids),
        tokenization_identical=True,
        top1=float((ref_top1 == got_top1).mean()),
        top5=float(in_top5.mean()),
        max_abs_logit_diff=float(np.abs(ref - got).max()),
    )


def verify_with(
    run: FinishedRun,
    fmt: str,
    quant: str | None,
    runtime: str,
    candidate: Callable[[list[str]], tuple[list[list[int]], list[Any]]],
    bounds: tuple[float, float] | None = None,
    checks: Callable[[Reference], Mapping[str, bool]] | None = None,
    count: int = 3,
    quantization: Mapping[str, Any] | None = None,
) -> VerifyReport:
    """Compare ``candidate(prompts) -> (token ids, logits)`` with the trained model on the probe prompts.

    ``bounds`` is ``(min_top1, min_top5)``: the report fails below either (None: no bound).
    ``checks(reference) -> {name: ok}`` adds yes/no checks (EOS id, chat template, ...).
    ``quantization`` (:func:`qtune.quantization.training_quantization`) makes the reference the
    4-bit base + adapter the run trained.
    """
    started = time.perf_counter()
    reference = reference_outputs(run, count, quantization)
    ids, logits = candidate(reference.prompts)
    report = VerifyReport(fmt, quant, runtime, reference.description,
                          min_top1=bounds[0] if bounds else None, min_top5=bounds[1] if bounds else None)
    for ref_ids, ref_logits, got_ids, got_logits in zip(reference.token_ids, reference.logits, ids, logits, strict=True):
        report.prompts.append(compare(ref_ids, ref_logits, got_ids, got_logits))
    if checks is not None:
        report.checks.update(checks(reference))
    report.seconds = time.perf_counter() - started
    return report


def verify_hf_model(run: FinishedRun, fmt: str, quant: str | None, load: Callable[[], tuple[Any, Any]],
                    bounds: tuple[float, float] | None = None, runtime: str = "transformers",
                    quantization: Mapping[str, Any] | None = None) -> VerifyReport:
    """Verify an artefact transformers loads: ``load() -> (model, tokenizer)``; see :func:`verify_with`."""

    def candidate(prompts: list[str]):
        model, tokenizer = load()
        model.eval()
        ids = [tokenizer(p)["input_ids"] for p in prompts]
        logits = hf_logits(model, ids)
        del model
        free_memory()
        return ids, logits

    return verify_with(run, fmt, quant, runtime, candidate, bounds, quantization=quantization)
