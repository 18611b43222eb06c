"""Token-level causal LM loss with the label shift done in one place."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sft_engine.constants import IGNORE_INDEX


def supervised_count(labels: torch.Tensor) -> int:
    """Tokens that carry a loss after the causal shift (position t predicts label t+1)."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Sum (not mean) of next-token cross-entropy over supervised positions, in fp32; with ``weights`` (per token,
    from message weights) each token's loss is scaled by its weight.

    Summing lets the caller divide by the supervised tokens of a whole global batch, so every
    token weighs the same whatever micro-batch or rank it landed on. Weights do not enter that count: a turn
    of weight 2 counts twice as much as an unweighted one, a turn of weight 0.5 half (weight 0 never trains).
    """
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:].to(shift_logits.device)
    if weights is None:
        return F.cross_entropy(
            shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
        )
    tok = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
    )
    return (tok * weights[:, 1:].reshape(-1).to(tok.device, tok.dtype)).sum()


def segment_loss_sums(
    logits: torch.Tensor, labels: torch.Tensor, position_ids: torch.Tensor, weights: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per packed sample: the sum of its (weighted) token losses and its supervised-token count (samples without
    one omitted). Samples are the segments where ``position_ids`` restarts at 0.
    """
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:].to(shift_logits.device)
    tok = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
    )
    # The target at t+1 belongs to the segment of position t+1.
    segment = (position_ids == 0).cumsum(-1)[:, 1:] + torch.arange(labels.size(0)).unsqueeze(1) * labels.size(1)
    segment = segment.reshape(-1).to(tok.device)
    mask = (shift_labels.reshape(-1) != IGNORE_INDEX).to(tok.dtype)
    scaled = tok * mask if weights is None else tok * mask * weights[:, 1:].reshape(-1).to(tok.device, tok.dtype)
    n_seg = int(segment.max()) + 1
    sums = torch.zeros(n_seg, dtype=tok.dtype, device=tok.device).index_add(0, segment, scaled)
    counts = torch.zeros(n_seg, dtype=tok.dtype, device=tok.device).index_add(0, segment, mask)
    has = counts > 0
    return sums[has], counts[has]


def sample_loss_sum(
    logits: torch.Tensor, labels: torch.Tensor, position_ids: torch.Tensor, weights: torch.Tensor | None = None
) -> tuple[torch.Tensor, int]:
    """Sum over packed samples of each sample's mean (weighted) token loss, and the number of samples with a loss.

    For per-sample averaging the caller divides by the sample count of the whole global batch.
    """
    sums, counts = segment_loss_sums(logits, labels, position_ids, weights)
    return (sums / counts).sum(), int(counts.numel())


def sample_count(labels: torch.Tensor, position_ids: torch.Tensor) -> int:
    """Packed samples that carry at least one supervised target."""
    segment = (position_ids == 0).cumsum(-1)[:, 1:] + torch.arange(labels.size(0)).unsqueeze(1) * labels.size(1)
    sup = labels[:, 1:] != IGNORE_INDEX
    return int(torch.unique(segment[sup]).numel())
