"""Built-in demo sources that need no hub: real chats from ``chitchat-dataset`` and a generator of
verifiable tasks whose answers can be checked exactly.

Both return raw rows in the shapes users bring (OpenAI ``messages`` and Alpaca), so they go
through the same normalization and validation as any file.
"""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path
from typing import Any


def chitchat_path() -> Path:
    """Location of the chitchat-dataset JSON inside the installed package (not imported)."""
    spec = importlib.util.find_spec("chitchat_dataset")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package 'chitchat-dataset' is not installed: pip install chitchat-dataset==0.9.0")
    return Path(spec.submodule_search_locations[0]) / "dataset.json"


def chitchat_rows(limit: int | None = None, max_messages: int = 8) -> list[dict[str, Any]]:
    """Chitchat conversations as ``messages`` rows, windowed to at most ``max_messages`` turns.

    The first sender of each chat becomes the user, the other the assistant. Consecutive
    utterances of one sender are one turn. Windows start on a user turn and end on an assistant
    turn, so every row is a valid training conversation; long chats give several rows.
    """
    data = json.loads(chitchat_path().read_text())
    rows: list[dict[str, Any]] = []
    for chat_id in sorted(data):
        groups = data[chat_id]["messages"]
        if not groups:
            continue
        first = groups[0][0]["sender"]
        turns = [
            {"role": "user" if g[0]["sender"] == first else "assistant", "content": "\n".join(u["text"] for u in g)}
            for g in groups
            if g
        ]
        start = 0
        while start < len(turns):
            window = turns[start : start + max_messages]
            while window and window[-1]["role"] != "assistant":
                window = window[:-1]
            if len(window) >= 2 and window[0]["role"] == "user":
                rows.append({"messages": window, "chat_id": chat_id})
            start += max(len(window), 2)
            if limit is not None and len(rows) >= limit:
                return rows
    return rows


_UNITS = [
    ("km", "m", 1000),
    ("kg", "g", 1000),
    ("hours", "minutes", 60),
    ("minutes", "seconds", 60),
    ("liters", "milliliters", 1000),
    ("days", "hours", 24),
]


def _arithmetic(rng: random.Random) -> tuple[str, str, str]:
    a, b = rng.randint(2, 999), rng.randint(2, 999)
    op = rng.choice(["+", "-", "*"])
    if op == "*":
        a, b = rng.randint(2, 99), rng.randint(2, 99)
    value = {"+": a + b, "-": a - b, "*": a * b}[op]
    return "Compute the result.", f"{a} {op} {b}", f"{a} {op} {b} = {value}\nAnswer: {value}"


def _convert(rng: random.Random) -> tuple[str, str, str]:
    src, dst, factor = rng.choice(_UNITS)
    qty = rng.randint(1, 250)
    value = qty * factor
    return f"Convert {src} to {dst}.", f"{qty} {src}", f"{qty} {src} x {factor} = {value} {dst}\nAnswer: {value} {dst}"


def _sort(rng: random.Random) -> tuple[str, str, str]:
    nums = [rng.randint(0, 99) for _ in range(rng.randint(3, 7))]
    order = rng.choice(["ascending", "descending"])
    out = sorted(nums, reverse=order == "descending")
    joined = ", ".join(map(str, out))
    return f"Sort the numbers in {order} order.", ", ".join(map(str, nums)), f"Sorted {order}: {joined}\nAnswer: {joined}"


_WORDS = ["apple", "river", "stone", "cloud", "green", "quick", "light", "music", "paper", "window", "orange", "silver", "garden", "bridge"]


def _reverse_words(rng: random.Random) -> tuple[str, str, str]:
    words = rng.sample(_WORDS, rng.randint(3, 6))
    out = " ".join(reversed(words))
    return "Reverse the order of the words.", " ".join(words), f"Reversed: {out}\nAnswer: {out}"


def _count_letters(rng: random.Random) -> tuple[str, str, str]:
    word = rng.choice(_WORDS)
    letter = rng.choice(sorted(set(word)))
    n = word.count(letter)
    return f"How many times does the letter '{letter}' appear in the word?", word, f"'{word}' has {n} x '{letter}'\nAnswer: {n}"


_TASKS = [_arithmetic, _convert, _sort, _reverse_words, _count_letters]


def verifiable_task_rows(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` Alpaca rows (instruction/input/output) with an exact ``answer`` field for scoring."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        instruction, inp, output = _TASKS[i % len(_TASKS)](rng)
        rows.append({"instruction": instruction, "input": inp, "output": output, "answer": output.rsplit("Answer: ", 1)[1]})
    return rows


def builtin_rows(name: str, limit: int | None, seed: int) -> list[dict[str, Any]]:
    """Rows of a built-in source by name."""
    if name == "chitchat":
        return chitchat_rows(limit=limit)
    if name == "verifiable_tasks":
        return verifiable_task_rows(limit or 2000, seed=seed)
    raise ValueError(f"unknown builtin source '{name}'; use chitchat or verifiable_tasks")
