"""Drop reasons given before and after the row checks: reading, normalizing, repairing, dedup.

Every reason is ``<step>_<rule>``. The row-local checks (validation, length, quality, decontamination) are
``rules.ROW_RULES``, each documented where it is defined; ``rules.all_reasons()`` lists these and those in
pipeline order, and is what the README's table of drop reasons is checked against.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Reason:
    """A drop reason: its name, the step that gives it, what it means, and an example of a row that gets it."""

    name: str
    step: str
    doc: str
    example: str


READ = [
    Reason("read_bad_json", "read", "A JSON Lines row that is not valid JSON.", '`{"messages": [{"role": "user", "content": "cut of`'),
    Reason("read_bad_utf8", "read", "A row whose bytes are not UTF-8.", "`{\"messages\": ... caf\\xe9 ...}` in Latin-1"),
    Reason("read_row_too_large", "read", "A raw row larger than `curate.max_row_bytes`; quarantined unparsed.", "a 10 MB line"),
    Reason(
        "read_truncated", "read",
        "The broken tail of a JSON array cut short (a truncated download); the complete rows before it are kept, the "
        "detail gives the byte offset.", "`[{...}, {...}, {\"messages\": [{\"ro`",
    ),
]
NORMALIZE = [
    Reason("normalize_not_an_object", "normalize", "A row that is not a JSON object.", "`[1, 2, 3]`"),
    Reason("normalize_unknown_shape", "normalize", "No format recognizes the row's keys (with `format: auto`).", '`{"text": "plain"}`'),
    Reason("normalize_missing_field", "normalize", "A required key is missing (a message without a role or content).", '`{"messages": [{"role": "user"}]}`'),
    Reason("normalize_bad_type", "normalize", "A value of the wrong type.", '`{"messages": [{"role": "user", "content": 42}]}`'),
    Reason(
        "normalize_non_text_content", "normalize", "A content part that is not text (image, audio, file): not trainable by a text model.",
        '`{"type": "image_url", "image_url": {...}}`',
    ),
    Reason("normalize_bad_tool_call", "normalize", "A tool call without a function name, or a ShareGPT `function_call` value that is not JSON.", '`{"from": "function_call", "value": "get_weather Paris"}`'),
    Reason("normalize_bad_tool_arguments", "normalize", "Tool-call arguments that are not a JSON object (or a JSON string of one).", '`"arguments": "{city: Paris"`'),
    Reason("normalize_bad_tools", "normalize", "Row-level `tools` that are not a list of function definitions with names.", '`"tools": "not json"`'),
    Reason("normalize_bad_weight", "normalize", "A per-message `weight` / `loss_weight` that is not a number >= 0.", '`"weight": "high"`'),
]
REPAIR = [
    Reason(
        "repair_leading_assistant", "repair",
        "The conversation starts with assistant turns and `curate.repair.leading_assistant: drop_row`.",
        "a ShareGPT chunk that starts with a `gpt` turn",
    ),
    Reason(
        "repair_trailing_user", "repair",
        "The conversation ends with unanswered user (or tool) turns and `curate.repair.trailing_user: drop_row`.",
        "`user, assistant, user`",
    ),
]
DEDUP = [
    Reason("dedup_exact", "dedup", "The same conversation (case and whitespace folded, tools included) as an earlier row; `dup_of` is not set.", "`WHAT is 2+2?` after `what is 2+2?`"),
    Reason("dedup_near", "dedup", "Word 5-gram Jaccard >= `curate.near_dedup.threshold` with an earlier kept row; `dup_of` names it.", "the same answer with two words changed"),
]

# Reasons raised as ``Drop`` (reading, normalizing and repairing happen in Python, row by row).
RAISED = {r.name for r in READ + NORMALIZE + REPAIR}


class Drop(Exception):
    """A row that cannot become (or stay) a canonical row: ``reason`` is registered above, ``detail`` says where."""

    def __init__(self, reason: str, detail: str | None = None) -> None:
        assert reason in RAISED, f"unregistered drop reason {reason!r}: add it to sft_engine/curation/reasons.py"
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
