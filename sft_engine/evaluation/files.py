"""What every suite read from a team's own file shares (``evaluate.suites``): its settings' common fields, reading its
items with errors that name the suite, the file and the item, and the files' identity for the cache keys."""

from __future__ import annotations

import glob
from pathlib import Path
from typing import Any, ClassVar

from pydantic import Field

from sft_engine.evaluation.suite import Suite, SuiteError
from sft_engine.fields import Strict, keyed, unkeyed

SUITE_NAME = r"^[a-z][a-z0-9_]*$"


class FileSuiteSettings(Strict):
    """The fields every custom suite has."""

    name: str = Field(json_schema_extra=keyed("evaluate.suite", "evaluate"), pattern=SUITE_NAME,
                      description="The suite's name: its metrics are <name>.<metric> (lowercase letters, digits, _).")
    path: str = Field(json_schema_extra=unkeyed("its files' contents, not the path, enter the suite's key (FileSuite.identity)"),
                      description="A JSONL, JSON or Parquet file (or glob) with one item per row.")
    id_field: str = Field(json_schema_extra=keyed("evaluate.suite", "evaluate"), default="id",
                          description="Field holding an item's id (items without it are numbered from 0).")
    limit: int | None = Field(json_schema_extra=keyed("evaluate.suite", "evaluate"), default=None, ge=1,
                              description="First N items (None = all).")
    decontaminate: bool = Field(
        json_schema_extra=unkeyed("read by curation: the suite is added to curate.decontaminate.eval_sets, whose key hashes it"),
        default=True, description="Drop training conversations that overlap an item (reason decontam_<name>).",
    )


class FileSuite(Suite):
    """A suite whose items come from ``settings.path``; items are read once and checked before any model loads."""

    settings: FileSuiteSettings
    # The settings that decide the texts decontamination checks (not how items are scored, nor ``limit``: every item
    # is checked): curation's key hashes only these, so changing a suite's metric does not curate again.
    TEXT_FIELDS: ClassVar[tuple[str, ...]] = ("name", "kind", "path", "id_field")

    def __init__(self, name: str, settings: FileSuiteSettings) -> None:
        super().__init__(name, settings)
        self._items: list[dict[str, Any]] | None = None

    def decontam_view(self) -> dict[str, Any]:
        """What ``curate.decontaminate.eval_sets`` keeps of the suite (``registry.suite_from_view`` rebuilds it)."""
        return self.settings.model_dump(mode="json", include=set(self.TEXT_FIELDS))

    def fail(self, why: str, item: int | None = None) -> SuiteError:
        """An error naming the suite, its file and (when given) the item's row number."""
        where = f"evaluate.suites '{self.name}' ({self.settings.path}" + (f", item {item}" if item is not None else "") + ")"
        return SuiteError(f"{where}: {why}")

    def raw_items(self) -> list[dict[str, Any]]:
        """Every row of the file (up to ``limit``) as a dict with an ``_id``."""
        if self._items is None:
            from sft_engine.curation.read import SourceError, read_objects

            try:
                rows = read_objects(self.settings.path, f"evaluate.suites '{self.name}'")
            except SourceError as exc:
                raise SuiteError(str(exc)) from None
            if not rows:
                raise self.fail("the file holds no items")
            items = []
            for i, row in enumerate(rows[: self.settings.limit]):
                if not isinstance(row, dict):
                    raise self.fail(f"a row is {type(row).__name__}, expected an object", i)
                items.append({**row, "_id": str(row.get(self.settings.id_field, i))})
            self._items = items
        return self._items

    def field(self, item: dict[str, Any], i: int, name: str) -> Any:
        """``item[name]``, or an error naming the key to set when it is missing."""
        if item.get(name) is None:
            keys = ", ".join(sorted(k for k in item if k != "_id"))
            raise self.fail(f"no field '{name}' (the item has: {keys}); map it with the suite's *_field settings", i)
        return item[name]

    def identity(self, heldout: Path) -> Any:
        from sft_engine.io import digest_path

        return [[p, digest_path(Path(p))] for p in sorted(glob.glob(self.settings.path))]
