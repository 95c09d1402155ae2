"""The model catalogue: short names for the models the seed notebook lists
(the offline demo model is registered by :mod:`qtune.plugins.demo_model`).

Hub ids are Unsloth's 16-bit uploads (``unsloth/Qwen2.5-7B``), as the notebook writes them, not the
``-bnb-4bit`` pre-quantized ones: with ``load_in_4bit: true`` Unsloth itself swaps in its
pre-quantized upload (``unsloth/Qwen2.5-7B`` -> ``unsloth/Qwen2.5-7B-unsloth-bnb-4bit``, a 5 GB
download instead of 15 GB), while the same name still loads in 16 bit with ``load_in_4bit: false``
and under the transformers backend, which quantizes on load. Where Unsloth publishes only a 4-bit
upload (Llama-3.1-405B) the catalogue names that one.

``memory_4bit_gib`` is computed, not typed in: :func:`qtune.profiles.seed_memory_gib` applied to each
model's shape (QLoRA r16 on the 7 projections, 2 x 2048-token micro-batches, Unsloth's offloaded
gradient checkpointing). ``params_b`` is counted from the same shape.
"""

from __future__ import annotations

from qtune.api import ModelEntry, ModelShape, hookimpl, seed_memory_gib

# Shapes from each model's config.json (vocab, hidden, layers, intermediate, heads, kv heads,
# head_dim when it is not hidden / heads, tied embeddings).
_QWEN_SMALL_VOCAB, _QWEN_VOCAB = 151_936, 152_064
SHAPES: dict[str, ModelShape] = {
    "qwen2.5-0.5b": ModelShape(_QWEN_SMALL_VOCAB, 896, 24, 4864, 14, 2, tied_embeddings=True),
    "qwen2.5-1.5b": ModelShape(_QWEN_SMALL_VOCAB, 1536, 28, 8960, 12, 2, tied_embeddings=True),
    "qwen2.5-3b": ModelShape(_QWEN_SMALL_VOCAB, 2048, 36, 11008, 16, 2, tied_embeddings=True),
    "qwen2.5-7b": ModelShape(_QWEN_VOCAB, 3584, 28, 18944, 28, 4),
    "qwen2.5-14b": ModelShape(_QWEN_VOCAB, 5120, 48, 13824, 40, 8),
    "qwen2.5-32b": ModelShape(_QWEN_VOCAB, 5120, 64, 27648, 40, 8),
    "qwen2.5-72b": ModelShape(_QWEN_VOCAB, 8192, 80, 29568, 64, 8),
    "llama-3.1-8b": ModelShape(128_256, 4096, 32, 14336, 32, 8),
    "llama-3.1-70b": ModelShape(128_256, 8192, 80, 28672, 64, 8),
    "llama-3.1-405b": ModelShape(128_256, 16384, 126, 53248, 128, 8),
    "mistral-nemo-12b": ModelShape(131_072, 5120, 40, 14336, 32, 8, head_dim=128),
    "mistral-7b-v0.3": ModelShape(32_768, 4096, 32, 14336, 32, 8),
    "phi-3.5-mini": ModelShape(32_064, 3072, 32, 8192, 32, 32),
    "gemma-2-2b": ModelShape(256_000, 2304, 26, 9216, 8, 4, head_dim=256, tied_embeddings=True),
    "gemma-2-9b": ModelShape(256_000, 3584, 42, 14336, 16, 8, head_dim=256, tied_embeddings=True),
    "gemma-2-27b": ModelShape(256_000, 4608, 46, 36864, 32, 16, head_dim=128, tied_embeddings=True),
}

# (short name, hub id, family, shape key, description)
CATALOGUE: list[tuple[str, str, str, str, str]] = []
for _size in ("0.5B", "1.5B", "3B", "7B", "14B", "32B", "72B"):
    _key = f"qwen2.5-{_size.lower()}"
    CATALOGUE.append((_key, f"unsloth/Qwen2.5-{_size}", "qwen2", _key, f"Qwen2.5 {_size} base"))
    CATALOGUE.append((f"{_key}-instruct", f"unsloth/Qwen2.5-{_size}-Instruct", "qwen2", _key, f"Qwen2.5 {_size} instruct (ChatML)"))
for _size in ("8B", "70B"):
    _key = f"llama-3.1-{_size.lower()}"
    CATALOGUE.append((_key, f"unsloth/Meta-Llama-3.1-{_size}", "llama", _key, f"Llama 3.1 {_size} base"))
    CATALOGUE.append((f"{_key}-instruct", f"unsloth/Meta-Llama-3.1-{_size}-Instruct", "llama", _key, f"Llama 3.1 {_size} instruct"))
CATALOGUE += [
    ("llama-3.1-405b", "unsloth/Meta-Llama-3.1-405B-bnb-4bit", "llama", "llama-3.1-405b", "Llama 3.1 405B base (4-bit upload only)"),
    ("llama-3.1-405b-instruct", "unsloth/Meta-Llama-3.1-405B-Instruct-bnb-4bit", "llama", "llama-3.1-405b", "Llama 3.1 405B instruct (4-bit upload only)"),
    ("mistral-nemo-base-2407", "unsloth/Mistral-Nemo-Base-2407", "mistral", "mistral-nemo-12b", "Mistral NeMo 12B base"),
    ("mistral-nemo-instruct-2407", "unsloth/Mistral-Nemo-Instruct-2407", "mistral", "mistral-nemo-12b", "Mistral NeMo 12B instruct"),
    ("mistral-7b-v0.3", "unsloth/mistral-7b-v0.3", "mistral", "mistral-7b-v0.3", "Mistral 7B v0.3 base"),
    ("mistral-7b-instruct-v0.3", "unsloth/mistral-7b-instruct-v0.3", "mistral", "mistral-7b-v0.3", "Mistral 7B v0.3 instruct"),
    ("phi-3.5-mini-instruct", "unsloth/Phi-3.5-mini-instruct", "phi3", "phi-3.5-mini", "Phi-3.5 mini instruct (fused qkv/gate_up projections)"),
]
for _size in ("2b", "9b", "27b"):
    _key = f"gemma-2-{_size}"
    CATALOGUE.append((_key, f"unsloth/gemma-2-{_size}", "gemma2", _key, f"Gemma 2 {_size.upper()} base"))
    CATALOGUE.append((f"{_key}-it", f"unsloth/gemma-2-{_size}-it", "gemma2", _key, f"Gemma 2 {_size.upper()} instruct"))


def catalogue_entries() -> list[ModelEntry]:
    entries: list[ModelEntry] = []
    for name, source, family, key, description in CATALOGUE:
        shape = SHAPES[key]
        entries.append(
            ModelEntry(
                name=name,
                source=source,
                family=family,
                params_b=round(shape.params / 1e9, 2),
                memory_4bit_gib=round(seed_memory_gib(shape), 1),
                description=description,
                shape=shape,
            )
        )
    return entries


@hookimpl
def register_models(register):
    for entry in catalogue_entries():
        register(entry)
