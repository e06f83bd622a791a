"""What the web console costs: how fast its pages render over a million work items, and what
a hundred people watching cost the database.

    .venv/bin/python -m benchmarks.bench_console [--n N] [--viewers V] [--quick] [--json PATH]

One ``python -m animus_core web`` process on a fresh database of the embedded server (or of
the server ``DATABASE_URL`` names), signed in to as an approver over HTTP:

* ``render``  N work items (90% completed, 5% dead, 4% queued, 1% waiting, of 20 types, with
              about four audit rows each); each page fetched K times, in turn: the overview, the work
              list, its 20th page (paged by ``before``), the list filtered by state and by
              type, an item page; the time from request to the last byte, p50 and p95.
              Target: p95 <= 100 ms for the list, the item page and the overview;
* ``viewers`` a writer moves one item every 100 ms (submit, claim, complete); the database's
              transactions per second over a window with no console, with the console and
              no viewer, and with V viewers on ``/events``; the console's LISTEN connections.
              Target: V viewers add no LISTEN connection and no transactions per second
              beyond noise (at most +10%).

Compare the figures with the load average printed beside them: the machine is shared.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.cookiejar
import os
import re
import signal
import socket
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg

from animus_core.infra import loop
from animus_core.infra.config import Settings
from animus_core.store.db import DEFAULT_QUEUE, Db, describe_url, resolve_url
from animus_core.values.work import NewWorkItem
from animus_core.web import add_person
from benchmarks.bench_engine import (
    Check,
    Line,
    Section,
    Server,
    context_lines,
    fresh_animus_db,
    machine,
    percentile,
    publish,
    render_section,
    xacts,
)
from benchmarks.bench_work import describe_server

DEFAULT_PREFIX = "animus_bench_console"
SECRET = "bench-console-secret-" + "0123456789abcdef" * 2
PERSON, PASSWORD = "bench_viewer", "bench console password"


@dataclass(frozen=True)
class Config:
    n: int = 1_000_000
    k: int = 40  # fetches of each page
    viewers: int = 100
    window: float = 15.0
    quick: bool = False

    @classmethod
    def small(cls) -> Config:
        return cls(n=2_000, k=5, viewers=5, window=2.0, quick=True)

    def to_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


# -- the data ------------------------------------------------------------------------------------

_FILL = """
    INSERT INTO animus.work_items (work_type, params, source, state, reason, attempts,
                                   outcome_data, outcome_error, resolved_at, wait, created_at,
                                   updated_at)
    SELECT 'bench.type' || (g % 20), jsonb_build_object('n', g, 'text', repeat('x', 40)),
           'bench', s.state, s.state::text, CASE WHEN s.state = 'queued' THEN 0 ELSE 1 END,
           CASE WHEN s.state = 'completed' THEN jsonb_build_object('ok', g) END,
           CASE WHEN s.state = 'dead' THEN 'failed on purpose' END,
           CASE WHEN s.state IN ('completed', 'dead') THEN t END,
           CASE WHEN s.state = 'waiting'
                THEN jsonb_build_object('kind', 'event', 'position', 1, 'event', 'go') END,
           t, t
      FROM generate_series($1::bigint, $2::bigint) AS g
     CROSS JOIN LATERAL (SELECT (CASE WHEN g % 100 < 90 THEN 'completed'
                                      WHEN g % 100 < 95 THEN 'dead'
                                      WHEN g % 100 < 99 THEN 'queued'
                                      ELSE 'waiting' END)::animus.work_state AS state,
                                now() - make_interval(secs => ($2 - g)::float8 / 100) AS t) s"""


# each item's audit rows: submitted, then (unless still queued) claimed, running and its state
_AUDIT = """
    INSERT INTO animus.audit_log (work_id, event, from_state, to_state, provenance, db_user,
                                  at, payload)
    SELECT w.id, s.event, s.from_state, s.to_state, '{"source": "bench"}', 'bench',
           w.created_at + s.k * interval '10 ms', s.payload
      FROM (SELECT * FROM animus.work_items ORDER BY created_at OFFSET $1 LIMIT $2) w
     CROSS JOIN LATERAL (VALUES
         (0, 'submitted', NULL::animus.work_state, 'queued'::animus.work_state,
          jsonb_build_object('params', w.params, 'work_type', w.work_type)),
         (1, 'claimed', 'queued', 'claimed', '{"attempts": 0}'::jsonb),
         (2, 'running', 'claimed', 'running', '{"attempts": 1}'),
         (3, CASE WHEN w.state = 'waiting' THEN 'suspended' ELSE w.state::text END, 'running',
          w.state, jsonb_build_object('reason', w.reason))
     ) AS s(k, event, from_state, to_state, payload)
     WHERE s.k = 0 OR w.state <> 'queued'
     ORDER BY w.created_at, s.k"""


async def fill(url: str, n: int) -> float:
    """N items, inserted as they would be after their runs, and their audit rows; the
    triggers are off meanwhile (``session_replication_role``: a superuser's), so that a
    million items take a minute rather than a million submissions."""
    t0 = time.monotonic()
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("SET session_replication_role = replica")
        step = 100_000
        for start in range(1, n + 1, step):
            await conn.execute(_FILL, start, min(n, start + step - 1))
        for offset in range(0, n, step):
            await conn.execute(_AUDIT, offset, step)
        await conn.execute("RESET session_replication_role")
        await conn.execute("VACUUM ANALYZE animus.work_items")
        await conn.execute("VACUUM ANALYZE animus.audit_log")
    finally:
        await conn.close()
    return time.monotonic() - t0


# -- the console ---------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextlib.asynccontextmanager
async def console_process(url: str, home: Path) -> AsyncIterator[str]:
    port = free_port()
    env = {**os.environ, "DATABASE_URL": url, "ANIMUS_HOME": str(home),
           "ANIMUS_WEB_SECRET": SECRET, "LOG_LEVEL": os.environ.get("BENCH_LOG_LEVEL", "warning")}
    log = (home / "web.log").open("wb")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "animus_core", "web", "--bind", f"127.0.0.1:{port}", env=env,
        stdout=log, stderr=log, stdin=asyncio.subprocess.DEVNULL)
    try:
        for _ in range(300):
            with contextlib.suppress(OSError):
                _r, w = await asyncio.open_connection("127.0.0.1", port)
                w.close()
                break
            if proc.returncode is not None:
                raise RuntimeError(f"animus web exited: {(home / 'web.log').read_text()}")
            await asyncio.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(proc.wait(), 15)
        if proc.returncode is None:
            proc.kill()
        log.close()


class Browser:
    """A signed-in HTTP client (urllib, with its cookie), timing each page to its last byte."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.jar = http.cookiejar.CookieJar()
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.jar))

    def get(self, path: str) -> tuple[int, str, float]:
        t0 = time.perf_counter()
        with self.opener.open(self.base + path, timeout=60) as r:
            body = r.read().decode()
            return r.status, body, (time.perf_counter() - t0) * 1000

    def sign_in(self) -> None:
        _status, body, _ms = self.get("/login")
        m = re.search(r'name="csrf" value="([^"]+)"', body)
        assert m, "no CSRF token on the sign-in page"
        data = urllib.parse.urlencode({"csrf": m[1], "name": PERSON, "password": PASSWORD,
                                       "next": "/"}).encode()
        with self.opener.open(self.base + "/login", data=data, timeout=60) as r:
            assert r.status == 200, f"sign-in answered {r.status}"
            assert "Overview" in r.read().decode(), "sign-in failed"

    def cookie(self) -> str:
        return "; ".join(f"{c.name}={c.value}" for c in self.jar)


async def viewer(port: int, cookie: str, stop: asyncio.Event, seen: list[int]) -> None:
    """One page's event stream: a raw HTTP GET of /events, read until ``stop``."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET /events HTTP/1.1\r\nHost: 127.0.0.1\r\nCookie: {cookie}\r\n"
                 "Accept: text/event-stream\r\n\r\n".encode())
    await writer.drain()
    try:
        while not stop.is_set():
            try:
                line = await asyncio.wait_for(reader.readline(), 0.5)
            except TimeoutError:
                continue
            if not line:
                break
            if line.startswith(b"event: change"):
                seen[0] += 1
    finally:
        writer.close()


# -- the sections ----------------------------------------------------------------------------------


async def bench_render(cfg: Config, client: Db, browser: Browser) -> Section:
    async with client.connection() as conn:
        some = await conn.fetchval("SELECT id FROM animus.work_items ORDER BY created_at DESC "
                                   "OFFSET $1 LIMIT 1", cfg.n // 3)
        before = await conn.fetchval("SELECT id FROM animus.work_items ORDER BY created_at "
                                     "DESC, id DESC OFFSET $1 LIMIT 1", min(999, cfg.n // 2))
    pages = {"overview /": "/", "work list /work": "/work",
             "work list, page 20 (before=)": f"/work?before={before}",
             "work list, state=dead": "/work?state=dead",
             "work list, type=bench.type7": "/work?type=bench.type7",
             "work item /work/ID": f"/work/{some}"}
    times: dict[str, list[float]] = {label: [] for label in pages}
    for label, path in pages.items():  # warm: the first fetch plans and caches
        status, _body, _ms = await asyncio.to_thread(browser.get, path)
        assert status == 200, (label, status)
    for _ in range(cfg.k):
        for label, path in pages.items():
            _status, _body, ms = await asyncio.to_thread(browser.get, path)
            times[label].append(ms)
    lines: list[Line] = []
    checks: list[Check] = []
    for label, samples in times.items():
        lines.append(Line(f"{label} p50", percentile(samples, 50), "ms", len(samples)))
        lines.append(Line(f"{label} p95", percentile(samples, 95), "ms", len(samples)))
        target = 100.0 if label in ("overview /", "work list /work", "work item /work/ID") \
            else None
        checks.append(Check(f"{label} p95, ms", percentile(samples, 95), target, "<=", "ms"))
    return Section(
        "render", f"1. page render over {cfg.n:,} work items",
        [f"{cfg.n:,} items (90% completed, 5% dead, 4% queued, 1% waiting; 20 types) and "
         "their audit rows; tables vacuumed and analyzed",
         f"each page fetched {cfg.k} times in turn after one untimed fetch, signed in as an "
         "approver; request to last byte over HTTP (urllib), one at a time"],
        lines=lines, checks=checks)


async def bench_viewers(cfg: Config, url: str, dbname: str, client: Db, base: str,
                        cookie: str) -> Section:
    port = int(base.rsplit(":", 1)[1])
    stop = asyncio.Event()

    async def writer() -> None:
        while not stop.is_set():
            await client.submit_work(NewWorkItem("bench.live", source="bench"))
            for c in await client.claim(DEFAULT_QUEUE, limit=1, start=True,
                                        work_types=["bench.live"]):
                await client.complete(c.lease, {"ok": True})
            await asyncio.sleep(0.1)

    conn = await asyncpg.connect(url)
    results: dict[str, float] = {}
    listeners: dict[str, int] = {}
    seen = [0]
    viewers: list[asyncio.Task[None]] = []
    writing = asyncio.create_task(writer())
    try:
        for phase in ("console, no viewer", f"console, {cfg.viewers} viewers"):
            if phase.endswith("viewers"):
                viewers = [asyncio.create_task(viewer(port, cookie, stop, seen))
                           for _ in range(cfg.viewers)]
                await asyncio.sleep(1.0)
            await asyncio.sleep(1.0)
            a = await xacts(conn, dbname)
            t0 = time.monotonic()
            await asyncio.sleep(cfg.window)
            b = await xacts(conn, dbname)
            results[phase] = (b - a) / (time.monotonic() - t0)
            listeners[phase] = await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND application_name = 'animus-listener'")
    finally:
        stop.set()
        await asyncio.gather(writing, *viewers, return_exceptions=True)
        await conn.close()
    quiet, busy = results["console, no viewer"], results[f"console, {cfg.viewers} viewers"]
    return Section(
        "viewers", f"2. {cfg.viewers} viewers on the live feed",
        ["a writer submits, claims and completes one item every 100 ms throughout",
         f"transactions per second of the database over {cfg.window:g} s (pg_stat_database), "
         "with the console and no viewer, then with the viewers connected to /events",
         "includes the writer's own transactions (the same in both)"],
        lines=[Line(f"transactions/s, {k}", v, "per s") for k, v in results.items()]
        + [Line(f"LISTEN connections, {k}", v, "conns") for k, v in listeners.items()]
        + [Line("change events the viewers received", seen[0], "events")],
        checks=[Check("LISTEN connections with viewers", listeners[
                    f"console, {cfg.viewers} viewers"], 1, "<=", "conns"),
                Check("transactions/s with viewers / without", busy / quiet if quiet else None,
                      1.1, "<=", "x")])


async def run(cfg: Config, prefix: str) -> dict[str, Any]:
    started = time.monotonic()
    load_start = os.getloadavg()
    settings = Settings.from_env()
    server_url = await resolve_url(settings)
    url = await fresh_animus_db(Server(server_url), prefix)
    client = await Db.connect(url, max_size=4, actor="bench-console")
    sections: dict[str, Section] = {}
    try:
        database = await describe_server(client)
        filled = await fill(url, cfg.n)
        await add_person(client, SECRET.encode(), PERSON, "approver", PASSWORD)
        with tempfile.TemporaryDirectory(prefix="animus-bench-console-") as tmp:
            async with console_process(url, Path(tmp)) as base:
                browser = Browser(base)
                await asyncio.to_thread(browser.sign_in)
                for key in ("render", "viewers"):
                    t0 = time.monotonic()
                    load = os.getloadavg()
                    section = (await bench_render(cfg, client, browser) if key == "render"
                               else await bench_viewers(cfg, url, prefix, client, base,
                                                        browser.cookie()))
                    section.seconds = time.monotonic() - t0
                    section.setup.append("load average when it started: "
                                         + " ".join(f"{x:.2f}" for x in load))
                    sections[key] = section
    finally:
        await client.close()
    return {
        "benchmark": "console",
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "config": {**cfg.to_json(), "database": prefix, "fill_seconds": round(filled, 1)},
        "machine": {**machine(), "load_average_start": [round(x, 2) for x in load_start],
                    "load_average_end": [round(x, 2) for x in os.getloadavg()]},
        "database": {"where": "DATABASE_URL" if settings.database_url else
                     f"embedded server in {settings.home}", "server": describe_url(url),
                     **database},
        "sections": {k: s.to_json() for k, s in sections.items()},
        "total_seconds": round(time.monotonic() - started, 3),
    }


def render(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = ["animus web console benchmark", *context_lines(report),
             f"  load avg    {' '.join(map(str, m['load_average_start']))} at the start, "
             f"{' '.join(map(str, m['load_average_end']))} at the end (1, 5, 15 min)",
             f"  fill        {report['config']['n']:,} items in "
             f"{report['config']['fill_seconds']} s"]
    for s in report["sections"].values():
        lines += render_section(s)
    lines.append(f"  time        {report['total_seconds']:.1f} s in all")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_console",
                                description="what the web console costs: page renders over "
                                            "many items, and viewers on the live feed")
    p.add_argument("--n", type=int, help=f"work items (default {Config.n:,})")
    p.add_argument("--k", type=int, help=f"fetches of each page (default {Config.k})")
    p.add_argument("--viewers", type=int, help=f"viewers (default {Config.viewers})")
    p.add_argument("--window", type=float, help=f"seconds measured (default {Config.window:g})")
    p.add_argument("--quick", action="store_true", help="a smoke run of a few seconds")
    p.add_argument("--json", type=Path, metavar="PATH", help="also write the numbers here")
    p.add_argument("--database", default=DEFAULT_PREFIX, metavar="NAME",
                   help=f"database dropped and created (default {DEFAULT_PREFIX})")
    args = p.parse_args(argv)
    for opt in ("n", "k", "viewers"):
        if getattr(args, opt) is not None and getattr(args, opt) < 1:
            p.error(f"--{opt} must be at least 1")
    if not re.fullmatch(r"[a-z_][a-z0-9_]{0,40}", args.database):
        p.error("--database must be a plain lower-case name (letters, digits, _), at most 41")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = Config.small() if args.quick else Config()
    given = {k: getattr(args, k) for k in ("n", "k", "viewers", "window")
             if getattr(args, k) is not None}
    cfg = Config(**{**cfg.to_json(), **given})
    report = loop.run(run(cfg, args.database))
    return publish(render(report), report, args.json)


if __name__ == "__main__":
    sys.exit(main())
