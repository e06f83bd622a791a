"""Execution records compared: what ``animus work diff`` and ``rerun`` print and the
console's diff page shows. Two items' last records that ran to their end, the fields that
differ (params and outcomes named by key), the verdict, and for each faculty file whose digest
differs, its unified diff when the text of both versions was kept."""

from __future__ import annotations

import difflib
from typing import Any
from uuid import UUID

import msgspec

from animus_core.store.db import Db
from animus_core.values.errors import InvalidInput
from animus_core.values.records import ExecutionRecord, changed_files, diff, verdict
from animus_core.values.work import WorkItem

__all__ = ["Comparison", "compare", "last_record"]


class Comparison(msgspec.Struct, frozen=True, kw_only=True):
    a: WorkItem
    b: WorkItem
    record_a: ExecutionRecord
    record_b: ExecutionRecord
    #: field -> (value in a, value in b), for every field that differs
    differences: dict[str, tuple[Any, Any]]
    verdict: str
    #: field -> the unified diff of a faculty file that differs (None: the text of one
    #: version was not kept: too big, not UTF-8, or run before animus kept faculty files)
    files: dict[str, str | None]


async def last_record(db: Db, work_id: UUID | str) -> ExecutionRecord:
    """The record of the item's last attempt that ran to its end: nothing is known of what a
    lost attempt was bound to."""
    records = await db.executions(work_id)
    if not records:
        item = await db.get_work_item(work_id)
        raise InvalidInput(f"work item {item.id} ({item.state}) has no execution record yet: "
                           "it has not run")
    ended = [r for r in records if r.result != "lost"]
    if not ended:
        raise InvalidInput(
            f"work item {work_id}: every attempt was lost with its engine ({len(records)}), "
            "so what they were bound to is not known: nothing to compare (see animus work "
            "explain)")
    return ended[-1]


async def compare(db: Db, a: UUID | str, b: UUID | str) -> Comparison:
    """Item ``a`` against item ``b``, each by its last record that ran to its end."""
    item_a, item_b = await db.get_work_item(a), await db.get_work_item(b)
    ra, rb = await last_record(db, item_a.id), await last_record(db, item_b.id)
    differences = diff(ra, rb, params_a=item_a.params, params_b=item_b.params,
                       outcome_a=item_a.outcome.data, outcome_b=item_b.outcome.data)
    return Comparison(a=item_a, b=item_b, record_a=ra, record_b=rb, differences=differences,
                      verdict=verdict(differences),
                      files=await _file_diffs(db, ra, rb, differences))


async def _file_diffs(db: Db, ra: ExecutionRecord, rb: ExecutionRecord,
                      differences: dict[str, tuple[Any, Any]]) -> dict[str, str | None]:
    changed = changed_files(ra, rb, differences)
    if not changed:
        return {}
    texts = await db.faculty_files([d for *_, da, dbb in changed for d in (da, dbb)])
    out: dict[str, str | None] = {}
    for field, path_a, path_b, da, dbb in changed:
        if da not in texts or dbb not in texts:
            out[field] = None
            continue
        lines = difflib.unified_diff(
            texts[da].splitlines(keepends=True), texts[dbb].splitlines(keepends=True),
            fromfile=f"a/{path_a.lstrip('/')}", tofile=f"b/{path_b.lstrip('/')}")
        # as git prints a last line without its newline
        out[field] = "".join(line if line.endswith("\n") else f"{line}\n\\ No newline at end "
                             "of file\n" for line in lines)
    return out
