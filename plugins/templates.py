"""Built-in prompt templates: the seed notebook's Alpaca prompt and ChatML (Qwen2.5 chat)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from qtune.api import PromptTemplate, hookimpl

# The exact text of Unsloth's Alpaca notebooks; training text is ALPACA_PROMPT.format(i, x, y) + EOS.
ALPACA_PROMPT = """Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request.

### Instruction:
{}

### Input:
{}

### Response:
{}"""


class AlpacaTemplate(PromptTemplate):
    name = "alpaca"
    description = "Unsloth's Alpaca prompt (instruction, input, response)"
    fields = ("instruction", "output")
    optional_fields = ("input",)
    response_marker = "### Response:\n"

    def render_prompt(self, example: Mapping[str, Any]) -> str:
        return ALPACA_PROMPT.format(example["instruction"], example.get("input") or "", "")

    def render_completion(self, example: Mapping[str, Any]) -> str:
        return str(example["output"])

    def chat_template(self) -> str:
        # One user turn rendered exactly as render_prompt (instruction only; GGUF runtimes have no
        # separate "input" field), the assistant turn followed by EOS.
        head = ALPACA_PROMPT.split("### Instruction:")[0]
        return (
            "{%- for message in messages -%}"
            "{%- if message['role'] == 'user' -%}"
            + head.replace("\n", "\\n").join(["{{ '", "' }}"])
            + "{{ '### Instruction:\\n' + message['content'] + '\\n\\n### Input:\\n\\n\\n### Response:\\n' }}"
            "{%- elif message['role'] == 'assistant' -%}"
            "{{ message['content'] + eos_token }}"
            "{%- endif -%}"
            "{%- endfor -%}"
        )

    def stop_strings(self) -> list[str]:
        return ["### Instruction:"]


class ChatMLTemplate(PromptTemplate):
    """Qwen2.5's chat format: one system, one user and one assistant turn."""

    name = "chatml"
    description = "ChatML as Qwen2.5-Instruct uses it (<|im_start|>role ... <|im_end|>)"
    fields = ("instruction", "output")
    optional_fields = ("input", "system")
    response_marker = "<|im_start|>assistant\n"
    default_system = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."

    def render_prompt(self, example: Mapping[str, Any]) -> str:
        user = str(example["instruction"])
        if example.get("input"):
            user += "\n\n" + str(example["input"])
        system = example.get("system") or self.default_system
        return f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"

    def render_completion(self, example: Mapping[str, Any]) -> str:
        # The core appends the tokenizer's EOS; with an instruct tokenizer that is <|im_end|>.
        return str(example["output"])

    def chat_template(self) -> str:
        return (
            "{%- if messages[0]['role'] != 'system' -%}"
            "{{ '<|im_start|>system\\n" + self.default_system + "<|im_end|>\\n' }}"
            "{%- endif -%}"
            "{%- for message in messages -%}"
            "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
            "{%- endfor -%}"
            "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
        )

    def stop_strings(self) -> list[str]:
        return ["<|im_end|>", "<|im_start|>"]


@hookimpl
def register_templates(register):
    register(AlpacaTemplate())
    register(ChatMLTemplate())
