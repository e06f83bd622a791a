"""The data plane: :class:`Db`, a pool of connections and the work API (docs/python-api.md).

The store owns every SQL statement animus runs. :class:`Db` is assembled from one class per
concern, each in its own module:

* :mod:`~animus_core.store.base`: the pool, connections, transactions (:class:`TxScope`),
  the LISTEN connection, migrations and queues;
* :mod:`~animus_core.store.read`: reading work items, and the read model of ``animus status``;
* :mod:`~animus_core.store.records`: approvals, history and the audit chain, execution
  records and usage;
* :mod:`~animus_core.store.steps`: durable steps (recording them, reading an item's);
* :mod:`~animus_core.store.moves`: claim, start, leases, and how an attempt ends (with the
  steps it has not recorded yet);
* :mod:`~animus_core.store.waits`: suspending an attempt, signals;
* this module: connecting, and submitting work.

:class:`Db` is the raw store, and ungoverned: it writes what it is given and evaluates no
rule. Policy (rules, gates, the trace context of submissions) lives above it, in
:mod:`animus_core.governance`: submit through :class:`animus_core.governance.work.GovernedWork`
for work to be governed; use the raw store from tools and tests.

Every write to work items is one SQL function call (one round trip): submit, claim and
complete, and the moves of single items (start, fail, release, retry, dead-letter, cancel,
usage totals, a failed or cancelled attempt). The functions run as the schema's owner, so
that no role needs write access to work items, and check the lease and the transition
themselves; the database checks every transition again with a trigger and writes the audit
rows in the same transaction, whoever issued the change (see docs/governance.md, Roles).
"""

from __future__ import annotations

import copy
import os
import socket
import sys
from collections import Counter
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, Self
from uuid import UUID

import asyncpg

from animus_core.infra.config import Settings
from animus_core.infra.telemetry import instruments
from animus_core.infra.witness import AuditKeys
from animus_core.store.base import DEFAULT_QUEUE, Listener
from animus_core.store.base import check_queue as _check_queue
from animus_core.store.base import transition as _transition
from animus_core.store.children import WorkChildren
from animus_core.store.connect import (
    describe_url,
    init_connection,
    keep_session,
    resolve_url,
    submission_json,
)
from animus_core.store.errors import connection_lost, errors
from animus_core.store.moves import DeadLetter, Retry
from animus_core.store.tx import TxScope
from animus_core.store.waits import Signalled
from animus_core.values.errors import DatabaseUnavailable, PermissionDenied
from animus_core.values.work import Created, Merged, NewWorkItem, SubmitResult, WorkItem

__all__ = ["DEFAULT_QUEUE", "Db", "DeadLetter", "Listener", "Retry", "Signalled", "TxScope",
           "connection_lost", "describe_url", "resolve_url"]


class Db(WorkChildren):
    """A pool of connections to one animus database and the operations on its work: the
    raw store. It applies no rule: submit through
    :class:`animus_core.governance.work.GovernedWork` for that.

    Use :meth:`connect`; close with :meth:`close` or ``async with``.
    """

    def __init__(self, pool: asyncpg.Pool, url: str, audit_keys: AuditKeys | None = None) -> None:
        self.pool = pool
        self.url = url
        #: where :meth:`listen` connects: the server itself, where ``url`` may be a pooler in
        #: transaction mode, which cannot keep a LISTEN (ANIMUS_LISTEN_URL)
        self.listen_url = url
        #: the keys this process seals the audit chain with and verifies it by
        #: (:mod:`animus_core.infra.witness`); none: keyless seals, and keyed ones go unchecked
        self.audit_keys = audit_keys if audit_keys is not None else AuditKeys()
        #: how :meth:`connect` made the pool (for :meth:`reserve`); None: made by the caller
        self._pool_options: dict[str, Any] | None = None

    # -- connecting ---------------------------------------------------------------------------

    @classmethod
    async def connect(
        cls,
        url: str | None = None,
        *,
        settings: Settings | None = None,
        min_size: int = 1,
        max_size: int = 10,
        actor: str | None = None,
        timeout: float = 10.0,
        role: str | None = None,
        idle_seconds: float = 300.0,
    ) -> Self:
        """Connect to ``url``, or to ``DATABASE_URL``, or to the embedded server. The audit
        keys come from ``settings``, or from the environment. ``role``: every connection acts
        as this database role (``SET ROLE`` at its start: the database checks what it may do;
        the audit still names the login). A pooled connection idle for ``idle_seconds`` is
        closed (down to ``min_size``)."""
        if url is None:
            settings = settings or Settings.from_env()
            url = await resolve_url(settings)
        keys = settings.audit_keys if settings is not None else AuditKeys.from_env(os.environ)
        actor = actor or f"{os.path.basename(sys.argv[0]) or 'python'}@{socket.gethostname()}:{os.getpid()}"
        options: dict[str, Any] = {
            "init": init_connection, "reset": keep_session, "timeout": timeout,
            "max_inactive_connection_lifetime": idle_seconds,
            "server_settings": {"application_name": "animus", "animus.actor": actor,
                                **({"role": role} if role is not None else {})},
        }
        try:
            pool = await asyncpg.create_pool(url, min_size=min_size, max_size=max_size,
                                             **options)
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError,
                asyncpg.InternalClientError) as e:
            reason = str(e).strip() or type(e).__name__
            if role is not None and isinstance(e, (asyncpg.InvalidParameterValueError,
                                                   asyncpg.InsufficientPrivilegeError)):
                raise PermissionDenied(
                    f"cannot act as the role {role} at {describe_url(url)}: {reason} (`animus "
                    "roles setup` makes the animus roles; `animus roles add-user NAME --role "
                    "ROLE` makes a login that may act as one)") from e
            raise DatabaseUnavailable(
                f"cannot connect to Postgres at {describe_url(url)}: {reason} "
                "(check that the server runs and DATABASE_URL is right, or unset DATABASE_URL "
                "to use the embedded server)"
            ) from e
        db = cls(pool, url, keys)
        db._pool_options = options
        if settings is not None and settings.listen_url is not None:
            db.listen_url = settings.listen_url
        return db

    async def reserve(self, size: int, *, settings: Mapping[str, str] | None = None) -> Self:
        """A store like this one (the same server, role, actor and audit keys) on a pool of
        its own of up to ``size`` connections, opened as they are needed: work on it never
        waits for a connection behind this pool's. An engine runs its own work on one
        (claims, completions, leases, seals), so that foci busy with the database cannot
        hold it up. ``settings`` are Postgres settings of its sessions, beside this store's.
        Close it when done. A store not made by :meth:`connect` has no options to copy: it
        returns itself (the caller must then not close it)."""
        if self._pool_options is None:
            return self
        options = self._pool_options
        if settings:
            options = {**options, "server_settings": {**options["server_settings"], **settings}}
        with errors():
            pool = await asyncpg.create_pool(self.url, min_size=0, max_size=size, **options)
        reserved = copy.copy(self)
        reserved.pool = pool
        return reserved

    # -- submit --------------------------------------------------------------------------------

    async def submit_work(self, item: NewWorkItem, *, queue: str = DEFAULT_QUEUE) -> SubmitResult:
        """Submit one item: :class:`Created` with the item, or :class:`Merged` with the
        canonical id when live work with the same ``(work_type, dedup_key)`` exists."""
        return (await self.submit_many([item], queue=queue))[0]

    async def submit_many(
        self, items: Sequence[NewWorkItem], *, queue: str = DEFAULT_QUEUE
    ) -> list[SubmitResult]:
        """Submit a batch in one round trip and one transaction; results in input order.

        Each item starts as it was built (queued, or :meth:`NewWorkItem.refused` /
        :meth:`NewWorkItem.gated`), with the trace context it carries: no rule applies."""
        if not items:
            return []
        return await self._submit([i.to_json() for i in items], queue)

    async def submit_gated(self, item: NewWorkItem, role: str, quorum: int, rule: str, *,
                           queue: str = DEFAULT_QUEUE) -> SubmitResult:
        """Submit ``item`` to wait for ``quorum`` approvals by ``role``, the gate named
        ``rule``."""
        return await self.submit_work(item.gated(rule=rule, role=role, quorum=quorum,
                                                 reason=rule), queue=queue)

    async def record_skipped(self, item: NewWorkItem, reason: str, *,
                             queue: str = DEFAULT_QUEUE) -> SubmitResult:
        """Record work that will not run (for example a pipeline stage after a failed one)
        as ``dead`` with ``reason``, so that it is visible and audited."""
        return await self.submit_work(item.refused(reason), queue=queue)

    async def submit_from_step(self, item: NewWorkItem, *, from_id: UUID, step: str,
                               queue: str = DEFAULT_QUEUE) -> SubmitResult:
        """Submit ``item``, a rerun or replay of ``from_id`` (its ``replay_of``), with the
        steps ``from_id`` recorded before its step named ``step`` copied into it, in one
        transaction: its first attempt replays them and runs ``step`` and what follows
        afresh. :class:`~animus_core.values.errors.WorkNotFound` when ``from_id`` recorded
        no step of that name (nothing is submitted)."""
        _check_queue(queue)
        async with self.connection() as conn, conn.transaction():
            [result] = await self._submit([item.to_json()], queue, conn=conn)
            if isinstance(result, Created):
                await conn.fetchval("SELECT animus.copy_steps($1, $2, $3)", result.id,
                                    from_id, step)
        return result

    async def _submit(self, payload: list[dict[str, Any]], queue: str,
                      conn: asyncpg.Connection | None = None) -> list[SubmitResult]:
        _check_queue(queue)
        if conn is not None:
            rows = await conn.fetch("SELECT * FROM animus.submit($1, $2)", queue,
                                    submission_json(payload))
        else:
            async with self.connection() as c:  # one statement: atomic on its own
                rows = await c.fetch("SELECT * FROM animus.submit($1, $2)", queue,
                                     submission_json(payload))
        out: list[SubmitResult] = []
        merged = sum(1 for r in rows if r["merged_into"] is not None)
        if merged:
            instruments.merged.add(merged, {"queue": queue})
        if len(rows) > merged:
            instruments.submitted.add(len(rows) - merged, {"queue": queue})
            # queued, or awaiting_approval / dead when a rule said so
            for state, n in Counter(r["state"] for r in rows if r["merged_into"] is None).items():
                _transition("created", state, n)
        for r in rows:
            if r["merged_into"] is not None:
                out.append(Merged(id=r["id"], canonical_id=r["merged_into"]))
            else:
                out.append(Created(item=WorkItem.from_row(r)))
        return out

    async def submit_scheduled(
        self, name: str, tick: datetime, item: NewWorkItem, *, queue: str = DEFAULT_QUEUE
    ) -> SubmitResult | None:
        """Submit ``item`` for one schedule tick, unless any engine already did (``None``)."""
        async with self.connection() as conn, conn.transaction():
            fresh = await conn.fetchval(
                """INSERT INTO animus.schedule_ticks (name, tick) VALUES ($1, $2)
                   ON CONFLICT DO NOTHING RETURNING true""", name, tick)
            if not fresh:
                return None
            row = await conn.fetchrow("SELECT * FROM animus.submit($1, $2)", queue,
                                      submission_json([item.to_json()]))
            await conn.execute(
                "UPDATE animus.schedule_ticks SET work_id = $3 WHERE name = $1 AND tick = $2",
                name, tick, row["id"])
        if row["merged_into"] is not None:
            instruments.merged.add(1, {"queue": queue})
            return Merged(id=row["id"], canonical_id=row["merged_into"])
        instruments.submitted.add(1, {"queue": queue})
        _transition("created", row["state"])
        return Created(item=WorkItem.from_row(row))

    async def replay(self, work_id: UUID | str, *, source: str = "replay") -> SubmitResult:
        """Submit a fresh copy of a dead item (linked by ``replay_of``)."""
        old = await self.get_work_item(work_id)
        return await self.submit_work(old.replayed(source=source), queue=old.queue)
