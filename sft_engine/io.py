"""Atomic outputs, content digests and stage folders that many runs share.

A stage writes into a temporary sibling folder and renames it into place only once every file is written and
the ``_SUCCESS`` marker (every file with its size and digest) is inside. A killed stage therefore leaves either
nothing or a ``.tmp-*`` folder; never a half folder that looks done.

Runs of any configs may share one ``work_dir``: a key is built under its own OS file lock (``.lock-<key>``,
released by the kernel when its holder dies), so a second run waits and reuses instead of computing it again or
deleting the first one's temporary folder; reuse checks that every listed file is still there with its size
(and with ``verify``, its digest); a damaged folder is moved aside, never deleted.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sft_engine.errors import DiskFullError
from sft_engine.runtime import notice

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


# Digests this process already computed, by device, inode, size and mtime: a file hashed while its stage was
# being built (for a key or a lineage digest) is not hashed again when the folder is published (a rename keeps
# all four), and a file a completion marker lists is not hashed again for a later key.
_DIGESTS: dict[tuple[int, int, int, int], str] = {}


def _hash(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def digest_file(path: str | Path) -> str:
    """Content digest of one file: remembered while the file is unchanged, or read from its folder's marker."""
    path = Path(path)
    st = path.stat()
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        _DIGESTS[key] = _recorded_digest(path, st.st_size) or _hash(path)
    return _DIGESTS[key]


def digest_path(path: Path) -> str:
    """A file's digest, or for a folder (e.g. a saved HF dataset) the digest of every file inside."""
    if path.is_dir():
        return digest_json([[str(p.relative_to(path)), digest_file(p)] for p in sorted(path.rglob("*")) if p.is_file()])
    return digest_file(path)


def digest_files(paths: list[Path]) -> str:
    """Digest of several files' contents and names (order-independent)."""
    items = sorted((p.name, digest_file(p)) for p in paths)
    return digest_json(items)


def parquet_batches(path: str | Path, batch_size: int, columns: list[str] | None = None) -> Iterator[Any]:
    """A Parquet file's record batches, in order, holding about one row group at a time.

    pyarrow's default ``pre_buffer`` keeps every row group ``iter_batches`` has read cached until the file is
    closed: by the last batch, the whole file's bytes (174 MB for a 187k-row ShareGPT shard). Reading row
    group by row group with it disabled holds one.
    """
    import pyarrow.parquet as pq

    yield from pq.ParquetFile(path, pre_buffer=False).iter_batches(batch_size=batch_size, columns=columns)


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write JSON via a temp file + rename so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def _recorded_digest(path: Path, size: int) -> str | None:
    """The digest a completion marker recorded for ``path`` (its folder's or the one above), if its size still matches."""
    for folder in (path.parent, path.parent.parent):
        files = _marker_files(folder)
        if files is not None:
            entry = files.get(path.relative_to(folder).as_posix())
            return entry[1] if entry and entry[0] == size else None
    return None


def _marker_files(folder: Path) -> dict[str, list[Any]] | None:
    """``{relative path: [size, digest]}`` from a folder's completion marker; None without a marker (or an old one)."""
    try:
        marker = json.loads((folder / SUCCESS).read_text())
    except (OSError, ValueError):
        return None
    return marker.get("files") if isinstance(marker, dict) else None


def folder_damage(folder: str | Path, verify: bool = False) -> str | None:
    """Why a completed folder cannot be reused (a listed file missing, of another size, or with ``verify`` another
    digest), or None when it can. Sizes are always checked (one stat per file); digests only when asked."""
    folder = Path(folder)
    files = _marker_files(folder)
    for rel, (size, digest) in (files or {}).items():
        p = folder / rel
        try:
            found = p.stat().st_size if p.is_file() else None
        except OSError:
            found = None
        if found is None:
            return f"{rel} is missing"
        if found != size:
            return f"{rel} has {found:,} bytes, {size:,} when written"
        if verify and _hash(p) != digest:
            return f"{rel} changed since it was written (digest)"
    return None


def _not_reusable(folder: Path, verify: bool) -> str | None:
    """Why ``folder`` cannot be reused (no completion marker, or what ``folder_damage`` finds), or None."""
    return folder_damage(folder, verify) if (folder / SUCCESS).is_file() else "it has no completion marker"


def is_complete(folder: str | Path, verify: bool = False) -> bool:
    """True if a stage folder was finished (its success marker exists) and every file it listed is still there with
    its size (with ``verify``, its digest too)."""
    return _not_reusable(Path(folder), verify) is None


def folder_bytes(folder: Path) -> int:
    """The bytes of every file below ``folder``."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _write_marker(tmp: Path) -> None:
    files = {p.relative_to(tmp).as_posix(): [p.stat().st_size, digest_file(p)]
             for p in sorted(tmp.rglob("*")) if p.is_file()}
    write_json_atomic(tmp / SUCCESS, {"files": files})


def lock_path(final: Path) -> Path:
    return final.parent / f".lock-{final.name}"


def lock_held(final: Path) -> bool:
    """True while a run holds ``final``'s lock (is building it)."""
    path = lock_path(final)
    if not path.exists():
        return False
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # releases the probe's lock, if it got it
    return False


@contextlib.contextmanager
def key_lock(final: Path) -> Iterator[None]:
    """Hold ``final``'s lock: an OS file lock (``fcntl.flock``), released by the kernel when its holder exits, even
    killed. A run that has to wait says so once, with the holder's pid."""
    final.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path(final), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            notice(f"waiting for {final.parent.name}/{final.name}, computed by pid {holder}")
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


@contextlib.contextmanager
def atomic_dir(final: str | Path, verify: bool = False) -> Iterator[Path | None]:
    """Build ``final`` once, whoever else wants it: yields a temporary folder to fill, or None when ``final`` is
    already complete (another run published it, maybe while this one waited for the lock): reuse it then.

    Under ``final``'s lock (held while the body runs, so a second run waits rather than computing the same key):
    temporary siblings left by a killed holder are removed (the lock proves their owner gone); a damaged ``final``
    is moved aside to ``.damaged-<name>-<time>`` and reported, never deleted. On success the completion marker,
    listing every file with its size and digest, is written last and the folder renamed into place; on an
    exception the temporary folder is removed and nothing is published.
    """
    final = Path(final)
    with key_lock(final):
        why = _not_reusable(final, verify)
        if why is None:
            yield None
            return
        for stale in final.parent.glob(f".tmp-{final.name}-*"):
            shutil.rmtree(stale, ignore_errors=True)
        if final.exists():
            _move_aside(final, why)
        tmp = final.parent / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            yield tmp
            _write_marker(tmp)
            os.replace(tmp, final)
        except BaseException as exc:
            written = folder_bytes(tmp) if tmp.exists() else 0
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(exc, OSError) and exc.errno == errno.ENOSPC and not isinstance(exc, DiskFullError):
                raise DiskFullError(
                    f"out of disk space writing {final.parent.name}/{final.name} in '{final.parent}' "
                    f"({written / 2**20:,.1f} MiB written before the disk filled, "
                    f"{shutil.disk_usage(final.parent).free / 2**20:,.1f} MiB free now); nothing was published",
                ) from exc
            raise


def _move_aside(final: Path, why: str) -> None:
    aside = final.parent / f".damaged-{final.name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    os.replace(final, aside)
    notice(f"{final.parent.name}/{final.name} cannot be reused ({why}): moved aside to {aside.name}; computing it again")


INPUTS = "inputs.json"


def write_inputs(folder: Path, work_dir: str | Path, paths: list[Path]) -> None:
    """Record in ``folder`` the stage folders it was made from, relative to ``work_dir`` (``sft-pipeline gc`` keeps
    them with it). Paths outside ``work_dir`` (a model cache, a user's model) are not recorded."""
    root = Path(work_dir).resolve()
    rel = {Path(p).resolve().relative_to(root).parts[:2] for p in paths if Path(p).resolve().is_relative_to(root)}
    write_json_atomic(folder / INPUTS, sorted("/".join(r) for r in rel if len(r) == 2))


def stage_dir(work_dir: str | Path, stage: str, key: str) -> Path:
    """Folder for a stage's outputs, named by the hash of its inputs and config."""
    return Path(work_dir) / stage / key
