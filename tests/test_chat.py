from __future__ import annotations

import numpy as np

from sft_engine.chat import render_with_spans, tokenize_conversations
from sft_engine.config import MaskStrategy
from sft_engine.constants import IGNORE_INDEX
from tests.conftest import CHATML

IM_END = 2  # SmolLM2's <|im_end|>: the assistant's end-of-turn token, which must be trained

MULTI = [
    {"role": "system", "content": "Be terse."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4"},
]


def supervised(tok, msgs, strategy=MaskStrategy.ALL_ASSISTANT) -> list[int]:
    out = tokenize_conversations(tok, [msgs], strategy)
    ids, labels = out.input_ids[0], out.labels[0]
    assert ((labels == ids) | (labels == IGNORE_INDEX)).all()
    return [int(i) for i, lab in zip(ids, labels, strict=True) if lab != IGNORE_INDEX]


def test_smollm2_multi_turn_supervises_assistant_content_and_end_of_turn(smollm2_tokenizer) -> None:
    # "Hello!" = [19556, 17], "4" = [36]; role headers, the system turn and the "\n" after <|im_end|> stay masked.
    assert supervised(smollm2_tokenizer, MULTI) == [19556, 17, IM_END, 36, IM_END]


def test_smollm2_last_assistant_only(smollm2_tokenizer) -> None:
    assert supervised(smollm2_tokenizer, MULTI, MaskStrategy.LAST_ASSISTANT) == [36, IM_END]


def test_smollm2_default_system_prompt_is_not_trained(smollm2_tokenizer) -> None:
    # Without a system turn the template injects "You are a helpful AI assistant named SmolLM..."; none of it trains.
    msgs = MULTI[1:3]
    out = tokenize_conversations(smollm2_tokenizer, [msgs])
    text = smollm2_tokenizer.decode(out.input_ids[0])
    assert "named SmolLM" in text
    assert supervised(smollm2_tokenizer, msgs) == [19556, 17, IM_END]


def test_everything_trains_all_but_the_first_token(smollm2_tokenizer) -> None:
    out = tokenize_conversations(smollm2_tokenizer, [MULTI], MaskStrategy.EVERYTHING)
    assert out.labels[0][0] == IGNORE_INDEX
    assert np.array_equal(out.labels[0][1:], out.input_ids[0][1:])


def test_per_message_train_false_is_honored(smollm2_tokenizer) -> None:
    msgs = [dict(m) for m in MULTI]
    msgs[2]["train"] = False
    assert supervised(smollm2_tokenizer, msgs) == [36, IM_END]


def test_conversation_without_trainable_tokens_is_dropped_with_reason(smollm2_tokenizer) -> None:
    msgs = [dict(m) for m in MULTI]
    msgs[2]["train"] = False
    msgs[4]["train"] = False
    out = tokenize_conversations(smollm2_tokenizer, [msgs, MULTI])
    assert out.drop_reason == ["mask_no_supervised_tokens", None]


def test_generation_markers_agree_with_prefix_diffing(tiny_model) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    marked = (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
        "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
        "{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}{{ '\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    plain = render_with_spans(tok, MULTI)
    tok.chat_template = marked
    with_markers = render_with_spans(tok, MULTI)
    tok.chat_template = CHATML
    assert with_markers.text == plain.text
    assert with_markers.spans == plain.spans
    assert [plain.text[a:b] for a, b in plain.spans] == ["Hello!<|im_end|>", "4<|im_end|>"]


def test_template_that_rewrites_history_is_dropped_not_guessed(tiny_model) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    # Renders the turn count up front, so a prefix does not render as a prefix of the whole.
    tok.chat_template = "{{ messages | length }}" + CHATML
    out = tokenize_conversations(tok, [MULTI])
    assert out.drop_reason == ["mask_template_not_prefix_stable"]


def test_skeleton_fast_path_matches_prefix_diffing_on_real_chats(smollm2_tokenizer) -> None:
    from sft_engine.chat import labels_from_offsets, render_batch
    from sft_engine.curation.formats import normalize_row
    from sft_engine.demo_data import chitchat_rows, verifiable_task_rows

    convs = [r["messages"] for r in chitchat_rows(limit=150)]
    convs += [normalize_row(r)["messages"] for r in verifiable_task_rows(50)]
    convs.append([{"role": "system", "content": "  padded  "}, *MULTI[1:]])
    for strategy in (MaskStrategy.ALL_ASSISTANT, MaskStrategy.LAST_ASSISTANT):
        fast = render_batch(smollm2_tokenizer, convs, strategy)
        slow = [render_with_spans(smollm2_tokenizer, c, strategy) for c in convs]
        assert fast == slow
    out = tokenize_conversations(smollm2_tokenizer, convs)
    enc = smollm2_tokenizer(
        [r.text for r in slow], add_special_tokens=False, return_offsets_mapping=True, return_attention_mask=False
    )
    for i, r in enumerate(render_batch(smollm2_tokenizer, convs, MaskStrategy.ALL_ASSISTANT)):
        expected = labels_from_offsets(np.asarray(enc["input_ids"][i]), np.asarray(enc["offset_mapping"][i]), r.spans)
        assert np.array_equal(out.labels[i], expected)


def test_mask_preview_pieces_cover_text_and_mark_supervised(smollm2_tokenizer) -> None:
    from sft_engine.chat import mask_preview

    pieces = mask_preview(smollm2_tokenizer, MULTI)
    assert "".join(p for p, _ in pieces).startswith("<|im_start|>system\nBe terse.<|im_end|>")
    assert "".join(p for p, s in pieces if s) == "Hello!<|im_end|>4<|im_end|>"
