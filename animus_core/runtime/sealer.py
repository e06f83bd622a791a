"""The sealer: it chains new audit rows shortly after they commit, and now and then writes
a checkpoint of the chain's head outside the database (:mod:`animus_core.infra.witness`):
copies the database cannot rewrite."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path

from animus_core.infra import witness
from animus_core.runtime.health import Health
from animus_core.store.db import Db
from animus_core.values.errors import AnimusError

__all__ = ["Sealer"]

_log = logging.getLogger("animus.engine")
_audit_log = logging.getLogger("animus.audit")


class Sealer:
    def __init__(self, store: Db, health: Health, home: Path, *, interval: float,
                 checkpoint_interval: float) -> None:
        self.store = store
        self.health = health
        self.home = home
        self.interval = interval
        self.checkpoint_interval = checkpoint_interval
        #: something was recorded since the last seal
        self.activity = False
        self._unwitnessed = True
        self._witnessed_at = -1e18
        self._witnessed_seq = -1
        self._checkpoint_file: Path | None = None

    def touch(self) -> None:
        """Something was recorded: seal soon."""
        self.activity = True

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            if self.activity:
                self.activity = False
                try:
                    if await self.store.seal_audit():
                        self._unwitnessed = True
                except AnimusError as e:
                    self.health.retrying(e, "audit sealing failed (will retry): %s", e)
                    self.activity = True
                    continue
            if (self._unwitnessed and time.monotonic() - self._witnessed_at
                    >= self.checkpoint_interval):
                await self.witness()

    async def final(self) -> None:
        """At the stop: seal what is left and write a last checkpoint."""
        with contextlib.suppress(AnimusError):
            await self.store.seal_audit()
            await self.witness()

    async def witness(self) -> None:
        """Write a checkpoint of the audit chain's head under ANIMUS_HOME and log it (to the
        OTLP log stream too, when telemetry exports)."""
        try:
            cp = await self.store.audit_checkpoint(seal=False)
        except AnimusError as e:
            self.health.retrying(e, "could not take an audit checkpoint (will retry): %s", e)
            return
        self._unwitnessed = False
        self._witnessed_at = time.monotonic()
        if cp.seq == self._witnessed_seq:
            return
        # logged first: the write below runs in a thread, and a stop may cancel the wait for
        # it; the checkpoint then counts as unwritten and the stop writes (and logs) it again
        line = cp.line()
        _audit_log.info("audit checkpoint %s", line, extra={"animus.audit.checkpoint": line})
        path = witness.checkpoint_path(self.home, cp.database)
        try:
            await asyncio.to_thread(witness.append_checkpoint, path, cp)
        except OSError as e:
            _log.warning("could not write an audit checkpoint to %s: %s", path, e)
        else:
            if path != self._checkpoint_file:
                self._checkpoint_file = path
                _log.info("writing audit checkpoints to %s", path)
        self._witnessed_seq = cp.seq
