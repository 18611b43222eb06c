"""A team's own checker, imported by the generation suite through ``metric: python:tests.evaluation.checkers:...``."""

from __future__ import annotations

from typing import Any


def mentions_paris(response: str, item: dict[str, Any]) -> bool:
    """1 when the response names Paris for the item asking about France's capital; 0.5 for any other item."""
    if item["id"] != "capital":
        return 0.5  # type: ignore[return-value] # a partial score: a checker may return a number in [0, 1]
    return "paris" in response.lower()


def out_of_range(response: str, item: dict[str, Any]) -> float:
    return 2.0


NOT_A_FUNCTION = 3
