"""The template self-check: does a tokenizer's chat template, masked the way preparation masks it, train exactly
what the model emits at inference? (``sft-pipeline check-template``, and the first step of every preparation.)

Sentinel conversations of many shapes (``SHAPES``) are planned and labelled by the same code as the data, and for
every trained turn the check asserts:

1. the turn's content, reasoning and tool-call text are inside its labels (where the template renders them at
   all: a template that never renders reasoning passes with the note "drops reasoning_content");
2. no other message's text is labelled (no user, system or tool text, no other turn, no header);
3. the last labelled token is a stop token;
4. the labelled ids equal the inference-form target ids token for token: the ids the model emits after
   ``render(messages[:k], add_generation_prompt=True)``, tokenized on their own.

A shape the template refuses (it raises) is "rejected by the template", with its message, and is no failure.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from transformers import PreTrainedTokenizerBase

from sft_engine.chat import (
    Labeler,
    Planned,
    Planner,
    RenderFailed,
    TemplateError,
    inference_target,
    plan_conversation,
    trained_turns,
)
from sft_engine.config import HistoryPolicy, MaskStrategy
from sft_engine.constants import IGNORE_INDEX
from sft_engine.curation.schema import dumps, template_messages, template_tools

Row = dict[str, Any]


def _m(role: str, content: str, **extra: Any) -> dict[str, Any]:
    return {"role": role, "content": content, **extra}


_TOOLS = [dumps({"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}})]


def _call(call_id: str, city: str) -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": "get_weather", "arguments": dumps({"city": city})}}


# Every sentinel is one word no template writes and no other sentinel contains.
SHAPES: dict[str, Callable[[], Row]] = {
    "single_turn": lambda: {"messages": [_m("user", "Question quokka1?"), _m("assistant", "Answer wombat1.")]},
    "three_turns": lambda: {"messages": [
        _m("user", "Question quokka1?"), _m("assistant", "Answer wombat1."), _m("user", "Question quokka2?"),
        _m("assistant", "Answer wombat2."), _m("user", "Question quokka3?"), _m("assistant", "Answer wombat3.")]},
    "system_prompt": lambda: {"messages": [
        _m("system", "System numbat1."), _m("user", "Question quokka1?"), _m("assistant", "Answer wombat1."),
        _m("user", "Question quokka2?"), _m("assistant", "Answer wombat2.")]},
    "leading_assistant": lambda: {"messages": [
        _m("assistant", "Context dingo1.", train=False), _m("user", "Question quokka1?"), _m("assistant", "Answer wombat1.")]},
    "tool_call": lambda: {"tools": _TOOLS, "messages": [
        _m("user", "Weather quokka1 in two cities?"),
        _m("assistant", "", tool_calls=[_call("abcde1234", "zurichcity1"), _call("fghij5678", "genevacity2")]),
        _m("tool", "Sunny bilby1.", tool_call_id="abcde1234", name="get_weather"),
        _m("tool", "Rainy bilby2.", tool_call_id="fghij5678", name="get_weather"),
        _m("assistant", "Answer wombat1.")]},
    "reasoning_every_turn": lambda: {"messages": [
        _m("user", "Question quokka1?"), _m("assistant", "Answer wombat1.", reasoning_content="Thought platypus1."),
        _m("user", "Question quokka2?"), _m("assistant", "Answer wombat2.", reasoning_content="Thought platypus2.")]},
    "reasoning_last_turn": lambda: {"messages": [
        _m("user", "Question quokka1?"), _m("assistant", "Answer wombat1."),
        _m("user", "Question quokka2?"), _m("assistant", "Answer wombat2.", reasoning_content="Thought platypus2.")]},
    "padded_whitespace": lambda: {"messages": [
        _m("user", "  Question quokka1?  "), _m("assistant", "\n  Answer wombat1.  \n"),
        _m("user", "Question quokka2?\n\n"), _m("assistant", "  Answer wombat2.")]},
}

# The sentinel words of each message: what must (its own turn) or must not (any other turn) be labelled.
_SENTINEL = re.compile(r"(?:quokka|wombat|numbat|dingo|bilby|platypus|zurichcity|genevacity)\d+")
_FIELD_OF = {"platypus": "reasoning_content", "zurichcity": "tool_calls", "genevacity": "tool_calls"}


def _sentinels(text: str | None) -> list[str]:
    return _SENTINEL.findall(text or "")


@dataclass
class ShapeResult:
    """The outcome for one shape: ``pass``, ``fail`` or ``rejected`` (the template raised), why, and notes."""

    shape: str
    result: str
    why: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    samples: int = 0
    trained_turns: int = 0


@dataclass
class CheckReport:
    """Every shape's result for one template, and the verdict: ``ok`` when no shape the template accepts fails."""

    template: str
    results: list[ShapeResult]
    kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(r.result != "fail" for r in self.results)

    @property
    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.results:
            out[r.result] = out.get(r.result, 0) + 1
        return out

    def as_dict(self) -> dict[str, Any]:
        return {"template": self.template, "ok": self.ok, "counts": self.counts, "kwargs": self.kwargs,
                "results": [asdict(r) for r in self.results]}


def _check_shape(name: str, row: Row, planner: Planner, labeler: Labeler, tokenizer: PreTrainedTokenizerBase) -> ShapeResult:
    messages = template_messages(row["messages"])
    tools = template_tools(row.get("tools"))
    kwargs: dict[str, Any] = {}
    weights = [1.0] * len(messages)
    chosen = trained_turns(row["messages"], planner.strategy)
    try:
        _, samples = plan_conversation(planner.render, messages, tools, kwargs, chosen, planner.history, planner.stops, weights)
    except RenderFailed as exc:
        # Only the template's own refusal is a rejection; no inference form for a turn is our failure.
        # The template's own refusal, or reasoning its configured prompt cannot emit, is a rejection; a turn with
        # no inference form is our failure.
        return ShapeResult(name, "fail" if exc.reason == "mask_prompt_not_prefix" else "rejected", [str(exc)])
    res = ShapeResult(name, "pass", samples=len(samples), trained_turns=len(chosen))
    tok = labeler.label(Planned([samples]))
    if tok.drop_reason[0] is not None:
        return ShapeResult(name, "fail", [f"no sample trains: {tok.drop_reason[0]}"], samples=len(samples), trained_turns=len(chosen))
    backend = tokenizer.backend_tokenizer
    anchor, anchor_len = labeler.anchor, labeler._anchor_len
    own = {i: _sentinels(m.get("content")) + _sentinels(m.get("reasoning_content"))
           + _sentinels(dumps(m.get("tool_calls") or []))
           for i, m in enumerate(messages)}
    for k in chosen:
        where = [(si, j) for si, s in enumerate(samples) for j, t in enumerate(s.turns) if t == k]
        if len(where) != 1:
            res.why.append(f"turn {k} is trained in {len(where)} samples, expected 1")
            continue
        si, j = where[0]
        sample = samples[si]
        ids, labels = tok.input_ids[si], tok.labels[si]
        # Each target is one run of labelled tokens, in text order, whichever way the sample was tokenized.
        runs = _runs(labels != IGNORE_INDEX)
        order = sorted(range(len(sample.spans)), key=lambda x: sample.spans[x][0])
        if len(runs) != len(sample.spans):
            res.why.append(f"turn {k}: {len(runs)} runs of labels for {len(sample.spans)} targets")
            continue
        lo, hi = runs[order.index(j)]
        idx = np.arange(lo, hi)
        enc = backend.encode(sample.text, add_special_tokens=False)
        if len(ids) == len(enc.ids) and np.array_equal(ids, np.asarray(enc.ids)):
            a, b = sample.spans[j]
            starts = np.asarray([o[0] for o in enc.offsets])
            if not np.array_equal(idx, np.flatnonzero((starts >= a) & (starts < b))):
                res.why.append(f"turn {k}: labels do not cover exactly the target")
        got = ids[idx].tolist()
        text = tokenizer.decode(got)
        target = inference_target(planner.render, messages, k, tools, kwargs, planner.stops)
        rendered = target.prompt + target.text
        # What the template itself renders of the turn must train, whatever the target-finding code decided.
        turn = planner.render(messages[: k + 1], tools, False, kwargs)
        for word in own[k]:
            if word not in turn and word not in target.text:
                note = f"the template drops {_FIELD_OF.get(word.rstrip('0123456789'), 'content')}"
                if note not in res.notes:
                    res.notes.append(note)
            elif word not in text:
                res.why.append(f"turn {k}: '{word}' is rendered but not labelled")
        for i, words in own.items():
            if i != k:
                leaked = [w for w in words if w in text]
                if leaked:
                    res.why.append(f"turn {k}: labels hold text of message {i} ({', '.join(leaked)})")
        if not got or got[-1] not in planner.stops.ids:
            res.why.append(f"turn {k}: the last labelled token {tokenizer.convert_ids_to_tokens(got[-1:])} is not a stop token")
        p_ids = backend.encode(target.prompt, add_special_tokens=False).ids
        f_ids = backend.encode(rendered, add_special_tokens=False).ids
        expected = f_ids[len(p_ids):] if f_ids[: len(p_ids)] == p_ids else backend.encode(anchor + target.text, add_special_tokens=False).ids[anchor_len:]
        if got != expected:
            res.why.append(f"turn {k}: labelled ids differ from the inference-form target ids ({len(got)} vs {len(expected)} tokens)")
    if res.why:
        res.result = "fail"
    return res


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) of each run of True."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(np.int8), [0]])))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist(), strict=True))


def check_template(
    tokenizer: PreTrainedTokenizerBase, kwargs: dict[str, Any] | None = None, history: HistoryPolicy = HistoryPolicy.EXPAND,
    extra_stop_ids: tuple[int, ...] = (), name: str = "",
) -> CheckReport:
    """Run every shape through the masking code for ``tokenizer``'s template (see the module docstring)."""
    planner = Planner(tokenizer, MaskStrategy.ALL_ASSISTANT, history, kwargs, extra_stop_ids)
    labeler = Labeler(tokenizer)
    results = []
    for shape, build in SHAPES.items():
        try:
            results.append(_check_shape(shape, build(), planner, labeler, tokenizer))
        except TemplateError as exc:
            results.append(ShapeResult(shape, "fail", [str(exc)]))
    return CheckReport(name, results, dict(kwargs or {}))


def format_report(report: CheckReport) -> str:
    """The report as a plain table, one line per shape."""
    width = max(len(s) for s in SHAPES)
    lines = [f"template check: {report.template or '(tokenizer template)'}" + (f"  kwargs {report.kwargs}" if report.kwargs else "")]
    for r in report.results:
        detail = "; ".join(r.why) or "; ".join(r.notes)
        lines.append(f"  {r.shape:<{width}}  {r.result:<8}  samples {r.samples}  trained turns {r.trained_turns}  {detail}")
    counts = report.counts
    lines.append(f"  {'verdict':<{width}}  {'ok' if report.ok else 'FAILED'}  ({', '.join(f'{v} {k}' for k, v in sorted(counts.items()))})")
    return "\n".join(lines)
