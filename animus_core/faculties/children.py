"""Child work a focus waits for: :meth:`Focus.run_children
<animus_core.faculties.focus.Focus.run_children>`.

Two durable steps of the focus. ``submit children`` submits the children (the rules applied,
as :meth:`Focus.submit` does) and records their ids, in one transaction
(:meth:`~animus_core.store.children.WorkChildren.submit_children`): an engine that dies
before it commits submitted nothing and the next attempt submits them; once it committed,
every later attempt replays the ids and submits nothing. (Deterministic dedup keys would not
do: a dedup key merges only into *live* work, so children that finished before the retry
would be submitted again; and an item's own dedup key must keep its meaning.)

``wait for children`` suspends the focus (:class:`~animus_core.values.waits.Suspended`, a wait
of kind ``children``) until every child has finished; the database wakes it in the
transaction that finishes the last one (``0020_children.sql``). The attempt that resumes
records how each child ended as the step's result and returns it; a replay returns the
record.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from animus_core.faculties.steps import StepJournal, deadline, timeout_seconds
from animus_core.governance.work import ChildSubmitter
from animus_core.values.children import ChildrenTimedOut, ChildResult
from animus_core.values.errors import InvalidInput, StepOrderChanged
from animus_core.values.waits import Suspended, Wait
from animus_core.values.work import NewWorkItem

if TYPE_CHECKING:
    from animus_core.store.db import Db

__all__ = ["SUBMIT", "WAIT", "run_children"]

#: the names of the two steps of a ``run_children``
SUBMIT = "submit children"
WAIT = "wait for children"


async def run_children(journal: StepJournal, db: Db, submitter: ChildSubmitter,
                       items: Sequence[NewWorkItem],
                       timeout: float | timedelta | None) -> list[ChildResult]:
    """Submit ``items`` as children (once per work item) and wait until all have finished;
    how each ended, in the order given. See the module's documentation."""
    if isinstance(items, NewWorkItem) or not isinstance(items, Sequence):
        raise InvalidInput(f"run_children takes a list of NewWorkItem, got "
                           f"{type(items).__name__}")
    for n, item in enumerate(items):
        if not isinstance(item, NewWorkItem):
            raise InvalidInput(f"run_children: item {n} is a {type(item).__name__}, not a "
                               "NewWorkItem")
    seconds = timeout_seconds(timeout, "run_children")
    if not items:
        return []

    position, known = await journal.begin(SUBMIT)
    if known is not None:
        ids: list[str] = list(known.result["children"])
        if len(ids) != len(items):
            raise StepOrderChanged(
                f"StepOrderChanged: step {position} submitted {len(ids)} children of work "
                f"item {journal.lease.work_id}, this attempt asks for {len(items)}: a focus "
                "must submit the same children on every attempt, so the record cannot be "
                "replayed and retrying cannot help")
    else:
        started_at = datetime.now(UTC)
        submitted = await db.submit_children(journal.lease, position, SUBMIT,
                                             submitter.prepare(items), queue=submitter.queue,
                                             started_at=started_at)
        journal.ran.append((position, SUBMIT))
        ids = [str(r.id) for r in submitted]

    position, known = await journal.begin(WAIT)
    if known is not None:
        return _recorded(known.result)
    ended = await db.children_results(ids)
    if all(r is not None for r in ended):
        done = [r for r in ended if r is not None]
        return _recorded(await journal.record(
            position, WAIT, {"children": [r.to_json() for r in done]},
            started_at=datetime.now(UTC), duration_ms=0))
    kept = journal.kept_at(position, "children")
    if kept is not None:
        # resumed from this wait with children unfinished: its timer ran out
        if kept.ran_out(datetime.now(UTC)):
            unfinished = sum(1 for r in ended if r is None)
            return _recorded(await journal.record(
                position, WAIT, {"timed_out": True, "until": kept.until,
                                 "unfinished": unfinished, "total": len(ids)},
                started_at=datetime.now(UTC), duration_ms=0))
        raise Suspended(kept)  # woken early (a clock behind the database's)
    raise Suspended(Wait.for_children(position, ids, deadline(seconds)))


def _recorded(result: Any) -> list[ChildResult]:
    """What a recorded wait gives the focus: how each child ended, or ChildrenTimedOut."""
    if result.get("timed_out"):
        raise ChildrenTimedOut(result["unfinished"], result["total"], result["until"])
    return [ChildResult.from_json(c) for c in result["children"]]
