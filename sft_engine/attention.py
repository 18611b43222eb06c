"""Attention over packed rows that computes each sample on its own (``sdpa_varlen``).

transformers' ``sdpa`` sees a packed row as one sequence with a block-diagonal causal mask: the kernel takes an
arbitrary mask, so it computes every (query, key) pair of the row, masked ones included, and on CPU it cannot use
its causal shortcut either. A row of samples of lengths ``l_i`` needs only ``sum(l_i^2) / 2`` of the ``L^2`` pairs
(a quarter or less for rows of a few samples). ``sdpa_varlen`` splits the row at the samples' starts (where the
position ids restart at 0, as in ``loss.segment_sums``) and runs causal SDPA per sample: what FlashAttention's
varlen kernel does on a GPU, on any device. Same outputs and gradients as ``sdpa`` with the packed mask
(tests/test_attention.py).

It is a training kernel: it needs the position ids (every decoder transformers ships passes them to its attention)
and no padding mask or KV cache. Models whose attention does more than scaled dot-product (soft-capped scores,
attention sinks) are not supported (``unsupported``); sliding windows are (a banded mask within a sample longer
than the window).
"""

from __future__ import annotations

from typing import Any

import torch

VARLEN = "sdpa_varlen"

# The first position of each sample, per row, for the position ids of the forward under way: every layer
# receives the same tensor, so the split is computed once per forward.
_last: dict[str, Any] = {"ids": None, "starts": None}


def unsupported(config: Any) -> str | None:
    """Why ``sdpa_varlen`` cannot compute this model's attention exactly, or None when it can."""
    for name in ("attn_logit_softcapping",):
        if getattr(config, name, None) is not None:
            return f"{name}={getattr(config, name)}"
    if getattr(config, "model_type", "") in ("gpt_oss",):
        return "attention sinks"
    return None


def sample_starts(position_ids: torch.Tensor) -> list[list[int]]:
    """Per row, the index where each sample starts (position 0), the row's first index always included."""
    if _last["ids"] is position_ids:
        return _last["starts"]
    starts = []
    for row in position_ids:
        idx = torch.nonzero(row == 0).flatten().tolist()
        starts.append(idx if idx and idx[0] == 0 else [0, *idx])
    _last["ids"], _last["starts"] = position_ids, starts
    return starts


def _window_mask(n: int, window: int, device: torch.device) -> torch.Tensor:
    """Causal and banded: query i sees keys j with i - window < j <= i (transformers' sliding-window rule)."""
    i = torch.arange(n, device=device).unsqueeze(1)
    j = torch.arange(n, device=device).unsqueeze(0)
    return (j <= i) & (j > i - window)


def varlen_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers attention-interface function: ``[batch, heads, seq, dim]`` in, ``[batch, seq, heads, dim]`` out."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None:
        raise ValueError(f"train.attn_implementation={VARLEN} cannot apply soft-capping or attention sinks; use sdpa or eager")
    position_ids = kwargs.pop("position_ids", None)
    if position_ids is None or attention_mask is not None or query.shape[2] != key.shape[2]:
        raise ValueError(f"train.attn_implementation={VARLEN} is for training on packed rows (position ids, no padding mask, "
                         "no KV cache); use sdpa to generate")
    kwargs.pop("is_causal", None)
    window = kwargs.pop("sliding_window", None) or getattr(module, "sliding_window", None)
    seq = query.shape[2]
    per_row = sample_starts(position_ids)
    if len(per_row) != query.shape[0]:  # one row of position ids broadcast over the batch
        per_row = per_row * query.shape[0]
    rows = []
    for r, starts in enumerate(per_row):
        parts = []
        for s, e in zip(starts, [*starts[1:], seq], strict=True):
            mask = _window_mask(e - s, window, query.device) if window is not None and e - s > window else None
            out, _ = sdpa_attention_forward(module, query[r : r + 1, :, s:e], key[r : r + 1, :, s:e], value[r : r + 1, :, s:e],
                                            mask, is_causal=mask is None, **kwargs)
            parts.append(out)
        rows.append(torch.cat(parts, dim=1))
    return torch.cat(rows, dim=0), None


def register() -> None:
    """Make ``attn_implementation="sdpa_varlen"`` loadable (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(VARLEN, varlen_attention)
