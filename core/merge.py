"""Merging a run's LoRA adapter into its base model and saving the result for transformers / vLLM.

Memory: the base model is loaded once in the target 16-bit dtype (a pre-quantized bitsandbytes
base is dequantized first, which is what QLoRA trained against), the adapter is loaded
on top through peft, and ``merge_and_unload`` adds each ``B @ A * scale`` into its weight in place.
``save_pretrained`` then writes the state dict shard by shard; a shard's tensors are the model's
own storage, so the peak is the 16-bit model plus the one shard being serialised. Nothing in
float32 is materialised unless ``dtype`` is float32.

Disk: the free space is checked (weights' size plus 5%) before anything is written, and every
folder is written through :func:`qtune.fsutil.atomic_dir`.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import QtuneError
from .fsutil import atomic_dir, check_free_space

if TYPE_CHECKING:  # pragma: no cover
    from .run import FinishedRun

#: merged-16bit quantization names -> torch dtype names
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
DTYPE_ALIASES = {"bfloat16": "bf16", "float16": "fp16", "f16": "fp16", "half": "fp16", "float32": "fp32", "f32": "fp32"}
DEFAULT_SHARD_SIZE = "5GB"
BYTES_PER_WEIGHT = {"bfloat16": 2, "float16": 2, "float32": 4}


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


def parse_size(value: str | int) -> int:
    """'5GB', '500MB', '2GiB' or a number of bytes."""
    if isinstance(value, int):
        return value
    text = str(value).strip().upper().replace(" ", "")
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
    number, factor = text, 1
    for unit, scale in units.items():
        if text.endswith(unit):
            number, factor = text[: -len(unit)], scale
            break
    try:
        size = int(float(number) * factor)
    except ValueError:
        raise QtuneError(f"max shard size {value!r} is not a size; write it like 5GB, 500MB or 2GiB") from None
    if size <= 0:
        raise QtuneError(f"max shard size {value!r} must be positive")
    return size


def write_merged_16bit(run: FinishedRun, dest: Path, quant: str = "bf16",
                       max_shard_size: str | int | None = None, device: str | None = None) -> list[Path]:
    """Merge and save ``run`` into ``dest`` (created atomically) in ``quant`` (bf16, fp16 or fp32)."""
    shard = parse_size(max_shard_size or DEFAULT_SHARD_SIZE)
    model, tokenizer = load_merged(run, DTYPES[quant], device)
    needed = int(weights_bytes(model) * 1.05) + _folder_bytes(run.adapter_dir)
    check_free_space(Path(dest).parent, needed, f"the merged {quant} model")
    with atomic_dir(dest) as tmp:
        save_merged(model, tokenizer, tmp, run.template, shard)
    del model
    _free()
    return sorted(p for p in Path(dest).rglob("*") if p.is_file())


def write_merged_4bit(run: FinishedRun, dest: Path, compute_dtype: str = "bfloat16", device: str | None = None) -> list[Path]:
    """Merge in 16-bit, then quantize to bitsandbytes NF4 (double quantization) and save.

    bitsandbytes quantizes while transformers loads a checkpoint, so the merged 16-bit model is
    written to a temporary folder beside ``dest`` first (it needs that much extra disk for a while)
    and loaded back with a ``BitsAndBytesConfig``; the 16-bit model is freed before that load.
    """
    from transformers import AutoModelForCausalLM

    from .verify import export_device

    device = device or export_device()
    model, tokenizer = load_merged(run, compute_dtype, device)
    size16 = weights_bytes(model)
    dest = Path(dest)
    check_free_space(dest.parent, int(size16 * 1.05 + size16 * 0.4), "the merged model and its 4-bit copy")
    dest.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{dest.name}.merging-", dir=dest.parent))
    try:
        save_merged(model, tokenizer, work, run.template)
        del model
        _free()
        quantized = AutoModelForCausalLM.from_pretrained(
            work, quantization_config=nf4_config(compute_dtype), dtype=torch_dtype(compute_dtype), device_map={"": device},
            trust_remote_code=run.config.model.trust_remote_code,
        )
        with atomic_dir(dest) as tmp:
            quantized.save_pretrained(tmp, safe_serialization=True)
            for name in _tokenizer_and_generation_files(work):
                shutil.copy2(work / name, tmp / name)
        del quantized
        _free()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return sorted(p for p in dest.rglob("*") if p.is_file())


def _tokenizer_and_generation_files(folder: Path) -> list[str]:
    weights = {"config.json", "model.safetensors.index.json"}
    return sorted(p.name for p in folder.iterdir() if p.is_file() and p.suffix != ".safetensors" and p.name not in weights)


def copy_adapter(run: FinishedRun, dest: Path) -> list[Path]:
    """The run's adapter in peft's format, its tokenizer carrying the run template's chat template."""
    from transformers import AutoTokenizer

    source = run.adapter_dir
    check_free_space(Path(dest).parent, int(_folder_bytes(source) * 1.05) + 2**20, "the LoRA adapter")
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=run.config.model.trust_remote_code)
    with atomic_dir(dest) as tmp:
        for path in sorted(source.iterdir()):
            if path.is_file():
                shutil.copy2(path, tmp / path.name)
        prepare_tokenizer(tokenizer, run.template)
        tokenizer.save_pretrained(tmp)
        config_file = tmp / "adapter_config.json"
        config = json.loads(config_file.read_text(encoding="utf-8"))
        if not config.get("base_model_name_or_path"):
            config["base_model_name_or_path"] = run.config.model.name
            config_file.write_text(json.dumps(config, indent=2), encoding="utf-8")
    return sorted(p for p in Path(dest).rglob("*") if p.is_file())


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def _free() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
