"""Curation on Polars: read raw rows, normalize to one conversation schema, validate, filter,
dedup, split and mix, keeping a ``drop_reason`` for every row that does not make it.

Canonical schema (one row per conversation)::

    source: str      the source's configured name
    row: i64         1-based line / row number in that source
    messages: list[struct{role: str, content: str, train: bool | null}]   (train=false: no loss on that turn)

Every drop reason is ``<step>_<rule>``; rows in = rows kept + rows dropped, per source and overall.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import polars as pl

from sft_engine.config import CurateConfig, QualityConfig, SourceConfig
from sft_engine.constants import ROLES
from sft_engine.decontam import find_contamination
from sft_engine.demo_data import builtin_rows
from sft_engine.langid import detect_languages
from sft_engine.near_dedup import resolve, sketch, word_hashes

MESSAGE = pl.Struct({"role": pl.String, "content": pl.String, "train": pl.Boolean})
SCHEMA = {"source": pl.String, "row": pl.Int64, "messages": pl.List(MESSAGE), "drop_reason": pl.String, "raw": pl.String}

# Raw preview kept for rejected rows so a curator can see what was wrong without the 10 MB row itself.
RAW_PREVIEW_CHARS = 500


class SourceError(RuntimeError):
    """A source that cannot be read at all (missing, unreadable); names the file and the cause."""


def _normalize_messages(msgs: Any) -> tuple[list[dict[str, str]] | None, str | None]:
    if not isinstance(msgs, list):
        return None, "normalize_bad_type"
    out = []
    for m in msgs:
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            return None, "normalize_missing_field"
        role, content = m["role"], m["content"]
        if not isinstance(role, str) or not isinstance(content, str):
            return None, "normalize_bad_type"
        msg = {"role": role.strip().lower(), "content": content}
        if isinstance(m.get("train"), bool):
            msg["train"] = m["train"]
        out.append(msg)
    return out, None


def _normalize_alpaca(obj: dict[str, Any]) -> tuple[list[dict[str, str]] | None, str | None]:
    if "instruction" not in obj or "output" not in obj:
        return None, "normalize_missing_field"
    instr, inp, out = obj.get("instruction"), obj.get("input") or "", obj.get("output")
    if not all(isinstance(x, str) for x in (instr, inp, out)):
        return None, "normalize_bad_type"
    user = f"{instr}\n\n{inp}" if inp.strip() else instr
    msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": out}]
    system = obj.get("system")
    if isinstance(system, str) and system.strip():
        msgs.insert(0, {"role": "system", "content": system})
    return msgs, None


# ShareGPT dumps use many speaker names; anything else stays as written and fails validation by name.
SHAREGPT_ROLES = {
    "human": "user", "user": "user", "prompter": "user",
    "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant", "bing": "assistant", "bard": "assistant",
    "model": "assistant", "bot": "assistant", "function_call": "assistant",
    "system": "system",
    "tool": "tool", "function": "tool", "function_response": "tool", "observation": "tool", "ipython": "tool",
}


def _normalize_sharegpt(turns: Any) -> tuple[list[dict[str, str]] | None, str | None]:
    if not isinstance(turns, list):
        return None, "normalize_bad_type"
    out = []
    for t in turns:
        if not isinstance(t, dict) or "from" not in t or "value" not in t:
            return None, "normalize_missing_field"
        if not isinstance(t["from"], str) or not isinstance(t["value"], str):
            return None, "normalize_bad_type"
        speaker = t["from"].strip().lower()
        out.append({"role": SHAREGPT_ROLES.get(speaker, speaker), "content": t["value"]})
    return out, None


def _normalize_prompt_completion(obj: dict[str, Any]) -> tuple[list[dict[str, str]] | None, str | None]:
    if "prompt" not in obj or "completion" not in obj:
        return None, "normalize_missing_field"
    parts = []
    for value, role in ((obj["prompt"], "user"), (obj["completion"], "assistant")):
        if isinstance(value, str):
            parts.append([{"role": role, "content": value}])
        else:
            msgs, err = _normalize_messages(value)
            if err is not None:
                return None, err
            parts.append(msgs)
    return parts[0] + parts[1], None


def _normalize_columns(obj: dict[str, Any], columns: dict[str, str]) -> tuple[list[dict[str, str]] | None, str | None]:
    out = []
    for role in ("system", "user", "assistant"):
        col = columns.get(role)
        if col is None or (role == "system" and not obj.get(col)):
            continue
        if col not in obj:
            return None, "normalize_missing_field"
        if not isinstance(obj[col], str):
            return None, "normalize_bad_type"
        out.append({"role": role, "content": obj[col]})
    return out, None


def normalize_row(obj: Any, fmt: str = "auto", columns: dict[str, str] | None = None) -> tuple[list[dict[str, str]] | None, str | None]:
    """Map one raw row (messages, ShareGPT, Alpaca, prompt/completion or mapped columns) to canonical
    messages, or return a ``normalize_*`` drop reason."""
    if not isinstance(obj, dict):
        return None, "normalize_not_an_object"
    if fmt == "columns":
        return _normalize_columns(obj, columns or {})
    if fmt == "messages" or (fmt == "auto" and "messages" in obj):
        if "messages" not in obj:
            return None, "normalize_missing_field"
        return _normalize_messages(obj["messages"])
    if fmt == "sharegpt" or (fmt == "auto" and "conversations" in obj):
        if "conversations" not in obj:
            return None, "normalize_missing_field"
        return _normalize_sharegpt(obj["conversations"])
    if fmt == "alpaca" or (fmt == "auto" and "instruction" in obj):
        return _normalize_alpaca(obj)
    if fmt == "prompt_completion" or (fmt == "auto" and "prompt" in obj and "completion" in obj):
        return _normalize_prompt_completion(obj)
    return None, "normalize_unknown_shape"


def _raw_objects(path: Path, max_row_bytes: int = 1_000_000) -> Iterable[tuple[Any, str | None, str]]:
    """Yield (object or None, read error or None, raw preview) for each row of one file or HF datasets folder."""
    name = path.name.lower()
    try:
        if path.is_dir():
            from datasets import load_from_disk

            for obj in load_from_disk(str(path)):
                yield obj, None, ""
            return
        if name.endswith(".parquet"):
            for obj in pl.read_parquet(path).to_dicts():
                yield obj, None, ""
            return
        opener = gzip.open if name.endswith(".gz") else open
        with opener(path, "rb") as f:
            data = f.read()
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise SourceError(f"source file '{path}' is truncated or corrupt ({exc}); re-export or re-download it") from exc
    except (OSError, pl.exceptions.PolarsError, ValueError) as exc:
        raise SourceError(f"cannot read source '{path}': {exc}") from exc
    if name.endswith((".json", ".json.gz")):
        try:
            arr = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise SourceError(f"source file '{path}' is not a JSON array: {exc}; use .jsonl for one object per line") from exc
        if not isinstance(arr, list):
            raise SourceError(f"source file '{path}' holds a JSON {type(arr).__name__}, expected an array of rows")
        for obj in arr:
            yield obj, None, ""
        return
    for line in data.split(b"\n"):
        if not line.strip():
            yield None, "read_empty_line", ""
            continue
        preview = line[:RAW_PREVIEW_CHARS].decode("utf-8", errors="replace")
        if len(line) > max_row_bytes:
            yield None, "read_row_too_large", preview
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            yield None, "read_bad_utf8", preview
            continue
        try:
            yield orjson.loads(text), None, preview
        except orjson.JSONDecodeError:
            yield None, "read_bad_json", preview


def source_files(source: SourceConfig) -> list[Path]:
    assert source.path is not None
    files = sorted(Path(p) for p in glob.glob(source.path))
    if not files:
        raise SourceError(f"source '{source.name}': path '{source.path}' matches no file; check the path or glob")
    return files


def read_source(source: SourceConfig, seed: int = 0, max_row_bytes: int = 1_000_000) -> pl.DataFrame:
    """Read one source into the canonical schema; malformed rows carry a drop_reason instead of failing."""
    records: list[dict[str, Any]] = []

    def add(obj: Any, err: str | None, raw: str) -> None:
        msgs = None
        if err is None:
            msgs, err = normalize_row(obj, source.format, source.columns)
            if err is None:
                raw = ""  # a row that normalized is shown by its messages; a 500-char preview per row is ~25% of the memory
            elif not raw:
                raw = orjson.dumps(obj, default=str)[:RAW_PREVIEW_CHARS].decode("utf-8", errors="replace")
        records.append({"source": source.name, "row": len(records) + 1, "messages": msgs, "drop_reason": err, "raw": raw or None})

    if source.builtin is not None:
        for obj in builtin_rows(source.builtin, source.limit, seed):
            add(obj, None, "")
    else:
        for path in source_files(source):
            for obj, err, raw in _raw_objects(path, max_row_bytes):
                # Trailing newline of a JSONL file is not a row.
                if err == "read_empty_line":
                    continue
                add(obj, err, raw)
                if source.limit is not None and len(records) >= source.limit:
                    break
    return pl.DataFrame(records, schema=SCHEMA)


_ROLE_CODES = {"system": "s", "user": "u", "assistant": "a", "tool": "t"}
# system first (optional), then user turns each answered by the assistant (tool results in between).
_TURN_ORDER = r"^s?(u(a?t)*a)+$"


def _roles() -> pl.Expr:
    return pl.col("messages").list.eval(pl.element().struct.field("role"))


def _contents() -> pl.Expr:
    return pl.col("messages").list.eval(pl.element().struct.field("content"))


def with_text_columns(df: pl.LazyFrame) -> pl.LazyFrame:
    """Add ``n_turns``, ``n_chars`` and the dedup key ``norm_text`` (case- and whitespace-folded)."""
    flat = pl.col("messages").list.eval(pl.element().struct.field("role") + pl.lit(": ") + pl.element().struct.field("content"))
    return df.with_columns(
        n_turns=pl.col("messages").list.len(),
        n_chars=_contents().list.eval(pl.element().str.len_chars()).list.sum(),
        norm_text=flat.list.join("\n").str.to_lowercase().str.replace_all(r"\s+", " ").str.strip_chars(),
    )


def validation_reason() -> pl.Expr:
    """First failing validation rule as ``validate_<rule>``, else null."""
    role_ok = _roles().list.eval(pl.element().is_in(list(ROLES))).list.all()
    empty = _contents().list.eval(pl.element().str.strip_chars().str.len_chars() == 0).list.any()
    order = _roles().list.eval(pl.element().replace_strict(_ROLE_CODES, default="x")).list.join("")
    has_assistant = _roles().list.contains("assistant")
    return (
        pl.when(pl.col("messages").list.len() == 0)
        .then(pl.lit("validate_no_messages"))
        .when(~role_ok)
        .then(pl.lit("validate_unknown_role"))
        .when(empty)
        .then(pl.lit("validate_empty_turn"))
        .when(~has_assistant)
        .then(pl.lit("validate_no_assistant"))
        .when(~order.str.contains(_TURN_ORDER))
        .then(pl.lit("validate_bad_turn_order"))
        .otherwise(None)
    )


def length_reason(cfg: CurateConfig) -> pl.Expr:
    """First failing length bound as ``length_<rule>``, else null; a bound of None is off."""
    rules = [
        (cfg.min_turns, pl.col("n_turns") < (cfg.min_turns or 0), "length_too_few_turns"),
        (cfg.max_turns, pl.col("n_turns") > (cfg.max_turns or 0), "length_too_many_turns"),
        (cfg.min_chars, pl.col("n_chars") < (cfg.min_chars or 0), "length_too_short"),
        (cfg.max_chars, pl.col("n_chars") > (cfg.max_chars or 0), "length_too_long"),
    ]
    expr: Any = pl
    active = [(cond, reason) for bound, cond, reason in rules if bound is not None]
    if not active:
        return pl.lit(None, dtype=pl.String)
    for cond, reason in active:
        expr = expr.when(cond).then(pl.lit(reason))
    return expr.otherwise(None)


_SYMBOLS = r"[#{}<>|\\^~`@$%&*_\[\]]"


def _assistant_text() -> pl.Expr:
    turns = pl.col("messages").list.eval(
        pl.element().filter(pl.element().struct.field("role") == "assistant").struct.field("content")
    )
    return turns.list.join("\n")


def _top_ngram_rule(text: pl.Expr, q: QualityConfig) -> pl.Expr:
    """quality_top_ngram as an expression: the most frequent word 3-gram covers more than
    ``max_top_ngram_fraction`` of the words (lowercased, split on spaces)."""
    words = text.str.to_lowercase().str.split(" ").list.eval(pl.element().filter(pl.element() != ""))
    grams = words.list.eval(
        pl.concat_str([pl.element(), pl.element().shift(-1), pl.element().shift(-2)], separator=" ").drop_nulls()
    )
    top = grams.list.eval(pl.element().value_counts().struct.field("count").max()).list.first()
    share = top * 3 / words.list.len()
    return (words.list.len() >= q.repetition_min_words) & (top > 1) & (share > q.max_top_ngram_fraction)


# Buckets per row for the top n-gram bound (see top_ngram_exceeds) and rows per NumPy block.
_NGRAM_BUCKETS = 256
_NGRAM_BLOCK = 8192


def top_ngram_exceeds(text: pl.Series, q: QualityConfig) -> pl.Series:
    """The quality_top_ngram rule for each text (assistant turns joined), same outcome as ``_top_ngram_rule``.

    Vectorized: words are hashed with NumPy over the bytes of a whole block of texts, their 3-grams
    hashed from the word hashes, and each row's 3-grams counted into 256 buckets (one ``np.bincount``).
    The largest bucket bounds the top 3-gram count from above (equal 3-grams share a bucket), so a row
    whose bound passes the rule passes; only the rows left (few: repetitive ones) go through the
    exact expression.
    """
    assert q.max_top_ngram_fraction is not None
    n = len(text)
    maybe = np.zeros(n, dtype=bool)
    for a in range(0, n, _NGRAM_BLOCK):
        block = text.slice(a, _NGRAM_BLOCK)
        m = len(block)
        wh, offsets = word_hashes(block, "space")
        counts = np.diff(offsets)
        bound = np.zeros(m, dtype=np.int64)
        if len(wh) >= 3:
            with np.errstate(over="ignore"):
                grams = wh[:-2] * np.uint64(0x9E3779B97F4A7C15) + wh[1:-1] * np.uint64(0xC2B2AE3D27D4EB4F) + wh[2:] * np.uint64(0x165667B19E3779F9)
            inside = np.ones(len(grams), dtype=bool)  # drop the 3-grams that run into the next row
            ends = (offsets[1:, None] - np.arange(1, 3)[None, :]).ravel()
            inside[ends[(ends >= 0) & (ends < len(grams))]] = False
            row = np.repeat(np.arange(m, dtype=np.int64), np.maximum(counts - 2, 0))
            key = row * _NGRAM_BUCKETS + (grams[inside] >> np.uint64(56)).astype(np.int64)
            bound = np.bincount(key, minlength=m * _NGRAM_BUCKETS).reshape(m, _NGRAM_BUCKETS).max(axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            maybe[a : a + m] = (counts >= q.repetition_min_words) & (bound > 1) & (bound * 3 / counts > q.max_top_ngram_fraction)
    out = np.zeros(n, dtype=bool)
    rows = np.flatnonzero(maybe)
    if len(rows):
        exact = pl.DataFrame({"t": text.gather(rows)}).select(_top_ngram_rule(pl.col("t"), q).fill_null(False)).to_series()
        out[rows] = exact.to_numpy()
    return pl.Series(out)


def quality_reason(
    q: QualityConfig, text: pl.Expr | None = None, top_ngram: pl.Expr | None = None, language: pl.Expr | None = None
) -> pl.Expr:
    """First failing quality rule on the assistant turns as ``quality_<rule>``, else null (thresholds None = off).

    ``text`` (the assistant turns joined, ``_assistant_text()``), ``top_ngram`` (the top n-gram rule's
    outcome, ``top_ngram_exceeds``) and ``language`` (each conversation's detected language,
    ``detect_languages``) may be columns computed beforehand; by default they are expressions here.
    """
    text = _assistant_text() if text is None else text
    rules: list[tuple[pl.Expr, str]] = []
    if q.placeholder_patterns:
        pattern = "(?i)" + "|".join(f"(?:{p})" for p in q.placeholder_patterns)
        turns = pl.col("messages").list.eval(
            pl.element().filter(pl.element().struct.field("role") == "assistant").struct.field("content").str.contains(pattern)
        )
        rules.append((turns.list.any(), "quality_placeholder_answer"))
    if q.refusal_patterns:
        rules.append((text.str.contains("(?i)" + "|".join(f"(?:{p})" for p in q.refusal_patterns)), "quality_refusal"))
    n_chars = text.str.len_chars()
    if q.min_alnum_fraction is not None:
        rules.append(((text.str.count_matches(r"[\p{L}\p{N}]") / n_chars) < q.min_alnum_fraction, "quality_low_alnum"))
    if q.max_symbol_fraction is not None:
        rules.append(((text.str.count_matches(_SYMBOLS) / n_chars) > q.max_symbol_fraction, "quality_symbols"))
    if q.max_duplicate_line_fraction is not None:
        lines = text.str.split("\n").list.eval(pl.element().str.strip_chars()).list.eval(pl.element().filter(pl.element() != ""))
        dup = 1 - lines.list.n_unique() / lines.list.len()
        rules.append(((lines.list.len() > 1) & (dup > q.max_duplicate_line_fraction), "quality_duplicate_lines"))
    if q.max_top_ngram_fraction is not None:
        rules.append((_top_ngram_rule(text, q) if top_ngram is None else top_ngram, "quality_top_ngram"))
    if q.languages is not None:
        if language is None:
            language = _contents().list.join("\n").map_batches(detect_languages, return_dtype=pl.String)
        rules.append((~language.is_in(q.languages), "quality_language"))
    if not rules:
        return pl.lit(None, dtype=pl.String)
    expr: Any = pl
    for cond, reason in rules:
        expr = expr.when(cond.fill_null(False)).then(pl.lit(reason))
    return expr.otherwise(None)


def _mark(reason: pl.Expr) -> pl.Expr:
    """Keep an earlier reason; set this step's reason only on rows still alive."""
    return pl.coalesce(pl.col("drop_reason"), reason)


def _near_dedup(df: pl.DataFrame, cfg: CurateConfig, seed: int, texts_of: Callable[[np.ndarray], pl.Series]) -> tuple[pl.DataFrame, dict[str, Any]]:
    """Mark near-duplicates among surviving rows as ``dedup_near``, with ``dup_of`` = 'source:row' of the kept row.

    Works from the band keys ``check_rows`` stored; ``texts_of(positions)`` gives the folded text of rows
    (positions in ``df``) and is asked only for rows in a candidate pair.
    """
    nd = cfg.near_dedup
    alive = np.flatnonzero(df["drop_reason"].is_null().to_numpy())
    keys = df["_bands"].gather(alive).to_numpy().reshape(len(alive), nd.bands)
    has = df["_has_shingles"].gather(alive).to_numpy()
    res = resolve(keys, has, lambda local: texts_of(alive[local]), nd.threshold, nd.ngram, nd.num_perm, seed)
    head = res.duplicate_of
    dup_pos, of_pos = alive[head >= 0], alive[head[head >= 0]]
    labels = df.select(KEY).gather(of_pos).select(pl.col("source") + ":" + pl.col("row").cast(pl.String)).to_series()
    if len(dup_pos):
        near_of = pl.repeat(None, df.height, dtype=pl.String, eager=True).scatter(dup_pos, labels)
        df = df.with_columns(_near_of=near_of).with_columns(
            drop_reason=pl.when(pl.col("_near_of").is_not_null()).then(pl.lit("dedup_near")).otherwise(pl.col("drop_reason")),
            dup_of=pl.coalesce(pl.col("_near_of"), pl.col("dup_of")),
        ).drop("_near_of")
    info = {
        "candidates": res.candidates,
        "verified_pairs": res.verified,
        "lsh_threshold": res.lsh_threshold,
        # P(a pair at exactly the threshold becomes a candidate); the decision itself is exact Jaccard >= threshold.
        "lsh_recall_at_threshold": res.recall_at_threshold,
        "threshold": nd.threshold,
        "cluster_sizes": res.cluster_sizes,
    }
    return df, info


def check_rows(df: pl.DataFrame, cfg: CurateConfig, seed: int = 0) -> pl.DataFrame:
    """Row-local steps (validation, length and quality filters, decontamination) on one source; cacheable per source.

    Also the row-local halves of the global steps, so those read a few bytes per row instead of the text:
    ``_dedup_hash`` (blake2b-128 of the folded text), ``_split_bucket`` (the held-out split's content hash),
    and, for rows still alive, the near-dedup band keys ``_bands`` and ``_has_shingles``.
    """
    lf = df.lazy()
    lf = lf.with_columns(drop_reason=pl.when(pl.col("messages").is_null()).then(pl.col("drop_reason")).otherwise(_mark(validation_reason())))
    lf = with_text_columns(lf)
    lf = lf.with_columns(drop_reason=pl.when(pl.col("drop_reason").is_null()).then(length_reason(cfg)).otherwise(pl.col("drop_reason")))
    # The assistant text once, as a column every quality rule reads; the top n-gram rule in NumPy.
    q = cfg.quality
    checked = lf.with_columns(_q_text=_assistant_text()).collect()
    top = None
    if q.max_top_ngram_fraction is not None:
        checked = checked.with_columns(_q_top=top_ngram_exceeds(checked["_q_text"], q))
        top = pl.col("_q_top")
    language = None
    if q.languages is not None:
        # Detection is per row in Python: only rows still alive are classified.
        alive = checked.select(pl.when(pl.col("drop_reason").is_null()).then(_contents().list.join("\n"))).to_series()
        checked = checked.with_columns(_q_lang=detect_languages(alive))
        language = pl.col("_q_lang")
    reason = quality_reason(q, pl.col("_q_text"), top, language)
    out = (
        checked.lazy()
        .with_columns(drop_reason=pl.when(pl.col("drop_reason").is_null()).then(reason).otherwise(pl.col("drop_reason")))
        .drop("_q_text", "_q_top", "_q_lang", strict=False)
        .collect()
    )
    matches = find_contamination(out.select(_contents().list.join("\n").fill_null("")).to_series(), cfg.decontaminate)
    out = out.with_columns(decontam_match=pl.Series(matches, dtype=pl.String))
    if cfg.decontaminate.action == "drop":
        reason = pl.lit("decontam_") + pl.col("decontam_match").str.split(":").list.first()
        out = out.with_columns(
            drop_reason=pl.when(pl.col("drop_reason").is_null() & pl.col("decontam_match").is_not_null()).then(reason).otherwise(pl.col("drop_reason"))
        )
    return with_dedup_keys(out, cfg, seed)


def with_dedup_keys(df: pl.DataFrame, cfg: CurateConfig, seed: int = 0) -> pl.DataFrame:
    """Add the per-row inputs of the global dedup and split (see ``check_rows``)."""
    digests = [None if t is None else hashlib.blake2b(t.encode(), digest_size=16).digest() for t in df["norm_text"].to_list()]
    df = df.with_columns(
        _dedup_hash=pl.Series(digests, dtype=pl.Binary),
        # Polars' seeded hash, as before the split moved here: the same rows stay held out.
        _split_bucket=(pl.col("norm_text").hash(seed=seed) % 10_000).cast(pl.UInt16),
    )
    nd = cfg.near_dedup
    if not nd.enabled:
        return df
    alive = np.flatnonzero(df["drop_reason"].is_null().to_numpy())
    keys, has = sketch(df["norm_text"].gather(alive), nd.ngram, nd.num_perm, nd.bands, seed)
    bands = np.zeros((df.height, nd.bands), dtype=np.uint64)
    bands[alive] = keys
    has_all = np.zeros(df.height, dtype=bool)
    has_all[alive] = has
    return df.with_columns(_bands=pl.Series(bands, dtype=pl.Array(pl.UInt64, nd.bands)), _has_shingles=pl.Series(has_all))


def dedup_and_split(
    df: pl.DataFrame, cfg: CurateConfig, seed: int = 0, texts_of: Callable[[np.ndarray], pl.Series] | None = None
) -> tuple[pl.DataFrame, dict[str, Any]]:
    """Global steps over all checked sources: exact and near dedup, then the held-out split.

    ``df`` needs the marks and ``check_rows``' dedup keys, not the text: ``texts_of(positions)`` supplies
    the folded text of the few rows near-dedup verifies (default: ``df['norm_text']``).
    Returns every input row, in order, with ``drop_reason`` (null = kept), ``dup_of`` and ``split``
    ('train'/'heldout'), plus the near-dedup report.
    """
    if texts_of is None:
        texts_of = df["norm_text"].gather
    df = df.with_row_index("_order")
    if cfg.dedup:
        alive = pl.col("drop_reason").is_null()
        # Rank duplicates among surviving rows only, in a stable (source, row) order, so the first copy wins.
        first = pl.col("_order") == pl.col("_order").filter(alive).min().over("_dedup_hash")
        df = df.with_columns(drop_reason=pl.when(alive & ~first).then(pl.lit("dedup_exact")).otherwise(pl.col("drop_reason")))
    df = df.with_columns(dup_of=pl.lit(None, dtype=pl.String))
    near_info: dict[str, Any] = {}
    if cfg.near_dedup.enabled:
        df, near_info = _near_dedup(df, cfg, seed, texts_of)
    threshold = int(cfg.heldout_fraction * 10_000)
    # Split by content hash, seeded: fixed whatever the mix, so held-out items never move into training.
    df = df.with_columns(split=pl.when(pl.col("_split_bucket") < threshold).then(pl.lit("heldout")).otherwise(pl.lit("train")))
    return df.drop("_order"), near_info


def mix_train(kept: pl.DataFrame, sources: list[SourceConfig], seed: int) -> pl.DataFrame:
    """Resample the train split per source to its target (target_rows, else weight x rows; capped by
    max_rows): whole copies plus a seeded sample of the remainder, then one seeded shuffle."""
    parts = []
    for i, s in enumerate(sources):
        rows = kept.filter(pl.col("source") == s.name)
        if rows.height == 0:
            continue
        target = s.target_rows if s.target_rows is not None else round(rows.height * s.weight)
        if s.max_rows is not None:
            target = min(target, s.max_rows)
        whole, rest = divmod(target, rows.height)
        chunks = [rows] * whole
        if rest:
            chunks.append(rows.sample(n=rest, seed=seed + i, shuffle=False))
        if chunks:
            parts.append(pl.concat(chunks))
    if not parts:
        return kept.clear()
    return pl.concat(parts).sample(fraction=1.0, shuffle=True, seed=seed)


def curation_stats(curated: pl.DataFrame, mixed: pl.DataFrame, source_names: list[str]) -> dict[str, Any]:
    """Counts per source (every configured one, even if empty) and per drop reason; the balance
    rows_in = kept + dropped always holds."""
    by_reason = (
        curated.filter(pl.col("drop_reason").is_not_null()).group_by("drop_reason").len().sort("drop_reason").rows()
    )
    per_source: dict[str, Any] = {}
    for name in source_names:
        grp = curated.filter(pl.col("source") == name)
        dropped = grp.filter(pl.col("drop_reason").is_not_null())
        kept = grp.filter(pl.col("drop_reason").is_null())
        per_source[str(name)] = {
            "rows_in": grp.height,
            "rows_kept": kept.height,
            "rows_dropped": dropped.height,
            "kept_train": kept.filter(pl.col("split") == "train").height,
            "kept_heldout": kept.filter(pl.col("split") == "heldout").height,
            "dropped_by_reason": dict(dropped.group_by("drop_reason").len().sort("drop_reason").rows()),
            "mixed_train_rows": mixed.filter(pl.col("source") == name).height,
        }
    kept_all = curated.filter(pl.col("drop_reason").is_null())
    stats = {
        "rows_in": curated.height,
        "rows_kept": kept_all.height,
        "rows_dropped": curated.height - kept_all.height,
        "dropped_by_reason": dict(by_reason),
        "rows_train": kept_all.filter(pl.col("split") == "train").height,
        "rows_heldout": kept_all.filter(pl.col("split") == "heldout").height,
        "rows_train_mixed": mixed.height,
        "per_source": per_source,
    }
    assert stats["rows_in"] == stats["rows_kept"] + sum(stats["dropped_by_reason"].values()), "curation counts do not balance"
    return stats


CANONICAL_COLUMNS = ["source", "row", "messages"]
# What the global steps need of each row besides its text: the marks. Rows are keyed by (source, row).
MARK_COLUMNS = ["source", "row", "drop_reason", "dup_of", "split", "decontam_match", "n_chars"]
REJECTED_COLUMNS = ["source", "row", "drop_reason", "dup_of", "decontam_match", "raw", "messages"]
KEY = ["source", "row"]


def plan_outputs(
    marks: pl.DataFrame, near_info: dict[str, Any], cfg: CurateConfig, seed: int = 0
) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame, dict[str, Any]]:
    """From the marks alone (no text): the keys of the mixed train rows in their order, of the held-out
    rows, of the rejected rows (with their reasons), and the stats. The text is attached afterwards
    (``attach``), so the global step never holds every conversation at once."""
    kept = marks.filter(pl.col("drop_reason").is_null())
    train = mix_train(kept.filter(pl.col("split") == "train").select(KEY), cfg.sources, seed)
    heldout = kept.filter(pl.col("split") == "heldout").select(KEY)
    rejected = marks.filter(pl.col("drop_reason").is_not_null()).select(KEY + ["drop_reason", "dup_of", "decontam_match"])
    stats = curation_stats(marks, train, [s.name for s in cfg.sources])
    stats["near_dedup"] = near_info
    total = max(1, train.height)
    stats["mix"] = {
        "recipe": {s.name: {"weight": s.weight, "target_rows": s.target_rows, "max_rows": s.max_rows} for s in cfg.sources},
        "realized_share": {name: st["mixed_train_rows"] / total for name, st in stats["per_source"].items()},
    }
    matched = marks.filter(pl.col("decontam_match").is_not_null())
    stats["decontamination"] = {
        "action": cfg.decontaminate.action,
        "ngram": cfg.decontaminate.ngram,
        "matches_by_eval_set": dict(
            matched.group_by(pl.col("decontam_match").str.split(":").list.first().alias("set")).len().sort("set").rows()
        ),
        # Which eval item each matched row overlapped (first 1000), for the report.
        "matches": matched.select("source", "row", "decontam_match").head(1000).rows(),
    }
    return train, heldout, rejected, stats


def attach(keys: pl.DataFrame | pl.LazyFrame, content: pl.LazyFrame, columns: list[str]) -> pl.LazyFrame:
    """``keys`` (in their order, repeats kept) with the content columns of the same (source, row)."""
    return keys.lazy().join(content, on=KEY, how="left", maintain_order="left").select(columns)


def finalize(
    curated: pl.DataFrame, near_info: dict[str, Any], cfg: CurateConfig, seed: int = 0
) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame, dict[str, Any]]:
    """Mix the kept train rows by source weight; return (train, heldout, rejected, stats), in memory."""
    train, heldout, rejected, stats = plan_outputs(curated, near_info, cfg, seed)
    content = curated.lazy().select(KEY + ["raw", "messages"])
    return (
        attach(train, content, CANONICAL_COLUMNS).collect(),
        attach(heldout, content, CANONICAL_COLUMNS).collect(),
        attach(rejected, content, REJECTED_COLUMNS).collect(),
        stats,
    )


def curate(cfg: CurateConfig, seed: int = 0) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame, dict[str, Any]]:
    """Run curation end to end in memory. Returns (train, heldout, rejected, stats)."""
    checked = pl.concat([check_rows(read_source(s, seed, cfg.max_row_bytes), cfg, seed) for s in cfg.sources])
    curated, near_info = dedup_and_split(checked, cfg, seed)
    return finalize(curated, near_info, cfg, seed)
