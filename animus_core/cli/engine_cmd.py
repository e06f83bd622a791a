"""``animus up`` (``serve``), ``animus status``, ``animus stop`` and ``animus demo``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import os
import signal
import socket
import sys
from datetime import datetime
from typing import Any
from uuid import UUID

from animus_core.app import Animus
from animus_core.cli.context import cli_animus, open_db, problems_printed
from animus_core.cli.output import age, parse_bind, positive, print_json, print_table, seconds
from animus_core.infra.config import Settings
from animus_core.infra.logs import setup_logging
from animus_core.infra.telemetry import setup_telemetry
from animus_core.runtime.engine import Engine as EngineRuntime
from animus_core.runtime.engine import EngineOptions
from animus_core.runtime.probes import Probes, serve_probes
from animus_core.store import engines, read
from animus_core.store.db import Db
from animus_core.values.engines import Engine
from animus_core.values.errors import ConfigError, InvalidInput
from animus_core.values.states import State
from animus_core.values.work import Created, NewWorkItem


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    for name in ("up", "serve"):
        p = sub.add_parser(name, help="run the engine until SIGINT/SIGTERM"
                           + (" (alias of up)" if name == "serve" else ""))
        _engine_args(p)
        p.set_defaults(handler=up)

    p = sub.add_parser("status", help="the fleet: live and lost engines, their faculties, "
                                      "stuck work, queues, waiting work, dead letters")
    p.add_argument("--json", action="store_true", help="print it as JSON")
    p.add_argument("--watch", type=seconds, nargs="?", const=2.0, metavar="SECONDS",
                   help="refresh in place every SECONDS (default 2) until Ctrl-C")
    p.set_defaults(handler=status)

    p = sub.add_parser("stop", help="ask engines to drain and stop, through the database "
                                    "(any host; needs the operator role)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--engine", metavar="ID", help="the engine (its id, or a unique "
                                                       "prefix as `animus status` shows it)")
    which.add_argument("--all", action="store_true", help="every live engine")
    p.add_argument("--grace", type=seconds, help="seconds running foci may finish before "
                                                 "they are released (default: each engine's)")
    p.add_argument("--wait", type=seconds, nargs="?", const=60.0, metavar="SECONDS",
                   help="wait until they stopped (default 60 s); exit 1 if some did not")
    p.add_argument("--json", action="store_true", help="print the engines asked as JSON")
    p.set_defaults(handler=stop)

    p = sub.add_parser("demo", help="start an engine, run each faculty's example, print outcomes")
    p.add_argument("--timeout", type=seconds, default=60.0,
                   help="seconds to wait for each example to finish (default 60)")
    p.set_defaults(handler=demo)


def _engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--concurrency", type=positive, default=64, help="foci at once (all faculties)")
    p.add_argument("--lease", type=positive, default=60, help="lease (visibility timeout) seconds")
    p.add_argument("--poll", type=seconds, default=10.0, help="fallback poll interval, seconds")
    p.add_argument("--grace", type=seconds, default=30.0,
                   help="seconds in-flight foci may finish after SIGTERM before release")
    p.add_argument("--queue", action="append", help="queues to serve (default: work)")
    p.add_argument("--keep-foci", action="store_true",
                   help="keep focus directories of failed foci for debugging")
    p.add_argument("--heartbeat", type=seconds, default=5.0,
                   help="seconds between heartbeats (lost after three missed; default 5)")
    p.add_argument("--probes", metavar="HOST:PORT", default=None,
                   help="answer GET /livez and /readyz there, for an orchestrator's probes "
                        "(see docs/operations-kubernetes.md)")
    p.add_argument("--cpython-gc", action="store_true",
                   help="leave CPython's full garbage collections to CPython instead of the "
                        "engine's schedule (see docs/operations.md)")


async def up(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    options = EngineOptions(
        concurrency=args.concurrency, lease_seconds=args.lease, poll_interval=args.poll,
        grace=args.grace, queues=tuple(args.queue or ("work",)), keep_foci=args.keep_foci,
        heartbeat=max(0.1, args.heartbeat), schedule_gc=not args.cpython_gc)
    engine: EngineRuntime | None = None
    probes = None
    if args.probes is not None:  # answering from the start: before the database is reached
        host, port = parse_bind(args.probes, "--probes")
        probes = await serve_probes(Probes(lambda: engine, poll_interval=options.poll_interval),
                                    host, port)
    telemetry = setup_telemetry(settings)
    try:
        async with Animus(settings, actor=f"engine@{socket.gethostname()}:{os.getpid()}",
                          migrate="always") as animus:
            for q in args.queue or ():
                await animus.db.create_queue(q)
            with problems_printed():
                await animus.load_faculties()
            for problem in animus.problems:
                print(f"animus: plugin problem: {problem.plugin}: {problem.error}")
            if not len(animus.faculties):
                print(f"animus: no faculties: add TOML files to {settings.faculties_dir}/ or "
                      "install a faculty package; work stays queued until then")
            engine = animus.engine(options)
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, engine.stop)
            await engine.run()
    finally:
        telemetry.shutdown()
        if probes is not None:
            probes.close()
    return 0


async def status(args: argparse.Namespace) -> int:
    db = await open_db()
    try:
        if args.watch is None:
            view = await read.status(db)
            if args.json:
                print_json(status_report(view))
            else:
                print_status(view)
            return 0
        tty = sys.stdout.isatty()
        while True:  # one query per refresh; Ctrl-C ends it
            view = await read.status(db)
            if tty:
                sys.stdout.write("\x1b[H\x1b[2J")  # in place: home, clear the screen
            if args.json:
                print_json(status_report(view))
            else:
                print(f"animus status, every {args.watch:g}s (Ctrl-C to stop)  "
                      f"{view.now.isoformat(timespec='seconds')}\n")
                print_status(view)
            sys.stdout.flush()
            await asyncio.sleep(args.watch)
    finally:
        await db.close()


def status_report(view: read.Status) -> dict[str, Any]:
    """What ``animus status --json`` prints: the same content as the text."""
    by_state: dict[str, dict[str, int]] = {}
    for c in view.work:
        by_state.setdefault(c.work_type, {})[c.state] = c.n
    oldest = {c.work_type: c.oldest for c in view.work if c.state == "queued"}
    return {
        "now": view.now.isoformat(),
        "engines": [{
            "id": str(e.id), "host": e.host, "pid": e.pid, "version": e.version,
            "db_user": e.db_user, "started_at": e.started_at.isoformat(),
            "last_seen": e.last_seen.isoformat(), "state": _engine_state(e),
            "concurrency": e.concurrency, "running": sum(e.running.values()),
            "queues": e.queues,
            "faculties": [{"name": f.name, "origin": f.origin, "accepts": f.accepts,
                           "running": e.running.get(f.name, 0), "limit": f.max_concurrent,
                           "disabled": e.disabled.get(f.name)} for f in e.faculties],
            "schedules": [{"name": t.name, "work_type": t.work_type,
                           "next_tick": _iso(t.next_tick)} for t in e.schedules],
            "stop_requested_at": _iso(e.stop_requested_at),
            "stop_requested_by": e.stop_requested_by} for e in view.engines],
        "queues": [{"queue": q.queue, "depth": q.depth, "oldest_seconds": q.oldest_seconds}
                   for q in view.queues],
        "work": by_state,
        "oldest_queued": {t: _iso(w) for t, w in sorted(oldest.items())},
        "stuck": [{"work_type": w.work_type, "queued": w.queued, "reason": w.reason}
                  for w in view.stuck()],
        "waiting": {"total": sum(k.n for k in view.waiting),
                    "by_kind": {k.kind: {"n": k.n, "next_wake_at": _iso(k.next_wake_at)}
                                for k in view.waiting},
                    "next": [{"id": str(w.id), "work_type": w.work_type, "wait": w.wait,
                              "wake_at": _iso(w.wake_at), "reason": w.reason}
                             for w in view.next_waking]},
        "dead_letters": {"total": sum(s.get("dead", 0) for s in by_state.values()),
                         "latest": [{"id": str(d.id), "work_type": d.work_type,
                                     "reason": d.reason} for d in view.dead]},
        "schedules": _schedules(view),
    }


def print_status(view: read.Status) -> None:
    live = [e for e in view.engines if not e.lost]
    lost = [e for e in view.engines if e.lost]
    print(f"engines: {len(live)} live" + (f", {len(lost)} lost" if lost else ""))
    if view.engines:
        print_table(["engine", "host:pid", "version", "started", "last seen", "state",
                     "running"],
                    [(str(e.id)[:8], f"{e.host}:{e.pid}", e.version, age(e.started_at),
                      age(e.last_seen), _engine_state(e),
                      f"{sum(e.running.values())}/{e.concurrency}") for e in view.engines])
        print("\nfaculties")
        print_table(["engine", "faculty", "accepts", "running", "limit", "origin"],
                    [(str(e.id)[:8], f.name, ",".join(f.accepts),
                      f"disabled: {e.disabled[f.name]}" if f.name in e.disabled
                      else e.running.get(f.name, 0), f.max_concurrent, f.origin)
                     for e in live for f in e.faculties])
    else:
        print("  no engine is registered: start one with `animus up`")
    stuck = view.stuck()
    if stuck:
        print("\nstuck: queued work no live engine will run")
        print_table(["work type", "queued", "why"],
                    [(w.work_type, w.queued, w.reason) for w in stuck])
    print("\nqueues")
    print_table(["queue", "depth", "oldest"], [(q.queue, q.depth,
                f"{q.oldest_seconds}s" if q.oldest_seconds is not None else "")
                for q in view.queues])
    if view.work:
        states = [s.value for s in State if any(c.state == s.value for c in view.work)]
        counts = {(c.work_type, c.state): c.n for c in view.work}
        oldest = {c.work_type: c.oldest for c in view.work if c.state == "queued"}
        types = sorted({c.work_type for c in view.work})
        print("\nwork")
        print_table(["work type", *states, "oldest queued"],
                    [(t, *[counts.get((t, s), "") for s in states],
                      age(oldest.get(t)) if oldest.get(t) else "") for t in types])
    schedules = _schedules(view)
    if schedules:
        print("\nschedules")
        print_table(["schedule", "work type", "last tick", "next tick"],
                    [(t["name"], t["work_type"] or "", t["last_tick"] or "",
                      t["next_tick"] or "") for t in schedules])
    if view.waiting:
        kinds = ", ".join(f"{k.kind} {k.n}" for k in view.waiting)
        print(f"\nwaiting: {sum(k.n for k in view.waiting)} ({kinds}); first to wake:")
        for w in view.next_waking:
            print(f"  {w.id}  {w.work_type}  {(w.reason or '')[:90]}")
    dead = sum(c.n for c in view.work if c.state == "dead")
    print(f"\ndead letters: {dead}")
    for d in view.dead:
        print(f"  {d.id}  {d.work_type}  {(d.reason or '')[:90]}")


def _engine_state(e: Engine) -> str:
    if e.lost:
        return "lost"
    return "stopping" if e.stop_requested_at is not None else "live"


def _schedules(view: read.Status) -> list[dict[str, Any]]:
    """Each schedule: its latest tick (from the database) and its next (the earliest a
    live engine that runs it expects)."""
    out: dict[str, dict[str, Any]] = {
        t.name: {"name": t.name, "work_type": t.work_type,
                 "last_tick": t.last_tick.isoformat(), "next_tick": None}
        for t in view.schedules}
    for e in view.engines:
        if e.lost:
            continue
        for s in e.schedules:
            entry = out.setdefault(s.name, {"name": s.name, "work_type": s.work_type,
                                            "last_tick": None, "next_tick": None})
            entry["work_type"] = entry["work_type"] or s.work_type
            nxt = _iso(s.next_tick)
            if nxt is not None and (entry["next_tick"] is None or nxt < entry["next_tick"]):
                entry["next_tick"] = nxt
    return [out[k] for k in sorted(out)]


async def stop(args: argparse.Namespace) -> int:
    if args.engine is None and not args.all:
        raise InvalidInput("say which engines to stop: --engine ID (from `animus status`) or "
                           "--all")
    db = await open_db()
    try:
        engine_id = await _engine_id(db, args.engine) if args.engine else None
        asked = await engines.stop_engines(db, engine_id, grace=args.grace)
        if args.wait is not None and asked:
            deadline = asyncio.get_running_loop().time() + args.wait
            while True:
                left = [e for e in (await read.status(db)).engines
                        if e.id in asked and not e.lost]
                if not left or asyncio.get_running_loop().time() > deadline:
                    break
                await asyncio.sleep(0.5)
        else:
            left = []
    finally:
        await db.close()
    if args.json:
        print_json({"asked": [str(i) for i in asked], "still_running": [str(e.id) for e in left]})
        return 1 if left else 0
    if not asked:
        print("no live engine to ask" if engine_id is None else
              f"engine {engine_id} is not live (it stopped, or its heartbeats did: `animus "
              "status` shows it lost): nothing to ask")
        return 0
    for i in asked:
        print(f"asked engine {i} to stop"
              + (f" within {args.grace:g}s" if args.grace is not None else ""))
    if args.wait is not None:
        for e in left:
            print(f"engine {e.id} ({e.host}:{e.pid}) is still running after {args.wait:g}s")
        if not left:
            print("stopped")
    return 1 if left else 0


async def _engine_id(db: Db, given: str) -> UUID:
    """An engine id, or the unique prefix of one (as `animus status` shows them)."""
    with contextlib.suppress(ValueError):
        return UUID(given)
    ids = [e.id for e in (await read.status(db)).engines if str(e.id).startswith(given.lower())]
    if len(ids) != 1:
        raise InvalidInput(f"{given!r} is not an engine id nor the prefix of exactly one "
                           f"({len(ids)} match): `animus status` lists the engines")
    return ids[0]


def _iso(when: datetime | None) -> str | None:
    return None if when is None else when.isoformat()


async def demo(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    setup_logging("warning" if settings.log_level == "info" else settings.log_level)
    async with cli_animus(pool_size=10) as animus, \
            animus.running(EngineOptions(poll_interval=2.0)) as engine:
        examples = [f for f in engine.faculties if f.example is not None]
        if not examples:
            raise ConfigError(
                f"no faculty has an example to run: add TOML faculties to "
                f"{settings.faculties_dir}/ or install plugins/animus-faculty-summarize")
        print(f"engine running with {len(engine.faculties)} faculties: "
              + ", ".join(f"{f.name} ({f.origin})" for f in engine.faculties))
        submitted = []
        for fac in examples:
            res = await animus.governed.submit(
                NewWorkItem(fac.accepts[0], source=f"demo:{getpass.getuser()}")
                .params(fac.example or {}))
            assert isinstance(res, Created)
            print(f"submitted {fac.accepts[0]} -> {fac.name}: {res.id}")
            submitted.append((fac, res.id))
        ok = True
        for fac, wid in submitted:
            item = await animus.wait_finished(wid, args.timeout)
            ok &= item.state == State.COMPLETED
            print(f"\n{fac.name}: {item.state} in {item.outcome.duration_ms} ms "
                  f"(attempt {item.attempts})")
            if item.outcome.data is not None:
                print_json(item.outcome.data)
            if item.state != State.COMPLETED:
                print(f"reason: {item.reason}")
    async with cli_animus() as animus:
        result = await animus.db.verify_audit()
    print(f"\naudit chain: {'intact' if result.ok else 'BROKEN'} ({result.checked} rows)")
    return 0 if ok else 1
