"""Repairs: exact messages and kinds for each policy; a repair never leaves a conversation without an answer."""

from __future__ import annotations

import pytest

from sft_engine.config import RepairConfig
from sft_engine.curation.reasons import Drop
from sft_engine.curation.repair import REPAIR_KINDS, repair_messages


def m(*roles: str) -> list[dict]:
    return [{"role": r, "content": f"{r}{i}"} for i, r in enumerate(roles)]


def test_leading_assistant_policies() -> None:
    conv = m("system", "assistant", "tool", "user", "assistant")
    assert repair_messages(conv, RepairConfig()) == ([conv[0], conv[3], conv[4]], ["leading_assistant_removed"])
    ctx, kinds = repair_messages(conv, RepairConfig(leading_assistant="context"))
    assert kinds == ["leading_assistant_as_context"]
    assert ctx == [conv[0], {**conv[1], "train": False}, conv[2], conv[3], conv[4]]
    with pytest.raises(Drop) as exc:
        repair_messages(conv, RepairConfig(leading_assistant="drop_row"))
    assert (exc.value.reason, exc.value.detail) == ("repair_leading_assistant", "2 turns before the first user turn")


def test_consecutive_users_merge_and_trailing_questions_go() -> None:
    conv = m("user", "user", "assistant", "user", "tool")
    fixed, kinds = repair_messages(conv, RepairConfig())
    assert fixed == [{"role": "user", "content": "user0\n\nuser1"}, conv[2]]
    assert kinds == ["merged_consecutive_user", "trailing_user_removed"]
    assert repair_messages(conv, RepairConfig(merge_consecutive_user=False))[0] == conv[:3]
    with pytest.raises(Drop, match="repair_trailing_user: 2 turns after the last assistant turn"):
        repair_messages(conv, RepairConfig(trailing_user="drop_row"))


@pytest.mark.parametrize("roles", [("assistant", "user"), ("assistant",), ("user",), ("system", "user", "assistant")])
def test_nothing_to_repair_or_nothing_left_to_answer(roles: tuple[str, ...]) -> None:
    conv = m(*roles)
    assert repair_messages(conv, RepairConfig()) == (conv, [])


def test_kinds_are_the_documented_ones() -> None:
    assert REPAIR_KINDS == ("leading_assistant_removed", "leading_assistant_as_context", "merged_consecutive_user", "trailing_user_removed")
