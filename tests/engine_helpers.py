"""Helpers shared by the end-to-end engine tests.

* :func:`run_engine` runs a real :class:`~animus_core.runtime.engine.Engine` in this event loop, with
  Python faculties registered through the real plugin path and TOML faculties from a
  directory, on its own connection pool;
* :func:`wait_until` polls a (sync or async) predicate with a deadline, never sleeps and hopes;
* :func:`write_toml_faculty` writes a TOML faculty file and its bash hook scripts;
* :class:`EngineProcess` runs ``python -m animus_core up`` as a real process.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from uuid import UUID

import asyncpg

from animus_core import Claimed, Db, Faculty, Lease, WorkItem
from animus_core.app import Animus
from animus_core.faculties.plugins import PluginProblem
from animus_core.infra.config import Settings
from animus_core.infra.processes import Child
from animus_core.runtime.engine import Engine, EngineOptions
from animus_core.testing import Provides
from animus_core.values.states import TERMINAL

PHASE_ORDER = ("orient", "engage", "consolidate", "recover")
#: The origin of faculties animus itself provides (left out of the tests' comparisons).
BUILT_IN = "animus (built-in)"
#: Options for in-process engines. The fallback poll is a safety net for the semantics tests;
#: the tests about waking up (NOTIFY, retry timers) use ``SLOW_POLL`` so only the engine's own
#: wake-ups can make them pass.
DEFAULT_OPTIONS = EngineOptions(poll_interval=1.0, lease_seconds=30, grace=5.0,
                                seal_interval=0.2)
SLOW_POLL = EngineOptions(poll_interval=60.0, lease_seconds=30, grace=5.0, seal_interval=0.2)


# -- polling ------------------------------------------------------------------------------------


async def wait_until(predicate: Callable[[], Any], timeout: float = 15.0, *,
                     interval: float = 0.05, message: str = "") -> Any:
    """Poll ``predicate`` (sync, or returning an awaitable) until it returns something truthy;
    return that. Fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() >= deadline:
            what = message or getattr(predicate, "__name__", repr(predicate))
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        await asyncio.sleep(interval)


async def wait_finished(db: Db, work_id: UUID | str, timeout: float = 20.0) -> WorkItem:
    """Wait until the item reaches a terminal state; return it."""

    async def finished() -> WorkItem | None:
        item = await db.get_work_item(work_id)
        return item if item.state in TERMINAL else None

    try:
        item: WorkItem = await wait_until(finished, timeout, message=f"work item {work_id}")
    except AssertionError:
        now = await db.get_work_item(work_id)
        raise AssertionError(f"work item {work_id} ({now.work_type}) did not finish within "
                             f"{timeout:g}s: it is {now.state} ({now.reason})") from None
    return item


async def events(db: Db, work_id: UUID | str) -> list[str]:
    """The audit events of one item, oldest first (``submitted``, ``claimed``, ...)."""
    return [e.event for e in await db.history(work_id)]


# -- in-process engines -----------------------------------------------------------------------


def engine_settings(db_url: str, home: Path, faculties_dir: Path | None = None, *,
                    autoload: bool = False) -> Settings:
    env = {
        "DATABASE_URL": db_url,
        "ANIMUS_HOME": str(home),
        # A directory that does not exist means "no TOML faculties".
        "ANIMUS_FACULTIES": str(faculties_dir if faculties_dir is not None
                                else home / "no-toml-faculties"),
    }
    if not autoload:
        env["ANIMUS_DISABLE_PLUGIN_AUTOLOAD"] = "1"
    return Settings.from_env(env)


@dataclass
class Seams:
    """What the engine tests observe and inject (:class:`ObservedDb`): one object, shared by
    the store and the engine's own pool (:meth:`Db.reserve` copies the store)."""

    claims_in_flight: int = 0
    claim_calls: int = 0
    list_work_calls: int = 0
    after_claim: Callable[[dict[str, Any], list[Claimed]], Awaitable[None]] | None = None
    faults: dict[str, Callable[[], None]] = field(default_factory=dict)


class ObservedDb(Db):
    """The real store with the seams the engine tests need, in ``seams``: claims in flight
    are counted, ``after_claim(kwargs, claimed)`` runs once a claim returned but before the
    engine sees the result, and ``faults[method]()`` runs before that method (to raise, as an
    outage would: ``complete_many``, ``extend_lease``). ``list_work_calls`` counts the
    engine's listings of work (nothing in it should poll them)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seams = Seams()

    async def claim(self, *args: Any, **kwargs: Any) -> list[Claimed]:
        seams = self.seams
        seams.claims_in_flight += 1
        try:
            claimed = await super().claim(*args, **kwargs)
            if seams.after_claim is not None:
                await seams.after_claim(kwargs, claimed)
            return claimed
        finally:
            seams.claims_in_flight -= 1
            seams.claim_calls += 1

    async def claim_resuming(self, *args: Any, **kwargs: Any) -> list[tuple[Claimed, Any]]:
        """The engine's claim, with the same seams as :meth:`claim`."""
        seams = self.seams
        seams.claims_in_flight += 1
        try:
            claimed = await super().claim_resuming(*args, **kwargs)
            if seams.after_claim is not None:
                await seams.after_claim(kwargs, [c for c, _ in claimed])
            return claimed
        finally:
            seams.claims_in_flight -= 1
            seams.claim_calls += 1

    async def list_work(self, *args: Any, **kwargs: Any) -> list[WorkItem]:
        self.seams.list_work_calls += 1
        return await super().list_work(*args, **kwargs)

    def _fault(self, method: str) -> None:
        fault = self.seams.faults.get(method)
        if fault is not None:
            fault()

    async def complete_many(self, *args: Any, **kwargs: Any) -> None:
        self._fault("complete_many")
        await super().complete_many(*args, **kwargs)

    async def extend_lease(self, *args: Any, **kwargs: Any) -> list[Lease]:
        self._fault("extend_lease")
        return await super().extend_lease(*args, **kwargs)


@dataclass
class RunningEngine:
    engine: Engine
    db: ObservedDb
    settings: Settings
    problems: list[PluginProblem]

    @property
    def foci_root(self) -> Path:
        return self.engine.foci_root

    def origins(self) -> dict[str, str]:
        """The faculties this test registered (not animus's built-in ones): name -> origin."""
        return {f.name: f.origin for f in self.engine.faculties
                if f.origin != BUILT_IN}

    def quiet(self) -> bool:
        """No claim in flight and no faculty waiting for one: only a wake-up (NOTIFY, a
        timer, the fallback poll) makes this engine claim again."""
        return self.db.seams.claims_in_flight == 0 and not any(s.dirty for s in self.engine.slots.values())

    async def wait_quiet(self, timeout: float = 10.0) -> None:
        await wait_until(self.quiet, timeout, interval=0.01, message="the engine to be idle")


@contextlib.asynccontextmanager
async def run_engine(
    db_url: str,
    home: Path,
    *,
    faculties: Sequence[Faculty] = (),
    faculties_dir: Path | None = None,
    options: EngineOptions | None = None,
    plugins: Mapping[str, object] | None = None,
    autoload: bool = False,
    settle: bool = True,
    stop_timeout: float = 30.0,
) -> AsyncIterator[RunningEngine]:
    """Run an engine until the block ends; it is started and listening when the block begins,
    and (with ``settle``, for an engine that starts with nothing to do) idle.

    ``faculties`` are Python faculty instances, ``faculties_dir`` a directory of TOML files,
    ``plugins`` extra plugin objects by name (registered before faculties are collected).
    """
    settings = engine_settings(db_url, home, faculties_dir, autoload=autoload)
    extra = dict(plugins or {})
    if faculties:
        extra["test-faculties"] = Provides(faculties)
    db = await ObservedDb.connect(db_url, max_size=10, actor="test-engine")
    try:
        async with Animus(settings, db=db, plugins=extra) as animus:
            await animus.load_faculties()
            async with animus.running(options or DEFAULT_OPTIONS, start_timeout=15,
                                     stop_timeout=stop_timeout) as engine:
                running = RunningEngine(engine, db, settings, animus.problems)
                if settle:
                    # Let the start-up claims finish, so that what the test submits next is
                    # noticed through NOTIFY (a notification that lands during a claim can be
                    # lost: see test_notification_during_a_claim_is_not_lost).
                    await running.wait_quiet()
                yield running
    finally:
        await db.close()


# -- TOML faculties with bash hooks -----------------------------------------------------------


def toml_value(value: Any) -> str:
    """A TOML literal for a str, bool, number, list or dict (inline table)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"no TOML literal for {value!r}")


def write_script(path: Path, body: str, *, executable: bool = True) -> Path:
    """A bash script (``set -euo pipefail``) with ``body`` dedented."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/usr/bin/env bash\nset -euo pipefail\n" + textwrap.dedent(body).lstrip("\n"))
    path.chmod(0o755 if executable else 0o644)
    return path


def write_toml_faculty(
    root: Path,
    name: str,
    *,
    hooks: Mapping[str, str],
    accepts: Sequence[str] | None = None,
    fields: Mapping[str, Any] | None = None,
    phase_fields: Mapping[str, Mapping[str, Any]] | None = None,
    relative_to: Path | None = None,
    extra: str = "",
) -> Path:
    """Write ``root/faculties/<name>.toml`` and one bash script per hook under
    ``root/hooks/``; return the TOML file (its parent is the faculties directory).

    ``hooks`` maps a phase to its script body. Commands are absolute, or relative to
    ``relative_to`` (the directory the engine will be started in). ``fields`` go into
    ``[faculty]``, ``phase_fields`` into ``[faculty.<phase>]``, ``extra`` is appended.
    """
    fac_dir = root / "faculties"
    fac_dir.mkdir(parents=True, exist_ok=True)
    lines = ["[faculty]", f"name = {toml_value(name)}",
             f"accepts = {toml_value(list(accepts or [name]))}"]
    lines += [f"{k} = {toml_value(v)}" for k, v in (fields or {}).items()]
    for phase in sorted(hooks, key=PHASE_ORDER.index):
        script = write_script(root / "hooks" / f"{name}-{phase}.sh", hooks[phase])
        command = os.path.relpath(script, relative_to) if relative_to else str(script)
        lines += ["", f"[faculty.{phase}]", f"command = {toml_value(command)}"]
        lines += [f"{k} = {toml_value(v)}" for k, v in (phase_fields or {}).get(phase, {}).items()]
    path = fac_dir / f"{name}.toml"
    path.write_text("\n".join(lines) + "\n" + extra)
    return path


# -- real engine processes ------------------------------------------------------------------------


class EngineProcess:
    """``python -m animus_core up ARGS`` with its output in a log file."""

    def __init__(self, args: Sequence[str], env: Mapping[str, str], cwd: Path, log: Path) -> None:
        self.log_path = log
        self._log = log.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "animus_core", "up", *args],
            env=dict(env), cwd=cwd, stdout=self._log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def signal(self, sig: signal.Signals) -> None:
        if self.alive():
            self.proc.send_signal(sig)

    async def wait(self, timeout: float) -> int:
        """Wait for the process to exit; its exit status."""
        await wait_until(lambda: not self.alive(), timeout,
                         message=f"engine process {self.pid} to exit")
        code = self.proc.returncode
        assert code is not None
        return code

    def close(self) -> None:
        """Make sure the process is gone (SIGKILL if it still runs)."""
        if self.alive():
            self.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
        self._log.close()


@contextlib.contextmanager
def engine_processes(env: Mapping[str, str], cwd: Path) -> Iterator[Callable[..., EngineProcess]]:
    """``start(*args)`` starts ``animus up ARGS`` in ``cwd`` (its log ``engine-<n>.log``);
    every process started is killed when the block ends."""
    started: list[EngineProcess] = []

    def start(*args: str) -> EngineProcess:
        p = EngineProcess(args, env, cwd, cwd / f"engine-{len(started)}.log")
        started.append(p)
        return p

    try:
        yield start
    finally:
        for p in started:
            p.close()


async def listeners(db_url: str) -> int:
    """How many engines are listening for work on this database."""
    conn = await asyncpg.connect(db_url)
    try:
        n: int = await conn.fetchval(
            """SELECT count(*) FROM pg_stat_activity
                WHERE application_name = 'animus-listener' AND datname = current_database()""")
        return n
    finally:
        await conn.close()


async def wait_listening(db_url: str, procs: Sequence[EngineProcess], timeout: float = 20.0) -> None:
    """Wait until every process in ``procs`` listens (and none died meanwhile)."""

    async def ready() -> bool:
        for p in procs:
            assert p.alive(), f"engine process exited with {p.proc.returncode}:\n{p.output()}"
        return await listeners(db_url) >= len(procs)

    await wait_until(ready, timeout, interval=0.1, message="engine processes to listen")


async def run_process(argv: Sequence[str], env: Mapping[str, str], cwd: Path,
                      timeout: float = 60.0) -> tuple[int, str, str]:
    """Run a child without blocking the event loop: (status, stdout, stderr). The child runs
    in its own process group, which is killed when it is done or out of time (nothing it
    started outlives it)."""
    proc = Child.start(argv, env=env, cwd=cwd, new_session=True)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill_group()
        await proc.wait()
        raise AssertionError(f"{' '.join(argv)} did not finish within {timeout:g}s") from None
    finally:
        proc.kill_group()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def run_cli(env: Mapping[str, str], cwd: Path, *args: str,
                  timeout: float = 60.0) -> tuple[int, str, str]:
    """``python -m animus_core ARGS``: (status, stdout, stderr)."""
    return await run_process([sys.executable, "-m", "animus_core", *args], env, cwd, timeout)


def process_gone(pid: int) -> bool:
    """True when ``pid`` no longer runs (gone, or a zombie nobody reaped yet)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def kill_group(pid: int) -> None:
    """SIGKILL a hook's process group (hooks run in their own session), if it still exists."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def plugin_site(root: Path, module: str, name: str) -> Path:
    """A directory to put on an engine's ``PYTHONPATH`` so that it loads ``module`` as the
    ``animus`` entry point ``name``, as an installed faculty package is loaded (a dist-info
    of its own); it is made under ``root``."""
    site = root / "site"
    dist = site / f"animus_{name}-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: animus-{name}\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[animus]\n{name} = {module}\n")
    return site


# -- servers ------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def listening(port: int) -> bool:
    """Whether something accepts connections on 127.0.0.1:``port``."""
    try:
        _reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return False
    writer.close()
    return True


@contextlib.asynccontextmanager
async def server_process(argv: Sequence[str], port: int, log: Path, env: Mapping[str, str] | None = None,
                  what: str = "the server") -> AsyncIterator[subprocess.Popen[bytes]]:
    """``argv`` running (its output in ``log``) once it listens on ``port``; stopped at the
    end (SIGTERM, then SIGKILL if it lingers)."""
    proc = _start(argv, env, log)

    async def up() -> bool:
        assert proc.poll() is None, f"{what} exited:\n{_read(log)}"
        return await listening(port)

    try:
        await wait_until(up, 30, interval=0.1, message=f"{what} to listen")
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _start(argv: Sequence[str], env: Mapping[str, str] | None, log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(list(argv), env=None if env is None else dict(env), stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def _read(log: Path) -> str:
    return log.read_text(errors="replace")
