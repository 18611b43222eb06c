from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest

from sft_engine.config import PrepareConfig
from sft_engine.constants import IGNORE_INDEX
from sft_engine.curation.schema import MESSAGE
from sft_engine.data import PackedDataset, collate, iter_batches, prepare_split


def _m(*pairs: tuple[str, str], train: bool | None = None) -> list[dict]:
    return [{"role": r, "content": c, "train": (train if r == "assistant" else None)} for r, c in pairs]


# Rendered with SmolLM2's template (default system prompt included) these are 35, 45, 32, 74 and 34 tokens.
CONVS = [
    _m(("user", "Hi"), ("assistant", "Hello!")),
    _m(("user", "What is 2+2?"), ("assistant", "2+2 = 4")),
    _m(("system", "S"), ("user", "a"), ("assistant", "b"), ("user", "c"), ("assistant", "d")),
    _m(("user", "long " * 40), ("assistant", "x")),
    _m(("user", "q"), ("assistant", "w"), train=False),
]


@pytest.fixture
def curated(tmp_path: Path) -> Path:
    path = tmp_path / "train.parquet"
    pl.DataFrame({"messages": CONVS}, schema={"messages": pl.List(MESSAGE)}).write_parquet(path)
    return path


def test_prepare_split_drop_overlong_exact_layout(smollm2_tokenizer, curated: Path, tmp_path: Path) -> None:
    cfg = PrepareConfig(max_seq_len=72, overlong="drop", tokenize_batch_size=2)
    stats, lengths = prepare_split(curated, smollm2_tokenizer, cfg, tmp_path / "p.arrow", rows_per_batch=1)
    # BFD on 45, 35, 32 into 72: [45] then [35, 32]; the 74-token sample is dropped, the all-masked one too.
    ds = PackedDataset(tmp_path / "p.arrow")
    assert [ds[i]["seq_lens"].tolist() for i in range(len(ds))] == [[45, 27], [35, 32, 5]]
    assert stats.dropped_by_reason == {"mask_no_supervised_tokens": 1, "pack_too_long": 1}
    assert (stats.rows_in, stats.samples_packed, stats.truncated) == (5, 3, 0)
    assert stats.fill == pytest.approx(112 / 144)
    assert lengths.tolist() == [35, 45, 32, 74]
    row = ds[1]
    # Sample boundaries: first label of each segment and all padding are ignored.
    assert row["labels"][[0, 35, 67, 68, 69, 70, 71]].tolist() == [IGNORE_INDEX] * 7
    assert stats.supervised_tokens == sum(int((ds[i]["labels"] != IGNORE_INDEX).sum()) for i in range(len(ds)))
    # "Hello!" + <|im_end|> in sample 0 of row 1; "b", <|im_end|>, "d", <|im_end|> in sample 2.
    supervised_row1 = row["input_ids"][row["labels"] != IGNORE_INDEX].tolist()
    assert supervised_row1 == [19556, 17, 2, 82, 2, 84, 2]


def test_prepare_split_truncate_counts_and_batches_do_not_matter(smollm2_tokenizer, curated: Path, tmp_path: Path) -> None:
    one = PrepareConfig(max_seq_len=72, overlong="truncate", tokenize_batch_size=1)
    many = PrepareConfig(max_seq_len=72, overlong="truncate", tokenize_batch_size=1000)
    s1, _ = prepare_split(curated, smollm2_tokenizer, one, tmp_path / "a.arrow", rows_per_batch=1)
    s2, _ = prepare_split(curated, smollm2_tokenizer, many, tmp_path / "b.arrow")
    assert s1 == s2 and s1.truncated == 1
    assert (tmp_path / "a.arrow").read_bytes() != b""
    a, b = PackedDataset(tmp_path / "a.arrow"), PackedDataset(tmp_path / "b.arrow")
    assert [a[i]["seq_lens"].tolist() for i in range(len(a))] == [[72], [45, 27], [35, 32, 5]]
    for i in range(len(a)):
        assert all(np.array_equal(a[i][k], b[i][k]) for k in ("input_ids", "labels", "seq_lens"))
    assert not list(tmp_path.glob("*.tokens.arrow"))


def test_batches_are_seeded_and_ranks_take_disjoint_rows(smollm2_tokenizer, curated: Path, tmp_path: Path) -> None:
    prepare_split(curated, smollm2_tokenizer, PrepareConfig(max_seq_len=72, overlong="truncate"), tmp_path / "p.arrow")
    ds = PackedDataset(tmp_path / "p.arrow")
    first = next(iter_batches(ds, 1, seed=5))
    again = next(iter_batches(ds, 1, seed=5))
    assert np.array_equal(first["input_ids"], again["input_ids"])
    r0 = next(iter_batches(ds, 1, seed=5, rank=0, world_size=2))["input_ids"]
    r1 = next(iter_batches(ds, 1, seed=5, rank=1, world_size=2))["input_ids"]
    assert not np.array_equal(r0, r1)
    batch = collate([ds[0]])
    assert batch["position_ids"][0, :3].tolist() == [0, 1, 2]
