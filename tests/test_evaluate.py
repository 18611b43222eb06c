"""Evaluation suites on real data and real checkers: packaged eval items, IFBench rules with the NLTK
fallbacks, lm-eval on a tiny model, batched generation, the results table and the gate."""

from __future__ import annotations

from pathlib import Path

import pytest

from sft_engine.config import GateConfig
from sft_engine.evalsets import eval_texts, ifbench_items, multiple_choice_items, verifiable_items
from sft_engine.evaluate import check_gate, format_table, generate, results_table, score_tasks, table_metrics
from sft_engine.instruct import check_response, score_ifbench


def test_multiple_choice_items_come_from_the_installed_package_with_gold_indices() -> None:
    mmlu = multiple_choice_items("mmlu")
    assert len(mmlu) == 2850
    assert mmlu[0]["choices"] == ["$25000 $25000 $0", "$0 $25000 $20000", "$25000 $5000 $0", "$0 $25000 $0"]
    assert mmlu[0]["gold"] == 3  # "D. $0 $25000 $0"
    piqa = multiple_choice_items("piqa")[0]
    assert (piqa["question"], piqa["choices"], piqa["gold"]) == ("dresser", ["replace drawer with bobby pin", "finish, woodgrain with  bobby pin"], 1)
    boolq = multiple_choice_items("boolq")[0]
    assert boolq["choices"] == ["no", "yes"] and boolq["gold"] == 0 and boolq["question"].endswith("Question: does ethanol take more energy make that produces?")
    assert len(multiple_choice_items("commonsenseqa")) == 1220  # one packaged item has no valid answer letter
    with pytest.raises(ValueError, match="unknown multiple-choice set 'mmlu2'; choose from mmlu"):
        multiple_choice_items("mmlu2")


def test_decontamination_checks_the_items_evaluation_scores() -> None:
    # One source of truth: every scored item's text is in what decontamination checks.
    texts = eval_texts("openbookqa")
    first = multiple_choice_items("openbookqa")[0]
    assert texts[0] == f"{first['question']} {first['choices'][first['gold']]}"
    assert eval_texts("ifbench")[5] == ifbench_items()[5]["prompt"] and len(eval_texts("ifbench")) == 294
    assert eval_texts("verifiable_tasks_eval")[:3] == [it["prompt"] for it in verifiable_items(3)]


def _item(rule: str, **kwargs: object) -> dict:
    return {"id": "t", "prompt": "p", "instruction_id_list": [rule], "kwargs": [kwargs]}


def test_ifbench_rules_that_need_nltk_data_work_offline() -> None:
    verb = _item("words:start_verb")
    assert check_response(verb, "Write the answer down.") == [{"instruction_id": "words:start_verb", "strict": True, "loose": True}]
    assert check_response(verb, "The answer is down.")[0]["strict"] is False
    stop = _item("ratio:stop_words", percentage=27.0)
    assert check_response(stop, "Quick brown foxes jump over lazy dogs")[0]["strict"] is True  # 1 of 7 words
    assert check_response(stop, "the cat and the dog")[0]["strict"] is False  # 3 of 5
    # Every packaged prompt is scorable: no instruction id without a checker, no missing-data crash.
    items = list(ifbench_items())
    scores, records = score_ifbench(items, ["Write a list. It has two lines."] * len(items))
    assert scores["n"] == 294 and len(records) == 294
    assert 0 <= scores["instruction_strict"] <= scores["instruction_loose"] <= 1
    with pytest.raises(KeyError, match="no checker for"):
        check_response(_item("words:no_such_rule"), "x")


def test_ifbench_scores_prompt_and_instruction_level_strict_and_loose() -> None:
    items = [_item("words:start_verb"), {**_item("words:start_verb"), "id": "u"}]
    # Strict fails on the markdown-bolded opener; loose strips the asterisks and passes it.
    scores, records = score_ifbench(items, ["**Write** it.", "The end."])
    assert [r["prompt_strict"] for r in records] == [False, False]
    assert [r["prompt_loose"] for r in records] == [True, False]
    assert scores["prompt_strict"] == 0.0 and scores["prompt_loose"] == 0.5 and scores["instruction_loose"] == 0.5
    assert scores["prompt_loose_stderr"] == pytest.approx(0.5)


def test_verifiable_tasks_score_the_answer_line_exactly() -> None:
    items = [{"id": "a", "prompt": "2+2", "answer": "4"}, {"id": "b", "prompt": "3+3", "answer": "6"}]
    scores, records = score_tasks(items, ["2 + 2 = 4\nAnswer: 4", "Answer: 66"])
    assert [r["correct"] for r in records] == [True, False]
    assert scores == {"exact_match": 0.5, "exact_match_stderr": pytest.approx(0.5), "n": 2.0}


def test_results_table_and_gate_reasons() -> None:
    scores = {
        "base": {"heldout.loss": 2.0, "knowledge.mmlu.acc": 0.40, "knowledge.mmlu.acc_stderr": 0.05, "tasks.exact_match": 0.0},
        "tuned": {"heldout.loss": 1.5, "knowledge.mmlu.acc": 0.35, "knowledge.mmlu.acc_stderr": 0.05, "tasks.exact_match": 0.5,
                  "knowledge.mmlu.n": 100.0},
    }
    table = results_table(scores)
    assert [r["metric"] for r in table] == ["heldout.loss", "knowledge.mmlu.acc", "tasks.exact_match"]
    assert table[1]["delta"] == pytest.approx(-0.05) and table[1]["tuned_stderr"] == 0.05 and table[0]["higher_is_better"] is False
    assert table_metrics(table)["eval/heldout.loss/delta"] == -0.5
    assert "| knowledge.mmlu.acc | 0.4000 ±0.050 | 0.3500 ±0.050 | -0.0500 |" in format_table(table)

    assert check_gate(table, GateConfig(max_knowledge_drop=6)) == (True, [])
    passed, reasons = check_gate(table, GateConfig(max_knowledge_drop=2, min_scores={"tasks.exact_match": 0.6, "ifbench.x": 0.1}))
    assert not passed
    assert reasons == [
        "knowledge.mmlu.acc dropped 5.0 points (base 40.0 -> tuned 35.0); the gate allows 2",
        "tasks.exact_match = 0.5000 is below the minimum 0.6",
        "min_scores names 'ifbench.x', which is not in the table (heldout.loss, knowledge.mmlu.acc, tasks.exact_match)",
    ]
    # 5 points down with a difference stderr of 7.1 points: within noise at z=2, beyond it at z=0.5.
    assert check_gate(table, GateConfig(max_knowledge_drop=2, knowledge_noise_z=2)) == (True, [])
    assert check_gate(table, GateConfig(max_knowledge_drop=2, knowledge_noise_z=0.5))[1] == [
        "knowledge.mmlu.acc dropped 5.0 points (base 40.0 -> tuned 35.0); the gate allows 2, beyond 0.5 standard errors (7.1 points)"
    ]
    no_base = results_table({"tuned": scores["tuned"]})
    assert check_gate(no_base, GateConfig(max_knowledge_drop=None))[1] == [
        "heldout_loss_must_drop needs the base model's held-out loss (evaluate.compare_base: true)"
    ]


@pytest.mark.slow
def test_knowledge_runs_lm_eval_on_a_real_model(tiny_model: Path, tmp_path: Path) -> None:
    from sft_engine.knowledge import run_knowledge
    from sft_engine.model import load_model, load_tokenizer

    scores, items = run_knowledge(load_model(tiny_model), load_tokenizer(tiny_model), ["boolq", "piqa"], tmp_path, limit=3, batch_size=4)
    assert sorted(scores) == ["boolq", "piqa"] and all(s["n"] == 3 for s in scores.values())
    assert [it["id"] for it in items] == ["boolq-0", "boolq-1", "boolq-2", "piqa-0", "piqa-1", "piqa-2"]
    for it in items:
        assert it["chosen"] == max(range(len(it["loglikelihoods"])), key=it["loglikelihoods"].__getitem__)
        assert it["correct"] == (it["chosen"] == it["gold"])
    assert scores["piqa"]["acc"] == pytest.approx(sum(it["correct"] for it in items[3:]) / 3)
    assert 0 <= scores["boolq"]["acc_norm"] <= 1 and scores["boolq"]["acc_stderr"] >= 0


@pytest.mark.slow
def test_batched_generation_equals_one_prompt_at_a_time(tiny_model: Path) -> None:
    from sft_engine.model import load_model, load_tokenizer

    model, tok = load_model(tiny_model), load_tokenizer(tiny_model)
    prompts = [[{"role": "user", "content": t}] for t in ("hello there", "sort the numbers in ascending order please", "2 + 2")]
    batched = generate(model, tok, prompts, max_new_tokens=6, batch_size=3)
    single = [generate(model, tok, [p], max_new_tokens=6, batch_size=1)[0] for p in prompts]
    assert batched == single and len(batched) == 3
    assert tok.padding_side == "right"  # restored


def test_paired_stderr_of_the_held_out_loss_delta_is_the_ratio_estimator_of_per_sample_differences() -> None:
    from sft_engine.evaluate import paired_loss_delta_stderr

    counts = [10.0, 20.0, 30.0]
    base, tuned = [20.0, 30.0, 90.0], [10.0, 28.0, 60.0]
    # Differences -10, -2, -30 over 60 tokens: delta -0.7; residuals d - delta*c = -3, 12, -9;
    # sqrt((9 + 144 + 81) / 2) / (20 * sqrt(3)) = sqrt(117) / 34.641
    se = paired_loss_delta_stderr((tuned, counts), (base, counts))
    assert se == pytest.approx(117 ** 0.5 / (20 * 3 ** 0.5))
    # Scored on different samples: no paired figure.
    assert paired_loss_delta_stderr((tuned, counts), (base, [10.0, 20.0, 31.0])) is None


def test_held_out_loss_under_bf16_autocast_is_close_to_fp32_and_paired_se_shows_in_the_table(tiny_model: Path, packed: Path) -> None:
    from sft_engine.evaluate import heldout_loss, inference_precision
    from sft_engine.model import load_model

    model = load_model(tiny_model)
    fp32 = heldout_loss(model, packed, micro_batch_size=2, max_rows=4)
    with inference_precision("bf16"):
        bf16 = heldout_loss(model, packed, micro_batch_size=2, max_rows=4)
    assert fp32["supervised_tokens"] == bf16["supervised_tokens"] > 0
    # bf16 rounds the logits (8 bits of mantissa): a random model's ~ln(vocab) loss moves by well under 1 %.
    assert bf16["loss"] == pytest.approx(fp32["loss"], rel=1e-2) and bf16["loss"] != fp32["loss"]

    table = results_table({"base": {"heldout.loss": 2.0}, "tuned": {"heldout.loss": 1.5, "heldout.loss_delta_stderr": 0.05}})
    assert table[0]["delta_stderr"] == 0.05
    assert "| heldout.loss | 2.0000 | 1.5000 | -0.5000 ±0.050 |" in format_table(table)
