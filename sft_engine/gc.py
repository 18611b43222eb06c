"""What a shared ``work_dir`` holds and what may go: the plan behind ``sft-pipeline gc``.

A stage folder is kept when something refers to it: a registered model version or one of the last runs (the
``output_dir`` tags of their stage runs, gathered by the caller from MLflow), the config given (the folders a
rerun of it would reuse), or a kept folder that was made from it (its ``inputs.json``). A folder whose key lock
is held (a stage is building it right now) is never touched, and neither is anything newer than ``older_than``.
Leftovers are listed too: temporary folders whose owner is gone (their lock is free) and damaged folders that
reuse moved aside. Nothing here deletes; ``remove`` does, for the rows the plan marks.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from sft_engine.io import INPUTS, SUCCESS, folder_bytes, lock_held


@dataclass
class Entry:
    """One folder of the work_dir: ``stage/name`` relative to it, its size, age and why it stays (empty: it may go)."""

    rel: str
    kind: str  # stage | temporary | damaged | checkpoints
    bytes: int
    age_days: float
    kept_by: list[str] = field(default_factory=list)

    @property
    def remove(self) -> bool:
        return not self.kept_by


def _key_of_tmp(name: str) -> str:
    """``.tmp-<key>-<8 hex>`` -> ``<key>``."""
    return name[len(".tmp-"):].rsplit("-", 1)[0]


def scan(work_dir: Path) -> list[Entry]:
    """Every stage folder (one with a completion marker), leftover and checkpoint folder under ``work_dir``."""
    now = time.time()
    entries = []
    for stage in sorted(p for p in work_dir.iterdir() if p.is_dir() and not p.name.startswith(".")) if work_dir.is_dir() else []:
        for folder in sorted(p for p in stage.iterdir() if p.is_dir()):
            rel = f"{stage.name}/{folder.name}"
            if folder.name.startswith(".tmp-"):
                kind = "temporary"
            elif folder.name.startswith(".damaged-"):
                kind = "damaged"
            elif stage.name == "checkpoints":
                kind = "checkpoints"
            elif (folder / SUCCESS).is_file():
                kind = "stage"
            else:
                continue  # not ours (logs, an MLflow artifact root): never touched
            age = (now - folder.stat().st_mtime) / 86400
            entries.append(Entry(rel, kind, folder_bytes(folder), age))
    return entries


def _inputs(work_dir: Path, rel: str) -> list[str]:
    try:
        return list(json.loads((work_dir / rel / INPUTS).read_text()))
    except (OSError, ValueError):
        return []


def plan(work_dir: Path, refs: dict[str, list[str]], older_than_days: float | None = None) -> list[Entry]:
    """Mark each folder with what keeps it. ``refs`` maps a reason (``registered sft-demo v1``, ``run <id>``,
    ``the config``) to the folders (absolute or ``stage/name``) it names; a folder inside a stage folder counts
    as that stage folder."""
    entries = scan(work_dir)
    by_rel = {e.rel: e for e in entries}
    root = work_dir.resolve()

    def rel_of(path: str) -> str | None:
        p = Path(path)
        if p.is_absolute():
            p = p.resolve()
            if not p.is_relative_to(root):
                return None
            p = p.relative_to(root)
        return "/".join(p.parts[:2]) if len(p.parts) >= 2 else None

    for why, paths in refs.items():
        todo = [r for r in (rel_of(p) for p in paths) if r]
        seen: set[str] = set()
        while todo:
            rel = todo.pop()
            if rel in seen or rel not in by_rel:
                continue
            seen.add(rel)
            by_rel[rel].kept_by.append(why)
            todo += _inputs(work_dir, rel)  # what it was made from stays with it
    for e in entries:
        stage, name = e.rel.split("/", 1)
        if e.kind == "temporary":
            key = _key_of_tmp(name)
            if lock_held(work_dir / stage / key):
                e.kept_by.append("being written by a running stage")
            continue
        if e.kind == "checkpoints":
            train = by_rel.get(f"train/{name}")
            if lock_held(work_dir / "train" / name):
                e.kept_by.append("its training is running")
            elif train is not None and train.kept_by:
                e.kept_by.append(f"train/{name} is kept")
            continue
        if e.kind == "stage" and lock_held(work_dir / e.rel):
            e.kept_by.append("locked by a running stage")
        if older_than_days is not None and e.age_days < older_than_days and e.kind != "damaged":
            e.kept_by.append(f"newer than {older_than_days:g} days")
    return entries


def remove(work_dir: Path, entries: list[Entry]) -> int:
    """Delete the folders the plan lets go (checking each lock again just before); returns the bytes freed.

    Lock files stay (a few bytes each): unlinking one while a run has it open would let two runs hold the key."""
    freed = 0
    for e in entries:
        if not e.remove:
            continue
        folder = work_dir / e.rel
        if e.kind == "stage" and lock_held(folder):
            continue  # a run started building it since the plan was made
        shutil.rmtree(folder, ignore_errors=True)
        freed += e.bytes
    return freed
