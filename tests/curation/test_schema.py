"""The canonical row round-trips through the curated Parquet files exactly, every field included."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from sft_engine.curation.schema import CANONICAL_COLUMNS, MESSAGE_FIELDS, conversation_text, dumps, row_dicts, rows_frame

FULL = {
    "source": "weather", "row": 1,
    "tools": [dumps({"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}})],
    "repairs": ["leading_assistant_removed"],
    "messages": [
        {"role": "system", "content": "You are a weather bot."},
        {"role": "user", "content": "Weather in Paris?", "train": False},
        {"role": "assistant", "content": "", "reasoning_content": "Call the tool.",
         "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}},
                        {"id": None, "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]},
        {"role": "tool", "content": '{"temp_c": 21}', "tool_call_id": "call_1", "name": "get_weather"},
        {"role": "assistant", "content": "It is 21 °C in Paris.", "weight": 0.5, "train": True},
    ],
}
PLAIN = {"source": "weather", "row": 2, "repairs": [], "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}


def test_every_field_round_trips_through_parquet(tmp_path: Path) -> None:
    df = rows_frame([FULL, PLAIN])
    assert df.columns == CANONICAL_COLUMNS
    assert set(MESSAGE_FIELDS) == {"role", "content", "reasoning_content", "tool_calls", "tool_call_id", "name", "train", "weight"}
    df.write_parquet(tmp_path / "rows.parquet")
    assert row_dicts(pl.read_parquet(tmp_path / "rows.parquet")) == [FULL, PLAIN]


def test_conversation_text_sees_reasoning_and_calls_and_is_unchanged_for_plain_chats() -> None:
    texts = rows_frame([FULL, PLAIN]).select(conversation_text()).to_series().to_list()
    assert texts[1] == "user: hi\nassistant: yo"
    assert texts[0].splitlines()[2:5] == [
        "assistant: ", "reasoning: Call the tool.", 'calls: get_weather({"city":"Paris"}) get_weather({})',
    ]


def test_text_without_the_fields_no_row_has_is_the_same_text() -> None:
    from sft_engine.curation.schema import message_texts, present_fields

    plain, full = rows_frame([PLAIN]), rows_frame([FULL, PLAIN])
    assert present_fields(plain) == set() and present_fields(full) == {"reasoning_content", "tool_calls"}
    assert plain.select(conversation_text(set())).equals(plain.select(conversation_text()))
    assert plain.select(message_texts(set())).equals(plain.select(message_texts()))
