"""Curation cut into per-shard units: the plan, the caching per shard, and the same bytes from every
Prefect task runner (a real 2-process Dask cluster), with near-duplicates still found across shards."""

from __future__ import annotations

import gzip
import json
import os
import random
import time
from pathlib import Path

import polars as pl
import pyarrow as pa
import pytest

from sft_engine.config import ConfigError, config_to_dict, load_config
from sft_engine.curation import stage as curation
from sft_engine.io import StageOutput

# What must be byte-identical whichever way curation ran.
OUTPUTS = ("train.parquet", "heldout.parquet", "rejected.parquet", "stats.json")


def _words(rng: random.Random, n: int) -> str:
    return " ".join("".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 8))) for _ in range(n))


def _row(user: str, assistant: str) -> str:
    return json.dumps({"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]})


def write_shards(root: Path) -> Path:
    """Source ``a``: 3 shard files (one gzipped), 30 rows each; source ``b``: 2 files of 20 rows.

    Planted: a/part-2 row 8 is a near-duplicate of a/part-0 row 4 (one word changed: Jaccard ~0.87),
    b/part-1 row 5 a near-duplicate of a/part-1 row 10, b/part-0 row 2 an exact duplicate (case
    folded) of a/part-2 row 3, and a/part-1 row 6 is not JSON.
    """
    rng = random.Random(7)
    files: dict[str, list[str]] = {}
    for src, n_files, n_rows in (("a", 3, 30), ("b", 2, 20)):
        for f in range(n_files):
            files[f"{src}/part-{f}"] = [_row(f"Question {src}{f}.{i}: {_words(rng, 8)}?", _words(rng, 60)) for i in range(n_rows)]

    def near(line: str) -> str:
        msgs = json.loads(line)["messages"]
        words = msgs[1]["content"].split(" ")
        words[30] = "planted"
        return _row(msgs[0]["content"], " ".join(words))

    files["a/part-2"][7] = near(files["a/part-0"][3])
    files["b/part-1"][4] = near(files["a/part-1"][9])
    files["b/part-0"][1] = files["a/part-2"][2].upper().replace('"MESSAGES"', '"messages"').replace('"ROLE"', '"role"').replace(
        '"CONTENT"', '"content"').replace('"USER"', '"user"').replace('"ASSISTANT"', '"assistant"')
    files["a/part-1"][5] = '{"messages": [oops'
    for name, lines in files.items():
        text = "\n".join(lines) + "\n"
        path = root / (name + (".jsonl.gz" if name == "a/part-1" else ".jsonl"))
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".gz":
            with gzip.open(path, "wt") as fh:
                fh.write(text)
        else:
            path.write_text(text)
    return root


def shard_overrides(data: Path, work: Path, *extra: str) -> list[str]:
    return [
        f"work_dir={work}", "experiment=runners-test",
        f"curate.sources=[{{name: a, path: '{data}/a/part-*'}}, {{name: b, path: '{data}/b/part-*.jsonl', weight: 2.0}}]",
        "curate.min_chars=null", "curate.heldout_fraction=0.2", *extra,
    ]


@pytest.fixture(scope="module")
def shard_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_shards(tmp_path_factory.mktemp("shards"))


@pytest.fixture(scope="module")
def sequential(shard_data: Path, tmp_path_factory: pytest.TempPathFactory) -> StageOutput:
    """The reference: run_curate in this process, every unit one after another."""
    return curation.run_curate(load_config(None, shard_overrides(shard_data, tmp_path_factory.mktemp("seq"))))


def test_glob_sources_are_cut_into_shard_units(shard_data: Path, tmp_path: Path) -> None:
    plan = curation.plan_curate(load_config(None, shard_overrides(shard_data, tmp_path)))
    assert [u.label for u in plan.units] == ["a[0]", "a[1]", "a[2]", "b[0]", "b[1]"]
    assert [Path(f).name for f in plan.units[1].files or ()] == ["part-1.jsonl.gz"]
    assert len({u.folder for u in plan.units}) == 5
    pairs = curation.plan_curate(load_config(None, shard_overrides(shard_data, tmp_path, "runner.files_per_shard=2")))
    assert [(u.label, len(u.files or ())) for u in pairs.units] == [("a[0]", 2), ("a[1]", 1), ("b", 0)]
    # A source with a row limit counts rows across its files, so it stays one unit.
    limited = curation.plan_curate(load_config(None, shard_overrides(shard_data, tmp_path, "curate.sources.0.limit=50")))
    assert [u.label for u in limited.units] == ["a", "b[0]", "b[1]"]


def test_shards_give_the_rows_of_one_unit_and_find_near_dups_across_shards(shard_data: Path, sequential: StageOutput,
                                                                           tmp_path: Path) -> None:
    # One unit per source (files_per_shard large): the same rows, numbered the same, the same outputs.
    whole = curation.run_curate(load_config(None, shard_overrides(shard_data, tmp_path, "runner.files_per_shard=100")))
    assert whole.path.name == sequential.path.name
    for name in OUTPUTS[:3]:
        assert (whole.path / name).read_bytes() == (sequential.path / name).read_bytes(), name
    rejected = pl.read_parquet(sequential.path / "rejected.parquet")
    # Rows are numbered across each whole source (an unreadable line is a row too): a/part-2 line 8 is
    # a:68 (30 + 30 + 8), a near-duplicate of a/part-0 line 4 two shards away; b/part-1 line 5 is b:25,
    # a near-duplicate of a/part-1 line 10 (a:40) in another source.
    assert rejected.select("source", "row", "drop_reason", "dup_of").sort("source", "row").rows() == [
        ("a", 36, "read_bad_json", None),
        ("a", 68, "dedup_near", "a:4"),
        ("b", 2, "dedup_exact", None),
        ("b", 25, "dedup_near", "a:40"),
    ]
    stats = json.loads((sequential.path / "stats.json").read_text())
    assert stats["rows_in"] == 130 and stats["rows_dropped"] == 4
    assert stats["cache"] == {"sources_reused": [], "sources_computed": ["a[0]", "a[1]", "a[2]", "b[0]", "b[1]"], "dedup_reused": False}


@pytest.mark.parametrize("files_per_shard", [1, 100])
def test_batch_rows_do_not_change_the_outputs(shard_data: Path, sequential: StageOutput, files_per_shard: int, tmp_path: Path) -> None:
    # 3 rows a batch: every file (20-30 rows) is read, checked and written in many batches, across shard files
    # and whole sources; rows must be numbered and deduplicated exactly as in one batch.
    small = curation.run_curate(load_config(None, shard_overrides(
        shard_data, tmp_path, "runner.batch_rows=3", f"runner.files_per_shard={files_per_shard}")))
    assert small.path.name == sequential.path.name  # runner.batch_rows does not feed the key ...
    for name in OUTPUTS[:3]:  # ... because it does not change the bytes
        assert (small.path / name).read_bytes() == (sequential.path / name).read_bytes(), name
    unit = pl.read_parquet(next((tmp_path / "curate_sources").glob("a-*")) / "rows.parquet")
    assert unit["row"].to_list() == list(range(1, unit.height + 1))


def test_a_tiny_memory_budget_spills_band_keys_by_partition_and_gives_the_same_bytes(
        shard_data: Path, sequential: StageOutput, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from sft_engine.curation import dedup

    real, seen = dedup.band_partitions, []

    def counting(chunks, docs, bits, scratch):  # the real spill, counting the partitions it reads back
        for part in real(chunks, docs, bits, scratch):
            seen.append((bits, len(part[0])))
            yield part

    monkeypatch.setattr(dedup, "band_partitions", counting)
    monkeypatch.setattr(dedup, "SPILL_ROWS", 5)  # units' key rows spilled 5 at a time, pieces cut across units too
    tiny = curation.run_curate(load_config(None, shard_overrides(shard_data, tmp_path, "curate.memory_budget=4KiB")))
    # 128 live rows (130 less a broken line and an exact copy) x 16 bands x 128 B = 262,144 B: 6 top bits of the key
    # cut them into 64 partitions of ~4 KiB; each band key of each live row is paired once, in one partition.
    assert {bits for bits, _ in seen} == {6} and len(seen) == 64
    assert sum(n for _, n in seen) == 128 * 16 and max(n for _, n in seen) < 128
    assert tiny.path.name == sequential.path.name
    for name in OUTPUTS:
        assert (tiny.path / name).read_bytes() == (sequential.path / name).read_bytes(), name
    assert not list((tmp_path / "curate_dedup").glob(".tmp-*"))  # the spill lived in the published folder's temp


def test_outputs_written_in_tiny_buckets_have_the_same_bytes(shard_data: Path, sequential: StageOutput,
                                                             monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # Buckets of 4 output positions and flushes of 8 rows: every scratch file holds a record batch for many buckets,
    # every bucket is gathered from several files and units, and the mixed train order crosses them all.
    real, batches = curation.write_ordered, []

    def tiny(outputs, plan, scratch, bucket_rows=8_192, workers=1):
        real_get = pa.ipc.RecordBatchFileReader.get_batch

        def counted(self, i):
            batches.append(i)
            return real_get(self, i)

        with monkeypatch.context() as m:
            m.setattr(pa.ipc.RecordBatchFileReader, "get_batch", counted)
            real(outputs, plan, scratch, bucket_rows=4, workers=workers)

    monkeypatch.setattr(curation, "write_ordered", tiny)
    small = curation.run_curate(load_config(None, shard_overrides(shard_data, tmp_path)))
    assert small.path.name == sequential.path.name
    for name in OUTPUTS:
        assert (small.path / name).read_bytes() == (sequential.path / name).read_bytes(), name
    stats = json.loads((small.path / "stats.json").read_text())
    # Each bucket of 4 rows gathers batches from several flush files: more batch reads than buckets.
    assert len(batches) > (stats["rows_train_mixed"] + stats["rows_heldout"] + stats["rows_dropped"]) // 4
    assert not (small.path / "_buckets").exists()

def test_outputs_are_filed_while_a_unit_is_read(shard_data: Path, sequential: StageOutput, monkeypatch: pytest.MonkeyPatch,
                                                tmp_path: Path) -> None:
    # Unit files of 4-row row groups and flushes of 8 rows: a unit's rows are filed as its row groups are read, never
    # after reading all of them (a unit grows with the corpus: that held 0.44 GiB per filing thread at 3M rows).
    events: list[str] = []
    real_groups, real_new_file = curation._row_groups, pa.ipc.new_file

    def groups(path, columns, offset, wanted):
        for frame in real_groups(path, columns, offset, wanted):
            events.append("group" if "messages" in columns else "text")
            yield frame

    def new_file(*args, **kwargs):
        events.append("flush")
        return real_new_file(*args, **kwargs)

    real_write = curation.write_ordered
    monkeypatch.setattr(curation, "ROW_GROUP", 4)
    monkeypatch.setattr(curation, "_row_groups", groups)
    monkeypatch.setattr(pa.ipc, "new_file", new_file)
    monkeypatch.setattr(curation, "write_ordered", lambda outputs, plan, scratch, workers=1: real_write(outputs, plan, scratch, 4, workers))
    small = curation.run_curate(load_config(None, shard_overrides(shard_data, tmp_path)))
    filing = "".join("g" if e == "group" else "f" for e in events if e != "text")
    assert "gfg" in filing  # a flush between two row groups of one unit
    assert filing.count("g") > 2 * 5  # 5 units of 20-30 rows in row groups of 4
    for name in ("train.parquet", "heldout.parquet", "rejected.parquet"):
        assert pl.read_parquet(small.path / name).equals(pl.read_parquet(sequential.path / name)), name


def test_a_local_process_pool_gives_the_same_bytes(shard_data: Path, sequential: StageOutput, monkeypatch: pytest.MonkeyPatch,
                                                   tmp_path: Path) -> None:
    cfg = load_config(None, shard_overrides(shard_data, tmp_path / "p", "runner.kind=processes", "runner.workers=2"))
    plan = curation.plan_curate(cfg)
    assert curation.unit_pool_size(cfg, plan.units) == 2
    monkeypatch.setattr(curation, "DEDUP_CHILD_ROWS", 100)  # 130 rows: the dedup marks are computed in a child too
    pooled = curation.run_curate(cfg)
    assert curation._dedup_in_child(cfg, plan)
    assert pooled.path.name == sequential.path.name
    for name in OUTPUTS:
        assert (pooled.path / name).read_bytes() == (sequential.path / name).read_bytes(), name
    # auto: a pool only for enough input (these 5 shards are ~60 KB), and never for a single unit.
    auto = load_config(None, shard_overrides(shard_data, tmp_path / "a", "runner.workers=2"))
    units = curation.plan_curate(auto).units
    assert auto.runner.kind == "auto" and curation.unit_pool_size(auto, units) == 1
    monkeypatch.setattr(curation, "AUTO_PARALLEL_BYTES", 1)
    assert curation.unit_pool_size(auto, units) == 2
    assert curation.unit_pool_size(auto, units[:1]) == 1
    assert curation.unit_pool_size(auto, plan.units) == 1  # done units (the pooled run's) need no pool


def test_a_new_shard_reuses_the_others(shard_data: Path, tmp_path: Path) -> None:
    data = write_shards(tmp_path / "data")
    first = curation.run_curate(load_config(None, shard_overrides(data, tmp_path / "w")))
    (data / "b" / "part-2.jsonl").write_text(_row("One more question?", "One more answer, with enough words.") + "\n")
    again = curation.run_curate(load_config(None, shard_overrides(data, tmp_path / "w")))
    stats = json.loads((again.path / "stats.json").read_text())
    assert again.path != first.path
    assert stats["cache"] == {"sources_reused": ["a[0]", "a[1]", "a[2]", "b[0]", "b[1]"], "sources_computed": ["b[2]"], "dedup_reused": False}
    assert stats["per_source"]["b"]["rows_in"] == 41


def test_global_step_refuses_missing_units(shard_data: Path, tmp_path: Path) -> None:
    cfg = load_config(None, shard_overrides(shard_data, tmp_path))
    plan = curation.plan_curate(cfg)
    done = [curation.run_curate_unit(cfg, u) for u in plan.units[:2]]
    with pytest.raises(ValueError, match="needs the finished folders of the plan's 5 units in plan order, got 2"):
        curation.run_curate_global(cfg, plan, done)


def test_runner_needing_a_missing_package_names_the_key_and_the_fix(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "prefect_ray" else real(name, *a))
    with pytest.raises(ConfigError, match=r"bad value for 'runner.kind': .*needs prefect-ray, which is not installed: "
                                          r"pip install -e '\.\[scale\]'"):
        load_config(None, ["curate.sources=[{name: t, builtin: verifiable_tasks}]", "runner.kind=ray"])
    with pytest.raises(ConfigError, match="unknown key 'runner.worker'. Did you mean 'runner.workers'"):
        load_config(None, ["curate.sources=[{name: t, builtin: verifiable_tasks}]", "runner.worker=2"])


def test_task_runner_for_each_kind() -> None:
    from prefect.task_runners import ThreadPoolTaskRunner
    from prefect_dask import DaskTaskRunner

    from flows.runners import task_runner

    cfg = load_config(None, ["curate.sources=[{name: t, builtin: verifiable_tasks}]", "runner.kind=threads", "runner.workers=3"])
    threads = task_runner(cfg.runner)
    assert isinstance(threads, ThreadPoolTaskRunner) and threads._max_workers == 3
    dask = task_runner(cfg.runner.model_copy(update={"kind": "dask", "workers": 2}))
    assert isinstance(dask, DaskTaskRunner)
    assert dask.cluster_kwargs == {"n_workers": 2, "threads_per_worker": 1, "processes": True, "dashboard_address": None}
    remote = task_runner(cfg.runner.model_copy(update={"kind": "dask", "address": "tcp://10.0.0.5:8786"}))
    assert remote.address == "tcp://10.0.0.5:8786"


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["threads", "dask", "ray"])
def test_runner_gives_the_sequential_bytes(prefect_server, kind: str, shard_data: Path, sequential: StageOutput,
                                           tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterName

    from flows.pipeline import curate_flow

    def unit_runs() -> list[str]:
        with get_client(sync_client=True) as client:
            runs = client.read_task_runs(task_run_filter=TaskRunFilter(name=TaskRunFilterName(like_="curate-unit ")))
        return sorted(r.name for r in runs if r.state and r.state.is_completed())

    before = unit_runs()
    workers: dict[str, int] = {}
    if kind == "dask":
        from prefect_dask import DaskTaskRunner

        leave = DaskTaskRunner.__exit__

        def spy(self: DaskTaskRunner, *exc: object) -> None:
            workers.update(self.client.run(os.getpid))  # the processes that ran the units, before the cluster stops
            leave(self, *exc)

        monkeypatch.setattr(DaskTaskRunner, "__exit__", spy)
    if kind == "ray":
        # Ray (~280 MB installed, ~20 s to start on 2 cores) is in the `scale` extra, not the test extra.
        pytest.importorskip("prefect_ray", reason="Ray runs only where pip install -e '.[scale]' was done")
    cfg = load_config(None, shard_overrides(shard_data, tmp_path / "work", f"runner.kind={kind}", "runner.workers=2"))
    out = Path(curate_flow(config_to_dict(cfg)))
    if kind == "dask":
        assert len(workers) == 2 and os.getpid() not in workers.values()
    assert out.relative_to(cfg.work_dir) == sequential.path.relative_to(sequential.path.parents[1])
    for name in OUTPUTS:
        assert (out / name).read_bytes() == (sequential.path / name).read_bytes(), name
    seq_units = sorted(p.name for p in (sequential.path.parents[1] / "curate_sources").iterdir())
    assert sorted(p.name for p in (cfg.work_dir / "curate_sources").iterdir()) == seq_units
    # One mapped task per shard ran and completed (task-run states reach the server as events: poll briefly).
    deadline = time.monotonic() + 15
    while True:
        after = unit_runs()
        for name in before:
            after.remove(name)
        if len(after) >= 5 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert after == ["curate-unit a[0]", "curate-unit a[1]", "curate-unit a[2]", "curate-unit b[0]", "curate-unit b[1]"]
