"""Built-in templates: the seed notebook's Alpaca prompt for instruction rows, and chat templates
for conversations: the tokenizer's own (``chat``), ChatML, Qwen2.5, Llama-3.1, Mistral v0.3,
Mistral Nemo, Phi-3.5 and Gemma.

Each chat template below is its family's reference template with ``{% generation %}`` blocks added
around what the assistant writes (its text and end-of-turn token), so the training masks come from
the template's structure. The blocks change nothing in the rendered text; tests/test_chat.py
renders a fixed conversation with each one and with the reference it cites, and compares.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from qtune.api import ChatTemplate, PromptTemplate, hookimpl

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


class TokenizerChatTemplate(ChatTemplate):
    """The model's own chat template (``tokenizer.chat_template``), ending turns with its EOS."""

    name = "chat"
    description = "the tokenizer's own chat template (apply_chat_template); turns end in its EOS token"
    supports_tools = True  # whatever the model's template does with them

    def stop_strings(self) -> list[str]:
        return []


# ChatML as Unsloth (unsloth/chat_templates.py, chatml_template) and Axolotl (templates/chatml.jinja)
# ship it: no default system prompt, no BOS; the same text Qwen2.5's and SmolLM2's own templates
# give a conversation that has a system message.
CHATML = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- generation %}{{- message['content'] + '<|im_end|>' }}{%- endgeneration %}"
    "{{- '\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


class ChatMLTemplate(ChatTemplate):
    name = "chatml"
    description = "ChatML (<|im_start|>role ... <|im_end|>), no default system prompt (SmolLM2, Qwen, many others)"
    jinja = CHATML
    end_of_turn = "<|im_end|>"
    special_tokens = {"eos_token": "<|im_end|>"}

    def stop_strings(self) -> list[str]:
        return ["<|im_end|>", "<|im_start|>"]


QWEN25_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
# Qwen2.5-Instruct's chat template as trl 1.14.2 ships it verbatim (trl/chat_templates/qwen2_5.jinja),
# the assistant branches wrapped in {% generation %} (text, tool calls and <|im_end|>; not the
# newline that follows).
QWEN25 = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" and not message.tool_calls %}
        {{- '<|im_start|>' + message.role + '\\n' }}
        {%- generation %}
        {{- message.content + '<|im_end|>' }}
        {%- endgeneration %}
        {{- '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- generation %}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>' }}
        {%- endgeneration %}
        {{- '\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""


class Qwen25Template(ChatTemplate):
    name = "qwen2.5"
    description = "Qwen2.5-Instruct's template: ChatML, tools, and Qwen's default system prompt (for Qwen models only)"
    jinja = QWEN25
    end_of_turn = "<|im_end|>"
    special_tokens = {"eos_token": "<|im_end|>"}
    supports_tools = True
    default_system = QWEN25_DEFAULT_SYSTEM

    def stop_strings(self) -> list[str]:
        return ["<|im_end|>", "<|im_start|>"]


# Llama-3.1-Instruct's chat template as trl 1.14.2 ships it (trl/chat_templates/llama3_1.jinja),
# the assistant turns wrapped in {% generation %}.
LLAMA31 = """{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- set date_string = "26 Jul 2024" %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{%- if builtin_tools is defined or tools is not none %}
    {{- "Environment: ipython\\n" }}
{%- endif %}
{%- if builtin_tools is defined %}
    {{- "Tools: " + builtin_tools | reject('equalto', 'code_interpreter') | join(", ") + "\\n\\n"}}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\\n\\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- if tools_in_user_message and not tools is none %}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
{%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\\n\\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\\n\\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\\n\\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}
{%- for message in messages %}
    {%- if message.role == 'assistant' and not 'tool_calls' in message %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
        {%- generation %}
        {{- message['content'] | trim + '<|eot_id|>' }}
        {%- endgeneration %}
    {%- elif not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}
        {%- generation %}
        {%- if builtin_tools is defined and tool_call.name in builtin_tools %}
            {{- "<|python_tag|>" + tool_call.name + ".call(" }}
            {%- for arg_name, arg_val in tool_call.arguments | items %}
                {{- arg_name + '="' + arg_val + '"' }}
                {%- if not loop.last %}
                    {{- ", " }}
                {%- endif %}
                {%- endfor %}
            {{- ")" }}
        {%- else  %}
            {{- '{"name": "' + tool_call.name + '", ' }}
            {{- '"parameters": ' }}
            {{- tool_call.arguments | tojson }}
            {{- "}" }}
        {%- endif %}
        {%- if builtin_tools is defined %}
            {{- "<|eom_id|>" }}
        {%- else %}
            {{- "<|eot_id|>" }}
        {%- endif %}
        {%- endgeneration %}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""


class Llama31Template(ChatTemplate):
    name = "llama-3.1"
    description = "Llama-3.1-Instruct's template (<|start_header_id|>role<|end_header_id|> ... <|eot_id|>, tools)"
    jinja = LLAMA31
    end_of_turn = "<|eot_id|>"
    special_tokens = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}
    supports_tools = True

    def stop_strings(self) -> list[str]:
        return ["<|eot_id|>", "<|eom_id|>"]


def _mistral(inst_open: str, inst_close: str, assistant_text: str, tools_open: str, results_open: str) -> str:
    """Mistral's v3 chat template (Mistral-7B-Instruct-v0.3; with Tekken spacing, Mistral-Nemo) as
    Axolotl 0.19.0 ships it (axolotl/utils/chat_templates/templates/mistral_v2v3.jinja and
    mistral_v3_tekken.jinja, the models' own templates); the system message goes before the LAST
    user message, which is why only {% generation %} blocks can mark its assistant turns. One change:
    the reference writes the system message only when the conversation ENDS in a user message, so a
    training conversation (ending in an answer) would lose it; here it goes before the last user
    message whatever follows, as mistral-common (Mistral's reference tokenizer code) does."""
    return """{%- if messages[0]["role"] == "system" %}
    {%- set system_message = messages[0]["content"] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}
{%- set user_messages = loop_messages | selectattr("role", "equalto", "user") | list %}
{%- set ns = namespace() %}
{%- set ns.index = 0 %}
{%- for message in loop_messages %}
    {%- if not (message.role == "tool" or message.role == "tool_results" or (message.tool_calls is defined and message.tool_calls is not none)) %}
        {%- if (message["role"] == "user") != (ns.index % 2 == 0) %}
            {{- raise_exception("After the optional system message, conversation roles must alternate user/assistant/user/assistant/...") }}
        {%- endif %}
        {%- set ns.index = ns.index + 1 %}
    {%- endif %}
{%- endfor %}
{{- bos_token }}
{%- for message in loop_messages %}
    {%- if message["role"] == "user" %}
        {%- set content = message["content"] %}
        {%- if tools is not none and (message == user_messages[-1]) %}
            {{- "TOOLS_OPEN[" }}
            {%- for tool in tools %}
                {%- set tool = tool.function %}
                {{- '{"type": "function", "function": {' }}
                {%- for key, val in tool.items() if key != "return" %}
                    {%- if val is string %}
                        {{- '"' + key + '": "' + val + '"' }}
                    {%- else %}
                        {{- '"' + key + '": ' + val|tojson }}
                    {%- endif %}
                    {%- if not loop.last %}
                        {{- ", " }}
                    {%- endif %}
                {%- endfor %}
                {{- "}}" }}
                {%- if not loop.last %}
                    {{- ", " }}
                {%- else %}
                    {{- "]" }}
                {%- endif %}
            {%- endfor %}
            {{- "[/AVAILABLE_TOOLS]" }}
        {%- endif %}
        {%- if message == user_messages[-1] and system_message is defined %}
            {{- "INST_OPEN" + system_message + "\\n\\n" + content + "INST_CLOSE" }}
        {%- else %}
            {{- "INST_OPEN" + content + "INST_CLOSE" }}
        {%- endif %}
    {%- elif message.tool_calls is defined and message.tool_calls is not none %}
        {%- generation %}
        {{- "[TOOL_CALLS][" }}
        {%- for tool_call in message.tool_calls %}
            {%- set out = tool_call.function|tojson %}
            {{- out[:-1] }}
            {%- if not tool_call.id is defined or tool_call.id|length != 9 %}
                {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}
            {%- endif %}
            {{- ', "id": "' + tool_call.id + '"}' }}
            {%- if not loop.last %}
                {{- ", " }}
            {%- else %}
                {{- "]" + eos_token }}
            {%- endif %}
        {%- endfor %}
        {%- endgeneration %}
    {%- elif message["role"] == "assistant" %}
        {%- generation %}
        {{- ASSISTANT_TEXT + eos_token }}
        {%- endgeneration %}
    {%- elif message["role"] == "tool_results" or message["role"] == "tool" %}
        {%- set content = message.content %}
        {{- 'RESULTS_OPEN{"content": ' + content|string + ", " }}
        {%- if not message.tool_call_id is defined or message.tool_call_id|length != 9 %}
            {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}
        {%- endif %}
        {{- '"call_id": "' + message.tool_call_id + '"}[/TOOL_RESULTS]' }}
    {%- else %}
        {{- raise_exception("Only user and assistant roles are supported, with the exception of an initial optional system message!") }}
    {%- endif %}
{%- endfor %}
""".replace("TOOLS_OPEN", tools_open).replace("INST_OPEN", inst_open).replace("INST_CLOSE", inst_close).replace(
        "ASSISTANT_TEXT", assistant_text).replace("RESULTS_OPEN", results_open)


class MistralV03Template(ChatTemplate):
    name = "mistral-v0.3"
    description = "Mistral-7B-Instruct-v0.3's template ([INST] ... [/INST] answer</s>; system before the last user turn)"
    jinja = _mistral("[INST] ", "[/INST]", '" " + message["content"]|trim', "[AVAILABLE_TOOLS] ", "[TOOL_RESULTS] ")
    end_of_turn = "</s>"
    special_tokens = {"bos_token": "<s>", "eos_token": "</s>"}
    supports_tools = True
    system_handling = "put before the last user message, as mistral-common does"


class MistralNemoTemplate(ChatTemplate):
    name = "mistral-nemo"
    description = "Mistral-Nemo-Instruct's template (Tekken: [INST]...[/INST]answer</s>; system before the last user turn)"
    jinja = _mistral("[INST]", "[/INST]", 'message["content"]', "[AVAILABLE_TOOLS]", "[TOOL_RESULTS]")
    end_of_turn = "</s>"
    special_tokens = {"bos_token": "<s>", "eos_token": "</s>"}
    supports_tools = True
    system_handling = "put before the last user message, as mistral-common does"


# Phi-3.5-mini-instruct's chat template as trl 1.14.2 ships it (trl/chat_templates/phi3_5.jinja):
# it closes a rendering that does not end in a generation prompt with EOS; that EOS is trained with
# the last assistant turn.
PHI35 = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' and message['content'] %}{{- '<|system|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{%- elif message['role'] == 'user' %}{{- '<|user|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{%- elif message['role'] == 'assistant' %}{{- '<|assistant|>\\n' }}"
    "{%- generation %}{{- message['content'] + '<|end|>' }}{%- endgeneration %}{{- '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|assistant|>\\n' }}"
    "{%- elif messages[-1]['role'] == 'assistant' %}{%- generation %}{{- eos_token }}{%- endgeneration %}"
    "{%- else %}{{- eos_token }}{%- endif %}"
)


class Phi35Template(ChatTemplate):
    name = "phi-3.5"
    description = "Phi-3.5-mini-instruct's template (<|user|> ... <|end|> <|assistant|> ... <|end|>)"
    jinja = PHI35
    end_of_turn = "<|end|>"
    special_tokens = {"eos_token": "<|endoftext|>"}

    def end_of_turn_token(self, tokenizer: Any = None) -> str | None:
        return self.end_of_turn

    def stop_strings(self) -> list[str]:
        return ["<|end|>", "<|endoftext|>"]


# Gemma's (and Gemma 2's) chat template as trl 1.14.2 ships it (trl/chat_templates/gemma.jinja).
# Gemma has no system role: a system message is put at the start of the first user turn followed
# by a blank line, as Gemma 3's own template does (trl/chat_templates/gemma3.jinja), instead of the
# reference's raise_exception('System role not supported').
GEMMA = (
    "{{- bos_token }}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set first_user_prefix = messages[0]['content'] | trim + '\\n\\n' %}"
    "{%- set loop_messages = messages[1:] %}"
    "{%- else %}{%- set first_user_prefix = '' %}{%- set loop_messages = messages %}{%- endif %}"
    "{%- for message in loop_messages %}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif %}"
    "{%- if message['role'] == 'assistant' %}{{- '<start_of_turn>model\\n' }}"
    "{%- generation %}{{- message['content'] | trim + '<end_of_turn>' }}{%- endgeneration %}{{- '\\n' }}"
    "{%- else %}{{- '<start_of_turn>' + message['role'] + '\\n' + (first_user_prefix if loop.first else '')"
    " + message['content'] | trim + '<end_of_turn>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<start_of_turn>model\\n' }}{%- endif %}"
)


class GemmaTemplate(ChatTemplate):
    name = "gemma"
    description = "Gemma / Gemma 2's template (<start_of_turn>user|model ... <end_of_turn>; no system role)"
    jinja = GEMMA
    end_of_turn = "<end_of_turn>"
    special_tokens = {"bos_token": "<bos>", "eos_token": "<eos>"}
    system_role = False
    system_handling = "put at the start of the first user turn, then a blank line (as Gemma 3's template does)"

    def stop_strings(self) -> list[str]:
        return ["<end_of_turn>"]


CHAT_TEMPLATES = (TokenizerChatTemplate, ChatMLTemplate, Qwen25Template, Llama31Template, MistralV03Template,
                  MistralNemoTemplate, Phi35Template, GemmaTemplate)


@hookimpl
def register_templates(register):
    register(AlpacaTemplate())
    for template in CHAT_TEMPLATES:
        register(template())
