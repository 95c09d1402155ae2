"""The merged model every full-weight export starts from: the run's base with its LoRA adapter added in.

Memory: the base model is loaded once in the target dtype (a pre-quantized bitsandbytes base is
dequantized first, which is what QLoRA trained against), the adapter is loaded on top through peft,
and ``merge_and_unload`` adds each ``B @ A * scale`` into its weight in place. ``save_pretrained``
then writes the state dict shard by shard; a shard's tensors are the model's own storage, so the
peak is the model plus the one shard being serialised. Nothing in float32 is materialised unless
``dtype`` is float32.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import QtuneError
from .quantization import torch_dtype

if TYPE_CHECKING:  # pragma: no cover
    from .run import FinishedRun

DEFAULT_SHARD_SIZE = "5GB"


def load_merged(run: FinishedRun, dtype: str = "bfloat16", device: str | None = None) -> tuple[Any, Any]:
    """The base model in ``dtype`` with the run's adapter merged in, and the run's tokenizer."""
    import torch  # noqa: F401  (fail early with torch's own message if it is missing)
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .verify import export_device

    device = device or export_device()
    remote = run.config.model.trust_remote_code
    tokenizer = AutoTokenizer.from_pretrained(run.adapter_dir, trust_remote_code=remote)
    base = AutoModelForCausalLM.from_pretrained(
        run.model_path(), dtype=torch_dtype(dtype), device_map={"": device}, trust_remote_code=remote
    )
    if getattr(base, "is_quantized", False):
        base = dequantized(base, torch_dtype(dtype))
    if base.get_input_embeddings().weight.shape[0] < len(tokenizer):
        raise QtuneError(
            f"the run's tokenizer has {len(tokenizer)} tokens but the base model's embeddings only "
            f"{base.get_input_embeddings().weight.shape[0]}; the adapter was trained on another model than {run.config.model.name!r}"
        )
    model = PeftModel.from_pretrained(base, run.adapter_dir)
    merged = model.merge_and_unload()
    merged.eval()
    return merged, tokenizer


def dequantized(model, dtype):
    """A pre-quantized (bitsandbytes) base as plain ``dtype`` weights.

    QLoRA trains the adapter against exactly these dequantized weights, so merging into them is
    faithful to the trained model (Unsloth's -bnb-4bit checkpoints are a common base).
    """
    import torch

    for module in model.modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is not None and hasattr(state, "dtype"):
            state.dtype = torch.float32  # dequantize exactly, then round once to ``dtype``
    model = model.dequantize(dtype=dtype).to(dtype)
    # The loading-time 4-bit conversions do not apply to the dequantized weights when saving.
    if hasattr(model, "_weight_conversions"):
        model._weight_conversions = []
    return model


def weights_bytes(model) -> int:
    seen: set[int] = set()
    total = 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.data_ptr() in seen:  # tied weights are saved once
            continue
        seen.add(tensor.data_ptr())
        total += tensor.numel() * tensor.element_size()
    return total


def prepare_tokenizer(tokenizer, template) -> dict[str, Any]:
    """Give the tokenizer the run template's chat template (what the model was trained on)."""
    chat_template = template.chat_template() if template is not None else None
    if chat_template:
        tokenizer.chat_template = chat_template
    return {"chat_template": "run template" if chat_template else ("tokenizer's own" if tokenizer.chat_template else None)}


def stop_token_ids(tokenizer, template) -> list[int]:
    """EOS plus every template stop string that is a single token (e.g. ``<|im_end|>``)."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for text in template.stop_strings() if template is not None else []:
        encoded = tokenizer.encode(text, add_special_tokens=False)
        if len(encoded) == 1 and encoded[0] not in ids:
            ids.append(encoded[0])
    return ids


def save_merged(model, tokenizer, dest: Path, template=None, max_shard_size: str | int = DEFAULT_SHARD_SIZE) -> None:
    """Write ``model`` and ``tokenizer`` into the existing folder ``dest`` in transformers' layout.

    config.json, model-0000x-of-0000y.safetensors + model.safetensors.index.json (model.safetensors
    when one shard holds everything), generation_config.json with EOS and the template's stop
    tokens, and the tokenizer files carrying the run template's chat template.
    """
    from transformers import GenerationConfig

    stops = stop_token_ids(tokenizer, template)
    generation = model.generation_config if getattr(model, "generation_config", None) is not None else GenerationConfig()
    if stops:
        generation.eos_token_id = stops[0] if len(stops) == 1 else stops
    if tokenizer.pad_token_id is not None:
        generation.pad_token_id = tokenizer.pad_token_id
    model.generation_config = generation
    if tokenizer.eos_token_id is not None:
        model.config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(dest, max_shard_size=max_shard_size, safe_serialization=True)
    prepare_tokenizer(tokenizer, template)
    tokenizer.save_pretrained(dest)
