"""Child processes whose output and exit are awaited on the event loop, whichever loop it is.

:class:`subprocess.Popen` starts them: it closes every descriptor of the parent but the three
it gives the child, on any loop. uvloop's own subprocesses keep duplicates of their pipes
open in the child, and so in whatever the child leaves running (a daemon a hook starts, its
output sent elsewhere): the parent would wait for the end of that output until the daemon
exits. The loop only waits here: for output through its readers, for the exit through a
pidfd (Linux 5.3 and later), or through a worker thread where there is none.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO

__all__ = ["Child"]

_CHUNK = 65536


class Child:
    """A child process with its standard output and error piped to this process."""

    def __init__(self, popen: subprocess.Popen[bytes]) -> None:
        self.popen = popen

    @classmethod
    def start(cls, argv: Sequence[str], *, cwd: Path | str | None = None,
              env: Mapping[str, str] | None = None, new_session: bool = False) -> Child:
        """Start ``argv`` with standard input from /dev/null (``OSError`` when it cannot
        start); ``new_session``: in a session, and so a process group, of its own."""
        return cls(subprocess.Popen(
            list(argv), cwd=cwd, env=None if env is None else dict(env),
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            close_fds=True, start_new_session=new_session))

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def returncode(self) -> int | None:
        """The exit status once :meth:`wait` saw the exit (minus the signal that killed it)."""
        return self.popen.returncode

    async def communicate(self) -> tuple[bytes, bytes]:
        """Read standard output and error to their end, then wait for the exit."""
        stdout, stderr = self.popen.stdout, self.popen.stderr
        assert stdout is not None
        assert stderr is not None
        out, err = await asyncio.gather(_read_all(stdout), _read_all(stderr))
        await self.wait()
        return out, err

    async def wait(self) -> int:
        """Wait for the child to exit; its exit status."""
        code = self.popen.poll()
        if code is not None:
            return code
        try:
            pidfd = os.pidfd_open(self.pid)
        except (AttributeError, OSError):  # not Linux, or older than 5.3
            return await asyncio.to_thread(self.popen.wait)
        try:
            await _readable(pidfd)
        finally:
            os.close(pidfd)
        return self.popen.wait()  # it has exited: this only reaps it

    def kill_group(self) -> None:
        """SIGKILL the child's process group (it must have started in a session of its own).
        Unless :meth:`wait` is awaited after, the child is reaped when the next one starts."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        self.popen.poll()


async def _readable(fd: int) -> None:
    """Return once ``fd`` is readable (a pidfd: once its process has exited)."""
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()

    def readable() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(fd, readable)
    try:
        await ready
    finally:
        loop.remove_reader(fd)


async def _read_all(pipe: IO[bytes]) -> bytes:
    """Everything ``pipe`` gives until its end; the pipe is closed after."""
    fd = pipe.fileno()
    os.set_blocking(fd, False)
    chunks: list[bytes] = []
    try:
        while True:
            try:
                data = os.read(fd, _CHUNK)
            except BlockingIOError:
                await _readable(fd)
                continue
            except OSError:
                data = b""
            if not data:
                return b"".join(chunks)
            chunks.append(data)
    finally:
        pipe.close()
