"""The one reader: JSON Lines, JSON arrays (whole, cut short, mislabelled), gzip, Parquet, HF datasets folders."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from sft_engine.curation.read import Record, SourceError, iter_records, read_objects


def _records(path: Path) -> list[tuple]:
    return [(r.obj, r.reason, r.detail) for r in iter_records(path)]


def test_jsonl_rows_blank_lines_and_bad_rows(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    path.write_bytes(b'{"a": 1}\n\n{"a": \n\xff\n{"a": 2}\n')
    got = _records(path)
    assert [(o, r) for o, r, _ in got] == [({"a": 1}, None), (None, "read_bad_json"), (None, "read_bad_utf8"), ({"a": 2}, None)]
    assert got[2][2] == "byte 0 of the line is not UTF-8"


def test_json_lines_under_a_json_name_and_gzip(tmp_path: Path) -> None:
    path = tmp_path / "mislabelled.json"
    path.write_text('{"a": 1}\n{"a": 2}\n')
    assert _records(path) == [({"a": 1}, None, None), ({"a": 2}, None, None)]
    gz = tmp_path / "rows.json.gz"
    with gzip.open(gz, "wt") as f:
        json.dump([{"a": 1}], f)
    assert _records(gz) == [({"a": 1}, None, None)]


def test_json_array_with_trailing_data_keeps_the_array(tmp_path: Path) -> None:
    path = tmp_path / "t.json"
    path.write_text('[{"a": 1}, {"a": 2}] junk')
    got = _records(path)
    assert [o for o, _, _ in got[:2]] == [{"a": 1}, {"a": 2}]
    assert got[2][1:] == ("read_truncated", "4 bytes of trailing data after the array ends at byte 20")


def test_files_that_cannot_be_read_name_the_file_and_the_fix(tmp_path: Path) -> None:
    from datasets import Dataset, DatasetDict

    DatasetDict({"train": Dataset.from_list([{"a": 1}]), "test": Dataset.from_list([{"a": 2}])}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(SourceError, match=r"holds a DatasetDict with splits \[train, test\]; point the path at one split, e.g. '.*dd/train'"):
        list(iter_records(tmp_path / "dd"))
    assert [r.obj for r in iter_records(tmp_path / "dd" / "train")] == [{"a": 1}]
    obj = tmp_path / "obj.json"
    obj.write_text('{"data": [1]}')
    with pytest.raises(SourceError, match="holds a JSON dict, expected an array of rows"):
        list(iter_records(obj))


def test_strict_reading_for_evaluation_items_names_the_row(tmp_path: Path) -> None:
    path = tmp_path / "items.jsonl"
    path.write_text('{"q": 1}\n{"q": \n')
    with pytest.raises(SourceError, match=r"eval set 'x': row 2 of '.*items.jsonl' cannot be read \(read_bad_json"):
        read_objects(str(path), "eval set 'x'")
    path.write_text('{"q": 1}\n')
    assert read_objects(str(path), "eval set 'x'") == [{"q": 1}]
    assert Record({"q": 1}).reason is None
