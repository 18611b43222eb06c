"""Attention over packed rows that computes each sample on its own (``sdpa_varlen``).

transformers' ``sdpa`` sees a packed row as one sequence with a block-diagonal causal mask: the kernel takes an
arbitrary mask, so it computes every (query, key) pair of the row, masked ones included, and on CPU it cannot use
its causal shortcut either. A row of samples of lengths ``l_i`` needs only ``sum(l_i^2) / 2`` of the ``L^2`` pairs
(a quarter or less for rows of a few samples). ``sdpa_varlen`` splits the row at the samples' starts (where the
position ids restart at 0, as in ``loss.segment_sums``) and runs causal SDPA per sample: what FlashAttention's
varlen kernel does on a GPU, on any device. Same outputs and gradients as ``sdpa`` with the packed mask
(tests/test_attention.py).

On a CUDA GPU in bf16 or fp16, the row's samples go to one call of PyTorch's FlashAttention varlen kernel per layer
(``torch.nn.attention.varlen``, given the samples' cumulative lengths), instead of one SDPA call per sample: on an
H200 the per-sample calls cost launch overhead and a cuDNN plan for every new sample length
(docs/benchmarks.md). fp32, CPUs and GPUs or heads that kernel does not take keep the per-sample calls.

It is a training kernel: it needs the position ids (every decoder transformers ships passes them to its attention)
and no padding mask or KV cache. Models whose attention does more than scaled dot-product (soft-capped scores,
attention sinks) are not supported (``unsupported``); sliding windows are (a banded mask within a sample longer
than the window).
"""

from __future__ import annotations

import functools
from typing import Any

import torch

VARLEN = "sdpa_varlen"

# The first position of each sample, per row, for the position ids of the forward under way: every layer
# receives the same tensor, so the split is computed once per forward.
_last: dict[str, Any] = {"ids": None, "starts": None, "cu": None}


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
    _last["ids"], _last["starts"], _last["cu"] = position_ids, starts, None
    return starts


def cu_seqlens(per_row: list[list[int]], seq: int) -> tuple[list[int], int]:
    """The rows' samples as one flat sequence of ``len(per_row) * seq`` tokens: each sample's start offset and the end
    (FlashAttention's ``cu_seqlens``), and the longest sample."""
    cu, longest = [], 0
    for r, starts in enumerate(per_row):
        for s, e in zip(starts, [*starts[1:], seq], strict=True):
            cu.append(r * seq + s)
            longest = max(longest, e - s)
    return [*cu, len(per_row) * seq], longest


@functools.cache
def _flash_varlen() -> tuple[Any, frozenset[str]] | None:
    """PyTorch's FlashAttention varlen function and its parameter names where this torch has one (2.10 and later),
    else None. Once per process: every layer of every forward asks."""
    import inspect

    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


def flash_varlen_usable(query: torch.Tensor, dropout: float = 0.0) -> bool:
    """Whether the packed rows of ``query`` (``[batch, heads, seq, dim]``) can go to FlashAttention's varlen kernel:
    a CUDA GPU of compute capability 8.0 or later, bf16 or fp16, head size a multiple of 8 up to 256, no dropout."""
    if not query.is_cuda or query.dtype not in (torch.bfloat16, torch.float16) or dropout:
        return False
    dim = query.shape[-1]
    if dim % 8 or dim > 256 or _flash_varlen() is None or not torch.backends.cuda.is_flash_attention_available():
        return False
    return torch.cuda.get_device_capability(query.device)[0] >= 8


def _flash_rows(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, per_row: list[list[int]],
                scaling: float | None, window: int | None) -> torch.Tensor | None:
    """The rows' attention in one varlen call, ``[batch, seq, heads, dim]``; None where this torch's varlen function
    cannot apply the sliding window."""
    varlen_attn, params = _flash_varlen()
    if "window_size" in params:  # torch 2.11 and later: causal is a window of (everything before, nothing after)
        causal = {"window_size": (-1 if window is None else window - 1, 0)}
    elif window is None:  # torch 2.10
        causal = {"is_causal": True}
    else:
        return None
    batch, heads, seq, dim = query.shape
    if _last["cu"] is None or _last["cu"][0].device != query.device:
        cu, longest = cu_seqlens(per_row, seq)
        _last["cu"] = (torch.tensor(cu, dtype=torch.int32, device=query.device), longest)
    cu, longest = _last["cu"]
    q, k, v = (t.transpose(1, 2).reshape(batch * seq, t.shape[1], dim) for t in (query, key, value))
    if k.shape[1] != heads:
        if "enable_gqa" in params:
            causal["enable_gqa"] = True
        else:  # transformers' repeat_kv: query head h reads key/value head h // (heads / kv_heads)
            k, v = (t.repeat_interleave(heads // t.shape[1], dim=1) for t in (k, v))
    out = varlen_attn(q, k, v, cu, cu, longest, longest, scale=scaling, **causal)
    return out.view(batch, seq, heads, dim)


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
    if flash_varlen_usable(query, kwargs.get("dropout", 0.0)):
        out = _flash_rows(query, key, value, per_row, kwargs.get("scaling"), window)
        if out is not None:
            return out, None
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
