"""The data plane: a connection pool and the work API (docs/python-api.md).

:class:`Db` is the raw store, and ungoverned: it writes what it is given and evaluates no
rule. Policy (rules, gates, the trace context of submissions) lives above it, in
:mod:`animus_core.governance`: submit through :class:`animus_core.governance.work.GovernedWork`
for work to be governed; use the raw store from tools and tests.

Every write to work items is one SQL function call (one round trip): submit, claim and
complete, and the moves of single items (start, fail, release, retry, dead-letter, cancel,
usage totals). The functions run as the schema's owner, so that no role needs write access
to work items, and check the lease and the transition themselves; the database checks every
transition again with a trigger and writes the audit rows in the same transaction, whoever
issued the change (see docs/governance.md, Roles).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import socket
import sys
from collections import Counter
from collections.abc import AsyncIterator, Iterable, Sequence
from datetime import datetime
from typing import Any, Self
from urllib.parse import parse_qs, urlsplit, urlunsplit
from uuid import UUID

import asyncpg
import msgspec
from pgvector.asyncpg import register_vector

from animus_core.infra.config import Settings
from animus_core.infra.embedded import EMBEDDED_DATABASE, embedded_url
from animus_core.infra.telemetry import instruments
from animus_core.infra.witness import AuditKeys, Checkpoint
from animus_core.store import audit, migrations
from animus_core.values import json_values
from animus_core.values.errors import (
    AnimusError,
    DatabaseError,
    DatabaseUnavailable,
    IllegalTransition,
    InvalidInput,
    LeaseLost,
    PermissionDenied,
    WorkNotFound,
)
from animus_core.values.limits import check_text, limits
from animus_core.values.records import ExecutionRecord
from animus_core.values.states import State
from animus_core.values.work import (
    Claimed,
    Created,
    Lease,
    Merged,
    NewWorkItem,
    SubmitResult,
    WorkItem,
    as_uuid,
    dump_json,
)

__all__ = ["DEFAULT_QUEUE", "Db", "connection_lost", "describe_url", "resolve_url"]

DEFAULT_QUEUE = "work"
_DUPLICATE_DATABASE = "42P04"


def describe_url(url: str) -> str:
    """The URL without its password, for messages."""
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)[-1]
    user = parts.username
    host = parse_qs(parts.query).get("host", [""])[0]
    where = f"{user + '@' if user else ''}{netloc or host}{parts.path}"
    return where


async def resolve_url(settings: Settings) -> str:
    """``DATABASE_URL``, or the embedded server's URL with its ``animus`` database created."""
    if settings.database_url:
        return settings.database_url
    base = await asyncio.to_thread(embedded_url, settings.home)
    parts = urlsplit(base)
    url = urlunsplit(parts._replace(path=f"/{EMBEDDED_DATABASE}"))
    try:
        conn = await asyncpg.connect(base)
    except (OSError, asyncpg.PostgresError) as e:
        raise DatabaseUnavailable(f"embedded Postgres started but refused a connection: {e}") from e
    try:
        await conn.execute(f'CREATE DATABASE "{EMBEDDED_DATABASE}"')
    except asyncpg.PostgresError as e:
        if e.sqlstate != _DUPLICATE_DATABASE:
            raise
    finally:
        await conn.close()
    return url


def _jsonb_decode(text: str) -> Any:
    return json_values.read_stored(text)  # a value written around animus must not crash a read


def _jsonb_encode(value: Any) -> str:
    return dump_json(value, "value")


async def _init_connection(conn: asyncpg.Connection) -> None:
    await conn.set_type_codec(
        "jsonb", schema="pg_catalog", encoder=_jsonb_encode, decoder=_jsonb_decode, format="text"
    )
    with contextlib.suppress(ValueError):  # pgvector not installed yet (before migrate)
        await register_vector(conn)


_BAD_ARGUMENT = re.compile(r"invalid input for query argument (\$\d+):.*?(?:\((.*)\))?$", re.DOTALL)
_NO_QUEUE = re.compile(r'^(?:queue "([^"]*)"|relation "pgmq\.q_([^"]*)") does not exist')


async def _keep_session(conn: asyncpg.Connection) -> None:
    """On release asyncpg still rolls back an unfinished transaction; this skips its extra
    RESET ALL / UNLISTEN / CLOSE ALL round trip. animus keeps no session state on pool
    connections (SET LOCAL and transaction-scoped advisory locks only), and code using
    :meth:`Db.connection` should do the same."""


# SQLSTATEs that mean the connection or the server went away, not that the operation was
# refused: connection exceptions (08), administrator/crash shutdown and start-up (57P01-03),
# too many connections (53300). Whoever retries on DatabaseUnavailable retries these.
_GONE = ("57P01", "57P02", "57P03", "53300")


def _translate(e: asyncpg.PostgresError) -> Exception:
    """Our SQL raises with SQLSTATEs ANI01 (transition), ANI02 (lease), ANI04 (not found)."""
    msg = getattr(e, "message", None) or str(e)
    if connection_lost(e):
        return DatabaseUnavailable(f"lost the database connection: {msg}")
    bad_argument = _BAD_ARGUMENT.match(msg)
    if bad_argument:  # asyncpg's message repeats the value, which may be a secret
        return InvalidInput(f"a value could not be sent to the database (argument "
                            f"{bad_argument[1]}): {bad_argument[2] or 'it has the wrong type'}")
    no_queue = _NO_QUEUE.match(msg) if e.sqlstate in ("ANI04", "42P01") else None
    if no_queue:  # from animus.submit, or a pgmq table that is not there
        return InvalidInput(
            f'queue "{no_queue[1] or no_queue[2]}" does not exist: create it with '
            "Db.create_queue (animus db migrate creates the default queue)"
        )
    if e.sqlstate == "23503" and getattr(e, "constraint_name", "") == "work_items_parent_id_fkey":
        return WorkNotFound(f"the parent work item does not exist: {getattr(e, 'detail', msg)}")
    match e.sqlstate:
        case "ANI01":
            return IllegalTransition(msg)
        case "ANI02":
            return LeaseLost(msg)
        case "ANI04":
            return WorkNotFound(msg)
        case "ANI03" | "42501":
            return PermissionDenied(f"refused: {msg}")
    return DatabaseError(f"the database refused the operation: {msg}")


@contextlib.contextmanager
def _errors() -> Any:
    try:
        yield
    except asyncpg.PostgresError as e:
        if isinstance(e.__cause__, AnimusError):  # one of our codecs refused an argument
            raise e.__cause__ from None
        raise _translate(e) from e
    except (OSError, TimeoutError, asyncpg.InterfaceError, asyncpg.InternalClientError) as e:
        if connection_lost(e):
            raise DatabaseUnavailable(f"lost the database connection: {e}") from e
        raise DatabaseError(f"the database client refused the operation: {e}") from e


def connection_lost(e: BaseException) -> bool:
    """Whether ``e`` leaves the connection it happened on unusable: closed, timed out, or in
    a protocol state asyncpg cannot leave (``cannot switch to state ...``, after a backend
    was terminated in the middle of an operation)."""
    if isinstance(e, asyncpg.PostgresError):
        return (e.sqlstate in _GONE or (e.sqlstate or "").startswith("08")
                or "not currently accepting connections" in str(e))  # ALLOW_CONNECTIONS false
    return (isinstance(e, OSError | TimeoutError | asyncpg.ConnectionDoesNotExistError
                       | asyncpg.InternalClientError)
            or (isinstance(e, asyncpg.InterfaceError) and "closed" in str(e)))


class Db:
    """A pool of connections to one animus database and the operations on its work: the
    raw store. It applies no rule: submit through
    :class:`animus_core.governance.work.GovernedWork` for that.

    Use :meth:`connect`; close with :meth:`close` or ``async with``.
    """

    def __init__(self, pool: asyncpg.Pool, url: str, audit_keys: AuditKeys | None = None) -> None:
        self.pool = pool
        self.url = url
        #: the keys this process seals the audit chain with and verifies it by
        #: (:mod:`animus_core.infra.witness`); none: keyless seals, and keyed ones go unchecked
        self.audit_keys = audit_keys if audit_keys is not None else AuditKeys()

    # -- lifecycle ---------------------------------------------------------------------------

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
    ) -> Self:
        """Connect to ``url``, or to ``DATABASE_URL``, or to the embedded server. The audit
        keys come from ``settings``, or from the environment."""
        if url is None:
            settings = settings or Settings.from_env()
            url = await resolve_url(settings)
        keys = settings.audit_keys if settings is not None else AuditKeys.from_env(os.environ)
        actor = actor or f"{os.path.basename(sys.argv[0]) or 'python'}@{socket.gethostname()}:{os.getpid()}"
        try:
            pool = await asyncpg.create_pool(
                url,
                min_size=min_size,
                max_size=max_size,
                init=_init_connection,
                reset=_keep_session,
                timeout=timeout,
                server_settings={"application_name": "animus", "animus.actor": actor},
            )
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError,
                asyncpg.InternalClientError) as e:
            reason = str(e).strip() or type(e).__name__
            raise DatabaseUnavailable(
                f"cannot connect to Postgres at {describe_url(url)}: {reason} "
                "(check that the server runs and DATABASE_URL is right, or unset DATABASE_URL "
                "to use the embedded server)"
            ) from e
        return cls(pool, url, keys)

    async def close(self) -> None:
        await self.pool.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[asyncpg.Connection]:
        """A pooled connection; one left broken by an error is closed, not pooled again."""
        with _errors():
            async with self.pool.acquire() as conn:
                try:
                    yield conn
                except BaseException as e:
                    # cancelled in the middle of a query, the connection may still be busy
                    if connection_lost(e) or isinstance(e, asyncio.CancelledError):
                        with contextlib.suppress(asyncpg.InterfaceError):  # already released
                            conn.terminate()
                    raise

    # -- schema --------------------------------------------------------------------------------

    async def migrate(self) -> list[migrations.Migration]:
        """Apply pending migrations and create the default queue."""
        async with self.connection() as conn:
            done = await migrations.apply(conn)
        await self.create_queue(DEFAULT_QUEUE)
        return done

    async def migration_status(self) -> migrations.MigrationStatus:
        async with self.connection() as conn:
            return await migrations.status(conn)

    async def create_queue(self, name: str) -> None:
        """Create a pgmq queue (idempotent)."""
        _check_queue(name)
        async with self.connection() as conn:
            await conn.execute("SELECT animus.create_queue($1)", name)

    async def queues(self) -> list[str]:
        async with self.connection() as conn:
            rows = await conn.fetch("SELECT queue_name FROM pgmq.meta ORDER BY queue_name")
        return [r[0] for r in rows]

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

    async def _submit(self, payload: list[dict[str, Any]], queue: str) -> list[SubmitResult]:
        _check_queue(queue)
        async with self.connection() as conn:  # one statement: atomic on its own
            rows = await conn.fetch("SELECT * FROM animus.submit($1, $2)", queue, payload)
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
                                      [item.to_json()])
            await conn.execute(
                "UPDATE animus.schedule_ticks SET work_id = $3 WHERE name = $1 AND tick = $2",
                name, tick, row["id"])
        if row["merged_into"] is not None:
            instruments.merged.add(1, {"queue": queue})
            return Merged(id=row["id"], canonical_id=row["merged_into"])
        instruments.submitted.add(1, {"queue": queue})
        _transition("created", row["state"])
        return Created(item=WorkItem.from_row(row))

    # -- read ----------------------------------------------------------------------------------

    async def get_work_item(self, work_id: UUID | str) -> WorkItem:
        wid = _uuid(work_id)
        async with self.connection() as conn:
            row = await conn.fetchrow("SELECT * FROM animus.work_items WHERE id = $1", wid)
        if row is None:
            raise WorkNotFound(f"no work item with id {wid}")
        return WorkItem.from_row(row)

    async def list_work(
        self,
        *,
        state: State | str | Iterable[State | str] | None = None,
        work_type: str | None = None,
        parent_id: UUID | str | None = None,
        created_since: datetime | None = None,
        limit: int = 100,
        before: UUID | str | None = None,
    ) -> list[WorkItem]:
        """Newest first. Page with ``before=<id of the last item of the previous page>``."""
        states: list[str] | None = None
        if state is not None:
            raw = [state] if isinstance(state, str) else list(state)
            try:
                states = [State(s).value for s in raw]
            except ValueError:
                raise InvalidInput(
                    f"unknown state in {raw!r}: states are {', '.join(s.value for s in State)}"
                ) from None
        if not 1 <= limit <= 10_000:
            raise InvalidInput(f"limit must be from 1 to 10000, got {limit}")
        cursor = None
        if before is not None:
            cursor_item = await self.get_work_item(before)
            cursor = (cursor_item.created_at, cursor_item.id)
        async with self.connection() as conn:
            rows = await conn.fetch(
                """SELECT * FROM animus.work_items
                    WHERE ($1::animus.work_state[] IS NULL OR state = ANY ($1))
                      AND ($2::text IS NULL OR work_type = $2)
                      AND ($3::uuid IS NULL OR parent_id = $3)
                      AND ($4::timestamptz IS NULL OR created_at >= $4)
                      AND ($5::timestamptz IS NULL OR (created_at, id) < ($5, $6::uuid))
                    ORDER BY created_at DESC, id DESC LIMIT $7""",
                states, work_type, _uuid(parent_id) if parent_id else None, created_since,
                cursor[0] if cursor else None, cursor[1] if cursor else None, limit,
            )
        return [WorkItem.from_row(r) for r in rows]

    async def decide(self, work_id: UUID | str, decision: str, reason: str) -> WorkItem:
        """Approve or reject an item awaiting approval, as the connected database user.
        The database checks the role the rule asked for, refuses the requester, and moves
        the item to queued once the quorum is reached (or to dead on a rejection)."""
        wid = _uuid(work_id)
        _check_reason(reason)
        async with self.connection() as conn:
            row = await conn.fetchrow("SELECT * FROM animus.decide($1, $2, $3)",
                                      wid, decision, reason)
        return WorkItem.from_row(row)

    async def approvals(self, work_id: UUID | str) -> list[dict[str, Any]]:
        async with self.connection() as conn:
            rows = await conn.fetch(
                "SELECT approver, decision, reason, at FROM animus.approvals WHERE work_id = $1 "
                "ORDER BY id", _uuid(work_id))
        return [dict(r) for r in rows]

    async def approvers(self, work_id: UUID | str, role: str) -> list[str]:
        """Who approved the item while holding ``animus_<role>`` (or as a superuser)."""
        async with self.connection() as conn:
            rows = await conn.fetch(
                """SELECT DISTINCT a.approver FROM animus.approvals a
                     LEFT JOIN pg_roles r ON r.rolname = a.approver
                    WHERE a.work_id = $1 AND a.decision = 'approve'
                      AND (r.rolsuper OR CASE WHEN EXISTS (
                               SELECT 1 FROM pg_roles WHERE rolname = 'animus_' || $2)
                           THEN pg_has_role(r.oid, 'animus_' || $2, 'MEMBER')
                           ELSE false END)""", _uuid(work_id), role)
        return [r[0] for r in rows]

    async def history(self, work_id: UUID | str) -> list[audit.AuditEvent]:
        """Every audit event of one item, oldest first."""
        wid = _uuid(work_id)
        async with self.connection() as conn:
            rows = await conn.fetch(
                """SELECT a.*, s.seq IS NOT NULL AS sealed FROM animus.audit_log a
                     LEFT JOIN animus.audit_seal s ON s.audit_id = a.id
                    WHERE a.work_id = $1 ORDER BY a.id""",
                wid,
            )
        if not rows:
            await self.get_work_item(wid)  # raises WorkNotFound
        return [audit.AuditEvent.from_row(r) for r in rows]

    # -- claim and finish ------------------------------------------------------------------------

    async def claim(
        self,
        queue: str = DEFAULT_QUEUE,
        *,
        limit: int = 1,
        lease_seconds: int = 30,
        work_types: Sequence[str] | None = None,
        start: bool = False,
    ) -> list[Claimed]:
        """Claim up to ``limit`` visible items, highest priority first.

        The lease is the pgmq visibility timeout: unless extended, the item is claimable again
        after ``lease_seconds``. With ``start=True`` the items also move to ``running`` (one
        attempt each) in the same UPDATE, audited as both steps.
        """
        if limit < 1 or lease_seconds < 1:
            raise InvalidInput("claim needs limit >= 1 and lease_seconds >= 1")
        async with self.connection() as conn:  # one statement: atomic without BEGIN/COMMIT
            rows = await conn.fetch(
                "SELECT * FROM animus.claim($1, $2, $3, $4, $5)",
                queue, limit, lease_seconds, list(work_types) if work_types else None, start,
            )
        # items taken back from expired leases come after the rest: one order for all
        rows.sort(key=lambda r: (-r["priority"], r["msg_id"]))
        if rows:
            _transition("queued", "claimed", len(rows))
            if start:
                _transition("claimed", "running", len(rows))
        return [
            Claimed(
                item=WorkItem.from_row(r),
                lease=Lease(work_id=r["id"], queue=r["queue"], msg_id=r["msg_id"], token=r["lease"]),
            )
            for r in rows
        ]

    async def start(self, lease: Lease) -> WorkItem:
        """``claimed -> running``: the focus begins; counts one attempt."""
        async with self.connection() as conn:
            row = await conn.fetchrow("SELECT * FROM animus.start($1, $2, $3)",
                                      lease.work_id, lease.msg_id, lease.token)
        _transition("claimed", "running")
        return WorkItem.from_row(row)

    async def extend_lease(self, leases: Sequence[Lease], seconds: int) -> list[Lease]:
        """Push the visibility timeout of held items ``seconds`` from now. Returns the leases
        that are lost (not extended): the item was claimed again after the lease ran out, or
        its attempt was taken back as lost."""
        if not leases:
            return []
        lost: list[Lease] = []
        async with self.connection() as conn:
            for queue in {lease.queue for lease in leases}:
                mine = [le for le in leases if le.queue == queue]
                rows = await conn.fetch(
                    "SELECT * FROM animus.extend_leases($1, $2, $3, $4, $5)",
                    queue, [le.work_id for le in mine], [le.msg_id for le in mine],
                    [le.token for le in mine], seconds,
                )
                gone = {r[0] for r in rows}
                lost += [le for le in mine if le.work_id in gone]
        return lost

    async def complete(
        self, lease: Lease, data: Any = None, *, duration_ms: int | None = None
    ) -> None:
        """``running -> completed`` with the outcome; the message is archived."""
        await self.complete_many([(lease, data, duration_ms)])

    async def complete_many(self, done: Sequence[tuple[Lease, Any, int | None]],
                            *, conn: asyncpg.Connection | None = None,
                            executions: Sequence[ExecutionRecord] = ()) -> None:
        """Complete a batch in one round trip. Raises :class:`LeaseLost` or
        :class:`IllegalTransition` (and completes none) if any lease is not held.

        With ``conn``, the completion joins that connection's open transaction."""
        if not done:
            return
        # The outcomes go as JSON text: in a jsonb[] argument asyncpg would take a list
        # outcome for a nested array dimension (and keep only its first element).
        limit = limits().outcome_bytes
        data = [None if d[1] is None else json_values.encode(
                    d[1], "outcome", limit=limit, setting="ANIMUS_MAX_OUTCOME_BYTES")
                for d in done]
        args = ([d[0].work_id for d in done], [d[0].msg_id for d in done],
                [d[0].token for d in done], data, [d[2] for d in done])
        sql = "SELECT animus.complete($1, $2, $3, $4::text[]::jsonb[], $5)"
        if conn is not None:
            with _errors():
                await conn.execute(sql, *args)
                await _copy_executions(conn, executions)
        else:
            async with self.connection() as c:
                if not executions:  # one statement: atomic without BEGIN/COMMIT round trips
                    await c.execute(sql, *args)
                else:
                    async with c.transaction():
                        await c.execute(sql, *args)
                        await _copy_executions(c, executions)
        _transition("running", "completed", len(done))  # counted once it is done

    async def record_executions(self, executions: Sequence[ExecutionRecord]) -> None:
        """Append execution records (see :mod:`animus_core.values.records`)."""
        async with self.connection() as conn:
            await _copy_executions(conn, executions)

    async def record_usage(self, work_id: UUID, usage: dict[str, Any], *,
                           conn: asyncpg.Connection | None = None) -> None:
        """Add one attempt's model usage (``{"models": {model: tokens}, "cost_usd": x}``) to
        the item's totals, failed attempts included."""
        sql = "SELECT animus.add_usage($1, $2)"
        if conn is not None:
            with _errors():
                await conn.execute(sql, work_id, usage)
            return
        async with self.connection() as c:
            await c.execute(sql, work_id, usage)

    async def record_environment(self, env_hash: str, environment: dict[str, Any]) -> None:
        async with self.connection() as conn:
            await conn.execute(
                """INSERT INTO animus.environments (hash, environment) VALUES ($1, $2)
                   ON CONFLICT (hash) DO NOTHING""", env_hash, environment)

    async def executions(self, work_id: UUID | str) -> list[ExecutionRecord]:
        """Every execution record of an item, oldest first, with its environment."""
        wid = _uuid(work_id)
        async with self.connection() as conn:
            rows = await conn.fetch(
                """SELECT r.*, e.environment FROM animus.execution_records r
                     LEFT JOIN animus.environments e ON e.hash = r.environment_hash
                    WHERE r.work_id = $1 ORDER BY r.id""", wid)
        return [ExecutionRecord.from_row(r) for r in rows]

    async def fail(self, lease: Lease, error: str, *, duration_ms: int | None = None,
                   execution: ExecutionRecord | None = None) -> WorkItem:
        """``running -> failed`` with the reason. Follow with :meth:`retry` or :meth:`dead_letter`.

        ``execution``, the attempt's record, is appended in the same transaction: only while
        the lease is held, so that an attempt taken back as lost keeps its one record."""
        _check_reason(error)
        async with self.connection() as conn, conn.transaction():
            row = await conn.fetchrow("SELECT * FROM animus.fail($1, $2, $3, $4, $5)",
                                      lease.work_id, lease.msg_id, lease.token, error,
                                      duration_ms)
            if execution is not None:
                await _copy_executions(conn, [execution])
        _transition("running", "failed")
        return WorkItem.from_row(row)

    async def release(self, lease: Lease, reason: str) -> WorkItem:
        """``claimed|running -> queued`` without counting a failure (shutdown, could not start).

        An attempt already counted by :meth:`start` is given back."""
        _check_reason(reason)
        async with self.connection() as conn:
            row = await conn.fetchrow(
                "SELECT r.was, (r.item).* FROM animus.release($1, $2, $3, $4) r",
                lease.work_id, lease.msg_id, lease.token, reason)
        _transition(row["was"], "queued")
        return WorkItem.from_row(row)

    async def retry(
        self, work_id: UUID | str, *, delay: float = 0.0, reason: str | None = None
    ) -> WorkItem:
        """``failed -> queued``, visible again after ``delay`` seconds."""
        wid = _uuid(work_id)
        if not 0 <= delay <= 7 * 86_400:  # also refuses NaN
            raise InvalidInput(f"retry delay must be from 0 to 604800 seconds, got {delay}")
        if reason is not None:
            _check_reason(reason)
        async with self.connection() as conn:
            updated = await conn.fetchrow("SELECT * FROM animus.retry($1, $2, $3)",
                                          wid, float(delay), reason)
        _transition("failed", "queued")
        return WorkItem.from_row(updated)

    async def dead_letter(self, work_id: UUID | str, reason: str) -> WorkItem:
        """End an item as ``dead`` with a reason (from queued, failed, or running via failed).
        An item awaiting approval is refused: a decision ends it (:meth:`decide`)."""
        wid = _uuid(work_id)
        _check_reason(reason)
        async with self.connection() as conn:
            row = await conn.fetchrow(
                "SELECT r.was, (r.item).* FROM animus.dead_letter($1, $2) r", wid, reason)
        _transition(row["was"], "dead")
        return WorkItem.from_row(row)

    async def cancel(self, work_id: UUID | str, reason: str = "cancelled") -> WorkItem:
        """``queued -> cancelled``. A claimed or running item cannot go to ``cancelled``
        (docs/concepts.md, States and transitions): the request is recorded and audited, and
        the engine running it stops the focus and ends the item ``dead`` with ``reason``."""
        wid = _uuid(work_id)
        _check_reason(reason)
        async with self.connection() as conn:
            row = await conn.fetchrow("SELECT * FROM animus.cancel($1, $2)", wid, reason)
        item = WorkItem.from_row(row)
        if item.state == State.CANCELLED:  # otherwise it was a request
            _transition("queued", "cancelled")
        return item

    async def cancel_requests(self, work_ids: Sequence[UUID]) -> list[UUID]:
        """Which of these items someone asked to cancel while they run."""
        async with self.connection() as conn:
            rows = await conn.fetch(
                """SELECT id FROM animus.work_items WHERE id = ANY($1::uuid[])
                      AND cancel_requested IS NOT NULL AND state IN ('claimed', 'running')""",
                list(work_ids))
        return [r[0] for r in rows]

    async def replay(self, work_id: UUID | str, *, source: str = "replay") -> SubmitResult:
        """Submit a fresh copy of a dead item (linked by ``replay_of``)."""
        old = await self.get_work_item(work_id)
        return await self.submit_work(old.replayed(source=source), queue=old.queue)

    # -- audit ---------------------------------------------------------------------------------

    async def seal_audit(self) -> int:
        """Chain every committed, unsealed audit row; return how many were sealed."""
        async with self.connection() as conn:
            return await audit.seal(conn, keys=self.audit_keys)

    async def verify_audit(self, checkpoints: Sequence[tuple[str, Checkpoint]] = ()
                           ) -> audit.Verification:
        """Seal what is pending, then recompute the whole chain, and check that it still
        holds each of ``checkpoints`` (``(where, checkpoint)`` pairs)."""
        async with self.connection() as conn:
            await audit.seal(conn, keys=self.audit_keys)
            return await audit.verify(conn, keys=self.audit_keys, checkpoints=checkpoints)

    async def audit_checkpoint(self, *, seal: bool = True) -> Checkpoint:
        """A checkpoint of the audit chain's head (after sealing what is pending), signed
        with the audit key when this process holds one."""
        async with self.connection() as conn:
            if seal:
                await audit.seal(conn, keys=self.audit_keys)
            return await audit.checkpoint(conn, self.audit_keys)


_EXECUTION_COLUMNS = ["work_id", "attempt", "result", "work_type", "params_hash", "faculty",
                      "faculty_hash", "engine_version", "environment_hash", "models",
                      "outcome_hash", "error", "started_at"]


_INSERT_EXECUTIONS = f"""
    INSERT INTO animus.execution_records ({", ".join(_EXECUTION_COLUMNS)})
    SELECT {", ".join(_EXECUTION_COLUMNS)}
      FROM json_populate_recordset(NULL::animus.execution_records, $1::json)"""


async def _copy_executions(conn: asyncpg.Connection,
                           executions: Sequence[ExecutionRecord]) -> None:
    if not executions:
        return
    # One statement and one JSON parameter for the batch (cheaper to build than an array
    # per column); the records' own fields name the columns.
    await conn.execute(_INSERT_EXECUTIONS, msgspec.json.encode(executions).decode())


def _transition(from_state: str, to_state: str, n: int = 1) -> None:
    instruments.transitions.add(n, {"from": from_state, "to": to_state})


def _uuid(value: UUID | str) -> UUID:
    return as_uuid(value, "id")


def _check_reason(reason: str) -> None:
    check_text(reason, "reason", limits().reason_chars, "ANIMUS_MAX_REASON_CHARS")


def _check_queue(name: str) -> None:
    if not name or len(name) > 47 or not name.replace("_", "").isalnum() or not name.isascii():
        raise InvalidInput(
            f"queue name {name!r} is not valid: use 1-47 ASCII letters, digits and underscores"
        )
