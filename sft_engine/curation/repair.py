"""Repairs: fixes a curator would make by hand to a conversation that is otherwise good, counted apart from drops.

Real dumps split long conversations into chunks, and a chunk often starts with the assistant (FastChat, which
made the ShareGPT dumps, drops that leading turn and keeps the rest) or ends on a question no one answered.
Each repair is configured under ``curate.repair``; a repaired row is a kept row, and its ``repairs`` column
lists what was done, so ``stats.json`` counts ``repaired_<kind>`` beside the drops:

    leading_assistant_removed     assistant (and tool) turns before the first user turn, removed
    leading_assistant_as_context  the same turns kept as untrained context (train: false)
    merged_consecutive_user       consecutive user turns merged into one (blank line between)
    trailing_user_removed         user (or tool) turns after the last assistant turn, removed

A repair never leaves a conversation without a user turn answered by the assistant: such a conversation is left as
is, for validation to name.
"""

from __future__ import annotations

from itertools import pairwise
from typing import TYPE_CHECKING, Any

from sft_engine.curation.reasons import Drop

if TYPE_CHECKING:
    from sft_engine.config import RepairConfig

REPAIR_KINDS = ("leading_assistant_removed", "leading_assistant_as_context", "merged_consecutive_user", "trailing_user_removed")


def _well_formed(messages: list[dict[str, Any]]) -> bool:
    """Nothing to repair: after the system prompt the user speaks first, no two user turns touch, and the
    assistant speaks last. One pass, no allocation: this runs on every row."""
    prev = None
    for m in messages:
        role = m["role"]
        if prev is None and role != "system":
            if role != "user":
                return False
            prev = role
        elif role == "user" and prev == "user":
            return False
        elif prev is not None:
            prev = role
    return prev is not None and messages[-1]["role"] == "assistant"


def repair_messages(messages: list[dict[str, Any]], cfg: RepairConfig) -> tuple[list[dict[str, Any]], list[str]]:
    """The repaired messages and the kinds of repair applied, in order; raises ``Drop`` for a ``drop_row`` policy."""
    if _well_formed(messages):
        return messages, []
    roles = [m["role"] for m in messages]
    done: list[str] = []
    system = 0
    while system < len(roles) and roles[system] == "system":
        system += 1
    first_user = next((i for i in range(system, len(roles)) if roles[i] == "user"), None)
    answered = first_user is not None and "assistant" in roles[first_user:]
    if answered and first_user > system and all(r in ("assistant", "tool") for r in roles[system:first_user]):
        if cfg.leading_assistant == "drop_row":
            raise Drop("repair_leading_assistant", f"{first_user - system} turns before the first user turn")
        if cfg.leading_assistant == "remove":
            messages = messages[:system] + messages[first_user:]
            done.append("leading_assistant_removed")
        else:
            messages = messages[:system] + [
                {**m, "train": False} if m["role"] == "assistant" else m for m in messages[system:first_user]
            ] + messages[first_user:]
            done.append("leading_assistant_as_context")
    if cfg.merge_consecutive_user and any(a["role"] == b["role"] == "user" for a, b in pairwise(messages)):
        merged: list[dict[str, Any]] = []
        for m in messages:
            if merged and m["role"] == "user" and merged[-1]["role"] == "user":
                merged[-1] = {**merged[-1], "content": f"{merged[-1]['content']}\n\n{m['content']}"}
            else:
                merged.append(m)
        messages = merged
        done.append("merged_consecutive_user")
    last_assistant = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    tail = messages[last_assistant + 1 :] if last_assistant is not None else []
    if tail and any(m["role"] == "user" for m in messages[:last_assistant]) and all(m["role"] in ("user", "tool") for m in tail):
        if cfg.trailing_user == "drop_row":
            raise Drop("repair_trailing_user", f"{len(tail)} turns after the last assistant turn")
        messages = messages[: last_assistant + 1]
        done.append("trailing_user_removed")
    return messages, done
