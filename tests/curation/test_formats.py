"""Every registered format, read from fixtures in the exact public shapes (tests/data/formats/), to exact canonical rows."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest

from sft_engine.config import CurateConfig, SourceConfig
from sft_engine.curation.formats import FORMAT_NAMES, FORMATS, normalize_row
from sft_engine.curation.reasons import Drop
from sft_engine.curation.schema import dumps, row_dicts, template_messages, template_tools
from sft_engine.curation.sources import read_source

DATA = Path(__file__).parent.parent / "data" / "formats"

WEATHER = {"name": "get_weather", "description": "Current weather in a city.",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["c", "f"]}},
                          "required": ["city"]}}
TIME = {"name": "get_time", "description": "Local time in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


def _tool(fn: dict) -> str:
    return dumps({"type": "function", "function": fn})


def _call(name: str, args: dict, call_id: str | None = None) -> dict:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": dumps(args)}}


def read(name: str, **source) -> tuple[list[dict], list[tuple]]:
    """Canonical rows of one fixture, and (row, reason, detail) of the rows it could not keep."""
    cfg = CurateConfig(sources=[{"name": "s", "path": str(DATA / name), **source}])
    df = read_source(cfg.sources[0], cfg)
    kept = row_dicts(df.filter(pl.col("drop_reason").is_null()))
    dropped = df.filter(pl.col("drop_reason").is_not_null()).select("row", "drop_reason", "drop_detail").rows()
    return [{k: v for k, v in r.items() if k != "source"} for r in kept], dropped


def test_openai_tool_calls_with_tools_reasoning_and_weights() -> None:
    rows, dropped = read("openai_tools.jsonl")
    assert rows[0] == {
        "row": 1, "repairs": [], "tools": [_tool(WEATHER)],
        "messages": [
            {"role": "system", "content": "You are a helpful assistant with tools."},
            {"role": "user", "content": "What's the weather in Paris, in celsius?"},
            {"role": "assistant", "content": "", "reasoning_content": "The user wants the weather; call get_weather.",
             "tool_calls": [_call("get_weather", {"city": "Paris", "unit": "c"}, "call_abc123")]},
            # The reply takes its call's function name, matched by tool_call_id.
            {"role": "tool", "content": '{"temp": 21, "sky": "clear"}', "tool_call_id": "call_abc123", "name": "get_weather"},
            {"role": "assistant", "content": "It is 21 °C and clear in Paris.", "weight": 1.0},
        ],
    }
    # Parallel calls: arguments given as a JSON string and as an object both become the same stored text.
    assert rows[1]["tools"] == [_tool(TIME), _tool(WEATHER)]
    assert rows[1]["messages"][1] == {"role": "assistant", "content": "", "tool_calls": [
        _call("get_time", {"city": "Tokyo"}, "call_1"), _call("get_weather", {"city": "Tokyo"}, "call_2")]}
    assert rows[1]["messages"][4]["weight"] == 0.5
    assert dropped == [(3, "normalize_bad_tool_arguments",
                        "messages[1] call 0 (get_weather): arguments are not JSON (unexpected character, expected a string key: line 1 column 2 (char 1))")]


def test_content_parts_reasoning_names_flags_and_non_text_parts() -> None:
    rows, dropped = read("openai_parts.jsonl")
    assert rows == [
        {"row": 1, "repairs": [], "messages": [
            {"role": "user", "content": "Summarize: cats sleep a lot."},  # text parts concatenated, as templates render them
            {"role": "assistant", "content": "Cats sleep most of the day.", "reasoning_content": "Short summary."}]},
        {"row": 2, "repairs": [], "messages": [
            {"role": "user", "content": "Hello?"},  # {"type": "text", "value": ...}
            {"role": "assistant", "content": "Hi there.", "reasoning_content": "Greet back.", "train": False},
            {"role": "user", "content": "Again?"},
            {"role": "assistant", "content": "Hi again.", "weight": 2.0}]},  # loss_weight
    ]
    assert dropped == [(3, "normalize_non_text_content", "messages[0]: part 1 has type 'image_url' (only text is trained)")]


def test_sharegpt_function_call_and_observation_turns_with_tools_string() -> None:
    rows, dropped = read("sharegpt_tools.json")
    assert rows[0] == {
        "row": 1, "repairs": [], "tools": [_tool(WEATHER)],  # a bare function definition, wrapped in the OpenAI shape
        "messages": [
            {"role": "system", "content": "You are a weather bot."},  # the row-level system column
            {"role": "user", "content": "What's the weather in Paris?"},
            {"role": "assistant", "content": "", "tool_calls": [_call("get_weather", {"city": "Paris"})]},
            {"role": "tool", "content": '{"temp": 21}', "name": "get_weather"},
            {"role": "assistant", "content": "It is 21 °C in Paris."},
        ],
    }
    # A list of calls in one function_call turn; each observation answers the next call.
    assert rows[1]["messages"][1:4] == [
        {"role": "assistant", "content": "", "tool_calls": [_call("get_time", {"city": "Tokyo"}), _call("get_time", {"city": "Oslo"})]},
        {"role": "tool", "content": "09:30", "name": "get_time"},
        {"role": "tool", "content": "02:30", "name": "get_time"},
    ]
    assert [(r, reason) for r, reason, _ in dropped] == [(3, "normalize_bad_tool_call")]


def test_split_sharegpt_dump_is_repaired_not_dropped() -> None:
    rows, dropped = read("sharegpt_split.jsonl")
    assert dropped == []
    assert rows[:3] == [
        {"row": 1, "repairs": ["trailing_user_removed"], "messages": [
            {"role": "user", "content": "Write a haiku about rain."}, {"role": "assistant", "content": "Soft rain on the roof"}]},
        {"row": 2, "repairs": ["leading_assistant_removed"], "messages": [
            {"role": "user", "content": "Now about snow."}, {"role": "assistant", "content": "White hush on the hills"}]},
        {"row": 3, "repairs": ["leading_assistant_removed", "merged_consecutive_user"], "messages": [
            {"role": "user", "content": "Thanks!\n\nOne more: sun."}, {"role": "assistant", "content": "Warm gold on my face"}]},
    ]
    # No user turn at all: nothing to repair, left for validation to name.
    assert rows[3] == {"row": 4, "repairs": [], "messages": [{"role": "assistant", "content": "Only the assistant speaks here."}]}
    cfg = CurateConfig(sources=[{"name": "s", "path": str(DATA / "sharegpt_split.jsonl")}], repair={"leading_assistant": "context"})
    kept = row_dicts(read_source(cfg.sources[0], cfg))
    assert kept[1]["messages"][0] == {"role": "assistant", "content": "Grey clouds drift, then pour", "train": False}
    assert kept[1]["repairs"] == ["leading_assistant_as_context"]


def test_alpaca_with_system_and_history_and_prompt_completion() -> None:
    rows, _ = read("alpaca_history.json")
    assert rows[0]["messages"] == [
        {"role": "system", "content": "Answer with a number."},
        {"role": "user", "content": "Can you do arithmetic?"}, {"role": "assistant", "content": "Yes."},
        {"role": "user", "content": "Add the numbers.\n\n2 and 3"}, {"role": "assistant", "content": "5"},
    ]
    assert rows[1]["messages"] == [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}]
    rows, _ = read("prompt_completion.jsonl")
    assert [r["messages"] for r in rows] == [
        [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi!"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say bye."}, {"role": "assistant", "content": "Bye!"}],
    ]


def test_truncated_json_array_keeps_complete_rows_and_quarantines_the_tail() -> None:
    rows, dropped = read("truncated_array.json")
    assert [r["messages"][0]["content"] for r in rows] == ["Say 0.", "Say 1.", "Say 2."]
    detail = "truncated_array.json: the JSON array breaks at byte 201 of 224 (Unterminated string starting at); 3 complete rows before it were kept"
    assert dropped == [(4, "read_truncated", detail)]


def test_column_mapping_with_reasoning_and_tools(tmp_path: Path) -> None:
    path = tmp_path / "cols.parquet"
    pl.DataFrame([{"q": "Capital of France?", "a": "Paris.", "why": "It is the capital.", "fns": json.dumps([TIME]), "sys": ""}]).write_parquet(path)
    cols = {"user": "q", "assistant": "a", "reasoning": "why", "tools": "fns", "system": "sys"}
    cfg = CurateConfig(sources=[{"name": "c", "path": str(path), "format": "columns", "columns": cols}])
    (row,) = row_dicts(read_source(cfg.sources[0], cfg))
    assert row == {"source": "c", "row": 1, "repairs": [], "tools": [_tool(TIME)], "messages": [
        {"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris.", "reasoning_content": "It is the capital."}]}


def test_template_form_has_argument_objects_and_no_curation_fields() -> None:
    rows, _ = read("openai_tools.jsonl")
    msgs = template_messages(rows[0]["messages"])
    assert msgs[2] == {"role": "assistant", "content": "", "reasoning_content": "The user wants the weather; call get_weather.",
                       "tool_calls": [{"id": "call_abc123", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}}]}
    assert msgs[4] == {"role": "assistant", "content": "It is 21 °C and clear in Paris."}  # no weight
    assert template_tools(rows[0]["tools"]) == [{"type": "function", "function": WEATHER}]
    assert template_tools(None) is None


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        ({"messages": [{"role": "user"}]}, "normalize_missing_field"),
        ({"messages": [{"role": "user", "content": 5}]}, "normalize_bad_type"),
        ({"messages": "hello"}, "normalize_bad_type"),
        ({"messages": [{"role": "assistant", "content": None}]}, "normalize_bad_type"),
        ({"messages": [{"role": "user", "content": "x", "weight": "high"}]}, "normalize_bad_weight"),
        ({"messages": [{"role": "user", "content": "x", "train": "no"}]}, "normalize_bad_type"),
        ({"messages": [{"role": "assistant", "content": "", "tool_calls": [{"function": {"arguments": "{}"}}]}]}, "normalize_bad_tool_call"),
        ({"messages": [{"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": "[1]"}}]}]},
         "normalize_bad_tool_arguments"),
        ({"messages": [], "tools": "{not json"}, "normalize_bad_tools"),
        ({"messages": [], "tools": [{"description": "no name"}]}, "normalize_bad_tools"),
        ({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]}, "normalize_non_text_content"),
        ({"instruction": "x"}, "normalize_missing_field"),
        ({"instruction": "x", "output": "y", "history": [["only one"]]}, "normalize_bad_type"),
        ({"text": "plain"}, "normalize_unknown_shape"),
        ([1, 2], "normalize_not_an_object"),
    ],
)
def test_rows_that_cannot_be_converted_name_the_reason(row: object, reason: str) -> None:
    with pytest.raises(Drop) as exc:
        normalize_row(row)
    assert exc.value.reason == reason


def test_speaker_names_legacy_function_call_and_empty_arguments() -> None:
    share = {"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "q"}, {"from": "gpt", "value": "a"},
                               {"from": "Observation", "value": "tool out"}, {"from": "bing", "value": "b"}]}
    assert normalize_row(share)["messages"] == [
        {"role": "system", "content": "s"}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
        {"role": "tool", "content": "tool out"}, {"role": "assistant", "content": "b"}]
    # An unknown speaker stays as written, for validation to name (validate_unknown_role).
    assert normalize_row({"conversations": [{"from": "narrator", "value": "x"}]})["messages"] == [{"role": "narrator", "content": "x"}]
    # OpenAI's legacy function_call / function role and row-level functions; "" arguments mean no arguments.
    legacy = {"messages": [{"role": "user", "content": "Time?"},
                           {"role": "assistant", "content": None, "function_call": {"name": "now", "arguments": ""}},
                           {"role": "function", "name": "now", "content": "12:00"}, {"role": "assistant", "content": "Noon."}],
              "functions": [{"name": "now", "parameters": {"type": "object", "properties": {}}}]}
    out = normalize_row(legacy)
    assert out["messages"][1:3] == [{"role": "assistant", "content": "", "tool_calls": [_call("now", {})]},
                                    {"role": "tool", "content": "12:00", "name": "now"}]
    assert out["tools"] == [_tool({"name": "now", "parameters": {"type": "object", "properties": {}}})]
    # Turns in a messages list may use ShareGPT keys, and an explicit format skips detection.
    assert normalize_row({"messages": [{"from": "human", "value": "hi"}]}, "messages")["messages"] == [{"role": "user", "content": "hi"}]


def test_format_choices_come_from_the_registry() -> None:
    assert FORMAT_NAMES == ("auto", "messages", "sharegpt", "alpaca", "prompt_completion", "columns")
    assert SourceConfig.model_fields["format"].annotation.__args__ == FORMAT_NAMES
    for fmt in FORMATS.values():
        # Every format's example converts to a valid conversation (the README shows these examples).
        cols = {"user": "question", "assistant": "answer", "reasoning": "thoughts"} if fmt.name == "columns" else None
        assert normalize_row(fmt.example, fmt.name, cols)["messages"], fmt.name
