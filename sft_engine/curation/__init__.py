"""Curation on Polars: raw SFT files in the shapes people have, to canonical conversations, checked, deduplicated,
split and mixed, every dropped or repaired row keeping its reason.

One module per concern:

    schema      the canonical row (messages with reasoning and tool calls, tools, repairs); defined only here
    read        the one file reader (JSONL, gzip, JSON arrays cut short, Parquet, HF datasets folders)
    formats     the registry of source formats (messages, sharegpt, alpaca, prompt_completion, columns)
    repair      fixes counted apart from drops (leading assistant turns, consecutive user turns, trailing questions)
    reasons     the drop reasons of reading, normalizing, repairing and dedup
    rules       the row-local checks, one Rule per drop reason (validation, length, quality, decontamination)
    sources     a configured source read into canonical rows
    decontam    n-gram overlap with the evaluation sets
    near_dedup  MinHash sketches, LSH, exact-Jaccard verification
    dedup       exact and near dedup across sources, the held-out split
    mix         resampling per source, stats that balance, the output plan
    curate      the steps end to end in memory
    stage       the cached stage: units per source or shard, one global step, their keys, the report

Nothing is imported here: ``sft_engine.config`` imports ``formats`` (the format names), and the other modules
import the config.
"""
