"""Conversations: the order of their roles, rendering with a chat template, and the assistant-turn masks.

A data format (a plugin: :class:`qtune.types.DataFormat`) turns a row into a list of messages
``{"role", "content"}`` (plus ``tool_calls`` on an assistant message) and an optional list of tool
schemas; :func:`tokenize_conversation` renders it
once with the run's :class:`qtune.types.ChatTemplate`, tokenizes the text and labels every token of
every assistant turn (its end-of-turn token included); the rest is -100.

The assistant turns are character spans taken from the template's structure:

* a template with ``{% generation %}`` blocks: the spans transformers' renderer records for them
  (the mechanism behind ``apply_chat_template(return_assistant_tokens_mask=True)``);
* any other template: rendered message by message; an assistant turn starts where the conversation
  rendered up to it with ``add_generation_prompt=True`` ends, and ends where the conversation
  rendered through it stops agreeing with the whole (Phi-3.5 closes a rendering with EOS, which the
  whole only has at its very end). Whitespace that trails a turn is left masked.

Tokens are then trained when their character span overlaps an assistant span. Nothing here
searches the text or the ids for marker strings.

Importing this module loads no ML library; rendering imports transformers' chat-template renderer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Optional

from .errors import QtuneError

IGNORE_INDEX = -100
#: the roles a conversation's messages may have (the data format contract)
ROLES = ("system", "user", "assistant", "tool")
#: the columns of conversation rows, as data formats return them (:class:`qtune.types.DataFormat`)
MESSAGES, TOOLS = "messages", "tools"
#: a problem found while reading a conversation row (empty when none); preflight reports it
PROBLEM_COLUMN = "_qtune_problem"


def conversation_features():
    """The ``datasets.Features`` of conversation rows as a data format returns them: ``messages``
    (role, content, tool_calls as strings), ``tools`` (JSON text) and ``problem`` (what is wrong
    with the row, or "")."""
    import datasets

    text = datasets.Value("string")
    return datasets.Features({MESSAGES: [{"role": text, "content": text, "tool_calls": text}], TOOLS: text, "problem": text})


def _parse_json(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


# --------------------------------------------------------------------------- checks


def order_problem(messages: list[dict]) -> str:
    """What is wrong with the roles, or ''. Each one of :data:`ROLES`; an optional system message first,
    then user and assistant turns alternating; tool messages answer an assistant turn and are followed by one."""
    roles = [m["role"] for m in messages]
    if not roles:
        return "has no messages"
    unknown = next((index for index, role in enumerate(roles) if role not in ROLES), None)
    if unknown is not None:  # a data format outside the contract (a third party's)
        return f"message {unknown} has role {roles[unknown]!r}; roles are {', '.join(ROLES)}"
    if "assistant" not in roles:
        return "has no assistant turn, so nothing would be trained"
    previous = None
    for index, role in enumerate(roles):
        if role == "system":
            if index != 0:
                return f"has a system message at position {index}; only the first message may be one"
        elif role == "user":
            if previous == "user":
                return f"has two user messages in a row (positions {index - 1} and {index})"
            if previous == "tool":
                return f"has a user message right after a tool message (position {index})"
        elif role == "assistant":
            if previous in (None, "system"):
                return "starts with an assistant turn; a user message must come first"
            if previous == "assistant":
                return f"has two assistant turns in a row (positions {index - 1} and {index})"
        elif role == "tool" and previous not in ("assistant", "tool"):
            return f"has a tool message at position {index} that follows no assistant turn"
        previous = role
    return ""


def template_messages(messages: list[dict], tools_rendered: bool = True) -> list[dict[str, Any]]:
    """Stored messages as a chat template expects them: no empty keys (templates test for
    ``tool_calls`` being defined), tool calls and their arguments as objects. For a template that
    does not render tools (``tools_rendered=False``) a tool call becomes the assistant's text, as JSON."""
    result = []
    for message in messages:
        out: dict[str, Any] = {"role": message["role"], "content": message.get("content") or ""}
        calls = _parse_json(message.get("tool_calls") or "")
        if isinstance(calls, list) and calls:
            calls = [_tool_call(call) for call in calls]
            if tools_rendered:
                out["tool_calls"] = calls
            else:
                text = "\n".join(json.dumps(c.get("function", c) if isinstance(c, dict) else c, ensure_ascii=False) for c in calls)
                out["content"] = (out["content"] + "\n" + text).strip()
        result.append(out)
    return result


def _tool_call(call: Any) -> Any:
    if isinstance(call, dict) and isinstance(call.get("function"), dict):
        function = dict(call["function"])
        function["arguments"] = _parse_json(function.get("arguments"))
        return {**call, "function": function}
    return call


def row_tools(row: dict) -> Optional[list]:
    tools = _parse_json(row.get(TOOLS) or "")
    return tools if isinstance(tools, list) and tools else None


def example_conversation(template, example: dict) -> tuple[list[dict[str, Any]], Optional[list]]:
    """(messages, tools) of a training example: a conversation row as stored, or an instruction
    row turned into one turn by the template."""
    if MESSAGES in example:
        return template_messages(example[MESSAGES], template.supports_tools), row_tools(example)
    return template.example_messages(example), None


# --------------------------------------------------------------------------- rendering


def _special_tokens(template, tokenizer) -> dict[str, Any]:
    if tokenizer is None:
        return dict(template.special_tokens)
    tokens = dict(getattr(tokenizer, "special_tokens_map", {}) or {})
    for name in ("bos_token", "eos_token"):  # templates test these; absent ones render as ''
        tokens.setdefault(name, "")
        if tokens[name] is None:
            tokens[name] = ""
    return tokens


def has_generation_blocks(source: str) -> bool:
    import re

    return re.search(r"\{%-?\s*generation\s*-?%\}", source) is not None


def render_conversation(template, messages, tokenizer=None, *, tools=None, add_generation_prompt=False,
                        with_spans: bool = False) -> tuple[str, list[tuple[int, int]]]:
    """(text, generation spans) of ``messages`` rendered by ``template``'s Jinja source."""
    from transformers.utils.chat_template_utils import render_jinja_template

    source = template.source(tokenizer)
    try:
        rendered, spans = render_jinja_template(
            conversations=[messages], tools=tools, chat_template=source, add_generation_prompt=add_generation_prompt,
            return_assistant_tokens_mask=with_spans, **_special_tokens(template, tokenizer),
        )
    except QtuneError:
        raise
    except Exception as exc:  # jinja2.TemplateError from raise_exception, or a template bug
        from .errors import first_line

        raise QtuneError(f"template {template.name!r} cannot render this conversation: {first_line(exc)}") from None
    return rendered[0], [tuple(span) for span in spans[0]] if with_spans else []


def assistant_spans(template, messages, tokenizer=None, tools=None) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character span of each assistant turn in it (see the
    module docstring); raises QtuneError when the template's structure does not give them."""
    source = template.source(tokenizer)
    if has_generation_blocks(source):
        text, spans = render_conversation(template, messages, tokenizer, tools=tools, with_spans=True)
        spans = [(start, end) for start, end in spans if end > start]
    else:
        text, _ = render_conversation(template, messages, tokenizer, tools=tools)
        spans = []
        for index, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before, _ = render_conversation(template, messages[:index], tokenizer, tools=tools, add_generation_prompt=True)
            through, _ = render_conversation(template, messages[: index + 1], tokenizer, tools=tools)
            if not text.startswith(before):
                raise QtuneError(
                    f"template {template.name!r} renders the start of a conversation differently once more turns follow "
                    f"(turn {index}), so its assistant turns cannot be told apart; use a chat template with "
                    f"{{% generation %}} blocks, such as the built-in one for the model's family"
                )
            end = _common_prefix(through, text)
            spans.append((len(before), end))
    trimmed = []
    for start, end in spans:
        while end > start and text[end - 1].isspace():
            end -= 1
        trimmed.append((start, end))
    return text, trimmed


def _common_prefix(a: str, b: str) -> int:
    limit = min(len(a), len(b))
    index = 0
    while index < limit and a[index] == b[index]:
        index += 1
    return index


# --------------------------------------------------------------------------- tokens


@dataclass
class TokenizedConversation:
    input_ids: list[int]
    labels: list[int]
    truncated: bool
    length: int
    #: per assistant turn: (first token, end token) in the untruncated ids
    turns: list[tuple[int, int]] = field(default_factory=list)
    #: assistant turns the template ends without its end-of-turn token
    turns_end_missing: int = 0
    #: assistant turns whose end-of-turn token follows the turn's span, so it is not trained
    turns_end_masked: int = 0
    #: assistant turns that would train no token (an empty span)
    empty_turns: int = 0
    text: Optional[str] = None
    offsets: Optional[list[tuple[int, int]]] = None

    @property
    def trained_tokens(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE_INDEX)

    @property
    def turns_cut(self) -> int:
        """Assistant turns that lose tokens to truncation (their end token included)."""
        return sum(1 for _, end in self.turns if end > len(self.input_ids))


def tokenize_conversation(template, messages, tokenizer, max_length: int, assistant_only: bool, tools=None,
                          with_offsets: bool = False) -> TokenizedConversation:
    text, spans = assistant_spans(template, messages, tokenizer, tools)
    # The template writes every special token (BOS included) into the text itself.
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(encoded["input_ids"])
    offsets = [tuple(span) for span in encoded["offset_mapping"]]
    trained = [False] * len(ids)
    turns = []
    for start, end in spans:
        inside = [i for i, (a, b) in enumerate(offsets) if a < end and b > start]
        if inside:
            turns.append((inside[0], inside[-1] + 1))
            for i in inside:
                trained[i] = True
        else:
            turns.append((0, 0))
    eot = template.end_of_turn_token(tokenizer)
    eot_id = tokenizer.convert_tokens_to_ids(eot) if eot else None
    missing = masked = 0
    for first, end in turns:
        if end <= first or ids[end - 1] == eot_id:
            continue
        if end < len(ids) and ids[end] == eot_id:
            masked += 1
        else:
            missing += 1
    empty = sum(1 for first, end in turns if end <= first)
    labels = [token if (trained[i] or not assistant_only) else IGNORE_INDEX for i, token in enumerate(ids)]
    return TokenizedConversation(
        ids[:max_length], labels[:max_length], len(ids) > max_length, len(ids), turns, missing, masked, empty,
        text=text if with_offsets else None, offsets=offsets[:max_length] if with_offsets else None,
    )


def end_of_turn_ids(template, tokenizer) -> list[int]:
    """Token ids at which generation stops: EOS and the template's end-of-turn token."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    eot = template.end_of_turn_token(tokenizer) if hasattr(template, "end_of_turn_token") else None
    if eot:
        token_id = tokenizer.convert_tokens_to_ids(eot)
        if token_id is not None and token_id != tokenizer.unk_token_id and token_id not in ids:
            ids.append(token_id)
    return ids
