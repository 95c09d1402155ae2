"""Templates against the seed notebook's exact strings and the real Qwen2.5 tokenizers."""

from __future__ import annotations

import jinja2
import pytest
from transformers import AutoTokenizer

from qtune.config import Config
from qtune.data import IGNORE_INDEX, tokenize_chat_example, tokenize_example
from qtune.plugin_manager import get_host

# Copied from Unsloth's Qwen2.5 Alpaca notebook (formatting_prompts_func appends EOS_TOKEN).
SEED_TEXT = """Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request.

### Instruction:
Continue the fibonnaci sequence.

### Input:
1, 1, 2, 3, 5, 8

### Response:
13, 21, 34"""
EXAMPLE = {"instruction": "Continue the fibonnaci sequence.", "input": "1, 1, 2, 3, 5, 8", "output": "13, 21, 34"}


@pytest.fixture(scope="module")
def templates():
    return get_host().templates


def test_alpaca_is_the_seed_text(templates):
    alpaca = templates.get("alpaca")
    assert alpaca.render_prompt(EXAMPLE) + alpaca.render_completion(EXAMPLE) == SEED_TEXT
    # the notebook's inference prompt: alpaca_prompt.format(instruction, input, "")
    assert alpaca.render_prompt(EXAMPLE) == SEED_TEXT[: -len("13, 21, 34")]


def test_alpaca_tokens_equal_seed_text_plus_eos(templates, qwen_tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(qwen_tokenizer_dir)
    expected = tokenizer(SEED_TEXT + tokenizer.eos_token)["input_ids"]
    tokenized = tokenize_example(EXAMPLE, templates.get("alpaca"), tokenizer, 2048, responses_only=False)
    assert tokenized.input_ids == expected
    assert tokenized.input_ids[-1] == tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert tokenized.labels == expected  # the seed trains on the whole text


def test_responses_only_masks_prompt_and_trains_eos(templates, qwen_tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(qwen_tokenizer_dir)
    alpaca = templates.get("alpaca")
    tokenized = tokenize_example(EXAMPLE, alpaca, tokenizer, 2048, responses_only=True)
    prompt_ids = tokenizer(alpaca.render_prompt(EXAMPLE))["input_ids"]
    assert tokenized.labels[: len(prompt_ids)] == [IGNORE_INDEX] * len(prompt_ids)
    trained = [t for t in tokenized.labels if t != IGNORE_INDEX]
    assert tokenizer.decode(trained) == "13, 21, 34<|endoftext|>"


def test_truncation_is_reported(templates, qwen_tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(qwen_tokenizer_dir)
    tokenized = tokenize_example(EXAMPLE, templates.get("alpaca"), tokenizer, 16, responses_only=True)
    assert tokenized.truncated and len(tokenized.input_ids) == 16
    assert set(tokenized.labels) == {IGNORE_INDEX}


def test_qwen25_prompt_matches_qwen_instruct_chat_template(templates, qwen_instruct_tokenizer_dir):
    """An instruction row through a chat template is a one-turn conversation, rendered as the
    model's own template renders it (Qwen's default system prompt included, for the qwen2.5 template)."""
    tokenizer = AutoTokenizer.from_pretrained(qwen_instruct_tokenizer_dir)
    qwen = templates.get("qwen2.5")
    messages = [{"role": "user", "content": "Hello\n\nworld"}]
    expected = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert qwen.render_prompt({"instruction": "Hello", "input": "world", "output": "x"}) == expected
    tokenized = tokenize_chat_example({"instruction": "Hi", "output": "Hey"}, qwen, tokenizer, 512, assistant_only=True)
    assert tokenizer.decode([t for t in tokenized.labels if t != IGNORE_INDEX]) == "Hey<|im_end|>"


@pytest.mark.parametrize("name", ["alpaca", "chatml"])
def test_chat_template_renders_like_the_prompt(templates, name):
    """GGUF and Ollama get the template's Jinja form: it must give the very prompt used in training."""
    template = templates.get(name)
    rendered = jinja2.Environment().from_string(template.chat_template()).render(
        messages=[{"role": "user", "content": "Say hi."}], add_generation_prompt=True, eos_token="</s>"
    )
    assert rendered == template.render_prompt({"instruction": "Say hi.", "output": ""})


def test_seed_config_matches_the_notebook():
    seed = Config()
    assert (seed.model.name, seed.model.max_seq_length, seed.model.dtype, seed.model.load_in_4bit) == (
        "unsloth/Qwen2.5-7B", 2048, "auto", True)
    assert (seed.lora.r, seed.lora.alpha, seed.lora.dropout, seed.lora.bias, seed.lora.gradient_checkpointing) == (
        16, 16, 0.0, "none", "unsloth")
    assert seed.lora.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    t = seed.training
    assert (t.per_device_train_batch_size, t.gradient_accumulation_steps, t.warmup_steps, t.max_steps) == (2, 4, 5, 60)
    assert (t.learning_rate, t.optim, t.weight_decay, t.lr_scheduler_type, t.seed, t.logging_steps) == (
        2e-4, "adamw_8bit", 0.01, "linear", 3407, 1)
    assert (seed.template, seed.dataset.path, t.packing) == ("alpaca", "yahma/alpaca-cleaned", False)
