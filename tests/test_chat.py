from __future__ import annotations

import numpy as np

from sft_engine.chat import Planner, plan_conversation, tokenize_conversations, trained_turns
from sft_engine.config import HistoryPolicy, MaskStrategy
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


def _spans(tok, msgs, strategy=MaskStrategy.ALL_ASSISTANT) -> tuple[str, list[str]]:
    planner = Planner(tok, strategy, HistoryPolicy.EXPAND)
    _, samples = plan_conversation(planner.render, msgs, None, {}, trained_turns(msgs, strategy), HistoryPolicy.EXPAND,
                                      planner.stops, [1.0] * len(msgs))
    (sample,) = samples
    return sample.text, [sample.text[a:b] for a, b in sample.spans]


def test_generation_markers_change_nothing(tiny_model) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    marked = (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
        "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
        "{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}{{ '\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    plain = _spans(tok, MULTI)
    tok.chat_template = marked
    with_markers = _spans(tok, MULTI)
    tok.chat_template = CHATML
    assert with_markers == plain
    assert plain[1] == ["Hello!<|im_end|>", "4<|im_end|>"]


def test_a_turn_whose_prompt_is_not_a_prefix_of_the_conversation_trains_in_its_inference_form(tiny_model) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    # Renders the message count up front: no prompt is a prefix of its turn's render, yet the model, given the
    # prompt, writes exactly the reply and <|im_end|>. Each turn is a sample of its own: the prompt, then the reply.
    tok.chat_template = "{{ messages | length }}" + CHATML
    planner = Planner(tok, MaskStrategy.ALL_ASSISTANT, HistoryPolicy.EXPAND)
    (samples,) = planner.plan([{"messages": MULTI}]).samples
    assert [(s.text[:1], s.expanded, [s.text[a:b] for a, b in s.spans]) for s in samples] == [
        ("2", True, ["Hello!<|im_end|>"]), ("4", True, ["4<|im_end|>"])]
    out = tokenize_conversations(tok, [MULTI])
    assert out.drop_reason == [None] and out.row_of == [0, 0] and out.stats["expanded_samples"] == 2
    assert [tok.decode(ids[labels != IGNORE_INDEX]) for ids, labels in zip(out.input_ids, out.labels, strict=True)] == [
        "Hello!<|im_end|>", "4<|im_end|>"]
    assert planner.plan([{"messages": MULTI}], ).samples == [samples]  # the cached plan gives the same samples
    # context_only: such turns stay context, so nothing trains here
    assert tokenize_conversations(tok, [MULTI], history=HistoryPolicy.CONTEXT_ONLY).drop_reason == ["mask_no_supervised_tokens"]
    only = Planner(tok, MaskStrategy.ALL_ASSISTANT, HistoryPolicy.LAST_ONLY).plan([{"messages": MULTI}]).samples[0]
    assert [s.text[:1] for s in only] == ["4"]


def test_a_prompt_whose_extra_text_the_turn_renders_after_the_reply_is_dropped_not_guessed(tiny_model) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    # The generation prompt writes " 7" where the turn writes the reply first: no text follows this prompt to
    # give the turn's render.
    tok.chat_template = CHATML.replace("message['content'] + '<|im_end|>'", "message['content'] + ' 7<|im_end|>'").replace(
        "'<|im_start|>assistant\\n'", "'<|im_start|>assistant\\n 7'")
    out = tokenize_conversations(tok, [MULTI])
    assert out.drop_reason == ["mask_prompt_not_prefix"]


def test_fast_path_equals_planning_each_conversation(smollm2_tokenizer) -> None:
    from sft_engine.curation.formats import normalize_row
    from sft_engine.curation.schema import template_messages
    from sft_engine.demo_data import chitchat_rows, verifiable_task_rows

    convs = [r["messages"] for r in chitchat_rows(limit=150)]
    convs += [normalize_row(r)["messages"] for r in verifiable_task_rows(50)]
    convs.append([{"role": "system", "content": "  padded  "}, *MULTI[1:]])
    for strategy in (MaskStrategy.ALL_ASSISTANT, MaskStrategy.LAST_ASSISTANT):
        planner = Planner(smollm2_tokenizer, strategy, HistoryPolicy.EXPAND)
        planned = planner.plan([{"messages": c} for c in convs])
        assert planned.fast == len(convs)
        for c, fast in zip(convs, planned.samples, strict=True):
            msgs = template_messages(c)
            _, slow = plan_conversation(planner.render, msgs, None, {}, trained_turns(c, strategy), HistoryPolicy.EXPAND,
                                        planner.stops, [1.0] * len(c))
            assert fast == slow


def test_mask_preview_pieces_cover_text_and_mark_supervised(smollm2_tokenizer) -> None:
    from sft_engine.chat import mask_preview

    (pieces,) = mask_preview(smollm2_tokenizer, {"messages": MULTI})
    assert "".join(p for p, _ in pieces).startswith("<|im_start|>system\nBe terse.<|im_end|>")
    assert "".join(p for p, s in pieces if s) == "Hello!<|im_end|>4<|im_end|>"


def test_weights_scale_their_turn_and_weight_zero_never_trains(smollm2_tokenizer) -> None:
    msgs = [dict(m) for m in MULTI]
    msgs[2]["weight"] = 2.0
    out = tokenize_conversations(smollm2_tokenizer, [msgs])
    ids, labels, w = out.input_ids[0], out.labels[0], out.weights[0]
    trained = labels != IGNORE_INDEX
    assert [int(i) for i in ids[trained]] == [19556, 17, IM_END, 36, IM_END]
    assert w[trained].tolist() == [2.0, 2.0, 2.0, 1.0, 1.0] and (w[~trained] == 0).all()
    msgs[2]["weight"] = 0.0
    assert supervised(smollm2_tokenizer, msgs) == [36, IM_END]
    assert tokenize_conversations(smollm2_tokenizer, [MULTI]).weights == [None]  # no weights: nothing stored


def test_a_template_without_tool_call_support_drops_tool_call_rows_and_counts_unrendered_reasoning(smollm2_tokenizer) -> None:
    from sft_engine.curation.schema import dumps

    call = {"id": "c1", "type": "function", "function": {"name": "add", "arguments": dumps({"a": 2})}}
    with_call = [{"role": "user", "content": "Add."}, {"role": "assistant", "content": "", "tool_calls": [call]},
                 {"role": "tool", "content": "2", "tool_call_id": "c1"}, {"role": "assistant", "content": "2."}]
    thinking = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!", "reasoning_content": "Greet."}]
    out = tokenize_conversations(smollm2_tokenizer, [with_call, thinking, MULTI])
    # SmolLM2's ChatML renders no tool call: the call turn would train as an empty reply.
    assert out.drop_reason == ["mask_template_drops_tool_calls", None, None]
    assert out.stats["reasoning_not_rendered"] == 1  # kept: its reply trains, its reasoning is not in the template
