"""How a run's base model is quantized: the QLoRA BitsAndBytesConfig, and the record of it.

The transformers backend loads a 4-bit base with :func:`nf4_config`; the pipeline records what the
base was trained as (:func:`describe_quantization`, ``summary.json["quantization"]``); exporters
rebuild that base with :func:`training_quantization` (a merged-4bit export is verified against the
NF4 base a QLoRA run trained on).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from .run import FinishedRun

#: short dtype names (exporters' quantization names) -> torch dtype names
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def torch_dtype(name: str):
    import torch

    return getattr(torch, DTYPES.get(name, name))


def nf4_config(compute_dtype, quant_type: str = "nf4", double_quant: bool = True):
    """The BitsAndBytesConfig of QLoRA: NF4, double quantization, ``compute_dtype`` (a torch dtype or
    its name). The transformers backend loads a 4-bit base with it, merged-4bit saves with it, and
    verification rebuilds the 4-bit base a run trained on with it (Unsloth quantizes the same way)."""
    from transformers import BitsAndBytesConfig

    if isinstance(compute_dtype, str):
        compute_dtype = torch_dtype(compute_dtype)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
    )


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
    settings (those of :func:`nf4_config`). The run's ``summary.json`` decides when it
    records it (``"quantization"``: such a mapping, or null for plain weights; see
    :func:`describe_quantization`). Without that record: ``model.load_in_4bit`` false means plain
    weights; a base checkpoint that is already bitsandbytes-quantized is loaded as stored by the
    plain reference anyway (None here); otherwise the built-in backends quantize only on CUDA, so
    a run whose summary records that it trained on the CPU (``"device"``) had plain weights, one on a
    GPU had 4-bit, and with no such record the run counts as trained where it is exported (CUDA
    here: 4-bit).
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
    device = summary.get("device")
    if device is None:
        import torch

        on_gpu = torch.cuda.is_available()
        bf16 = on_gpu and torch.cuda.is_bf16_supported()
    else:
        on_gpu = device != "cpu"
        bf16 = True  # a GPU named in the summary: assume bf16 support (Ampere and later)
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


