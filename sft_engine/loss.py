"""Token-level causal LM loss with the label shift done in one place."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sft_engine.constants import IGNORE_INDEX


def supervised_count(labels: torch.Tensor) -> int:
    """Tokens that carry a loss after the causal shift (position t predicts label t+1)."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum (not mean) of next-token cross-entropy over supervised positions, in fp32.

    Summing lets the caller divide by the supervised tokens of a whole global batch, so every
    token weighs the same whatever micro-batch or rank it landed on.
    """
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:].to(shift_logits.device)
    return F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
