"""Built-in plugin: faculties declared in TOML files whose phases are shell commands.

The file format is docs/writing-faculties.md's, extended with optional fields; the
hook contract is docs/hook-contract.md. Files are decoded strictly: an unknown field, a wrong
type, a missing or non-executable command is an error naming the file and the field.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import shutil
import sys
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec

from animus_core.faculties.contract import EngineView, hookimpl
from animus_core.faculties.durable_hooks import (
    ADDRESS_VAR,
    RESUMED_VAR,
    TOKEN_VAR,
    DurableFocus,
    StepServer,
    close_listener,
    parse_suspend,
    remove,
)
from animus_core.faculties.faculty import Faculty, check_faculty, check_number, check_variable
from animus_core.faculties.focus import Focus
from animus_core.infra.config import Settings
from animus_core.infra.hookguard import MARK_VARIABLE, guard
from animus_core.infra.processes import Child
from animus_core.infra.secrets import redactor
from animus_core.infra.toml_files import load_toml
from animus_core.values import json_values
from animus_core.values.canonical import canonical_hash
from animus_core.values.errors import ConfigError, InvalidInput, PhaseFailed
from animus_core.values.limits import limits
from animus_core.values.mcp import McpServer
from animus_core.values.records import file_digest
from animus_core.values.schedules import Cron, Schedule, parse_every

__all__ = [
    "CommandFaculty",
    "FacultyFile",
    "HookFailed",
    "PhaseSpec",
    "ScheduleSpec",
    "load_dir",
    "load_file",
]

#: Variables every hook gets (docs/hook-contract.md), plus what lets ``animus`` run inside a hook.
CONTRACT_ENV = ("ANIMUS_FOCUS_DIR", "ANIMUS_WORK_TYPE", "ANIMUS_WORK_ID", "ANIMUS_PHASE",
                "ANIMUS_ATTEMPT", "TRACEPARENT", "DATABASE_URL", "ANIMUS_HOME", MARK_VARIABLE)
#: Passed through from the engine's environment so that ordinary scripts work.
BASE_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TZ", "TMPDIR", "USER")
#: Set for some runs only: a resumed hook's, and those of orient, engage and consolidate
#: (where ``animus step`` works).
DURABLE_ENV = (RESUMED_VAR, ADDRESS_VAR, TOKEN_VAR)
STDERR_TAIL = 2000


class PhaseSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    command: str | None = None
    timeout: float | None = None
    max_attempts: int | None = None
    # engage only: run the built-in Claude agent loop instead of a command
    model: str | None = None
    system_prompt: str | None = None
    system_prompt_file: str | None = None
    tools: list[str] = []
    #: MCP servers whose tools the model may use too ([[faculty.engage.mcp]])
    mcp: list[McpServer] = []
    max_turns: int = 20
    max_tokens: int = 4096
    token_budget: int | None = None
    stream: bool = True


class ScheduleSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    work_type: str
    every: str | None = None
    cron: str | None = None
    params: dict[str, Any] = {}
    name: str | None = None
    priority: int = 0


class FacultySpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    name: str
    accepts: list[str]
    max_concurrent: int = 1
    max_attempts: int | None = None
    timeout: float = 300.0
    rate_limit: float | None = None
    retry_base: float = 1.0
    retry_max: float = 300.0
    env: list[str] = []
    #: like env, and their values are redacted from everything animus writes
    secrets: list[str] = []
    keep_failed: bool = False
    #: "phase": a retry starts at the phase that failed (the outputs before it are steps)
    resume: str | None = None
    description: str = ""
    example: dict[str, Any] | None = None
    orient: PhaseSpec | None = None
    engage: PhaseSpec | None = None
    consolidate: PhaseSpec | None = None
    recover: PhaseSpec | None = None
    schedule: list[ScheduleSpec] = []


class FacultyFile(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    faculty: FacultySpec


class HookFailed(PhaseFailed):
    """A command hook failed: it could not start, exited non-zero, timed out, or wrote
    unreadable output."""


def _where(path: Path, field: str) -> str:
    return f"{path}: {field}"


def load_file(path: Path, *, cwd: Path | None = None) -> CommandFaculty:
    """Decode and check one faculty file."""
    cwd = cwd or Path.cwd()
    spec = load_toml(path, FacultyFile).faculty
    if not spec.accepts:
        raise ConfigError(_where(path, "faculty.accepts is empty: list the work types it takes"))
    if spec.max_concurrent < 1:
        raise ConfigError(_where(path, "faculty.max_concurrent must be at least 1"))
    if spec.engage is None:
        raise ConfigError(_where(path, "faculty.engage is missing: a faculty needs an engage hook"))
    if spec.resume not in (None, "phase"):
        raise ConfigError(_where(
            path, f'faculty.resume must be "phase" (a retry starts at the phase that failed) '
                  f"or left out (every attempt starts at orient), got {spec.resume!r}"))
    commands: dict[str, list[str]] = {}
    system = ""
    for phase in ("orient", "engage", "consolidate", "recover"):
        ps: PhaseSpec | None = getattr(spec, phase)
        if ps is None:
            continue
        if phase == "engage" and ps.model is not None:
            if ps.command is not None:
                raise ConfigError(_where(path, "faculty.engage: give command or model, not both"))
            system = _system_prompt(path, ps, cwd)
            if ps.max_turns < 1 or ps.max_tokens < 1:
                raise ConfigError(_where(path, "faculty.engage: max_turns and max_tokens must be >= 1"))
            continue
        if ps.command is None:
            raise ConfigError(_where(path, f"faculty.{phase}.command is missing"))
        if ps.model is not None or ps.tools or ps.mcp:
            raise ConfigError(_where(path, f"faculty.{phase}: model, tools and mcp belong to an "
                                           "engage with a model"))
        commands[phase] = _resolve_command(path, f"faculty.{phase}.command", ps.command, cwd)
    for field in ("env", "secrets"):
        for i, name in enumerate(getattr(spec, field)):
            check_variable(name, f"faculty.{field}[{i}]", str(path))
    _check_mcp(path, spec)
    _check_phases(path, spec)
    schedules = []
    for i, sched in enumerate(spec.schedule):
        field = f"faculty.schedule[{i}]"
        if (sched.every is None) == (sched.cron is None):
            raise ConfigError(_where(path, f"{field}: give exactly one of every, cron"))
        try:
            every = parse_every(sched.every) if sched.every is not None else None
            if sched.cron is not None:
                Cron(sched.cron)
        except ConfigError as e:
            raise ConfigError(_where(path, f"{field}.{e}")) from None
        schedules.append(Schedule(
            name=sched.name or f"{spec.name}:{sched.work_type}:{sched.every or sched.cron}",
            work_type=sched.work_type, params=sched.params, priority=sched.priority,
            every=every, cron=sched.cron))
    faculty = CommandFaculty(spec, commands, path, tuple(schedules), system)
    check_faculty(faculty, str(path), "faculty.")
    return faculty


def _check_mcp(path: Path, spec: FacultySpec) -> None:
    """Each MCP server declaration works, names a server once, and passes the server only
    variables the faculty declares."""
    servers = spec.engage.mcp if spec.engage is not None else []
    declared = {*spec.env, *spec.secrets}
    seen: set[str] = set()
    for i, server in enumerate(servers):
        where = f"{path}: faculty.engage.mcp[{i}]"
        server.check(where)
        if server.name in seen:
            raise ConfigError(f"{where}: another server is named {server.name!r} too")
        seen.add(server.name)
        undeclared = [n for n in server.env if n not in declared]
        if undeclared:
            raise ConfigError(f"{where}: env {undeclared} must be declared in the faculty's "
                              "env or secrets too (what its hooks and servers may see is "
                              "said there)")
        public = [n for n in server.header_variables() if n not in spec.secrets]
        if public:
            raise ConfigError(f"{where}: headers take {public}, which must be among the "
                              "faculty's secrets (what a header carries is a credential: its "
                              "value is kept out of logs and records)")


def _check_phases(path: Path, spec: FacultySpec) -> None:
    where = str(path)
    if spec.max_attempts is not None:  # 0 would otherwise read as "not set"
        check_number(spec.max_attempts, "faculty.max_attempts", where, low=1, high=1000,
                     integer=True)
    for phase in ("orient", "engage", "consolidate", "recover"):
        ps: PhaseSpec | None = getattr(spec, phase)
        if ps is None:
            continue
        field = f"faculty.{phase}"
        if ps.timeout is not None:
            check_number(ps.timeout, f"{field}.timeout", where, low=0, high=7 * 86_400,
                         low_open=True, meaning="seconds this phase may take")
        if ps.max_attempts is not None:
            check_number(ps.max_attempts, f"{field}.max_attempts", where, low=1, high=1000,
                         integer=True)
        if ps.model is not None:
            check_number(ps.max_turns, f"{field}.max_turns", where, low=1, high=1000,
                         integer=True)
            check_number(ps.max_tokens, f"{field}.max_tokens", where, low=1, high=1_000_000,
                         integer=True)
            if ps.token_budget is not None:
                check_number(ps.token_budget, f"{field}.token_budget", where, low=1,
                             high=10**12, integer=True)


def _system_prompt(path: Path, ps: PhaseSpec, cwd: Path) -> str:
    if ps.system_prompt is not None and ps.system_prompt_file is not None:
        raise ConfigError(_where(path, "faculty.engage: give system_prompt or system_prompt_file"))
    if ps.system_prompt_file is None:
        return ps.system_prompt or ""
    file = Path(ps.system_prompt_file)
    full = file if file.is_absolute() else cwd / file
    try:
        return full.read_text("utf-8")
    except OSError as e:
        raise ConfigError(_where(
            path, f"faculty.engage.system_prompt_file: cannot read {full}: {e.strerror} "
                  f"(relative paths resolve against {cwd})")) from None


def _resolve_command(path: Path, field: str, command: str, cwd: Path) -> list[str]:
    try:
        argv = shlex.split(command)
    except ValueError as e:
        raise ConfigError(_where(path, f"{field}: cannot parse {command!r}: {e}")) from None
    if not argv:
        raise ConfigError(_where(path, f"{field} is empty"))
    exe = argv[0]
    if "/" not in exe:
        found = shutil.which(exe)
        if found is None:
            raise ConfigError(_where(path, f"{field}: {exe!r} is not on PATH"))
        return [found, *argv[1:]]
    full = Path(exe) if os.path.isabs(exe) else cwd / exe
    if not full.exists():
        raise ConfigError(_where(
            path, f"{field}: {full} does not exist (relative commands resolve against the "
                  f"directory the engine was started in, {cwd})"))
    if not full.is_file() or not os.access(full, os.X_OK):
        raise ConfigError(_where(path, f"{field}: {full} is not executable (chmod +x {full})"))
    return [str(full), *argv[1:]]


def load_dir(directory: Path, *, cwd: Path | None = None) -> tuple[list[CommandFaculty], list[str]]:
    """Every ``*.toml`` in ``directory``: the faculties that loaded and the errors of the rest."""
    faculties, errors = [], []
    if not directory.is_dir():
        return [], []
    for path in sorted(directory.glob("*.toml")):
        try:
            faculties.append(load_file(path, cwd=cwd))
        except ConfigError as e:
            errors.append(str(e))
    return faculties, errors


class CommandFaculty(Faculty):
    """A faculty whose phases are executables (the command hook contract)."""

    def __init__(self, spec: FacultySpec, commands: dict[str, list[str]], path: Path,
                 schedules: tuple[Schedule, ...] = (), system_prompt: str = "") -> None:
        self.spec = spec
        self.system_prompt = system_prompt
        if spec.engage is not None and spec.engage.model is not None:
            self.requires_env = ("ANTHROPIC_API_KEY",)  # type: ignore[misc]
        self.schedules = schedules  # type: ignore[misc]
        self.commands = commands
        self.path = path
        self.origin = str(path)
        # Per-instance values shadow the class defaults of Faculty.
        self.name = spec.name  # type: ignore[misc]
        self.accepts = tuple(spec.accepts)  # type: ignore[misc]
        self.max_concurrent = spec.max_concurrent  # type: ignore[misc]
        recover_attempts = spec.recover.max_attempts if spec.recover else None
        self.max_attempts = spec.max_attempts or recover_attempts  # type: ignore[misc]
        self.timeout = spec.timeout  # type: ignore[misc]
        self.rate_limit = spec.rate_limit  # type: ignore[misc]
        self.retry_base = spec.retry_base  # type: ignore[misc]
        self.retry_max = spec.retry_max  # type: ignore[misc]
        self.keep_failed = spec.keep_failed
        self.secrets = tuple(spec.secrets)
        self.example = spec.example  # type: ignore[misc]
        self._durable: weakref.WeakKeyDictionary[Focus, DurableFocus] = \
            weakref.WeakKeyDictionary()

    def describe(self) -> str:
        return self.spec.description or f"commands from {self.path.name}"

    def identity(self) -> dict[str, Any]:
        """The TOML file and every hook's executable, by digest, and any file an absolute
        argument names (the script of ``python3 /srv/hooks/engage.py``). Checked at each
        attempt, so an edited script shows up in the next execution record."""
        hooks: dict[str, Any] = {}
        for phase, argv in self.commands.items():
            hook = hooks[phase] = {"command": " ".join(argv), "sha256": file_digest(Path(argv[0]))}
            files = {a: file_digest(Path(a)) for a in argv[1:]
                     if os.path.isabs(a) and os.path.isfile(a)}
            if files:
                hook["files"] = files
        ident: dict[str, Any] = {"kind": "toml", "file": str(self.path),
                                 "file_sha256": file_digest(self.path), "hooks": hooks}
        if self.spec.engage is not None and self.spec.engage.model is not None:
            ident["model"] = self.spec.engage.model
            ident["system_prompt_sha256"] = canonical_hash(self.system_prompt)
            if self.spec.engage.mcp:
                ident["mcp"] = [s.identity() for s in self.spec.engage.mcp]
        return ident

    def source_files(self) -> dict[str, Path]:
        files = {file_digest(self.path): self.path}
        for argv in self.commands.values():
            for arg in argv[:1] + [a for a in argv[1:] if os.path.isabs(a) and os.path.isfile(a)]:
                files[file_digest(Path(arg))] = Path(arg)
        return {digest: path for digest, path in files.items() if digest.startswith("sha256:")}

    # -- phases --------------------------------------------------------------------------

    async def orient(self, focus: Focus) -> Any:
        self._prepare(focus)
        return await self._phase("orient", focus)

    async def engage(self, focus: Focus, oriented: Any) -> Any:
        self._prepare(focus)
        ps = self.spec.engage
        if ps is not None and ps.model is not None:
            durable = self._durable_for(focus)
            if durable is not None:
                await durable.plan()
                replayed = await durable.replayed("engage")
                if replayed is not None:
                    return self._restore(focus, "engage", replayed)
            result = await focus.agent(
                model=ps.model, system=self.system_prompt, tools=ps.tools,
                max_turns=ps.max_turns, max_tokens=ps.max_tokens, token_budget=ps.token_budget,
                stream=ps.stream, oriented=oriented, mcp=ps.mcp)
            out = {"text": result.text, "stop_reason": result.stop_reason,
                   "turns": result.turns, "model": result.model,
                   "usage": msgspec.structs.asdict(result.usage), "cost_usd": result.cost_usd,
                   "transcript": result.transcript}
            # the contract: later phases (commands) read engage-out.json
            (focus.directory / "engage-out.json").write_bytes(msgspec.json.encode(out))
            if durable is not None:
                await durable.completed("engage", {"out": out})
            return out
        return await self._phase("engage", focus)

    async def consolidate(self, focus: Focus, engaged: Any) -> Any:
        if "consolidate" not in self.commands:
            return engaged  # no consolidate hook: engage's output is the outcome
        return await self._phase("consolidate", focus)

    async def recover(self, focus: Focus, error: str, phase: str) -> bool | None:  # type: ignore[override]
        if "recover" not in self.commands:
            return None
        self._prepare(focus)
        try:
            await self._run("recover", focus, extra={"ANIMUS_ERROR": error[:4000],
                                                     "ANIMUS_FAILED_PHASE": phase})
        except HookFailed:
            return False
        return True

    # -- durable hooks (docs/hook-contract.md) ----------------------------------------------

    def _durable_for(self, focus: Focus) -> DurableFocus | None:
        if focus.steps is None:
            return None  # a focus built without durable steps (not by an engine)
        durable = self._durable.get(focus)
        if durable is None:
            durable = self._durable[focus] = DurableFocus(
                focus, resume_phase=self.spec.resume == "phase")
        return durable

    async def _phase(self, phase: str, focus: Focus) -> Any:
        """Run ``phase``'s hook (again, while it asks to suspend and the wait is over at
        once), or take its output from the record; its output."""
        durable = self._durable_for(focus)
        if durable is None or phase not in self.commands:
            await self._run(phase, focus)
            return self._read_out(focus, phase)
        await durable.plan()
        replayed = await durable.replayed(phase)
        if replayed is not None:
            return self._restore(focus, phase, replayed)
        resumed = await durable.resuming(phase)
        while True:
            began = durable.journal.position
            remove(focus.directory / "suspend.json")
            extra = None
            if resumed is None:
                remove(focus.directory / "resume.json")
            else:
                (focus.directory / "resume.json").write_bytes(msgspec.json.encode(resumed))
                extra = {RESUMED_VAR: "1"}
            await self._run(phase, focus, extra=extra, durable=durable)
            request = self._read_suspend(focus, phase)
            if request is None:
                break
            resumed = await durable.suspend(phase, request, began)
        out = self._read_out(focus, phase)
        wrote = (focus.directory / f"{phase}-out.json").exists()
        await durable.completed(phase, {"out": out} if wrote else {})
        return out

    def _restore(self, focus: Focus, phase: str, replayed: dict[str, Any]) -> Any:
        """Write ``phase``'s output file as the phase wrote it on an earlier attempt."""
        if "out" not in replayed:
            return None
        (focus.directory / f"{phase}-out.json").write_bytes(msgspec.json.encode(replayed["out"]))
        return replayed["out"]

    def _read_suspend(self, focus: Focus, phase: str) -> Any:
        path = focus.directory / "suspend.json"
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        remove(path)
        try:
            return parse_suspend(data)
        except InvalidInput as e:
            raise HookFailed(f"{phase} hook wrote an unusable suspend.json: {e}",
                             kind="bad_output") from None

    # -- the contract ----------------------------------------------------------------------

    def _prepare(self, focus: Focus) -> None:
        work_json = focus.directory / "work.json"
        if not work_json.exists():
            work_json.write_bytes(msgspec.json.encode(focus.work))

    def _env(self, focus: Focus, phase: str, extra: dict[str, str] | None) -> dict[str, str]:
        env = {k: os.environ[k] for k in BASE_ENV if k in os.environ}
        bindir = str(Path(sys.executable).parent)
        env["PATH"] = bindir + os.pathsep + env.get("PATH", os.defpath)
        for name in (*self.spec.env, *self.spec.secrets):
            if name in os.environ:
                env[name] = os.environ[name]
        env.update(
            ANIMUS_FOCUS_DIR=str(focus.directory),
            ANIMUS_WORK_TYPE=focus.work.work_type,
            ANIMUS_WORK_ID=str(focus.work.id),
            ANIMUS_PHASE=phase,
            ANIMUS_ATTEMPT=str(focus.attempt),
        )
        env[MARK_VARIABLE] = guard.mark
        env.update(focus.hook_env)
        if focus.traceparent:
            env["TRACEPARENT"] = focus.traceparent
        if extra:
            env.update(extra)
        return env

    async def _run(self, phase: str, focus: Focus, extra: dict[str, str] | None = None, *,
                   durable: DurableFocus | None = None) -> None:
        if phase not in self.commands:
            return
        if durable is None:
            await self._exec(phase, focus, extra)
            return
        async with StepServer(durable) as server:
            try:
                await self._exec(phase, focus, {**(extra or {}), **server.env})
            except HookFailed:
                if server.failure is not None:
                    raise server.failure from None
                raise
        if server.failure is not None:  # a step called out of order, whatever the hook did
            raise server.failure

    async def _exec(self, phase: str, focus: Focus, extra: dict[str, str] | None) -> None:
        argv = self.commands[phase]
        ps: PhaseSpec | None = getattr(self.spec, phase)
        timeout = (ps.timeout if ps and ps.timeout else None) or self.spec.timeout
        guard.start()  # before the hook: it must not outlive a SIGKILLed engine
        try:
            proc = Child.start(argv, cwd=focus.directory, env=self._env(focus, phase, extra),
                               new_session=True)
        except OSError as e:
            raise HookFailed(f"{phase} hook {argv[0]} could not start: {e.strerror}") from None
        guard.watch(proc.pid)  # its own session: the group id is its pid
        try:
            async with asyncio.timeout(timeout):  # no task of its own, as wait_for makes
                stdout, stderr = await proc.communicate()
        except TimeoutError:
            proc.kill_group()
            await proc.wait()
            raise HookFailed(f"{phase} hook {argv[0]} timed out after {timeout:g}s",
                             kind="timeout") from None
        except asyncio.CancelledError:
            proc.kill_group()
            raise
        finally:
            guard.unwatch(proc.pid)
        if stdout:
            focus.log.debug("%s stdout: %s", phase, redactor.tail(stdout, STDERR_TAIL))
        code = proc.returncode or 0
        if code != 0:
            tail = redactor.tail(stderr, STDERR_TAIL).strip()
            status = (f"was killed by signal {-code}" if code < 0
                      else f"exited with status {code}")
            raise HookFailed(f"{phase} hook {argv[0]} {status}" + (f": {tail}" if tail else ""),
                             kind="exit_status")

    def _read_out(self, focus: Focus, phase: str) -> Any:
        out = focus.directory / f"{phase}-out.json"
        try:
            size = out.stat().st_size
        except FileNotFoundError:
            return None
        limit = limits().outcome_bytes
        if size > limit:  # not read at all: the file may be huge
            raise HookFailed(f"{phase} hook wrote unreadable output: {out.name} is {size} bytes, "
                             f"over the limit of {limit} (ANIMUS_MAX_OUTCOME_BYTES)", kind="bad_output")
        try:
            return json_values.decode(out.read_bytes(), out.name)
        except InvalidInput as e:
            raise HookFailed(f"{phase} hook wrote unreadable output: {e}",
                             kind="bad_output") from None


@hookimpl
def shutdown(engine: EngineView) -> None:
    """The engine has drained: no hook of its runs, so the step server's idle wait ends."""
    close_listener()


@hookimpl
def register_faculties(register: Callable[[Faculty], None], settings: Settings) -> None:
    """Register every valid file in ``settings.faculties_dir``; report the others."""
    faculties, errors = load_dir(settings.faculties_dir)
    for faculty in faculties:
        register(faculty)
    if errors:
        raise ConfigError("\n".join(errors))
