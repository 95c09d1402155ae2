"""The built-in data formats (``dataset.format``): instruction rows (``alpaca``) and conversations
as OpenAI ``messages`` or ShareGPT ``conversations``, with tool calls and tool schemas.

``auto`` takes ``messages`` or ``sharegpt`` when a ``messages`` or ``conversations`` column is there
(told apart by the first message's keys), else ``alpaca``.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any, Optional

from qtune.api import ROLES, DataFormat, QtuneError, hookimpl

#: ShareGPT speaker names (``from``) and the roles they become. ``function_call`` is the assistant
#: calling a tool (its text is the call) and ``observation`` the tool's answer, as in LLaMA-Factory.
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "function_call": "assistant",
    "tool": "tool",
    "observation": "tool",
    "function": "tool",
}
#: the column a conversation comes in, by format (``dataset.fields.messages`` names another)
CONVERSATION_COLUMNS = {"messages": "messages", "sharegpt": "conversations"}
#: the dataset.fields keys a conversation format maps
CONVERSATION_FIELDS = ("messages", "tools")


class Alpaca(DataFormat):
    name = "alpaca"
    description = "instruction rows: the template's fields, renamed with dataset.fields"

    def detect(self, columns, fields, first_row):
        return True  # the fallback: priority 0, below the conversation formats

    def rows(self, rows, template, spec):
        mapping = spec.fields
        unknown = set(mapping) - set(template.fields) - set(template.optional_fields)
        if unknown:
            name = sorted(unknown)[0]
            raise QtuneError(
                f"dataset.fields.{name}: template {template.name!r} has no field {name!r}; "
                f"its fields are {', '.join(template.fields + template.optional_fields)}"
            )
        columns = set(rows.column_names)
        renames = {}
        for field in template.fields + template.optional_fields:
            column = mapping.get(field, field)
            if column not in columns:
                if field in template.optional_fields and field not in mapping:
                    continue
                raise QtuneError(
                    f"dataset lacks column {column!r} for template field {field!r} (columns: {', '.join(sorted(columns))}); "
                    f"map it with dataset.fields.{field}: <column>"
                )
            if column != field:
                renames[column] = field
        keep = [f for f in template.fields + template.optional_fields if mapping.get(f, f) in columns]
        rows = rows.select_columns([c for c in rows.column_names if c in {mapping.get(f, f) for f in keep}])
        return rows.rename_columns(renames) if renames else rows


def conversation_kind(columns: list[str], fields: dict[str, str], first_row: Optional[dict]) -> Optional[str]:
    """``messages`` or ``sharegpt`` from a dataset's columns (and its first conversation), else None."""
    column = fields.get("messages")
    if column is None:
        column = next((c for c in ("messages", "conversations") if c in columns), None)
    if column is None or column not in columns:
        return None
    turns = (first_row or {}).get(column)
    if isinstance(turns, list) and turns and isinstance(turns[0], dict):
        if "from" in turns[0] or "value" in turns[0]:
            return "sharegpt"
        if "role" in turns[0]:
            return "messages"
    return "sharegpt" if column == "conversations" else "messages"


def _text_content(content: Any) -> tuple[Optional[str], str]:
    """(text, problem): a string as is; a list of parts joined when every part is text."""
    if content is None:
        return None, ""
    if isinstance(content, str):
        return content, ""
    if isinstance(content, list):
        texts = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif kind is not None and kind != "text":
                return None, f"holds a {kind!r} part; only text conversations are supported"
            elif isinstance(part, dict) and isinstance(part.get("text"), str):
                texts.append(part["text"])
            else:
                return None, "holds content that is not text; only text conversations are supported"
        return "".join(texts), ""
    return None, f"holds {type(content).__name__} content, not text; only text conversations are supported"


def _parse_json(value: Any) -> Any:
    """A JSON string's value; anything else, or text that is not JSON, as it is."""
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            return json.loads(value)
    return value


def _tool_schema(tool: Any) -> Any:
    # LLaMA-Factory and others list bare function schemas; templates expect OpenAI's wrapper.
    if isinstance(tool, dict) and "name" in tool and "type" not in tool:
        return {"type": "function", "function": tool}
    return tool


class Conversations(DataFormat):
    """A conversation column: OpenAI ``messages`` (role/content) or ShareGPT (from/value)."""

    conversations = True
    auto_priority = 10

    def detect(self, columns, fields, first_row):
        return conversation_kind(columns, dict(fields), dict(first_row) if first_row else None) == self.name

    def column(self, fields) -> str:
        return fields.get("messages", CONVERSATION_COLUMNS[self.name])

    def rows(self, rows, template, spec):
        where = f"dataset {spec.path or spec.loader!r}"
        column = self.column(spec.fields)
        unknown = set(spec.fields) - set(CONVERSATION_FIELDS)
        if unknown:
            name = sorted(unknown)[0]
            raise QtuneError(
                f"dataset.fields.{name}: conversation data ({self.name} format) maps only `messages` (the conversation column) "
                f"and `tools`; remove dataset.fields.{name}"
            )
        if column not in rows.column_names:
            raise QtuneError(
                f"{where} lacks column {column!r} for the {self.name} format (columns: {', '.join(sorted(rows.column_names))}); "
                f"map it with dataset.fields.messages: <column>, or set dataset.format"
            )
        return super().rows(rows, template, spec)

    def conversation(self, row, fields):
        """Roles mapped, text content; tool calls and tools as JSON text, so every row has the same
        Arrow type."""
        sharegpt = self.name == "sharegpt"
        turns = row.get(self.column(fields))
        tools = _parse_json(row.get(fields.get("tools", "tools")))
        tools_json = json.dumps([_tool_schema(t) for t in tools]) if isinstance(tools, list) and tools else ""
        messages: list[dict[str, str]] = []
        if not isinstance(turns, list) or not turns:
            return {"messages": [], "tools": tools_json, "problem": "has no messages"}
        problem = ""
        for index, turn in enumerate(turns):
            if not isinstance(turn, dict):
                problem = problem or f"message {index} is not an object"
                continue
            if sharegpt:
                speaker = turn.get("from")
                role = SHAREGPT_ROLES.get(str(speaker).lower()) if speaker is not None else None
                if role is None:
                    problem = problem or (f"message {index} is from {speaker!r}; ShareGPT speakers are "
                                          f"{', '.join(sorted(SHAREGPT_ROLES))}")
                    continue
                raw = turn.get("value")
            else:
                role = turn.get("role")
                if role not in ROLES:
                    problem = problem or f"message {index} has role {role!r}; roles are {', '.join(ROLES)}"
                    continue
                raw = turn.get("content")
            text, issue = _text_content(raw)
            calls = turn.get("tool_calls") if not sharegpt else None
            if sharegpt and str(speaker).lower() == "function_call":
                call = _parse_json(text)
                if isinstance(call, dict) and "name" in call:  # a structured call, as the model's template writes them
                    calls, text = [{"type": "function", "function": call}], ""
            if issue:
                problem = problem or f"message {index} ({role}) {issue}"
            elif (text is None or not text.strip()) and not calls:
                problem = problem or f"message {index} ({role}) is empty"
            messages.append({"role": role, "content": text or "", "tool_calls": json.dumps(calls) if calls else ""})
        return {"messages": messages, "tools": tools_json, "problem": problem}


class Messages(Conversations):
    name = "messages"
    description = "conversations as OpenAI messages (role/content, tool_calls, a tools column)"


class ShareGPT(Conversations):
    name = "sharegpt"
    description = "conversations as ShareGPT turns (from/value; function_call and observation for tools)"


@hookimpl
def register_data_formats(register):
    for data_format in (Alpaca(), Messages(), ShareGPT()):
        register(data_format)
