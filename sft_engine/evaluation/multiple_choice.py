"""The ``multiple_choice`` kind of a team's own suite: question, choices and the gold choice's index, scored like the
``knowledge`` suite by lm-eval's log-likelihood (``acc`` and ``acc_norm`` with lm-eval's standard errors) on task
files generated at run time."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from pydantic import Field

from sft_engine.evaluation.files import FileSuite, FileSuiteSettings
from sft_engine.evaluation.knowledge import MC_METRICS, run_multiple_choice
from sft_engine.evaluation.suite import Metric, Scorer, SuiteResult
from sft_engine.fields import keyed


class MultipleChoiceSuiteSettings(FileSuiteSettings):
    """A team's own multiple-choice suite."""

    kind: Literal["multiple_choice"] = Field(json_schema_extra=keyed("evaluate.suite", "evaluate"))
    question_field: str = Field(json_schema_extra=keyed("evaluate.suite", "evaluate"), default="question")
    choices_field: str = Field(json_schema_extra=keyed("evaluate.suite", "evaluate"), default="choices",
                               description="Field with the list of choice texts.")
    gold_field: str = Field(json_schema_extra=keyed("evaluate.suite", "evaluate"), default="gold",
                            description="Field with the correct choice's index (0-based).")
    num_fewshot: int = Field(json_schema_extra=keyed("evaluate.suite", "evaluate"), default=0, ge=0, le=5,
                             description="Solved items (drawn from the suite itself) put before each question.")
    batch_size: int = Field(json_schema_extra=keyed("evaluate.suite", "evaluate"), default=8, ge=1)


class MultipleChoiceSuite(FileSuite):
    kind = "multiple_choice"
    TEXT_FIELDS = (*FileSuite.TEXT_FIELDS, *("question_field", "choices_field", "gold_field"))
    Settings = MultipleChoiceSuiteSettings
    settings: MultipleChoiceSuiteSettings

    def metrics(self) -> dict[str, Metric]:
        return dict(MC_METRICS)

    def items(self) -> list[dict[str, Any]]:
        """``{id, question, choices, gold}`` per item, as the lm-eval task file holds them."""
        st, out = self.settings, []
        for i, item in enumerate(self.raw_items()):
            question = self.field(item, i, st.question_field)
            choices = self.field(item, i, st.choices_field)
            gold = self.field(item, i, st.gold_field)
            if not isinstance(question, str):
                raise self.fail(f"'{st.question_field}' must be a string, got {type(question).__name__}", i)
            if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
                raise self.fail(f"'{st.choices_field}' must be a list of at least two strings", i)
            if isinstance(gold, str) and gold.strip().isdigit():
                gold = int(gold)
            if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < len(choices):
                raise self.fail(f"'{st.gold_field}' = {gold!r} is not an index into its {len(choices)} choices (0-{len(choices) - 1})", i)
            out.append({"id": item["_id"], "question": question.strip(), "choices": choices, "gold": gold})
        return out

    def check(self) -> None:
        self.items()

    def decontam_sets(self) -> dict[str, Callable[[], list[str]]]:
        if not self.settings.decontaminate:
            return {}
        return {self.name: lambda: [f"{it['question']} {it['choices'][it['gold']]}" for it in self.items()]}

    def score(self, scorer: Scorer) -> SuiteResult:
        scores, records, paired = run_multiple_choice(
            scorer.model, scorer.tokenizer, {self.name: self.items()}, scorer.scratch / "lm_eval_tasks", self.name,
            self.settings.num_fewshot, self.settings.batch_size,
        )
        return SuiteResult(scores[self.name], records, {k.removeprefix(f"{self.name}."): v for k, v in paired.items()})
