"""Source formats: how a raw row of each shape people bring becomes one canonical row (``schema``).

A format is one ``Format`` entry in ``FORMATS``: its name (what ``SourceConfig.format`` accepts), how
``format: auto`` recognizes it, how it converts a row, and an example row (shown in the README). Adding a
format is adding one entry here. Conversion raises ``Drop`` with a registered drop reason when a row cannot be
converted; nothing is guessed silently.

The message-level parsing is shared: a list of turns may use OpenAI keys (``role``/``content``) or ShareGPT keys
(``from``/``value``), content may be a string or a list of parts (``{"type": "text", "text"|"value": ...}``),
assistant turns may carry ``tool_calls`` (OpenAI), a legacy ``function_call``, or be ShareGPT ``function_call``
turns whose value is the call's JSON; reasoning comes as ``reasoning_content``, ``reasoning`` or ``thinking``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from sft_engine.curation.reasons import Drop
from sft_engine.curation.schema import dumps

Row = dict[str, Any]

# Speaker names found in real ShareGPT-style dumps. A name not listed stays as written and fails validation
# by name (validate_unknown_role), so an unexpected speaker is visible, not silently re-labelled.
ROLE_ALIASES = {
    "human": "user", "user": "user", "prompter": "user", "question": "user",
    "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant", "bing": "assistant", "bard": "assistant",
    "model": "assistant", "bot": "assistant", "gpt4": "assistant", "claude": "assistant", "answer": "assistant",
    "system": "system",
    "tool": "tool", "function": "tool", "function_response": "tool", "observation": "tool", "ipython": "tool",
}
# Speaker names as written -> role, for turns that need nothing but the mapping (tool replies and calls do).
_PLAIN_ROLES = {
    spelled: role
    for name, role in ROLE_ALIASES.items() if role != "tool"
    for spelled in (name, name.capitalize(), name.upper())
}
# ShareGPT turns whose value is a call, not text (LLaMA-Factory, glaive-style tool data).
CALL_SPEAKERS = {"function_call", "tool_call", "tool_calls"}
REASONING_KEYS = ("reasoning_content", "reasoning", "thinking")
TEXT_PART_TYPES = {"text", "input_text", "output_text"}


@dataclass(frozen=True)
class Format:
    """One source format: ``detect`` tells ``format: auto`` a row is of this shape (None: only when named),
    ``convert`` makes the canonical row (``messages``, ``tools``) or raises ``Drop``."""

    name: str
    detect: Callable[[Row], bool] | None
    convert: Callable[[Row, dict[str, str] | None], Row]
    doc: str
    example: Row = field(default_factory=dict)


def _type_name(v: Any) -> str:
    return "null" if v is None else type(v).__name__


# ---- message-level parsing --------------------------------------------------------------------


def _text(content: Any, where: str) -> str:
    """Content as one string: a string, or a list of text parts concatenated (as templates that take parts render them)."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        content = [content]
    if not isinstance(content, list):
        raise Drop("normalize_bad_type", f"{where}: content is {_type_name(content)}, expected a string or a list of parts")
    pieces = []
    for j, part in enumerate(content):
        if isinstance(part, str):
            pieces.append(part)
            continue
        if not isinstance(part, dict):
            raise Drop("normalize_bad_type", f"{where}: part {j} is {_type_name(part)}")
        kind = part.get("type", "text")
        if kind not in TEXT_PART_TYPES:
            raise Drop("normalize_non_text_content", f"{where}: part {j} has type '{kind}' (only text is trained)")
        value = part.get("text", part.get("value"))
        if not isinstance(value, str):
            raise Drop("normalize_bad_type", f"{where}: text part {j} has no string 'text' or 'value'")
        pieces.append(value)
    return "".join(pieces)


def _arguments(args: Any, where: str) -> str:
    """A call's arguments as stored: the JSON text of an object (a JSON string is parsed first)."""
    if isinstance(args, str):
        if not args.strip():
            args = {}
        else:
            try:
                args = orjson.loads(args)
            except orjson.JSONDecodeError as exc:
                raise Drop("normalize_bad_tool_arguments", f"{where}: arguments are not JSON ({exc})") from None
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise Drop("normalize_bad_tool_arguments", f"{where}: arguments are {_type_name(args)}, expected an object")
    return dumps(args)


def _call(c: Any, where: str) -> Row:
    """One call in the OpenAI shape: {id, type: function, function: {name, arguments}}; a bare {name, arguments} too."""
    if not isinstance(c, dict):
        raise Drop("normalize_bad_tool_call", f"{where}: a call is {_type_name(c)}, expected an object")
    fn = c.get("function", c)
    if not isinstance(fn, dict):
        raise Drop("normalize_bad_tool_call", f"{where}: 'function' is {_type_name(fn)}")
    name = fn.get("name")
    if not isinstance(name, str) or not name.strip():
        raise Drop("normalize_bad_tool_call", f"{where}: a call has no function name")
    args = fn.get("arguments", fn.get("parameters"))
    call_id = c.get("id")
    return {"id": None if call_id is None else str(call_id), "type": "function",
            "function": {"name": name, "arguments": _arguments(args, f"{where} ({name})")}}


def _calls(value: Any, where: str) -> list[Row]:
    if isinstance(value, str):
        try:
            value = orjson.loads(value)
        except orjson.JSONDecodeError as exc:
            raise Drop("normalize_bad_tool_call", f"{where}: the call is not JSON ({exc})") from None
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not value:
        raise Drop("normalize_bad_tool_call", f"{where}: tool calls are {_type_name(value)}, expected a list of calls")
    return [_call(c, f"{where} call {j}") for j, c in enumerate(value)]


def _flags(t: Row, msg: Row, where: str) -> None:
    """Per-message loss controls: ``train`` (bool) and ``weight`` / ``loss_weight`` (a number >= 0)."""
    train = t.get("train")
    if train is not None:
        if not isinstance(train, bool):
            raise Drop("normalize_bad_type", f"{where}: train is {_type_name(train)}, expected true or false")
        msg["train"] = train
    for key in ("weight", "loss_weight"):
        w = t.get(key)
        if w is None:
            continue
        if isinstance(w, bool) or not isinstance(w, (int, float)) or w < 0:
            raise Drop("normalize_bad_weight", f"{where}: {key} is {w!r}, expected a number >= 0")
        msg["weight"] = float(w)
        break


def parse_turns(turns: Any, where: str = "messages") -> list[Row]:
    """A list of turns (OpenAI or ShareGPT keys, mixed freely) as canonical messages."""
    if not isinstance(turns, list):
        raise Drop("normalize_bad_type", f"{where} is {_type_name(turns)}, expected a list of messages")
    out: list[Row] = []
    # The latest assistant calls, so a tool reply without a name takes its call's: by tool_call_id, else by position.
    last_calls: list[Row] = []
    replies = 0
    for i, t in enumerate(turns):
        # The common turn, {role, content} or {from, value} with plain strings, skips the general path (reading is
        # the per-row Python step of curation; this is most of its time).
        if type(t) is dict and len(t) == 2:
            speaker, text = (t.get("role"), t.get("content")) if "role" in t else (t.get("from"), t.get("value"))
            if type(speaker) is str and type(text) is str:
                role = _PLAIN_ROLES.get(speaker)
                if role is not None:
                    # Already canonical: the row's own dict (never mutated downstream) saves an allocation.
                    out.append(t if role == speaker and "role" in t else {"role": role, "content": text})
                    continue
        at = f"{where}[{i}]"
        if not isinstance(t, dict):
            raise Drop("normalize_missing_field", f"{at} is {_type_name(t)}, expected an object")
        speaker = t.get("role", t.get("from"))
        if not isinstance(speaker, str):
            reason = "normalize_missing_field" if speaker is None else "normalize_bad_type"
            raise Drop(reason, f"{at}: no 'role' (or ShareGPT 'from')" if speaker is None else f"{at}: role is {_type_name(speaker)}")
        raw_content = t["content"] if "content" in t else t.get("value", t.get("text"))
        key = speaker.strip().lower()
        if key in CALL_SPEAKERS:
            msg: Row = {"role": "assistant", "content": "", "tool_calls": _calls(raw_content, at)}
        else:
            role = ROLE_ALIASES.get(key, key)
            msg = {"role": role}
            calls = t.get("tool_calls") or (t.get("function_call") and [t["function_call"]])
            if calls:
                msg["tool_calls"] = _calls(calls, at)
            if raw_content is None:
                if not calls and not any(k in t for k in ("content", "value", "text")):
                    raise Drop("normalize_missing_field", f"{at}: no 'content' (or ShareGPT 'value')")
                if not calls:
                    raise Drop("normalize_bad_type", f"{at}: content is null and the turn calls no tool")
                msg["content"] = ""
            else:
                msg["content"] = _text(raw_content, at)
            for rk in REASONING_KEYS:
                r = t.get(rk)
                if r is not None:
                    if not isinstance(r, str):
                        raise Drop("normalize_bad_type", f"{at}: {rk} is {_type_name(r)}, expected a string")
                    msg["reasoning_content"] = r
                    break
            if role == "tool":
                if t.get("tool_call_id") is not None:
                    msg["tool_call_id"] = str(t["tool_call_id"])
                name = t.get("name")
                if name is None:
                    by_id = [c for c in last_calls if c["id"] is not None and c["id"] == msg.get("tool_call_id")]
                    answered = by_id or last_calls[replies : replies + 1]
                    name = answered[0]["function"]["name"] if answered else None
                if name is not None:
                    msg["name"] = str(name)
                replies += 1
        _flags(t, msg, at)
        if msg.get("tool_calls"):
            last_calls, replies = msg["tool_calls"], 0
        out.append(msg)
    return out


def parse_tools(tools: Any, where: str = "tools") -> list[str] | None:
    """Row-level tool definitions (a list, or a JSON string of one) in the OpenAI shape, each stored as JSON text;
    None when there are none. A bare {name, description, parameters} is wrapped as {type: function, function: ...}."""
    if tools is None:
        return None
    if isinstance(tools, str):
        if not tools.strip():
            return None
        try:
            tools = orjson.loads(tools)
        except orjson.JSONDecodeError as exc:
            raise Drop("normalize_bad_tools", f"{where}: not JSON ({exc})") from None
    if isinstance(tools, dict):
        tools = [tools]
    if not isinstance(tools, list):
        raise Drop("normalize_bad_tools", f"{where} is {_type_name(tools)}, expected a list of function definitions")
    out = []
    for j, tool in enumerate(tools):
        if isinstance(tool, str):
            try:
                tool = orjson.loads(tool)
            except orjson.JSONDecodeError as exc:
                raise Drop("normalize_bad_tools", f"{where}[{j}]: not JSON ({exc})") from None
        if not isinstance(tool, dict):
            raise Drop("normalize_bad_tools", f"{where}[{j}] is {_type_name(tool)}, expected an object")
        if "function" not in tool:
            tool = {"type": "function", "function": tool}
        fn = tool["function"]
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"].strip():
            raise Drop("normalize_bad_tools", f"{where}[{j}]: a function definition needs a 'name'")
        out.append(dumps(tool))
    return out or None


def _with_system(messages: list[Row], system: Any, where: str = "system") -> list[Row]:
    """A row-level system prompt (Alpaca, LLaMA-Factory ShareGPT) as the first message, unless one is there."""
    if system is None or (isinstance(system, str) and not system.strip()):
        return messages
    if not isinstance(system, str):
        raise Drop("normalize_bad_type", f"{where} is {_type_name(system)}, expected a string")
    if messages and messages[0]["role"] == "system":
        return messages
    return [{"role": "system", "content": system}, *messages]


def _row_tools(obj: Row) -> list[str] | None:
    tools = obj.get("tools")
    if tools is not None:
        return parse_tools(tools, "tools")
    functions = obj.get("functions")
    return None if functions is None else parse_tools(functions, "functions")


def _require(obj: Row, *keys: str) -> None:
    missing = [k for k in keys if k not in obj]
    if missing:
        raise Drop("normalize_missing_field", f"no {', '.join(repr(k) for k in missing)}")


# ---- formats ----------------------------------------------------------------------------------


def _template_kwargs(obj: Row) -> str | None:
    """A row's own chat_template_kwargs (an object, or a JSON string of one), stored as JSON text."""
    kw = obj.get("chat_template_kwargs")
    if kw is None:
        return None
    if isinstance(kw, str):
        try:
            kw = orjson.loads(kw) if kw.strip() else {}
        except orjson.JSONDecodeError as exc:
            raise Drop("normalize_bad_type", f"chat_template_kwargs: not JSON ({exc})") from None
    if not isinstance(kw, dict):
        raise Drop("normalize_bad_type", f"chat_template_kwargs is {_type_name(kw)}, expected an object")
    return dumps(kw) if kw else None


def _row(obj: Row, messages: list[Row]) -> Row:
    """The canonical row: the messages, and what every format may carry at row level (tools, template kwargs)."""
    out: Row = {"messages": messages, "tools": _row_tools(obj)}
    if "chat_template_kwargs" in obj:
        out["chat_template_kwargs"] = _template_kwargs(obj)
    return out


def _turn_list(obj: Row, key: str) -> Row:
    if key not in obj:
        raise Drop("normalize_missing_field", f"no '{key}'")
    messages = parse_turns(obj[key], key)
    system = obj.get("system")
    return _row(obj, messages if system is None else _with_system(messages, system))


def _messages(obj: Row, _columns: dict[str, str] | None) -> Row:
    return _turn_list(obj, "messages")


def _sharegpt(obj: Row, _columns: dict[str, str] | None) -> Row:
    return _turn_list(obj, "conversations")


def _str_field(obj: Row, key: str, default: str | None = None) -> str:
    v = obj.get(key, default)
    if v is None and default is not None:
        v = default
    if not isinstance(v, str):
        raise Drop("normalize_bad_type", f"'{key}' is {_type_name(v)}, expected a string")
    return v


def _alpaca(obj: Row, _columns: dict[str, str] | None) -> Row:
    _require(obj, "instruction", "output")
    instruction, inp, output = _str_field(obj, "instruction"), _str_field(obj, "input", ""), _str_field(obj, "output")
    messages: list[Row] = []
    history = obj.get("history") or []
    if not isinstance(history, list):
        raise Drop("normalize_bad_type", f"'history' is {_type_name(history)}, expected a list of [user, assistant] pairs")
    for j, pair in enumerate(history):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise Drop("normalize_bad_type", f"history[{j}] is not a [user, assistant] pair of strings")
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    user = f"{instruction}\n\n{inp}" if inp.strip() else instruction
    messages += [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    return _row(obj, _with_system(messages, obj.get("system")))


def _prompt_completion(obj: Row, _columns: dict[str, str] | None) -> Row:
    _require(obj, "prompt", "completion")
    parts = []
    for key, role in (("prompt", "user"), ("completion", "assistant")):
        value = obj[key]
        parts.append([{"role": role, "content": value}] if isinstance(value, str) else parse_turns(value, key))
    return _row(obj, _with_system(parts[0] + parts[1], obj.get("system")))


# Canonical fields a column mapping may name, in the order they form a conversation.
COLUMN_FIELDS = ("system", "user", "reasoning", "assistant", "tools")


def _columns(obj: Row, columns: dict[str, str] | None) -> Row:
    columns = columns or {}
    messages: list[Row] = []
    for key in ("system", "user", "assistant"):
        col = columns.get(key)
        if col is None or (key == "system" and not obj.get(col)):
            continue
        if col not in obj:
            raise Drop("normalize_missing_field", f"no column '{col}' (mapped to {key})")
        value = obj[col]
        if not isinstance(value, str):
            raise Drop("normalize_bad_type", f"column '{col}' (mapped to {key}) is {_type_name(value)}, expected a string")
        messages.append({"role": key, "content": value})
    reasoning = columns.get("reasoning")
    if reasoning is not None and obj.get(reasoning) is not None and messages and messages[-1]["role"] == "assistant":
        if not isinstance(obj[reasoning], str):
            raise Drop("normalize_bad_type", f"column '{reasoning}' (mapped to reasoning) is {_type_name(obj[reasoning])}")
        messages[-1]["reasoning_content"] = obj[reasoning]
    tools = parse_tools(obj.get(columns["tools"]), columns["tools"]) if columns.get("tools") else None
    return {"messages": messages, "tools": tools}


_WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}

FORMATS: dict[str, Format] = {
    f.name: f
    for f in [
        Format(
            "messages", lambda o: "messages" in o, _messages,
            "OpenAI chat: `messages` with `role`/`content` (a string or a list of text parts), assistant `tool_calls`, "
            "`tool` replies with `tool_call_id`, `reasoning_content` (or `reasoning` / `thinking`), per message `train`, "
            "`weight` or `loss_weight`; row-level `tools` (or legacy `functions`) and `system`.",
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "Weather in Paris?"}]},
                          {"role": "assistant", "content": None, "tool_calls": [
                              {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
                          {"role": "tool", "tool_call_id": "call_1", "content": "{\"temp_c\": 21}"},
                          {"role": "assistant", "content": "21 °C.", "reasoning_content": "The tool said 21.", "weight": 1}],
             "tools": [_WEATHER_TOOL]},
        ),
        Format(
            "sharegpt", lambda o: "conversations" in o, _sharegpt,
            "ShareGPT: `conversations` with `from`/`value` (human, gpt, system and the other speaker names real dumps use); "
            "`function_call` turns (the call's JSON) become assistant `tool_calls`, `observation` turns become `tool` "
            "replies; row-level `tools` as a list or a JSON string, and `system`.",
            {"conversations": [{"from": "human", "value": "Weather in Paris?"},
                               {"from": "function_call", "value": "{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}"},
                               {"from": "observation", "value": "{\"temp_c\": 21}"},
                               {"from": "gpt", "value": "21 °C."}],
             "tools": "[{\"name\": \"get_weather\", \"parameters\": {\"type\": \"object\"}}]", "system": "You are a weather bot."},
        ),
        Format(
            "alpaca", lambda o: "instruction" in o, _alpaca,
            "Alpaca: `instruction`, optional `input` (appended after a blank line), `output`; optional `system`, and "
            "`history` as earlier [user, assistant] pairs.",
            {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5", "system": "Be brief.",
             "history": [["Hi", "Hello! What can I do?"]]},
        ),
        Format(
            "prompt_completion", lambda o: "prompt" in o and "completion" in o, _prompt_completion,
            "Prompt/completion: `prompt` and `completion`, each a string or a list of messages (TRL's conversational form).",
            {"prompt": [{"role": "user", "content": "Say hi."}], "completion": [{"role": "assistant", "content": "Hi!"}]},
        ),
        Format(
            "columns", None, _columns,
            "Your own columns, mapped with `columns: {user: question, assistant: answer, system: sys, reasoning: thoughts, "
            "tools: functions}` (user and assistant required); never auto-detected.",
            {"question": "Capital of France?", "answer": "Paris.", "thoughts": "Paris is the capital."},
        ),
    ]
}
FORMAT_NAMES: tuple[str, ...] = ("auto", *FORMATS)
_DETECTABLE = tuple(f for f in FORMATS.values() if f.detect is not None)


def detect_format(obj: Row) -> Format | None:
    """The first registered format whose ``detect`` accepts the row."""
    for f in _DETECTABLE:
        if f.detect(obj):  # type: ignore[misc] # _DETECTABLE holds formats with a detect
            return f
    return None


def normalize_row(obj: Any, fmt: str = "auto", columns: dict[str, str] | None = None) -> Row:
    """One raw row as a canonical row ``{"messages": [...], "tools": [...] | None}``; raises ``Drop`` naming why not.

    ``fmt`` is a name from ``FORMATS`` or ``auto`` (each row detected on its own, so a file may mix shapes).
    """
    if not isinstance(obj, dict):
        raise Drop("normalize_not_an_object", f"the row is {_type_name(obj)}, expected an object")
    f = detect_format(obj) if fmt == "auto" else FORMATS[fmt]
    if f is None:
        keys = ", ".join(sorted(map(str, obj))[:8])
        raise Drop("normalize_unknown_shape", f"no format recognizes a row with keys [{keys}]; set the source's format or columns")
    return f.convert(obj, columns)
