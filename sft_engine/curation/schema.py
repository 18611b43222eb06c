"""The one conversation schema: what every format is read into, what every curation step reads, and
what the curated Parquet files hold. Defined here and nowhere else.

A row::

    source: str                 the source's configured name
    row: i64                    1-based row number within that source (across its files)
    messages: list[MESSAGE]
    tools: list[str] | null     function definitions the conversation may call, each a JSON object in the
                                OpenAI shape {"type": "function", "function": {"name", "description", "parameters"}}
    chat_template_kwargs: str | null   a JSON object of template variables for this row (e.g. {"enable_thinking": false})
    repairs: list[str]          what curation repaired in this row (see ``repair``); [] when nothing

    MESSAGE = struct {
        role: str                      system | user | assistant | tool
        content: str                   the text; "" for an assistant turn that only calls tools
        reasoning_content: str | null  the thinking trace, kept apart from content (never inlined as <think>)
        tool_calls: list[TOOL_CALL] | null
        tool_call_id: str | null       on a tool message: the id of the call it answers
        name: str | null               on a tool message: the function that produced it
        train: bool | null             false: this turn carries no loss
        weight: f64 | null             scales this turn's token losses (0: no loss)
    }
    TOOL_CALL = struct {id: str | null, type: "function", function: struct {name: str, arguments: str}}

``arguments`` is a JSON object stored as text: Parquet has no type for an arbitrary object, so curation parses
whatever the source had (an object, or a JSON string of one) and stores ``orjson.dumps`` of it, key order kept;
``template_messages`` turns it back into the object a chat template expects. ``tools`` likewise.

A full row, as stored (``conversation_text`` and the dedup keys read exactly these fields)::

    {"source": "weather", "row": 1,
     "tools": ['{"type":"function","function":{"name":"get_weather","parameters":{"type":"object",'
               '"properties":{"city":{"type":"string"}},"required":["city"]}}}'],
     "repairs": ["leading_assistant_removed"],
     "messages": [
        {"role": "system", "content": "You are a weather bot."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "reasoning_content": "I should call the tool.",
         "tool_calls": [{"id": "call_1", "type": "function",
                         "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]},
        {"role": "tool", "content": '{"temp_c": 21}', "tool_call_id": "call_1", "name": "get_weather"},
        {"role": "assistant", "content": "It is 21 °C in Paris.", "weight": 1.0}]}

In Python the canonical form leaves out null message fields (``{"role": "user", "content": "hi"}``); the
Polars frame fills them with nulls, and ``row_dicts`` leaves them out again, so a row round-trips exactly.
"""

from __future__ import annotations

from typing import Any

import orjson
import polars as pl
import pyarrow as pa

from sft_engine.constants import ROLES

FUNCTION = pl.Struct({"name": pl.String, "arguments": pl.String})
TOOL_CALL = pl.Struct({"id": pl.String, "type": pl.String, "function": FUNCTION})
MESSAGE = pl.Struct({
    "role": pl.String,
    "content": pl.String,
    "reasoning_content": pl.String,
    "tool_calls": pl.List(TOOL_CALL),
    "tool_call_id": pl.String,
    "name": pl.String,
    "train": pl.Boolean,
    "weight": pl.Float64,
})
MESSAGE_FIELDS = tuple(MESSAGE.to_schema())

# The canonical columns of a row, in order, as the curated train/heldout Parquet files hold them.
CANONICAL = {
    "source": pl.String, "row": pl.Int64, "messages": pl.List(MESSAGE), "tools": pl.List(pl.String),
    "chat_template_kwargs": pl.String, "repairs": pl.List(pl.String),
}
CANONICAL_COLUMNS = list(CANONICAL)
KEY = ["source", "row"]

# What reading adds to a row before the checks: why it was dropped (null: alive), a detail for the curator
# (which field, which byte offset), and a 500-character raw preview for rows that failed to parse or normalize.
READ = {**CANONICAL, "drop_reason": pl.String, "drop_detail": pl.String, "raw": pl.String}

__all__ = [
    "CANONICAL", "CANONICAL_COLUMNS", "KEY", "MESSAGE", "READ", "ROLES", "TOOL_CALL",
    "conversation_text", "dumps", "empty_rows", "row_dicts", "rows_frame", "template_messages", "template_tools",
]


def dumps(obj: Any) -> str:
    """The stored text of a JSON value: compact, key order kept, non-ASCII kept (orjson)."""
    return orjson.dumps(obj).decode()


def _nested(lists: list[list[Any] | None], values: pl.Series, name: str) -> pl.Series:
    """A list column from the flat ``values`` of ``lists`` (None: a null row), built from offsets."""
    offsets = [0]
    for x in lists:
        offsets.append(offsets[-1] + (len(x) if x else 0))
    inner = values.to_arrow()
    if isinstance(inner, pa.ChunkedArray):
        inner = inner.combine_chunks()
    mask = pa.array([x is None for x in lists], pa.bool_())
    return pl.Series(name, pa.LargeListArray.from_arrays(pa.array(offsets, pa.int64()), inner, mask=mask))


def messages_series(conversations: list[list[dict[str, Any]] | None], name: str = "messages") -> pl.Series:
    """Canonical message lists (None: a row that has none) as one ``list[MESSAGE]`` column.

    Built column by column from the flat messages and their offsets, fields no message has as nulls: Polars'
    row-wise construction from nested dicts is ~15x slower, and reading is the one per-row step of curation that
    cannot avoid Python.
    """
    flat = [m for c in conversations if c for m in c]
    present = set().union(*flat) if flat else set()
    dtypes = MESSAGE.to_schema()
    fields = pl.DataFrame([
        pl.Series(f, [m.get(f) for m in flat], dtype=dtypes[f]) if f in present
        else pl.repeat(None, len(flat), dtype=dtypes[f], eager=True).alias(f)
        for f in MESSAGE_FIELDS
    ])
    return _nested(conversations, fields.to_struct(name), name)


def _column(records: list[dict[str, Any]], name: str, dtype: pl.DataType) -> pl.Series:
    values = [r.get(name) for r in records]
    if name == "messages":
        return messages_series(values, name)
    if isinstance(dtype, pl.List):
        return _nested(values, pl.Series(name, [x for v in values if v for x in v], dtype=dtype.inner), name)
    return pl.Series(name, values, dtype=dtype)


def rows_frame(records: list[dict[str, Any]], schema: dict[str, pl.DataType] | None = None) -> pl.DataFrame:
    """Canonical rows (Python dicts, null fields left out) as a frame of ``schema`` (default: the canonical columns)."""
    return pl.DataFrame([_column(records, name, dtype) for name, dtype in (schema or CANONICAL).items()])


def empty_rows(schema: dict[str, pl.DataType] | None = None) -> pl.DataFrame:
    return pl.DataFrame(schema=schema or CANONICAL)


def _clean_message(m: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in m.items() if v is not None}
    out.setdefault("content", "")
    return out


def row_dicts(df: pl.DataFrame) -> list[dict[str, Any]]:
    """The canonical Python form of each row of a frame: null message fields and null columns left out."""
    rows = []
    for r in df.select([c for c in CANONICAL_COLUMNS if c in df.columns]).to_dicts():
        if r.get("messages") is not None:
            r["messages"] = [_clean_message(m) for m in r["messages"]]
        rows.append({k: v for k, v in r.items() if v is not None})
    return rows


def template_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages as a chat template reads them: the fields a template knows, tool-call arguments as objects,
    no null fields, no curation fields (``train``, ``weight``)."""
    out = []
    for m in messages:
        msg: dict[str, Any] = {"role": m["role"], "content": m.get("content") or ""}
        rc, calls, call_id, name = m.get("reasoning_content"), m.get("tool_calls"), m.get("tool_call_id"), m.get("name")
        if rc is None and not calls and call_id is None and name is None:
            out.append(msg)  # a plain turn, nearly every message: nothing else to carry
            continue
        if rc is not None:
            msg["reasoning_content"] = rc
        if calls:
            msg["tool_calls"] = [
                {**({"id": c["id"]} if c.get("id") is not None else {}), "type": c.get("type") or "function",
                 "function": {"name": c["function"]["name"], "arguments": orjson.loads(c["function"]["arguments"])}}
                for c in m["tool_calls"]
            ]
        for k in ("tool_call_id", "name"):
            if m.get(k) is not None:
                msg[k] = m[k]
        out.append(msg)
    return out


def template_tools(tools: list[str] | None) -> list[dict[str, Any]] | None:
    """The row's tools as objects for a chat template, or None when it has none."""
    return [orjson.loads(t) for t in tools] if tools else None


def present_fields(df: pl.DataFrame) -> set[str]:
    """Which optional message fields (``reasoning_content``, ``tool_calls``) any row of ``df`` has: the text
    expressions leave out the parts no row needs, which halves their cost on plain chats."""
    el = pl.element().struct
    found = df.select(
        reasoning_content=pl.col("messages").list.eval(el.field("reasoning_content").is_not_null()).list.any().any(),
        tool_calls=pl.col("messages").list.eval(el.field("tool_calls").list.len() > 0).list.any().any(),
    ).row(0, named=True)
    return {k for k, v in found.items() if v}


ALL_FIELDS = frozenset({"reasoning_content", "tool_calls"})


def _with_optional(head: pl.Expr, present: frozenset[str] | set[str], reasoning_prefix: str, calls_prefix: str, calls: pl.Expr) -> pl.Expr:
    """``head`` of one message, then its reasoning and its calls after their prefixes, for the fields in ``present``."""
    el = pl.element().struct
    pieces = [head]
    if "reasoning_content" in present:
        pieces.append(pl.concat_str([pl.lit(reasoning_prefix), el.field("reasoning_content")]).fill_null(""))
    if "tool_calls" in present:
        pieces.append(pl.when(el.field("tool_calls").list.len() > 0).then(pl.lit(calls_prefix) + calls).otherwise(pl.lit("")))
    return pl.concat_str(pieces) if len(pieces) > 1 else head


def conversation_text(present: frozenset[str] | set[str] = ALL_FIELDS) -> pl.Expr:
    """Every message as text, one per line: 'role: content', then its reasoning and its calls on their own lines
    when present (what dedup and near-dedup see; two rows that differ only in a tool call or in reasoning differ
    here). A plain message gives exactly 'role: content'. ``present``: the optional fields to include
    (``present_fields``); leaving out one no row has changes nothing but the cost."""
    el = pl.element().struct
    fn = pl.element().struct.field("function").struct
    calls = el.field("tool_calls").list.eval(fn.field("name") + pl.lit("(") + fn.field("arguments") + pl.lit(")")).list.join(" ")
    line = _with_optional(el.field("role") + pl.lit(": ") + el.field("content"), present, "\nreasoning: ", "\ncalls: ", calls)
    return pl.col("messages").list.eval(line).list.join("\n")


def message_texts(present: frozenset[str] | set[str] = ALL_FIELDS) -> pl.Expr:
    """Per message, the text a person wrote or the model produced: content, reasoning and call arguments
    (what decontamination and the length limits count)."""
    el = pl.element().struct
    args = el.field("tool_calls").list.eval(pl.element().struct.field("function").struct.field("arguments")).list.join(" ")
    text = _with_optional(el.field("content"), present, "\n", "\n", args)
    return pl.col("messages").list.eval(text)
