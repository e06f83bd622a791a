"""Semantic memory on pgvector: store, recall (vector, full-text, hybrid), forget.

Hybrid search fuses a vector ranking and a full-text ranking with reciprocal rank fusion:
``score = w_vector / (60 + rank_vector) + w_text / (60 + rank_text)``. Filters (memory type,
metadata containment, source, time range) are applied inside both rankings, and the HNSW
scan is iterative (pgvector's ``hnsw.iterative_scan``), so a selective filter still returns
``k`` rows.

A :class:`Memory` store is bound either to the pool (each call its own transaction) or to
one connection inside a transaction (:meth:`Memory.bound`), which is how a faculty's
consolidate writes memories that commit or roll back with its outcome.
"""

from __future__ import annotations

import math
import re
from array import array
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any, Literal, Protocol
from uuid import UUID

import asyncpg
import msgspec
from pgvector import Vector

from animus_core.store.base import memory_id as _memory_id
from animus_core.store.db import Db
from animus_core.store.errors import errors as _errors
from animus_core.store.tx import TxScope
from animus_core.values import json_values
from animus_core.values.errors import ConfigError, InvalidInput

__all__ = ["Embedder", "Kind", "Memory", "MemoryRecord", "MemoryStats", "NewMemory",
           "configured_embedder"]

Kind = Literal["document", "query"]


class Embedder(Protocol):
    """What an embedder provides (the built-in ones and plugins' are in
    :mod:`animus_core.faculties.embedders`). ``name`` identifies the vectors it makes (model
    and settings), so memories embedded by one are never compared with another's."""

    name: str
    dimension: int

    async def embed(self, texts: Sequence[str], *, kind: Kind = "document") -> list[list[float]]:
        ...


Mode = Literal["hybrid", "vector", "text"]
RRF_K = 60
_MEMORY_TYPE = re.compile(r"[a-z][a-z0-9_]*")  # the memories_memory_type_check constraint


class MemoryRecord(msgspec.Struct, frozen=True, kw_only=True):
    id: UUID
    content: str
    memory_type: str
    source: str | None
    metadata: dict[str, Any]
    work_id: UUID | None
    created_at: datetime
    updated_at: datetime
    score: float | None = None

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> MemoryRecord:
        return cls(id=row["id"], content=row["content"], memory_type=row["memory_type"],
                   source=row["source"], metadata=row["metadata"], work_id=row["work_id"],
                   created_at=row["created_at"], updated_at=row["updated_at"],
                   score=row.get("score"))


class NewMemory(msgspec.Struct, frozen=True, kw_only=True):
    content: str
    memory_type: str = "semantic"
    source: str | None = None
    metadata: dict[str, Any] = {}
    embedding: list[float] | None = None
    work_id: UUID | None = None


class MemoryStats(msgspec.Struct, frozen=True, kw_only=True):
    total: int
    by_type: dict[str, int]
    embedder: str | None
    dimension: int | None
    reembedding_to: str | None
    reembed_remaining: int


_COLUMNS = "id, content, memory_type, source, metadata, work_id, created_at, updated_at"


async def configured_embedder(db: Db) -> str | None:
    """The embedder the stored memories were made with (``None``: memory not opened yet)."""
    async with db.connection() as conn:
        return await conn.fetchval("SELECT embedder FROM animus.memory_config")  # type: ignore[no-any-return]


def _check_content(content: object, where: str) -> str:
    if not isinstance(content, str) or not content.strip():
        raise InvalidInput(f"{where}: content must be a non-empty string")
    json_values.check(content, f"{where}: content")  # no NUL, no lone surrogate
    return content


def _check_memory_type(memory_type: object, where: str) -> str:
    if not isinstance(memory_type, str) or not _MEMORY_TYPE.fullmatch(memory_type):
        raise InvalidInput(f"{where}: memory_type {memory_type!r} must be a lowercase word "
                           "(a-z, digits, _; starting with a letter)")
    return memory_type


def _check_vector(vec: Sequence[float], dimension: int, embedder: str, where: str) -> list[float]:
    """``vec`` as the float32 values Postgres stores, or a clear error."""
    try:
        if isinstance(vec, str | bytes | bytearray | memoryview | Mapping):
            raise TypeError
        values = array("f", vec)  # numbers only, checked in C; float32 like the column
    except (TypeError, ValueError):
        raise InvalidInput(f"{where}: embedding must be a sequence of numbers") from None
    if len(values) != dimension:
        raise InvalidInput(f"{where}: embedding has {len(values)} dimensions; memories use "
                           f"{dimension} ({embedder})")
    # NaN and infinities propagate through the sum; float32 values cannot overflow a double
    if not math.isfinite(sum(values)):
        raise InvalidInput(f"{where}: embedding contains NaN or infinity (or a value beyond "
                           "the float32 range)")
    return values.tolist()


def _check_metadata(metadata: object, where: str) -> dict[str, Any]:
    if not isinstance(metadata, Mapping):
        raise InvalidInput(f"{where} must be a JSON object, got {type(metadata).__name__}")
    return dict(metadata)


def _metadata_json(metadata: object, where: str) -> msgspec.Raw:
    """``metadata`` checked and encoded once, as the ``jsonb`` argument that stores it."""
    return msgspec.Raw(json_values.encode(_check_metadata(metadata, where), where))


class Memory:
    """The memory API. Create with :meth:`open` (configures the embedder on first use)."""

    def __init__(self, db: Db, embedder: Embedder, *, conn: asyncpg.Connection | None = None,
                 scope: TxScope | None = None, default_source: str | None = None,
                 work_id: UUID | None = None) -> None:
        self.db = db
        self.embedder = embedder
        self._conn = conn
        self._scope = scope
        self.default_source = default_source
        self.work_id = work_id

    @classmethod
    async def open(cls, db: Db, embedder: Embedder) -> Memory:
        probe = getattr(embedder, "probe", None)
        if probe is not None:
            if not embedder.dimension:  # what the store recorded for it saves a request
                async with db.connection() as conn:
                    known = await conn.fetchval(
                        "SELECT dimension FROM animus.memory_config WHERE embedder = $1",
                        embedder.name)
                if known:
                    embedder.dimension = known
            await probe()
        async with db.connection() as conn:
            # Configured already for this embedder: nothing to change, so a role that only
            # reads (which may not configure) opens it too.
            row = await conn.fetchrow("SELECT embedder, dimension FROM animus.memory_config")
            if row is not None and (row[0], row[1]) != (embedder.name, embedder.dimension):
                raise ConfigError(
                    f"memories are embedded with {row[0]} ({row[1]} dimensions), not "
                    f"{embedder.name} ({embedder.dimension} dimensions): configure the same "
                    "embedder, or run `animus memory reembed`")
            if row is not None:
                return cls(db, embedder)
            try:
                await conn.execute("SELECT animus.memory_configure($1, $2)", embedder.name,
                                   embedder.dimension)
            except asyncpg.PostgresError as e:
                if e.sqlstate == "ANI05":
                    raise ConfigError(f"{e.args[0] if e.args else e}: configure the same "
                                      "embedder, or run `animus memory reembed`") from None
                raise
        await db.pool.expire_connections()  # so every connection learns the vector type
        return cls(db, embedder)

    def bound(self, conn: asyncpg.Connection, *, source: str | None = None,
              work_id: UUID | None = None) -> Memory:
        """The same store writing through ``conn`` (and its transaction)."""
        return Memory(self.db, self.embedder, conn=conn, default_source=source, work_id=work_id)

    def scoped(self, scope: TxScope, *, source: str | None = None,
               work_id: UUID | None = None) -> Memory:
        """The same store writing through ``scope``'s transaction, opened on first use."""
        return Memory(self.db, self.embedder, scope=scope, default_source=source, work_id=work_id)

    def for_work(self, *, source: str, work_id: UUID) -> Memory:
        """The same store, stamping ``source`` and ``work_id`` on what it stores."""
        return Memory(self.db, self.embedder, default_source=source, work_id=work_id)

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[asyncpg.Connection]:
        if self._scope is not None:
            with _errors():
                yield await self._scope.connection()
        elif self._conn is not None:
            with _errors():
                yield self._conn
        else:
            async with self.db.connection() as conn:
                yield conn

    # -- writing -------------------------------------------------------------------------------

    async def store(self, content: str, *, memory_type: str = "semantic",
                    source: str | None = None, metadata: Mapping[str, Any] | None = None,
                    embedding: Sequence[float] | None = None) -> MemoryRecord:
        """Store one memory (embedding ``content`` unless ``embedding`` is given)."""
        [mid] = await self._store([NewMemory(
            content=content, memory_type=memory_type, source=source,
            metadata=_check_metadata(metadata, "metadata") if metadata is not None else {},
            embedding=None if embedding is None else _check_vector(
                embedding, self.embedder.dimension, self.embedder.name, "the memory"))],
            one=True)
        return await self.get(mid)

    async def store_many(self, items: Sequence[NewMemory]) -> list[UUID]:
        """Store a batch in one statement; all or nothing. Returns ids in input order.

        A batch of at least :data:`BULK_MIN` memories, larger than what the table holds,
        is stored with the HNSW index built again afterwards (in the same transaction):
        several times faster than adding each row to the index."""
        return await self._store(items, one=False)

    async def _store(self, items: Sequence[NewMemory], *, one: bool) -> list[UUID]:
        """:meth:`store_many`; with ``one``, its errors name the memory, not its index."""
        dim, name = self.embedder.dimension, self.embedder.name
        missing = []
        metadata: list[msgspec.Raw] = []
        vectors: dict[int, list[float]] = {}

        def label(i: int) -> str:
            return "the memory" if one else f"memory {i}"

        for i, m in enumerate(items):
            where = label(i)
            _check_content(m.content, where)
            metadata.append(_metadata_json(m.metadata, f"{where}: metadata"))
            _check_memory_type(m.memory_type, where)
            if m.embedding is None:
                missing.append(i)
            else:
                vectors[i] = _check_vector(m.embedding, dim, name, where)
        if missing:
            embedded = await self.embedder.embed([items[i].content for i in missing])
            for i, vec in zip(missing, embedded, strict=True):
                vectors[i] = _check_vector(vec, dim, name, f"{label(i)} (from {name})")
        columns: list[list[Any]] = [  # in the order of _INSERT's parameters
            [m.content for m in items], [m.memory_type for m in items],
            [m.source or self.default_source for m in items], metadata,
            [Vector(vectors[i]) for i in range(len(items))], [name] * len(items),
            [m.work_id or self.work_id for m in items]]
        if self._scope is None and self._conn is None and len(items) >= BULK_MIN:
            async with self.db.connection() as conn, conn.transaction():
                with _errors():
                    return await _bulk_insert(conn, columns)
        async with self._connection() as conn:
            result = await conn.fetch(_INSERT, *columns)
        return [r["id"] for r in result]

    async def get(self, memory_id: UUID | str) -> MemoryRecord:
        mid = _memory_id(memory_id)
        async with self._connection() as conn:
            row = await conn.fetchrow(f"SELECT {_COLUMNS} FROM animus.memories WHERE id = $1", mid)
        if row is None:
            raise InvalidInput(f"no memory with id {mid}")
        return MemoryRecord.from_row(row)

    async def recent(self, *, limit: int = 50, memory_type: str | None = None,
                     source: str | None = None, since: datetime | None = None,
                     before: UUID | str | None = None) -> list[MemoryRecord]:
        """The newest memories first (of ``memory_type`` and ``source`` if given, created
        at or after ``since``); page with ``before=<id of the last of the previous page>``.
        Embeds nothing."""
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 10_001:
            raise InvalidInput(f"limit must be an integer from 1 to 10000, got {limit!r}")
        cursor = None if before is None else _memory_id(before)
        async with self._connection() as conn:
            rows = await conn.fetch(
                """SELECT id, content, memory_type, source, metadata, work_id, created_at,
                          updated_at
                     FROM animus.memories
                    WHERE ($1::text IS NULL OR memory_type = $1)
                      AND ($2::text IS NULL OR source = $2)
                      AND ($3::timestamptz IS NULL OR created_at >= $3)
                      AND ($4::uuid IS NULL OR (created_at, id) <
                           (SELECT m.created_at, m.id FROM animus.memories m WHERE m.id = $4))
                    ORDER BY created_at DESC, id DESC LIMIT $5""",
                memory_type, source, since, cursor, limit)
        return [MemoryRecord.from_row(r) for r in rows]

    async def update(self, memory_id: UUID | str, *, content: str | None = None,
                     metadata: Mapping[str, Any] | None = None,
                     memory_type: str | None = None) -> MemoryRecord:
        """Change a memory; new content is embedded again."""
        mid = _memory_id(memory_id)
        vec = None
        if content is not None:
            _check_content(content, f"memory {mid}")
        meta = None if metadata is None else _metadata_json(metadata, f"memory {mid}: metadata")
        if memory_type is not None:
            _check_memory_type(memory_type, f"memory {mid}")
        if content is not None:
            [vec] = await self.embedder.embed([content])
            vec = _check_vector(vec, self.embedder.dimension, self.embedder.name, f"memory {mid}")
        async with self._connection() as conn:
            row = await conn.fetchrow(
                f"""UPDATE animus.memories SET content = coalesce($2, content),
                           embedding = coalesce($3::vector, embedding),
                           metadata = coalesce($4::jsonb, metadata),
                           memory_type = coalesce($5, memory_type), updated_at = now()
                     WHERE id = $1 RETURNING {_COLUMNS}""",
                mid, content, vec, meta, memory_type)
            if row is not None and content is not None and await conn.fetchval(
                    "SELECT next_embedder IS NOT NULL FROM animus.memory_config"):
                # a re-embed is under way: its vector for the old content is stale now
                await conn.execute(
                    "UPDATE animus.memories SET embedding_next = NULL WHERE id = $1", mid)
        if row is None:
            raise InvalidInput(f"no memory with id {mid}")
        return MemoryRecord.from_row(row)

    async def forget(self, memory_ids: Sequence[UUID | str]) -> int:
        """Delete memories; returns how many existed."""
        ids = [_memory_id(m) for m in memory_ids]
        async with self._connection() as conn:
            deleted = await conn.fetch(
                "DELETE FROM animus.memories WHERE id = ANY($1::uuid[]) RETURNING id", ids)
        return len(deleted)

    # -- recall --------------------------------------------------------------------------------

    async def search(self, query: str | None = None, *, k: int = 10, mode: Mode = "hybrid",
                     embedding: Sequence[float] | None = None, memory_type: str | None = None,
                     metadata: Mapping[str, Any] | None = None, source: str | None = None,
                     since: datetime | None = None, until: datetime | None = None,
                     weights: tuple[float, float] = (1.0, 1.0)) -> list[MemoryRecord]:
        """The ``k`` best memories for ``query``; ``score`` is cosine similarity (vector),
        ts_rank_cd (text) or the fused RRF score (hybrid)."""
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= 1000:
            raise InvalidInput(f"k must be an integer from 1 to 1000, got {k!r}")
        if mode not in ("hybrid", "vector", "text"):
            raise InvalidInput(f"mode must be hybrid, vector or text, got {mode!r}")
        if len(weights) != 2 or not all(
                isinstance(w, int | float) and math.isfinite(w) and w >= 0 for w in weights):
            raise InvalidInput(f"weights must be two finite numbers >= 0 (vector, text), "
                               f"got {weights!r}")
        meta_filter = None if metadata is None else _metadata_json(metadata, "metadata filter")
        if query is not None:
            json_values.check(query, "query")
        if mode in ("hybrid", "text") and not (query and query.strip()):
            raise InvalidInput(f"{mode} search needs query text")
        vec = None
        if mode in ("hybrid", "vector"):
            if embedding is not None:
                vec = _check_vector(embedding, self.embedder.dimension, self.embedder.name, "query")
            elif query and query.strip():
                [vec] = await self.embedder.embed([query], kind="query")
            else:
                raise InvalidInput("vector search needs query text or an embedding")
        params: list[Any] = [memory_type, meta_filter, source, since, until]
        filters = """($1::text IS NULL OR m.memory_type = $1)
                 AND ($2::jsonb IS NULL OR m.metadata @> $2)
                 AND ($3::text IS NULL OR m.source = $3)
                 AND ($4::timestamptz IS NULL OR m.created_at >= $4)
                 AND ($5::timestamptz IS NULL OR m.created_at < $5)"""
        candidates = max(k * 4, 40) if mode == "hybrid" else k
        vector_sql = f"""SELECT m.id, m.embedding <=> $6::vector AS distance FROM animus.memories m
                          WHERE {filters} ORDER BY m.embedding <=> $6::vector LIMIT $8"""
        text_sql = f"""SELECT m.id, ts_rank_cd(m.fts, q) AS rank
                         FROM animus.memories m, websearch_to_tsquery('english', $7::text) q
                        WHERE m.fts @@ q AND {filters} ORDER BY rank DESC, m.id LIMIT $8"""
        params += [vec, query, candidates]
        # every statement names all parameters, so unused ones still get a type
        unused = "AND $6::vector IS NOT DISTINCT FROM $6 AND $7::text IS NOT DISTINCT FROM $7"
        if mode == "vector":
            sql = f"""WITH v AS MATERIALIZED ({vector_sql})
                      SELECT {_cols('m')}, 1 - v.distance AS score
                        FROM v JOIN animus.memories m USING (id) WHERE true {unused}
                       ORDER BY v.distance LIMIT $8"""
        elif mode == "text":
            sql = f"""WITH t AS ({text_sql})
                      SELECT {_cols('m')}, t.rank AS score
                        FROM t JOIN animus.memories m USING (id) WHERE true {unused}
                       ORDER BY t.rank DESC, m.id"""
        else:
            params += [weights[0], weights[1], k]
            sql = f"""WITH v AS MATERIALIZED ({vector_sql}),
                      vr AS (SELECT id, row_number() OVER (ORDER BY distance) AS r FROM v),
                      t AS MATERIALIZED ({text_sql}),
                      tr AS (SELECT id, row_number() OVER (ORDER BY rank DESC, id) AS r FROM t),
                      fused AS (
                        SELECT coalesce(vr.id, tr.id) AS id,
                               coalesce($9::float8 / ({RRF_K} + vr.r), 0)
                             + coalesce($10::float8 / ({RRF_K} + tr.r), 0) AS score
                          FROM vr FULL JOIN tr ON vr.id = tr.id)
                      SELECT {_cols('m')}, f.score FROM fused f JOIN animus.memories m USING (id)
                       ORDER BY f.score DESC, m.id LIMIT $11"""
        async with self._connection() as conn, conn.transaction():
            await conn.execute("SET LOCAL hnsw.iterative_scan = relaxed_order")
            await conn.execute(f"SET LOCAL hnsw.ef_search = {max(40, min(1000, candidates * 2))}")
            rows = await conn.fetch(sql, *params)
        return [MemoryRecord.from_row(r) for r in rows]

    async def stats(self) -> MemoryStats:
        async with self._connection() as conn:
            by_type = {r[0]: r[1] for r in await conn.fetch(
                "SELECT memory_type, count(*) FROM animus.memories GROUP BY 1 ORDER BY 1")}
            cfg = await conn.fetchrow("SELECT * FROM animus.memory_config")
            remaining = 0
            if cfg and cfg["next_embedder"]:
                remaining = await conn.fetchval(
                    "SELECT count(*) FROM animus.memories WHERE embedding_next IS NULL")
        return MemoryStats(
            total=sum(by_type.values()), by_type=by_type,
            embedder=cfg["embedder"] if cfg else None, dimension=cfg["dimension"] if cfg else None,
            reembedding_to=cfg["next_embedder"] if cfg else None, reembed_remaining=remaining)

    # -- moving to another embedder ----------------------------------------------------------

    async def reembed(self, target: Embedder, *, batch: int = 256,
                      progress: Callable[[int, int], None] | None = None) -> int:
        """Re-embed every memory with ``target``; resumable (run again after an interruption).
        Returns how many memories were embedded in this run."""
        done = await _reembed(self.db, target, batch=batch, progress=progress)
        self.embedder = target
        return done



async def _reembed(db: Db, target: Embedder, *, batch: int = 256,
                  progress: Callable[[int, int], None] | None = None) -> int:
    """Re-embed every memory with ``target``; resumable (run again after an interruption).
    Returns how many memories were embedded in this run."""
    probe = getattr(target, "probe", None)
    if probe is not None:
        await probe()
    async with db.connection() as conn, conn.transaction():
        cfg = await conn.fetchrow("SELECT * FROM animus.memory_config FOR UPDATE")
        if cfg is None:
            raise ConfigError("no memories are configured yet: nothing to re-embed")
        if cfg["embedder"] == target.name and cfg["dimension"] == target.dimension:
            return 0
        if cfg["next_embedder"] is not None and (
                cfg["next_embedder"], cfg["next_dimension"]) != (target.name, target.dimension):
            raise ConfigError(f"a re-embed to {cfg['next_embedder']} "
                              f"({cfg['next_dimension']} dimensions) is in progress: "
                              "finish it first")
        if cfg["next_embedder"] is None:
            await conn.execute(
                f"ALTER TABLE animus.memories ADD COLUMN embedding_next vector({target.dimension})")
            await conn.execute(
                "UPDATE animus.memory_config SET next_embedder = $1, next_dimension = $2",
                target.name, target.dimension)
    done = 0
    async with db.connection() as conn:
        total = await conn.fetchval("SELECT count(*) FROM animus.memories")
        # In id order from where the last batch ended, so each batch reads only its own
        # rows; then once more from the start, for memories stored meanwhile below it.
        after: UUID | None = None
        swept_again = False
        while True:
            rows = await conn.fetch(
                """SELECT id, content FROM animus.memories
                    WHERE embedding_next IS NULL AND ($2::uuid IS NULL OR id > $2)
                    ORDER BY id LIMIT $1""", batch, after)
            if not rows:
                if after is None or swept_again:
                    break
                after, swept_again = None, True
                continue
            after = rows[-1]["id"]
            vectors = [Vector(_check_vector(vec, target.dimension, target.name, "re-embed"))
                       for vec in await target.embed([r["content"] for r in rows])]
            await conn.execute(
                """UPDATE animus.memories m SET embedding_next = x.v, embedder = $3
                     FROM unnest($1::uuid[], $2::vector[]) AS x(id, v) WHERE m.id = x.id""",
                [r["id"] for r in rows], vectors, target.name)
            done += len(rows)
            if progress:
                progress(done, max(total, done))
        async with conn.transaction():
            await conn.execute("LOCK TABLE animus.memories IN ACCESS EXCLUSIVE MODE")
            left = await conn.fetchval(
                "SELECT count(*) FROM animus.memories WHERE embedding_next IS NULL")
            if left:
                raise ConfigError(f"{left} memories were added during the re-embed: run it again")
            await conn.execute("DROP INDEX IF EXISTS animus.memories_embedding")
            await conn.execute("ALTER TABLE animus.memories DROP COLUMN embedding")
            await conn.execute(
                "ALTER TABLE animus.memories RENAME COLUMN embedding_next TO embedding")
            await conn.execute("""CREATE INDEX memories_embedding ON animus.memories
                                  USING hnsw (embedding vector_cosine_ops)""")
            await conn.execute(
                """UPDATE animus.memory_config SET embedder = next_embedder,
                          dimension = next_dimension, next_embedder = NULL,
                          next_dimension = NULL, configured_at = now()""")
    await db.pool.expire_connections()
    return done

_INSERT = """
    INSERT INTO animus.memories (content, memory_type, source, metadata, embedding, embedder,
                                 work_id)
    SELECT c, t, s, md, e, em, w
      FROM unnest($1::text[], $2::text[], $3::text[], $4::jsonb[], $5::vector[], $6::text[],
                  $7::uuid[]) AS x(c, t, s, md, e, em, w)
    RETURNING id"""

#: A batch at least this big, into a table holding fewer memories than the batch, is stored
#: with the HNSW index built afterwards (see _bulk_insert).
BULK_MIN = 5_000


async def _bulk_insert(conn: asyncpg.Connection, columns: list[list[Any]]) -> list[UUID]:
    """Insert a batch larger than the table, in the caller's transaction: building the HNSW
    index once over every row is several times cheaper than adding each new row to it. The
    index is dropped and built again inside the transaction, so a failure leaves it as it
    was; searches and writes wait for the transaction (the drop locks the table). Falls back
    to a plain insert when the table has more rows than the batch, or when this role may
    not rebuild the index (it is not the table's owner)."""
    n = len(columns[0])
    try:
        async with conn.transaction():  # a savepoint: without the right, insert plainly
            # one bulk insert at a time; other writers wait, readers do until the drop
            await conn.execute("LOCK TABLE animus.memories IN SHARE ROW EXCLUSIVE MODE")
            existing = await conn.fetchval(
                "SELECT count(*) FROM (SELECT 1 FROM animus.memories LIMIT $1) AS s", n)
            definition = await conn.fetchval(
                "SELECT pg_get_indexdef(to_regclass('animus.memories_embedding'))")
            rebuild = existing < n and definition is not None
            if rebuild:
                await conn.execute("DROP INDEX animus.memories_embedding")
    except asyncpg.InsufficientPrivilegeError:
        rebuild = False
    ids = [r["id"] for r in await conn.fetch(_INSERT, *columns)]
    if not rebuild:
        return ids
    # about 2.5 kB per 384-dimension row keeps the build in memory; within 64 MB..1 GB
    work_mem_mb = min(1024, max(64, (n + existing) * (columns[4][0].dimensions() * 4 + 1024)
                                // 2**20 + 64))
    await conn.execute(f"SET LOCAL maintenance_work_mem = '{work_mem_mb}MB'")
    try:
        async with conn.transaction():
            await conn.execute(definition)
    except asyncpg.PostgresError:
        # a parallel build needs that much shared memory (/dev/shm is 64 MB in a default
        # container): build it in this process instead
        await conn.execute("SET LOCAL max_parallel_maintenance_workers = 0")
        await conn.execute(definition)
    return ids


def _cols(alias: str) -> str:
    return ", ".join(f"{alias}.{c.strip()}" for c in _COLUMNS.split(","))
