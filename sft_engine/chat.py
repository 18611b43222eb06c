"""Chat templates and loss masks: a sample trains exactly the tokens the model must emit at inference.

For each assistant turn k that the strategy trains (``prepare.mask``; a message with ``train: false`` or
``weight: 0`` never trains), with ``prompt_k = render(messages[:k], add_generation_prompt=True)`` and
``turn_k = render(messages[:k+1])``:

    target_k = turn_k[len(prompt_k):], up to and including its first stop token

That is what a server sends the model (prompt_k) and what the model then writes: an empty ``<think></think>``
block or a channel header the template makes it emit, the reply, its tool calls, and the stop token. Role
headers, system prompts, user text and tool results are never in a target. Stop tokens (``stop_tokens``): the
tokenizer's eos and the model's ``generation_config.eos_token_id`` first; where neither follows a reply, the
template's own end of turn (the last control token it writes after a reply whatever follows, and after tool calls
the first one that is not part of the calls' syntax).

Where a target lands:

* in place: the whole conversation's render starts with ``prompt_k + target_k``: turn k is labelled there, and a
  conversation whose turns are all in place is one sample (ChatML, Llama 3, Phi-3.5, Gemma-2...);
* history rewritten (Qwen3 drops earlier reasoning and think blocks, gpt-oss ends earlier turns with ``<|end|>``
  not ``<|return|>``, Hermes closes tool results differently before a reply): ``prepare.history`` decides.
  ``expand`` (default) adds a sample ``prompt_k + target_k`` with loss on target_k only; ``last_only`` does that for
  the last assistant turn alone; ``context_only`` leaves such turns as context. The extra tokens are counted;
* no stop token after a reply (the template ends a turn with plain text, or nothing): the model's eos is
  appended to the target and trained (a turn other than the last then needs a sample of its own);
* the prompt is not a prefix of the turn's own render (``inference_target``): the prompt opens a thinking block
  (GLM-4.7, Nemotron, DeepSeek-R1 distills with ``enable_thinking``), closes an empty one (Gemma-4, DeepSeek-V3.2,
  Command-R7B), or moves the system prompt into the last user turn (Mistral-Nemo). The target is what follows the
  prompt in the turn rendered with its fields in place (reasoning empty where the turn has none), always in a
  sample of its own. Reasoning that a prompt with thinking off cannot emit drops the row (``mask_reasoning_disabled``).

Tokens: a token trains when its first character lies in a target. The prompt's token ids must be a prefix of
prompt + target's (a BPE merge across the boundary would train a token the model never emits after that
prompt): checked at every target start (``Labeler``); where it fails the sample is tokenized piece by
piece (each target on its own, as after a special token), and counted. The first label of a sample is always
ignored, so packed samples never learn across a boundary.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from transformers import PreTrainedTokenizerBase
from transformers.utils.chat_template_utils import _compile_jinja_template

from sft_engine.config import HistoryPolicy, MaskStrategy
from sft_engine.constants import IGNORE_INDEX
from sft_engine.curation.schema import template_messages, template_tools
from sft_engine.errors import UserError

_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")
# What a generation prompt may add beyond the rendered turn: a think block it opens (or opens and closes).
_THINK_OPEN = re.compile(r"\s*<think>\s*")
THINK_CLOSE = "\n</think>\n\n"

# Drop reasons preparation gives a conversation.
PREPARE_REASONS = {
    "mask_template_rejected": "the chat template raised an error on this conversation (e.g. a role it does not accept)",
    "mask_template_needs_tools": "the chat template fails without tools and the row has none",
    "mask_prompt_not_prefix": "the inference prompt of a turn is not a prefix of the turn's render (e.g. reasoning with "
    "enable_thinking=false), so there is no inference form to train",
    "mask_template_drops_tool_calls": "the conversation has tool calls and the chat template renders none of them (it "
    "has no tool-call support): its turns would train as empty replies",
    "mask_reasoning_disabled": "an assistant turn has reasoning but its inference prompt closes thinking (e.g. "
    "enable_thinking=false): set prepare.chat_template_kwargs (or the row's) to turn thinking on, or drop the reasoning",
    "mask_no_supervised_tokens": "no token of the conversation is trained (every assistant turn has train: false or weight 0)",
}


class TemplateError(UserError, ValueError):
    """The tokenizer's chat template cannot be used for training; the message says why and what to do (exit 4)."""

    exit_code = 4


class RenderFailed(Exception):
    """The template raised on one conversation; ``reason`` is a drop reason of ``PREPARE_REASONS``."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def _template_text(tokenizer: PreTrainedTokenizerBase) -> str:
    tpl = tokenizer.chat_template
    if not isinstance(tpl, str) or not tpl:
        raise TemplateError(
            "the tokenizer has no chat template; pick a model folder whose tokenizer_config.json has 'chat_template', "
            "or set tokenizer.chat_template before preparing"
        )
    return tpl


class Renderer:
    """One tokenizer's chat template, compiled once in transformers' immutable sandbox, rendering template-form
    conversations (``schema.template_messages``) with tools and chat_template_kwargs."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, kwargs: dict[str, Any] | None = None) -> None:
        self.template = _template_text(tokenizer)
        self._compiled = _compile_jinja_template(self.template)
        self._special = {k: v for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)}
        self.kwargs = dict(kwargs or {})
        self.has_generation_tags = bool(_GENERATION_TAG.search(self.template))
        # Templates that read the reasoning under another name (gpt-oss: ``thinking``; Laguna, Hy3: ``reasoning``)
        # get it under that name too.
        self.aliases = tuple(a for a in ("thinking", "reasoning") if re.search(rf"\.{a}\b|\[['\"]{a}['\"]\]", self.template))
        # Multi-character added tokens, longest first, to cut a divergence between tokens (``_token_start``).
        texts = sorted((t for t in _added_texts(tokenizer) if len(t) > 1), key=len, reverse=True)
        self.added_pattern = re.compile("|".join(map(re.escape, texts))) if texts else None

    def __call__(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None, add_generation_prompt: bool = False,
        kwargs: dict[str, Any] | None = None,
    ) -> str:
        extra = {**self.kwargs, **(kwargs or {})}
        if self.aliases:
            messages = [
                {**m, **{a: m["reasoning_content"] for a in self.aliases}} if m.get("reasoning_content") is not None else m
                for m in messages
            ]
        try:
            return self._compiled.render(
                messages=messages, tools=tools or None, add_generation_prompt=add_generation_prompt, **self._special, **extra
            )
        except Exception as exc:  # noqa: BLE001 - a template's raise_exception or any Jinja error quarantines the row
            raise RenderFailed("mask_template_rejected", f"{type(exc).__name__}: {str(exc)[:300]}") from None


# ---- stop tokens ----------------------------------------------------------------------------------

_PROBE_REPLY = "Probe reply one two."
_PROBE_TOOLS = [{"type": "function", "function": {
    "name": "probe_tool", "description": "A probe tool.",
    "parameters": {"type": "object", "properties": {"probe_arg": {"type": "string", "description": "A probe argument."}},
                   "required": ["probe_arg"]}}}]


def _probe_call(i: int) -> dict[str, Any]:
    return {"id": f"call_probe{i}", "type": "function", "function": {"name": "probe_tool", "arguments": {"probe_arg": f"probe-value-{i}"}}}


@dataclass(frozen=True)
class Stops:
    """Token ids that end a turn at inference and their texts: ``declared`` (eos and the generation config's eos
    ids, the model's own word) and ``found`` (the end of turn the template writes after a reply or a tool call
    where no declared one follows it). ``append``: the text added to a reply the template ends without any."""

    ids: frozenset[int]
    declared: tuple[str, ...]
    found: tuple[str, ...]
    append: str | None

    def first_end(self, text: str) -> int | None:
        """The end of the first declared stop token in ``text``, else of the first found one, else None."""
        for texts in (self.declared, self.found):
            best = None
            for t in texts:
                i = text.find(t)
                if i >= 0 and (best is None or i < best[0]):
                    best = (i, i + len(t))
            if best is not None:
                return best[1]
        return None


def _added_texts(tokenizer: PreTrainedTokenizerBase, special_only: bool = False) -> dict[str, int]:
    """Added token text -> id (``special_only``: only control tokens such as ``<|im_end|>``, not tags such as
    Qwen's ``</tool_call>``, which the model writes in the middle of a turn)."""
    return {tok.content: i for i, tok in tokenizer.added_tokens_decoder.items() if tok.special or not special_only}


def _first_control(text: str, control: dict[str, int], skip: str = "") -> str | None:
    """The first control token in ``text`` that does not also occur in ``skip``."""
    hits = [(text.find(t), t) for t in control if t and t not in skip and text.find(t) >= 0]
    return min(hits)[1] if hits else None


def _reply_tail(render_probe: Callable[[list[dict[str, Any]], Any], str | None], user: dict[str, Any], reply: dict[str, Any]) -> str | None:
    """What the template writes after a reply whatever follows it: the common start of the text after a reply that
    ends the conversation and after one followed by a user turn (a template may end a conversation with more, as
    Phi-3.5 appends eos; the next turn's header is not the reply's). A template that refuses the three-message
    probe is read from the two-message one alone."""
    two = render_probe([user, reply], None)
    if two is None or _PROBE_REPLY not in two:
        return None
    tail = two[two.rfind(_PROBE_REPLY) + len(_PROBE_REPLY):]
    three = render_probe([user, reply, {"role": "user", "content": "Probe question two?"}], None)
    if three is None or _PROBE_REPLY not in three:
        return tail
    after = three[three.rfind(_PROBE_REPLY) + len(_PROBE_REPLY):]
    return tail[: _common_prefix(tail, after)]


def stop_tokens(tokenizer: PreTrainedTokenizerBase, render: Renderer, extra_ids: Sequence[int] = ()) -> Stops:
    """The stop tokens: eos and ``extra_ids`` (a generation config's eos ids), and where none of those follows a
    reply, the template's own end of turn: the last control token between a probe reply and the next user turn
    (``<|im_end|>``, ``<|eot_id|>``, ``<|end|>``, Kimi-K3's ``<|end_of_msg|>``...), and after the last of two probe tool calls the first control token that is not
    part of the calls' own syntax (it does not occur between them: Gemma-4's ``<|tool_response>``, not its
    ``<tool_call|>``)."""
    control = _added_texts(tokenizer, special_only=True)
    declared_ids = {int(i) for i in extra_ids}
    if tokenizer.eos_token_id is not None:
        declared_ids.add(int(tokenizer.eos_token_id))
    by_id = {i: t for t, i in _added_texts(tokenizer).items()}
    declared = {by_id.get(i) or tokenizer.decode([i]) for i in declared_ids} - {""}

    def render_probe(msgs: list[dict[str, Any]], tools: Any) -> str | None:
        for attempt in (tools, _PROBE_TOOLS):
            try:
                return render(msgs, attempt, False)
            except RenderFailed:
                continue
        return None

    found: set[str] = set()
    user = {"role": "user", "content": "Probe question?"}
    reply = {"role": "assistant", "content": _PROBE_REPLY}
    tail = _reply_tail(render_probe, user, reply) or ""
    structural = tail  # control tokens a reply's end has besides its end of turn are not the end of a call either
    if tail and not any(t in tail for t in declared):
        hits = [(tail.rfind(t), t) for t in control if t and t in tail]
        if hits:
            end = max(hits)[1]
            found.add(end)
            structural = tail.replace(end, "")
    calls = render_probe([user, {"role": "assistant", "content": "", "tool_calls": [_probe_call(1), _probe_call(2)]}], _PROBE_TOOLS)
    if calls is not None and "probe-value-1" in calls and "probe-value-2" in calls:
        a, b = calls.find("probe-value-1"), calls.rfind("probe-value-2")
        tail = calls[b + len("probe-value-2"):]
        if not any(t in tail for t in declared) and (end := _first_control(tail, control, skip=calls[a:b] + structural)):
            found.add(end)
    if not declared and not found:
        raise TemplateError(
            "no stop token: the tokenizer has no eos token and the chat template ends a reply with no special token; "
            "set eos_token in tokenizer_config.json (or eos_token_id in generation_config.json) so the model can learn to stop"
        )
    eos = tokenizer.eos_token if isinstance(tokenizer.eos_token, str) and tokenizer.eos_token else None
    ids = declared_ids | {control[t] for t in found}
    return Stops(frozenset(ids), _longest_first(declared), _longest_first(found - declared), eos)


def _longest_first(texts: set[str]) -> tuple[str, ...]:
    return tuple(sorted(texts, key=len, reverse=True))


# ---- planning: which text trains, per conversation ------------------------------------------------


@dataclass
class Sample:
    """One training sequence of a conversation: its text and the character spans that train, each with its
    turn (message index) and weight. ``expanded``: a turn trained in its inference form, outside the
    conversation's own render."""

    text: str
    spans: list[tuple[int, int]] = field(default_factory=list)
    turns: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    expanded: bool = False
    appended_stop: int = 0
    spliced: int = 0


def trained_turns(messages: list[dict[str, Any]], strategy: MaskStrategy) -> list[int]:
    """Indices of the assistant messages that carry a loss under ``strategy`` (train: false or weight 0: never)."""
    def trains(m: dict[str, Any]) -> bool:
        return m.get("train") is not False and (m.get("weight") is None or m["weight"] > 0)

    idx = [i for i, m in enumerate(messages) if m["role"] == "assistant" and trains(m)]
    if strategy is MaskStrategy.LAST_ASSISTANT:
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
        return [last] if last is not None and last in idx else []
    return idx


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


@dataclass(frozen=True)
class Target:
    """A turn's inference form: its prompt, the text the model writes after it, and how that text was found."""

    prompt: str
    text: str
    appended_stop: bool
    spliced: bool


# Probe slots for a turn's own fields (other private-use code points than the fast path's placeholders).
_PROBE_CONTENT, _PROBE_REASONING = "\ue002c\ue003", "\ue002r\ue003"


def _token_start(render: Renderer, text: str, c: int) -> int:
    """``c`` moved back to the start of a control token or an unclosed tag (``<think>``, ``<|START_THINKING|>``)
    that straddles it: a divergence found character by character must be cut between tokens, not inside one."""
    base = max(0, c - 64)
    if render.added_pattern is not None:
        for m in render.added_pattern.finditer(text, base, c + 64):
            if m.start() < c < m.end():
                return m.start()
    lt, gt = text.rfind("<", 0, c), text.rfind(">", 0, c)
    if lt > gt and c - lt <= 40:
        return lt
    return c


def _shared_tail(render: Renderer, a: str, b: str) -> int:
    """The length of the longest common suffix of ``a`` and ``b`` that starts at a token boundary of ``b``."""
    n = 0
    while n < min(len(a), len(b)) and a[-1 - n] == b[-1 - n]:
        n += 1
    cut = len(b) - n
    start = _token_start(render, b, cut)
    if start == cut:
        return n
    # The shared characters begin inside a token: only what follows that token is shared.
    m = render.added_pattern.match(b, start) if render.added_pattern is not None else None
    end = m.end() if m else b.find(">", cut) + 1
    return max(0, len(b) - end) if end > 0 else 0


def inference_target(render: Renderer, msgs: list[dict[str, Any]], k: int, tools: Any, kwargs: dict[str, Any], stops: Stops) -> Target:
    """Turn k's prompt and the text the model writes after it; ``RenderFailed`` when there is no consistent one.

    Normally the prompt is a prefix of the turn's render and the target is the rest. Where it is not, the turn is
    rendered again with probe slots in its content and reasoning:

    * the prompt opens a thinking block the turn renders only with reasoning (GLM-4.7, Nemotron, Command-A): with
      a reasoning slot the prompt is a prefix, and the target is the rest, reasoning empty where the turn has none;
    * a prompt that opens ``<think>`` on a template that never renders reasoning (DeepSeek-R1 distills): the
      reasoning and R1's ``\n</think>\n\n``, then the turn's fields;
    * otherwise (the prompt closes an empty thinking block, as Gemma-4, DeepSeek-V3.2 and Command-R7B do; moves the
      system prompt into the last user turn, as Mistral-Nemo does; or closes the previous message differently, as
      Hermes does after tool results): the target is the turn from where the prompt's header ends: its own fields
      (first slot, or where an empty reply would diverge), preceded by whatever header text the prompt lacks when
      the prompt ends with something else entirely.

    A turn with reasoning whose prompt closes thinking (enable_thinking=false and the like) has none:
    ``mask_reasoning_disabled``.
    """
    prompt = render(msgs[:k], tools, True, kwargs)
    turn = render(msgs[: k + 1], tools, False, kwargs)
    if turn.startswith(prompt):
        return _cut(prompt, turn[len(prompt):], False, stops)
    msg = msgs[k]
    reasoning = msg.get("reasoning_content") or ""
    probe_msg = dict(msg)
    if msg.get("content"):
        probe_msg["content"] = _PROBE_CONTENT
    if reasoning:
        probe_msg["reasoning_content"] = _PROBE_REASONING

    def fill(text: str) -> str:
        return text.replace(_PROBE_REASONING, reasoning).replace(_PROBE_CONTENT, msg.get("content") or "")

    probe = render([*msgs[:k], probe_msg], tools, False, kwargs)
    if not reasoning:
        thinking = render([*msgs[:k], {**probe_msg, "reasoning_content": _PROBE_REASONING}], tools, False, kwargs)
        if thinking.startswith(prompt):
            return _cut(prompt, fill(thinking[len(prompt):]), True, stops)
    c = _token_start(render, prompt, _common_prefix(prompt, probe))
    added = prompt[c:]
    slots = [i for i in (probe.find(_PROBE_CONTENT, c), probe.find(_PROBE_REASONING, c)) if i >= 0]
    if slots:
        start = min(slots)
    else:  # a reply of tool calls alone: its fields start where an empty reply's render departs from it
        empty = render([*msgs[:k], {"role": msg["role"], "content": ""}], tools, False, kwargs)
        start = max(c, _token_start(render, probe, _common_prefix(empty, probe)))
    body = fill(probe[start:])
    if _THINK_OPEN.fullmatch(added) and _PROBE_REASONING not in probe:
        return _cut(prompt, reasoning + THINK_CLOSE + body, True, stops)
    header = probe[c:start]
    if not _shared_tail(render, added, header):
        body = header + body  # the prompt ends elsewhere (a closed thinking block): the reply's header is the model's
    target = _cut(prompt, body, True, stops)
    own = added[: len(added) - _shared_tail(render, header, added)].strip()
    if own and own in target.text:
        if reasoning and reasoning in target.text:
            raise RenderFailed("mask_reasoning_disabled", f"turn {k} has reasoning but its prompt closes thinking ({own[:40]!r})")
        raise RenderFailed("mask_prompt_not_prefix", f"turn {k}: the prompt adds {own[:40]!r}, which the turn renders after its start")
    return target


def _cut(prompt: str, cont: str, spliced: bool, stops: Stops) -> Target:
    """The target: ``cont`` up to and including its first stop token, else with the eos token appended."""
    end = stops.first_end(cont)
    if end is not None:
        return Target(prompt, cont[:end], False, spliced)
    if stops.append is None:
        raise TemplateError("the template ends a reply without a stop token and the tokenizer has no eos token to append")
    return Target(prompt, cont.rstrip() + stops.append, True, spliced)


def plan_conversation(
    render: Renderer, messages: list[dict[str, Any]], tools: Any, kwargs: dict[str, Any], chosen: list[int] | None,
    history: HistoryPolicy, stops: Stops, weights: list[float],
) -> tuple[str, list[Sample]]:
    """The whole conversation's render and its samples; ``chosen``: the turns that train (None: every token,
    ``mask: everything``). ``RenderFailed`` with a drop reason when the template rejects the conversation."""
    try:
        full = render(messages, tools, False, kwargs)
    except RenderFailed as exc:
        if not tools:
            try:
                render(messages, [_DUMMY_TOOL], False, kwargs)
            except RenderFailed:
                raise exc from None
            raise RenderFailed("mask_template_needs_tools", str(exc)) from None
        raise
    if any(m.get("tool_calls") for m in messages):
        # A template without tool-call support renders such a turn as an empty reply: training that teaches the
        # model to answer nothing where the data calls a tool.
        bare = [{k: v for k, v in m.items() if k != "tool_calls"} for m in messages]
        if render(bare, tools, False, kwargs) == full:
            raise RenderFailed("mask_template_drops_tool_calls", "the chat template renders no tool call of this conversation")
    if chosen is None:
        return full, [Sample(full, [(0, len(full))], [-1], [1.0])]
    base = Sample(full)
    out_of_place: list[tuple[int, Target]] = []
    for k in chosen:
        t = inference_target(render, messages, k, tools, kwargs, stops)
        start = len(t.prompt)
        if not t.spliced and not t.appended_stop and full.startswith(t.prompt + t.text):
            base.spans.append((start, start + len(t.text)))
        elif not t.spliced and t.appended_stop and k == len(messages) - 1 and full.rstrip() == t.prompt + t.text[: -len(stops.append or "")]:
            # The last reply ends the render: the stop token is appended to the conversation itself.
            base.text = t.prompt + t.text
            base.spans.append((start, len(base.text)))
            base.appended_stop += 1
        else:
            out_of_place.append((k, t))
            continue
        base.turns.append(k)
        base.weights.append(weights[k])
    if history is HistoryPolicy.CONTEXT_ONLY:
        keep = []
    elif history is HistoryPolicy.LAST_ONLY:
        keep = out_of_place[-1:] if out_of_place and out_of_place[-1][0] == chosen[-1] else []
    else:
        keep = out_of_place
    extra = [
        Sample(t.prompt + t.text, [(len(t.prompt), len(t.prompt) + len(t.text))], [k], [weights[k]], True, int(t.appended_stop), int(t.spliced))
        for k, t in keep
    ]
    return full, ([base] if base.spans else []) + extra


_DUMMY_TOOL = {"type": "function", "function": {"name": "noop", "description": "Does nothing.", "parameters": {"type": "object", "properties": {}}}}


# ---- the fast path: one placeholder plan per conversation structure ---------------------------------

# Private-use code points: no template rewrites them and no real text contains them.
_SLOT = "\ue000{}\ue001"
_SLOT_RE = re.compile("\ue000(\\d+)\ue001")


@dataclass(frozen=True)
class _Shape:
    """A sample of a conversation structure with slots where message fields go: ``pieces`` alternate literal text
    and slot numbers (2i: content of message i, 2i+1: its reasoning); spans as (piece, offset) pairs, an offset of
    -1 meaning the end of a slot."""

    pieces: tuple[str | int, ...]
    spans: tuple[tuple[tuple[int, int], tuple[int, int]], ...]
    turns: tuple[int, ...]
    expanded: bool
    appended_stop: int
    spliced: int


def _shape(sample: Sample) -> _Shape | None:
    pieces: list[str | int] = []
    bounds: list[tuple[int, int, int]] = []  # (start, end, piece index) of each slot in the placeholder text
    pos = 0
    for m in _SLOT_RE.finditer(sample.text):
        pieces.append(sample.text[pos : m.start()])
        bounds.append((m.start(), m.end(), len(pieces)))
        pieces.append(int(m.group(1)))
        pos = m.end()
    pieces.append(sample.text[pos:])
    slots = [p for p in pieces if isinstance(p, int)]
    if len(slots) != len(set(slots)):
        return None  # a field rendered twice: its real text decides, not a placeholder

    def locate(x: int) -> tuple[int, int] | None:
        lit_start = 0
        for a, b, idx in bounds:
            if x < a:
                return idx - 1, x - lit_start
            if x == a:
                return idx, 0
            if x == b:
                return idx, -1
            if a < x < b:
                return None
            lit_start = b
        return len(pieces) - 1, x - lit_start

    spans = []
    for a, b in sample.spans:
        la, lb = locate(a), locate(b)
        if la is None or lb is None:
            return None
        spans.append((la, lb))
    return _Shape(tuple(pieces), tuple(spans), tuple(sample.turns), sample.expanded, sample.appended_stop, sample.spliced)


def _fill(shape: _Shape, values: list[str], weights: list[float], whole: tuple[_Shape, str, list[int]] | None = None) -> Sample:
    """The sample of ``shape`` for a conversation's slot ``values``. ``whole``: the conversation's shape, its verified
    render and its pieces' lengths; a sample with the same pieces (every turn in place) is that text."""
    if whole is not None and whole[0].pieces == shape.pieces:
        text, lengths = whole[1], whole[2]
    else:
        chunks = [p if p.__class__ is str else values[p] for p in shape.pieces]  # type: ignore[index]
        text = "".join(chunks)  # type: ignore[arg-type]
        lengths = [len(c) for c in chunks]
    starts, pos = [], 0
    for n in lengths:
        starts.append(pos)
        pos += n

    def at(loc: tuple[int, int]) -> int:
        idx, off = loc
        return starts[idx] + (lengths[idx] if off == -1 else off)

    return Sample(text, [(at(a), at(b)) for a, b in shape.spans], list(shape.turns), [weights[k] for k in shape.turns],
                  shape.expanded, shape.appended_stop, shape.spliced)


def _placeholders(messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
    """The conversation with a slot in place of each content and reasoning, and the real values of the slots."""
    ph, values = [], []
    for i, m in enumerate(messages):
        q = {**m, "content": _SLOT.format(2 * i)}
        if m.get("reasoning_content") is not None:
            q["reasoning_content"] = _SLOT.format(2 * i + 1)
        ph.append(q)
        values += [m["content"], m.get("reasoning_content") or ""]
    return ph, values


@dataclass
class Planned:
    """A batch's samples per conversation (a drop reason instead where it has none), and what it took."""

    samples: list[list[Sample] | str]
    fast: int = 0
    reasoning_not_rendered: int = 0


class Planner:
    """Plans conversations for one tokenizer. A conversation without tools or tool calls takes its structure's
    placeholder plan (cached per roles, reasoning present, trained turns, kwargs), used only when the filled
    placeholder render of the whole conversation equals its real render character for character; any other
    conversation, or one whose render differs (a template that trims or rewrites content), is planned on its own
    text."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, strategy: MaskStrategy, history: HistoryPolicy,
                 kwargs: dict[str, Any] | None = None, extra_stop_ids: Sequence[int] = ()) -> None:
        self.render = Renderer(tokenizer, kwargs)
        self.strategy, self.history = strategy, history
        self.stops = stop_tokens(tokenizer, self.render, extra_stop_ids)
        self._cache: dict[tuple[Any, ...], tuple[_Shape, list[_Shape]] | None] = {}

    def plan(self, rows: Sequence[dict[str, Any]]) -> Planned:
        """``rows``: canonical rows (``messages``, optional ``tools`` and ``chat_template_kwargs``)."""
        out = Planned([])
        for row in rows:
            messages = template_messages(row["messages"])
            tools = template_tools(row.get("tools"))
            kwargs = json.loads(row["chat_template_kwargs"]) if row.get("chat_template_kwargs") else {}
            weights = [1.0 if (w := m.get("weight")) is None else float(w) for m in row["messages"]]
            chosen = None if self.strategy is MaskStrategy.EVERYTHING else trained_turns(row["messages"], self.strategy)
            samples: list[Sample] | str | None = None
            if not tools and chosen is not None and not any(m.get("tool_calls") for m in messages):
                samples = self._fast(messages, kwargs, chosen, weights)
                out.fast += samples is not None
            if samples is None:
                try:
                    samples = plan_conversation(self.render, messages, tools, kwargs, chosen, self.history, self.stops, weights)[1]
                except RenderFailed as exc:
                    samples = exc.reason
            samples = samples or "mask_no_supervised_tokens"
            if not isinstance(samples, str) and any(m.get("reasoning_content") for m in messages):
                # Kept, but counted: a template that never renders reasoning trains the replies alone.
                texts = "".join(s.text for s in samples)
                out.reasoning_not_rendered += not all(m["reasoning_content"] in texts for m in messages if m.get("reasoning_content"))
            out.samples.append(samples)
        return out

    def _fast(self, messages: list[dict[str, Any]], kwargs: dict[str, Any], chosen: list[int], weights: list[float]) -> list[Sample] | None:
        key = (tuple((m["role"], "reasoning_content" in m, m.get("name"), m.get("tool_call_id")) for m in messages),
               tuple(chosen), json.dumps(kwargs, sort_keys=True) if kwargs else "")
        if key not in self._cache:
            ph, _ = _placeholders(messages)
            try:
                full, planned = plan_conversation(self.render, ph, None, kwargs, chosen, self.history, self.stops, [1.0] * len(messages))
                shapes = [_shape(s) for s in planned]
                whole = _shape(Sample(full))
                self._cache[key] = None if whole is None or any(x is None for x in shapes) else (whole, shapes)  # type: ignore[misc]
            except RenderFailed:
                self._cache[key] = None  # rejected with placeholders: the real text decides
        cached = self._cache[key]
        if cached is None:
            return None
        whole, shapes = cached
        values = []
        for m in messages:
            values.append(m["content"])
            values.append(m.get("reasoning_content") or "")
        try:
            real = self.render(messages, None, False, kwargs)
        except RenderFailed:
            return None
        chunks = [p if p.__class__ is str else values[p] for p in whole.pieces]  # type: ignore[index]
        if real != "".join(chunks):  # type: ignore[arg-type]
            return None
        lengths = [len(c) for c in chunks]
        return [_fill(s, values, weights, (whole, real, lengths)) for s in shapes]


# ---- tokens and labels ---------------------------------------------------------------------------


@dataclass
class Tokenized:
    """Tokenized samples (several per conversation where turns were expanded) with labels and per-token loss
    weights; ``row_of[i]`` is the conversation of sample i. ``drop_reason[r]`` is set where conversation r has none."""

    input_ids: list[np.ndarray]
    labels: list[np.ndarray]
    weights: list[np.ndarray | None]
    row_of: list[int]
    drop_reason: list[str | None]
    stats: dict[str, int] = field(default_factory=dict)


def _anchor(tokenizer: PreTrainedTokenizerBase) -> str:
    """An added token after which a text is tokenized as a fresh segment (no prefix space, no merge with what precedes)."""
    for t in (tokenizer.eos_token, tokenizer.bos_token, tokenizer.pad_token):
        if isinstance(t, str) and t:
            return t
    added = list(_added_texts(tokenizer))
    if not added:
        raise TemplateError("the tokenizer has no special token at all; add an eos token")
    return added[0]


class Labeler:
    """Tokenizes samples in one fast-tokenizer batch call and labels their spans, checking at every span start
    that the prompt's tokens are a prefix of the sample's (else the sample is tokenized piece by piece)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        self.backend = tokenizer.backend_tokenizer
        self.added_ids = set(tokenizer.added_tokens_decoder)
        self.anchor = _anchor(tokenizer)
        self._anchor_len = len(self.backend.encode(self.anchor, add_special_tokens=False).ids)
        self._windows: dict[str, list[int]] = {}

    def encode(self, texts: list[str]) -> list[Any]:
        return self.backend.encode_batch(texts, add_special_tokens=False)

    def _window_ids(self, text: str) -> list[int]:
        if text not in self._windows:
            self._windows[text] = self.backend.encode(text, add_special_tokens=False).ids
        return self._windows[text]

    def _prefix_ok(self, text: str, enc: Any, ids: list[int], a: int) -> bool:
        """Do the tokens of ``text[:a]`` alone equal the sample's tokens before position a?

        Tokenization restarts after an added token, so only the stretch from the last one before ``a`` can differ:
        that window is tokenized alone (memoized: it is the same header in almost every sample) and compared.
        """
        t = enc.char_to_token(a)
        if t is None or enc.token_to_chars(t)[0] != a:
            return False  # a token straddles the boundary: a merge across prompt and target
        j = t - 1
        added = self.added_ids
        while j >= 0 and ids[j] not in added:
            j -= 1
        w = enc.token_to_chars(j)[0] if j >= 0 else 0
        window = text[w:a]
        expected = self.backend.encode(window, add_special_tokens=False).ids if len(window) > 256 else self._window_ids(window)
        return expected == ids[max(j, 0) : t]

    def _piecewise(self, sample: Sample) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """The sample tokenized as its prompt, then each target alone (as after a special token), and so on."""
        cuts = sorted({0, len(sample.text), *(x for s in sample.spans for x in s)})
        ids_parts, lab_parts, w_parts = [], [], []
        span_w = {a: w for (a, _), w in zip(sample.spans, sample.weights, strict=True)}
        for a, b in itertools.pairwise(cuts):
            piece = sample.text[a:b]
            if a == 0:
                ids = self.backend.encode(piece, add_special_tokens=False).ids
            else:
                ids = self.backend.encode(self.anchor + piece, add_special_tokens=False).ids[self._anchor_len:]
            arr = np.asarray(ids, dtype=np.int64)
            trained = a in span_w
            ids_parts.append(arr)
            lab_parts.append(arr.copy() if trained else np.full(len(arr), IGNORE_INDEX, dtype=np.int64))
            w_parts.append(np.full(len(arr), span_w.get(a, 0.0) if trained else 0.0, dtype=np.float32))
        weights = np.concatenate(w_parts) if any(w != 1.0 for w in sample.weights) else None
        return np.concatenate(ids_parts), np.concatenate(lab_parts), weights

    def label(self, planned: Planned) -> Tokenized:
        """Samples of every conversation of a batch, tokenized in one call and labelled; a conversation left with
        no trained token gets ``mask_no_supervised_tokens`` and contributes no sample."""
        flat: list[Sample] = []
        row_of: list[int] = []
        reasons: list[str | None] = []
        for r, samples in enumerate(planned.samples):
            if isinstance(samples, str):
                reasons.append(samples)
                continue
            reasons.append(None)
            flat += samples
            row_of += [r] * len(samples)
        retokenized = 0
        labelled = []
        for s, enc in zip(flat, self.encode([s.text for s in flat]), strict=True):
            id_list = enc.ids
            ids = np.asarray(id_list, dtype=np.int64)
            if all(self._prefix_ok(s.text, enc, id_list, a) for a, _ in s.spans):
                labels, weights = labels_from_spans(enc, ids, s.spans, s.weights)
            else:
                ids, labels, weights = self._piecewise(s)
                retokenized += 1
            labels[:1] = IGNORE_INDEX
            labelled.append((ids, labels, weights))
        trains = {r for r, (_, labels, _) in zip(row_of, labelled, strict=True) if (labels != IGNORE_INDEX).any()}
        for r in range(len(reasons)):
            if reasons[r] is None and r not in trains:
                reasons[r] = "mask_no_supervised_tokens"
        out = Tokenized([], [], [], [], reasons)
        n = expanded = expanded_tokens = appended = spliced = 0
        for r, s, (ids, labels, weights) in zip(row_of, flat, labelled, strict=True):
            if reasons[r] is not None:
                continue
            out.input_ids.append(ids)
            out.labels.append(labels)
            out.weights.append(None if weights is None else np.where(labels != IGNORE_INDEX, weights, 0.0).astype(np.float32))
            out.row_of.append(r)
            n += 1
            if s.expanded:
                expanded += 1
                expanded_tokens += len(ids)
            appended += s.appended_stop
            spliced += s.spliced
        out.stats = {"boundary_retokenized": retokenized, "fast_path_rows": planned.fast, "reasoning_not_rendered": planned.reasoning_not_rendered,
                     "samples": n, "expanded_samples": expanded, "expanded_tokens": expanded_tokens, "stop_token_appended": appended,
                     "targets_spliced": spliced}
        return out


def labels_from_spans(enc: Any, ids: np.ndarray, spans: list[tuple[int, int]], weights: list[float]) -> tuple[np.ndarray, np.ndarray | None]:
    """Labels (the token id where its first character is in a span, else IGNORE_INDEX) and per-token weights
    (None where every span weighs 1)."""
    labels = np.full(len(ids), IGNORE_INDEX, dtype=np.int64)
    w = np.zeros(len(ids), dtype=np.float32) if any(x != 1.0 for x in weights) else None
    for (a, b), weight in zip(spans, weights, strict=True):
        if b <= a:
            continue
        first, last = enc.char_to_token(a), enc.char_to_token(b - 1)
        if first is None or last is None:
            offsets = np.asarray(enc.offsets, dtype=np.int64).reshape(-1, 2)
            inside = (offsets[:, 0] >= a) & (offsets[:, 0] < b)
            labels[inside] = ids[inside]
            if w is not None:
                w[inside] = weight
            continue
        if enc.token_to_chars(first)[0] < a:
            first += 1
        labels[first : last + 1] = ids[first : last + 1]
        if w is not None:
            w[first : last + 1] = weight
    return labels, w


def tokenize_conversations(
    tokenizer: PreTrainedTokenizerBase, conversations: list[list[dict[str, Any]]], strategy: MaskStrategy = MaskStrategy.ALL_ASSISTANT,
    history: HistoryPolicy = HistoryPolicy.EXPAND, kwargs: dict[str, Any] | None = None, tools: list[Any] | None = None,
) -> Tokenized:
    """Plan, tokenize and label conversations given as canonical messages (tests and previews; the stage batches)."""
    planner = Planner(tokenizer, strategy, history, kwargs)
    rows = [{"messages": c, "tools": (tools or [None] * len(conversations))[i]} for i, c in enumerate(conversations)]
    return Labeler(tokenizer).label(planner.plan(rows))


def mask_preview(
    tokenizer: PreTrainedTokenizerBase, row: dict[str, Any], strategy: MaskStrategy = MaskStrategy.ALL_ASSISTANT,
    history: HistoryPolicy = HistoryPolicy.EXPAND, kwargs: dict[str, Any] | None = None, extra_stop_ids: Sequence[int] = (),
) -> list[list[tuple[str, bool]]]:
    """Each sample of a canonical row as (text piece, supervised) per token, for showing a mask to a person."""
    planned = Planner(tokenizer, strategy, history, kwargs, extra_stop_ids).plan([row])
    if isinstance(planned.samples[0], str):
        raise TemplateError(f"this conversation cannot be masked: {planned.samples[0]}")
    tok = Labeler(tokenizer).label(planned)
    return [
        [(tokenizer.decode([int(i)]), bool(lab != IGNORE_INDEX)) for i, lab in zip(ids, labels, strict=True)]
        for ids, labels in zip(tok.input_ids, tok.labels, strict=True)
    ]


def generation_eos_ids(model_dir: Any) -> list[int]:
    """The eos ids of a model folder's ``generation_config.json`` (an int or a list), [] without one."""
    from pathlib import Path

    path = Path(model_dir) / "generation_config.json"
    if not path.is_file():
        return []
    eos = json.loads(path.read_text()).get("eos_token_id")
    return [] if eos is None else [int(e) for e in (eos if isinstance(eos, list) else [eos])]

