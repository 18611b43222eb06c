"""Exact supervised token ids under three real chat templates: ChatML (SmolLM2), Llama-3.1 and Gemma-2."""

from __future__ import annotations

from sft_engine.chat import Planner, tokenize_conversations
from sft_engine.config import HistoryPolicy, MaskStrategy
from sft_engine.constants import IGNORE_INDEX
from tests.test_chat import MULTI

CALL = '{"name": "add", "parameters": {"a": 2, "b": 2}}'
TOOL = [
    {"role": "user", "content": "Add 2 and 2."},
    {"role": "assistant", "content": CALL},
    {"role": "tool", "content": "4"},
    {"role": "assistant", "content": "The sum is 4."},
]
# Llama-3 ids: the call JSON, and "The sum is 4."
CALL_IDS = [5018, 609, 794, 330, 723, 498, 330, 14105, 794, 5324, 64, 794, 220, 17, 11, 330, 65, 794, 220, 17, 3500]
SUM_IDS = [791, 2694, 374, 220, 19, 13]
EOT = 128009  # <|eot_id|>


def supervised(tok, msgs, strategy=MaskStrategy.ALL_ASSISTANT) -> list[int]:
    out = tokenize_conversations(tok, [msgs], strategy)
    assert out.drop_reason == [None]
    return [int(i) for i, lab in zip(out.input_ids[0], out.labels[0], strict=True) if lab != IGNORE_INDEX]


def test_llama3_multi_turn_with_system_prompt(llama3_tokenizer) -> None:
    out = tokenize_conversations(llama3_tokenizer, [MULTI])
    assert int(out.input_ids[0][0]) == 128000  # <|begin_of_text|> from the template, never trained
    # "Hello!" = [9906, 0], "4" = [19]; each turn's <|eot_id|> trains; headers and the date-stamped system block do not.
    assert supervised(llama3_tokenizer, MULTI) == [9906, 0, EOT, 19, EOT]
    text = llama3_tokenizer.decode(out.input_ids[0])
    assert "Cutting Knowledge Date" in text


def test_llama3_tool_call_conversation(llama3_tokenizer) -> None:
    assert supervised(llama3_tokenizer, TOOL) == [*CALL_IDS, EOT, *SUM_IDS, EOT]
    assert supervised(llama3_tokenizer, TOOL, MaskStrategy.LAST_ASSISTANT) == [*SUM_IDS, EOT]
    assert llama3_tokenizer.encode(CALL, add_special_tokens=False) == CALL_IDS


def test_llama3_trims_content_so_the_verified_fast_path_falls_back(llama3_tokenizer) -> None:
    # The template applies |trim: a padded reply renders differently from its placeholder plan, so the
    # conversation is planned on its own text, and its targets still cover only the reply.
    padded = [dict(m) for m in MULTI]
    padded[2]["content"] = "  Hello!  "
    planner = Planner(llama3_tokenizer, MaskStrategy.ALL_ASSISTANT, HistoryPolicy.EXPAND)
    planned = planner.plan([{"messages": padded}, {"messages": MULTI}])
    assert planned.fast == 1
    ((sample,), _) = planned.samples
    assert [sample.text[a:b] for a, b in sample.spans] == ["Hello!<|eot_id|>", "4<|eot_id|>"]


def test_chatml_tool_call_conversation(smollm2_tokenizer) -> None:
    call = [39428, 1245, 1799, 476, 2104, 1002, 476, 11582, 1799, 9583, 81, 1799, 216, 34, 28, 476, 82, 1799, 216, 34, 17859]
    total = [504, 2028, 314, 216, 36, 30]  # "The sum is 4."
    assert supervised(smollm2_tokenizer, TOOL) == [*call, 2, *total, 2]
    assert smollm2_tokenizer.encode(CALL, add_special_tokens=False) == call


def test_gemma2_template_trains_model_turns_and_end_of_turn(gemma_style_tokenizer) -> None:
    tok = gemma_style_tokenizer
    end_of_turn = tok.convert_tokens_to_ids("<end_of_turn>")
    assert (tok.convert_tokens_to_ids("<bos>"), tok.convert_tokens_to_ids("<start_of_turn>"), end_of_turn) == (49152, 49153, 49154)
    convo = MULTI[1:]  # Gemma-2 has no system role
    assert supervised(tok, convo) == [19556, 17, 49154, 36, 49154]
    ((sample,),) = Planner(tok, MaskStrategy.ALL_ASSISTANT, HistoryPolicy.EXPAND).plan([{"messages": convo}]).samples
    assert sample.text.startswith("<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n")


def test_gemma2_rejects_system_turn_as_a_drop_reason_not_a_crash(gemma_style_tokenizer) -> None:
    out = tokenize_conversations(gemma_style_tokenizer, [MULTI, MULTI[1:]])
    assert out.drop_reason == ["mask_template_rejected", None]
