"""Container health check for the animus engine (Dockerfile HEALTHCHECK).

Healthy when an engine listener (``application_name = 'animus-listener'``) from this
container is connected to the database (over a local socket, loopback or one of this host's
addresses): the engine is up, reached Postgres and waits for work. Exit 0 healthy, 1 not.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sys

import asyncpg

from animus_core.infra.config import Settings
from animus_core.store.db import resolve_url


async def listening() -> bool:
    url = await resolve_url(Settings.from_env())
    conn = await asyncpg.connect(url, timeout=5)
    try:
        n: int = await conn.fetchval(
            """SELECT count(*) FROM pg_stat_activity
                WHERE application_name = 'animus-listener' AND datname = current_database()
                  AND (client_addr IS NULL OR host(client_addr) = ANY ($1::text[]))""",
            _addresses())
        return n > 0
    finally:
        await conn.close()


def _addresses() -> list[str]:
    found = {"127.0.0.1", "::1"}
    with contextlib.suppress(OSError):
        found |= {str(info[4][0]) for info in socket.getaddrinfo(socket.gethostname(), None)}
    return sorted(found)


def main() -> int:
    try:
        ok = asyncio.run(asyncio.wait_for(listening(), 8))
    except Exception as e:
        print(f"animus health check: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    if not ok:
        print("animus health check: no engine listener is connected", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
