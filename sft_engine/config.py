"""One pydantic config per stage, loaded from YAML with ``key=value`` overrides.

Every model forbids unknown keys, so a typo fails before any work starts, with a message that
names the key, what it accepts, and the closest valid key.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
import re
from enum import Enum
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, Field, ValidationError, create_model, field_validator, model_validator

from sft_engine.curation.formats import COLUMN_FIELDS, FORMAT_NAMES
from sft_engine.errors import UserError
from sft_engine.evaluation.registry import BUILT_IN, BUILTIN_SUITES, FileSuiteConfig, builtin_eval_sets, configured_suites
from sft_engine.fields import PER_FIELD, Strict, keyed, unkeyed


class ConfigError(UserError, ValueError):
    """A config that cannot be used; the message names the key and the fix (exit 2)."""

    exit_code = 2


class SourceConfig(Strict):
    """One raw data source. Exactly one of ``path`` or ``builtin`` is set."""

    name: str = Field(json_schema_extra=keyed("curate.rows"), description="Short name used in drop reasons, stats and mixing.")
    path: str | None = Field(json_schema_extra=keyed("curate.rows"), default=None, description="File or glob of .jsonl/.jsonl.gz/.json/.parquet files.")
    builtin: Literal["chitchat", "verifiable_tasks"] | None = Field(json_schema_extra=keyed("curate.rows"), 
        default=None, description="Generate this source from an installed package (no hub): chitchat or verifiable_tasks."
    )
    format: Literal[FORMAT_NAMES] = Field(json_schema_extra=keyed("curate.rows"),   # type: ignore[valid-type] # the registry's names (curation/formats.py)
        default="auto",
        description="Row shape: " + ", ".join(FORMAT_NAMES) + "; auto detects messages / conversations (ShareGPT) / "
        "instruction (Alpaca) / prompt+completion per row.",
    )
    columns: dict[str, str] | None = Field(json_schema_extra=keyed("curate.rows"), 
        default=None,
        description="For format=columns: map canonical fields to your columns, e.g. {user: question, assistant: answer, "
        "system: sys, reasoning: thoughts, tools: functions}.",
    )
    limit: int | None = Field(json_schema_extra=keyed("curate.rows"), default=None, gt=0, description="Read at most this many rows (None = all).")
    weight: float = Field(json_schema_extra=keyed("curate.mix"), default=1.0, gt=0, description="Mixing weight (1.0 = every kept row once, 2.0 = twice, 0.5 = a seeded half).")
    target_rows: int | None = Field(json_schema_extra=keyed("curate.mix"), default=None, ge=0, description="Exact train rows from this source after mixing (overrides weight).")
    max_rows: int | None = Field(json_schema_extra=keyed("curate.mix"), default=None, ge=0, description="Cap on this source's train rows after mixing.")

    @model_validator(mode="after")
    def _one_origin(self) -> SourceConfig:
        if (self.path is None) == (self.builtin is None):
            raise ValueError(f"source '{self.name}': set exactly one of 'path' (a file or glob) or 'builtin' (chitchat, verifiable_tasks)")
        if self.format == "columns" and not (self.columns and {"user", "assistant"} <= set(self.columns)):
            raise ValueError(f"source '{self.name}': format=columns needs columns with at least 'user' and 'assistant' keys")
        if self.columns and not set(self.columns) <= set(COLUMN_FIELDS):
            raise ValueError(f"source '{self.name}': columns keys must be among {', '.join(COLUMN_FIELDS)}")
        return self


class QualityConfig(Strict):
    """Conversation-aware quality filters (Gopher-style heuristics); each threshold None = off."""

    max_duplicate_line_fraction: float | None = Field(
        default=0.3, gt=0, le=1, description="Drop if in one reply more than this share of its lines (fenced code left out) are repeats."
    )
    max_top_ngram_fraction: float | None = Field(
        default=0.3, gt=0, le=1, description="Drop if in one reply the most frequent word 3-gram covers more than this share of its words."
    )
    repetition_min_words: int = Field(default=30, ge=1, description="The n-gram rule applies only to a reply of at least this many words.")
    line_min_alnum: int = Field(
        default=8, ge=0,
        description="The duplicate-line rule counts only lines with at least this many letters or digits (code punctuation, "
        "markdown rules and short labels are not repetition).",
    )
    min_alnum_fraction: float | None = Field(
        default=0.25, ge=0, le=1, description="Drop if fewer than this share of assistant characters are letters or digits."
    )
    max_symbol_fraction: float | None = Field(
        default=0.3, ge=0, le=1, description="Drop if more than this share of assistant characters are symbols (#, {, }, <, >, |, ...)."
    )
    placeholder_patterns: list[str] = Field(
        default_factory=lambda: [r"^\s*(n/?a|none|null|todo|tbd|\.{3}|-+|\?+)\s*$", r"^\s*\[?(insert|placeholder)[^\]]*\]?\s*$"],
        description="Regexes (case-insensitive) for assistant turns that are placeholders, not answers.",
    )
    refusal_patterns: list[str] = Field(
        default_factory=lambda: [r"\bas an ai (language )?model\b", r"\bi('m| am) (sorry|unable)[^.]*\b(can('|no)t|unable to) (help|assist|provide)"],
        description="Regexes (case-insensitive) for refusals/boilerplate in assistant turns; [] = off.",
    )
    languages: list[str] | None = Field(
        default=None,
        description="Keep only conversations detected (py3langid, first 2,000 characters of all turns) as one of these "
        "ISO 639-1 codes, e.g. [en, de]; other rows drop as quality_language. None = off.",
    )

    @field_validator("languages")
    @classmethod
    def _known_languages(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return v
        from sft_engine.langid import known_languages

        known = known_languages()
        bad = [x for x in v if x not in known]
        if bad or not v:
            raise ValueError(
                f"quality.languages: {bad or 'an empty list'} is not a list of codes py3langid knows; "
                f"use ISO 639-1 codes such as {sorted(known)[:12]}... or null to turn the filter off"
            )
        return v


class NearDedupConfig(Strict):
    """MinHash near-duplicate removal (defaults from the field: 5-gram words, 128 hashes, Jaccard 0.8)."""

    enabled: bool = Field(json_schema_extra=keyed("curate.rows"), default=True, description="Drop near-duplicates (reason dedup_near), keeping the first row of each cluster.")
    threshold: float = Field(json_schema_extra=keyed("curate.dedup"), default=0.8, gt=0, le=1, description="Exact Jaccard (word n-gram sets) a candidate pair must reach.")
    ngram: int = Field(json_schema_extra=keyed("curate.rows"), default=5, ge=1, le=13, description="Words per shingle.")
    num_perm: Literal[64, 128, 256] = Field(json_schema_extra=keyed("curate.rows"), default=128, description="Sketch size (one-permutation MinHash bins).")
    bands: int = Field(json_schema_extra=keyed("curate.rows"), default=16, ge=1, description="LSH bands; num_perm / bands rows each (16 x 8: candidate S-curve at ~0.71).")


class EvalSetConfig(Strict):
    """An evaluation set to decontaminate against: a JSONL/JSON/Parquet file, a built-in set, or a suite of
    ``evaluate.suites`` (added for each one automatically, see ``include_evaluation_sets``)."""

    name: str = Field(description="Name used in drop reasons and reports (decontam_<name>).")
    path: str | None = Field(default=None, description="File with one item per row.")
    builtin: str | None = Field(
        default=None,
        description="A shipped eval set (the same items the evaluate stage scores): " + ", ".join(builtin_eval_sets()) + ".",
    )
    suite: dict[str, Any] | None = Field(
        default=None, description="A suite of evaluate.suites, as its texts are read (its name, kind, path and field names).",
    )
    fields: list[str] = Field(
        default_factory=lambda: ["question", "prompt", "instruction", "input", "text", "answer", "output"],
        description="Text fields of an item that are checked (those present are joined).",
    )

    @field_validator("builtin")
    @classmethod
    def _known_builtin(cls, v: str | None) -> str | None:
        if v == "verifiable_tasks_eval":
            raise ValueError("the set 'verifiable_tasks_eval' is now 'verifiable' (the suite's name)")
        if v is not None and v not in builtin_eval_sets():
            raise ValueError(f"unknown built-in set '{v}'; choose from {', '.join(builtin_eval_sets())}")
        return v

    @model_validator(mode="after")
    def _one_origin(self) -> EvalSetConfig:
        if sum(x is not None for x in (self.path, self.builtin, self.suite)) != 1:
            raise ValueError(f"eval set '{self.name}': set exactly one of 'path' or 'builtin'")
        return self


class DecontamConfig(Strict):
    """Decontamination: conversations sharing a word n-gram with an eval item are dropped or flagged."""

    ngram: int = Field(default=13, ge=8, le=13, description="Words per n-gram (8-13); items shorter than this match whole.")
    action: Literal["drop", "flag"] = Field(default="drop", description="drop = reason decontam_<set>; flag = keep, record the match.")
    eval_sets: list[EvalSetConfig] = Field(default_factory=list, description="Eval sets to check against ([] = off).")
    include_evaluation_sets: bool = Field(
        default=True,
        description="Also check every set the evaluate stage scores (the built-in suites' sets and each of evaluate.suites "
        "whose decontaminate is true), so training data never overlaps an item the evaluation may score.",
    )


class RepairConfig(Strict):
    """Repairs curation makes instead of dropping a row (counted per kind as repaired_<kind>; see curation/repair.py)."""

    leading_assistant: Literal["context", "remove", "drop_row"] = Field(
        default="remove",
        description="Assistant (and tool) turns before the first user turn, as in chunks of split ShareGPT dumps: remove them "
        "(FastChat's choice), keep them as untrained context (train: false), or drop the row (repair_leading_assistant).",
    )
    merge_consecutive_user: bool = Field(default=True, description="Merge consecutive user turns into one (a blank line between).")
    trailing_user: Literal["remove", "drop_row"] = Field(
        default="remove", description="User (or tool) turns after the last assistant turn: remove them, or drop the row (repair_trailing_user)."
    )


_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def memory_bytes(size: str) -> int:
    """Bytes of a size such as ``512MiB``, ``2GiB``, ``4GB`` or ``1000000``; ``auto`` = 1/64 of this machine's memory."""
    import psutil

    if size.strip().lower() == "auto":
        return psutil.virtual_memory().total // 64
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", size)
    if m is None or m.group(2).lower() not in _SIZE_UNITS:
        raise ValueError(f"memory_budget: '{size}' is not a size; write e.g. 512MiB, 2GiB, 4GB or auto")
    value = int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])
    if value <= 0:
        raise ValueError(f"memory_budget: '{size}' must be more than 0 bytes")
    return value


class CurateConfig(Strict):
    """Curation: read, normalize, validate, dedup, filter, split."""

    sources: list[SourceConfig] = Field(json_schema_extra=PER_FIELD, min_length=1, description="Raw sources to read.")
    min_chars: int | None = Field(json_schema_extra=keyed("curate.rows"), default=1, ge=0, description="Drop conversations with fewer characters (None = off).")
    max_chars: int | None = Field(json_schema_extra=keyed("curate.rows"), default=20_000, gt=0, description="Drop conversations with more characters (None = off).")
    min_turns: int | None = Field(json_schema_extra=keyed("curate.rows"), default=2, ge=1, description="Drop conversations with fewer messages (None = off).")
    max_turns: int | None = Field(json_schema_extra=keyed("curate.rows"), default=64, ge=1, description="Drop conversations with more messages (None = off).")
    dedup: bool = Field(json_schema_extra=keyed("curate.dedup"), default=True, description="Exact dedup on whitespace/case-normalized text, first row wins.")
    near_dedup: NearDedupConfig = Field(json_schema_extra=PER_FIELD, default_factory=lambda: NearDedupConfig())
    decontaminate: DecontamConfig = Field(json_schema_extra=keyed("curate.rows"), default_factory=lambda: DecontamConfig())
    max_row_bytes: int = Field(json_schema_extra=keyed("curate.rows"), default=1_000_000, ge=1, description="Raw rows larger than this are quarantined unparsed (read_row_too_large).")
    quality: QualityConfig = Field(json_schema_extra=keyed("curate.rows"), default_factory=lambda: QualityConfig())
    heldout_fraction: float = Field(json_schema_extra=keyed("curate.dedup"), 
        default=0.05, ge=0, lt=1, description="Share of rows set aside for held-out evaluation, chosen by content hash."
    )
    repair: RepairConfig = Field(json_schema_extra=keyed("curate.rows"), default_factory=lambda: RepairConfig())
    memory_budget: str = Field(
        json_schema_extra=unkeyed("decides only whether band keys are paired in memory or by partitions on disk: the same "
                                  "pairs, the same bytes (tests/curation/test_stage_runners.py)"),
        default="auto",
        description="Memory the global step may give near-dedup's band keys (~1 KB per row while paired) and the shingle "
        "sets of candidate rows: beyond it they are spilled to disk by hash partition and paired a partition at a time. "
        "A size (512MiB, 2GiB, 4GB) or auto = 1/64 of this machine's memory (384 MiB on 24 GB: 1M rows pair in 8 "
        "partitions, 3M in 16). The per-row columns the dedup holds (~28 B a row) and each unit's batch (runner.batch_rows) come on top.",
    )

    @field_validator("memory_budget")
    @classmethod
    def _size(cls, value: str) -> str:
        memory_bytes(value)
        return value

    @model_validator(mode="after")
    def _bounds(self) -> CurateConfig:
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names):
            raise ValueError(f"curate.sources: names must be unique, got {names}")
        for lo, hi in (("min_chars", "max_chars"), ("min_turns", "max_turns")):
            a, b = getattr(self, lo), getattr(self, hi)
            if a is not None and b is not None and a > b:
                raise ValueError(f"curate.{lo} ({a}) must not exceed curate.{hi} ({b})")
        return self


class MaskStrategy(str, Enum):
    """Which tokens carry a loss."""

    ALL_ASSISTANT = "all_assistant"
    LAST_ASSISTANT = "last_assistant"
    EVERYTHING = "everything"


class HistoryPolicy(str, Enum):
    """What happens to a trained turn that the template renders differently in the conversation than at inference."""

    EXPAND = "expand"
    LAST_ONLY = "last_only"
    CONTEXT_ONLY = "context_only"


class PrepareConfig(Strict):
    """Rendering, tokenization with loss masks, and packing."""

    max_seq_len: int = Field(json_schema_extra=keyed("prepare"), default=2048, ge=16, description="Packed row length in tokens.")
    mask: MaskStrategy = Field(json_schema_extra=keyed("prepare"), default=MaskStrategy.ALL_ASSISTANT, description="all_assistant, last_assistant or everything.")
    overlong: Literal["drop", "truncate"] = Field(json_schema_extra=keyed("prepare"), 
        default="drop", description="What to do with a sample longer than max_seq_len: drop it, or truncate it (counted either way)."
    )
    history: HistoryPolicy = Field(
        json_schema_extra=keyed("prepare"), default=HistoryPolicy.EXPAND,
        description="A trained turn the template rewrites in later context (Qwen3 drops reasoning, gpt-oss ends it with <|end|>): "
        "expand = train it in its inference form in a sample of its own (extra tokens, counted); last_only = only the "
        "last assistant turn gets one; context_only = such turns are context.",
    )
    chat_template_kwargs: dict[str, Any] = Field(
        json_schema_extra=keyed("prepare"), default_factory=dict,
        description="Variables passed to the chat template, e.g. {enable_thinking: false}; a row's own chat_template_kwargs override these.",
    )
    allow_unverified_template: bool = Field(
        json_schema_extra=unkeyed("decides only whether a failed template self-check stops the stage"), default=False,
        description="Prepare even when the template self-check (sft-pipeline check-template) fails on a shape the template accepts.",
    )
    tokenize_batch_size: int = Field(json_schema_extra=unkeyed("batching does not change the tokens: tests/test_data.py packs identically at batch 1 and 1000"), default=1024, ge=1, description="Conversations per fast-tokenizer batch call.")


class TrainConfig(Strict):
    """DeepSpeed training."""

    zero_stage: Literal[0, 1, 2, 3] = Field(json_schema_extra=keyed("train"), default=2, description="DeepSpeed ZeRO stage.")
    precision: Literal["auto", "fp32", "bf16", "bf16-mixed", "fp16"] = Field(
        json_schema_extra=keyed("train"), default="auto",
        description="auto = bf16 on GPU, fp32 on CPU. bf16: bf16 weights, fp32 master copy in the optimizer. bf16-mixed: "
        "fp32 weights, gradients and optimizer, forward and backward matmuls in bf16 (autocast): the fp32 loss curve "
        "at ~1.2x its speed on CPUs with avx512_bf16, where bf16 weights lose small updates to rounding (docs/benchmarks.md). "
        "fp16 (GPU only) uses dynamic loss scaling.",
    )
    offload_optimizer: bool = Field(json_schema_extra=keyed("train"), default=False, description="ZeRO-Offload optimizer states to CPU (stage >= 1).")
    offload_param: bool = Field(json_schema_extra=keyed("train"), default=False, description="ZeRO-Infinity parameter offload to CPU (stage 3 only).")
    deepspeed_overrides: str | None = Field(json_schema_extra=keyed("train"), 
        default=None, description="Path to a DeepSpeed JSON whose fields override the derived config (merged, then logged)."
    )
    loss_norm: Literal["token", "sample"] = Field(json_schema_extra=keyed("train"), 
        default="token", description="token = sum of token losses / supervised tokens of the global batch; sample = mean of per-sample means."
    )
    micro_batch_size: int = Field(json_schema_extra=keyed("train"), default=1, ge=1, description="Packed rows per forward pass per process.")
    grad_accum: int = Field(json_schema_extra=keyed("train"), default=4, ge=1, description="Micro-batches per optimizer step.")
    lr: float = Field(json_schema_extra=keyed("train"), default=1e-4, gt=0, description="Peak learning rate (AdamW).")
    min_lr_ratio: float = Field(json_schema_extra=keyed("train"), default=0.1, ge=0, le=1, description="Cosine floor as a fraction of lr.")
    warmup_steps: int = Field(json_schema_extra=keyed("train"), default=2, ge=0, description="Linear warmup steps.")
    weight_decay: float = Field(json_schema_extra=keyed("train"), default=0.0, ge=0)
    betas: tuple[float, float] = Field(json_schema_extra=keyed("train"), default=(0.9, 0.95))
    grad_clip: float | None = Field(json_schema_extra=keyed("train"), default=1.0, gt=0, description="Max global grad norm (None = off).")
    epochs: float = Field(json_schema_extra=keyed("train"), default=1.0, gt=0, description="Passes over the packed data; ignored when max_steps is set.")
    max_steps: int | None = Field(json_schema_extra=keyed("train"), default=None, ge=1, description="Optimizer steps (overrides epochs).")
    attn_implementation: Literal["auto", "sdpa_varlen", "sdpa", "eager", "flash_attention_2"] = Field(
        json_schema_extra=keyed("train"), default="auto",
        description="Attention kernel; all respect packed sample boundaries. sdpa_varlen runs causal SDPA per packed "
        "sample (sdpa computes the whole row under a block mask: ~2x the attention time on CPU), or on a GPU in "
        "bf16/fp16 one call of PyTorch's FlashAttention varlen kernel per layer; auto = flash_attention_2 "
        "on a GPU with flash-attn installed, else sdpa_varlen, else sdpa (models with soft-capped or sink attention).",
    )
    lm_head_chunk: int | None = Field(
        json_schema_extra=keyed("train"), default=1024, ge=16,
        description="Compute the LM head and the loss this many tokens at a time, recomputing each chunk's logits in the "
        "backward pass, so no [tokens, vocab] tensor is ever held whole (same loss and gradients, tests/test_train.py; "
        "None = full logits).",
    )
    gradient_checkpointing: bool = Field(
        json_schema_extra=keyed("train"), default=False,
        description="Recompute each decoder layer's activations in the backward pass: less memory, ~1/3 more compute.",
    )
    threads: int | None = Field(json_schema_extra=unkeyed("CPU threads change the speed of the same computation"), default=None, ge=1, description="torch CPU threads (None = all cores).")
    nproc: int = Field(json_schema_extra=keyed("train"), default=1, ge=1, description="Training processes on this machine (>1 launches torch.distributed.run).")
    hostfile: str | None = Field(json_schema_extra=keyed("train"), 
        default=None, description="DeepSpeed hostfile ('host slots=N' lines) for several nodes; launches the deepspeed launcher."
    )
    eval_every: int | None = Field(json_schema_extra=keyed("train"), default=None, ge=1, description="Held-out loss every N steps during training (None = off).")
    eval_max_rows: int | None = Field(json_schema_extra=keyed("train"), default=32, ge=1, description="Held-out packed rows used by eval_every (None = all).")
    log_model: bool = Field(json_schema_extra=unkeyed("copies the finished model into MLflow after training"), default=False, description="Also copy the final Hugging Face folder into MLflow as artifacts.")
    checkpoint_every: int | None = Field(json_schema_extra=unkeyed("checkpoints resume exactly: tests/test_train.py compares a resumed run with an uninterrupted one"), default=None, ge=1, description="Save a DeepSpeed checkpoint every N steps (None = off).")
    keep_checkpoints: int = Field(json_schema_extra=unkeyed("how many checkpoints stay on disk while training"), default=2, ge=1, description="Complete checkpoints kept; older ones are deleted.")
    resume: Literal["auto", "never"] = Field(json_schema_extra=unkeyed("resuming reproduces the uninterrupted run exactly"), default="auto", description="auto = continue from the latest complete checkpoint.")

    @model_validator(mode="after")
    def _offload(self) -> TrainConfig:
        if self.offload_param and self.zero_stage != 3:
            raise ValueError(f"train.offload_param needs train.zero_stage=3 (got {self.zero_stage})")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("train.offload_optimizer needs train.zero_stage >= 1")
        return self


class GateConfig(Strict):
    """What the tuned model must show before the run is tagged passed and the model is registered."""

    heldout_loss_must_drop: bool = Field(default=True, description="Tuned held-out loss below the base model's.")
    max_knowledge_drop: float | None = Field(
        default=2.0, ge=0, description="Largest drop in accuracy points (of 100) allowed on any knowledge set (None = off)."
    )
    knowledge_noise_z: float | None = Field(
        default=None, gt=0,
        description="If set, a knowledge drop fails the gate only when it also exceeds this many standard errors of the "
        "base-tuned difference (2 ~ 95 %), so a small `knowledge.limit` does not fail runs on sampling noise.",
    )
    min_scores: dict[str, float] = Field(
        default_factory=dict,
        description="Table metric -> minimum tuned value, for metrics where higher is better, e.g. {verifiable.exact_match: 0.3}.",
    )
    max_scores: dict[str, float] = Field(
        default_factory=dict,
        description="Table metric -> maximum tuned value, for metrics where lower is better, e.g. {my_docs.loss: 1.8}.",
    )


class SamplesConfig(Strict):
    """Greedy answers to a few held-out prompts, shown beside the scores (not scored)."""

    n: int = Field(json_schema_extra=keyed("evaluate.suite", "evaluate"), default=4, ge=0, description="Held-out prompts to answer (0 = none).")
    max_new_tokens: int = Field(json_schema_extra=keyed("evaluate.suite", "evaluate"), default=48, ge=1)


# Keys that moved when the suites became plug-ins: a config still using one gets the new key in its error.
_RENAMED = {
    "max_heldout_rows": "evaluate.heldout.max_rows", "ifbench_limit": "evaluate.ifbench.limit",
    "ifbench_max_new_tokens": "evaluate.ifbench.max_new_tokens", "tasks_limit": "evaluate.verifiable.limit",
    "generate_samples": "evaluate.samples.n",
    "max_new_tokens": "evaluate.samples.max_new_tokens (and evaluate.verifiable.max_new_tokens for the verifiable suite)",
}


class _EvaluateShared(Strict):
    """Base vs tuned on the same items: every configured suite (the built-in sections below and `suites`), scored per
    model and cached per suite; the comparison, the gate and registration."""

    compare_base: bool = Field(json_schema_extra=keyed("evaluate"), default=True, description="Also evaluate the base model on the same items.")
    precision: Literal["fp32", "bf16"] = Field(
        json_schema_extra=keyed("evaluate.score", "evaluate"), default="fp32",
        description="Scoring forwards in fp32, or under bf16 autocast (~1.7x faster on CPUs with avx512_bf16; base and tuned alike).",
    )
    micro_batch_size: int = Field(json_schema_extra=keyed("evaluate.score", "evaluate"), default=2, ge=1, description="Packed rows per loss forward.")
    gen_batch_size: int = Field(json_schema_extra=keyed("evaluate.score", "evaluate"), default=8, ge=1, description="Prompts generated together (greedy, left-padded).")
    samples: SamplesConfig = Field(json_schema_extra=PER_FIELD, default_factory=SamplesConfig)
    suites: list[FileSuiteConfig] = Field(  # type: ignore[valid-type] # the registry's file kinds
        json_schema_extra=PER_FIELD, default_factory=list,
        description="A team's own suites, each {name, kind: generation | multiple_choice | loss, path, ...} (README: Evaluation suites).",
    )
    gate: GateConfig = Field(json_schema_extra=unkeyed("applied to the cached scores after scoring: changing it re-scores nothing"), default_factory=GateConfig)
    register_model: str | None = Field(json_schema_extra=unkeyed("registration happens after evaluation, from its outputs"),
        default=None, description="MLflow registered-model name; the tuned model is registered only if the gate passes."
    )

    @model_validator(mode="before")
    @classmethod
    def _renamed_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            moved = [f"evaluate.{k} is now {_RENAMED[k]}" for k in data if k in _RENAMED]
            knowledge = data.get("knowledge")
            if isinstance(knowledge, dict) and "tasks" in knowledge:
                moved.append("evaluate.knowledge.tasks is now evaluate.knowledge.sets")
            if moved:
                raise ValueError("renamed keys: " + "; ".join(moved))
        return data

    @model_validator(mode="after")
    def _suite_names(self) -> _EvaluateShared:
        seen: set[str] = set()
        for s in self.suites:
            if s.name in BUILTIN_SUITES or s.name in seen:
                what = "a built-in suite" if s.name in BUILTIN_SUITES else "another entry of evaluate.suites"
                raise ValueError(f"evaluate.suites: the name '{s.name}' is taken by {what}; give the suite another name")
            seen.add(s.name)
        return self


# One section per built-in suite, read from the registry (sft_engine/evaluation/registry.py): a suite added there
# gets its config section here, its settings' fields keyed per suite.
EvalConfig = create_model(
    "EvalConfig", __base__=_EvaluateShared, __doc__=_EvaluateShared.__doc__, __module__=__name__,
    **{cls.kind: (cls.Settings, Field(json_schema_extra=PER_FIELD, default_factory=cls.Settings, description=cls.Settings.__doc__))
       for cls in BUILT_IN},
)


# Optional task runners and the package each needs (the `scale` extra installs both).
_RUNNER_PACKAGES = {"dask": ("prefect_dask", "prefect-dask"), "ray": ("prefect_ray", "prefect-ray")}


class RunnerConfig(Strict):
    """Where curation's row-local work runs: one Prefect task per source or shard, on a task runner.

    Dedup (exact and near), the held-out split and mixing stay one global step over every shard, so
    every runner gives byte-identical outputs.
    """

    kind: Literal["auto", "sequential", "processes", "threads", "dask", "ray"] = Field(
        default="auto",
        description="auto = processes when at least two units are to be computed from 32 MiB of files or more, else "
        "sequential; sequential = in the flow's process, one unit after another; processes = a pool of `workers` local "
        "processes inside the curate task (Python's row parsing holds the GIL, so threads barely help); threads = a "
        "thread pool of mapped Prefect tasks; dask = a local Dask cluster of `workers` processes (or the scheduler at "
        "`address`); ray = local Ray with `workers` CPUs (or the cluster at `address`). dask and ray need "
        "pip install -e '.[scale]'.",
    )
    workers: int = Field(
        default_factory=lambda: os.cpu_count() or 1, ge=1,
        description="Processes, threads, Dask worker processes or Ray CPUs of a local runner (default: this machine's cores).",
    )
    address: str | None = Field(
        default=None,
        description="An existing cluster to use instead of a local one: a Dask scheduler (tcp://host:8786) or Ray (ray://host:10001).",
    )
    files_per_shard: int = Field(
        default=1, ge=1, description="Files of a glob source per unit of work (a source with `limit` is always one unit)."
    )
    batch_rows: int = Field(
        default=8192, ge=1,
        description="Rows a unit reads, checks and writes at a time: a unit's memory follows this, not its size "
        "(~250 MB per 8,192 chat rows of ~2 KB). Outputs do not depend on it.",
    )

    @field_validator("kind")
    @classmethod
    def _installed(cls, kind: str) -> str:
        if kind in _RUNNER_PACKAGES and importlib.util.find_spec(_RUNNER_PACKAGES[kind][0]) is None:
            package = _RUNNER_PACKAGES[kind][1]
            raise ValueError(
                f"runner.kind={kind} needs {package}, which is not installed: pip install -e '.[scale]' "
                f"(or set runner.kind=threads to stay on this machine)"
            )
        return kind


class SweepVariant(Strict):
    """One named variant of the pipeline config."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.=,-]+$", description="Variant name (letters, digits, _ . = , -).")
    overrides: list[str] = Field(default_factory=list, description="key=value overrides, exactly as on the command line.")


class SweepConfig(Strict):
    """Mix sweeps (`sft-pipeline sweep`): several variants trained on one token budget, compared on the same items."""

    baseline: bool = Field(default=True, description="Include the config as written, as the variant 'baseline'.")
    variants: list[SweepVariant] = Field(default_factory=list, description="Named override sets.")
    grid: dict[str, list[Any]] = Field(
        default_factory=dict,
        description="Override key -> values; one variant per combination, e.g. {curate.sources.0.weight: [0.5, 2.0]}.",
    )
    leave_one_out: bool = Field(default=False, description="Add one variant per source with that source removed (without_<name>).")
    token_budget: int | None = Field(
        default=None, ge=1,
        description="Training tokens per variant: every variant gets train.max_steps = budget / (max_seq_len x "
        "micro_batch_size x grad_accum x nproc), so mixes are compared at equal compute (None = the config's own steps).",
    )
    max_concurrent: int = Field(default=1, ge=1, description="Variants run at once (1 = one after another).")
    runner: Literal["threads", "dask", "ray"] = Field(
        default="threads", description="Task runner for concurrent variants (dask/ray need the 'scale' extra)."
    )


class PipelineConfig(Strict):
    """The whole pipeline: shared settings and one section per stage."""

    model: str = Field(json_schema_extra=unkeyed("its tokenizer and weights digests, not its name, enter the prepare, train and evaluate keys"), 
        default="smollm2-135m",
        description="'smollm2-135m' (packaged, converted once to safetensors) or a local Hugging Face model folder.",
    )
    work_dir: Path = Field(json_schema_extra=unkeyed("where the outputs live, not what they are"), default=Path("runs"), description="Where stage outputs, the MLflow store and caches live.")
    experiment: str = Field(json_schema_extra=unkeyed("MLflow tracking only"), default="sft-pipeline", description="MLflow experiment name.")
    tracking_uri: str | None = Field(json_schema_extra=unkeyed("MLflow tracking only"), 
        default=None, description="MLflow tracking URI; None = $MLFLOW_TRACKING_URI or sqlite under work_dir."
    )
    seed: int = Field(json_schema_extra=keyed("curate.rows", "curate.dedup", "curate.mix", "train"), default=0, description="Seed for splits, shuffles and training.")
    verify_reuse: bool = Field(
        json_schema_extra=unkeyed("checks the folders a run reuses; changes no output"), default=False,
        description="Before reusing a finished stage folder, re-hash every file against the digests its marker recorded "
        "(sizes are always checked). A damaged folder is moved aside and recomputed. Also: --verify.",
    )
    curate: CurateConfig = Field(json_schema_extra=PER_FIELD, description="Curation: sources, checks, dedup, split, mix.")
    prepare: PrepareConfig = Field(json_schema_extra=PER_FIELD, default_factory=PrepareConfig)
    train: TrainConfig = Field(json_schema_extra=PER_FIELD, default_factory=TrainConfig)
    evaluate: EvalConfig = Field(json_schema_extra=PER_FIELD, default_factory=EvalConfig)
    runner: RunnerConfig = Field(json_schema_extra=unkeyed("every runner gives byte-identical outputs (tests/test_curate_runners.py); files_per_shard only groups files into unit folders, each keyed by its own files"), default_factory=RunnerConfig)
    sweep: SweepConfig | None = Field(json_schema_extra=unkeyed("read only by the sweep command, which turns it into overrides of the other sections"), default=None, description="Variants for `sft-pipeline sweep` (ignored by other commands).")

    @model_validator(mode="after")
    def _decontaminate_evaluated_sets(self) -> PipelineConfig:
        """One source of truth: what evaluation scores is what curation decontaminates against."""
        dc = self.curate.decontaminate
        if dc.include_evaluation_sets:
            present = {es.builtin or es.name for es in dc.eval_sets}
            added = []
            for suite in configured_suites(self.evaluate):
                for name in suite.decontam_sets():
                    if name in present:
                        continue
                    if suite.name in BUILTIN_SUITES:
                        added.append(EvalSetConfig(name=name, builtin=name))
                    else:
                        added.append(EvalSetConfig(name=name, suite=suite.decontam_view()))  # type: ignore[attr-defined] # a FileSuite
            if added:
                dc.eval_sets = [*dc.eval_sets, *added]
        return self

    def resolved_tracking_uri(self) -> str:
        """The MLflow URI in force: explicit config, then the environment, then local SQLite."""
        if self.tracking_uri:
            return self.tracking_uri
        if os.environ.get("MLFLOW_TRACKING_URI"):
            return os.environ["MLFLOW_TRACKING_URI"]
        return f"sqlite:///{(self.work_dir / 'mlflow.db').resolve()}"


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides (values parsed as YAML) to a nested dict, returning a new dict."""
    out = yaml.safe_load(yaml.safe_dump(data)) or {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value (e.g. train.lr=3e-4)")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override '{item}' has an empty key segment")
        node = out
        for part in parts[:-1]:
            if part.isdigit() and isinstance(node, list):
                node = node[int(part)]
                continue
            nxt = node.get(part)
            if not isinstance(nxt, (dict, list)):
                nxt = {}
                node[part] = nxt
            node = nxt
        last = parts[-1]
        value = yaml.safe_load(raw) if raw.strip() else None
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value
    return out


def _model_at(model: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model that owns the field at ``loc`` (for listing valid keys)."""
    current: Any = model
    for part in loc:
        if isinstance(part, int) or not (isinstance(current, type) and issubclass(current, BaseModel)):
            continue
        field = current.model_fields.get(part)
        if field is None:
            return None
        ann = field.annotation
        if get_origin(ann) is list:
            ann = get_args(ann)[0]
        current = ann
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _describe(model: type[BaseModel], loc: tuple[Any, ...]) -> str:
    """What a field accepts, from its annotation and description."""
    parent = _model_at(model, loc[:-1])
    if parent is None or not isinstance(loc[-1], str) or loc[-1] not in parent.model_fields:
        return ""
    field = parent.model_fields[loc[-1]]
    ann = field.annotation
    if isinstance(ann, type) and issubclass(ann, Enum):
        accepts = ", ".join(m.value for m in ann)
    elif isinstance(ann, type):
        accepts = ann.__name__
    else:
        accepts = str(ann).replace("typing.", "")
    desc = f" {field.description}" if field.description else ""
    return f" Accepts: {accepts}.{desc}"


def format_validation_error(err: ValidationError, model: type[BaseModel]) -> str:
    """Turn a pydantic error into lines that name each key, the bad value and the fix."""
    lines = []
    for e in err.errors():
        loc = tuple(e["loc"])
        key = ".".join(str(p) for p in loc) or "<root>"
        if e["type"] == "extra_forbidden":
            parent = _model_at(model, loc[:-1])
            valid = sorted(parent.model_fields) if parent else []
            close = difflib.get_close_matches(str(loc[-1]), valid, n=1)
            hint = f" Did you mean '{'.'.join(str(p) for p in loc[:-1] + (close[0],))}'?" if close else ""
            lines.append(f"unknown key '{key}'.{hint} Valid keys here: {', '.join(valid)}.")
        elif e["type"] == "missing":
            lines.append(f"missing key '{key}'.{_describe(model, loc)}")
        else:
            got = e.get("input")
            shown = repr(got) if not isinstance(got, dict) else "{...}"
            lines.append(f"bad value for '{key}': {e['msg']} (got {shown}).{_describe(model, loc)}")
    return "invalid config:\n  - " + "\n  - ".join(lines)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> PipelineConfig:
    """Load a pipeline config from YAML plus ``key=value`` overrides; raise ConfigError naming any bad key."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file '{p}' does not exist; pass --config conf/demo.yaml or another file under conf/")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file '{p}' is not valid YAML: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"config file '{p}' must hold a mapping of keys, got {type(data).__name__}")
    data = apply_overrides(data, overrides or [])
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, PipelineConfig)) from None


def config_to_dict(cfg: BaseModel) -> dict[str, Any]:
    """A JSON-safe dict of a config (enums as values, paths as strings)."""
    return cfg.model_dump(mode="json")


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested dicts to dotted keys (for MLflow params)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, f"{key}."))
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            for i, x in enumerate(v):
                out.update(flatten(x, f"{key}.{i}."))
        else:
            out[key] = v
    return out
