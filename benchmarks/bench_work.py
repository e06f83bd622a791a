"""Work-queue throughput: animus submit, claim and complete against raw pgmq.

    .venv/bin/python -m benchmarks.bench_work [--n N] [--batch B] [--json PATH]

Everything runs in one process on one fresh database (``animus_bench``, dropped and created
at the start) of the embedded server, or of the server ``DATABASE_URL`` names. animus and
the raw pgmq baseline alternate batch by batch (and swap who goes first every round), so
noise on a shared machine lands on both sides alike. Compare the ratios across runs; the
absolute rates depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from animus_core.infra import loop
from animus_core.infra.config import Settings
from animus_core.store.db import DEFAULT_QUEUE, Db, describe_url, resolve_url
from animus_core.values.work import NewWorkItem

BENCH_DATABASE = "animus_bench"
WORK_QUEUE = DEFAULT_QUEUE  # batched submits and the animus drain
SINGLE_QUEUE = "bench_single"  # single submits, kept out of the drain
RAW_QUEUE = "bench_raw"  # raw send_batch, then the raw drain
RAW_SINGLE_QUEUE = "bench_raw_single"  # raw single sends
WORK_TYPE = "bench.noop"
LEASE_SECONDS = 60
TARGET = 0.30
DEFAULT_N = 20_000
DEFAULT_BATCH = 100
POSTGRES_DEFAULTS = {"fsync": "on", "synchronous_commit": "on"}

clock = time.perf_counter
T = TypeVar("T")


@dataclass
class Meter:
    """Items moved by one path and the wall time its calls took."""

    label: str
    unit: str = "items"
    items: int = 0
    seconds: float = 0.0
    calls: int = 0

    def add(self, items: int, seconds: float) -> None:
        self.items += items
        self.seconds += seconds
        self.calls += 1

    @property
    def rate(self) -> float:
        return self.items / self.seconds if self.seconds > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "unit": self.unit,
            "items": self.items,
            "seconds": round(self.seconds, 6),
            "calls": self.calls,
            "per_second": round(self.rate, 1),
        }


def combined(label: str, *parts: Meter) -> Meter:
    """One path made of several calls per batch (claim + complete): the items of the last
    part, the time of all of them."""
    return Meter(
        label=label,
        items=parts[-1].items,
        seconds=sum(p.seconds for p in parts),
        calls=parts[-1].calls,
    )


@dataclass
class Ratio:
    label: str
    value: float
    target: float | None

    @property
    def met(self) -> bool | None:
        return None if self.target is None else self.value >= self.target

    def to_json(self) -> dict[str, Any]:
        return {"label": self.label, "value": round(self.value, 4), "target": self.target,
                "met": self.met}


def ratio(label: str, ours: Meter, base: Meter, target: float | None) -> Ratio:
    return Ratio(label, ours.rate / base.rate if base.rate > 0 else 0.0, target)


# -- workload ------------------------------------------------------------------------------


def make_items(n: int, tag: str) -> list[NewWorkItem]:
    """``n`` no-op submissions; every other one carries a dedup key (all keys distinct, so
    every item is created and the dedup index is checked without collisions)."""
    base = NewWorkItem(WORK_TYPE, source="bench")
    items = []
    for i in range(n):
        item = base.params({"i": i})
        if i % 2 == 0:
            item = item.dedup_key(f"{tag}-{i}")
        items.append(item)
    return items


def raw_messages(items: Sequence[NewWorkItem]) -> list[dict[str, Any]]:
    """The same submissions as plain JSON messages, as a raw pgmq user would enqueue them."""
    return [item.to_json() for item in items]


def batches(seq: Sequence[T], size: int) -> list[Sequence[T]]:
    return [seq[i : i + size] for i in range(0, len(seq), size)]


async def alternate(round_no: int, first: Callable[[], Awaitable[Any]],
                    second: Callable[[], Awaitable[Any]]) -> None:
    """Run both sides, swapping which goes first every round."""
    if round_no % 2:
        first, second = second, first
    await first()
    await second()


# -- the measured operations -------------------------------------------------------------------


async def animus_submit(db: Db, items: Sequence[NewWorkItem], queue: str, meter: Meter) -> None:
    t0 = clock()
    if len(items) == 1:
        await db.submit_work(items[0], queue=queue)
    else:
        await db.submit_many(items, queue=queue)
    meter.add(len(items), clock() - t0)


async def raw_send(db: Db, msgs: Sequence[dict[str, Any]], queue: str, meter: Meter) -> None:
    t0 = clock()
    async with db.connection() as conn:
        if len(msgs) == 1:
            await conn.execute("SELECT pgmq.send($1::text, $2::jsonb)", queue, msgs[0])
        else:
            await conn.execute("SELECT pgmq.send_batch($1::text, $2::jsonb[])", queue, list(msgs))
    meter.add(len(msgs), clock() - t0)


async def animus_drain_step(db: Db, batch: int, claim: Meter, complete: Meter) -> bool:
    """Claim (and start) a batch, complete it; False once the queue is empty."""
    t0 = clock()
    claimed = await db.claim(WORK_QUEUE, limit=batch, lease_seconds=LEASE_SECONDS, start=True)
    t1 = clock()
    claim.add(len(claimed), t1 - t0)
    if not claimed:
        return False
    await db.complete_many([(c.lease, {"ok": True}, 1) for c in claimed])
    complete.add(len(claimed), clock() - t1)
    return True


async def raw_drain_step(db: Db, batch: int, read: Meter, archive: Meter) -> bool:
    """Read a batch, archive it; False once the queue is empty."""
    t0 = clock()
    async with db.connection() as conn:
        rows = await conn.fetch(
            "SELECT * FROM pgmq.read($1::text, $2::int, $3::int)", RAW_QUEUE, LEASE_SECONDS, batch
        )
    t1 = clock()
    read.add(len(rows), t1 - t0)
    if not rows:
        return False
    async with db.connection() as conn:
        await conn.execute(
            "SELECT pgmq.archive($1::text, $2::bigint[])", RAW_QUEUE, [r["msg_id"] for r in rows]
        )
    archive.add(len(rows), clock() - t1)
    return True


# -- phases --------------------------------------------------------------------------------------


async def phase_single(db: Db, n: int) -> tuple[Meter, Meter]:
    ours = Meter("animus submit_work, one at a time")
    base = Meter("raw pgmq send, one at a time")
    items = make_items(n, "single")
    msgs = raw_messages(items)
    for k in range(n):
        await alternate(
            k,
            partial(animus_submit, db, items[k : k + 1], SINGLE_QUEUE, ours),
            partial(raw_send, db, msgs[k : k + 1], RAW_SINGLE_QUEUE, base),
        )
    return ours, base


async def phase_submit(db: Db, n: int, batch: int) -> tuple[Meter, Meter]:
    ours = Meter(f"animus submit_many, batches of {batch}, 50% dedup keys")
    base = Meter(f"raw pgmq send_batch, batches of {batch}")
    items = make_items(n, "batch")
    item_batches = batches(items, batch)
    msg_batches = batches(raw_messages(items), batch)
    for k, (ib, mb) in enumerate(zip(item_batches, msg_batches, strict=True)):
        await alternate(
            k,
            partial(animus_submit, db, ib, WORK_QUEUE, ours),
            partial(raw_send, db, mb, RAW_QUEUE, base),
        )
    return ours, base


async def phase_drain(db: Db, batch: int) -> tuple[Meter, Meter, Meter, Meter]:
    claim = Meter(f"  of which claim(limit={batch}, start=True)")
    complete = Meter("  of which complete_many")
    read = Meter(f"  of which pgmq.read(qty={batch})")
    archive = Meter("  of which pgmq.archive")
    ours_left = base_left = True
    k = 0

    async def ours_step() -> None:
        nonlocal ours_left
        if ours_left:
            ours_left = await animus_drain_step(db, batch, claim, complete)

    async def base_step() -> None:
        nonlocal base_left
        if base_left:
            base_left = await raw_drain_step(db, batch, read, archive)

    while ours_left or base_left:
        await alternate(k, ours_step, base_step)
        k += 1
    return claim, complete, read, archive


async def warm_up(db: Db, batch: int) -> None:
    """One untimed batch through every path, so plans and caches are warm."""
    scratch = Meter("warm-up")
    items = make_items(batch, "warm")
    await animus_submit(db, items, WORK_QUEUE, scratch)
    await animus_submit(db, items[:1], SINGLE_QUEUE, scratch)
    await raw_send(db, raw_messages(items), RAW_QUEUE, scratch)
    await raw_send(db, raw_messages(items[:1]), RAW_SINGLE_QUEUE, scratch)
    claim, complete, read, archive = (Meter("") for _ in range(4))
    while await animus_drain_step(db, batch, claim, complete):
        pass
    while await raw_drain_step(db, batch, read, archive):
        pass


# -- setup ---------------------------------------------------------------------------------------


def with_database(url: str, name: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{name}"))


async def fresh_database(server_url: str, name: str) -> str:
    """Drop and create ``name`` on the server of ``server_url``; return its URL."""
    current = urlsplit(server_url).path.lstrip("/")
    admin_url = with_database(server_url, "postgres") if current == name else server_url
    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return with_database(server_url, name)


async def describe_server(db: Db) -> dict[str, Any]:
    async with db.connection() as conn:
        version = await conn.fetchval("SHOW server_version")
        durability = {k: await conn.fetchval(f"SHOW {k}") for k in POSTGRES_DEFAULTS}
        pgmq = await conn.fetchrow(
            "SELECT install, version FROM animus.components WHERE name = 'pgmq'"
        )
    return {
        "version": version,
        "pgmq": f"{pgmq['version']} ({pgmq['install']})" if pgmq else "unknown",
        "durability": durability,
        "durability_is_postgres_default": durability == POSTGRES_DEFAULTS,
    }


async def check_drained(db: Db, n: int) -> dict[str, Any]:
    async with db.connection() as conn:
        states = await conn.fetch(
            "SELECT state::text, count(*) AS n FROM animus.work_items WHERE queue = $1"
            " GROUP BY state ORDER BY state",
            WORK_QUEUE,
        )
        left = {
            q: await conn.fetchval(f'SELECT count(*) FROM pgmq."q_{q}"')
            for q in (WORK_QUEUE, RAW_QUEUE)
        }
    by_state = {r["state"]: r["n"] for r in states}
    return {"work_items_by_state": by_state, "messages_left": left,
            "ok": set(by_state) == {"completed"} and not any(left.values())}


# -- run and report --------------------------------------------------------------------------------


async def run(n: int, batch: int, database: str) -> dict[str, Any]:
    started = clock()
    settings = Settings.from_env()
    server_url = await resolve_url(settings)
    where = "DATABASE_URL" if settings.database_url else f"embedded server in {settings.home}"
    url = await fresh_database(server_url, database)
    n_single = max(1, n // 10)
    db = await Db.connect(url, min_size=1, max_size=2, actor="bench")
    try:
        await db.migrate()
        await db.create_queue(SINGLE_QUEUE)
        async with db.connection() as conn:
            for q in (RAW_QUEUE, RAW_SINGLE_QUEUE):
                await conn.execute("SELECT pgmq.create($1::text)", q)
        server = await describe_server(db)
        await warm_up(db, batch)

        t0 = clock()
        single, raw_single = await phase_single(db, n_single)
        submit, send_batch = await phase_submit(db, n, batch)
        claim, complete, read, archive = await phase_drain(db, batch)
        measured_s = clock() - t0

        t1 = clock()
        sealed = await db.seal_audit()
        seal = Meter("audit seal_audit() after the run", unit="rows")
        seal.add(sealed, clock() - t1)
        check = await check_drained(db, n)
    finally:
        await db.close()

    drain = combined(f"animus claim+complete, batches of {batch}", claim, complete)
    raw_drain = combined(f"raw pgmq read+archive, batches of {batch}", read, archive)
    ratios = [
        ratio("batched submit / raw send_batch", submit, send_batch, TARGET),
        ratio("claim+complete / raw read+archive", drain, raw_drain, TARGET),
        ratio("single submit / raw send (no target)", single, raw_single, None),
    ]
    meters = {
        "single_submit": single, "raw_single_send": raw_single,
        "batched_submit": submit, "raw_send_batch": send_batch,
        "claim_complete": drain, "claim": claim, "complete": complete,
        "raw_read_archive": raw_drain, "raw_read": read, "raw_archive": archive,
        "audit_seal": seal,
    }
    return {
        "benchmark": "work",
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "config": {"n": n, "n_single": n_single, "batch": batch, "lease_seconds": LEASE_SECONDS,
                   "dedup_fraction": 0.5},
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version()},
        "database": {"where": where, "url": describe_url(url), **server},
        "results": {k: m.to_json() for k, m in meters.items()},
        "ratios": {k: r.to_json() for k, r in zip(
            ("batched_submit_vs_send_batch", "claim_complete_vs_read_archive",
             "single_submit_vs_send"), ratios, strict=True)},
        "check": check,
        "measured_seconds": round(measured_s, 3),
        "total_seconds": round(clock() - started, 3),
    }


def render(report: dict[str, Any]) -> str:
    cfg, machine, dbi = report["config"], report["machine"], report["database"]
    dur = dbi["durability"]
    default = "Postgres defaults" if dbi["durability_is_postgres_default"] else "NOT the defaults"
    lines = [
        "animus work-queue benchmark (bench_work)",
        f"  machine     {machine['cpu_count']} cores, {machine['platform']}, "
        f"Python {machine['python']}",
        f"  postgres    {dbi['version']} ({dbi['where']}), database {dbi['url']}, "
        f"pgmq {dbi['pgmq']}",
        f"  durability  fsync={dur['fsync']} synchronous_commit={dur['synchronous_commit']} "
        f"({default})",
        f"  workload    n={cfg['n']} (single submits: {cfg['n_single']}), batch={cfg['batch']}, "
        "animus and raw pgmq alternate batch by batch",
        "",
        f"  {'path':<52} {'items':>8} {'seconds':>9} {'per second':>11}",
    ]
    for m in report["results"].values():
        unit = "" if m["unit"] == "items" else f" {m['unit']}"
        lines.append(
            f"  {m['label']:<52} {m['items']:>8} {m['seconds']:>9.3f} "
            f"{m['per_second']:>11,.0f}{unit}"
        )
    lines += ["", f"  {'ratio (same run)':<52} {'value':>8} {'target':>9} {'met':>11}"]
    for r in report["ratios"].values():
        target = "-" if r["target"] is None else f">= {r['target']:.2f}"
        met = "-" if r["met"] is None else ("yes" if r["met"] else "NO")
        lines.append(f"  {r['label']:<52} {r['value']:>8.3f} {target:>9} {met:>11}")
    check = report["check"]
    lines += [
        "",
        f"  drained     {'ok' if check['ok'] else 'NOT OK'}: work items by state "
        f"{check['work_items_by_state']}, messages left {check['messages_left']}",
        f"  time        {report['measured_seconds']:.1f} s measured, "
        f"{report['total_seconds']:.1f} s in all",
    ]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_work",
        description="animus submit/claim/complete throughput against raw pgmq, same database.",
    )
    p.add_argument("--n", type=int, default=DEFAULT_N,
                   help=f"items for the batched paths (default {DEFAULT_N}); single submits "
                   "use n/10")
    p.add_argument("--batch", type=int, default=DEFAULT_BATCH,
                   help=f"batch size for submit, send_batch, claim and read "
                   f"(default {DEFAULT_BATCH})")
    p.add_argument("--json", type=Path, metavar="PATH", help="also write the numbers here")
    p.add_argument("--database", default=BENCH_DATABASE,
                   help=f"database to drop and create on the server (default {BENCH_DATABASE})")
    args = p.parse_args(argv)
    if args.n < 1 or args.batch < 1:
        p.error("--n and --batch must be at least 1")
    if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", args.database):
        p.error("--database must be a plain lower-case name (letters, digits, _)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    report = loop.run(run(args.n, args.batch, args.database))
    print(render(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        print(f"  json        {args.json}")
    return 0 if report["check"]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
