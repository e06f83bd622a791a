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


def doc_section(page: str, heading: str) -> str:
    """The text of one section of ``docs/<page>``: from ``heading`` (a whole line) to the
    next heading of its level or above (headings inside code blocks do not count)."""
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
    return "\n".join(lines[start:end]) + "\n"


def code_blocks(page: str, heading: str, language: str) -> list[str]:
    """The ``language`` code blocks of one section of ``docs/<page>``."""
    import re

    blocks = re.findall(rf"^```{language}\n(.*?)^```", doc_section(page, heading),
                        re.MULTILINE | re.DOTALL)
    assert blocks, f"no {language} block under {heading!r} in docs/{page}"
    return blocks


def console_examples(page: str, heading: str) -> list[tuple[list[str], list[str]]]:
    """The ``console`` examples of one section of ``docs/<page>``: for each ``$ animus ...``
    line, its arguments and the lines shown after it (until the next command)."""
    import shlex

    examples: list[tuple[list[str], list[str]]] = []
    for block in code_blocks(page, heading, "console"):
        for line in block.splitlines():
            if line.startswith("$ animus "):
                examples.append((shlex.split(line[len("$ animus "):]), []))
            elif examples:
                examples[-1][1].append(line)
    assert examples, f"no console example under {heading!r} in docs/{page}"
    return examples


# An HTML comment on the line before a code block says how the example is checked
# (tests/test_doc_examples.py): ``<!-- example: not run: REASON -->``,
# ``<!-- example: run by tests/FILE.py -->`` or ``<!-- example: file PATH -->``.
_MARK = "<!-- example: "


class DocBlock:
    """One fenced code block of a Markdown page, with where it is and how it is marked."""

    __slots__ = ("heading", "language", "line", "mark", "page", "text")

    def __init__(self, page: str, line: int, language: str, text: str, heading: str,
                 mark: str | None) -> None:
        self.page, self.line, self.language, self.text = page, line, language, text
        self.heading, self.mark = heading, mark

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"

    def __repr__(self) -> str:
        return f"<{self.language} block at {self.where}>"


def doc_blocks(path: Any) -> list[DocBlock]:
    """Every fenced code block of the Markdown file ``path``, in order."""
    from pathlib import Path

    path = Path(path)
    page = f"docs/{path.name}" if path.parent.name == "docs" else path.name
    lines = path.read_text("utf-8").splitlines()
    blocks: list[DocBlock] = []
    heading, i = "", 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("```"):
            end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("```")), None)
            assert end is not None, f"{page}:{i + 1}: a code block that never closes"
            before = lines[i - 1].strip() if i else ""
            mark = None
            if before.startswith(_MARK):
                assert before.endswith("-->"), f"{page}:{i}: an example mark must end with -->"
                mark = before[len(_MARK):-3].strip()
            blocks.append(DocBlock(page, i + 1, line[3:].strip(), "\n".join(lines[i + 1:end]) + "\n",
                                   heading, mark))
            i = end + 1
            continue
        if line.startswith("#"):
            heading = line
        i += 1
    return blocks
