"""Semantic memory: insert rate, search latency and HNSW recall against plain pgvector.

    .venv/bin/python -m benchmarks.bench_memory [--n N] [--dim D] [--queries Q] [--json PATH]

Everything runs in one process on one fresh database (``animus_bench_memory``, dropped and
created at the start) of the embedded server, or of the server ``DATABASE_URL`` names:

* **insert**: ``Memory.store_many`` in batches (vectors supplied, so no embedder cost) against
  a plain ``COPY`` of the same rows into a bare table with a vector column, alternating batch
  by batch. A third line, ``COPY`` into a table with the same HNSW index, shows how much of
  the gap is the index (animus keeps its HNSW index from the first memory on);
* **search**: p50/p95 latency of vector, full-text, hybrid and filtered hybrid search
  (``k=10``) against a plain ``ORDER BY embedding <=> q LIMIT 10`` on the same rows, the
  paths interleaved query by query;
* **recall@10** of the HNSW path (``search(mode="vector")``) against an exact sequential scan;
* **bulk**: all ``N`` rows in one ``store_many`` into an empty store of a second database
  (``animus_bench_memory_bulk``), which builds the HNSW index once after the rows, and the
  recall of that index.

The data is synthetic but shaped like real memories: vectors in gaussian clusters (one per
topic), and sentences whose words come from the topic's vocabulary plus a Zipf-distributed
general vocabulary, so full-text queries have a few dozen matches, not none or thousands.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import re
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg

from animus_core.faculties.embedders import HashingEmbedder
from animus_core.infra import loop
from animus_core.infra.config import Settings
from animus_core.store.db import Db, describe_url, resolve_url
from animus_core.store.memory import BULK_MIN, Memory, NewMemory
from benchmarks.bench_work import POSTGRES_DEFAULTS, fresh_database

BENCH_DATABASE = "animus_bench_memory"
DEFAULT_N = 20_000
DEFAULT_DIM = 384
DEFAULT_QUERIES = 200
DEFAULT_RECALL_QUERIES = 100
DEFAULT_BATCH = 1000
K = 10
TOPIC_WORDS = 40
GENERAL_WORDS = 5000
TARGETS = {"hybrid_p95_ms": 20.0, "recall_at_10": 0.95, "insert_per_second": 5000.0}

clock = time.perf_counter


# -- synthetic data --------------------------------------------------------------------------------


def _word(rng: random.Random) -> str:
    consonants, vowels = "bcdfghjklmnprstvz", "aeiou"
    return "".join(rng.choice(consonants) + rng.choice(vowels) for _ in range(rng.randint(2, 4)))


def _unit(v: Sequence[float]) -> list[float]:
    n = math.sqrt(sum(x * x for x in v)) or 1.0
    return [x / n for x in v]


@dataclass
class Dataset:
    dim: int
    clusters: int
    centroids: list[list[float]]
    topics: list[list[str]]
    items: list[NewMemory]
    rng: random.Random
    noise: list[list[float]]

    def query_vector(self, cluster: int) -> list[float]:
        """A point near the centroid of ``cluster``: half the noise of a memory."""
        a = self.noise[self.rng.randrange(len(self.noise))]
        return [c + 0.5 * x for c, x in zip(self.centroids[cluster], a, strict=True)]

    def query_text(self, cluster: int) -> str:
        return " ".join(self.rng.sample(self.topics[cluster], 2))


def make_dataset(n: int, dim: int, seed: int = 20240601) -> Dataset:
    """``n`` memories in ``max(10, n // 2000)`` clusters; metadata ``{"shard": 0-99,
    "tenant": 0-9}`` (1% and 10% of the rows per value) and one of four memory types, drawn
    at random, independent of the cluster."""
    rng = random.Random(seed)
    clusters = max(10, n // 2000)
    centroids = [_unit([rng.gauss(0.0, 1.0) for _ in range(dim)]) for _ in range(clusters)]
    # Noise is the sum of two vectors from a pool (one of them rotated): cheap to make in
    # pure Python, and every memory still gets its own vector.
    sigma = 1.0 / math.sqrt(2 * dim)
    noise = [[rng.gauss(0.0, sigma) for _ in range(dim)] for _ in range(512)]
    general = [_word(rng) for _ in range(GENERAL_WORDS)]
    zipf = [1.0 / (r + 1) for r in range(GENERAL_WORDS)]
    topics = [[_word(rng) for _ in range(TOPIC_WORDS)] for _ in range(clusters)]
    types = ("semantic", "episodic", "procedural", "relational")
    items = []
    for i in range(n):
        c = i % clusters
        a, b = rng.choice(noise), rng.choice(noise)
        s = rng.randrange(dim)
        b = b[s:] + b[:s]
        vec = [x + y + z for x, y, z in zip(centroids[c], a, b, strict=True)]
        words = rng.sample(topics[c], 4) + rng.choices(general, zipf, k=8)
        rng.shuffle(words)
        items.append(NewMemory(  # type, source and metadata independent of the cluster
            content=f"{' '.join(words).capitalize()}.", memory_type=rng.choice(types),
            source=f"bench-{rng.randrange(3)}",
            metadata={"shard": rng.randrange(100), "tenant": rng.randrange(10)},
            embedding=vec))
    return Dataset(dim, clusters, centroids, topics, items, rng, noise)


# -- measuring -----------------------------------------------------------------------------------------


@dataclass
class Rate:
    label: str
    items: int = 0
    seconds: float = 0.0

    def add(self, items: int, seconds: float) -> None:
        self.items += items
        self.seconds += seconds

    @property
    def per_second(self) -> float:
        return self.items / self.seconds if self.seconds > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        return {"label": self.label, "items": self.items, "seconds": round(self.seconds, 4),
                "per_second": round(self.per_second, 1)}


@dataclass
class Latency:
    label: str
    samples: list[float]
    results: int = 0  # rows returned, summed

    def pct(self, p: float) -> float:
        """Nearest-rank percentile, in milliseconds."""
        s = sorted(self.samples)
        return 1000 * s[max(0, math.ceil(p / 100 * len(s)) - 1)] if s else 0.0

    def to_json(self) -> dict[str, Any]:
        n = len(self.samples)
        return {"label": self.label, "queries": n, "p50_ms": round(self.pct(50), 3),
                "p95_ms": round(self.pct(95), 3), "max_ms": round(self.pct(100), 3),
                "mean_rows": round(self.results / n, 2) if n else 0}


async def insert_phase(db: Db, memory: Memory, data: Dataset, batch: int
                       ) -> tuple[Rate, Rate, Rate]:
    ours = Rate(f"animus store_many, batches of {batch}")
    bare = Rate(f"COPY into a bare vector({data.dim}) table")
    indexed = Rate("COPY into a table with the same HNSW index")
    async with db.connection() as conn:
        for table, index in (("bench_bare", False), ("bench_hnsw", True)):
            await conn.execute(f"""CREATE TABLE {table} (id bigserial PRIMARY KEY,
                                   content text NOT NULL, embedding vector({data.dim}))""")
            if index:
                await conn.execute(f"""CREATE INDEX ON {table}
                                       USING hnsw (embedding vector_cosine_ops)""")

    def animus_batch(items: Sequence[NewMemory]) -> Callable[[], Awaitable[None]]:
        async def run() -> None:
            t0 = clock()
            await memory.store_many(items)
            ours.add(len(items), clock() - t0)
        return run

    def copy_batch(table: str, rate: Rate, items: Sequence[NewMemory]
                   ) -> Callable[[], Awaitable[None]]:
        async def run() -> None:
            t0 = clock()
            async with db.connection() as conn:
                await conn.copy_records_to_table(
                    table, columns=["content", "embedding"],
                    records=[(m.content, m.embedding) for m in items])
            rate.add(len(items), clock() - t0)
        return run

    chunks = [data.items[i:i + batch] for i in range(0, len(data.items), batch)]
    for k, chunk in enumerate(chunks):
        runs = [animus_batch(chunk), copy_batch("bench_bare", bare, chunk),
                copy_batch("bench_hnsw", indexed, chunk)]
        shift = k % len(runs)  # who goes first rotates every batch
        for run in runs[shift:] + runs[:shift]:
            await run()
    async with db.connection() as conn:
        await conn.execute("ANALYZE animus.memories")
    return ours, bare, indexed


async def bulk_phase(url: str, data: Dataset, recall_queries: int) -> tuple[Rate, dict[str, Any]]:
    """Every row in one ``store_many`` into an empty store: the HNSW index is built once,
    after the rows (``animus_core.store.memory.BULK_MIN``); then recall of that index."""
    how = "index built after" if len(data.items) >= BULK_MIN else f"under {BULK_MIN}: indexed as inserted"
    rate = Rate(f"animus store_many, all {len(data.items)} in one call ({how})")
    db = await Db.connect(url, min_size=1, max_size=2, actor="bench")
    try:
        await db.migrate()
        memory = await Memory.open(db, HashingEmbedder(data.dim))
        t0 = clock()
        await memory.store_many(data.items)
        rate.add(len(data.items), clock() - t0)
        async with db.connection() as conn:
            await conn.execute("ANALYZE animus.memories")
        recall = await recall_phase(db, memory, data, recall_queries)
    finally:
        await db.close()
    return rate, recall


async def search_phase(db: Db, memory: Memory, data: Dataset, queries: int
                       ) -> dict[str, Latency]:
    plain_sql = """SELECT id, embedding <=> $1 AS distance FROM animus.memories
                    ORDER BY embedding <=> $1 LIMIT 10"""

    async def plain(vec: list[float], _text: str, _c: int) -> int:
        async with db.connection() as conn:
            return len(await conn.fetch(plain_sql, vec))

    async def vector(vec: list[float], _text: str, _c: int) -> int:
        return len(await memory.search(embedding=vec, mode="vector", k=K))

    async def text(_vec: list[float], q: str, _c: int) -> int:
        return len(await memory.search(q, mode="text", k=K))

    async def hybrid(vec: list[float], q: str, _c: int) -> int:
        return len(await memory.search(q, embedding=vec, k=K))

    async def hybrid_10(vec: list[float], q: str, f: int) -> int:
        return len(await memory.search(q, embedding=vec, k=K, metadata={"tenant": f % 10}))

    async def hybrid_1(vec: list[float], q: str, f: int) -> int:
        return len(await memory.search(q, embedding=vec, k=K, metadata={"shard": f % 100}))

    async def hybrid_type(vec: list[float], q: str, _c: int) -> int:
        return len(await memory.search(q, embedding=vec, k=K, memory_type="episodic"))

    paths: dict[str, tuple[str, Callable[[list[float], str, int], Awaitable[int]]]] = {
        "plain_vector": ("baseline: ORDER BY embedding <=> q LIMIT 10", plain),
        "vector": ("animus vector", vector),
        "text": ("animus full-text", text),
        "hybrid": ("animus hybrid (RRF)", hybrid),
        "hybrid_type": ("animus hybrid, memory_type filter (25%)", hybrid_type),
        "hybrid_meta_10": ("animus hybrid, metadata filter (10%)", hybrid_10),
        "hybrid_meta_1": ("animus hybrid, metadata filter (1%)", hybrid_1),
    }
    out = {key: Latency(label, []) for key, (label, _) in paths.items()}
    names = list(paths)
    for i in range(queries + 20):  # the first 20 rounds warm up, untimed
        c = data.rng.randrange(data.clusters)
        vec, q = data.query_vector(c), data.query_text(c)
        f = data.rng.randrange(100)  # the filter value (metadata is independent of clusters)
        shift = i % len(names)
        for name in names[shift:] + names[:shift]:
            t0 = clock()
            got = await paths[name][1](vec, q, f)
            if i >= 20:
                out[name].samples.append(clock() - t0)
                out[name].results += got
    return out


async def recall_phase(db: Db, memory: Memory, data: Dataset, queries: int) -> dict[str, Any]:
    """recall@10 of animus vector search (HNSW) and of the plain query, against exact."""
    hits_animus = hits_plain = total = 0
    for _ in range(queries):
        vec = data.query_vector(data.rng.randrange(data.clusters))
        approx = {m.id for m in await memory.search(embedding=vec, mode="vector", k=K)}
        async with db.connection() as conn:
            plain = {r["id"] for r in await conn.fetch(
                "SELECT id FROM animus.memories ORDER BY embedding <=> $1 LIMIT 10", vec)}
            async with conn.transaction():
                await conn.execute("SET LOCAL enable_indexscan = off")
                # Text of its own: a prepared statement planned with the index (the plain
                # query above) would keep using it whatever enable_indexscan says.
                exact = {r["id"] for r in await conn.fetch(
                    "SELECT id FROM animus.memories ORDER BY embedding <=> $1 LIMIT 10 "
                    "/* exact: sequential scan */", vec)}
        hits_animus += len(approx & exact)
        hits_plain += len(plain & exact)
        total += len(exact)
    return {"queries": queries, "k": K,
            "animus_vector": round(hits_animus / total, 4) if total else 0.0,
            "plain_hnsw_default_ef_search": round(hits_plain / total, 4) if total else 0.0}


# -- run and report ------------------------------------------------------------------------------------


async def describe_server(db: Db) -> dict[str, Any]:
    async with db.connection() as conn:
        version = await conn.fetchval("SHOW server_version")
        durability = {k: await conn.fetchval(f"SHOW {k}") for k in POSTGRES_DEFAULTS}
        pgvector = await conn.fetchval(
            "SELECT extversion FROM pg_extension WHERE extname = 'vector'")
        settings = {k: await conn.fetchval(f"SHOW {k}")
                    for k in ("shared_buffers", "maintenance_work_mem", "work_mem")}
    return {"version": version, "pgvector": pgvector, "durability": durability,
            "durability_is_postgres_default": durability == POSTGRES_DEFAULTS,
            "settings": settings}


async def run(n: int, dim: int, queries: int, recall_queries: int, batch: int,
              database: str) -> dict[str, Any]:
    started = clock()
    settings = Settings.from_env()
    server_url = await resolve_url(settings)
    where = "DATABASE_URL" if settings.database_url else f"embedded server in {settings.home}"
    url = await fresh_database(server_url, database)
    t0 = clock()
    data = make_dataset(n, dim)
    generate_s = clock() - t0
    db = await Db.connect(url, min_size=1, max_size=2, actor="bench")
    try:
        await db.migrate()
        server = await describe_server(db)
        memory = await Memory.open(db, HashingEmbedder(dim))
        t1 = clock()
        ours, bare, indexed = await insert_phase(db, memory, data, batch)
        insert_s = clock() - t1
        t2 = clock()
        latency = await search_phase(db, memory, data, queries)
        search_s = clock() - t2
        t3 = clock()
        recall = await recall_phase(db, memory, data, recall_queries)
        recall_s = clock() - t3
        stored = (await memory.stats()).total
        async with db.connection() as conn:
            table_mb = await conn.fetchval(
                "SELECT pg_total_relation_size('animus.memories') / 1048576.0")
    finally:
        await db.close()
    t4 = clock()
    bulk, bulk_recall = await bulk_phase(await fresh_database(server_url, f"{database}_bulk"),
                                         data, recall_queries // 2)
    bulk_s = clock() - t4

    hybrid_p95 = latency["hybrid"].pct(95)
    base_p95 = latency["plain_vector"].pct(95)
    results = {
        "insert": {"animus": ours.to_json(), "copy_bare": bare.to_json(),
                   "copy_hnsw": indexed.to_json(), "animus_bulk": bulk.to_json()},
        "latency": {k: v.to_json() for k, v in latency.items()},
        "recall": recall,
        "bulk_recall": bulk_recall,
    }
    ratios = {
        "insert_vs_copy_bare": round(ours.per_second / bare.per_second, 4)
        if bare.per_second else 0.0,
        "insert_vs_copy_hnsw": round(ours.per_second / indexed.per_second, 4)
        if indexed.per_second else 0.0,
        **{f"{k}_p95_vs_plain": round(v.pct(95) / base_p95, 2) if base_p95 else 0.0
           for k, v in latency.items() if k != "plain_vector"},
    }
    targets = {
        "hybrid_p95_ms": {"value": round(hybrid_p95, 3), "target": f"<= {TARGETS['hybrid_p95_ms']}",
                          "met": hybrid_p95 <= TARGETS["hybrid_p95_ms"]},
        "recall_at_10": {"value": recall["animus_vector"],
                         "target": f">= {TARGETS['recall_at_10']}",
                         "met": recall["animus_vector"] >= TARGETS["recall_at_10"]},
        "insert_per_second": {"value": round(ours.per_second, 1),
                              "target": f">= {TARGETS['insert_per_second']:.0f}",
                              "met": ours.per_second >= TARGETS["insert_per_second"]},
        "bulk_insert_per_second": {"value": round(bulk.per_second, 1),
                                   "target": f">= {TARGETS['insert_per_second']:.0f}",
                                   "met": bulk.per_second >= TARGETS["insert_per_second"]},
        "bulk_recall_at_10": {"value": bulk_recall["animus_vector"],
                              "target": f">= {TARGETS['recall_at_10']}",
                              "met": bulk_recall["animus_vector"] >= TARGETS["recall_at_10"]},
    }
    return {
        "benchmark": "memory",
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "config": {"n": n, "dim": dim, "clusters": data.clusters, "batch": batch, "k": K,
                   "queries": queries, "recall_queries": recall_queries,
                   "embedder": f"hashing-v1-{dim} (vectors supplied: no embedding cost)",
                   "hnsw": "pgvector defaults m=16, ef_construction=64"},
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version()},
        "database": {"where": where, "url": describe_url(url), **server,
                     "memories_mb": round(float(table_mb), 1)},
        "results": results,
        "ratios": ratios,
        "targets": targets,
        "check": {"stored": stored, "ok": stored == n},
        "seconds": {"generate": round(generate_s, 2), "insert": round(insert_s, 2),
                    "search": round(search_s, 2), "recall": round(recall_s, 2),
                    "bulk": round(bulk_s, 2),
                    "total": round(clock() - started, 2)},
    }


def render(report: dict[str, Any]) -> str:
    cfg, machine, dbi = report["config"], report["machine"], report["database"]
    res, ratios, targets = report["results"], report["ratios"], report["targets"]
    dur = dbi["durability"]
    default = "Postgres defaults" if dbi["durability_is_postgres_default"] else "NOT the defaults"
    lines = [
        "animus semantic-memory benchmark (bench_memory)",
        f"  machine     {machine['cpu_count']} cores, {machine['platform']}, "
        f"Python {machine['python']}",
        f"  postgres    {dbi['version']} ({dbi['where']}), pgvector {dbi['pgvector']}, "
        f"database {dbi['url']}",
        f"  durability  fsync={dur['fsync']} synchronous_commit={dur['synchronous_commit']} "
        f"({default}); shared_buffers={dbi['settings']['shared_buffers']}",
        f"  workload    n={cfg['n']} memories, dim={cfg['dim']}, {cfg['clusters']} clusters, "
        f"batches of {cfg['batch']}, k={cfg['k']}, {cfg['queries']} queries per path, "
        f"{cfg['recall_queries']} for recall",
        "",
        f"  {'insert (alternating batch by batch; bulk apart)':<52} {'rows':>8} {'seconds':>9} "
        f"{'per second':>11}",
    ]
    for m in res["insert"].values():
        lines.append(f"  {m['label']:<52} {m['items']:>8} {m['seconds']:>9.2f} "
                     f"{m['per_second']:>11,.0f}")
    lines += ["", f"  {'search, k=10 (interleaved)':<52} {'p50 ms':>8} {'p95 ms':>9} "
              f"{'p95/base':>9} {'rows':>5}"]
    for key, m in res["latency"].items():
        rel = "1.00" if key == "plain_vector" else f"{ratios[f'{key}_p95_vs_plain']:.2f}"
        lines.append(f"  {m['label']:<52} {m['p50_ms']:>8.2f} {m['p95_ms']:>9.2f} "
                     f"{rel:>9} {m['mean_rows']:>5.1f}")
    rec = res["recall"]
    lines += [
        "",
        f"  recall@10 vs exact scan ({rec['queries']} queries): animus vector "
        f"{rec['animus_vector']:.3f}; plain query at default ef_search "
        f"{rec['plain_hnsw_default_ef_search']:.3f}; the index the bulk insert built "
        f"{res['bulk_recall']['animus_vector']:.3f} ({res['bulk_recall']['queries']} queries)",
        f"  ratio       insert animus / COPY bare {ratios['insert_vs_copy_bare']:.3f}; "
        f"/ COPY with HNSW {ratios['insert_vs_copy_hnsw']:.3f}",
        "",
        f"  {'target':<30} {'value':>10} {'target':>10} {'met':>5}",
    ]
    for name, t in targets.items():
        lines.append(f"  {name:<30} {t['value']:>10} {t['target']:>10} "
                     f"{'yes' if t['met'] else 'NO':>5}")
    s = report["seconds"]
    lines += [
        "",
        f"  check       {'ok' if report['check']['ok'] else 'NOT OK'}: "
        f"{report['check']['stored']} memories stored ({dbi['memories_mb']} MB with indexes)",
        f"  time        data {s['generate']:.1f} s, insert {s['insert']:.1f} s, search "
        f"{s['search']:.1f} s, recall {s['recall']:.1f} s, bulk {s['bulk']:.1f} s; "
        f"{s['total']:.1f} s in all",
    ]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_memory",
        description="animus memory insert rate, search latency and recall against plain "
                    "pgvector, same database.")
    p.add_argument("--n", type=int, default=DEFAULT_N,
                   help=f"memories to insert (default {DEFAULT_N}; 100000 for the full size)")
    p.add_argument("--dim", type=int, default=DEFAULT_DIM,
                   help=f"vector dimensions (default {DEFAULT_DIM})")
    p.add_argument("--queries", type=int, default=DEFAULT_QUERIES,
                   help=f"timed queries per search path (default {DEFAULT_QUERIES})")
    p.add_argument("--recall-queries", type=int, default=DEFAULT_RECALL_QUERIES,
                   help=f"queries for recall@10 (default {DEFAULT_RECALL_QUERIES})")
    p.add_argument("--batch", type=int, default=DEFAULT_BATCH,
                   help=f"store_many / COPY batch size (default {DEFAULT_BATCH})")
    p.add_argument("--json", type=Path, metavar="PATH", help="also write the numbers here")
    p.add_argument("--database", default=BENCH_DATABASE,
                   help=f"database to drop and create on the server (default {BENCH_DATABASE})")
    args = p.parse_args(argv)
    if min(args.n, args.queries, args.recall_queries, args.batch) < 1:
        p.error("--n, --queries, --recall-queries and --batch must be at least 1")
    if not 8 <= args.dim <= 2000:
        p.error("--dim must be from 8 to 2000 (the HNSW limit)")
    if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", args.database):
        p.error("--database must be a plain lower-case name (letters, digits, _)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        report = loop.run(run(args.n, args.dim, args.queries, args.recall_queries,
                                 args.batch, args.database))
    except (OSError, asyncpg.PostgresError) as e:
        print(f"bench_memory: {e}", file=sys.stderr)
        return 1
    print(render(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        print(f"  json        {args.json}")
    return 0 if report["check"]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
