"""The ``verifiable`` suite: held-out tasks of the demo's generator (arithmetic, units, sorting, words) at a seed range
training data never uses, answered greedily and scored by exact match of the line after the response's last
``Answer:``, the format the generator's training rows teach."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import Field

from sft_engine.evaluation.generation import extract_answer, generate
from sft_engine.evaluation.items import VERIFIABLE_EVAL_SIZE, verifiable_items
from sft_engine.evaluation.suite import Metric, Scorer, Suite, SuiteResult, binomial_stderr
from sft_engine.fields import Strict, keyed


class VerifiableSettings(Strict):
    """Held-out verifiable tasks, exact match on the 'Answer:' line."""

    limit: int = Field(json_schema_extra=keyed("evaluate.suite", "evaluate"), default=50, ge=0, le=VERIFIABLE_EVAL_SIZE,
                       description="Held-out verifiable tasks scored by exact match (0 = off).")
    max_new_tokens: int = Field(json_schema_extra=keyed("evaluate.suite", "evaluate"), default=48, ge=1,
                                description="Generation cap for the answers.")


def score_answers(items: list[dict[str, Any]], responses: list[str], suite: str = "verifiable") -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Exact-match accuracy: the text after the response's last 'Answer:' equals the item's answer."""
    records = [
        {"suite": suite, "id": it["id"], "answer": it["answer"], "response": r, "correct": extract_answer(r) == it["answer"]}
        for it, r in zip(items, responses, strict=True)
    ]
    n = len(records)
    acc = sum(r["correct"] for r in records) / n if n else float("nan")
    return {"exact_match": acc, "exact_match_stderr": binomial_stderr(acc, n), "n": float(n)}, records


class Verifiable(Suite):
    kind = "verifiable"
    Settings = VerifiableSettings
    settings: VerifiableSettings

    def enabled(self) -> bool:
        return self.settings.limit > 0

    def metrics(self) -> dict[str, Metric]:
        return {"exact_match": Metric()}

    def decontam_sets(self) -> dict[str, Callable[[], list[str]]]:
        # The prompt identifies a task; answers are short and shared by many prompts.
        return {self.name: lambda: [it["prompt"] for it in verifiable_items()]}

    def identity(self, heldout: Path) -> Any:
        from sft_engine import __version__

        return __version__  # the generator is this package's code

    def score(self, scorer: Scorer) -> SuiteResult:
        items = verifiable_items()[: self.settings.limit]
        chats = [[{"role": "user", "content": it["prompt"]}] for it in items]
        scores, records = score_answers(items, generate(scorer.model, scorer.tokenizer, chats, self.settings.max_new_tokens, scorer.gen_batch_size), self.name)
        return SuiteResult(scores, records, {"exact_match": ([float(r["correct"]) for r in records], [1.0] * len(records))})
