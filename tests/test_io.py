from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sft_engine.io import SUCCESS, atomic_dir, digest_json, is_complete


def test_atomic_dir_publishes_only_complete_folders(tmp_path: Path) -> None:
    final = tmp_path / "stage" / "abc"
    with pytest.raises(RuntimeError), atomic_dir(final) as tmp:
        (tmp / "half.parquet").write_text("partial")
        raise RuntimeError("killed midway")
    # Only the key's lock file stays (removing it could let two runs hold "the" lock at once).
    assert not final.exists() and [p.name for p in final.parent.iterdir()] == [".lock-abc"]
    with atomic_dir(final) as tmp:
        (tmp / "data.parquet").write_text("all")
    assert is_complete(final) and (final / "data.parquet").read_text() == "all"


def test_sigkill_mid_write_leaves_no_complete_folder_and_rerun_completes(tmp_path: Path) -> None:
    final = tmp_path / "out"
    script = (
        "import time, sys; from sft_engine.io import atomic_dir\n"
        f"with atomic_dir({str(final)!r}) as t:\n"
        "    (t / 'part').write_text('x'); print('writing', flush=True); time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not final.exists()
    leftovers = list(tmp_path.glob(".tmp-out-*"))
    assert len(leftovers) == 1 and not (leftovers[0] / SUCCESS).exists()
    with atomic_dir(final) as t:
        (t / "part").write_text("done")
    assert is_complete(final) and not list(tmp_path.glob(".tmp-out-*"))


def test_digest_is_key_order_independent() -> None:
    assert digest_json({"a": 1, "b": [1, 2]}) == digest_json({"b": [1, 2], "a": 1})
    assert digest_json({"a": 1}) != digest_json({"a": 2})


def test_tokenizer_digest_ignores_loader_only_keys(tmp_path: Path) -> None:
    import json

    from sft_engine.model import tokenizer_digest

    (tmp_path / "tokenizer.json").write_text("{}")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<e>", "local_files_only": True}))
    first = tokenizer_digest(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<e>", "local_files_only": False}))
    assert tokenizer_digest(tmp_path) == first
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<x>"}))
    assert tokenizer_digest(tmp_path) != first


def _holder(final: Path, hold: str, content: str) -> subprocess.Popen[str]:
    """A process that builds ``final`` under its key lock: says 'holding', then waits for ``hold`` to appear."""
    script = (
        "import logging, sys, time; from pathlib import Path; from sft_engine.io import atomic_dir\n"
        "console = logging.getLogger('sft.console'); console.addHandler(logging.StreamHandler(sys.stdout)); console.setLevel(logging.INFO)\n"
        f"with atomic_dir({str(final)!r}) as t:\n"
        "    if t is None:\n"
        "        print('reused', flush=True)\n"
        "    else:\n"
        f"        (t / 'part').write_text({content!r}); print('holding', flush=True)\n"
        f"        while not Path({hold!r}).exists(): time.sleep(0.05)\n"
    )
    return subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)


def test_a_second_run_of_the_same_key_waits_then_reuses_instead_of_computing(tmp_path: Path) -> None:
    final = tmp_path / "curate" / "k1"
    first = _holder(final, str(tmp_path / "go"), "first")
    assert first.stdout.readline().strip() == "holding"
    second = _holder(final, str(tmp_path / "go"), "second")
    assert second.stdout.readline().strip() == f"waiting for curate/k1, computed by pid {first.pid}"
    (tmp_path / "go").touch()
    assert first.wait(timeout=60) == 0 and second.wait(timeout=60) == 0
    assert second.stdout.read().strip() == "reused"
    assert (final / "part").read_text() == "first" and not list(final.parent.glob(".tmp-*"))


def test_a_run_killed_while_holding_the_lock_hands_over_to_the_waiting_run(tmp_path: Path) -> None:
    final = tmp_path / "curate" / "k2"
    first = _holder(final, str(tmp_path / "never"), "first")
    assert first.stdout.readline().strip() == "holding"
    second = _holder(final, str(tmp_path / "go"), "second")
    assert second.stdout.readline().strip().startswith("waiting for curate/k2")
    first.kill()
    first.wait()
    assert second.stdout.readline().strip() == "holding"  # the kernel released the dead holder's lock
    (tmp_path / "go").touch()
    assert second.wait(timeout=60) == 0
    assert (final / "part").read_text() == "second"
    assert not list(final.parent.glob(".tmp-*"))  # the killed holder's temporary folder was removed under the lock


def test_reuse_checks_what_the_marker_lists_and_moves_a_damaged_folder_aside(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import json
    import logging

    from sft_engine.io import digest_file, folder_damage

    final = tmp_path / "prepare" / "k3"
    with atomic_dir(final) as t:
        (t / "train.arrow").write_bytes(b"abcdef" * 100)
        (t / "sub").mkdir()
        (t / "sub" / "b.json").write_text("{}")
    marker = json.loads((final / SUCCESS).read_text())
    assert marker["files"] == {"sub/b.json": [2, digest_file(final / "sub" / "b.json")],
                               "train.arrow": [600, digest_file(final / "train.arrow")]}
    assert is_complete(final) and is_complete(final, verify=True)

    # Same size, other bytes: only a verified reuse sees it.
    (final / "train.arrow").write_bytes(b"abcdeX" * 100)
    assert is_complete(final) and not is_complete(final, verify=True)
    assert folder_damage(final, verify=True) == "train.arrow changed since it was written (digest)"
    # Truncated, then deleted: every reuse sees it.
    (final / "train.arrow").write_bytes(b"abc")
    assert folder_damage(final) == "train.arrow has 3 bytes, 600 when written"
    (final / "sub" / "b.json").unlink()
    assert folder_damage(final) == "sub/b.json is missing" and not is_complete(final)

    with caplog.at_level(logging.INFO, logger="sft.console"), atomic_dir(final) as t:
        assert t is not None  # not reused: recomputed
        (t / "train.arrow").write_bytes(b"abcdef" * 100)
    (aside,) = final.parent.glob(".damaged-k3-*")
    assert (aside / "train.arrow").read_bytes() == b"abc"  # moved aside as it was, nothing deleted
    assert f"prepare/k3 cannot be reused (sub/b.json is missing): moved aside to {aside.name}" in caplog.text
    assert is_complete(final, verify=True)


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs util-linux unshare (a private tmpfs)")
def test_a_full_disk_ends_with_one_line_naming_the_stage_folder_and_nothing_published(tmp_path: Path) -> None:
    mnt = tmp_path / "small"
    mnt.mkdir()
    script = (
        "import sys; from pathlib import Path; from sft_engine.io import atomic_dir; from sft_engine.errors import DiskFullError\n"
        f"final = Path({str(mnt)!r}) / 'prepare' / 'k4'\n"
        "try:\n"
        "    with atomic_dir(final) as t:\n"
        "        (t / 'train.arrow').write_bytes(b'x' * (1 << 20))\n"
        "except DiskFullError as e:\n"
        "    print(e, e.exit_code, sorted(p.name for p in final.parent.iterdir()))\n"
    )
    done = subprocess.run(
        ["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=256k tmpfs {mnt} && exec {sys.executable} -c \"$0\"", script],
        capture_output=True, text=True, timeout=120, check=False,
    )
    if "mount" in done.stderr and done.returncode:
        pytest.skip(f"no private mount here: {done.stderr.strip()}")
    out = done.stdout.strip()
    assert out.startswith(f"out of disk space writing prepare/k4 in '{mnt / 'prepare'}' ("), done.stderr
    assert out.endswith("nothing was published 6 ['.lock-k4']")  # exit code 6; no folder, no temporary left


def test_a_stage_folder_missing_a_file_is_recomputed_to_the_same_bytes_not_reused(tmp_path: Path) -> None:
    from sft_engine.config import load_config
    from sft_engine.curation.stage import run_curate
    from sft_engine.io import digest_file

    cfg = load_config(None, [f"work_dir={tmp_path}", "curate.sources=[{name: t, builtin: verifiable_tasks, limit: 60}]"])
    first = run_curate(cfg)
    before = digest_file(first.path / "train.parquet")
    (first.path / "heldout.parquet").unlink()  # a tidy-up, a sync tool
    again = run_curate(cfg)
    assert again.path == first.path and not again.reused
    assert digest_file(again.path / "train.parquet") == before and (again.path / "heldout.parquet").is_file()
    (aside,) = first.path.parent.glob(f".damaged-{first.path.name}-*")
    assert not (aside / "heldout.parquet").exists() and (aside / "train.parquet").is_file()
    assert run_curate(cfg).reused


def test_parquet_batches_hold_one_row_group_not_every_one_read_so_far(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from sft_engine.io import parquet_batches

    rng = np.random.default_rng(0)
    # 48 row groups of ~256 KiB of incompressible text: pre_buffer's cache would reach the file's ~12 MiB.
    text = [rng.bytes(512).hex() for _ in range(256)]
    table = pa.table({"i": np.arange(256 * 48), "text": text * 48})
    path = tmp_path / "many_groups.parquet"
    pq.write_table(table, path, row_group_size=256, compression="zstd")
    base = pa.total_allocated_bytes()
    seen, high = [], 0
    for batch in parquet_batches(path, 100):
        seen.append(batch.column("i").to_numpy())
        high = max(high, pa.total_allocated_bytes() - base)
    assert np.array_equal(np.concatenate(seen), np.arange(256 * 48))
    assert high < 2 << 20, f"{high / 2**20:.1f} MiB held while reading a {path.stat().st_size / 2**20:.1f} MiB file"
