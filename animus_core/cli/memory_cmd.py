"""``animus memory``: add, search, forget, stats and reembed semantic memories."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any

from animus_core.cli.context import open_db
from animus_core.cli.output import age, page_size, print_json, print_table, since
from animus_core.faculties.embedders import select_embedder
from animus_core.faculties.plugins import make_plugin_manager
from animus_core.infra.config import Settings
from animus_core.store.memory import Memory, configured_embedder
from animus_core.values.errors import InvalidInput


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    mem = sub.add_parser("memory", help="semantic memory: add, search, list, show, forget, "
                                          "stats, reembed")
    cmds = mem.add_subparsers(dest="memory_command", metavar="COMMAND", required=True)

    p = cmds.add_parser("add", help="store a memory")
    p.add_argument("content", help="the text to remember ('-' reads standard input)")
    p.add_argument("--type", dest="memory_type", default="semantic",
                   help="episodic, semantic, relational, ... (default semantic)")
    p.add_argument("--source", help="where it came from")
    p.add_argument("--meta", metavar="JSON", help="metadata, a JSON object")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(handler=add)

    p = cmds.add_parser("search", help="recall memories (hybrid by default)")
    p.add_argument("query", help="what to look for (words, or a sentence)")
    p.add_argument("-k", type=int, default=10, help="how many results (default 10)")
    p.add_argument("--mode", choices=["hybrid", "vector", "text"], default="hybrid",
                   help="vector similarity, full-text, or both fused (default hybrid)")
    p.add_argument("--type", dest="memory_type", help="only memories of this type")
    p.add_argument("--source", help="only memories from this source")
    p.add_argument("--meta", metavar="JSON", help="only memories whose metadata contains this")
    p.add_argument("--since", type=datetime.fromisoformat, metavar="ISO-TIME",
                   help="only memories created at or after this time")
    p.add_argument("--until", type=datetime.fromisoformat, metavar="ISO-TIME",
                   help="only memories created before this time")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(handler=search)

    p = cmds.add_parser("list", help="the newest memories (no embedding needed)")
    p.add_argument("--type", dest="memory_type", help="only memories of this type")
    p.add_argument("--source", help="only memories from this source")
    p.add_argument("--since", type=since, metavar="WHEN",
                   help="only memories created since WHEN: an ISO time, or an age such as "
                        "30m, 2h, 7d")
    p.add_argument("--limit", type=page_size, default=50,
                   help="at most this many, 1 to 10000 (default 50)")
    p.add_argument("--before", metavar="ID", help="page: memories older than this one")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(handler=list_)

    p = cmds.add_parser("show", help="one memory: its content, type, source, metadata")
    p.add_argument("id", metavar="ID", help="the memory (its id)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(handler=show)

    p = cmds.add_parser("forget", help="delete memories by id")
    p.add_argument("ids", nargs="+", metavar="ID", help="the memories to forget (their ids)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(handler=forget)

    p = cmds.add_parser("stats", help="how many memories, by type; the embedder in use")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(handler=stats)

    p = cmds.add_parser("reembed", help="move every memory to the embedder now configured "
                        "(ANIMUS_EMBEDDER...); resumable")
    p.add_argument("--batch", type=int, default=256,
                   help="memories embedded per request (default 256)")
    p.set_defaults(handler=reembed)


def _meta(text: str | None) -> dict[str, Any] | None:
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise InvalidInput(f"--meta is not valid JSON: {e.msg} at column {e.colno}") from None
    if not isinstance(value, dict):
        raise InvalidInput(f"--meta must be a JSON object, got {type(value).__name__}")
    return value


@asynccontextmanager
async def _memory(*, configure: bool = True) -> AsyncIterator[Memory]:
    settings = Settings.from_env()
    pm, _ = make_plugin_manager(settings)
    embedder = select_embedder(pm, settings)
    db = await open_db()
    try:
        yield await Memory.open(db, embedder) if configure else Memory(db, embedder)
    finally:
        await db.close()


async def add(args: argparse.Namespace) -> int:
    content = sys.stdin.read() if args.content == "-" else args.content
    async with _memory() as memory:
        record = await memory.store(content, memory_type=args.memory_type, source=args.source,
                                    metadata=_meta(args.meta))
    if args.json:
        print_json(record)
    else:
        print(f"stored {record.id}")
    return 0


async def search(args: argparse.Namespace) -> int:
    async with _memory() as memory:
        found = await memory.search(
            args.query, k=args.k, mode=args.mode, memory_type=args.memory_type,
            source=args.source, metadata=_meta(args.meta), since=args.since, until=args.until)
    if args.json:
        print_json(found)
        return 0
    print_table(["score", "id", "type", "content"],
                [(f"{m.score:.4f}" if m.score is not None else "", m.id, m.memory_type,
                  m.content.replace("\n", " ")[:80]) for m in found])
    return 0


async def list_(args: argparse.Namespace) -> int:
    async with _memory(configure=False) as memory:
        found = await memory.recent(limit=args.limit + 1, memory_type=args.memory_type,
                                    source=args.source, since=args.since, before=args.before)
    more, found = len(found) > args.limit, found[:args.limit]
    if args.json:
        print_json(found)
        return 0
    print_table(["id", "type", "source", "created", "content"],
                [(m.id, m.memory_type, m.source or "", age(m.created_at),
                  m.content.replace("\n", " ")[:70]) for m in found])
    if more:
        print(f"(more exist: the next {args.limit} with --before {found[-1].id})")
    return 0


async def show(args: argparse.Namespace) -> int:
    async with _memory(configure=False) as memory:
        m = await memory.get(args.id)
    if args.json:
        print_json(m)
        return 0
    for name, value in (("id", m.id), ("type", m.memory_type), ("source", m.source),
                        ("work item", m.work_id), ("created", m.created_at.isoformat()),
                        ("updated", m.updated_at.isoformat()),
                        ("metadata", json.dumps(m.metadata, ensure_ascii=False))):
        if value is not None:
            print(f"{name + ':':11}{value}")
    print(f"content:\n{m.content}")
    return 0


async def forget(args: argparse.Namespace) -> int:
    async with _memory(configure=False) as memory:
        n = await memory.forget(args.ids)
    if args.json:
        print_json({"forgot": n, "asked": len(args.ids)})
    else:
        print(f"forgot {n} of {len(args.ids)}")
    return 0 if n == len(args.ids) else 1


async def stats(args: argparse.Namespace) -> int:
    async with _memory(configure=False) as memory:
        st = await memory.stats()
    if args.json:
        print_json(st)
        return 0
    print(f"memories:  {st.total}")
    for t, n in st.by_type.items():
        print(f"  {t}: {n}")
    print(f"embedder:  {st.embedder or 'not configured yet'}"
          + (f" ({st.dimension} dimensions)" if st.dimension else ""))
    if st.reembedding_to:
        print(f"reembed:   to {st.reembedding_to}, {st.reembed_remaining} left "
              "(run `animus memory reembed` to continue)")
    return 0


async def reembed(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    pm, _ = make_plugin_manager(settings)
    target = select_embedder(pm, settings)
    db = await open_db()
    try:
        before = await configured_embedder(db)
        memory = Memory(db, target)

        def progress(done: int, total: int) -> None:
            print(f"\rre-embedded {done}/{total}", end="", file=sys.stderr, flush=True)

        n = await memory.reembed(target, batch=args.batch, progress=progress)
    finally:
        await db.close()
    print(file=sys.stderr)
    print(f"{n} memories re-embedded: {before or 'none'} -> {target.name}"
          if n else f"memories already use {target.name}")
    return 0
