"""Greedy generation and a team's own generation suite: each check on exact responses, then real models end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sft_engine.evaluation.generation import GenerationSuite, GenerationSuiteSettings, generate, last_number, normalize
from sft_engine.evaluation.suite import Scorer, SuiteError

ARITHMETIC = Path(__file__).parents[1] / "data" / "suites" / "arithmetic.jsonl"


def _suite(path: Path = ARITHMETIC, **settings: object) -> GenerationSuite:
    st = GenerationSuiteSettings(name="arith", kind="generation", path=str(path), **settings)
    return GenerationSuite(st.name, st)


def _scorer(model: object, tokenizer: object, tmp_path: Path) -> Scorer:
    return Scorer(model, tokenizer, micro_batch_size=2, gen_batch_size=4, heldout=tmp_path / "unused", scratch=tmp_path)


def test_normalization_and_number_parsing() -> None:
    assert normalize('  "Paris."  ') == "paris" and normalize("New   York\n") == "new york"
    assert last_number("2 + 3 = 5") == 5.0 and last_number("about 1,234.5 km, or -3e2 m") == -300.0
    assert last_number("no digits") is None


@pytest.mark.parametrize(
    ("settings", "response", "answer", "expected"),
    [
        ({"metric": "exact_match"}, "Paris.", "paris", ("Paris.", 1.0)),
        ({"metric": "exact_match"}, "It is Paris.", "paris", ("It is Paris.", 0.0)),
        ({"metric": "exact_match", "extract": r"is (\w+)"}, "It is Paris.", "paris", ("Paris", 1.0)),
        ({"metric": "exact_match", "extract": r"Answer:\s*(.+)"}, "no answer line", "paris", (None, 0.0)),
        ({"metric": "contains"}, "The capital is PARIS, of course", "Paris", ("The capital is PARIS, of course", 1.0)),
        ({"metric": "regex"}, "Order 66 executed", r"\b6{2}\b", ("Order 66 executed", 1.0)),
        ({"metric": "regex"}, "Order 666", r"\b6{2}\b", ("Order 666", 0.0)),
        ({"metric": "numeric"}, "3 times 4 is 12.", 12, ("3 times 4 is 12.", 1.0)),
        ({"metric": "numeric"}, "10 - 4 = 4", "6", ("10 - 4 = 4", 0.0)),
        ({"metric": "numeric", "tolerance": 0.01}, "pi is 3.14159", 3.14, ("pi is 3.14159", 1.0)),
        ({"metric": "numeric"}, "pi is 3.14159", 3.14, ("pi is 3.14159", 0.0)),
    ],
)
def test_each_check_on_exact_responses(settings: dict, response: str, answer: object, expected: tuple) -> None:
    assert _suite(**settings).verdict(response, answer, {"id": "x"}, None) == expected


@pytest.mark.slow
def test_batched_generation_equals_one_prompt_at_a_time(tiny_model: Path) -> None:
    from sft_engine.model import load_model, load_tokenizer

    model, tok = load_model(tiny_model), load_tokenizer(tiny_model)
    prompts = [[{"role": "user", "content": t}] for t in ("hello there", "sort the numbers in ascending order please", "2 + 2")]
    batched = generate(model, tok, prompts, max_new_tokens=6, batch_size=3)
    single = [generate(model, tok, [p], max_new_tokens=6, batch_size=1)[0] for p in prompts]
    assert batched == single and len(batched) == 3
    assert tok.padding_side == "right"  # restored


@pytest.mark.slow
def test_smollm2_answers_the_arithmetic_fixture_scored_numerically(smollm2, tmp_path: Path) -> None:
    suite = _suite(metric="numeric", max_new_tokens=12)
    suite.check()
    result = suite.score(_scorer(*smollm2, tmp_path))
    got = [(r["id"], r["response"], r["numeric"]) for r in result.records]
    assert got == [
        ("add", "2 + 3 = 5", 1.0),
        ("sub", "10 - 4 = 4", 0.0),
        ("mul", "3 times 4 is 12.", 1.0),  # a messages-list prompt
        ("capital", "The capital of France is Paris.", 0.0),  # no number in the answer
    ]
    assert result.metrics == {"numeric": 0.5, "numeric_stderr": pytest.approx(0.5 / 3 ** 0.5), "n": 4.0}
    assert result.paired == {"numeric": ([1.0, 0.0, 1.0, 0.0], [1.0] * 4)}


@pytest.mark.slow
def test_a_python_checker_gets_each_response_and_item(tiny_model: Path, tmp_path: Path) -> None:
    from sft_engine.model import load_model, load_tokenizer

    suite = _suite(metric="python:tests.evaluation.checkers:mentions_paris", max_new_tokens=4, system_prompt="Be brief.")
    assert suite.metrics().keys() == {"score"}
    assert suite.chats()[2] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 3 times 4? Reply with just the number."}]
    result = suite.score(_scorer(load_model(tiny_model), load_tokenizer(tiny_model), tmp_path))
    # The tiny random model never writes "paris": the capital item scores 0, the others the checker's fixed 0.5.
    assert [(r["id"], r["score"]) for r in result.records] == [("add", 0.5), ("sub", 0.5), ("mul", 0.5), ("capital", 0.0)]
    assert result.metrics["score"] == 0.375 and result.metrics["n"] == 4.0


def _write(tmp_path: Path, rows: list[object]) -> Path:
    path = tmp_path / "suite.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_bad_input_names_the_suite_the_file_and_the_item(tmp_path: Path) -> None:
    with pytest.raises(SuiteError, match=r"evaluate.suites 'arith': path '.*nope.jsonl' matches no file"):
        _suite(tmp_path / "nope.jsonl").check()
    path = _write(tmp_path, [{"prompt": "a", "answer": 1}, {"question": "b", "answer": 2}])
    with pytest.raises(SuiteError, match=r"evaluate.suites 'arith' \(.*suite.jsonl, item 1\): no field 'prompt' \(the item has: answer, "
                                         r"question\); map it with the suite's \*_field settings"):
        _suite(path).check()
    path = _write(tmp_path, [{"prompt": "a", "answer": "five"}])
    with pytest.raises(SuiteError, match=r"item 0\): answer 'five' is not a number \(metric numeric\)"):
        _suite(path, metric="numeric").check()
    path = _write(tmp_path, [{"prompt": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "answer": 1}])
    with pytest.raises(SuiteError, match="item 0\\): the prompt's last turn is 'assistant'; a prompt ends with a user turn"):
        _suite(path).check()
    with pytest.raises(SuiteError, match=r"the checker 'no_such_module:f' cannot be imported \(No module named 'no_such_module'\)"):
        _suite(metric="python:no_such_module:f").check()
    with pytest.raises(SuiteError, match=r"the checker 'tests.evaluation.checkers:NOT_A_FUNCTION' cannot be imported \(.*is not a function\)"):
        _suite(metric="python:tests.evaluation.checkers:NOT_A_FUNCTION").check()
    with pytest.raises(SuiteError, match=r"the checker returned 2.0; it must return a bool or a number in \[0, 1\]"):
        _suite(metric="python:tests.evaluation.checkers:out_of_range").verdict("r", 1, {"id": "x"}, __import__("tests.evaluation.checkers").evaluation.checkers.out_of_range)
    with pytest.raises(ValueError, match="unknown metric 'eval\\(x\\)': use one of exact_match, contains, regex, numeric, or python:package.module:function"):
        _suite(metric="eval(x)")
