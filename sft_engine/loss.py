"""Token-level causal LM loss with the label shift done in one place.

Every loss here starts from per-token cross-entropies of the shifted targets (``[batch, seq - 1]``, fp32, 0 where
the label is ignored), made either from full logits (``logit_token_losses``) or from the final hidden states and the
LM head a chunk of tokens at a time (``chunked_token_losses``): the chunked path never holds a ``[tokens, vocab]``
tensor, forward or backward, because each chunk's logits are recomputed in the backward pass instead of kept.
The reductions (a token sum, per-sample sums) are the same for both, so both give the same loss and gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from sft_engine.constants import IGNORE_INDEX


def supervised_count(labels: torch.Tensor) -> int:
    """Tokens that carry a loss after the causal shift (position t predicts label t+1)."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def logit_token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token next-token cross-entropy ``[batch, seq - 1]`` in fp32 from full logits (0 at ignored labels)."""
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:].to(shift_logits.device)
    tok = F.cross_entropy(shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1), ignore_index=IGNORE_INDEX,
                          reduction="none")
    return tok.view(shift_labels.shape)


def _chunk_ce(hidden: torch.Tensor, labels: torch.Tensor, head: torch.nn.Module) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), labels, ignore_index=IGNORE_INDEX, reduction="none")


def chunked_token_losses(hidden: torch.Tensor, head: torch.nn.Module, labels: torch.Tensor, chunk_tokens: int) -> torch.Tensor:
    """Per-token next-token cross-entropy ``[batch, seq - 1]`` from the final hidden states and the LM head,
    ``chunk_tokens`` positions at a time. Each chunk runs under activation checkpointing, so only its hidden states
    are kept for the backward pass and its ``[chunk, vocab]`` logits exist only while that chunk is computed."""
    shift_labels = labels[:, 1:].to(hidden.device)
    flat_h = hidden[:, :-1, :].reshape(-1, hidden.size(-1))
    flat_y = shift_labels.reshape(-1)
    parts = []
    for start in range(0, flat_y.numel(), chunk_tokens):
        h, y = flat_h[start : start + chunk_tokens], flat_y[start : start + chunk_tokens]
        if torch.is_grad_enabled() and h.requires_grad:
            parts.append(checkpoint(_chunk_ce, h, y, head, use_reentrant=False))
        else:
            parts.append(_chunk_ce(h, y, head))
    return torch.cat(parts).view(shift_labels.shape)


class _LinearCrossEntropy(torch.autograd.Function):
    """``sum_t coef_t * CE(hidden_t @ weight.T, label_t)`` with its gradients computed in the forward pass, a chunk of
    tokens at a time: the loss is a linear form of the token losses, so the only thing the backward pass adds is the
    scalar upstream gradient. Each chunk's logits serve the loss and both gradients and are then dropped, so the head's
    forward is computed once (the checkpointed path computes it twice) and no ``[tokens, vocab]`` tensor is held."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, coef, chunk, compute_dtype):
        grad_h = torch.empty_like(hidden)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        losses = torch.zeros(labels.numel(), dtype=torch.float32, device=hidden.device)
        w = weight.to(compute_dtype)
        with torch.autocast(hidden.device.type, enabled=False):  # the dtypes here are explicit
            _LinearCrossEntropy._chunks(hidden, w, labels, coef, chunk, compute_dtype, grad_h, grad_w, losses)
        ctx.grads = (grad_h, grad_w.to(weight.dtype))
        ctx.mark_non_differentiable(losses)
        return (losses * coef).sum(), losses

    @staticmethod
    def _chunks(hidden, w, labels, coef, chunk, compute_dtype, grad_h, grad_w, losses) -> None:
        for start in range(0, labels.numel(), chunk):
            h, y, c = hidden[start : start + chunk].to(compute_dtype), labels[start : start + chunk], coef[start : start + chunk]
            logits = (h @ w.T).float()
            valid = y != IGNORE_INDEX
            target = y.clamp_min(0).unsqueeze(1)
            lse = torch.logsumexp(logits, dim=-1)
            losses[start : start + chunk] = torch.where(valid, lse - logits.gather(1, target).squeeze(1), 0.0)
            scale = torch.where(valid, c, 0.0).unsqueeze(1)
            grad_logits = logits.sub_(lse.unsqueeze(1)).exp_().mul_(scale)  # softmax x coefficient, in place
            grad_logits.scatter_add_(1, target, -scale)
            grad_logits = grad_logits.to(compute_dtype)
            grad_h[start : start + chunk] = grad_logits @ w
            if compute_dtype == torch.float32:
                grad_w.addmm_(grad_logits.T, h)
            else:
                grad_w += (grad_logits.T @ h).float()

    @staticmethod
    def backward(ctx, grad_sum, _grad_losses):
        grad_h, grad_w = ctx.grads
        del ctx.grads
        return grad_h * grad_sum.to(grad_h.dtype), grad_w * grad_sum.to(grad_w.dtype), None, None, None, None


def fused_linear_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, coef: torch.Tensor,
                      chunk_tokens: int, compute_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum_t coef_t * loss_t, per-token losses)`` over the shifted targets, from the final hidden states and the LM
    head's weight (no bias), without ever holding ``[tokens, vocab]``; ``coef`` from ``loss_coefficients``. The head's
    matmuls run in ``compute_dtype`` (default: the weight's; bf16 under mixed precision), softmax and loss in fp32,
    the weight's gradient accumulated in fp32.

    Only the positions with a target go through the head: an ignored label has no loss and no gradient, so its logits
    are never needed (a third of the demo's positions are supervised; full-logits trainers project them all).
    """
    flat_h = hidden[:, :-1, :].reshape(-1, hidden.size(-1))
    flat_y = labels[:, 1:].reshape(-1).to(hidden.device)
    sel = torch.nonzero(flat_y != IGNORE_INDEX).squeeze(1)
    total, picked = _LinearCrossEntropy.apply(flat_h.index_select(0, sel), weight, flat_y[sel],
                                              coef.reshape(-1).to(hidden.device, torch.float32)[sel], chunk_tokens,
                                              compute_dtype or weight.dtype)
    losses = torch.zeros(flat_y.numel(), dtype=picked.dtype, device=picked.device).index_copy_(0, sel, picked)
    return total, losses.view(labels.size(0), -1)


def loss_coefficients(labels: torch.Tensor, position_ids: torch.Tensor, weights: torch.Tensor | None, norm: str) -> torch.Tensor:
    """Each shifted target's factor in a micro-batch's loss sum ``[batch, seq - 1]``: its weight (1 without message
    weights; 0 where ignored), divided for ``norm="sample"`` by its sample's supervised-token count, so that
    ``(coef * token_losses).sum()`` equals ``token_sum`` or ``sample_sum``."""
    mask = (labels[:, 1:] != IGNORE_INDEX).float()
    coef = mask if weights is None else mask * weights[:, 1:].float()
    if norm == "sample":
        segment = _segments(labels, position_ids)
        counts = torch.zeros(int(segment.max()) + 1).index_add(0, segment.reshape(-1), mask.reshape(-1))
        coef = coef / counts[segment].clamp_min(1.0)
    return coef


def _segments(labels: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """Global segment index of each shifted target ``[batch, seq - 1]``: the target at t+1 belongs to the sample of
    position t+1; samples start where the position ids restart at 0, and rows never share one."""
    return (position_ids == 0).cumsum(-1)[:, 1:] + torch.arange(labels.size(0)).unsqueeze(1) * labels.size(1)


def _weighted(tok: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    return tok if weights is None else tok * weights[:, 1:].to(tok.device, tok.dtype)


def token_sum(tok: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Sum of per-token losses (``logit_token_losses`` / ``chunked_token_losses``), each scaled by its weight."""
    return _weighted(tok, weights).sum()


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Sum (not mean) of next-token cross-entropy over supervised positions, in fp32; with ``weights`` (per token,
    from message weights) each token's loss is scaled by its weight.

    Summing lets the caller divide by the supervised tokens of a whole global batch, so every
    token weighs the same whatever micro-batch or rank it landed on. Weights do not enter that count: a turn
    of weight 2 counts twice as much as an unweighted one, a turn of weight 0.5 half (weight 0 never trains).
    """
    if weights is None:  # one fused reduction: the figures recorded before the chunked path stay bit-identical
        shift_logits = logits[:, :-1, :].float()
        return F.cross_entropy(shift_logits.reshape(-1, shift_logits.size(-1)), labels[:, 1:].reshape(-1).to(shift_logits.device),
                               ignore_index=IGNORE_INDEX, reduction="sum")
    return token_sum(logit_token_losses(logits, labels), weights)


def segment_sums(tok: torch.Tensor, labels: torch.Tensor, position_ids: torch.Tensor,
                 weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per packed sample: the sum of its (weighted) per-token losses and its supervised-token count (samples without
    one omitted). Samples are the segments where ``position_ids`` restarts at 0."""
    shift_labels = labels[:, 1:].to(tok.device)
    segment = _segments(labels, position_ids).reshape(-1).to(tok.device)
    mask = (shift_labels.reshape(-1) != IGNORE_INDEX).to(tok.dtype)
    scaled = _weighted(tok, weights).reshape(-1) * mask
    n_seg = int(segment.max()) + 1
    sums = torch.zeros(n_seg, dtype=tok.dtype, device=tok.device).index_add(0, segment, scaled)
    counts = torch.zeros(n_seg, dtype=tok.dtype, device=tok.device).index_add(0, segment, mask)
    has = counts > 0
    return sums[has], counts[has]


def segment_loss_sums(
    logits: torch.Tensor, labels: torch.Tensor, position_ids: torch.Tensor, weights: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``segment_sums`` from full logits."""
    return segment_sums(logit_token_losses(logits, labels), labels, position_ids, weights)


def sample_sum(tok: torch.Tensor, labels: torch.Tensor, position_ids: torch.Tensor,
               weights: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """Sum over packed samples of each sample's mean (weighted) token loss, and the number of samples with a loss.

    For per-sample averaging the caller divides by the sample count of the whole global batch.
    """
    sums, counts = segment_sums(tok, labels, position_ids, weights)
    return (sums / counts).sum(), int(counts.numel())


def sample_loss_sum(
    logits: torch.Tensor, labels: torch.Tensor, position_ids: torch.Tensor, weights: torch.Tensor | None = None
) -> tuple[torch.Tensor, int]:
    """``sample_sum`` from full logits."""
    return sample_sum(logit_token_losses(logits, labels), labels, position_ids, weights)


def sample_count(labels: torch.Tensor, position_ids: torch.Tensor) -> int:
    """Packed samples that carry at least one supervised target."""
    segment = _segments(labels, position_ids)
    sup = labels[:, 1:] != IGNORE_INDEX
    return int(torch.unique(segment[sup]).numel())
