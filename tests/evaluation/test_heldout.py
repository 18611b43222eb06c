"""Held-out loss on a real (tiny) model: bf16 autocast stays close to fp32."""

from __future__ import annotations

from pathlib import Path

import pytest

from sft_engine.evaluation.heldout import heldout_loss
from sft_engine.evaluation.suite import inference_precision


def test_held_out_loss_under_bf16_autocast_is_close_to_fp32(tiny_model: Path, packed: Path) -> None:
    from sft_engine.model import load_model

    model = load_model(tiny_model)
    fp32 = heldout_loss(model, packed, micro_batch_size=2, max_rows=4)
    with inference_precision("bf16"):
        bf16 = heldout_loss(model, packed, micro_batch_size=2, max_rows=4)
    assert fp32["supervised_tokens"] == bf16["supervised_tokens"] > 0
    # bf16 rounds the logits (8 bits of mantissa): a random model's ~ln(vocab) loss moves by well under 1 %.
    assert bf16["loss"] == pytest.approx(fp32["loss"], rel=1e-2) and bf16["loss"] != fp32["loss"]
