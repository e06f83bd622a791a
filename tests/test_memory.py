"""Semantic memory end to end: real Postgres with pgvector, the real HTTP embedder clients
talking to a local embeddings server (:mod:`tests.embedding_server`), a real engine for the
consolidate transaction and the real ``animus memory`` command.

Vectors are supplied where the test needs to control geometry (recall, a misleading vector
side); everything is seeded, so every run sees the same data.
"""

from __future__ import annotations

import json
import math
import random
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from uuid import UUID

import asyncpg
import pytest

from animus_core import ConfigError, Db, Faculty, Focus, InvalidInput, NewWorkItem, State
from animus_core.faculties.embedders import (
    Embedder,
    HashingEmbedder,
    OpenAIEmbedder,
    VoyageEmbedder,
    select_embedder,
)
from animus_core.faculties.plugins import make_plugin_manager
from animus_core.infra.config import Settings
from animus_core.store import memory as memory_module
from animus_core.store.memory import Memory, NewMemory
from animus_core.values.errors import DatabaseError, EmbedderError
from tests.embedding_server import (
    EmbeddingServer,
    Fail,
    Garbage,
    Hang,
    Reply,
    Truncated,
    WrongCount,
    WrongDimension,
)
from tests.engine_helpers import run_engine, wait_finished, write_toml_faculty
from tests.governance_helpers import people as team
from tests.support import one_error_line, raw

DIM = 64

# -- helpers ------------------------------------------------------------------------------------


@pytest.fixture
async def memory(db: Db) -> Memory:
    return await Memory.open(db, HashingEmbedder(DIM))


@pytest.fixture
def server() -> Iterator[EmbeddingServer]:
    with EmbeddingServer(DIM) as s:
        yield s


async def rows(db_url: str) -> int:
    async with raw(db_url) as conn:
        n: int = await conn.fetchval("SELECT count(*) FROM animus.memories")
        return n


async def stored_vector(db_url: str, memory_id: UUID) -> list[float]:
    async with raw(db_url) as conn:
        text = await conn.fetchval("SELECT embedding::text FROM animus.memories WHERE id = $1",
                                   memory_id)
    return [float(x) for x in text.strip("[]").split(",")]


def close_to(a: Sequence[float], b: Sequence[float], tol: float = 1e-5) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= tol for x, y in zip(a, b, strict=True))


def unit(v: Sequence[float]) -> list[float]:
    n = math.sqrt(sum(x * x for x in v)) or 1.0
    return [x / n for x in v]


def gaussian(rng: random.Random, dim: int, sigma: float = 1.0) -> list[float]:
    return [rng.gauss(0.0, sigma) for _ in range(dim)]


def add(a: Sequence[float], b: Sequence[float]) -> list[float]:
    return [x + y for x, y in zip(a, b, strict=True)]


WORDS = ["amber", "basalt", "cedar", "delta", "ember", "falcon", "glacier", "harbor", "indigo",
         "juniper", "kestrel", "lagoon", "meadow", "nebula", "orchid", "prairie", "quartz",
         "raven", "sierra", "tundra", "umber", "violet", "willow", "xenon", "yarrow", "zephyr"]


class Clustered:
    """``n`` vectors in ``clusters`` gaussian clusters (unit centroids, noise ``spread`` per
    coordinate), each with a sentence whose words depend on its cluster, and metadata
    ``{"shard": i % 100}`` (so each shard holds 1% of the rows)."""

    def __init__(self, n: int, dim: int, clusters: int, seed: int = 7,
                 spread: float = 0.15) -> None:
        rng = random.Random(seed)
        self.rng = rng
        self.dim = dim
        self.centroids = [unit(gaussian(rng, dim)) for _ in range(clusters)]
        self.items: list[NewMemory] = []
        for i in range(n):
            c = i % clusters
            vec = add(self.centroids[c], gaussian(rng, dim, spread))
            words = [WORDS[(c + j) % len(WORDS)] for j in range(3)] + [rng.choice(WORDS)]
            self.items.append(NewMemory(
                content=f"note {i}: the {words[0]} {words[1]} near the {words[2]} {words[3]}",
                metadata={"shard": i % 100, "cluster": c}, embedding=vec))

    def query(self, cluster: int, noise: float = 0.03) -> list[float]:
        return add(self.centroids[cluster], gaussian(self.rng, self.dim, noise))


async def store_batches(memory: Memory, items: Sequence[NewMemory], size: int = 1000) -> list[UUID]:
    ids: list[UUID] = []
    for i in range(0, len(items), size):
        ids += await memory.store_many(items[i:i + size])
    return ids


async def exact_top(db_url: str, vec: Sequence[float], k: int,
                    metadata: dict[str, Any] | None = None) -> list[UUID]:
    """The exact top ``k`` by cosine distance: a sequential scan (index scans off)."""
    async with raw(db_url) as conn, conn.transaction():
        await conn.execute("SET LOCAL enable_indexscan = off")
        await conn.execute("SET LOCAL enable_bitmapscan = off")
        found = await conn.fetch(
            """SELECT id FROM animus.memories
                WHERE $3::text IS NULL OR metadata @> $3::jsonb
                ORDER BY embedding <=> $1::text::vector LIMIT $2""",
            "[" + ",".join(map(repr, vec)) + "]", k,
            json.dumps(metadata) if metadata is not None else None)
    return [r["id"] for r in found]


class Explaining:
    """Stands in for the connection a bound :class:`Memory` uses: passes everything through,
    and records the plan (EXPLAIN) of every query it fetches."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self._conn = conn
        self.plans: list[str] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)

    async def fetch(self, sql: str, *args: Any) -> Any:
        plan = await self._conn.fetch("EXPLAIN " + sql, *args)
        self.plans.append("\n".join(r[0] for r in plan))
        return await self._conn.fetch(sql, *args)


class Counting:
    """An embedder that counts its calls (and the kinds asked for)."""

    def __init__(self, inner: Embedder) -> None:
        self.inner = inner
        self.name = inner.name
        self.dimension = inner.dimension
        self.calls: list[tuple[int, str]] = []

    async def embed(self, texts: Sequence[str], *, kind: Any = "document") -> list[list[float]]:
        self.calls.append((len(texts), kind))
        return await self.inner.embed(texts, kind=kind)


class FailsAfter:
    """The same embedder as ``inner`` (same name and dimension), failing from call ``n + 1``:
    stands for a re-embed interrupted midway (a provider outage, a killed process)."""

    def __init__(self, inner: Embedder, n: int) -> None:
        self.inner = inner
        self.name = inner.name
        self.dimension = inner.dimension
        self.left = n

    async def embed(self, texts: Sequence[str], *, kind: Any = "document") -> list[list[float]]:
        if self.left <= 0:
            raise EmbedderError("embedder went away (simulated outage)")
        self.left -= 1
        return await self.inner.embed(texts, kind=kind)


def http(cls: type[OpenAIEmbedder] | type[VoyageEmbedder], server: EmbeddingServer, *,
         key: str | None = "sk-test-key", dimension: int | None = DIM, timeout: float = 5.0,
         retries: int = 2, batch_size: int = 96) -> OpenAIEmbedder | VoyageEmbedder:
    return cls(url=server.url, model="test-embed-1", key=key, dimension=dimension,
               timeout=timeout, retries=retries, backoff=0.01, batch_size=batch_size)


def from_env(**env: str) -> Embedder:
    """The embedder configuration selects (ANIMUS_EMBEDDER...), through the plugin hook."""
    settings = Settings.from_env({"ANIMUS_HOME": "/nonexistent-animus-home",
                                  "ANIMUS_DISABLE_PLUGIN_AUTOLOAD": "1", **env})
    pm, _ = make_plugin_manager(settings)
    return select_embedder(pm, settings)


# -- recall: HNSW against exact search ------------------------------------------------------------


async def test_hnsw_recall_and_a_selective_filter(db: Db, db_url: str, memory: Memory) -> None:
    data = Clustered(n=5000, dim=DIM, clusters=50)
    await store_batches(memory, data.items)
    assert await rows(db_url) == 5000

    # The search really takes the HNSW path (else this would compare exact with exact).
    async with db.connection() as conn:
        spy = Explaining(conn)
        found = await memory.bound(spy).search(embedding=data.query(3), mode="vector", k=10)
    assert len(found) == 10
    assert any("Index Scan using memories_embedding" in p for p in spy.plans), spy.plans

    hits = total = 0
    for q in range(50):
        vec = data.query(q % 50)
        approx = [m.id for m in await memory.search(embedding=vec, mode="vector", k=10)]
        exact = await exact_top(db_url, vec, 10)
        assert len(approx) == 10
        hits += len(set(approx) & set(exact))
        total += len(exact)
    recall = hits / total
    assert recall >= 0.95, f"recall@10 of the HNSW path is {recall:.3f}"

    # A metadata filter keeping 1% of the rows (50 of 5000, and in another cluster than the
    # query) still returns k rows: the HNSW scan is iterative, it does not stop after
    # ef_search candidates. Bitmap and sequential scans are off on this connection, so the
    # planner can answer neither from the GIN metadata index nor by sorting all 5000 rows
    # (which it may prefer, depending on when autovacuum last analyzed the table): the HNSW
    # path is what is tested.
    hits = total = 0
    async with db.connection() as conn:
        await conn.execute("SET enable_bitmapscan = off")
        await conn.execute("SET enable_seqscan = off")
        spy = Explaining(conn)
        forced = memory.bound(spy)
        # The control: without iterative scan, the same plan finds (almost) nothing.
        async with conn.transaction():
            await conn.execute("SET LOCAL hnsw.iterative_scan = off")
            plain = await conn.fetch(
                """SELECT id FROM animus.memories WHERE metadata @> '{"shard": 7}'
                    ORDER BY embedding <=> $1 LIMIT 10""", data.query(0))
        assert len(plain) < 10
        for q in range(10):
            shard = 7 + q
            vec = data.query(q)
            for search in (memory.search, forced.search):
                got = await search(embedding=vec, mode="vector", k=10, metadata={"shard": shard})
                assert len(got) == 10
                assert all(m.metadata["shard"] == shard for m in got)
            exact = await exact_top(db_url, vec, 10, {"shard": shard})
            hits += len({m.id for m in got} & set(exact))
            total += len(exact)
            hybrid = await memory.bound(conn).search(WORDS[q], embedding=vec, k=10,
                                                     metadata={"shard": shard})
            assert len(hybrid) == 10
            assert all(m.metadata["shard"] == shard for m in hybrid)
        await conn.execute("RESET enable_bitmapscan")
        await conn.execute("RESET enable_seqscan")
    assert len(spy.plans) == 10
    assert all("Index Scan using memories_embedding" in p for p in spy.plans), spy.plans
    assert hits / total >= 0.9, f"filtered recall@10 is {hits / total:.3f}"


# -- hybrid search ---------------------------------------------------------------------------------


async def test_hybrid_finds_an_exact_keyword_that_vectors_miss(memory: Memory, db_url: str) -> None:
    rng = random.Random(11)
    q = unit(gaussian(rng, DIM))
    # 300 near-miss distractors whose vectors sit right next to the query...
    distractors = [NewMemory(content=f"order XK-4471-QA{i % 10} shipped to warehouse {i}",
                             embedding=add(q, gaussian(rng, DIM, 0.05))) for i in range(300)]
    await memory.store_many(distractors)
    # ...and the one memory with the exact code, whose vector points away from it.
    target = await memory.store("order XK-4471-QZ shipped to warehouse 17",
                                embedding=add([-x for x in q], gaussian(rng, DIM, 0.05)))

    vector = await memory.search("XK-4471-QZ", embedding=q, mode="vector", k=10)
    assert target.id not in {m.id for m in vector}
    text = await memory.search("XK-4471-QZ", mode="text", k=10)
    assert [m.id for m in text] == [target.id]
    hybrid = await memory.search("XK-4471-QZ", embedding=q, k=10)
    assert len(hybrid) == 10
    assert target.id in {m.id for m in hybrid}
    [fused] = [m for m in hybrid if m.id == target.id]
    assert fused.score == pytest.approx(1 / 61)  # rank 1 in text, absent from the vector side

    # RRF weights: (1, 0) is the vector ranking alone, (0, 1) puts the text match first.
    only_vector = await memory.search("XK-4471-QZ", embedding=q, k=10, weights=(1.0, 0.0))
    assert [m.id for m in only_vector][:9] == [m.id for m in vector][:9]
    assert (await memory.search("XK-4471-QZ", embedding=q, k=10,
                                weights=(0.0, 1.0)))[0].id == target.id
    # Scores: cosine similarity for vector search, best first.
    scores = [m.score for m in vector if m.score is not None]
    assert len(scores) == 10
    assert all(0.9 < s <= 1.0 for s in scores)
    assert scores == sorted(scores, reverse=True)


async def test_filters_by_type_source_and_time(memory: Memory, db_url: str) -> None:
    specs = [("harbor cranes unload ships", "episodic", "dock", "2024-01-01"),
             ("harbor tides follow the moon", "semantic", "dock", "2024-06-01"),
             ("harbor pilots guide ships", "semantic", "radio", "2025-01-01"),
             ("harbor fees rose this year", "relational", None, "2025-06-01")]
    ids = {}
    for content, mtype, source, _ in specs:
        ids[content] = (await memory.store(content, memory_type=mtype, source=source)).id
    async with raw(db_url) as conn:
        for content, *_, day in specs:
            await conn.execute("UPDATE animus.memories SET created_at = $2 WHERE id = $1",
                               ids[content], datetime.fromisoformat(day).replace(tzinfo=UTC))

    def contents(found: Sequence[Any]) -> set[str]:
        return {m.content for m in found}

    for mode in ("hybrid", "vector", "text"):
        async def s(**kw: Any) -> set[str]:
            return contents(await memory.search("harbor ships", mode=mode, **kw))  # noqa: B023

        if mode != "text":
            assert len(await s()) == 4
        assert await s(memory_type="semantic") <= {specs[1][0], specs[2][0]}
        assert specs[2][0] in await s(memory_type="semantic")
        assert await s(memory_type="episodic") == {specs[0][0]}
        assert await s(source="radio") == {specs[2][0]}
        assert await s(memory_type="procedural") == set()
        since = datetime(2024, 6, 1, tzinfo=UTC)
        until = datetime(2025, 6, 1, tzinfo=UTC)
        got = await s(since=since, until=until)  # since inclusive, until exclusive
        assert got <= {specs[1][0], specs[2][0]}
        assert specs[2][0] in got
        assert await s(source="dock", until=since) == {specs[0][0]}


# -- writing: update, forget, stats ----------------------------------------------------------------


async def test_update_re_embeds_new_content(db: Db, db_url: str) -> None:
    embedder = Counting(HashingEmbedder(DIM))
    memory = await Memory.open(db, embedder)
    m = await memory.store("the cat sat on the mat", metadata={"v": 1})
    assert close_to(await stored_vector(db_url, m.id),
                    HashingEmbedder(DIM).embed_one("the cat sat on the mat"))
    calls = len(embedder.calls)

    changed = await memory.update(m.id, content="quantum chromodynamics lecture notes")
    assert len(embedder.calls) == calls + 1
    assert changed.content == "quantum chromodynamics lecture notes"
    assert changed.metadata == {"v": 1}
    assert changed.updated_at > m.updated_at
    assert close_to(await stored_vector(db_url, m.id),
                    HashingEmbedder(DIM).embed_one("quantum chromodynamics lecture notes"))
    assert [x.id for x in await memory.search("chromodynamics", mode="text")] == [m.id]
    assert await memory.search("cat", mode="text") == []

    before = await stored_vector(db_url, m.id)
    again = await memory.update(m.id, metadata={"v": 2}, memory_type="episodic")
    assert (again.metadata, again.memory_type, again.content) == (
        {"v": 2}, "episodic", "quantum chromodynamics lecture notes")
    assert len(embedder.calls) == calls + 1  # no new content: no embedding call
    assert await stored_vector(db_url, m.id) == before

    for bad in ({"content": "   "}, {"metadata": [1, 2]}, {"memory_type": "Not A Type"}):
        with pytest.raises(InvalidInput):
            await memory.update(m.id, **bad)
    assert len(embedder.calls) == calls + 1  # refused before calling the embedder
    assert (await memory.get(m.id)).metadata == {"v": 2}
    with pytest.raises(InvalidInput, match="no memory with id"):
        await memory.update(UUID(int=1), content="anything")


async def test_forget_and_stats(memory: Memory, db_url: str) -> None:
    st = await memory.stats()
    assert (st.total, st.by_type, st.embedder, st.dimension) == (0, {}, f"hashing-v1-{DIM}", DIM)
    assert (st.reembedding_to, st.reembed_remaining) == (None, 0)
    a = await memory.store("alpha fact")
    b = await memory.store("beta event", memory_type="episodic")
    c = await memory.store("gamma link", memory_type="relational")
    await memory.store("delta fact")
    st = await memory.stats()
    assert st.total == 4
    assert st.by_type == {"episodic": 1, "relational": 1, "semantic": 2}

    assert await memory.forget([a.id]) == 1
    with pytest.raises(InvalidInput, match="no memory"):
        await memory.get(a.id)
    assert await memory.forget([a.id]) == 0
    assert await memory.forget([a.id, b.id, str(c.id)]) == 2
    with pytest.raises(InvalidInput):
        await memory.forget(["not-a-uuid"])
    assert await rows(db_url) == 1
    assert (await memory.stats()).by_type == {"semantic": 1}


# -- bad input ---------------------------------------------------------------------------------------

GOOD = [0.1] * DIM
# The calls are deliberately ill-typed: ``m`` is ``Any`` so that the type checker lets them be.
BAD_INPUT: list[tuple[str, Callable[[Any], Any], str]] = [
    ("empty content", lambda m: m.store(""), "non-empty"),
    ("blank content", lambda m: m.store("  \n\t"), "non-empty"),
    ("NUL in content", lambda m: m.store("a\x00b"), "NUL"),
    ("content not text", lambda m: m.store(42), "non-empty"),
    ("wrong dimension", lambda m: m.store("x", embedding=[0.1] * (DIM - 1)), "dimensions"),
    ("empty vector", lambda m: m.store("x", embedding=[]), "0 dimensions"),
    ("NaN in vector", lambda m: m.store("x", embedding=[*GOOD[:-1], math.nan]), "NaN"),
    ("inf in vector", lambda m: m.store("x", embedding=[math.inf, *GOOD[1:]]), "infinity"),
    ("text in vector", lambda m: m.store("x", embedding=["a"] * DIM), "numbers"),
    ("None in vector", lambda m: m.store("x", embedding=[None] * DIM), "numbers"),
    ("vector as text", lambda m: m.store("x", embedding="0.1," * DIM), "numbers"),
    ("vector as bytes", lambda m: m.store("x", embedding=bytes(4 * DIM)), "numbers"),
    ("beyond float32", lambda m: m.store("x", embedding=[1e39, *GOOD[1:]]), "float32"),
    ("metadata not object", lambda m: m.store("x", metadata=[1, 2]), "JSON object"),
    ("metadata not JSON", lambda m: m.store("x", metadata={"t": {1, 2}}), "JSON"),
    ("metadata NaN", lambda m: m.store("x", metadata={"t": math.nan}), "JSON"),
    ("uppercase type", lambda m: m.store("x", memory_type="Episodic"), "lowercase"),
    ("type with space", lambda m: m.store("x", memory_type="my type"), "lowercase"),
    ("metadata filter list", lambda m: m.search("x", metadata=["a"]), "JSON object"),
    ("metadata filter text", lambda m: m.search("x", metadata="a=1"), "JSON object"),
    ("unknown mode", lambda m: m.search("x", mode="fuzzy"), "mode"),
    ("k zero", lambda m: m.search("x", k=0), "k must"),
    ("k too big", lambda m: m.search("x", k=1001), "k must"),
    ("k not int", lambda m: m.search("x", k=2.5), "k must"),
    ("text search, no text", lambda m: m.search("  ", mode="text"), "query text"),
    ("vector search, nothing", lambda m: m.search(None, mode="vector"), "query text or an embedding"),
    ("query vector NaN", lambda m: m.search(embedding=[math.nan] * DIM, mode="vector"), "NaN"),
    ("query vector dimension", lambda m: m.search(embedding=[0.1] * 3, mode="vector"), "dimensions"),
    ("negative weight", lambda m: m.search("x", weights=(-1.0, 1.0)), "weights"),
    ("NaN weight", lambda m: m.search("x", weights=(1.0, math.nan)), "weights"),
]


@pytest.mark.parametrize(("case", "call", "message"), BAD_INPUT, ids=[c[0] for c in BAD_INPUT])
async def test_bad_input_is_refused_and_nothing_is_stored(
        memory: Memory, db_url: str, case: str, call: Callable[[Any], Any], message: str) -> None:
    await memory.store("an existing memory")
    with pytest.raises(InvalidInput, match=message):
        await call(memory)
    assert await rows(db_url) == 1


async def test_a_batch_with_one_bad_item_stores_none(memory: Memory, db_url: str) -> None:
    good = [NewMemory(content=f"fact {i}") for i in range(5)]
    bad_items = [NewMemory(content="bad", embedding=[math.nan] * DIM),
                 NewMemory(content=""),
                 NewMemory(content="bad", metadata={"x": math.inf}),
                 NewMemory(content="bad", memory_type="BAD"),
                 NewMemory(content="bad", embedding=[0.0] * (DIM + 1))]
    for bad in bad_items:
        with pytest.raises(InvalidInput, match="memory 3"):
            await memory.store_many([*good[:3], bad, *good[3:]])
    assert await rows(db_url) == 0
    ids = await memory.store_many(good)
    assert [(await memory.get(i)).content for i in ids] == [m.content for m in good]


# -- HTTP embedders against the local server ------------------------------------------------------------


async def test_openai_embedder_sends_model_and_key(db: Db, db_url: str,
                                                   server: EmbeddingServer) -> None:
    embedder = from_env(ANIMUS_EMBEDDER="openai", ANIMUS_EMBEDDER_URL=server.url,
                        ANIMUS_EMBEDDER_MODEL="text-embedding-test",
                        ANIMUS_EMBEDDER_KEY="sk-secret-123")
    assert isinstance(embedder, OpenAIEmbedder)
    memory = await Memory.open(db, embedder)  # no dimension configured: probed
    assert embedder.dimension == DIM
    assert embedder.name == "openai:text-embedding-test"
    server.reset()
    server.script(Reply(reverse=True))  # items out of order: the client must use "index"
    ids = await memory.store_many([NewMemory(content=f"item number {i}") for i in range(5)])
    for i, mid in enumerate(ids):
        assert close_to(await stored_vector(db_url, mid), server.expected(f"item number {i}"))
    [req] = server.requests
    assert (req.method, req.path) == ("POST", "/v1/embeddings")
    assert req.authorization == "Bearer sk-secret-123"
    assert req.headers["content-type"] == "application/json"
    assert req.body == {"model": "text-embedding-test",
                        "input": [f"item number {i}" for i in range(5)]}
    found = await memory.search("item number 3", mode="vector", k=1)
    assert found[0].id == ids[3]
    assert "input_type" not in server.requests[-1].body

    # Opened again (an engine start, a CLI command): the store knows the dimension
    again = from_env(ANIMUS_EMBEDDER="openai", ANIMUS_EMBEDDER_URL=server.url,
                     ANIMUS_EMBEDDER_MODEL="text-embedding-test")
    server.reset()
    await Memory.open(db, again)
    assert again.dimension == DIM
    assert server.requests == []  # no probe

    # Without a key there is no Authorization header; batches follow batch_size.
    keyless = http(OpenAIEmbedder, server, key=None, batch_size=4)
    server.reset()
    assert len(await keyless.embed([f"t{i}" for i in range(10)])) == 10
    assert [len(r.inputs) for r in server.requests] == [4, 4, 2]
    assert all(r.authorization is None for r in server.requests)


async def test_voyage_sends_input_type(db: Db, server: EmbeddingServer) -> None:
    embedder = from_env(ANIMUS_EMBEDDER="voyage", ANIMUS_EMBEDDER_URL=server.url,
                        ANIMUS_EMBEDDER_KEY="pa-voyage", ANIMUS_EMBEDDER_DIMENSIONS=str(DIM))
    assert isinstance(embedder, VoyageEmbedder)
    memory = await Memory.open(db, embedder)
    assert server.requests == []  # the dimension was configured: no probe
    m = await memory.store("voyages across the sea")
    await memory.search("sea voyages")
    await memory.search("sea voyages", mode="vector")
    await memory.search("sea voyages", mode="text")  # no embedding needed
    await memory.update(m.id, content="voyages across the ocean")
    kinds = [(r.body["input_type"], r.inputs) for r in server.requests]
    assert kinds == [("document", ["voyages across the sea"]),
                     ("query", ["sea voyages"]), ("query", ["sea voyages"]),
                     ("document", ["voyages across the ocean"])]
    assert {r.body["model"] for r in server.requests} == {"voyage-3.5"}
    assert {r.authorization for r in server.requests} == {"Bearer pa-voyage"}


async def test_server_errors_are_retried_or_reported(db: Db, db_url: str,
                                                     server: EmbeddingServer) -> None:
    embedder = http(OpenAIEmbedder, server, retries=2)
    memory = await Memory.open(db, embedder)
    batch = [NewMemory(content=f"text {i}") for i in range(3)]

    # 429 (and 5xx) are retried: the second answer counts.
    server.script(Fail(429, "rate limited: slow down"))
    assert len(await memory.store_many(batch)) == 3
    assert [r.answered for r in server.requests] == ["Fail", "Reply"]
    assert await rows(db_url) == 3

    cases: list[tuple[list[Any], str, int]] = [
        # a 500 on every attempt: the server's own message is in the error
        ([Fail(500, "model shard 3 is overloaded")] * 3,
         "HTTP 500: .*model shard 3 is overloaded", 3),
        ([Fail(503, "maintenance window", raw=True)] * 3, "HTTP 503: maintenance window", 3),
        # a 4xx is not retried
        ([Fail(400, "unknown model test-embed-1")], "HTTP 400: .*unknown model", 1),
        ([Fail(401, "invalid api key")], "HTTP 401: .*invalid api key", 1),
        ([Garbage()], "not 3 embeddings.*Bad Gateway", 1),
        ([Garbage(b'{"data": "nope"}', "application/json")], "not 3 embeddings", 1),
        ([WrongCount(-1)], "not 3 embeddings", 1),
        ([WrongCount(+2)], "not 3 embeddings", 1),
        ([WrongDimension(DIM // 2)], f"{DIM // 2} dimensions, expected {DIM}", 1),
        # a connection cut mid-body is retried like a network error, then reported
        ([Truncated()] * 3, "unreachable", 3),
    ]
    for script, message, attempts in cases:
        server.reset()
        server.script(*script)
        with pytest.raises(EmbedderError, match=message) as err:
            await memory.store_many(batch)
        assert f"at {server.url}" in str(err.value)
        assert len(server.requests) == attempts, (script, server.requests)
        assert await rows(db_url) == 3
        server.reset()
        server.script(*script)
        with pytest.raises(EmbedderError):  # a search fails the same way
            await memory.search("text", mode="vector")
    server.reset()
    assert len(await memory.store_many(batch)) == 3  # and the server recovers
    assert await rows(db_url) == 6


async def test_a_hanging_server_times_out(db: Db, db_url: str, server: EmbeddingServer) -> None:
    memory = await Memory.open(db, http(OpenAIEmbedder, server, timeout=0.3, retries=1))
    server.script(Hang(), Hang())
    started = time.monotonic()
    with pytest.raises(EmbedderError, match=r"unreachable: .*timed out"):
        await memory.store("never stored")
    assert time.monotonic() - started < 5
    assert len(server.requests) == 2
    assert await rows(db_url) == 0

    # Nothing listening at all: unreachable, with the address in the message.
    server.stop()
    with pytest.raises(EmbedderError, match=r"unreachable: .*(refused|Errno)"):
        await memory.store("never stored either")
    assert await rows(db_url) == 0


async def test_an_http_embedder_with_an_unreachable_server_cannot_open(db: Db) -> None:
    dead = OpenAIEmbedder(url="http://127.0.0.1:9/v1", model="m", key=None, dimension=None,
                          timeout=1, retries=0)
    with pytest.raises(EmbedderError, match="unreachable"):
        await Memory.open(db, dead)  # the dimension probe fails
    async with db.connection() as conn:
        assert await conn.fetchval("SELECT count(*) FROM animus.memory_config") == 0


# -- changing embedders ------------------------------------------------------------------------------


async def test_another_embedder_is_refused_until_reembed(db: Db) -> None:
    await Memory.open(db, HashingEmbedder(DIM))
    await Memory.open(db, HashingEmbedder(DIM))  # the same one: fine
    for other in (HashingEmbedder(32), Counting(HashingEmbedder(DIM))):
        if isinstance(other, Counting):
            other.name = "someone-else"
        with pytest.raises(ConfigError, match="reembed") as err:
            await Memory.open(db, other)
        assert f"hashing-v1-{DIM}" in str(err.value)


async def test_reembed_moves_every_memory(db: Db, db_url: str, memory: Memory) -> None:
    contents = [f"memory {i} about {WORDS[i % len(WORDS)]} and {WORDS[(i * 7) % len(WORDS)]}"
                for i in range(250)]
    ids = await memory.store_many([NewMemory(content=c) for c in contents])
    target = HashingEmbedder(32)
    seen: list[tuple[int, int]] = []
    assert await memory.reembed(target, batch=100,
                                progress=lambda d, t: seen.append((d, t))) == 250
    assert seen == [(100, 250), (200, 250), (250, 250)]
    st = await memory.stats()
    assert (st.embedder, st.dimension, st.reembedding_to, st.total) == ("hashing-v1-32", 32,
                                                                         None, 250)
    async with raw(db_url) as conn:
        assert await conn.fetchval(
            """SELECT format_type(atttypid, atttypmod) FROM pg_attribute
                WHERE attrelid = 'animus.memories'::regclass AND attname = 'embedding'""") \
            == "vector(32)"
        assert await conn.fetchval(
            "SELECT count(*) FROM pg_indexes WHERE indexname = 'memories_embedding'") == 1
        assert await conn.fetchval(
            "SELECT count(DISTINCT embedder) FROM animus.memories") == 1
    assert close_to(await stored_vector(db_url, ids[17]), target.embed_one(contents[17]))

    # search works, with the new embedder (the store switched to it), and for a new store
    found = await memory.search(contents[17], mode="vector", k=1)
    assert found[0].id == ids[17]
    reopened = await Memory.open(db, HashingEmbedder(32))
    assert (await reopened.search(contents[42], k=1))[0].id == ids[42]
    with pytest.raises(ConfigError, match="reembed"):
        await Memory.open(db, HashingEmbedder(DIM))
    assert await reopened.reembed(HashingEmbedder(32)) == 0  # already there


async def test_an_interrupted_reembed_resumes(db: Db, db_url: str, memory: Memory) -> None:
    contents = [f"fact {i}: {WORDS[i % len(WORDS)]}" for i in range(250)]
    await memory.store_many([NewMemory(content=c) for c in contents])
    target = HashingEmbedder(32)
    with pytest.raises(EmbedderError, match="outage"):
        await memory.reembed(FailsAfter(target, 1), batch=100)
    st = await memory.stats()
    assert (st.embedder, st.dimension) == (f"hashing-v1-{DIM}", DIM)
    assert (st.reembedding_to, st.reembed_remaining) == ("hashing-v1-32", 150)

    # Meanwhile the old embedder still serves, and new memories join the re-embed.
    old = await Memory.open(db, HashingEmbedder(DIM))
    assert (await old.search(contents[5], mode="vector", k=1))[0].content == contents[5]
    late = await old.store("a memory stored during the re-embed")
    with pytest.raises(ConfigError, match="in progress"):
        await old.reembed(HashingEmbedder(48))
    same_name = Counting(HashingEmbedder(48))  # same name as the target, another dimension
    same_name.name = target.name
    with pytest.raises(ConfigError, match="in progress"):
        await old.reembed(same_name)

    assert await old.reembed(target, batch=100) == 151  # only what was left
    st = await old.stats()
    assert (st.embedder, st.dimension, st.reembedding_to, st.total) == ("hashing-v1-32", 32,
                                                                         None, 251)
    assert close_to(await stored_vector(db_url, late.id),
                    target.embed_one("a memory stored during the re-embed"))
    fresh = await Memory.open(db, target)
    assert (await fresh.search(contents[99], mode="vector", k=1))[0].content == contents[99]


# -- consolidate: memories commit with the outcome, or not at all ------------------------------------------


class Rememberer(Faculty):
    """Recalls in orient; stores ``params.text`` in consolidate, then (by work type) succeeds,
    raises, or returns an outcome that is not JSON."""

    name = "rememberer"
    accepts = ("remember", "remember_raise", "remember_badjson")
    timeout = 30.0

    def __init__(self, db_url: str) -> None:
        self.db_url = db_url
        self.recalled: dict[str, list[str]] = {}
        self.visible_before_commit: list[int] = []

    async def orient(self, focus: Focus) -> Any:
        found = await focus.memory.search(focus.params["text"], k=3)
        self.recalled[focus.params["text"]] = [m.content for m in found]
        return None

    async def engage(self, focus: Focus, oriented: Any) -> Any:
        return None

    async def consolidate(self, focus: Focus, engaged: Any) -> Any:
        m = await focus.memory.store(focus.params["text"], memory_type="episodic",
                                     metadata={"by": "test"})
        assert (await focus.memory.get(m.id)).content == focus.params["text"]  # same tx
        async with raw(self.db_url) as other:  # another connection cannot see it yet
            self.visible_before_commit.append(await other.fetchval(
                "SELECT count(*) FROM animus.memories WHERE id = $1", m.id))
        if focus.work.work_type == "remember_raise":
            raise RuntimeError("consolidate failed after storing")
        if focus.work.work_type == "remember_badjson":
            return {"not json": object()}
        return {"stored": str(m.id)}


async def test_consolidate_memories_share_the_completion_transaction(
        db: Db, db_url: str, tmp_path: Path) -> None:
    faculty = Rememberer(db_url)
    async with run_engine(db_url, tmp_path, faculties=[faculty]):
        ok = (await db.submit_work(NewWorkItem("remember", source="t")
                                   .params({"text": "the sky is green today"}))).id
        item = await wait_finished(db, ok)
        assert item.state == State.COMPLETED, item.reason

        failed = []
        for work_type in ("remember_raise", "remember_badjson"):
            wid = (await db.submit_work(NewWorkItem(work_type).max_attempts(1).params(
                {"text": f"never stored xyzzy {work_type}"}))).id
            item = await wait_finished(db, wid)
            assert item.state == State.DEAD, item.reason
            failed.append(item)
        assert "consolidate failed after storing" in (failed[0].reason or "")

        later = (await db.submit_work(NewWorkItem("remember")
                                      .params({"text": "what color is the sky"}))).id
        assert (await wait_finished(db, later)).state == State.COMPLETED

    assert faculty.visible_before_commit == [0, 0, 0, 0]
    assert "the sky is green today" in faculty.recalled["what color is the sky"]
    async with raw(db_url) as conn:
        assert await conn.fetchval(
            "SELECT count(*) FROM animus.memories WHERE content LIKE '%xyzzy%'") == 0
        stored = await conn.fetch(
            "SELECT id, content, source, work_id, memory_type, metadata::text "
            "FROM animus.memories ORDER BY created_at")
    assert [(r["content"], r["source"], r["work_id"], r["memory_type"]) for r in stored] == [
        ("the sky is green today", "rememberer", ok, "episodic"),
        ("what color is the sky", "rememberer", later, "episodic")]
    outcome = (await db.get_work_item(ok)).outcome
    assert outcome is not None
    assert outcome.data == {"stored": str(stored[0]["id"])}  # the memory it committed with


PARAM_TEXT = """python -c 'import json; print(json.load(open("work.json"))["params"]["text"])'"""


async def test_shell_hooks_recall_and_store_with_the_cli(db: Db, db_url: str,
                                                         tmp_path: Path) -> None:
    """A TOML faculty whose bash hooks call ``animus memory search|add --json``."""
    toml = write_toml_faculty(tmp_path, "journal", hooks={
        "orient": f"""
            text=$({PARAM_TEXT})
            animus memory search "$text" -k 3 --json > orient-out.json
        """,
        "engage": "true",
        "consolidate": f"""
            text=$({PARAM_TEXT})
            animus memory add "$text" --type episodic --source "$ANIMUS_WORK_TYPE" \\
                --meta "{{\\"work_id\\": \\"$ANIMUS_WORK_ID\\"}}" --json > stored.json
            python - > consolidate-out.json <<'PY'
            import json
            recalled = [m["content"] for m in json.load(open("orient-out.json"))]
            print(json.dumps({{"recalled": recalled, "stored": json.load(open("stored.json"))["id"]}}))
            PY
        """})
    async with run_engine(db_url, tmp_path, faculties_dir=toml.parent):
        first = (await db.submit_work(NewWorkItem("journal").params(
            {"text": "bees dance to tell the hive where the flowers are"}))).id
        done = await wait_finished(db, first, timeout=60)
        assert done.state == State.COMPLETED, done.reason
        second = (await db.submit_work(NewWorkItem("journal").params(
            {"text": "how do bees tell each other where flowers are"}))).id
        done = await wait_finished(db, second, timeout=60)
        assert done.state == State.COMPLETED, done.reason
    outcome = done.outcome.data if done.outcome else None
    assert outcome is not None
    assert outcome["recalled"] == ["bees dance to tell the hive where the flowers are"]
    async with raw(db_url) as conn:
        row = await conn.fetchrow("SELECT source, memory_type, metadata::text AS md, work_id "
                                  "FROM animus.memories WHERE id = $1::uuid", outcome["stored"])
    assert (row["source"], row["memory_type"], json.loads(row["md"]), row["work_id"]) == (
        "journal", "episodic", {"work_id": str(second)}, None)


# -- the command line ----------------------------------------------------------------------------------


def ok(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert "Traceback" not in proc.stderr
    return proc.stdout


@pytest.fixture
def plain_env(cli_env: dict[str, str]) -> dict[str, str]:
    """The CLI environment with the default (offline) embedder, whatever this shell sets."""
    for name in [k for k in cli_env if k.startswith("ANIMUS_EMBEDDER")]:
        del cli_env[name]
    cli_env["ANIMUS_DISABLE_PLUGIN_AUTOLOAD"] = "1"
    return cli_env


async def test_cli_add_search_forget_stats(animus: Any, plain_env: dict[str, str],
                                           db_url: str) -> None:
    added = json.loads(ok(animus("memory", "add", "The deploy key rotates every Friday",
                                 "--type", "procedural", "--source", "ops",
                                 "--meta", '{"team": "infra", "n": 1}', "--json")))
    assert added["content"] == "The deploy key rotates every Friday"
    assert (added["memory_type"], added["source"], added["metadata"]) == (
        "procedural", "ops", {"team": "infra", "n": 1})
    other = ok(animus("memory", "add", "Lunch is at noon")).split()
    assert other[0] == "stored"

    found = json.loads(ok(animus("memory", "search", "deploy key", "--json")))
    assert found[0]["id"] == added["id"]
    assert found[0]["score"] > 0
    assert json.loads(ok(animus("memory", "search", "deploy", "--mode", "text",
                                "--meta", '{"team": "infra"}', "--json")))[0]["id"] == added["id"]
    assert json.loads(ok(animus("memory", "search", "deploy", "--mode", "text",
                                "--type", "semantic", "--json"))) == []
    table = ok(animus("memory", "search", "lunch", "--mode", "text"))
    assert "Lunch is at noon" in table
    assert table.splitlines()[0].split()[:2] == ["score", "id"]

    stats = json.loads(ok(animus("memory", "stats", "--json")))
    assert (stats["total"], stats["by_type"], stats["dimension"]) == (
        2, {"procedural": 1, "semantic": 1}, 384)
    assert ok(animus("memory", "forget", added["id"])).strip() == "forgot 1 of 1"
    gone = animus("memory", "forget", added["id"])
    assert (gone.returncode, gone.stdout.strip()) == (1, "forgot 0 of 1")
    assert json.loads(ok(animus("memory", "stats", "--json")))["total"] == 1
    assert "memories:  1" in ok(animus("memory", "stats"))


async def test_cli_bad_input_exits_2_with_one_line(animus: Any, plain_env: dict[str, str],
                                                   db_url: str) -> None:
    for args, message in [
        (("memory", "add", "x", "--meta", "{not json"), "--meta is not valid JSON"),
        (("memory", "add", "x", "--meta", "[1, 2]"), "--meta must be a JSON object"),
        (("memory", "search", "x", "--meta", "nope"), "--meta is not valid JSON"),
        (("memory", "add", "   "), "content must be a non-empty string"),
        (("memory", "add", "x", "--type", "Big Type"), "lowercase"),
        (("memory", "search", "x", "-k", "0"), "k must"),
    ]:
        proc = animus(*args)
        assert proc.returncode == 2, (args, proc.stdout, proc.stderr)
        assert message in one_error_line(proc.stderr)
    assert await rows(db_url) == 0


async def test_cli_uses_the_configured_http_embedder(animus: Any, plain_env: dict[str, str],
                                                     server: EmbeddingServer,
                                                     db_url: str) -> None:
    plain_env.update(ANIMUS_EMBEDDER="voyage", ANIMUS_EMBEDDER_URL=server.url,
                     ANIMUS_EMBEDDER_MODEL="voyage-test", ANIMUS_EMBEDDER_KEY="pa-cli",
                     ANIMUS_EMBEDDER_DIMENSIONS=str(DIM))
    ok(animus("memory", "add", "remember the milk"))
    assert json.loads(ok(animus("memory", "search", "milk", "--mode", "vector",
                                "--json")))[0]["content"] == "remember the milk"
    assert [(r.body["input_type"], r.authorization) for r in server.requests] == [
        ("document", "Bearer pa-cli"), ("query", "Bearer pa-cli")]
    server.script(Fail(400, "model voyage-test does not exist"))
    proc = animus("memory", "add", "never stored")
    assert proc.returncode == 1
    assert "model voyage-test does not exist" in one_error_line(proc.stderr)
    # another embedder than the one memories use: refused, pointing at reembed
    plain_env.update(ANIMUS_EMBEDDER_DIMENSIONS="32")
    server.state.dimension = 32
    proc = animus("memory", "search", "milk")
    assert proc.returncode == 2
    assert "animus memory reembed" in one_error_line(proc.stderr)
    assert await rows(db_url) == 1


# -- bulk insert: the HNSW index built after the rows ---------------------------------------------


async def _embedding_index(db_url: str) -> tuple[int, str] | None:
    async with raw(db_url) as conn:
        row = await conn.fetchrow(
            """SELECT c.oid::int AS oid, pg_get_indexdef(c.oid) AS definition FROM pg_class c
                WHERE c.oid = to_regclass('animus.memories_embedding')""")
    return None if row is None else (row["oid"], row["definition"])


async def test_a_batch_larger_than_the_table_builds_the_index_after_it(
        memory: Memory, db: Db, db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memory_module, "BULK_MIN", 50)
    data = Clustered(n=100, dim=DIM, clusters=5)
    before = await _embedding_index(db_url)
    assert before is not None
    ids = await memory.store_many(data.items)
    rebuilt = await _embedding_index(db_url)
    assert rebuilt is not None
    assert rebuilt[0] != before[0]  # built again ...
    assert rebuilt[1].replace(str(rebuilt[0]), "") == before[1].replace(str(before[0]), "")
    assert len(ids) == len(set(ids)) == 100
    assert await rows(db_url) == 100
    async with db.connection() as conn:  # ... and usable (a table this small is scanned)
        await conn.execute("SET enable_seqscan = off")
        spy = Explaining(conn)
        found = await memory.bound(spy).search(embedding=data.query(1), mode="vector", k=5)
        await conn.execute("RESET enable_seqscan")
    assert len(found) == 5
    assert any("Index Scan using memories_embedding" in p for p in spy.plans), spy.plans

    # smaller than the table: rows go into the index as usual
    await memory.store_many(Clustered(n=60, dim=DIM, clusters=5).items)
    assert await _embedding_index(db_url) == rebuilt
    assert await rows(db_url) == 160


async def test_a_failed_bulk_insert_leaves_the_index_and_the_table_as_they_were(
        memory: Memory, db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memory_module, "BULK_MIN", 50)
    monkeypatch.setattr(memory_module, "_INSERT", memory_module._INSERT.replace(
        "SELECT c, t, s, md, e, em, w", "SELECT c, t, s, md, e, em, w / 0"))
    before = await _embedding_index(db_url)
    with pytest.raises(DatabaseError):
        await memory.store_many(Clustered(n=100, dim=DIM, clusters=5).items)
    assert await _embedding_index(db_url) == before
    assert await rows(db_url) == 0


async def test_an_operator_bulk_insert_goes_into_the_index_row_by_row(
        memory: Memory, db_url: str, server_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rebuilding the index takes the table's owner: an engine running as animus_operator
    stores a large batch all the same, through the index as usual."""
    monkeypatch.setattr(memory_module, "BULK_MIN", 50)
    before = await _embedding_index(db_url)
    async with team(db_url, server_url, [("otto", "operator")]) as people:
        otto = await people.db("otto")
        ids = await Memory(otto, memory.embedder).store_many(
            Clustered(n=100, dim=DIM, clusters=5).items)
    assert len(ids) == 100
    assert await rows(db_url) == 100
    assert await _embedding_index(db_url) == before  # untouched
