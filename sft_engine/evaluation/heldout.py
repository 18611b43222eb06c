"""The ``heldout`` suite: mean next-token loss over every supervised token of the held-out split.

The held-out rows are the curated split, packed block-causal exactly as training packs them, for the scored model's
tokenizer. The sampling unit of the standard error is the held-out sample (a ratio estimator: each sample's loss sum
over its token count), and the per-sample sums make the base-vs-tuned difference a paired comparison.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import Field

from sft_engine.evaluation.suite import Metric, Scorer, Suite, SuiteResult, ratio_stderr
from sft_engine.fields import Strict, keyed

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel


class HeldoutSettings(Strict):
    """Held-out loss (always scored: the gate's heldout_loss_must_drop reads it)."""

    max_rows: int | None = Field(json_schema_extra=keyed("evaluate.suite", "evaluate"), default=None, ge=1,
                                 description="Cap on held-out packed rows (None = all).")


LOSS_STDERR = "ratio estimator over samples: sd(loss_sum - mean * tokens) / (mean tokens * sqrt(n))"


def sample_losses(model: PreTrainedModel, data_path: Path, micro_batch_size: int = 2,
                  max_rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per held-out sample (packed rows, block-causal): the sum of its token losses and its supervised-token count."""
    import torch

    from sft_engine.data import PackedDataset, collate
    from sft_engine.loss import segment_loss_sums

    ds = PackedDataset(data_path)
    n = len(ds) if max_rows is None else min(len(ds), max_rows)
    model.eval()
    sums, counts = [torch.zeros(0, dtype=torch.float64)], [torch.zeros(0, dtype=torch.float64)]
    with torch.no_grad():
        for start in range(0, n, micro_batch_size):
            batch = collate([ds[i] for i in range(start, min(n, start + micro_batch_size))])
            out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
            s, c = segment_loss_sums(out.logits, batch["labels"], batch["position_ids"])
            sums.append(s.double())
            counts.append(c.double())
    return torch.cat(sums), torch.cat(counts)


def loss_summary(sums: list[float], counts: list[float]) -> dict[str, float]:
    """Loss, its stderr, perplexity and supervised tokens from per-sample loss sums and token counts."""
    total = sum(counts)
    if not total:
        return {"loss": float("nan"), "loss_stderr": float("nan"), "perplexity": float("nan"), "supervised_tokens": 0.0}
    loss = sum(sums) / total
    return {"loss": loss, "loss_stderr": ratio_stderr(sums, counts), "perplexity": math.exp(loss), "supervised_tokens": float(total)}


def heldout_loss(model: PreTrainedModel, data_path: Path, micro_batch_size: int = 2, max_rows: int | None = None) -> dict[str, float]:
    """Mean next-token loss over every supervised token of a packed Arrow file, with its stderr and perplexity."""
    sums, counts = sample_losses(model, data_path, micro_batch_size, max_rows)
    return loss_summary(sums.tolist(), counts.tolist())


LOSS_METRICS = {
    "loss": Metric(lower_is_better=True, stderr=LOSS_STDERR),
    "perplexity": Metric(lower_is_better=True, stderr="none (exp of the loss)", compare=False),
}


class HeldoutLoss(Suite):
    kind = "heldout"
    Settings = HeldoutSettings
    settings: HeldoutSettings

    def metrics(self) -> dict[str, Metric]:
        return LOSS_METRICS

    def identity(self, heldout: Path) -> Any:
        from sft_engine.io import digest_file

        return digest_file(heldout)

    def score(self, scorer: Scorer) -> SuiteResult:
        sums, counts = sample_losses(scorer.model, scorer.heldout, scorer.micro_batch_size, self.settings.max_rows)
        s, c = sums.tolist(), counts.tolist()
        records = [{"suite": self.name, "id": f"heldout-{i}", "loss_sum": a, "tokens": b} for i, (a, b) in enumerate(zip(s, c, strict=True))]
        return SuiteResult(loss_summary(s, c), records, {"loss": (s, c)})
