"""Exact supervised token ids under the chat templates people fine-tune most, from llama.cpp's corpus, each on its
family's vocabulary (``tests/template_corpus.py``: Qwen2 for Qwen3 and the R1 Qwen distill, Llama-3 for Llama-3.1
and Hermes-3, Phi-3, Llama-SPM for Mistral, SmolLM2 with the template's control tokens added for gpt-oss, Gemma-4
and Hy3). Each case lists, per sample, the labelled ids and their text."""

from __future__ import annotations

import json

import pytest

from sft_engine.chat import Labeler, Planner
from sft_engine.config import HistoryPolicy, MaskStrategy
from sft_engine.constants import IGNORE_INDEX
from sft_engine.curation.schema import dumps
from tests import template_corpus as corpus


def _m(role: str, content: str, **extra) -> dict:
    return {"role": role, "content": content, **extra}


TWO = [_m("user", "Hi"), _m("assistant", "Hello!"), _m("user", "2+2?"), _m("assistant", "4")]
REASONING = [_m("user", "Hi"), _m("assistant", "Hello!", reasoning_content="Greet back."), _m("user", "2+2?"),
             _m("assistant", "4", reasoning_content="Two and two.")]
SYSTEM = [_m("system", "Be terse."), *TWO]
TOOLS = [dumps({"type": "function", "function": {
    "name": "add", "description": "Add two numbers.",
    "parameters": {"type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}}, "required": ["a", "b"]}}})]
CALL = [_m("user", "Add 2 and 2."),
        _m("assistant", "", tool_calls=[{"id": "call_1", "type": "function", "function": {"name": "add", "arguments": dumps({"a": 2, "b": 2})}}]),
        _m("tool", "4", tool_call_id="call_1", name="add"), _m("assistant", "The sum is 4.")]


def labelled(template: str, messages: list, tools: list | None = None, kwargs: dict | None = None):
    """(per sample: labelled ids and their text), the stats; or the drop reason."""
    path = corpus.templates_dir() / template
    if not path.is_file():
        pytest.fail(f"{path} missing: run `make assets`")
    tok, stops = corpus.corpus_tokenizer(path)
    row = {"messages": messages, "tools": tools, "chat_template_kwargs": json.dumps(kwargs) if kwargs else None}
    planned = Planner(tok, MaskStrategy.ALL_ASSISTANT, HistoryPolicy.EXPAND, None, stops).plan([row])
    if isinstance(planned.samples[0], str):
        return planned.samples[0]
    out = Labeler(tok).label(planned)
    samples = []
    for ids, labels in zip(out.input_ids, out.labels, strict=True):
        sel = [int(i) for i, lab in zip(ids, labels, strict=True) if lab != IGNORE_INDEX]
        samples.append((sel, tok.decode(sel)))
    return samples, out.stats


QWEN3 = "Qwen-Qwen3-0.6B.jinja"
IM_END, THINK, END_THINK = 151645, 151667, 151668


def test_qwen3_thinking_on_trains_the_think_block_it_emits_and_each_turn_in_its_inference_form() -> None:
    # Thinking is on by default: the prompt ends "<|im_start|>assistant\n" and the model writes a think block, empty
    # when the turn has no reasoning. History turns are rendered without it, so the first turn gets a sample of its own.
    samples, stats = labelled(QWEN3, TWO)
    assert samples == [
        ([THINK, 271, END_THINK, 271, 19, IM_END], "<think>\n\n</think>\n\n4<|im_end|>"),
        ([THINK, 271, END_THINK, 271, 9707, 0, IM_END], "<think>\n\n</think>\n\nHello!<|im_end|>"),
    ]
    assert (stats["expanded_samples"], stats["expanded_tokens"]) == (1, 16)
    samples, _ = labelled(QWEN3, REASONING)
    assert samples == [
        ([THINK, 198, 11613, 323, 1378, 624, END_THINK, 271, 19, IM_END], "<think>\nTwo and two.\n</think>\n\n4<|im_end|>"),
        ([THINK, 198, 38, 3744, 1182, 624, END_THINK, 271, 9707, 0, IM_END], "<think>\nGreet back.\n</think>\n\nHello!<|im_end|>"),
    ]


def test_qwen3_thinking_off_trains_the_reply_alone_and_refuses_reasoning_it_cannot_emit() -> None:
    # enable_thinking=false: the prompt already holds "<think>\n\n</think>\n\n"; the model writes the reply only.
    samples, _ = labelled(QWEN3, TWO, kwargs={"enable_thinking": False})
    assert samples == [([19, IM_END], "4<|im_end|>"), ([9707, 0, IM_END], "Hello!<|im_end|>")]
    assert labelled(QWEN3, REASONING, kwargs={"enable_thinking": False}) == "mask_reasoning_disabled"


def test_deepseek_r1_distill_closes_or_opens_thinking_in_the_prompt() -> None:
    r1 = "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B.jinja"
    eos = 151939  # <｜end▁of▁sentence｜>, added to the Qwen2 vocabulary
    # Without enable_thinking the prompt ends "<think>\n</think>": the reply alone, each turn spliced after its prompt.
    samples, stats = labelled(r1, TWO)
    assert samples == [([9707, 0, eos], "Hello!<｜end▁of▁sentence｜>"), ([19, eos], "4<｜end▁of▁sentence｜>")]
    assert stats["targets_spliced"] == 2
    # With it the prompt ends "<think>\n": the model writes its reasoning, closes the block, then replies.
    samples, _ = labelled(r1, REASONING, kwargs={"enable_thinking": True})
    assert samples == [
        ([38, 3744, 1182, 624, END_THINK, 271, 9707, 0, eos], "Greet back.\n</think>\n\nHello!<｜end▁of▁sentence｜>"),
        ([11613, 323, 1378, 624, END_THINK, 271, 19, eos], "Two and two.\n</think>\n\n4<｜end▁of▁sentence｜>"),
    ]


def test_phi35_trains_end_not_the_eos_it_appends_after_the_last_message() -> None:
    # The template ends the conversation with "<|end|>\n<|endoftext|>"; <|end|> is a generation-config stop, so each
    # turn trains up to it and the conversation stays one sample.
    samples, stats = labelled("microsoft-Phi-3.5-mini-instruct.jinja", SYSTEM)
    assert samples == [([10994, 29991, 32007, 29946, 32007], "Hello!<|end|>4<|end|>")]
    assert stats["expanded_samples"] == 0


def test_mistral_nemo_system_prompt_moves_to_the_last_user_turn() -> None:
    # The system prompt renders only inside the last user turn of a prompt, never in history: each turn is trained
    # after the prompt that holds it.
    samples, stats = labelled("mistralai-Mistral-Nemo-Instruct-2407.jinja", SYSTEM)
    assert [s[0] for s in samples] == [[10994, 29991, 2], [29946, 2]]  # "Hello!</s>", "4</s>"
    assert stats["expanded_samples"] == 2


def test_gpt_oss_trains_analysis_then_final_up_to_return() -> None:
    # gpt-oss reads reasoning as `thinking`; the model writes the analysis channel, starts a new assistant message on
    # the final channel itself, and stops with <|return|>; history turns end with <|end|>, so the first is expanded.
    samples, _ = labelled("openai-gpt-oss-120b.jinja", REASONING)
    assert [s[1] for s in samples] == [
        "<|channel|>analysis<|message|>Two and two.<|end|><|start|>assistant<|channel|>final<|message|>4<|return|>",
        "<|channel|>analysis<|message|>Greet back.<|end|><|start|>assistant<|channel|>final<|message|>Hello!<|return|>",
    ]
    assert [s[0] for s in samples] == [
        [49153, 14975, 49156, 10345, 284, 827, 30, 49154, 49158, 520, 9531, 49153, 17254, 49156, 36, 49157],
        [49153, 14975, 49156, 55, 5318, 1056, 30, 49154, 49158, 520, 9531, 49153, 17254, 49156, 19556, 17, 49157],
    ]


def test_gemma4_tool_call_ends_with_the_tool_response_token_after_an_empty_thought_channel() -> None:
    # The prompt closes an empty thought channel; the model then writes the call and <|tool_response>, where the
    # runtime takes over. The final answer is in place and ends with <turn|>.
    samples, stats = labelled("google-gemma-4-31B-it.jinja", CALL, TOOLS)
    assert samples == [
        ([504, 2028, 314, 216, 36, 30, 49158], "The sum is 4.<turn|>"),
        ([49164, 4350, 42, 2104, 107, 81, 42, 34, 28, 82, 42, 34, 109, 49155, 49165],
         "<|tool_call>call:add{a:2,b:2}<tool_call|><|tool_response>"),
    ]
    assert (stats["expanded_samples"], stats["targets_spliced"]) == (1, 1)


def test_llama31_with_tools_trains_the_call_json_and_the_answer_in_place() -> None:
    samples, stats = labelled("meta-llama-Llama-3.1-8B-Instruct.jinja", CALL, TOOLS)
    call = [5018, 609, 794, 330, 723, 498, 330, 14105, 794, 5324, 64, 794, 220, 17, 11, 330, 65, 794, 220, 17, 3500]
    assert samples == [([*call, 128009, 791, 2694, 374, 220, 19, 13, 128009],
                        '{"name": "add", "parameters": {"a": 2, "b": 2}}<|eot_id|>The sum is 4.<|eot_id|>')]
    assert stats["expanded_samples"] == 0


def test_hermes3_tool_use_trains_the_tool_call_block_and_the_answer() -> None:
    samples, _ = labelled("NousResearch-Hermes-3-Llama-3.1-8B-tool_use.jinja", CALL, TOOLS)
    assert samples == [
        ([27, 14506, 13735, 397, 5018, 609, 794, 330, 723, 498, 330, 16774, 794, 5324, 64, 794, 220, 17, 11, 330, 65, 794, 220,
          17, 11498, 524, 14506, 13735, 29, 128257], '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 2}}\n</tool_call><|im_end|>'),
        ([791, 2694, 374, 220, 19, 13, 128257], "The sum is 4.<|im_end|>"),
    ]
    # Without tools the template raises: a drop reason, not a crash.
    assert labelled("NousResearch-Hermes-3-Llama-3.1-8B-tool_use.jinja", TWO) == "mask_template_needs_tools"


def test_a_template_that_ends_a_reply_with_nothing_gets_the_eos_appended_and_trained() -> None:
    # Tencent Hy3 writes nothing after a reply: the model's eos (SmolLM2's <|im_end|> = 2 here) is appended.
    samples, stats = labelled("tencent-Hy3.jinja", TWO)
    assert samples == [([36, 2], "4<|im_end|>"), ([19556, 17, 2], "Hello!<|im_end|>")]
    assert stats["stop_token_appended"] == 2
