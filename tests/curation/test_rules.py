"""The row rules: exact drop reasons, quality rules that keep good technical answers, and the reason registry."""

from __future__ import annotations

import re
from pathlib import Path

import polars as pl
import pytest

from sft_engine.config import CurateConfig
from sft_engine.curation.curate import curate
from sft_engine.curation.reasons import RAISED
from sft_engine.curation.rules import ROW_RULES, all_reasons, drop_reason_table
from sft_engine.curation.schema import READ, dumps

README = Path(__file__).resolve().parents[2] / "README.md"

CODE = "Here is the parser:\n\n```python\n" + "\n".join(
    ["def parse(tokens):", "    out = []", "    for t in tokens:", "        if t == '(':", "            out.append([])", "        else:",
     "            out[-1].append(t)", "    return out", "", "class Node:", "    def __init__(self):", "        self.kids = []", "    }", "}"] * 3
) + "\n```\n\nCall it with a list of tokens; it returns nested lists."
TABLE = (
    "| model | params | context |\n|---|---:|---:|\n| small | 135M | 2k |\n| base | 1B | 8k |\n| large | 7B | 32k |\n\n"
    "Heading\n-------\n\nThe larger models need more memory.\n\n---\n\nNotes\n-----\n\nPick by budget."
)
NUMBERED = "Steps:\n\n1. Install the package.\n\n---\n\n2. Run the demo.\n\n---\n\n3. Open the MLflow UI.\n\n---\n\n4. Compare the runs."
LOOP = "\n".join(["I'm sorry, I cannot answer that right now."] * 8)
NGRAM_LOOP = " ".join(["the model is thinking"] * 20)


def _curate(convs: list[list[dict]], tools: list | None = None, **cfg) -> tuple[pl.DataFrame, pl.DataFrame]:
    rows = [{"source": "s", "row": i + 1, "messages": m, "tools": tools, "repairs": []} for i, m in enumerate(convs)]
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "rows.jsonl"
        path.write_text("".join(__import__("json").dumps({"messages": m, **({"tools": tools} if tools else {})}) + "\n" for m in convs))
        config = CurateConfig(sources=[{"name": "s", "path": str(path)}], heldout_fraction=0.0, min_chars=None,
                              decontaminate={"include_evaluation_sets": False}, **cfg)
        train, _, rejected, _ = curate(config)
    assert len(rows) == train.height + rejected.height
    return train, rejected


def _chat(answer: str, question: str = "Question?") -> list[dict]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


@pytest.mark.parametrize("answer", [CODE, TABLE, NUMBERED], ids=["40-line code block", "markdown table and headings", "numbered list with rules"])
def test_good_technical_answers_are_kept(answer: str) -> None:
    train, rejected = _curate([_chat(answer)])
    assert rejected["drop_reason"].to_list() == [] and train.height == 1


@pytest.mark.parametrize(("answer", "reason"), [(LOOP, "quality_duplicate_lines"), (NGRAM_LOOP, "quality_top_ngram")])
def test_looping_answers_are_dropped(answer: str, reason: str) -> None:
    _, rejected = _curate([_chat(answer)])
    assert rejected["drop_reason"].to_list() == [reason]


def test_repetition_is_judged_per_turn_and_in_reasoning() -> None:
    # The same good line once in each of three turns is not repetition; a reasoning trace that loops is.
    line = "Paris is the capital of France."
    turns = [{"role": r, "content": c} for q in ("a?", "b?", "c?") for r, c in (("user", q), ("assistant", line))]
    looping = [{"role": "user", "content": "Why?"}, {"role": "assistant", "content": "Because.", "reasoning_content": LOOP}]
    _, rejected = _curate([turns, looping])
    assert rejected.select("row", "drop_reason").rows() == [(2, "quality_duplicate_lines")]


def test_tool_call_turns_are_valid_and_checked_for_order() -> None:
    call = {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "function": {"name": "f", "arguments": "{}"}}]}
    ok = [{"role": "user", "content": "Use the tool."}, call, {"role": "tool", "tool_call_id": "c1", "content": "42"},
          {"role": "assistant", "content": "The tool says 42."}]
    call_is_last = ok[:2]  # learning to call is a valid target
    empty_reply = [*ok[:3], {"role": "assistant", "content": "  "}]
    train, rejected = _curate([ok, call_is_last, empty_reply], tools=[{"name": "f", "parameters": {}}])
    assert train.sort("row")["row"].to_list() == [1, 2]
    assert rejected.select("row", "drop_reason").rows() == [(3, "validate_empty_turn")]


def test_leading_context_turns_pass_validation() -> None:
    conv = [{"role": "assistant", "content": "Earlier answer."}, {"role": "user", "content": "And now?"}, {"role": "assistant", "content": "Now this."}]
    train, rejected = _curate([conv], repair={"leading_assistant": "context"})
    assert rejected.height == 0
    assert train["messages"][0].to_list()[0]["train"] is False
    _, dropped = _curate([conv], repair={"leading_assistant": "drop_row"})
    assert dropped["drop_reason"].to_list() == ["repair_leading_assistant"]


def test_rows_differing_only_in_a_tool_call_or_in_tools_are_not_duplicates() -> None:
    def conv(city: str) -> list[dict]:
        return [{"role": "user", "content": "Weather?"},
                {"role": "assistant", "content": "", "tool_calls": [{"id": "c", "function": {"name": "w", "arguments": dumps({"city": city})}}]},
                {"role": "tool", "content": "sunny"}, {"role": "assistant", "content": "Sunny."}]

    train, rejected = _curate([conv("Paris"), conv("Rome"), conv("Paris")], near_dedup={"enabled": False})
    assert rejected.select("row", "drop_reason").rows() == [(3, "dedup_exact")]
    assert sorted(train["row"].to_list()) == [1, 2]
    reasoning = [_chat("Same answer here."), [{**m, **({"reasoning_content": "other thoughts"} if m["role"] == "assistant" else {})} for m in _chat("Same answer here.")]]
    train, rejected = _curate(reasoning, near_dedup={"enabled": False})
    assert rejected.height == 0 and train.height == 2


def test_every_reason_is_documented_once_and_the_readme_table_is_the_registry() -> None:
    names = [r.name for r in all_reasons()]
    assert len(names) == len(set(names))
    assert all(re.fullmatch(r"(read|normalize|repair|validate|length|quality|decontam|dedup)_[a-z0-9_<>]+", n) for n in names)
    assert {r.name for r in ROW_RULES} <= set(names) and RAISED <= set(names)
    assert all(r.doc and r.example for r in all_reasons())
    assert drop_reason_table() in README.read_text(), "README's drop reason table is stale: paste drop_reason_table() output"


def test_reasons_the_code_gives_are_registered() -> None:
    # Every reason the curation package gives (raised, yielded, or set as a literal) is registered: a new one
    # must be documented to exist.
    package = Path(__file__).resolve().parents[2] / "sft_engine" / "curation"
    given = set()
    for path in package.glob("*.py"):
        given |= set(re.findall(r'(?:Drop\(|Record\(None, |pl\.lit\(|Rule\(|scatter\(\w+, )"([a-z]+_[a-z0-9_<>]+)"', path.read_text()))
    names = {r.name for r in all_reasons()}
    assert {"read_truncated", "normalize_bad_tools", "repair_trailing_user", "dedup_near", "dedup_exact", "quality_top_ngram"} <= given
    assert given - names == set()
    assert set(READ) >= {"drop_reason", "drop_detail", "raw"}
