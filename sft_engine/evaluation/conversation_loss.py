"""The ``loss`` kind of a team's own suite: conversations whose loss matters, in any format curation reads.

Each conversation is rendered and labelled exactly as preparation does (the model's chat template, every assistant
turn supervised, the same self-checked masks) and scored on its own (no packing, so each item's loss is its own):
the token-level loss over every supervised token, its perplexity, and a standard error over conversations
(a ratio estimator, as for the held-out loss).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from pydantic import Field

from sft_engine.curation.formats import FORMAT_NAMES
from sft_engine.evaluation.files import FileSuite, FileSuiteSettings
from sft_engine.evaluation.heldout import LOSS_METRICS, loss_summary
from sft_engine.evaluation.suite import Metric, Scorer, SuiteResult
from sft_engine.fields import keyed


class LossSuiteSettings(FileSuiteSettings):
    """A team's own conversations, scored by the loss of their assistant turns."""

    kind: Literal["loss"] = Field(json_schema_extra=keyed("evaluate.suite", "evaluate"))
    format: Literal[FORMAT_NAMES] = Field(  # type: ignore[valid-type] # the curation formats registry's names
        json_schema_extra=keyed("evaluate.suite", "evaluate"), default="auto",
        description="The rows' shape, as for curate.sources: auto, messages, sharegpt, alpaca, prompt_completion, columns.",
    )
    columns: dict[str, str] | None = Field(json_schema_extra=keyed("evaluate.suite", "evaluate"), default=None,
                                           description="For format=columns: canonical field -> your column.")
    chat_template_kwargs: dict[str, Any] = Field(json_schema_extra=keyed("evaluate.suite", "evaluate"), default_factory=dict,
                                                 description="Variables passed to the chat template.")


class LossSuite(FileSuite):
    kind = "loss"
    TEXT_FIELDS = (*FileSuite.TEXT_FIELDS, *("format", "columns"))
    Settings = LossSuiteSettings
    settings: LossSuiteSettings

    def metrics(self) -> dict[str, Metric]:
        return dict(LOSS_METRICS)

    def conversations(self) -> list[dict[str, Any]]:
        """Canonical rows (messages, tools, template kwargs), one per item."""
        from sft_engine.curation.formats import normalize_row
        from sft_engine.curation.reasons import Drop

        out = []
        for i, item in enumerate(self.raw_items()):
            try:
                row = normalize_row({k: v for k, v in item.items() if k != "_id"}, self.settings.format, self.settings.columns)
            except Drop as drop:
                raise self.fail(f"not a conversation curation can read ({drop})", i) from None
            if not any(m["role"] == "assistant" for m in row["messages"]):
                raise self.fail("the conversation has no assistant turn to score", i)
            out.append(row)
        return out

    def check(self) -> None:
        self.conversations()

    def decontam_sets(self) -> dict[str, Callable[[], list[str]]]:
        if not self.settings.decontaminate:
            return {}
        return {self.name: lambda: [" ".join(m["content"] or "" for m in row["messages"]) for row in self.conversations()]}

    def score(self, scorer: Scorer) -> SuiteResult:
        import torch

        from sft_engine.chat import Labeler, Planner
        from sft_engine.config import HistoryPolicy, MaskStrategy
        from sft_engine.loss import supervised_count, token_loss_sum

        rows = self.conversations()
        planner = Planner(scorer.tokenizer, MaskStrategy.ALL_ASSISTANT, HistoryPolicy.EXPAND, self.settings.chat_template_kwargs)
        tok = Labeler(scorer.tokenizer).label(planner.plan(rows))
        for i, reason in enumerate(tok.drop_reason):
            if reason is not None:
                raise self.fail(f"the chat template cannot score this conversation ({reason})", i)
        sums, counts = [0.0] * len(rows), [0.0] * len(rows)
        scorer.model.eval()
        with torch.no_grad():
            for ids, labels, r in zip(tok.input_ids, tok.labels, tok.row_of, strict=True):
                x, y = torch.as_tensor(ids).unsqueeze(0), torch.as_tensor(labels).unsqueeze(0)
                logits = scorer.model(input_ids=x.to(scorer.model.device), use_cache=False).logits
                sums[r] += float(token_loss_sum(logits, y))
                counts[r] += supervised_count(y)
        items = self.raw_items()
        records = [{"suite": self.name, "id": items[i]["_id"], "loss_sum": sums[i], "tokens": counts[i],
                    "loss": sums[i] / counts[i] if counts[i] else None} for i in range(len(rows))]
        return SuiteResult(loss_summary(sums, counts), records, {"loss": (sums, counts)})

