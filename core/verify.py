"""Checking an exported artefact against the trained model, in the runtime that will load it.

The reference is the trained model as training left it: the base model with the run's adapter
loaded through peft, unmerged, in float32 (bfloat16 when float32 would not fit); for merged-4bit
of a run trained in 4-bit, the NF4 base it trained on (see the end of this docstring). A few prompts are
rendered with the run's template; for each, the artefact's runtime tokenizes the text (the token
ids must be identical to the run's tokenizer's) and returns the logits at every position. The report
gives the share of positions whose arg max agrees with the reference (top-1), the share whose arg
max is among the reference's five best tokens (top-5), and the largest absolute logit difference.

Thresholds are per format and quantization (:data:`THRESHOLDS`): lossless formats (f32, f16, the
LoRA itself) must agree on top-1 at 99% or more; bf16 and the quantized formats get looser top-1
bounds and are held mainly to top-5. The reason is the test models: a random-weight model's logits
are nearly flat (the best two of 150,000 tokens often differ by 0.01), so rounding well inside a
format's error budget flips the arg max without changing what the model ranks as plausible; a real
model's logits are peaked. Every bound is set below what was measured on the random tiny Qwen2
(2 layers, hidden 256) and SmolLM2-135M-Instruct (with a small random LoRA), top-1 / top-5:

    format             tiny random    SmolLM2-135M
    merged-16bit bf16  0.95 / 1.00    1.00 / 1.00
    merged-4bit (NF4)  0.48 / 0.94    0.74 / 0.97
    gguf f16           1.00 / 1.00    1.00 / 1.00
    gguf bf16          0.94 / 1.00    1.00 / 1.00
    gguf q8_0          0.93 / 1.00    0.99 / 1.00
    gguf q6_k          0.84 / 1.00    0.92 / 1.00
    gguf q5_k_m        0.83 / 1.00    0.85 / 1.00
    gguf q4_k_m        0.61 / 0.99    0.79-0.82 / 1.00
    gguf q4_0          0.50 / 0.91    0.69 / 0.96
    gguf q3_k_m        0.63 / 0.92    0.88 / 1.00
    gguf q2_k          0.26 / 0.52    0.71 / 0.92

merged-4bit of a run trained in 4-bit (QLoRA) is held to what that run trained: the NF4 base with
the adapter on top (:func:`training_quantization`), not the float32 base. Quantizing the merged
weights re-rounds only where the adapter moved a weight across an NF4 bin, so the export stays close
to that model, while the float32 model differs from both by the base's whole NF4 error. Measured
on CPU (bitsandbytes 0.50.2, compute bfloat16) on the three probe prompts, top-1 / top-5 of
merged-4bit against each reference, and of the NF4 base *without* the adapter (what a merge that
lost the adapter would score):

    run (adapter)                              vs NF4+adapter  vs fp32+adapter  no adapter
    tiny Qwen2, QLoRA 30 steps lr 2e-3         0.97 / 1.00     0.96 / 1.00      0.07 / 0.17
    SmolLM2-135M, QLoRA 30 steps lr 1e-3       0.90 / 0.99     0.84 / 0.96      0.52 / 0.69
    SmolLM2-135M, random lora_B (std 0.001)    0.93 / 1.00     0.69 / 0.95      0.99 / 1.00
    random Qwen2.5-0.5B shape, QLoRA 8 steps   0.94 / 1.00     0.59 / 0.98      0.00 / 0.02
    tiny Qwen2, random lora_B (std 0.05)       0.50 / 0.84     0.63 / 0.88      0.10 / 0.16

The bound (0.75 / 0.95, ``merged-4bit/nf4-base``) passes every trained adapter and fails the
no-adapter rows of trained runs. The last row is an outlier by construction: an unstructured
random update about half the size of the weights themselves moves most weights into another NF4
bin, so the two roundings no longer cancel; trained adapters are small and aligned with the data. Merging into the dequantized NF4 base instead (then quantizing again) scored like the
no-adapter rows (SmolLM2 0.55 / 0.69, Qwen2.5-0.5B shape 0.00 / 0.02): re-quantizing snaps the
small updates back onto the base's grid, which is why merged-4bit merges into the original weights.
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

#: (minimum top-1 agreement, minimum top-5 agreement) per format, and per "format:quant"
THRESHOLDS: dict[str, tuple[float, float]] = {
    "lora": (0.99, 0.99),
    "merged-16bit:fp32": (0.99, 0.99),
    "merged-16bit:fp16": (0.97, 0.99),
    # bf16 keeps 8 mantissa bits: on flat random logits ~5% of arg maxes flip
    "merged-16bit:bf16": (0.9, 0.99),
    # vs the float32 base + adapter (a run not trained in 4-bit): NF4 (blocks of 64, one absmax
    # each) is coarser than q4_k_m, which keeps some tensors in q6_k
    "merged-4bit": (0.4, 0.9),
    # vs the NF4 base + adapter a QLoRA run trained (see the table above)
    "merged-4bit/nf4-base": (0.75, 0.95),
    "gguf:f32": (0.99, 0.99),
    "gguf:f16": (0.99, 0.99),
    "gguf:bf16": (0.9, 0.99),
    "gguf:q8_0": (0.85, 0.98),
    "gguf:q6_k": (0.75, 0.95),
    "gguf:q5_k_m": (0.7, 0.95),
    "gguf:q5_k_s": (0.7, 0.95),
    "gguf:q4_k_m": (0.5, 0.9),
    "gguf:q4_k_s": (0.5, 0.9),
    "gguf:q4_0": (0.45, 0.85),
    "gguf:q3_k_m": (0.35, 0.75),
    "gguf:q2_k": (0.2, 0.5),
}

# Instructions the check prompts are built from (plain text, one with digits and non-ASCII).
PROBE_TEXTS = (
    "Give three tips for staying healthy.",
    "What is the capital of France? Answer in one word.",
    "Übersetze 'good morning' ins Deutsche: 12 + 30 = ?",
)


def thresholds_for(fmt: str, quant: str | None, reference: str | None = None) -> tuple[float, float] | None:
    """The bounds for ``fmt``/``quant``; ``reference`` ("nf4-base") picks the ones measured against a
    4-bit reference first (``THRESHOLDS["merged-4bit/nf4-base"]``)."""
    keys = ([f"{fmt}:{quant}/{reference}", f"{fmt}/{reference}"] if reference else []) + [f"{fmt}:{quant}", fmt]
    return next((THRESHOLDS[key] for key in keys if key in THRESHOLDS), None)


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
        from .merge import nf4_config

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
    _free_memory()
    reference = Reference(prompts, token_ids, logits, description, tokenizer)
    _reference_cache.clear()
    _reference_cache[key] = reference
    return reference


def disable_bnb_cpu_repacking(model) -> None:
    """Keep bitsandbytes' Linear4bit on its plain dequantize-and-matmul path on the CPU.

    On a CPU with AVX512-BF16, bitsandbytes 0.50 repacks a 4-bit weight in place for its own
    kernel at the first eval-mode forward (a later training step then fails). Reference and
    candidate are both run this way, so a comparison sees the weights, not two kernels (the two
    paths agreed on top-1 at only 96-100% of positions on the models measured). No effect on CUDA."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def training_quantization(run: FinishedRun) -> dict[str, Any] | None:
    """How the run's base was quantized for training, when it was trained in 4-bit (QLoRA), else None.

    Returns ``{"quant_type": "nf4", "double_quant": True, "compute_dtype": "bfloat16"}``-style
    settings (those of :func:`qtune.merge.nf4_config`). The run's ``summary.json`` decides when it
    records it (``"quantization"``: such a mapping, or null for plain weights; see
    :func:`describe_quantization`). Without that record: ``model.load_in_4bit`` false means plain
    weights; a base checkpoint that is already bitsandbytes-quantized is loaded as stored by the
    plain reference anyway (None here); otherwise the built-in backends quantize only on CUDA, so
    a run whose memory report says it trained on the CPU had plain weights, one on a GPU had 4-bit,
    and with no such report the run counts as trained where it is exported (CUDA here: 4-bit).
    """
    summary = run.summary()
    if "quantization" in summary:
        recorded = summary["quantization"]
        if not recorded:
            return None
        return {"quant_type": str(recorded.get("quant_type", "nf4")), "double_quant": bool(recorded.get("double_quant", True)),
                "compute_dtype": str(recorded.get("compute_dtype", "bfloat16")).replace("torch.", "")}
    model = run.config.model
    if not model.load_in_4bit or _prequantized(run.model_path()):
        return None
    device = (summary.get("memory") or {}).get("device")
    if device is None:
        import torch

        on_gpu = torch.cuda.is_available()
        bf16 = on_gpu and torch.cuda.is_bf16_supported()
    else:
        on_gpu = device != "cpu"
        bf16 = True  # a GPU named in the report: assume bf16 support (Ampere and later)
    if not on_gpu:
        return None
    compute = model.dtype if model.dtype != "auto" else ("bfloat16" if bf16 else "float16")
    return {"quant_type": "nf4", "double_quant": True, "compute_dtype": compute}


def describe_quantization(model) -> dict[str, Any] | None:
    """What :func:`training_quantization` reads from summary.json["quantization"], taken from a loaded
    (peft or plain) model: None for plain weights, else its bitsandbytes 4-bit settings."""
    config = getattr(getattr(model, "config", None), "quantization_config", None)
    if not getattr(model, "is_loaded_in_4bit", False) or config is None:
        return None
    get = config.get if isinstance(config, dict) else lambda key, default=None: getattr(config, key, default)
    compute = get("bnb_4bit_compute_dtype", "float32")
    return {"quant_type": get("bnb_4bit_quant_type", "nf4"), "double_quant": bool(get("bnb_4bit_use_double_quant", False)),
            "compute_dtype": str(compute).replace("torch.", "")}


def _prequantized(model_path: str | Path) -> bool:
    import json

    config_file = Path(model_path) / "config.json"
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return bool((config.get("quantization_config") or {}).get("load_in_4bit"))


def hf_logits(model, token_ids: Sequence[Sequence[int]]) -> list[Any]:
    import torch

    device = next(model.parameters()).device
    out = []
    with torch.inference_mode():
        for ids in token_ids:
            logits = model(torch.tensor([list(ids)], device=device)).logits[0]
            out.append(logits.float().cpu().numpy())
    return out


def _free_memory() -> None:
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
    checks: Callable[[Reference], Mapping[str, bool]] | None = None,
    count: int = 3,
    quantization: Mapping[str, Any] | None = None,
) -> VerifyReport:
    """Compare ``candidate(prompts) -> (token ids, logits)`` with the trained model on the probe prompts.

    ``quantization`` (:func:`training_quantization`) makes the reference the 4-bit base + adapter
    the run trained, with the bounds measured against it (``THRESHOLDS[fmt + "/nf4-base"]``).
    """
    started = time.perf_counter()
    reference = reference_outputs(run, count, quantization)
    ids, logits = candidate(reference.prompts)
    minimums = thresholds_for(fmt, quant, "nf4-base" if quantization else None)
    report = VerifyReport(fmt, quant, runtime, reference.description,
                          min_top1=minimums[0] if minimums else None, min_top5=minimums[1] if minimums else None)
    for ref_ids, ref_logits, got_ids, got_logits in zip(reference.token_ids, reference.logits, ids, logits, strict=True):
        report.prompts.append(compare(ref_ids, ref_logits, got_ids, got_logits))
    if checks is not None:
        report.checks.update(checks(reference))
    report.seconds = time.perf_counter() - started
    return report


def verify_hf_model(run: FinishedRun, fmt: str, quant: str | None, load: Callable[[], tuple[Any, Any]],
                    runtime: str = "transformers", quantization: Mapping[str, Any] | None = None) -> VerifyReport:
    """Verify an artefact transformers loads: ``load() -> (model, tokenizer)``."""

    def candidate(prompts: list[str]):
        model, tokenizer = load()
        model.eval()
        ids = [tokenizer(p)["input_ids"] for p in prompts]
        logits = hf_logits(model, ids)
        del model
        _free_memory()
        return ids, logits

    return verify_with(run, fmt, quant, runtime, candidate, quantization=quantization)
