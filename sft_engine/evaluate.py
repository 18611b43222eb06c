"""Evaluation: held-out loss per supervised token, and a greedy generation sample."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import polars as pl
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from sft_engine.data import PackedDataset, collate
from sft_engine.errors import UserError
from sft_engine.loss import segment_loss_sums


@torch.no_grad()
def heldout_sample_losses(model: PreTrainedModel, data_path: Path, micro_batch_size: int = 2,
                          max_rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per held-out sample (packed rows, block-causal): the sum of its token losses and its supervised-token count."""
    ds = PackedDataset(data_path)
    n = len(ds) if max_rows is None else min(len(ds), max_rows)
    model.eval()
    sums, counts = [torch.zeros(0, dtype=torch.float64)], [torch.zeros(0, dtype=torch.float64)]
    for start in range(0, n, micro_batch_size):
        batch = collate([ds[i] for i in range(start, min(n, start + micro_batch_size))])
        out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
        s, c = segment_loss_sums(out.logits, batch["labels"], batch["position_ids"])
        sums.append(s.double())
        counts.append(c.double())
    return torch.cat(sums), torch.cat(counts)


def _ratio_stderr(values: torch.Tensor, counts: torch.Tensor, mean: float) -> float:
    """Standard error of a ratio estimator sum(values) / sum(counts) with the samples as the sampling unit."""
    k = values.numel()
    return float(((values - mean * counts).pow(2).sum() / (k - 1)).sqrt() / (counts.mean() * math.sqrt(k))) if k > 1 else float("nan")


def heldout_loss(model: PreTrainedModel, data_path: Path, micro_batch_size: int = 2, max_rows: int | None = None) -> dict[str, float]:
    """Mean next-token loss over every supervised held-out token (packed rows, block-causal).

    ``loss_stderr`` treats the held-out samples as the sampling unit (a ratio estimator: each sample's
    loss sum over its token count), so two models scored on the same split can be compared with it.
    """
    return heldout_summary(*heldout_sample_losses(model, data_path, micro_batch_size, max_rows))


def heldout_summary(s: torch.Tensor, c: torch.Tensor) -> dict[str, float]:
    """Loss, its stderr, perplexity and supervised tokens from per-sample loss sums and token counts."""
    if not float(c.sum()):
        return {"loss": float("nan"), "loss_stderr": float("nan"), "perplexity": float("nan"), "supervised_tokens": 0.0}
    loss = float(s.sum() / c.sum())
    return {"loss": loss, "loss_stderr": _ratio_stderr(s, c, loss), "perplexity": math.exp(loss), "supervised_tokens": float(c.sum())}


@contextlib.contextmanager
def inference_precision(precision: str) -> Iterator[None]:
    """Scoring forwards in fp32, or under bf16 autocast (``evaluate.precision: bf16``: about 1.7x faster on CPUs with
    avx512_bf16; base and tuned are scored the same way, so their comparison stays fair)."""
    if precision != "bf16":
        yield
        return
    with torch.autocast("cuda" if torch.cuda.is_available() else "cpu", dtype=torch.bfloat16):
        yield


def paired_loss_delta_stderr(tuned: tuple[list[float], list[float]], base: tuple[list[float], list[float]]) -> float | None:
    """Standard error of tuned - base held-out loss on the same samples: the ratio estimator of the per-sample loss
    differences (far smaller than either model's own stderr, since the samples' difficulty cancels). None when the
    two were not scored on the same samples (their supervised-token counts differ)."""
    (st, ct), (sb, cb) = tuned, base
    if ct != cb or len(ct) < 2:
        return None
    diff, counts = torch.tensor(st, dtype=torch.float64) - torch.tensor(sb, dtype=torch.float64), torch.tensor(ct, dtype=torch.float64)
    return _ratio_stderr(diff, counts, float(diff.sum() / counts.sum()))


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


@torch.no_grad()
def generate(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[list[dict[str, str]]], max_new_tokens: int,
    batch_size: int = 8,
) -> list[str]:
    """Greedy completions of chat prompts (rendered with the model's chat template), ``batch_size`` at a time.

    Prompts are left-padded so every row's generation starts right after its own prompt; greedy decoding of
    a left-padded batch gives the same text as one prompt at a time (up to float rounding).
    """
    model.eval()
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    texts = [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False) for p in prompts]
    out: list[str] = []
    try:
        for start in range(0, len(texts), batch_size):
            enc = tokenizer(texts[start : start + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
            enc = enc.to(model.device)
            gen = model.generate(
                **enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id,
            )
            new = gen[:, enc["input_ids"].shape[1] :]
            out += tokenizer.batch_decode(new, skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return out


def score_tasks(items: list[dict[str, Any]], responses: list[str]) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Exact-match accuracy of the verifiable tasks: the text after the response's last 'Answer:' equals the answer."""
    from sft_engine.instruct import binomial_stderr

    records = [
        {"suite": "tasks", "id": it["id"], "answer": it["answer"], "response": r, "correct": extract_answer(r) == it["answer"]}
        for it, r in zip(items, responses, strict=True)
    ]
    n = len(records)
    acc = sum(r["correct"] for r in records) / n if n else float("nan")
    return {"exact_match": acc, "exact_match_stderr": binomial_stderr(acc, n), "n": float(n)}, records


# metric -> whether higher is better; anything not listed (stderr, n) is carried, not compared.
LOWER_IS_BETTER = ("heldout.loss", "heldout.perplexity")


def results_table(scores: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    """One row per metric: ``{metric, base, tuned, delta, base_stderr, tuned_stderr, delta_stderr, higher_is_better}``.

    ``scores`` maps a model name (``tuned``, optionally ``base``) to flat metrics such as
    ``knowledge.mmlu.acc`` with ``knowledge.mmlu.acc_stderr`` beside it; ``delta_stderr`` comes from a
    ``<metric>_delta_stderr`` in the tuned scores (a paired comparison on the same items), else None.
    """
    tuned = scores["tuned"]
    base = scores.get("base", {})
    rows = []
    for metric, value in tuned.items():
        if metric.endswith(("_stderr", ".n")) or metric == "heldout.supervised_tokens":  # _delta_stderr too
            continue
        b = base.get(metric)
        rows.append({
            "metric": metric,
            "base": b,
            "tuned": value,
            "delta": None if b is None else value - b,
            "base_stderr": base.get(f"{metric}_stderr"),
            "tuned_stderr": tuned.get(f"{metric}_stderr"),
            "delta_stderr": tuned.get(f"{metric}_delta_stderr"),
            "higher_is_better": metric not in LOWER_IS_BETTER,
        })
    return rows


def check_gate(table: list[dict[str, Any]], gate: Any) -> tuple[bool, list[str]]:
    """Apply an ``EvalConfig.gate`` to the results table; returns (passed, one reason per failed rule)."""
    by = {r["metric"]: r for r in table}
    reasons: list[str] = []
    if gate.heldout_loss_must_drop:
        row = by.get("heldout.loss")
        if row is None or row["delta"] is None:
            reasons.append("heldout_loss_must_drop needs the base model's held-out loss (evaluate.compare_base: true)")
        elif not row["delta"] < 0:
            reasons.append(f"held-out loss did not drop: base {row['base']:.4f} -> tuned {row['tuned']:.4f}")
    if gate.max_knowledge_drop is not None:
        for row in table:
            if not (row["metric"].startswith("knowledge.") and row["metric"].endswith(".acc")):
                continue
            if row["delta"] is None:
                reasons.append(f"max_knowledge_drop needs the base model's {row['metric']} (evaluate.compare_base: true)")
            elif (drop := 100 * (row["base"] - row["tuned"])) > gate.max_knowledge_drop:
                se = 100 * math.sqrt((row["base_stderr"] or 0) ** 2 + (row["tuned_stderr"] or 0) ** 2)
                if gate.knowledge_noise_z is not None and drop <= gate.knowledge_noise_z * se:
                    continue  # larger than allowed, but within sampling noise at this many items
                noise = f", beyond {gate.knowledge_noise_z:g} standard errors ({se:.1f} points)" if gate.knowledge_noise_z else ""
                reasons.append(
                    f"{row['metric']} dropped {drop:.1f} points (base {100 * row['base']:.1f} -> tuned "
                    f"{100 * row['tuned']:.1f}); the gate allows {gate.max_knowledge_drop:g}{noise}"
                )
    for metric, minimum in gate.min_scores.items():
        if metric not in by:
            reasons.append(f"min_scores names '{metric}', which is not in the table ({', '.join(sorted(by))})")
        elif not by[metric]["tuned"] >= minimum:
            reasons.append(f"{metric} = {by[metric]['tuned']:.4f} is below the minimum {minimum:g}")
    return not reasons, reasons


def table_metrics(table: list[dict[str, Any]]) -> dict[str, float]:
    """MLflow metric names for the table, the same in every run so run-compare lines them up:
    ``eval/<metric>/{base,tuned,delta,tuned_stderr}``."""
    out: dict[str, float] = {}
    for row in table:
        for col in ("base", "tuned", "delta", "tuned_stderr"):
            if row[col] is not None and math.isfinite(row[col]):
                out[f"eval/{row['metric']}/{col}"] = float(row[col])
    return out


def _fmt(v: float | None, stderr: float | None = None) -> str:
    if v is None:
        return "-"
    return f"{v:.4f}" + (f" ±{stderr:.3f}" if stderr is not None and math.isfinite(stderr) else "")


def format_table(table: list[dict[str, Any]]) -> str:
    """The results table as Markdown (also what the terminal and the logs show)."""
    lines = ["| metric | base | tuned | delta |", "|---|---:|---:|---:|"]
    for r in table:
        delta = "-" if r["delta"] is None else f"{r['delta']:+.4f}" + (f" ±{r['delta_stderr']:.3f}" if r.get("delta_stderr") else "")
        lines.append(f"| {r['metric']} | {_fmt(r['base'], r['base_stderr'])} | {_fmt(r['tuned'], r['tuned_stderr'])} | {delta} |")
    return "\n".join(lines)


class GateFailed(UserError, RuntimeError):
    """The tuned model did not pass ``evaluate.gate``; the message lists every failed rule (exit 3)."""

    exit_code = 3

    def __init__(self, reasons: list[str], result: dict[str, Any] | None = None) -> None:
        super().__init__("evaluation gate failed: " + "; ".join(reasons)
                         + " (every result is in MLflow, tag sft.gate=failed; relax evaluate.gate or fix the run)")
        self.reasons = reasons
        self.result = result or {}
