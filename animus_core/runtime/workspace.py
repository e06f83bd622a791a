"""Where foci work: each engine makes its focus directories in a directory of its own under
``$ANIMUS_HOME/foci``, locked while the engine lives; what engines that died left there (the
directories, and any process their hooks left running in them) is removed by the next engine
to start."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from animus_core.infra.hookguard import kill_left_in

__all__ = ["EngineFoci", "Workspace", "open_workspace", "sweep_foci"]

_log = logging.getLogger("animus.engine")


@dataclass(frozen=True)
class Workspace:
    """Where foci work: ``root`` is this engine's own directory for focus directories;
    a kept one moves to ``keep_root``. Hooks see ``hook_env``."""

    root: Path
    keep_root: Path
    hook_env: dict[str, str]
    keep_failed: bool = False


#: Engines make their foci in ``$ANIMUS_HOME/foci/engine-<pid>-<random>/``.
ENGINE_PREFIX = "engine-"


class EngineFoci:
    """The directory one engine makes its foci in, under the shared foci root, locked
    (``flock``) for as long as the engine process holds it open. The lock, not a pid, tells
    a live engine: it is released when the process ends however it ends, it cannot be
    mistaken for a reused pid, and it holds across containers that share the directory."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    @classmethod
    def open(cls, root: Path) -> EngineFoci:
        root.mkdir(parents=True, exist_ok=True)
        while True:
            path = Path(tempfile.mkdtemp(prefix=f"{ENGINE_PREFIX}{os.getpid()}-", dir=root))
            fd = _lock(path)
            if fd is not None:
                return cls(path, fd)
            # swept by an engine starting meanwhile, before it was locked: take another

    def close(self) -> None:
        """Unlock; remove the directory when no focus left anything in it (the next engine
        to start removes what is left)."""
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            self.path.rmdir()
        os.close(self._fd)
        self._fd = None


def _lock(path: Path) -> int | None:
    """An open descriptor holding the lock on directory ``path``, or None when another
    process holds it or the directory is gone (or was replaced) meanwhile."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if os.stat(path).st_ino == os.fstat(fd).st_ino:
            return fd
    except OSError:
        pass
    os.close(fd)
    return None


def sweep_foci(root: Path) -> list[Path]:
    """Remove the engine directories under ``root`` that no live engine holds: those of
    engines that died with foci running (killed, out of memory, power lost), after killing
    the processes their hooks left running there (their watcher should have; it may have died
    with them). Returns the focus directories that were in them. Kept focus directories live
    in ``root`` itself and are not touched."""
    try:
        candidates = sorted(p for p in root.iterdir() if p.name.startswith(ENGINE_PREFIX))
    except OSError:
        return []
    dead: dict[Path, int] = {}
    try:
        for path in candidates:
            fd = _lock(path)
            if fd is not None:  # else a live engine's
                dead[path] = fd
        if dead and (killed := kill_left_in(list(dead))):
            _log.warning("killed the %d process groups that command hooks of engines now gone "
                         "left running", killed)
        removed: list[Path] = []
        for path in dead:
            with contextlib.suppress(OSError):
                removed += sorted(path.iterdir())
            shutil.rmtree(path, ignore_errors=True)
        return removed
    finally:
        for fd in dead.values():
            os.close(fd)


def open_workspace(root: Path, hook_env: dict[str, str], *,
                   keep_failed: bool) -> tuple[EngineFoci, Workspace]:
    """Sweep what dead engines left under ``root``, then take a directory of this engine's
    own there (several engines may share one ANIMUS_HOME)."""
    removed = sweep_foci(root)
    if removed:
        _log.info("removed %d focus directories of attempts whose engine is gone: %s",
                  len(removed), ", ".join(p.name for p in removed))
    foci = EngineFoci.open(root)
    return foci, Workspace(foci.path, root, hook_env, keep_failed=keep_failed)
