"""``animus up`` (``serve``), ``animus status`` and ``animus demo``."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import os
import signal
import socket
from datetime import datetime
from typing import Any

from animus_core.app import Animus
from animus_core.cli.context import cli_animus, load_faculties, open_db
from animus_core.cli.output import positive, print_json, print_table, seconds
from animus_core.infra.config import Settings
from animus_core.infra.logs import setup_logging
from animus_core.infra.telemetry import setup_telemetry
from animus_core.runtime.engine import EngineOptions
from animus_core.store import read
from animus_core.values.errors import ConfigError
from animus_core.values.states import State
from animus_core.values.work import Created, NewWorkItem


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    for name in ("up", "serve"):
        p = sub.add_parser(name, help="run the engine until SIGINT/SIGTERM"
                           + (" (alias of up)" if name == "serve" else ""))
        _engine_args(p)
        p.set_defaults(handler=up)

    p = sub.add_parser("status", help="queues, running foci, unroutable work, dead letters")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=status)

    p = sub.add_parser("demo", help="start an engine, run each faculty's example, print outcomes")
    p.add_argument("--timeout", type=seconds, default=60.0)
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


async def up(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    telemetry = setup_telemetry(settings)
    options = EngineOptions(
        concurrency=args.concurrency, lease_seconds=args.lease, poll_interval=args.poll,
        grace=args.grace, queues=tuple(args.queue or ("work",)), keep_foci=args.keep_foci)
    try:
        async with Animus(settings, actor=f"engine@{socket.gethostname()}:{os.getpid()}",
                          migrate="always") as animus:
            for q in args.queue or ():
                await animus.db.create_queue(q)
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
    return 0


async def status(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    _, faculties, problems = await load_faculties(settings)
    db = await open_db()
    try:
        view = await read.status(db)
    finally:
        await db.close()
    schedules = [{"name": t.name, "last_tick": t.last_tick.isoformat(), "work_type": t.work_type}
                 for t in view.schedules]
    by_state: dict[str, dict[str, int]] = {}
    for c in view.work:
        by_state.setdefault(c.work_type, {})[c.state] = c.n
    running = {f.name: sum(by_state.get(t, {}).get("running", 0) for t in f.accepts)
               for f in faculties}
    unroutable = sorted(t for t, s in by_state.items()
                        if s.get("queued") and t not in faculties.by_type)
    report: dict[str, Any] = {
        "queues": [{"queue": q.queue, "depth": q.depth, "oldest_seconds": q.oldest_seconds}
                   for q in view.queues],
        "faculties": [{"name": f.name, "accepts": list(f.accepts), "running": running[f.name],
                       "max_concurrent": f.max_concurrent, "origin": f.origin}
                      for f in faculties],
        "work": by_state,
        "unroutable": {t: by_state[t]["queued"] for t in unroutable},
        "dead_letters": {"total": sum(s.get("dead", 0) for s in by_state.values()),
                         "latest": [{"id": str(d.id), "work_type": d.work_type,
                                     "reason": d.reason} for d in view.dead]},
        "schedules": schedules,
        "waiting": {"total": sum(k.n for k in view.waiting),
                    "by_kind": {k.kind: {"n": k.n, "next_wake_at": _iso(k.next_wake_at)}
                                for k in view.waiting},
                    "next": [{"id": str(w.id), "work_type": w.work_type, "wait": w.wait,
                              "wake_at": _iso(w.wake_at), "reason": w.reason}
                             for w in view.next_waking]},
        "plugin_problems": [{"plugin": p.plugin, "error": p.error} for p in problems],
    }
    if args.json:
        print_json(report)
        return 0
    print("queues")
    print_table(["queue", "depth", "oldest"], [(q["queue"], q["depth"],
                f"{q['oldest_seconds']}s" if q["oldest_seconds"] is not None else "")
                for q in report["queues"]])
    print("\nfaculties")
    print_table(["faculty", "accepts", "running", "limit"],
                [(f.name, ",".join(f.accepts), running[f.name], f.max_concurrent)
                 for f in faculties])
    if unroutable:
        print("\nunroutable (no faculty accepts these; they stay queued)")
        print_table(["work type", "queued"], [(t, by_state[t]["queued"]) for t in unroutable])
    if schedules:
        print("\nschedules")
        print_table(["schedule", "last tick", "work type"],
                    [(s["name"], s["last_tick"], s["work_type"]) for s in schedules])
    if view.waiting:
        kinds = ", ".join(f"{k.kind} {k.n}" for k in view.waiting)
        print(f"\nwaiting: {report['waiting']['total']} ({kinds}); first to wake:")
        for w in view.next_waking:
            print(f"  {w.id}  {w.work_type}  {(w.reason or '')[:90]}")
    total_dead = report["dead_letters"]["total"]
    print(f"\ndead letters: {total_dead}")
    for d in view.dead:
        print(f"  {d.id}  {d.work_type}  {(d.reason or '')[:90]}")
    for p in problems:
        print(f"\nplugin problem: {p.plugin}: {p.error}")
    return 0




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
