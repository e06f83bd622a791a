"""Run your faculties against a real engine in your own tests.

    from animus_core import NewWorkItem
    from animus_core.testing import run_faculties

    async def test_shout(tmp_path):
        async with run_faculties([Shout()], home=tmp_path) as animus:
            item = await animus.run(NewWorkItem("shout").params({"text": "hi"}))
        assert item.outcome.data == {"text": "HI"}

The engine is the real one (claims, leases, phases, retries, the audit trail) on a real
Postgres: ``DATABASE_URL`` when it is set, otherwise the embedded server under ``home``.
Only the faculties you pass (and ``plugins``) are loaded: no entry points, no TOML files
unless ``faculties_dir`` names a directory of them.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from animus_core.app import Animus
from animus_core.faculties.contract import hookimpl
from animus_core.faculties.faculty import Faculty
from animus_core.infra.config import Settings
from animus_core.runtime.engine import Engine, EngineOptions
from animus_core.store.db import Db
from animus_core.values.errors import ConfigError
from animus_core.values.work import NewWorkItem, SubmitResult, WorkItem

__all__ = ["OPTIONS", "Provides", "RunningAnimus", "run_faculties"]

#: Engine options for tests: a short fallback poll and quick sealing and draining.
OPTIONS = EngineOptions(poll_interval=1.0, lease_seconds=30, grace=5.0, seal_interval=0.2)


class Provides:
    """A plugin that registers the given faculty instances, through the real registration
    path (their signatures are checked as any plugin's are)."""

    def __init__(self, faculties: Sequence[Faculty]) -> None:
        self.faculties = list(faculties)

    @hookimpl
    def register_faculties(self, register: Callable[[Faculty], None]) -> None:
        for faculty in self.faculties:
            register(faculty)


@dataclass
class RunningAnimus:
    """What the block of :func:`run_faculties` works with."""

    animus: Animus
    engine: Engine

    @property
    def db(self) -> Db:
        return self.animus.db

    async def submit(self, item: NewWorkItem) -> SubmitResult:
        return await self.animus.db.submit_work(item)

    async def run(self, item: NewWorkItem, timeout: float = 30.0) -> WorkItem:
        """Submit ``item`` and wait until it is finished (or merged); return it. An item
        still unfinished after ``timeout`` seconds fails with ``TimeoutError``."""
        result = await self.submit(item)
        done = await self.animus.wait_finished(result.canonical_id, timeout)
        if not done.state.terminal:
            raise TimeoutError(f"work item {done.id} ({done.work_type}) is still {done.state} "
                               f"after {timeout:g}s")
        return done


@contextlib.asynccontextmanager
async def run_faculties(faculties: Sequence[Faculty], *, home: Path,
                        database_url: str | None = None, faculties_dir: Path | None = None,
                        plugins: Mapping[str, object] | None = None,
                        options: EngineOptions = OPTIONS,
                        env: Mapping[str, str] | None = None) -> AsyncIterator[RunningAnimus]:
    """An engine running ``faculties`` for the block; stopped (drained) when it ends.

    A faculty (or plugin) that cannot be registered fails with :class:`ConfigError` naming
    it and why. ``env`` adds to the process environment for the settings (``ANIMUS_*``)."""
    merged = {**os.environ, **(env or {}), "ANIMUS_HOME": str(home),
              "ANIMUS_DISABLE_PLUGIN_AUTOLOAD": "1",
              "ANIMUS_FACULTIES": str(faculties_dir or home / "no-toml-faculties")}
    if database_url is not None:
        merged["DATABASE_URL"] = database_url
    settings = Settings.from_env(merged)
    extra = {**(plugins or {}), "animus-testing": Provides(faculties)}
    async with Animus(settings, actor="animus-testing", migrate="always",
                      plugins=extra) as animus:
        await animus.load_faculties()
        if animus.problems:
            raise ConfigError("; ".join(f"{p.plugin}: {p.error}" for p in animus.problems))
        async with animus.running(options, start_timeout=60, stop_timeout=60) as engine:
            yield RunningAnimus(animus, engine)
