from __future__ import annotations

import gzip
import json
from pathlib import Path

import polars as pl
import pytest

from sft_engine.config import CurateConfig
from sft_engine.curation.curate import curate
from sft_engine.curation.read import SourceError
from sft_engine.curation.schema import row_dicts
from sft_engine.curation.sources import read_source


def _msgs(*pairs: tuple[str, str]) -> list[dict[str, str]]:
    return [{"role": r, "content": c} for r, c in pairs]


def _read(source: dict) -> pl.DataFrame:
    cfg = CurateConfig(sources=[source])
    return read_source(cfg.sources[0], cfg)


def _write_jsonl(path: Path, lines: list[bytes]) -> Path:
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def adversarial_source(tmp_path: Path) -> Path:
    ok = lambda *p: json.dumps({"messages": _msgs(*p)}).encode()
    lines = [
        ok(("user", "What is 2+2?"), ("assistant", "4")),  # 1 kept
        b'{"messages": [ {"role": "user", "content": "trunc',  # 2 bad json
        b"\xff\xfe not utf8",  # 3 bad utf-8
        ok(("user", "hi"), ("wizard", "boo")),  # 4 unknown role
        ok(("user", "   "), ("assistant", "x")),  # 5 empty turn
        ok(("assistant", "first"), ("user", "then")),  # 6 bad order (no user first)
        ok(("user", "only a question")),  # 7 no assistant
        ok(("user", "WHAT is 2+2?"), ("assistant", "4")),  # 8 exact dup of 1 after case folding
        ok(("user", "what   is 2+2?"), ("assistant", " 4")),  # 9 dup of 1 after whitespace folding
        ok(("user", "x" * 300), ("assistant", "long")),  # 10 too long (max_chars=200)
        json.dumps({"instruction": "Name a color.", "output": "Blue."}).encode(),  # 11 kept (alpaca in same file)
        b'{"prompt": "no known shape"}',  # 12 unknown shape
        ok(("system", "s"), ("user", "u"), ("assistant", "a"), ("user", "u2"), ("assistant", "a2")),  # 13 kept
    ]
    return _write_jsonl(tmp_path / "adv.jsonl", lines)


def test_adversarial_rows_get_exact_reasons_and_counts_balance(tmp_path: Path) -> None:
    src = adversarial_source(tmp_path)
    cfg = CurateConfig(sources=[{"name": "adv", "path": str(src)}], max_chars=200, min_chars=1, heldout_fraction=0.0)
    train, heldout, rejected, stats = curate(cfg)
    reasons = dict(zip(rejected["row"].to_list(), rejected["drop_reason"].to_list(), strict=True))
    assert reasons == {
        2: "read_bad_json",
        3: "read_bad_utf8",
        4: "validate_unknown_role",
        5: "validate_empty_turn",
        6: "validate_bad_turn_order",
        7: "validate_no_assistant",
        8: "dedup_exact",
        9: "dedup_exact",
        10: "length_too_long",
        12: "normalize_unknown_shape",
    }
    assert sorted(train["row"].to_list()) == [1, 11, 13]
    assert heldout.height == 0
    assert stats["rows_in"] == 13
    assert stats["rows_in"] == stats["rows_kept"] + sum(stats["dropped_by_reason"].values())
    assert stats["per_source"]["adv"]["rows_kept"] == 3
    # The raw text of an unparseable row is kept for inspection.
    assert rejected.filter(pl.col("row") == 2)["raw"].item().startswith('{"messages"')


def test_dedup_keeps_first_in_stable_order_across_sources(tmp_path: Path) -> None:
    a = tmp_path / "a.jsonl"
    b = tmp_path / "b.jsonl.gz"
    row = json.dumps({"messages": _msgs(("user", "Hello"), ("assistant", "Hi!"))})
    a.write_text(row + "\n")
    with gzip.open(b, "wt") as f:
        f.write(row.replace("Hello", "HELLO") + "\n")
    cfg = CurateConfig(sources=[{"name": "a", "path": str(a)}, {"name": "b", "path": str(b)}], heldout_fraction=0.0, min_chars=None)
    train, _, rejected, stats = curate(cfg)
    assert train["source"].to_list() == ["a"]
    assert rejected.select("source", "drop_reason").rows() == [("b", "dedup_exact")]
    assert stats["per_source"]["b"]["dropped_by_reason"] == {"dedup_exact": 1}


def test_parquet_and_json_array_sources(tmp_path: Path) -> None:
    rows = [{"instruction": f"Say {i}.", "input": "", "output": f"{i}!"} for i in range(5)]
    pl.DataFrame(rows).write_parquet(tmp_path / "x.parquet")
    (tmp_path / "y.json").write_text(json.dumps(rows[:2]))
    pq = _read({"name": "p", "path": str(tmp_path / "x.parquet")})
    js = _read({"name": "j", "path": str(tmp_path / "y.json")})
    assert pq.height == 5 and pq["drop_reason"].null_count() == 5
    assert row_dicts(js)[1] == {"source": "j", "row": 2, "messages": _msgs(("user", "Say 1."), ("assistant", "1!")), "repairs": []}


def test_unreadable_source_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="nope\\*.jsonl' matches no file"):
        _read({"name": "m", "path": str(tmp_path / "nope*.jsonl")})
    bad = tmp_path / "bad.json"
    bad.write_text("not json at all")
    with pytest.raises(SourceError, match="bad.json' is not a JSON array of rows"):
        _read({"name": "b", "path": str(bad)})


def test_heldout_split_is_by_content_and_independent_of_mix(tmp_path: Path) -> None:
    rows = [json.dumps({"messages": _msgs(("user", f"q{i}"), ("assistant", f"a{i}"))}) for i in range(400)]
    src = tmp_path / "s.jsonl"
    src.write_text("\n".join(rows) + "\n")
    other = tmp_path / "o.jsonl"
    other.write_text("\n".join(rows[:50]).replace("q", "other q") + "\n")
    one = CurateConfig(sources=[{"name": "s", "path": str(src)}], heldout_fraction=0.1, min_chars=None)
    two = CurateConfig(
        sources=[{"name": "s", "path": str(src), "weight": 2.0}, {"name": "o", "path": str(other), "weight": 0.5}],
        heldout_fraction=0.1, min_chars=None,
    )
    _, h1, _, _ = curate(one, seed=3)
    train2, h2, _, stats2 = curate(two, seed=3)
    assert 10 < h1.height < 80
    assert h1["row"].to_list() == h2.filter(pl.col("source") == "s")["row"].to_list()
    # Weight 2.0 repeats every kept train row twice; 0.5 keeps half (rounded).
    kept_s = stats2["per_source"]["s"]["kept_train"]
    assert stats2["per_source"]["s"]["mixed_train_rows"] == 2 * kept_s
    assert stats2["per_source"]["o"]["mixed_train_rows"] == round(stats2["per_source"]["o"]["kept_train"] * 0.5)
    assert train2.height == stats2["rows_train_mixed"]


def test_hf_datasets_folder_source(tmp_path: Path) -> None:
    from datasets import Dataset

    Dataset.from_list([{"prompt": "hi", "completion": "hello"}, {"prompt": "x", "completion": "y"}]).save_to_disk(str(tmp_path / "ds"))
    df = _read({"name": "hf", "path": str(tmp_path / "ds")})
    assert row_dicts(df)[0]["messages"] == _msgs(("user", "hi"), ("assistant", "hello"))


def test_giant_row_is_quarantined_not_parsed(tmp_path: Path) -> None:
    big = json.dumps({"messages": _msgs(("user", "x" * 10_000_000), ("assistant", "y"))}).encode()
    ok = json.dumps({"messages": _msgs(("user", "fine?"), ("assistant", "fine."))}).encode()
    src = _write_jsonl(tmp_path / "big.jsonl", [ok, big])
    cfg = CurateConfig(sources=[{"name": "b", "path": str(src)}], heldout_fraction=0.0)
    _, _, rejected, stats = curate(cfg)
    assert rejected.select("row", "drop_reason").rows() == [(2, "read_row_too_large")]
    assert len(rejected["raw"][0]) == 500
    assert stats["rows_in"] == 2 and stats["rows_kept"] == 1


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        ("N/A", "quality_placeholder_answer"),
        ("As an AI language model, I cannot have opinions.", "quality_refusal"),
        ("!!! ??? ... ,,, --- !!! ??? ...", "quality_low_alnum"),
        ("ab{}cd<>ef||gh##", "quality_symbols"),
        ("Buy now, limited offer!\nBuy now, limited offer!\nBuy now, limited offer!\nCall today.", "quality_duplicate_lines"),
        (" ".join(["the cat sat"] * 12), "quality_top_ngram"),
        ("A perfectly ordinary answer with enough words to be judged.", None),
    ],
)
def test_quality_filters_name_the_rule(tmp_path: Path, answer: str, reason: str | None) -> None:
    src = _write_jsonl(tmp_path / "q.jsonl", [json.dumps({"messages": _msgs(("user", "Question?"), ("assistant", answer))}).encode()])
    cfg = CurateConfig(sources=[{"name": "q", "path": str(src)}], heldout_fraction=0.0)
    train, _, rejected, _ = curate(cfg)
    assert rejected["drop_reason"].to_list() == ([reason] if reason else [])
    assert train.height == (0 if reason else 1)


def test_quality_thresholds_set_to_none_are_off(tmp_path: Path) -> None:
    src = _write_jsonl(tmp_path / "q.jsonl", [json.dumps({"messages": _msgs(("user", "Q?"), ("assistant", "N/A"))}).encode()])
    cfg = CurateConfig(sources=[{"name": "q", "path": str(src)}], heldout_fraction=0.0, quality={"placeholder_patterns": []})
    train, _, _, _ = curate(cfg)
    assert train.height == 1


def test_language_filter_keeps_the_listed_languages(tmp_path: Path) -> None:
    convs = [
        ("What is the capital of France?", "The capital of France is Paris, a city on the river Seine."),
        ("Wie spät ist es in Berlin?", "In Berlin ist es jetzt drei Uhr nachmittags, und die Sonne scheint."),
        ("Quelle est la couleur du ciel?", "Le ciel est bleu pendant la journée et noir pendant la nuit."),
        ("¿Dónde está la estación de tren?", "La estación de tren está al final de esta calle, a la izquierda."),
    ]
    src = _write_jsonl(tmp_path / "l.jsonl", [json.dumps({"messages": _msgs(("user", u), ("assistant", a))}).encode() for u, a in convs])
    cfg = CurateConfig(sources=[{"name": "l", "path": str(src)}], heldout_fraction=0.0, quality={"languages": ["en", "de"]})
    train, _, rejected, stats = curate(cfg)
    assert sorted(train["row"].to_list()) == [1, 2]
    assert rejected.select("row", "drop_reason").rows() == [(3, "quality_language"), (4, "quality_language")]
    assert stats["dropped_by_reason"] == {"quality_language": 2}
    # Off by default: every row kept.
    assert curate(CurateConfig(sources=[{"name": "l", "path": str(src)}], heldout_fraction=0.0))[0].height == 4


def test_unknown_language_code_names_the_key_and_the_fix() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=r"quality.languages: \['english'\] is not a list of codes py3langid knows"):
        CurateConfig(sources=[{"name": "l", "builtin": "chitchat"}], quality={"languages": ["english"]})


def test_changing_one_weight_reuses_per_source_and_dedup_work(tmp_path: Path) -> None:
    from sft_engine.config import load_config
    from sft_engine.curation import stage as curation

    base = [f"work_dir={tmp_path}", "curate.sources=[{name: a, builtin: verifiable_tasks, limit: 300}, {name: b, builtin: chitchat, limit: 100}]"]
    first = curation.run_curate(load_config(None, base))
    s1 = json.loads((first.path / "stats.json").read_text())
    assert s1["cache"] == {"sources_reused": [], "sources_computed": ["a", "b"], "dedup_reused": False}
    reweighted = curation.run_curate(load_config(None, [*base, "curate.sources.0.weight=2.0"]))
    s2 = json.loads((reweighted.path / "stats.json").read_text())
    assert reweighted.path != first.path and s2["cache"]["dedup_reused"] is True
    assert s2["per_source"]["a"]["mixed_train_rows"] == 2 * s1["per_source"]["a"]["mixed_train_rows"]
    # Changing one source's limit recomputes that source only.
    changed = curation.run_curate(load_config(None, [*base, "curate.sources.1.limit=90"]))
    s3 = json.loads((changed.path / "stats.json").read_text())
    assert s3["cache"] == {"sources_reused": ["a"], "sources_computed": ["b"], "dedup_reused": False}
    assert curation.run_curate(load_config(None, base)).reused


def test_mix_targets_caps_and_realized_shares(tmp_path: Path) -> None:
    rows = [json.dumps({"messages": _msgs(("user", f"question {i}"), ("assistant", f"answer {i}"))}) for i in range(40)]
    (tmp_path / "a.jsonl").write_text("\n".join(rows[:30]) + "\n")
    (tmp_path / "b.jsonl").write_text("\n".join(rows[30:]) + "\n")
    cfg = CurateConfig(
        sources=[{"name": "a", "path": str(tmp_path / "a.jsonl"), "target_rows": 70, "max_rows": 65},
                 {"name": "b", "path": str(tmp_path / "b.jsonl"), "target_rows": 5}],
        heldout_fraction=0.0, min_chars=None,
    )
    train, _, _, stats = curate(cfg, seed=1)
    assert train.group_by("source").len().sort("source").rows() == [("a", 65), ("b", 5)]
    assert stats["mix"]["realized_share"] == {"a": 65 / 70, "b": 5 / 70}
    assert stats["mix"]["recipe"]["a"] == {"weight": 1.0, "target_rows": 70, "max_rows": 65}
    # 65 = 2 full copies of 30 + 5 sampled rows; the same seed gives the same mix.
    assert curate(cfg, seed=1)[0].equals(train)


def test_top_ngram_rule_in_numpy_matches_the_expression() -> None:
    import random

    from sft_engine.config import QualityConfig
    from sft_engine.curation.rules import _top_ngram_rule, top_ngram_exceeds

    q = QualityConfig(max_top_ngram_fraction=0.3, repetition_min_words=6)
    texts = [
        "x y z x y z x y z",  # xyz 3 times: 9 of 9 words
        "one two three four five six seven",  # every 3-gram once
        "Buy NOW buy now buy now",  # case folded: 'buy now buy' twice, 6 of 6 words
        "a b c",  # fewer than repetition_min_words
        None,
        "",
        "p  q r p q r p q r s t u v w",  # double space ignored: pqr 3 times, 9 of 14 words
        "word. word. word. word. word. word.",  # punctuation stays on the word
        "al be ce de ef ge ha ij ka el em en al be ce",  # 'al be ce' twice: 6 of 15 words, 0.4
    ]
    series = pl.Series(texts, dtype=pl.String)
    assert top_ngram_exceeds(series, q).to_list() == [True, False, True, False, False, False, True, True, True]
    rng = random.Random(0)
    vocab = ["a", "b", "c", "d", "e", "f", "g", "h", "A", "B", "", ","]
    many = [" ".join(rng.choice(vocab) for _ in range(rng.randint(0, 60))) for _ in range(3000)]
    for frac, min_words in ((0.3, 30), (0.1, 5), (0.05, 1)):
        qq = QualityConfig(max_top_ngram_fraction=frac, repetition_min_words=min_words)
        s = pl.Series(many + texts, dtype=pl.String)
        expected = pl.DataFrame({"t": s}).select(_top_ngram_rule(pl.col("t"), qq).fill_null(False)).to_series()
        assert top_ngram_exceeds(s, qq).to_list() == expected.to_list()
        assert 0 < sum(expected) < len(s)


def test_stage_files_equal_the_in_memory_curation(tmp_path: Path) -> None:
    # The stage attaches the conversations to the kept keys after dedup (so it never holds the corpus in
    # every form at once); its files must hold exactly what the in-memory curation returns, in the same
    # order, repeats from upsampling included.
    from polars.testing import assert_frame_equal

    from sft_engine.config import load_config
    from sft_engine.curation import stage as curation

    cfg = load_config(None, [
        f"work_dir={tmp_path}", "curate.heldout_fraction=0.1",
        "curate.sources=[{name: a, builtin: verifiable_tasks, limit: 300, weight: 1.5}, {name: b, builtin: chitchat, limit: 100}]",
    ])
    out = curation.run_curate(cfg)
    train, heldout, rejected, stats = curate(cfg.curate, cfg.seed)
    assert train.height == round(1.5 * stats["per_source"]["a"]["kept_train"]) + stats["per_source"]["b"]["kept_train"]
    assert heldout.height > 0 and rejected.height > 0
    assert_frame_equal(pl.read_parquet(out.path / "train.parquet"), train)
    assert_frame_equal(pl.read_parquet(out.path / "heldout.parquet"), heldout)
    assert_frame_equal(pl.read_parquet(out.path / "rejected.parquet"), rejected)
    saved = json.loads((out.path / "stats.json").read_text())
    assert {k: saved[k] for k in ("rows_in", "dropped_by_reason", "per_source", "mix")} == {
        k: stats[k] for k in ("rows_in", "dropped_by_reason", "per_source", "mix")
    }
