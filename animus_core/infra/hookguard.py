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
  its hook's group, a process a finished hook left behind), and exits.

The watcher is this file, run as a script by the engine's interpreter in isolated mode
without ``site``: it needs nothing but the standard library and starts in milliseconds.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys

__all__ = ["HookGuard", "guard"]

MARK_VARIABLE = "ANIMUS_ENGINE_ID"
#: Passes over /proc: a marked process may fork while the watcher looks.
_PASSES = 20


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
                stdout=subprocess.DEVNULL, env={}, close_fds=True)
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


def _marked(entry: bytes, skip: set[int]) -> list[int]:
    """Processes (of this user: others' environments are unreadable) with ``entry`` in their
    environment."""
    try:
        names = os.listdir("/proc")
    except OSError:
        return []
    found = []
    for name in names:
        if not name.isdigit() or int(name) in skip:
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                environ = f.read()
        except OSError:
            continue
        if entry in environ.split(b"\0"):
            found.append(int(name))
    return found


def _kill_all(groups: set[int], mark: str) -> int:
    """Kill the named groups, then the marked processes and their groups; how many process
    groups were killed."""
    own = os.getpgrp()
    killed: set[int] = set()

    def kill_group(pgid: int) -> None:
        if pgid > 1 and pgid != own and pgid not in killed:
            with contextlib.suppress(OSError):
                os.killpg(pgid, signal.SIGKILL)
                killed.add(pgid)

    for pgid in groups:
        kill_group(pgid)
    entry = f"{MARK_VARIABLE}={mark}".encode()
    seen = {os.getpid()}
    for _ in range(_PASSES):
        found = _marked(entry, seen)
        if not found:
            break
        for pid in found:
            seen.add(pid)
            with contextlib.suppress(OSError):
                kill_group(os.getpgid(pid))
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)  # one that shares the watcher's group
    return len(killed)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        sys.stderr.write(f"usage: {argv[0]} ENGINE_MARK (started by the animus engine)\n")
        return 2
    mark = argv[1]
    # A terminal's Ctrl-C, a hangup or a service manager's SIGTERM reach the whole process
    # group: the engine drains its hooks then, and the watcher must outlive it.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    groups: set[int] = set()
    pending = b""
    while chunk := os.read(0, 65536):
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            if line.startswith(b"+"):
                groups.add(int(line[1:]))
            elif line.startswith(b"-"):
                groups.discard(int(line[1:]))
    killed = _kill_all(groups, mark)
    if killed:
        sys.stderr.write(f"animus: engine process {mark.split('-')[0]} is gone: killed the "
                         f"{killed} process groups its command hooks left running\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
