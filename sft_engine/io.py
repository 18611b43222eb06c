"""Atomic outputs, content digests and stage folders.

A stage writes into a temporary sibling folder and renames it into place only once every file
is written and a ``_SUCCESS`` marker is inside. A killed stage therefore leaves either nothing or
a ``.tmp-*`` folder that is ignored and cleared on the next run; never a half folder that looks done.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SUCCESS = "_SUCCESS"


@dataclass(frozen=True)
class StageOutput:
    """A finished stage folder, and whether it was reused from an earlier run rather than computed."""

    path: Path
    reused: bool


def digest_bytes(*parts: bytes) -> str:
    """A short stable hex digest of byte strings."""
    h = hashlib.blake2b(digest_size=16)
    for p in parts:
        h.update(len(p).to_bytes(8, "little"))
        h.update(p)
    return h.hexdigest()


def digest_json(obj: Any) -> str:
    """Digest of a JSON-serializable object, independent of dict key order."""
    return digest_bytes(json.dumps(obj, sort_keys=True, default=str).encode())


def digest_file(path: str | Path, chunk: int = 1 << 22) -> str:
    """Content digest of one file."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def digest_path(path: Path) -> str:
    """A file's digest, or for a folder (e.g. a saved HF dataset) the digest of every file inside."""
    if path.is_dir():
        return digest_json([[str(p.relative_to(path)), digest_file(p)] for p in sorted(path.rglob("*")) if p.is_file()])
    return digest_file(path)


def digest_files(paths: list[Path]) -> str:
    """Digest of several files' contents and names (order-independent)."""
    items = sorted((p.name, digest_file(p)) for p in paths)
    return digest_json(items)


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write JSON via a temp file + rename so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def is_complete(folder: str | Path) -> bool:
    """True if a stage folder was finished (its success marker exists)."""
    return (Path(folder) / SUCCESS).is_file()


@contextlib.contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """Yield a temp folder; on success mark it complete and rename it to ``final``.

    If ``final`` already exists and is complete it is replaced only by a newly completed folder.
    On an exception the temp folder is removed and nothing is published.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    for stale in final.parent.glob(f".tmp-{final.name}-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = final.parent / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        (tmp / SUCCESS).write_text("ok\n")
        if final.exists():
            # An incomplete leftover (or an old copy) is replaced; a rename over a non-empty dir fails.
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def stage_dir(work_dir: str | Path, stage: str, key: str) -> Path:
    """Folder for a stage's outputs, named by the hash of its inputs and config."""
    return Path(work_dir) / stage / key
