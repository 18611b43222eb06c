"""sdpa_varlen (one causal SDPA per packed sample) against transformers' sdpa with its packed block-diagonal mask."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sft_engine.attention import VARLEN, register, sample_starts, unsupported


def _outputs(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    (logits.float().pow(2).mean()).backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _max_diffs(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[float, dict[str, bool]]:
    register()
    model.set_attn_implementation("sdpa")
    ref_logits, ref_grads = _outputs(model, batch)
    model.set_attn_implementation(VARLEN)
    logits, grads = _outputs(model, batch)
    return float((logits - ref_logits).abs().max()), {n: float((grads[n] - ref_grads[n]).abs().max()) < 1e-5 for n in grads}


def test_sample_starts_split_rows_where_positions_restart() -> None:
    pos = torch.tensor([[0, 1, 2, 0, 1, 0], [3, 4, 0, 1, 2, 3]])
    assert sample_starts(pos) == [[0, 3, 5], [0, 2]]


def test_varlen_equals_sdpa_with_the_packed_mask(tiny_model: Path, packed: Path) -> None:
    """Three packed rows of several samples each (the tiny model has grouped-query attention): same logits and every
    parameter's gradient within 1e-5."""
    from sft_engine.data import PackedDataset, collate
    from sft_engine.model import load_model

    rows = [PackedDataset(packed)[i] for i in range(3)]
    assert all(len(r["seq_lens"]) >= 2 for r in rows)
    model = load_model(tiny_model)
    diff, grads_equal = _max_diffs(model, collate(rows))
    assert diff < 1e-5
    assert grads_equal == dict.fromkeys(grads_equal, True)


def test_varlen_applies_a_sliding_window_inside_long_samples() -> None:
    """Mistral with a window of 5 tokens over samples of 3, 9 and 12 tokens: the banded mask inside the longer samples."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    cfg = MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, sliding_window=5, max_position_embeddings=64)
    model = MistralForCausalLM(cfg)
    lens = [3, 9, 12]
    batch = {"input_ids": torch.randint(0, 64, (1, sum(lens))), "position_ids": torch.cat([torch.arange(n) for n in lens]).unsqueeze(0)}
    diff, grads_equal = _max_diffs(model, batch)
    assert diff < 1e-5
    assert grads_equal == dict.fromkeys(grads_equal, True)


def test_varlen_refuses_generation_and_names_unsupported_attention() -> None:
    from transformers import Gemma2Config, GptOssConfig, LlamaConfig, LlamaForCausalLM

    assert unsupported(LlamaConfig()) is None
    assert unsupported(Gemma2Config()) == "attn_logit_softcapping=50.0"
    assert unsupported(GptOssConfig()) == "attention sinks"
    register()
    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    model.set_attn_implementation(VARLEN)
    with pytest.raises(ValueError, match="use sdpa to generate"):
        model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=2, do_sample=False)


def test_cu_seqlens_flatten_the_rows_samples() -> None:
    """Two rows of 6 as one sequence of 12: samples at 0, 3, 5 and 6 + 0, 6 + 2, and the longest sample (4 tokens)."""
    from sft_engine.attention import cu_seqlens

    assert cu_seqlens([[0, 3, 5], [0, 2]], 6) == ([0, 3, 5, 6, 8, 12], 4)
    assert cu_seqlens([[0]], 5) == ([0, 5], 5)


def test_flash_varlen_is_not_taken_on_cpu_or_in_fp32() -> None:
    """FlashAttention's varlen kernel takes CUDA tensors in bf16/fp16 only: CPUs and fp32 keep the per-sample calls
    (tests/test_gpu.py checks the kernel itself on a GPU)."""
    from sft_engine.attention import flash_varlen_usable

    assert not flash_varlen_usable(torch.zeros(1, 2, 4, 64, dtype=torch.bfloat16))
    assert not flash_varlen_usable(torch.zeros(1, 2, 4, 64))
    assert not flash_varlen_usable(torch.zeros(1, 2, 4, 64, dtype=torch.bfloat16), dropout=0.1)
