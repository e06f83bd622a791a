"""Command hooks die with their engine, however the engine dies.

A hook runs in a session (and so a process group) of its own, so that the engine can kill it
and everything it started with one signal. Nothing does that when the engine itself dies:
SIGKILL leaves no time to clean up, and the orphaned hook goes on running, possibly alongside
the next attempt of its item on another engine. A small watcher process closes the gap:

* the engine names the process group of each hook it starts over a pipe on the watcher's
  standard input (``+PGID``), and names it again once the hook has ended (``-PGID``);
* each hook has ``ANIMUS_ENGINE_ID`` (this process's mark) in its environment, and so has
  whatever it starts, unless that clears its environment;
* when the engine process dies, the kernel closes its end of the pipe, whatever killed it.
  The watcher reads end-of-file, kills every group still named, then every process that
  carries the mark, with its group (a hook started too late to be named, a child that left
  its hook's group, a process a finished hook left behind), and exits. It runs in a session
  of its own: a SIGKILL of the engine's whole process group (``kill -9 -PGID``) spares it.

Should the watcher die too (the OOM killer may take both), the next engine to start with the
same ``ANIMUS_HOME`` kills what is left (:func:`kill_left_in`: the processes whose
``ANIMUS_FOCUS_DIR`` lies in a dead engine's directory) as it removes those directories,
before it claims anything.

The watcher is this file, run as a script by the engine's interpreter in isolated mode
without ``site``: it needs nothing but the standard library and starts in milliseconds.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import subprocess
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the watcher runs this file: it imports as little as it can
    from collections.abc import Callable, Iterable, Iterator, Sequence
    from pathlib import Path

__all__ = ["HookGuard", "guard", "kill_left_in"]

MARK_VARIABLE = "ANIMUS_ENGINE_ID"
FOCUS_DIR_VARIABLE = "ANIMUS_FOCUS_DIR"
#: Passes over /proc at most: a marked process may fork while the last pass looked.
_PASSES = 20
#: How often the watcher reads what the engine told it (a pipe holds 64 KiB: 8,000 lines).
_DRAIN_SECONDS = 0.5


class HookGuard:
    """The engine's side: starts the watcher and tells it which groups to kill."""

    def __init__(self) -> None:
        self.mark = f"{os.getpid()}-{os.urandom(6).hex()}"
        self._watcher: subprocess.Popen[bytes] | None = None
        self._groups: set[int] = set()
        self._failed = False

    def start(self) -> None:
        """Make sure a watcher runs (a new one learns every group still watched)."""
        old = self._watcher
        if old is not None:
            if old.poll() is None:
                return
            if old.stdin is not None:
                with contextlib.suppress(OSError):
                    old.stdin.close()
            self._watcher = None
        try:
            self._watcher = subprocess.Popen(
                [sys.executable, "-I", "-S", __file__, self.mark], stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL, env={}, close_fds=True,
                start_new_session=True)  # a SIGKILL of the engine's group spares it
        except OSError as e:  # hooks still run; they only lose this safety net
            if not self._failed:
                self._failed = True
                logging.getLogger("animus.hooks").error(
                    "cannot start the hook watcher (%s %s): command hooks will outlive this "
                    "engine if it is killed: %s", sys.executable, __file__, e)
            return
        if self._groups:
            self._send("".join(f"+{g}\n" for g in self._groups))

    def watch(self, pgid: int) -> None:
        self._groups.add(pgid)
        self._send(f"+{pgid}\n")

    def unwatch(self, pgid: int) -> None:
        self._groups.discard(pgid)
        self._send(f"-{pgid}\n")

    def _send(self, lines: str) -> None:
        watcher = self._watcher
        if watcher is None or watcher.stdin is None:
            return  # none could start; start() said so
        try:
            os.write(watcher.stdin.fileno(), lines.encode())
        except OSError:  # the watcher is gone (someone killed it): a new one learns them all
            watcher.wait()
            self.start()


#: One per engine process: in-process engines share it, as they share the process's fate.
guard = HookGuard()


# -- the watcher --------------------------------------------------------------------------------


def _processes(match: Callable[[bytes], bool], skip: set[int]) -> Iterator[int]:
    """Processes (of this user: others' environments are unreadable) with an entry of their
    environment that ``match`` accepts, each as soon as it is found."""
    try:
        names = os.listdir("/proc")
    except OSError:
        return
    for name in names:
        if not name.isdigit() or int(name) in skip:
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                environ = f.read()
        except OSError:
            continue
        if any(match(entry) for entry in environ.split(b"\0")):
            yield int(name)


def kill_processes(match: Callable[[bytes], bool], groups: Iterable[int] = ()) -> int:
    """Kill ``groups``, then every process with an entry of its environment that ``match``
    accepts, with its process group; how many process groups were killed."""
    own = os.getpgrp()
    killed: set[int] = set()

    def kill_group(pgid: int) -> None:
        if pgid > 1 and pgid != own and pgid not in killed:
            with contextlib.suppress(OSError):
                os.killpg(pgid, signal.SIGKILL)
                killed.add(pgid)

    for pgid in groups:
        kill_group(pgid)
    seen = {os.getpid()}
    for _ in range(_PASSES):  # until a pass finds none: one may fork while the last looked
        found = False
        for pid in _processes(match, seen):
            found = True
            seen.add(pid)
            with contextlib.suppress(OSError):
                kill_group(os.getpgid(pid))
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)  # one that shares the caller's group
        if not found:
            break
    return len(killed)


def kill_left_in(directories: Sequence[Path]) -> int:
    """Kill every process whose ``ANIMUS_FOCUS_DIR`` lies in one of ``directories`` (those of
    engines that are gone), with its process group; how many process groups were killed."""
    prefixes = tuple(f"{FOCUS_DIR_VARIABLE}={d}{os.sep}".encode() for d in directories)
    return kill_processes(lambda entry: entry.startswith(prefixes)) if prefixes else 0


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        sys.stderr.write(f"usage: {argv[0]} ENGINE_MARK (started by the animus engine)\n")
        return 2
    mark = argv[1]
    # A service manager may signal every process of the engine's cgroup to stop it: the engine
    # drains its hooks then, and the watcher must outlive it.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    groups: set[int] = set()
    pending = b""
    os.set_blocking(0, False)
    # Woken by the end of the pipe alone (poll always reports a hang-up; no POLLIN asked for):
    # the engine's two lines per hook wake nothing. What they say is read every
    # _DRAIN_SECONDS, before the pipe could fill, and at the end.
    poller = select.poll()
    poller.register(0, 0)
    ended = False
    while not ended:
        poller.poll(_DRAIN_SECONDS * 1000)
        while True:
            try:
                chunk = os.read(0, 65536)
            except BlockingIOError:
                break
            if not chunk:
                ended = True
                break
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                if line.startswith(b"+"):
                    groups.add(int(line[1:]))
                elif line.startswith(b"-"):
                    groups.discard(int(line[1:]))
    entry = f"{MARK_VARIABLE}={mark}".encode()
    killed = kill_processes(entry.__eq__, groups)
    if killed:
        sys.stderr.write(f"animus: engine process {mark.split('-')[0]} is gone: killed the "
                         f"{killed} process groups its command hooks left running\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
