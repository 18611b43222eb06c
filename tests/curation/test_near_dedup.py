from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import polars as pl

from sft_engine.config import CurateConfig
from sft_engine.curation.curate import curate
from sft_engine.curation.near_dedup import exact_jaccard, minhash_signatures, near_duplicates, shingle_hashes


def _corpus(n_base: int = 1500, n_planted: int = 300, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(4000)]
    docs = [" ".join(rng.choice(vocab) for _ in range(rng.randint(60, 160))) for _ in range(n_base)]
    for k in range(n_planted):
        words = docs[rng.randrange(n_base)].split()
        for _ in range(rng.randint(0, 5)):
            words[rng.randrange(len(words))] = rng.choice(vocab)
        docs.append(" ".join(words).upper() if k % 4 == 0 else " ".join(words))
    return docs


def test_shingles_are_word_ngrams_within_documents() -> None:
    sh, off = shingle_hashes(pl.Series(["a b c d e f", "A, b! c d e f", "x y", "", "a\tb\nc  d\r\ne f"]), ngram=5)
    assert off.tolist() == [0, 2, 4, 5, 5, 7]
    # Newlines and tabs separate words like spaces do.
    assert sh[5:7].tolist() == sh[0:2].tolist()
    # Case and punctuation do not matter; short texts give one shingle; empty ones none.
    assert sh[0:2].tolist() == sh[2:4].tolist()
    assert len(set(sh[0:2].tolist())) == 2


def test_sketch_estimates_jaccard() -> None:
    docs = _corpus(200, 100, seed=1)
    sh, off = shingle_hashes(pl.Series(docs))
    sig = minhash_signatures(sh, off, 128)
    pairs = np.array([(i, j) for i in range(0, 300, 7) for j in range(200, 300, 9) if i < j])
    exact = exact_jaccard(sh, off, pairs)
    est = (sig[pairs[:, 0]] == sig[pairs[:, 1]]).mean(axis=1)
    assert np.abs(est - exact).mean() < 0.05


def test_recall_and_precision_against_exact_jaccard() -> None:
    docs = _corpus()
    res = near_duplicates(pl.Series(docs), threshold=0.8)
    sh, off = shingle_hashes(pl.Series(docs))
    n = len(docs)
    pairs = np.array([(i, j) for j in range(1500, n) for i in range(j)])
    truth = pairs[exact_jaccard(sh, off, pairs) >= 0.8]
    true_dups = set(truth[:, 1].tolist())
    flagged = set(np.flatnonzero(res.duplicate_of >= 0).tolist())
    assert len(true_dups) > 100  # enough true pairs for the rates below to mean something (138 with this seed)
    assert len(true_dups & flagged) / len(true_dups) >= 0.95
    assert flagged <= true_dups  # verified by exact Jaccard: no false positives
    # Deterministic: the first document of each cluster is kept.
    assert (res.duplicate_of[res.duplicate_of >= 0] < np.flatnonzero(res.duplicate_of >= 0)).all()
    assert near_duplicates(pl.Series(docs), threshold=0.8).duplicate_of.tolist() == res.duplicate_of.tolist()


def test_curation_marks_near_duplicates_with_the_row_they_duplicate(tmp_path: Path) -> None:
    base = "the committee met on tuesday to discuss the budget for the new library and agreed to fund the children's wing"
    rows = [
        {"messages": [{"role": "user", "content": "Summarize the meeting."}, {"role": "assistant", "content": base + "."}]},
        {"messages": [{"role": "user", "content": "Summarize the meeting!"}, {"role": "assistant", "content": base + " fully."}]},
        {"messages": [{"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": "Paris."}]},
    ]
    src = tmp_path / "n.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    train, _, rejected, stats = curate(CurateConfig(sources=[{"name": "n", "path": str(src)}], heldout_fraction=0.0))
    assert rejected.select("row", "drop_reason", "dup_of").rows() == [(2, "dedup_near", "n:1")]
    assert sorted(train["row"].to_list()) == [1, 3]
    assert stats["near_dedup"]["verified_pairs"] == 1 and stats["near_dedup"]["cluster_sizes"] == [2]
    off = curate(CurateConfig(sources=[{"name": "n", "path": str(src)}], heldout_fraction=0.0, near_dedup={"enabled": False}))
    assert off[0].height == 3


# ---- exact expectations for the vectorized pieces ------------------------------------------------------------

M64 = (1 << 64) - 1


def _splitmix(x: int) -> int:
    """The splitmix64 finalizer in plain Python ints (the reference for near_dedup._mix)."""
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & M64
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & M64
    return x ^ (x >> 31)


def _reference_sketch(shingles: list[int], num_perm: int, seed: int) -> list[int]:
    """One-permutation hashing with optimal densification, one document, plain Python."""
    bits = num_perm.bit_length() - 1
    key = _splitmix((seed * 0x9E3779B1 + 2) & M64)
    bins: dict[int, int] = {}
    for s in shingles:
        h = _splitmix(s ^ key)
        b, v = h >> (64 - bits), min(h & 0xFFFFFFFF, 0xFFFFFFFE)
        bins[b] = min(bins.get(b, v), v)
    if not bins:
        return [0xFFFFFFFF] * num_perm
    probe_key = _splitmix((seed * 0x9E3779B1 + 3) & M64)
    out = []
    for j in range(num_perm):
        attempt = 0
        src = j
        while src not in bins:
            attempt += 1
            x = (j * 0x9E3779B97F4A7C15 + attempt * 0xC2B2AE3D27D4EB4F) & M64
            src = _splitmix(x ^ probe_key) >> (64 - bits)
        out.append(bins[src])
    return out


def test_densified_sketch_equals_a_plain_python_reference() -> None:
    rng = random.Random(3)
    docs = [[rng.getrandbits(64) for _ in range(k)] for k in (0, 1, 2, 5, 40, 300, 1, 3, 8, 12, 20, 64)]
    docs.append(docs[4][:])  # the same set twice: the same sketch
    flat = np.array([s for d in docs for s in d], dtype=np.uint64)
    offsets = np.concatenate([[0], np.cumsum([len(d) for d in docs])])
    for num_perm, seed in ((16, 0), (128, 7)):
        sig = minhash_signatures(flat, offsets, num_perm, seed)
        assert sig.dtype == np.uint32 and sig.shape == (len(docs), num_perm)
        for i, d in enumerate(docs):
            assert sig[i].tolist() == _reference_sketch(d, num_perm, seed), (num_perm, seed, i)
    sig = minhash_signatures(flat, offsets, 128, 0)
    assert (sig[0] == 0xFFFFFFFF).all()  # no shingles: empty sketch
    assert len(set(sig[1].tolist())) == 1  # one shingle: every bin borrows its value
    assert sig[4].tolist() == sig[-1].tolist()


def _splitmix(x: int) -> int:
    m = (1 << 64) - 1
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & m
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & m
    return x ^ (x >> 31)


def test_band_keys_equal_a_plain_python_reference() -> None:
    from sft_engine.curation.near_dedup import band_keys

    rng = random.Random(5)
    sig = np.array([[rng.getrandbits(32) for _ in range(16)] for _ in range(4)] + [[0xFFFFFFFF] * 16], dtype=np.uint32)
    for bands in (16, 4, 2):
        rows = 16 // bands
        want = []
        for values in sig.tolist():
            keys = []
            for b in range(bands):
                key = ((b + 1) * 0x9E3779B97F4A7C15) & ((1 << 64) - 1)
                for r in range(rows):
                    key = _splitmix(key ^ values[b * rows + r] ^ (r + 1))
                keys.append(key)
            want.append(keys)
        assert band_keys(sig, bands).tolist() == want
    assert band_keys(sig[:, ::2], 4).tolist() == band_keys(np.ascontiguousarray(sig[:, ::2]), 4).tolist()


def test_exact_jaccard_on_small_sets() -> None:
    sh = np.array([1, 2, 3, 3, 2, 3, 4, 4, 9], dtype=np.uint64)
    off = np.array([0, 4, 8, 8, 8, 9])  # {1,2,3}, {2,3,4}, {}, {}, {9}
    pairs = np.array([[0, 1], [2, 3], [0, 2], [1, 0], [0, 4]])
    assert exact_jaccard(sh, off, pairs).tolist() == [0.5, 1.0, 0.0, 0.5, 0.0]


def test_words_split_at_unicode_non_alphanumerics_and_hash_by_all_their_bytes() -> None:
    texts = ["Café—BAR “naïve” ٣ 日本語\u00a0x", "café bar naïve ٣ 日本語 x", "abc", "def", "abcdef"]
    long_words = ["a" * n for n in (7, 8, 9, 15, 16, 17, 255, 256, 257, 300)] + ["b" * 16 + "x", "b" * 16 + "y", "b" * 300 + "x", "b" * 300 + "y"]
    sh, off = shingle_hashes(pl.Series(texts + long_words), ngram=1)
    counts = np.diff(off).tolist()
    assert counts[:5] == [6, 6, 1, 1, 1]
    assert sh[off[0] : off[1]].tolist() == sh[off[1] : off[2]].tolist()
    # Words never run from one text into the next; every byte of a word counts.
    assert len({sh[off[2]], sh[off[3]], sh[off[4]]}) == 3
    assert len(set(sh[off[5] :].tolist())) == len(long_words)
    # The same word hashes the same wherever it stands.
    again, _ = shingle_hashes(pl.Series(["x"] + long_words[::-1]), ngram=1)
    assert sorted(again[1:].tolist()) == sorted(sh[off[5] :].tolist())


def test_non_ascii_words_are_the_regex_class_letters_and_digits_in_every_script() -> None:
    """Words found from the decoded code points equal what Polars' regex ``[\\p{L}\\p{N}]+`` extracts: 2-, 3- and 4-byte
    characters, combining marks and other-script digits and punctuation, letters next to emoji."""
    from sft_engine.curation.near_dedup import word_hashes

    rng = random.Random(11)
    alphabet = list("ab Z9 .") + list("éß—“…\u00a0\u0301٣٫日本語。한국어ΣЖ½²Ⅻ🙂𝔘𐐀\U00020000ـ\u200d\u3000ﬁ")
    texts = pl.Series(["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40))) for _ in range(500)])
    hashes, offsets = word_hashes(texts)
    words = texts.str.to_lowercase().str.extract_all(r"[\p{L}\p{N}]+").list.join(" ")
    ref_hashes, ref_offsets = word_hashes(words, split="space")
    assert offsets.tolist() == ref_offsets.tolist()
    assert hashes.tolist() == ref_hashes.tolist()


def test_words_are_lowercased_as_polars_lowercases_them() -> None:
    """ASCII texts are lowercased while hashed and the others through a code point table: the word hashes equal those
    of the texts Polars lowercased first, with characters whose lowercase has more bytes (U+023A), a 4-byte capital
    (Deseret), titlecase, capital sharp s, final and inner sigma, U+0130 (two code points), words over 256 bytes."""
    from sft_engine.curation.near_dedup import word_hashes

    rng = random.Random(13)
    alphabet = list("abXYZ09 .,\n") + list("ȺⱥẞßΣσςΑΩάЖЯİıǅǄ𐐀𐐨ÀÉ日本́🙂")
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 120))) for _ in range(2000)]
    texts += ["Ⱥ" * 200 + "Q", "ÀB" * 150, "QWERTY" * 60, "ΟΔΟΣ ΟΔΟΣΣ σΣ", None]
    series = pl.Series(texts, dtype=pl.String)
    for split in ("non_alnum", "space"):
        hashes, offsets = word_hashes(series, split)
        ref_hashes, ref_offsets = word_hashes(series.str.to_lowercase(), split)
        assert offsets.tolist() == ref_offsets.tolist()
        assert hashes.tolist() == ref_hashes.tolist()


def test_code_points_past_plane_3_are_neither_letters_nor_digits_nor_cased() -> None:
    """The code point tables stop at plane 3: Polars' regex and case mapping agree that nothing past it is a letter or
    a digit or has another lowercase."""
    from sft_engine.curation.near_dedup import _LAST_CASED_PLANE_END

    chars = pl.Series([chr(c) for c in range(_LAST_CASED_PLANE_END, 0x110000)], dtype=pl.String)
    assert not chars.str.contains(r"^[\p{L}\p{N}]$").any()
    assert (chars.str.to_lowercase() == chars).all()


def test_shingles_match_the_word_ngrams_of_a_plain_python_tokenizer() -> None:
    import re

    rng = random.Random(5)
    alphabet = list("abcXYZ019 \t\n.,;!?-_'\"") + list("éÜß—“”…\u00a0٣日本語ΣσЖж½🙂")
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 80))) for _ in range(400)]
    sh, off = shingle_hashes(pl.Series(texts), ngram=3)
    seen: dict[tuple[str, ...], int] = {}
    for i, t in enumerate(texts):
        words = re.findall(r"[^\W_]+", t.lower())
        grams = [tuple(words[k : k + 3]) for k in range(len(words) - 2)] if len(words) >= 3 else ([tuple(words)] if words else [])
        assert off[i + 1] - off[i] == len(grams), t
        for g, h in zip(grams, sh[off[i] : off[i + 1]].tolist()):
            assert seen.setdefault(g, h) == h  # equal n-grams, equal hashes
    assert len(set(seen.values())) == len(seen)  # different n-grams, different hashes


def test_clusters_keep_the_first_document_of_each_component() -> None:
    from sft_engine.curation.near_dedup import _clusters

    assert _clusters(7, np.array([[3, 5], [0, 3], [1, 2], [5, 6]])).tolist() == [0, 1, 1, 0, 4, 0, 0]


def test_blocks_and_threads_do_not_change_the_result() -> None:
    docs = _corpus(400, 120, seed=2)
    one = near_duplicates(pl.Series(docs), block_docs=10_000, workers=1)
    many = near_duplicates(pl.Series(docs), block_docs=64, workers=2)
    assert many.duplicate_of.tolist() == one.duplicate_of.tolist()
    assert (many.candidates, many.verified) == (one.candidates, one.verified)
    assert one.verified > 50
    assert round(one.recall_at_threshold, 4) == 0.947  # 16 x 8 bands: P(candidate | J = 0.8)


def test_verifying_with_the_sketch_s_shingles_equals_shingling_the_candidates_again() -> None:
    from sft_engine.curation.near_dedup import _sketch

    docs = pl.Series(_corpus(400, 120, seed=3) + ["", "one two"])
    _, _, kept = _sketch(docs, 5, 128, 16, 0, 64, 2, keep_bytes=1 << 30)
    assert kept is not None
    sh, off = shingle_hashes(docs)
    assert np.array_equal(kept[0], sh) and np.array_equal(kept[1], off)  # 7 blocks of 64 joined end to end
    # Past the budget nothing is kept: the candidates' texts are shingled again.
    assert _sketch(docs, 5, 128, 16, 0, 64, 1, keep_bytes=sh.nbytes // 2)[2] is None
    kept_run = near_duplicates(docs, block_docs=64)
    again = near_duplicates(docs, block_docs=64, budget_bytes=0)
    assert kept_run.duplicate_of.tolist() == again.duplicate_of.tolist()
    assert (kept_run.candidates, kept_run.verified) == (again.candidates, again.verified)
    assert kept_run.verified > 50


def test_candidates_are_star_pairs_per_shared_key_in_memory_or_by_partitions(tmp_path: Path) -> None:
    from sft_engine.curation.dedup import band_partitions
    from sft_engine.curation.near_dedup import candidate_pairs, candidates_from_keys

    top = np.uint64(1 << 63)  # keys 7 and 7|top fall in different top-bit partitions
    keys = np.array([
        [7, 100],         # doc 0
        [8, 101],         # doc 1
        [7, 102],         # doc 2: shares band 0 with 0
        [9, 101],         # doc 3: shares band 1 with 1
        [7, 101],         # doc 4: with 0 and 2 (band 0), with 1 and 3 (band 1)
        [7 | top, 103],   # doc 5: no shingle, so it matches nothing even where its keys agree
        [7 | top, 104],   # doc 6
        [7 | top, 105],   # doc 7: shares band 0 with 6 (5 left out)
    ], dtype=np.uint64)
    has = np.array([True, True, True, True, True, False, True, True])
    # Star-shaped per bucket: the bucket's first document with each other one; sorted, each pair once.
    expected = [[0, 2], [0, 4], [1, 3], [1, 4], [6, 7]]
    assert candidates_from_keys(keys, has).tolist() == expected
    assert candidates_from_keys(keys, has, budget_bytes=64).tolist() == expected  # one entry per partition's budget
    docs = np.flatnonzero(has)
    for bits in (0, 1, 3):  # spilled to disk in chunks of 2 documents, read back a partition at a time
        parts = list(band_partitions((keys[docs[i:i + 2]] for i in range(0, len(docs), 2)), docs, bits, tmp_path / f"s{bits}"))
        assert len(parts) == (1 if bits == 0 else 2)  # keys only use the top bit: at most two partitions hold entries
        assert candidate_pairs(iter(parts), len(keys)).tolist() == expected
        if bits:
            assert not list((tmp_path / f"s{bits}").glob("*"))  # each partition's files are removed once read


def test_partitioned_pairing_equals_one_pass_on_a_corpus() -> None:
    from sft_engine.curation.near_dedup import candidates_from_keys, sketch

    docs = _corpus(600, 200, seed=4)
    keys, has = sketch(pl.Series(docs))
    one = candidates_from_keys(keys, has)
    assert len(one) > 150
    for budget in (10_000, 100_000):
        assert candidates_from_keys(keys, has, budget_bytes=budget).tolist() == one.tolist()
