"""Evaluation: held-out loss per supervised token, and a greedy generation sample."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import polars as pl
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from sft_engine.data import PackedDataset, collate
from sft_engine.loss import supervised_count, token_loss_sum


@torch.no_grad()
def heldout_loss(model: PreTrainedModel, data_path: Path, micro_batch_size: int = 2, max_rows: int | None = None) -> dict[str, float]:
    """Mean next-token loss over every supervised held-out token (packed rows, block-causal)."""
    ds = PackedDataset(data_path)
    n = len(ds) if max_rows is None else min(len(ds), max_rows)
    model.eval()
    loss_sum, count = 0.0, 0
    for start in range(0, n, micro_batch_size):
        batch = collate([ds[i] for i in range(start, min(n, start + micro_batch_size))])
        out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
        loss_sum += float(token_loss_sum(out.logits, batch["labels"]))
        count += supervised_count(batch["labels"])
    loss = loss_sum / count if count else float("nan")
    return {"loss": loss, "perplexity": math.exp(loss) if count else float("nan"), "supervised_tokens": float(count)}


def extract_answer(text: str) -> str | None:
    """The first line after the last 'Answer:' (the verifiable tasks' format), or None if absent."""
    if "Answer:" not in text:
        return None
    tail = text.rsplit("Answer:", 1)[1].strip()
    return tail.splitlines()[0].strip() if tail else ""


@torch.no_grad()
def generate_samples(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, heldout: pl.DataFrame, n: int, max_new_tokens: int
) -> list[dict[str, Any]]:
    """Greedy answers to the first ``n`` held-out prompts (last assistant turn withheld)."""
    model.eval()
    out = []
    for msgs in heldout["messages"].to_list()[:n]:
        last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        prompt = [{"role": m["role"], "content": m["content"]} for m in msgs[:last]]
        enc = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        gen = model.generate(
            **enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        text = tokenizer.decode(gen[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        reference = msgs[last]["content"]
        ref_answer = extract_answer(reference)
        out.append({
            "prompt": prompt[-1]["content"],
            "reference": reference,
            "generated": text,
            "exact_answer": None if ref_answer is None else extract_answer(text) == ref_answer,
        })
    return out
