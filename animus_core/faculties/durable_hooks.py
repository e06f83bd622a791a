"""Durable command hooks (docs/hook-contract.md): ``resume = "phase"``, a hook suspending its
focus with ``suspend.json``, and ``animus step`` inside a hook.

All of it rests on the focus's durable steps (:class:`~animus_core.faculties.steps.StepJournal`),
shared by the engine and the hooks' ``animus step`` calls, which reach the engine through a
small server the engine runs on the loopback interface while hooks run
(:class:`StepServer`): the engine keeps the item's lease and the step positions, and records
every step itself.

The engine's own steps of a command faculty are named ``phase <phase>`` (the phase's output,
recorded when ``resume = "phase"``) and ``suspend <phase>`` (a hook suspended: what it asked
for, where its run began, the wait's position and the outputs of the phases before it), and
take positions like any step. An attempt that replays reads the item's record first and
leaves these positions (and those of the waits that follow ``suspend`` steps) to them, so a
hook's own steps get the same positions on every attempt, whichever phases are skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec

from animus_core.faculties.focus import Focus
from animus_core.faculties.steps import StepJournal
from animus_core.values import json_values
from animus_core.values.errors import (
    AnimusError,
    ApprovalTimedOut,
    InvalidInput,
    PhaseFailed,
    StepOrderChanged,
    WaitTimedOut,
)
from animus_core.values.limits import limits
from animus_core.values.steps import Step
from animus_core.values.waits import Wait
from animus_core.values.work import check_name

__all__ = [
    "ADDRESS_VAR",
    "PHASES",
    "RESUMED_VAR",
    "TOKEN_VAR",
    "DurableFocus",
    "Request",
    "StepServer",
    "parse_suspend",
    "read_frame",
    "write_frame",
]

PHASES = ("orient", "engage", "consolidate")
#: Where a hook's ``animus step`` reaches the engine (``host:port``), and its token.
ADDRESS_VAR = "ANIMUS_STEP_ADDRESS"
#: seconds the step server stays open after the last hook run ended
IDLE_CLOSE = 30.0
TOKEN_VAR = "ANIMUS_STEP_TOKEN"
#: Set to ``1`` for the run of a hook that resumes its suspended focus.
RESUMED_VAR = "ANIMUS_RESUMED"
PHASE_STEP = "phase "
SUSPEND_STEP = "suspend "
#: Step names the engine keeps for itself: ``animus step`` refuses them.
RESERVED = (PHASE_STEP, SUSPEND_STEP)
_TEN_YEARS = 10 * 365 * 86400
_FRAME = struct.Struct(">I")
_MAX_HEADER = 64 * 1024
#: seconds a connection to the step server has to send its request (``animus step`` sends
#: it at once): one that sends nothing does not hold a task and a socket for ever
ASK_WITHIN = 10.0


# -- suspend.json ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    """What a hook's ``suspend.json`` asks for: a ``sleep`` of ``seconds`` (ending
    ``until``, fixed when the engine reads it), a ``wait_for`` signal ``event`` (with a
    ``timeout`` in seconds, or none), or an ``approval``."""

    kind: str
    seconds: float | None = None
    until: str | None = None
    event: str | None = None
    timeout: float | None = None
    why: str | None = None
    role: str | None = None
    quorum: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> Request:
        return cls(**value)


def _seconds(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) \
            or not 0 <= value < _TEN_YEARS:
        shown = msgspec.json.encode(value).decode()
        raise InvalidInput(f"{where} must be a number of seconds from 0 to 10 years, "
                           f"got {shown:.40}")
    return float(value)


def parse_suspend(data: bytes) -> Request:
    """The request in the text of a ``suspend.json``; :class:`InvalidInput` saying what is
    wrong with it, and where (``suspend.json.sleep: ...``)."""
    value = json_values.decode(data, "suspend.json", limit=_MAX_HEADER)
    kinds = ("sleep", "wait_for", "approval")
    if not isinstance(value, dict):
        raise InvalidInput("suspend.json must be a JSON object with one of sleep, wait_for, "
                           "approval")
    given = [k for k in kinds if k in value]
    if len(given) != 1:
        raise InvalidInput("suspend.json must have exactly one of sleep, wait_for, approval, "
                           f"it has {', '.join(given) or 'none'}")
    kind = given[0]
    allowed = {"wait_for": {"wait_for", "timeout"}}.get(kind, {kind})
    extra = sorted(set(value) - allowed)
    if extra:
        raise InvalidInput(f"suspend.json: unknown field {extra[0]!r} with {kind} (a {kind} "
                           f"takes {', '.join(sorted(allowed))})")
    if kind == "sleep":
        return Request("sleep", seconds=_seconds(value["sleep"], "suspend.json.sleep"))
    if kind == "wait_for":
        event = value["wait_for"]
        if not isinstance(event, str):
            raise InvalidInput("suspend.json.wait_for must be the name of the event (a string)")
        try:
            check_name(event, "suspend.json.wait_for")
        except AnimusError as e:
            raise InvalidInput(str(e)) from None
        timeout = value.get("timeout")
        return Request("wait_for", event=event, timeout=None if timeout is None
                       else _seconds(timeout, "suspend.json.timeout"))
    approval = value["approval"]
    if not isinstance(approval, dict):
        raise InvalidInput('suspend.json.approval must be an object: {"why": ..., "role": ..., '
                           '"quorum": n}')
    unknown = sorted(set(approval) - {"why", "role", "quorum", "timeout"})
    if unknown:
        raise InvalidInput(f"suspend.json.approval: unknown field {unknown[0]!r} (it takes why, "
                           "role, quorum, timeout)")
    why, role, quorum = approval.get("why"), approval.get("role"), approval.get("quorum")
    if not isinstance(why, str) or not why.strip():
        raise InvalidInput("suspend.json.approval.why must be a non-empty string: what is to "
                           "be approved")
    if role is not None and not isinstance(role, str):
        raise InvalidInput("suspend.json.approval.role must be a string (a role name)")
    if quorum is not None and (isinstance(quorum, bool) or not isinstance(quorum, int)
                               or not 1 <= quorum <= 100):
        raise InvalidInput("suspend.json.approval.quorum must be an integer from 1 to 100")
    timeout = approval.get("timeout")
    return Request("approval", why=why, role=role, quorum=quorum,
                   timeout=None if timeout is None
                   else _seconds(timeout, "suspend.json.approval.timeout"))


# -- the focus's steps, as a command faculty places them ------------------------------------


class DurableFocus:
    """The durable side of one focus of a command faculty: which phases come from the
    record, where each hook's steps go, and the suspensions of its hooks."""

    def __init__(self, focus: Focus, *, resume_phase: bool) -> None:
        self.focus = focus
        self.resume_phase = resume_phase
        #: positions the engine's own steps hold (hook steps pass over them)
        self.skip: set[int] = set()
        self._record: dict[int, Step] = {}
        #: phase -> {"out": value} (the phase wrote its file) or {} (it wrote none)
        self.outputs: dict[str, dict[str, Any]] = {}
        self._marker: tuple[int, Step] | None = None
        #: suspensions of the record this attempt has replayed (or resumed from)
        self._replayed: set[int] = set()
        self._planned = False
        self._placing = asyncio.Lock()

    @property
    def journal(self) -> StepJournal:
        steps = self.focus.steps
        if steps is None:
            raise PhaseFailed("durable steps are not available in this focus (it was built "
                              "without them): animus step, suspend.json and resume = \"phase\" "
                              "need an engine's focus")
        return steps

    async def plan(self) -> None:
        """Read the item's record when this attempt may replay the engine's own steps:
        with ``resume = "phase"``, or once the item was suspended."""
        if self._planned:
            return
        self._planned = True
        wait = self.focus.work.wait
        if not (self.resume_phase or wait):
            return
        self._record = await self.journal.recorded()
        for position, step in self._record.items():
            if step.name.startswith(RESERVED):
                self.skip.add(position)
            if step.name.startswith(SUSPEND_STEP) and isinstance(step.result, dict) \
                    and isinstance(step.result.get("wait"), int):
                self.skip.add(step.result["wait"])
        if wait:
            kept = Wait.from_json(dict(wait))
            self.skip.add(kept.position)
            for position, step in self._record.items():
                if step.name.startswith(SUSPEND_STEP) and isinstance(step.result, dict) \
                        and step.result.get("wait") == kept.position:
                    self._marker = (position, step)

    def _free(self) -> int:
        """The next position no engine step holds."""
        position = self.journal.position + 1
        while position in self.skip:
            position += 1
        return position

    async def _place(self, name: str) -> tuple[int, Step | None]:
        """The next free position for step ``name``, and its record (replayed) if any."""
        async with self._placing:
            journal = self.journal
            journal.seek(self._free() - 1)
            return await journal.begin(name)

    # -- phases -----------------------------------------------------------------------------

    async def replayed(self, phase: str) -> dict[str, Any] | None:
        """The output of ``phase`` from the record (the phase is not run again), or None."""
        journal = self.journal
        name = PHASE_STEP + phase
        if self.resume_phase:
            for position, step in sorted(self._record.items()):
                if step.name == name and isinstance(step.result, dict):
                    journal.seek(position - 1)
                    await journal.begin(name)  # replayed, in the attempt's record
                    return self._keep(phase, step.result)
        if self._marker is not None:
            _, marker = self._marker
            suspended = marker.result.get("phase")
            if suspended in PHASES and PHASES.index(phase) < PHASES.index(suspended):
                out = marker.result.get("outputs", {}).get(phase)
                if isinstance(out, dict):
                    return self._keep(phase, out)
        return None

    def _keep(self, phase: str, out: dict[str, Any]) -> dict[str, Any]:
        kept = {"out": out["out"]} if "out" in out else {}
        self.outputs[phase] = kept
        return kept

    async def resuming(self, phase: str) -> Any:
        """When ``phase``'s hook suspended the focus and this attempt resumes it: what
        ``resume.json`` holds (the wait is taken, or replayed, first), and the next hook
        steps go where that hook's run began. Otherwise None."""
        if self._marker is None:
            return None
        position, marker = self._marker
        if marker.result.get("phase") != phase:
            return None
        self._marker = None
        self._replayed.add(position)
        journal = self.journal
        journal.seek(position - 1)
        await journal.begin(marker.name)
        request = Request.from_json(marker.result["request"])
        resumed = await self._wait(request, marker.result["wait"])
        journal.seek(marker.result["from"])
        return resumed

    async def completed(self, phase: str, out: dict[str, Any]) -> None:
        """``phase``'s hook ran to its end: keep its output, recorded as a step with
        ``resume = "phase"``."""
        self.outputs[phase] = out
        if not self.resume_phase:
            return
        name = PHASE_STEP + phase
        position, known = await self._place(name)
        if known is None:
            await self.journal.record(position, name, {"phase": phase, **out},
                                      started_at=datetime.now(UTC), duration_ms=0)
        self.skip.add(position)

    async def suspend(self, phase: str, request: Request, began: int) -> Any:
        """``phase``'s hook, whose run began after step ``began``, asked to suspend: record
        what it asked (``suspend <phase>``) and wait. Raises
        :class:`~animus_core.values.waits.Suspended` (the usual case), or returns what
        ``resume.json`` holds when the wait is over already; the hook's next run then
        replays its steps from ``began`` on."""
        name = SUSPEND_STEP + phase
        position, known = await self._place_suspension(name, began)
        wait = self._free_after(position)
        if known is not None and isinstance(known.result, dict):
            wait = known.result.get("wait", wait)  # recorded by an attempt that did not suspend
            request = Request.from_json(known.result["request"])
        else:
            if request.kind == "sleep":
                until = datetime.now(UTC) + timedelta(seconds=request.seconds or 0.0)
                request = Request("sleep", seconds=request.seconds, until=until.isoformat())
            before = [p for p in PHASES[:PHASES.index(phase)] if p in self.outputs]
            await self.journal.record(position, name, {
                "phase": phase, "from": began, "wait": wait, "request": request.to_json(),
                "outputs": {p: self.outputs[p] for p in before}},
                started_at=datetime.now(UTC), duration_ms=0)
        self.skip |= {position, wait}
        resumed = await self._wait(request, wait)
        journal = self.journal
        journal.reload()  # the hook's run replays what this attempt recorded
        journal.seek(began)
        return resumed

    async def _place_suspension(self, name: str, began: int) -> tuple[int, Step | None]:
        """Where the suspension ``name`` of a hook run that began after step ``began`` goes:
        the one the record holds for such a run, not replayed yet (an attempt that starts
        afresh from copied steps, a rerun from a step, meets its hook's suspension again and
        replays it: the engine's steps are skipped by hook steps, not by this), else the next
        free position."""
        recorded = next((p for p, s in sorted(self._record.items())
                         if s.name == name and p > began and p not in self._replayed
                         and isinstance(s.result, dict) and s.result.get("from") == began),
                        None)
        if recorded is None:
            return await self._place(name)
        self._replayed.add(recorded)
        async with self._placing:
            journal = self.journal
            journal.seek(recorded - 1)
            return await journal.begin(name)

    def _free_after(self, position: int) -> int:
        position += 1
        while position in self.skip:
            position += 1
        return position

    async def _wait(self, request: Request, position: int) -> Any:
        """Take the wait at ``position`` (suspending the focus unless it is over)."""
        journal = self.journal
        journal.seek(position - 1)
        if request.kind == "sleep":
            assert request.until is not None
            await journal.sleep_until(datetime.fromisoformat(request.until))
            return {"slept": True, "until": request.until}
        if request.kind == "wait_for":
            assert request.event is not None
            try:
                payload = await journal.wait_for(request.event, request.timeout)
            except WaitTimedOut as e:
                return {"event": request.event, "timed_out": True, "until": e.until}
            return {"event": request.event, "payload": payload}
        assert request.why is not None
        try:
            decided = await journal.approval(request.why, request.role or "approver",
                                             request.quorum or 1, request.timeout)
        except ApprovalTimedOut as e:
            return {"approval": {"timed_out": True, "until": e.until,
                                 "approvals": e.approvals}}
        return {"approval": decided.to_json()}

    # -- the hooks' own steps -----------------------------------------------------------------

    async def hook_step(self, name: str) -> tuple[int, Step | None]:
        """A hook's ``animus step NAME``: its position and its record, if it has one."""
        if not isinstance(name, str) or name.startswith(RESERVED):
            raise InvalidInput(f"step name {name!r:.80} starts with "
                               f"{' or '.join(repr(r) for r in RESERVED)}, which the engine "
                               "keeps for its own steps: choose another name")
        return await self._place(name)


# -- the wire between `animus step` and the engine -------------------------------------------


def write_frame(write: Callable[[bytes], Any], body: bytes) -> None:
    write(_FRAME.pack(len(body)) + body)


async def read_frame(reader: asyncio.StreamReader, limit: int) -> bytes | None:
    """The next frame, or None at the end of the stream; :class:`InvalidInput` when it is
    longer than ``limit`` bytes (it is not read)."""
    try:
        head = await reader.readexactly(_FRAME.size)
    except asyncio.IncompleteReadError:
        return None
    (size,) = _FRAME.unpack(head)
    if size > limit:
        raise InvalidInput(f"a message of {size} bytes, over the limit of {limit}")
    try:
        return await reader.readexactly(size)
    except asyncio.IncompleteReadError:
        return None


class _Listener:
    """The loopback socket every hook run of one event loop reaches the engine on: a call
    presents its run's token, which chooses the :class:`StepServer` that answers. It is open
    while runs last and ``IDLE_CLOSE`` seconds after the last one ended (one socket for all
    the runs, not one each: opening and closing it for every hook of short foci cost about
    as much as the rest of the engine's work on them)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.runs: dict[str, StepServer] = {}
        self.address = ""
        self._server: asyncio.Server | None = None
        self._closing: asyncio.TimerHandle | None = None

    async def enter(self, run: StepServer) -> str:
        self.runs[run.token] = run
        if self._closing is not None:
            self._closing.cancel()
            self._closing = None
        if self._server is None:
            try:
                server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
            except BaseException:  # cancelled, or no socket: this run never started
                self.leave(run)
                raise
            if self._server is None and self.runs:
                self._server = server
                host, port = server.sockets[0].getsockname()[:2]
                self.address = f"{host}:{port}"
            else:  # another run opened one meanwhile, or every run ended meanwhile
                server.close()
        return self.address

    def leave(self, run: StepServer) -> None:
        self.runs.pop(run.token, None)
        if not self.runs and self._server is not None and self._closing is None:
            self._closing = self.loop.call_later(IDLE_CLOSE, self._close_idle)

    def _close_idle(self) -> None:
        if self._closing is not None:
            self._closing.cancel()
            self._closing = None
        if not self.runs and self._server is not None:
            self._server.close()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                async with asyncio.timeout(ASK_WITHIN):
                    head = await read_frame(reader, _MAX_HEADER)
            except TimeoutError:
                return  # sent nothing in time
            if head is None:
                return
            ask = msgspec.json.decode(head)
            run = self.runs.get(str(ask.get("token", ""))) if isinstance(ask, dict) else None
            if run is not None:  # else not a hook's of a run still going
                await run.answer(ask, reader, writer)
        except (AnimusError, msgspec.DecodeError) as e:
            write_frame(writer.write, msgspec.json.encode({"error": str(e)}))
            with contextlib.suppress(OSError):
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


_listener: _Listener | None = None


def close_listener() -> None:
    """Close this event loop's step server now unless a hook run still uses it: an engine
    stopping ends its idle wait, which must not outlive the loop (its timer would never fire,
    and the socket would go on accepting connections nobody serves)."""
    if _listener is not None and _listener.loop is asyncio.get_running_loop():
        _listener._close_idle()


def _listener_here() -> _Listener:
    global _listener
    loop = asyncio.get_running_loop()
    if _listener is None or _listener.loop is not loop:
        _listener = _Listener(loop)
    return _listener


class StepServer:
    """Serves the ``animus step`` calls of one hook run, for as long as the run lasts: on
    ``127.0.0.1``, to callers that present the run's token (given in the hook's
    environment)."""

    def __init__(self, durable: DurableFocus) -> None:
        self.durable = durable
        self.token = secrets.token_hex(16)
        #: what must fail the phase whatever the hook's exit status (the order changed)
        self.failure: PhaseFailed | None = None
        self._listener: _Listener | None = None
        self._address = ""
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> StepServer:
        self._listener = _listener_here()
        self._address = await self._listener.enter(self)
        return self

    @property
    def env(self) -> dict[str, str]:
        assert self._listener is not None
        return {ADDRESS_VAR: self._address, TOKEN_VAR: self.token}

    async def __aexit__(self, *exc: object) -> None:
        if self._listener is not None:
            self._listener.leave(self)
        for task in list(self._tasks):  # a step the hook left behind records nothing
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task

    async def answer(self, ask: dict[str, Any], reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:
        """Answer the call whose first message (with this run's token) was ``ask``."""
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self._exchange(ask, reader, writer)
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            self._tasks.discard(task)

    async def _exchange(self, ask: dict[str, Any], reader: asyncio.StreamReader,
                        writer: asyncio.StreamWriter) -> None:
        def reply(value: dict[str, Any]) -> None:
            write_frame(writer.write, msgspec.json.encode(value))

        try:
            name: Any = ask.get("name")
            started_at, started = datetime.now(UTC), time.perf_counter()
            position, known = await self.durable.hook_step(name)
        except StepOrderChanged as e:
            self.failure = e
            reply({"error": str(e)})
            await writer.drain()
            return
        except (AnimusError, msgspec.DecodeError) as e:
            reply({"error": str(e)})
            await writer.drain()
            return
        if known is not None:
            reply({"replay": known.result, "position": position})
            await writer.drain()
            return
        limit = limits().outcome_bytes
        reply({"run": position, "limit": limit})
        await writer.drain()
        try:
            head = await read_frame(reader, _MAX_HEADER)
            body = await read_frame(reader, limit)
            if head is None or body is None:
                return  # the command did not finish: nothing is recorded
            status = msgspec.json.decode(head).get("status")
            if isinstance(status, bool) or not isinstance(status, int) or not 0 <= status <= 255:
                raise InvalidInput(f"step {name!r}: an exit status from 0 to 255, got {status!r}")
            try:
                stdout = body.decode("utf-8")
            except UnicodeDecodeError as e:
                raise InvalidInput(f"step {name!r}: its command's standard output is not UTF-8 "
                                   f"text ({e.reason} at byte {e.start})") from None
            stored = await self.durable.journal.record(
                position, str(name), {"stdout": stdout, "status": status}, started_at=started_at,
                duration_ms=int((time.perf_counter() - started) * 1000))
        except (AnimusError, msgspec.DecodeError, AttributeError) as e:
            reply({"error": str(e)})
            await writer.drain()
            return
        reply({"result": stored, "position": position})
        await writer.drain()


def remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
