"""The engine's probes (``animus up --probes``): ready once it listens for work, not ready
while it drains, live while its scheduler loop turns (and while it starts and drains), and
answering from its own event loop (docs/operations-kubernetes.md)."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from animus_core import NewWorkItem
from animus_core.cli.output import http_url, parse_bind
from animus_core.runtime.probes import Probes
from animus_core.values.errors import InvalidInput
from tests.engine_helpers import (
    engine_processes,
    free_port,
    wait_until,
    write_toml_faculty,
)

pytestmark = pytest.mark.slow


async def probe(port: int, path: str) -> tuple[int, dict[str, Any]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nhost: x\r\n\r\n".encode())
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


async def answers(port: int, path: str) -> tuple[int, dict[str, Any]] | None:
    try:
        return await probe(port, path)
    except OSError:
        return None


async def test_ready_once_listening_unready_while_draining_live_throughout(
        db: Any, cli_env: dict[str, str], tmp_path: Path) -> None:
    write_toml_faculty(tmp_path, "slow", relative_to=tmp_path,
                       hooks={"engage": "sleep 4; echo '{}' > engage-out.json"})
    env = {**cli_env, "ANIMUS_FACULTIES": "faculties", "ANIMUS_HOME": str(tmp_path / "home"),
           "ANIMUS_DISABLE_PLUGIN_AUTOLOAD": "1"}
    port = free_port()
    with engine_processes(env, tmp_path) as start:
        engine = start("--probes", f"127.0.0.1:{port}", "--grace", "20")

        async def ready() -> bool:
            got = await answers(port, "/readyz")
            return got is not None and got[0] == 200

        await wait_until(ready, 30, message="the engine to be ready")
        status, body = await probe(port, "/readyz")
        assert body == {"ok": True, "started": True, "listening": True, "stopping": False}
        status, body = await probe(port, "/livez")
        assert status == 200
        assert body["ok"] is True
        assert body["scheduler_turned_seconds_ago"] < body["stuck_after_seconds"]
        assert (await probe(port, "/metrics"))[0] == 404

        made = await db.submit_work(NewWorkItem("slow", source="test"))
        await wait_until(lambda: _state(db, made.id, "running"), 20, message="the focus")
        engine.signal(signal.SIGTERM)  # drains: the focus may finish within the grace

        async def draining() -> bool:
            got = await answers(port, "/readyz")
            return got is not None and got[0] == 503

        await wait_until(draining, 10, message="readiness to go while it drains")
        status, body = await probe(port, "/readyz")
        assert body["stopping"] is True
        assert (await probe(port, "/livez"))[0] == 200  # a drain is not a reason to kill it
        assert await engine.wait(30) == 0
    assert (await db.get_work_item(made.id)).state == "completed"


async def _state(db: Any, work_id: Any, state: str) -> bool:
    return str((await db.get_work_item(work_id)).state) == state


class Stuck:
    """An engine whose scheduler loop stopped turning a minute ago."""

    def __init__(self) -> None:
        self.last_turn = time.monotonic() - 60
        self.started = asyncio.Event()
        self.started.set()
        self.stopping = asyncio.Event()
        self.listener_connected = asyncio.Event()
        self.listener_connected.set()


def test_a_scheduler_that_stopped_turning_is_not_live() -> None:
    stuck = Stuck()
    probes = Probes(lambda: stuck, poll_interval=10)
    ok, why = probes.live()
    assert not ok
    assert why["scheduler_turned_seconds_ago"] >= 60
    assert why["stuck_after_seconds"] == 50
    stuck.last_turn = time.monotonic()
    assert probes.live()[0]
    assert Probes(lambda: None, poll_interval=10).live()[0]  # still starting: live
    assert not Probes(lambda: None, poll_interval=10).ready()[0]


def test_an_address_is_host_and_port_and_a_bad_one_names_its_option() -> None:
    assert parse_bind("0.0.0.0:8482", "--probes") == ("0.0.0.0", 8482)
    assert parse_bind("[::1]:8482") == ("::1", 8482)
    assert http_url("::1", 8482, "/mcp") == "http://[::1]:8482/mcp"
    for bad in ("8482", "host:", "host:70000", "host:http"):
        with pytest.raises(InvalidInput, match=r"--probes .*: give HOST:PORT, such as"):
            parse_bind(bad, "--probes")
