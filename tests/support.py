"""Small helpers shared by the data-plane tests: raw superuser connections and row counts.

Raw connections (plain asyncpg, no animus codecs) stand for "someone with psql": they see
the database exactly as it is stored.
"""

from __future__ import annotations

import contextlib
import itertools
import os
from collections.abc import AsyncIterator
from typing import Any

import asyncpg

from animus_core.store.audit import UNSEALED_SQL


@contextlib.asynccontextmanager
async def raw(db_url: str) -> AsyncIterator[Any]:
    """A plain asyncpg connection as the superuser the tests run as."""
    conn = await asyncpg.connect(db_url)
    try:
        yield conn
    finally:
        await conn.close()


# Everything a write could leave behind, by table.
COUNTED = {
    "items": "SELECT count(*) FROM animus.work_items",
    "messages": "SELECT count(*) FROM pgmq.q_work",
    "archived": "SELECT count(*) FROM pgmq.a_work",
    "audit": "SELECT count(*) FROM animus.audit_log",
    "unsealed": UNSEALED_SQL,
}


async def counts(db_url: str) -> dict[str, int]:
    """Row counts of work items, queue messages (live and archived) and audit rows."""
    async with raw(db_url) as conn:
        return {name: await conn.fetchval(sql) for name, sql in COUNTED.items()}


def one_error_line(stderr: str) -> str:
    """The CLI's error output must be one line starting ``animus: error:``, no traceback."""
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{stderr}"
    assert lines[0].startswith("animus: error:"), stderr
    return lines[0]


_shared = itertools.count()


@contextlib.asynccontextmanager
async def shared_database(server_url: str) -> AsyncIterator[str]:
    """One clone of the migrated template for many cheap tests (the ones that each check
    that they wrote nothing), instead of a clone per test."""
    from tests.conftest import TEMPLATE, with_database

    name = f"animus_shared_{os.getpid()}_{next(_shared)}"
    async with raw(server_url) as admin:
        await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{TEMPLATE}"')
    try:
        yield with_database(server_url, name)
    finally:
        async with raw(server_url) as admin:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def doc_blocks(page: str, heading: str, lang: str) -> list[str]:
    """The fenced ``lang`` code blocks of one section of ``docs/<page>`` (from ``heading``
    to the next heading of its level or higher), in order."""
    import re
    from pathlib import Path

    lines = (Path(__file__).resolve().parent.parent / "docs" / page).read_text("utf-8") \
        .splitlines()
    start = lines.index(heading)
    level = len(heading) - len(heading.lstrip("#"))
    end, fenced = len(lines), False
    for i in range(start + 1, len(lines)):
        if lines[i].startswith(("```", "~~~")):
            fenced = not fenced
        elif not fenced and re.match(rf"#{{1,{level}}} ", lines[i]):
            end = i
            break
    section = "\n".join(lines[start:end]) + "\n"
    return re.findall(rf"^```{lang}\n(.*?)^```", section, re.MULTILINE | re.DOTALL)


def console_examples(page: str, heading: str) -> list[tuple[list[str], list[str]]]:
    """The ``console`` examples of one section of ``docs/<page>``: for each ``$ animus ...``
    line, its arguments and the lines shown after it (until the next command)."""
    import shlex

    examples: list[tuple[list[str], list[str]]] = []
    for block in doc_blocks(page, heading, "console"):
        for line in block.splitlines():
            if line.startswith("$ animus "):
                examples.append((shlex.split(line[len("$ animus "):]), []))
            elif examples:
                examples[-1][1].append(line)
    assert examples, f"no console example under {heading!r} in docs/{page}"
    return examples
