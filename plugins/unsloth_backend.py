"""The Unsloth backend: Unsloth's FastLanguageModel, exactly as the seed notebook calls it.

Importing this module is cheap: ``unsloth`` is imported inside :meth:`UnslothBackend.load`, and that
must happen before trl, transformers or peft are imported in the process, because ``import unsloth``
patches them (its fused kernels, padding-free batching and SFTTrainer changes apply only to modules
imported after it), and before torch allocates GPU memory (it turns on the allocator's expandable
segments first). The pipeline therefore loads the model before it imports trl, and
:meth:`UnslothBackend.unavailable_reason` looks for a GPU without importing torch.

Variable-length attention (``model.attention: varlen``, chosen by the fast profile): Unsloth 2026.10.9
already routes a packed batch through one ``varlen_attn`` call per layer (``_torch_varlen_packed`` in
``unsloth/utils/attention_dispatch.py``), but only on torch 2.12+, whose ``varlen_attn`` has
``enable_gqa``; on torch 2.10/2.11 it runs SDPA once per run of equal lengths (~38 calls per layer
on Alpaca rows). :func:`enable_unsloth_varlen` hands that dispatch :func:`qtune.api.varlen_attention`,
the same kernel with 2.12's signature, and changes nothing else. It checks the Unsloth version it
knows (:data:`KNOWN_UNSLOTH`) and leaves any other alone, with a one-line note.

On a machine without a CUDA GPU Unsloth falls back to plain transformers + peft + trl on the CPU
(slow, but the same calls); qtune only allows that when ``QTUNE_UNSLOTH_ALLOW_CPU=1`` (tests).
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import warnings
from pathlib import Path

from qtune.api import FUSED_KERNELS, Backend, cuda_device_count, hookimpl

from .varlen import model_varlen_reason, profile_varlen_reason, varlen_attention

ALLOW_CPU_ENV = "QTUNE_UNSLOTH_ALLOW_CPU"
#: the Unsloth release whose attention dispatch enable_unsloth_varlen knows
KNOWN_UNSLOTH = "2026.10.9"
VARLEN = "varlen (torch varlen_attn: one call per layer on packed batches, through Unsloth's attention dispatch)"
DEFAULT = "default (Unsloth's attention dispatch)"
#: modules that ``import unsloth`` patches; importing any of them first loses Unsloth's optimizations
PATCHED_MODULES = ("trl", "transformers", "peft")


def gradient_checkpointing_arg(value):
    """config.lora.gradient_checkpointing as get_peft_model takes it: "unsloth", True or False."""
    return "unsloth" if value == "unsloth" else bool(value)


def torch_dtype(name: str):
    """None lets Unsloth choose (bf16 where the GPU supports it, else fp16), as the notebook's dtype=None."""
    if name == "auto":
        return None
    import torch

    return getattr(torch, name)


def import_unsloth():
    """``import unsloth`` (first, see the module doc) and return its FastLanguageModel."""
    if "unsloth" not in sys.modules:
        early = [m for m in ("torch",) + PATCHED_MODULES if m in sys.modules]
        if early:
            warnings.warn(
                f"{', '.join(early)} was imported before unsloth; Unsloth's patches may not apply. "
                "Load the model through the backend before importing torch/trl/transformers/peft.",
                stacklevel=3,
            )
    import unsloth  # noqa: F401  (must precede trl/transformers/peft: it patches them)
    from unsloth import FastLanguageModel

    return FastLanguageModel


def enable_unsloth_varlen() -> str | None:
    """Let Unsloth's attention dispatch run packed batches with one varlen call per layer (module doc);
    None when it does, else why not (one clause). Process-wide: call it only for a run that wants it."""
    import unsloth

    version = getattr(unsloth, "__version__", "unknown")
    if version != KNOWN_UNSLOTH:
        return f"qtune's varlen patch knows Unsloth {KNOWN_UNSLOTH}, not {version}"
    try:
        from unsloth.utils import attention_dispatch as dispatch
    except ImportError as error:  # Unsloth's CPU fallback has no attention dispatch
        return f"Unsloth's attention dispatch did not import ({error})"
    if dispatch.HAS_FLASH_ATTENTION:
        return None  # flash-attn is installed: Unsloth's packed path is FlashAttention's varlen already
    if dispatch._TORCH_VARLEN_ATTN is None:  # torch 2.10/2.11: no enable_gqa, so Unsloth left it off
        dispatch._TORCH_VARLEN_ATTN = varlen_attention
        # read at call time by select_attention_backend: a working xformers no longer wins packed calls
        dispatch._NATIVE_BEATS_XFORMERS = dispatch._native_beats_xformers(dispatch._visible_capabilities(), True)
    return None


class UnslothBackend(Backend):
    name = "unsloth"
    description = "Unsloth's FastLanguageModel (fused kernels, 4-bit, padding-free); NVIDIA GPUs"
    patches_trainer = True
    auto_priority = 20  # preferred wherever it can run (a CUDA GPU)
    memory_traits = FUSED_KERNELS  # chunked fused loss, offloaded checkpointing

    def unavailable_reason(self, config):
        if importlib.util.find_spec("unsloth") is None:
            return "unsloth is not installed (pip install --no-deps unsloth==2026.10.9 unsloth_zoo==2026.10.9, as README's CUDA lines say)"
        if os.environ.get(ALLOW_CPU_ENV) == "1":
            return None
        if importlib.util.find_spec("torch") is None:
            return "torch is not installed"
        if cuda_device_count() == 0:
            return f"no CUDA GPU found (Unsloth trains on NVIDIA GPUs; {ALLOW_CPU_ENV}=1 forces its slow CPU fallback)"
        return None

    def varlen_reason(self, config, shape):
        return profile_varlen_reason(config, shape)

    def import_first(self) -> bool:
        """Import unsloth now, before anything imports torch/trl/transformers/peft (the pipeline calls
        this first when it wants to read the tokenizer before the model loads)."""
        import_unsloth()
        return True

    def _from_pretrained(self, config, model_name: str):
        FastLanguageModel = import_unsloth()
        return FastLanguageModel.from_pretrained(
            model_name=model_name,
            max_seq_length=config.model.max_seq_length,
            dtype=torch_dtype(config.model.dtype),
            load_in_4bit=config.model.load_in_4bit,
            use_gradient_checkpointing=gradient_checkpointing_arg(config.lora.gradient_checkpointing),
            **({"trust_remote_code": True} if config.model.trust_remote_code else {}),
        )

    def load(self, config, model_path):
        model, tokenizer = self._from_pretrained(config, model_path)
        self._attention = DEFAULT
        if config.model.attention == "varlen":
            why_not = model_varlen_reason(model.config, getattr(model, "dtype", None)) or enable_unsloth_varlen()
            self._attention = f"{DEFAULT}; varlen not used: {why_not}" if why_not else VARLEN
        return model, tokenizer

    def attention_in_use(self, model, config):
        return getattr(self, "_attention", None)

    def add_lora(self, model, config):
        FastLanguageModel = import_unsloth()
        lora = config.lora
        return FastLanguageModel.get_peft_model(
            model,
            r=lora.r,
            target_modules=list(lora.target_modules),
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            bias=lora.bias,
            use_gradient_checkpointing=gradient_checkpointing_arg(lora.gradient_checkpointing),
            random_state=config.training.seed,  # seeds the LoRA weights' initialisation
            use_rslora=lora.use_rslora,
            loftq_config=None,
        )

    def load_trained(self, config, model_path, adapter_dir: Path):
        adapter_dir = Path(adapter_dir)
        base = _adapter_base(adapter_dir)
        if base is not None and base == model_path:
            # Unsloth's own path: from_pretrained on an adapter folder loads its base, then the adapter.
            return self._from_pretrained(config, str(adapter_dir))
        # The adapter names another path for its base (the base moved, or a catalogue name resolved
        # elsewhere): load the base given here and put the adapter on it.
        model, tokenizer = self.load(config, model_path)
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir))
        if (adapter_dir / "tokenizer_config.json").is_file():
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(adapter_dir))
        return model, tokenizer

    def for_inference(self, model):
        FastLanguageModel = import_unsloth()
        FastLanguageModel.for_inference(model)
        return model


def _adapter_base(adapter_dir: Path) -> str | None:
    try:
        data = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data.get("base_model_name_or_path")


@hookimpl
def register_backends(register):
    register(UnslothBackend())
