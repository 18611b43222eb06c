from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from sft_engine.io import SUCCESS, atomic_dir, digest_json, is_complete


def test_atomic_dir_publishes_only_complete_folders(tmp_path: Path) -> None:
    final = tmp_path / "stage" / "abc"
    with pytest.raises(RuntimeError), atomic_dir(final) as tmp:
        (tmp / "half.parquet").write_text("partial")
        raise RuntimeError("killed midway")
    assert not final.exists() and list(final.parent.iterdir()) == []
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
