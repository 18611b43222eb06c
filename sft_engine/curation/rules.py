"""Row-local checks: one ``Rule`` per drop reason, in the order they are applied (the first that fails names the row).

A rule is datatrove's filter shape: a reason (``<step>_<rule>``) and a Polars condition over the row (True = drop),
plus, for the few checks that are not expressions (the top n-gram share in NumPy, language ID, decontamination),
a ``helper`` that computes the columns the condition reads, on the rows still alive. ``ROW_RULES`` is the list;
``all_reasons()`` adds the reasons of reading, normalizing, repairing and dedup (``reasons``) and is the
documentation of every drop reason (``drop_reason_table`` renders it for the README; a test keeps them equal).

Quality rules read the assistant's prose, per assistant turn where it matters: fenced code blocks (```` ``` ```` or
``~~~``) are left out, and the duplicate-line rule counts only lines with at least ``quality.line_min_alnum``
letters or digits, so code, markdown tables, ``---`` rules and heading underlines are not mistaken for
repetition. Reasoning traces are checked like replies.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl

from sft_engine.constants import ROLES
from sft_engine.curation.reasons import DEDUP, NORMALIZE, READ, REPAIR, Reason
from sft_engine.curation.schema import conversation_text, message_texts, present_fields

if TYPE_CHECKING:
    from sft_engine.config import CurateConfig, QualityConfig


@dataclass(frozen=True)
class Rule:
    """One row-local check. ``condition(cfg)`` is True for rows to drop (None: the rule is off under ``cfg``);
    ``reason_expr`` overrides the reason for rules whose reason depends on the row (``decontam_<set>``);
    ``helper(df, cfg)`` adds the columns the condition reads, computed on rows still alive."""

    name: str
    step: str
    doc: str
    example: str
    condition: Callable[[CurateConfig], pl.Expr | None]
    helper: Callable[[pl.DataFrame, CurateConfig], pl.DataFrame] | None = None
    reason_expr: pl.Expr | None = None

    @property
    def reason(self) -> Reason:
        return Reason(self.name, self.step, self.doc, self.example)


# ---- the columns rules read, computed once per unit ------------------------------------------------

_ROLE_CODES = {"system": "s", "user": "u", "assistant": "a", "tool": "t"}
# System first (optional), untrained context turns (c: assistant or tool turns before the first user turn, kept by
# curate.repair.leading_assistant=context), then user turns each answered by the assistant, tool results between.
_TURN_ORDER = r"^s?c*(u(a?t)*a)+$"
_FENCE = r"(?s)(```|~~~).*?(```|~~~|\z)"
_SYMBOLS = r"[#{}<>|\\^~`@$%&*_\[\]]"


def _role() -> pl.Expr:
    return pl.element().struct.field("role")


def _assistant(field: str) -> pl.Expr:
    """The given field of each assistant message."""
    return pl.col("messages").list.eval(pl.element().filter(_role() == "assistant").struct.field(field))


def with_text_columns(df: pl.DataFrame) -> pl.LazyFrame:
    """``n_turns``, ``n_chars`` (content, reasoning and call arguments), the dedup key ``norm_text`` (every message
    with its reasoning and calls, case- and whitespace-folded), and the private columns the rules read."""
    present = present_fields(df)
    el = pl.element().struct
    before_user = (_role() == "user").cum_sum() == 0
    codes = pl.col("messages").list.eval(
        pl.when(_role().is_in(["assistant", "tool"]) & before_user & (el.field("train") == False))
        .then(pl.lit("c"))
        .otherwise(_role().replace_strict(_ROLE_CODES, default="x"))
    )
    empty = pl.col("messages").list.eval(
        (el.field("content").str.strip_chars().str.len_chars() == 0) & (el.field("tool_calls").list.len().fill_null(0) == 0)
    )
    prose = _assistant("content")
    if "reasoning_content" in present:
        prose = pl.concat_list([prose, _assistant("reasoning_content").list.drop_nulls()])
    return df.lazy().with_columns(
        n_turns=pl.col("messages").list.len(),
        n_chars=message_texts(present).list.eval(pl.element().str.len_chars()).list.sum(),
        norm_text=conversation_text(present).str.to_lowercase().str.replace_all(r"\s+", " ").str.strip_chars(),
        _roles=pl.col("messages").list.eval(_role()),
        _order=codes.list.join(""),
        _empty=empty.list.any(),
        # Every assistant reply and reasoning trace, fenced code left out: what the repetition rules look at.
        _units=prose.list.eval(pl.element().str.replace_all(_FENCE, "\n")),
    ).with_columns(_prose=pl.col("_units").list.join("\n"))


PRIVATE_COLUMNS = ["_roles", "_order", "_empty", "_units", "_prose", "_q_top", "_q_dup", "_q_lang"]


# ---- helpers (NumPy / Python work on the rows still alive) ---------------------------------------------


def _alive(df: pl.DataFrame) -> np.ndarray:
    return np.flatnonzero(df["drop_reason"].is_null().to_numpy())


def _per_unit(df: pl.DataFrame, name: str, check: Callable[[pl.Series], pl.Series]) -> pl.DataFrame:
    """Run ``check`` (one bool per text) over every unit of the alive rows; a row fails if any unit does."""
    alive = _alive(df)
    units = df.select(pl.col("_units").gather(alive)).with_row_index("_r").explode("_units").drop_nulls("_units")
    fails = units.select("_r", _f=check(units["_units"])).group_by("_r").agg(pl.col("_f").any())
    out = np.zeros(df.height, dtype=bool)
    hit = fails.filter(pl.col("_f"))["_r"].to_numpy()
    out[alive[hit]] = True
    return df.with_columns(pl.Series(name, out))


def duplicate_lines_exceed(texts: pl.Series, q: QualityConfig) -> pl.Series:
    """Per text: more than ``max_duplicate_line_fraction`` of its substantive lines (at least
    ``line_min_alnum`` letters or digits, whitespace-stripped) are repeats, among at least two such lines."""
    assert q.max_duplicate_line_fraction is not None
    out = np.zeros(len(texts), dtype=bool)
    multi = np.flatnonzero(texts.str.contains("\n", literal=True).fill_null(False).to_numpy())  # one line cannot repeat
    if not len(multi):
        return pl.Series(out)
    lines = (
        texts.gather(multi).str.split("\n")
        .list.eval(pl.element().str.strip_chars())
        .list.eval(pl.element().filter(pl.element().str.count_matches(r"[\p{L}\p{N}]") >= q.line_min_alnum))
    )
    frame = pl.DataFrame({"l": lines})
    n = pl.col("l").list.len()
    dup = 1 - pl.col("l").list.n_unique() / n
    out[multi] = frame.select(((n > 1) & (dup > q.max_duplicate_line_fraction)).fill_null(False)).to_series().to_numpy()
    return pl.Series(out)


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


# Buckets per text for the top n-gram bound (see top_ngram_exceeds) and texts per NumPy block.
_NGRAM_BUCKETS = 256
_NGRAM_BLOCK = 8192


def top_ngram_exceeds(text: pl.Series, q: QualityConfig) -> pl.Series:
    """The quality_top_ngram rule for each text, same outcome as ``_top_ngram_rule``.

    Vectorized: words are hashed with NumPy over the bytes of a whole block of texts, their 3-grams
    hashed from the word hashes, and each text's 3-grams counted into 256 buckets (one ``np.bincount``).
    The largest bucket bounds the top 3-gram count from above (equal 3-grams share a bucket), so a text
    whose bound passes the rule passes; only the texts left (few: repetitive ones) go through the
    exact expression.
    """
    from sft_engine.curation.near_dedup import word_hashes

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
            inside = np.ones(len(grams), dtype=bool)  # drop the 3-grams that run into the next text
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


def _dup_helper(df: pl.DataFrame, cfg: CurateConfig) -> pl.DataFrame:
    return _per_unit(df, "_q_dup", lambda s: duplicate_lines_exceed(s, cfg.quality))


def _ngram_helper(df: pl.DataFrame, cfg: CurateConfig) -> pl.DataFrame:
    return _per_unit(df, "_q_top", lambda s: top_ngram_exceeds(s, cfg.quality))


def _language_helper(df: pl.DataFrame, cfg: CurateConfig) -> pl.DataFrame:
    from sft_engine.langid import detect_languages

    # Detection is per row in Python: only rows still alive are classified.
    text = message_texts(present_fields(df)).list.join("\n")
    alive = df.select(pl.when(pl.col("drop_reason").is_null()).then(text)).to_series()
    return df.with_columns(_q_lang=detect_languages(alive))


def _decontam_helper(df: pl.DataFrame, cfg: CurateConfig) -> pl.DataFrame:
    from sft_engine.curation.decontam import find_contamination

    # Every row is matched, not only the alive ones: the report names each overlap, whatever else dropped the row.
    texts = df.select(message_texts(present_fields(df)).list.join("\n").fill_null("")).to_series()
    return df.with_columns(decontam_match=pl.Series(find_contamination(texts, cfg.decontaminate), dtype=pl.String))


def _patterns(patterns: list[str]) -> str:
    return "(?i)" + "|".join(f"(?:{p})" for p in patterns)


def _bound(value: float | None, expr: Callable[[float | int], pl.Expr]) -> pl.Expr | None:
    return None if value is None else expr(value)


def _q(cfg: CurateConfig) -> QualityConfig:
    return cfg.quality


# The share of prose characters a rule counts, guarded: all-code replies have no prose to judge.
def _prose_share(pattern: str) -> pl.Expr:
    n = pl.col("_prose").str.len_chars()
    return pl.when(n > 0).then(pl.col("_prose").str.count_matches(pattern) / n)


ROW_RULES: list[Rule] = [
    Rule("validate_no_messages", "validate", "The conversation has no messages.", '`{"messages": []}`',
         lambda cfg: pl.col("messages").list.len() == 0),
    Rule("validate_unknown_role", "validate", f"A role other than {', '.join(ROLES)} (after mapping ShareGPT speaker names).",
         '`{"from": "narrator", ...}`', lambda cfg: ~pl.col("_roles").list.eval(pl.element().is_in(list(ROLES))).list.all()),
    Rule("validate_empty_turn", "validate", "A message whose content is empty or only whitespace (an assistant turn that calls tools may have no text).",
         '`{"role": "user", "content": "   "}`', lambda cfg: pl.col("_empty")),
    Rule("validate_no_assistant", "validate", "No assistant turn: nothing to learn.", "`user` alone", lambda cfg: ~pl.col("_roles").list.contains("assistant")),
    Rule("validate_bad_turn_order", "validate",
         "Turns out of order after repairs: system first, then user turns each answered by the assistant (tool results after calls).",
         "`user, assistant, assistant`", lambda cfg: ~pl.col("_order").str.contains(_TURN_ORDER)),
    Rule("length_too_few_turns", "length", "Fewer messages than `curate.min_turns`.", "one message",
         lambda cfg: _bound(cfg.min_turns, lambda v: pl.col("n_turns") < v)),
    Rule("length_too_many_turns", "length", "More messages than `curate.max_turns`.", "a 100-turn chat with max_turns 64",
         lambda cfg: _bound(cfg.max_turns, lambda v: pl.col("n_turns") > v)),
    Rule("length_too_short", "length", "Fewer characters (content, reasoning, call arguments) than `curate.min_chars`.", "`hi` / `yo` with min_chars 20",
         lambda cfg: _bound(cfg.min_chars, lambda v: pl.col("n_chars") < v)),
    Rule("length_too_long", "length", "More characters than `curate.max_chars`.", "a 50,000-character paste",
         lambda cfg: _bound(cfg.max_chars, lambda v: pl.col("n_chars") > v)),
    Rule("quality_placeholder_answer", "quality", "An assistant reply that is a placeholder (`quality.placeholder_patterns`).", "`N/A`, `TODO`, `[insert answer]`",
         lambda cfg: None if not _q(cfg).placeholder_patterns else pl.col("messages").list.eval(
             pl.element().filter((_role() == "assistant") & (pl.element().struct.field("tool_calls").list.len().fill_null(0) == 0))
             .struct.field("content").str.contains(_patterns(_q(cfg).placeholder_patterns))
         ).list.any()),
    Rule("quality_refusal", "quality", "Refusal or AI boilerplate in a reply or its reasoning (`quality.refusal_patterns`).",
         "`As an AI language model, I cannot ...`",
         lambda cfg: None if not _q(cfg).refusal_patterns else pl.concat_list([_assistant("content"), _assistant("reasoning_content").list.drop_nulls()])
         .list.join("\n").str.contains(_patterns(_q(cfg).refusal_patterns))),
    Rule("quality_low_alnum", "quality", "Under `quality.min_alnum_fraction` of the assistant's prose (code left out) is letters or digits.",
         "`!!! ??? ... ,,,`", lambda cfg: _bound(_q(cfg).min_alnum_fraction, lambda v: _prose_share(r"[\p{L}\p{N}]") < v)),
    Rule("quality_symbols", "quality", "Over `quality.max_symbol_fraction` of the assistant's prose (code left out) is symbols such as `# { } < > |`.",
         "`ab{}cd<>ef||gh##`", lambda cfg: _bound(_q(cfg).max_symbol_fraction, lambda v: _prose_share(_SYMBOLS) > v)),
    Rule("quality_duplicate_lines", "quality",
         "In one reply (or reasoning trace), over `quality.max_duplicate_line_fraction` of the lines with at least "
         "`quality.line_min_alnum` letters or digits are repeats; fenced code is left out.", "the same sentence on 10 lines",
         lambda cfg: None if _q(cfg).max_duplicate_line_fraction is None else pl.col("_q_dup"), helper=_dup_helper),
    Rule("quality_top_ngram", "quality",
         "In one reply (or reasoning trace) of at least `quality.repetition_min_words` words, the most frequent word 3-gram "
         "covers over `quality.max_top_ngram_fraction` of the words; fenced code is left out.", "`the cat sat the cat sat ...`",
         lambda cfg: None if _q(cfg).max_top_ngram_fraction is None else pl.col("_q_top"), helper=_ngram_helper),
    Rule("quality_language", "quality", "Detected language (py3langid) not in `quality.languages` (off by default).", "a German chat with languages [en]",
         lambda cfg: None if _q(cfg).languages is None else ~pl.col("_q_lang").is_in(_q(cfg).languages), helper=_language_helper),
    Rule("decontam_<set>", "decontam",
         "Shares a word n-gram (`curate.decontaminate.ngram`) with an item of eval set `<set>`, or contains a short item whole; "
         "`decontam_match` names the item. With `action: flag` the row is kept and only marked.", "a training row that quotes an MMLU question",
         lambda cfg: (pl.col("decontam_match").is_not_null() if cfg.decontaminate.action == "drop" else pl.lit(False)),
         helper=_decontam_helper, reason_expr=pl.lit("decontam_") + pl.col("decontam_match").str.split(":").list.first()),
]


def apply_rules(df: pl.DataFrame, cfg: CurateConfig) -> pl.DataFrame:
    """Mark each alive row with the first rule it fails (``drop_reason``), rules in ``ROW_RULES`` order.

    Consecutive expression rules run as one when/then chain; a rule with a helper first collects the frame and
    has its helper compute, on the rows alive at that point, the columns it reads.
    """
    lf = with_text_columns(df)
    if "decontam_match" not in df.columns:
        lf = lf.with_columns(decontam_match=pl.lit(None, dtype=pl.String))
    pending: list[tuple[pl.Expr, pl.Expr]] = []

    def flush(lf: pl.LazyFrame) -> pl.LazyFrame:
        if not pending:
            return lf
        chain: Any = pl.when(pl.col("drop_reason").is_not_null()).then(pl.col("drop_reason"))
        for cond, reason in pending:
            chain = chain.when(cond.fill_null(False)).then(reason)
        pending.clear()
        return lf.with_columns(drop_reason=chain.otherwise(None))

    for rule in ROW_RULES:
        cond = rule.condition(cfg)
        if cond is None:
            continue
        if rule.helper is not None:
            lf = rule.helper(flush(lf).collect(), cfg).lazy()
        pending.append((cond, rule.reason_expr if rule.reason_expr is not None else pl.lit(rule.name)))
    return flush(lf).drop(PRIVATE_COLUMNS, strict=False).collect()


def all_reasons() -> list[Reason]:
    """Every drop reason curation can give, in pipeline order."""
    return [*READ, *NORMALIZE, *REPAIR, *(r.reason for r in ROW_RULES), *DEDUP]


def drop_reason_table() -> str:
    """The README's table of drop reasons (a test checks the README holds exactly this)."""
    lines = ["| reason | step | when | example |", "|---|---|---|---|"]
    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    lines += [f"| `{r.name}` | {r.step} | {cell(r.doc)} | {cell(r.example)} |" for r in all_reasons()]
    return "\n".join(lines)
