"""Chat templates and loss masks.

Which tokens train is decided from the tokenizer's own template, never by guessing token strings:

* If the template marks assistant output with ``{% generation %}``, those character spans train.
* Otherwise each assistant turn's span is found by rendering conversation prefixes and diffing:
  the turn trains from the end of ``render(messages[:k], add_generation_prompt=True)`` (so the role
  header is not trained) to the end of ``render(messages[:k+1])`` (so the end-of-turn token *is*
  trained), less trailing whitespace the template puts between turns.

Tokens whose first character falls inside a supervised span get their own id as label; every
other label is ``IGNORE_INDEX``. The first label of a sample is always ignored, so when samples
are packed together no position learns to predict across a boundary.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np
from transformers import PreTrainedTokenizerBase
from transformers.utils.chat_template_utils import _compile_jinja_template, render_jinja_template

from sft_engine.config import MaskStrategy
from sft_engine.constants import IGNORE_INDEX

_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


class TemplateError(ValueError):
    """The tokenizer's chat template cannot yield assistant spans for a conversation."""


@dataclass(frozen=True)
class Rendered:
    """A rendered conversation and the character spans that carry a loss."""

    text: str
    spans: list[tuple[int, int]]


def _template(tokenizer: PreTrainedTokenizerBase) -> str:
    tpl = tokenizer.chat_template
    if not isinstance(tpl, str) or not tpl:
        raise TemplateError(
            "the tokenizer has no chat template; pick a model folder whose tokenizer_config.json has 'chat_template', "
            "or set tokenizer.chat_template before preparing"
        )
    return tpl


def _render(tokenizer: PreTrainedTokenizerBase, convs: list[list[dict[str, Any]]], **kw: Any) -> tuple[list[str], list[Any]]:
    # transformers' renderer runs the template in its immutable Jinja sandbox.
    return render_jinja_template(
        conversations=convs, chat_template=_template(tokenizer), **tokenizer.special_tokens_map, **kw
    )


def _select(messages: list[dict[str, Any]], strategy: MaskStrategy) -> list[int]:
    """Indices of assistant messages whose turn is supervised under ``strategy``."""
    idx = [i for i, m in enumerate(messages) if m["role"] == "assistant" and m.get("train", True) is not False]
    if strategy is MaskStrategy.LAST_ASSISTANT:
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
        return [last] if last is not None and last in idx else []
    return idx


def _strip_right(text: str, a: int, b: int) -> int:
    while b > a and text[b - 1].isspace():
        b -= 1
    return b


def render_with_spans(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]], strategy: MaskStrategy = MaskStrategy.ALL_ASSISTANT
) -> Rendered:
    """Render one conversation and return the character spans that train under ``strategy``."""
    clean = [{"role": m["role"], "content": m["content"]} for m in messages]
    (text,), _ = _render(tokenizer, [clean])
    if strategy is MaskStrategy.EVERYTHING:
        return Rendered(text, [(0, len(text))])
    chosen = _select(messages, strategy)
    if _GENERATION_TAG.search(_template(tokenizer)):
        (marked,), (gen,) = _render(tokenizer, [clean], return_assistant_tokens_mask=True)
        assert marked == text
        assistant_idx = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if len(gen) != len(assistant_idx):
            raise TemplateError(f"template marks {len(gen)} generation blocks for {len(assistant_idx)} assistant turns")
        by_msg = dict(zip(assistant_idx, gen, strict=True))
        return Rendered(text, [(by_msg[i][0], by_msg[i][1]) for i in chosen])
    spans = []
    for k in chosen:
        (head,), _ = _render(tokenizer, [clean[:k]], add_generation_prompt=True)
        (upto,), _ = _render(tokenizer, [clean[: k + 1]])
        if not (text.startswith(head) and text.startswith(upto) and len(head) <= len(upto)):
            raise TemplateError(
                f"the chat template does not render message {k} as a prefix of the whole conversation "
                "(it rewrites earlier turns); add {% generation %} markers to the template to mask it"
            )
        spans.append((len(head), _strip_right(text, len(head), len(upto))))
    return Rendered(text, spans)


def labels_from_offsets(input_ids: np.ndarray, offsets: np.ndarray, spans: list[tuple[int, int]]) -> np.ndarray:
    """Labels for one tokenized text: the token id where its first char lies in a span, else IGNORE_INDEX."""
    labels = np.full(len(input_ids), IGNORE_INDEX, dtype=np.int64)
    if spans and len(input_ids):
        starts = np.asarray([a for a, _ in spans])
        ends = np.asarray([b for _, b in spans])
        tok_start = offsets[:, 0]
        j = np.searchsorted(starts, tok_start, side="right") - 1
        inside = (j >= 0) & (tok_start < ends[np.clip(j, 0, None)])
        labels[inside] = input_ids[inside]
    labels[:1] = IGNORE_INDEX
    return labels


# Private-use code points: no template rewrites them and no real text contains them.
_MARK = "\ue000{}\ue001"


@dataclass(frozen=True)
class _Skeleton:
    """A template rendered with placeholder contents: literal pieces around each message's content,
    and the supervised spans expressed as (piece index, offset) so they map onto any conversation
    with the same roles."""

    literals: list[str]
    spans: list[tuple[tuple[int, int], tuple[int, int]]]


def _locate(pos: int, bounds: list[tuple[int, int]]) -> tuple[int, int]:
    """Express a position of the placeholder render as (element, offset): element 2i is literal i,
    element 2i+1 is content i (offset 0 = its start, -1 = its end)."""
    for i, (a, b) in enumerate(bounds):
        if pos < a:
            prev_end = bounds[i - 1][1] if i else 0
            return 2 * i, pos - prev_end
        if pos == a:
            return 2 * i + 1, 0
        if pos == b:
            return 2 * i + 1, -1
        if a < pos < b:
            raise TemplateError("a span boundary falls inside a message's content")
    return 2 * len(bounds), pos - (bounds[-1][1] if bounds else 0)


def _skeleton(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]], strategy: MaskStrategy) -> _Skeleton | None:
    """Render placeholders once per role structure; None if the template does not keep contents verbatim."""
    placeholders = [{**m, "content": _MARK.format(i)} for i, m in enumerate(messages)]
    try:
        rendered = render_with_spans(tokenizer, placeholders, strategy)
    except TemplateError:
        return None
    text = rendered.text
    bounds = []
    for i in range(len(messages)):
        mark = _MARK.format(i)
        at = text.find(mark)
        if at < 0 or text.find(mark, at + 1) >= 0:
            return None
        bounds.append((at, at + len(mark)))
    if bounds != sorted(bounds):
        return None
    literals = [text[(bounds[i - 1][1] if i else 0) : (bounds[i][0] if i < len(bounds) else len(text))] for i in range(len(bounds) + 1)]
    try:
        spans = [(_locate(a, bounds), _locate(b, bounds)) for a, b in rendered.spans]
    except TemplateError:
        return None
    return _Skeleton(literals, spans)


def _fill(skel: _Skeleton, contents: list[str], text: str) -> list[tuple[int, int]] | None:
    """Char spans for a conversation rendered as ``text``, or None if it is not the filled skeleton."""
    starts, pos = [], 0
    for i, lit in enumerate(skel.literals):
        starts.append(pos)
        pos += len(lit)
        if i < len(contents):
            starts.append(pos)
            pos += len(contents[i])
    pieces = [x for pair in zip(skel.literals, contents + [""], strict=True) for x in pair][:-1]
    if pos != len(text) or "".join(pieces) != text:
        return None

    def at(loc: tuple[int, int]) -> int:
        elem, off = loc
        if elem % 2 == 1 and off == -1:
            return starts[elem] + len(contents[elem // 2])
        return starts[elem] + off

    return [(at(a), _strip_right(text, at(a), at(b))) for a, b in skel.spans]


def _render_each(tokenizer: PreTrainedTokenizerBase, convs: list[list[dict[str, Any]]]) -> list[str | None]:
    """Render each conversation with the template compiled in transformers' immutable sandbox, called
    directly (transformers' per-call wrapper costs more than the rendering itself on short chats).
    A conversation the template rejects (raise_exception) comes back as None.

    The texts are only trusted through ``_fill``: each must equal its structure's skeleton, which
    comes from transformers' full renderer, or the conversation is re-rendered by it.
    """
    compiled = _compile_jinja_template(_template(tokenizer))
    special = tokenizer.special_tokens_map
    out: list[str | None] = []
    for conv in convs:
        try:
            out.append(compiled.render(messages=conv, add_generation_prompt=False, **special))
        except Exception:  # noqa: BLE001 - a template's raise_exception or any Jinja error: re-rendered one by one below
            out.append(None)
    return out


def render_batch(
    tokenizer: PreTrainedTokenizerBase, conversations: list[list[dict[str, Any]]], strategy: MaskStrategy
) -> list[Rendered | str]:
    """Render many conversations in one call and find their supervised spans.

    Spans are derived once per role structure from a placeholder render and mapped onto each
    conversation; the mapping is used only when the filled placeholder render equals the real
    render character for character, otherwise the conversation's own prefixes are diffed. Returns
    a drop reason instead for a conversation the template refuses to render
    (``mask_template_rejected``) or cannot mask (``mask_template_not_prefix_stable``).
    """
    clean = [[{"role": m["role"], "content": m["content"]} for m in msgs] for msgs in conversations]
    # Training on every token has no spans to verify a fast render against: use transformers' renderer.
    texts = _render_each(tokenizer, clean) if strategy is not MaskStrategy.EVERYTHING else [None] * len(clean)
    cache: dict[tuple[Any, ...], _Skeleton | None] = {}
    out: list[Rendered | str] = []
    for msgs, plain, text in zip(conversations, clean, texts, strict=True):
        if text is None:
            try:
                (text,), _ = _render(tokenizer, [plain])
            except TemplateError:
                raise
            except Exception:  # noqa: BLE001 - whatever the template raises for this row quarantines the row, not the run
                out.append("mask_template_rejected")
                continue
        if strategy is MaskStrategy.EVERYTHING:
            out.append(Rendered(text, [(0, len(text))]))
            continue
        key = (tuple(m["role"] for m in msgs), tuple(_select(msgs, strategy)))
        if key not in cache:
            cache[key] = _skeleton(tokenizer, msgs, strategy)
        skel = cache[key]
        spans = _fill(skel, [m["content"] for m in msgs], text) if skel is not None else None
        if spans is not None:
            out.append(Rendered(text, spans))
            continue
        try:
            out.append(render_with_spans(tokenizer, msgs, strategy))
        except TemplateError:
            out.append("mask_template_not_prefix_stable")
    return out


def labels_from_encoding(encoding: Any, ids: np.ndarray, spans: list[tuple[int, int]]) -> np.ndarray:
    """Labels from span boundaries alone (no per-token offsets): a token trains if its first char is in a span."""
    labels = np.full(len(ids), IGNORE_INDEX, dtype=np.int64)
    for a, b in spans:
        if b <= a:
            continue
        first = encoding.char_to_token(a)
        last = encoding.char_to_token(b - 1)
        if first is None or last is None:
            raise TemplateError("span boundary not covered by a token")
        if encoding.token_to_chars(first)[0] < a:
            first += 1
        labels[first : last + 1] = ids[first : last + 1]
    labels[:1] = IGNORE_INDEX
    return labels


@dataclass
class Tokenized:
    """Tokenized conversations; ``drop_reason[i]`` is set where row i cannot be trained on."""

    input_ids: list[np.ndarray]
    labels: list[np.ndarray]
    drop_reason: list[str | None]


def encode_rendered(tokenizer: PreTrainedTokenizerBase, rendered: list[Rendered | str]) -> list[Any]:
    """One fast-tokenizer batch call over rendered texts (Rust, all cores, the GIL released)."""
    texts = [r.text if isinstance(r, Rendered) else "" for r in rendered]
    return tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)


def label_encoded(rendered: list[Rendered | str], encodings: list[Any]) -> Tokenized:
    """Input ids and labels from encodings; a row without a supervised token gets ``mask_no_supervised_tokens``."""
    reasons: list[str | None] = [r if isinstance(r, str) else None for r in rendered]
    ids_out, labels_out = [], []
    for i, (r, enc) in enumerate(zip(rendered, encodings, strict=True)):
        ids = np.asarray(enc.ids, dtype=np.int64)
        if not isinstance(r, Rendered):
            labels = np.full(len(ids), IGNORE_INDEX, dtype=np.int64)
        else:
            try:
                labels = labels_from_encoding(enc, ids, r.spans)
            except TemplateError:
                offsets = np.asarray(enc.offsets, dtype=np.int64).reshape(-1, 2)
                labels = labels_from_offsets(ids, offsets, r.spans)
        if reasons[i] is None and not (labels != IGNORE_INDEX).any():
            reasons[i] = "mask_no_supervised_tokens"
        ids_out.append(ids)
        labels_out.append(labels)
    return Tokenized(ids_out, labels_out, reasons)


def tokenize_conversations(
    tokenizer: PreTrainedTokenizerBase,
    conversations: list[list[dict[str, Any]]],
    strategy: MaskStrategy = MaskStrategy.ALL_ASSISTANT,
) -> Tokenized:
    """Render, tokenize in one fast-tokenizer batch call (all cores), and build labels for each conversation.

    A conversation that the template cannot mask, or whose labels are all ignored, gets a
    ``mask_*`` drop reason instead of being trained on silently.
    """
    rendered = render_batch(tokenizer, conversations, strategy)
    return label_encoded(rendered, encode_rendered(tokenizer, rendered))


def mask_preview(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]], strategy: MaskStrategy = MaskStrategy.ALL_ASSISTANT
) -> list[tuple[str, bool]]:
    """The rendered conversation as (text piece, supervised) per token, for showing a mask to a person."""
    out = tokenize_conversations(tokenizer, [messages], strategy)
    (rendered,) = render_batch(tokenizer, [messages], strategy)
    if not isinstance(rendered, Rendered):
        raise TemplateError(f"this conversation cannot be masked: {rendered}")
    text = rendered.text
    enc = tokenizer.backend_tokenizer.encode(text, add_special_tokens=False)
    pieces = []
    for k, (a, b) in enumerate(enc.offsets):
        pieces.append((text[a:b], bool(out.labels[0][k] != IGNORE_INDEX)))
    return pieces
