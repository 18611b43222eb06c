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
from transformers.utils.chat_template_utils import render_jinja_template

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


@dataclass
class Tokenized:
    """Tokenized conversations; ``drop_reason[i]`` is set where row i cannot be trained on."""

    input_ids: list[np.ndarray]
    labels: list[np.ndarray]
    drop_reason: list[str | None]


def tokenize_conversations(
    tokenizer: PreTrainedTokenizerBase,
    conversations: list[list[dict[str, Any]]],
    strategy: MaskStrategy = MaskStrategy.ALL_ASSISTANT,
) -> Tokenized:
    """Render, tokenize in one fast-tokenizer batch call, and build labels for each conversation.

    A conversation that the template cannot mask, or whose labels are all ignored, gets a
    ``mask_*`` drop reason instead of being trained on silently.
    """
    rendered: list[Rendered | None] = []
    reasons: list[str | None] = []
    for msgs in conversations:
        try:
            rendered.append(render_with_spans(tokenizer, msgs, strategy))
            reasons.append(None)
        except TemplateError:
            rendered.append(None)
            reasons.append("mask_template_not_prefix_stable")
    texts = [r.text if r is not None else "" for r in rendered]
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True, return_attention_mask=False)
    ids_out, labels_out = [], []
    for i, r in enumerate(rendered):
        ids = np.asarray(enc["input_ids"][i], dtype=np.int64)
        offsets = np.asarray(enc["offset_mapping"][i], dtype=np.int64).reshape(-1, 2)
        labels = labels_from_offsets(ids, offsets, r.spans if r is not None else [])
        if reasons[i] is None and not (labels != IGNORE_INDEX).any():
            reasons[i] = "mask_no_supervised_tokens"
        ids_out.append(ids)
        labels_out.append(labels)
    return Tokenized(ids_out, labels_out, reasons)
