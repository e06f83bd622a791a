"""One animus, assembled in one place: its settings, database, plugin manager, faculties,
rules, memory and engine.

    async with Animus() as animus:              # settings from the environment
        await animus.db.submit_work(NewWorkItem("transform").params({"content": "hi"}))
        await animus.run()                        # the engine, until animus.stop()

The command line, the tests, the benchmarks and :mod:`animus_core.testing` all build
through it; nothing else wires these parts together.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import getpass
import time
from collections.abc import AsyncIterator, Mapping
from types import TracebackType
from typing import Literal, Self
from uuid import UUID

import pluggy

from animus_core.faculties.plugins import (
    Faculties,
    PluginProblem,
    collect_faculties,
    make_plugin_manager,
)
from animus_core.governance.rules import RuleSet
from animus_core.governance.work import GovernedWork
from animus_core.infra.config import Settings
from animus_core.runtime.engine import Engine, EngineOptions
from animus_core.store.db import Db, describe_url
from animus_core.values.errors import MigrationError
from animus_core.values.states import TERMINAL
from animus_core.values.work import WorkItem

__all__ = ["Animus"]

#: "always": apply pending migrations; "embedded": only on the embedded server (another
#: server must be migrated on purpose, with ``animus db migrate``); "never": refuse to work
#: on a database with pending migrations
Migrate = Literal["always", "embedded", "never"]


class Animus:
    """The application object. Open it (``async with``) before use; it closes what it
    opened (a ``db`` passed in stays the caller's)."""

    def __init__(self, settings: Settings | None = None, *, db: Db | None = None,
                 actor: str | None = None, pool_size: int = 10, migrate: Migrate = "embedded",
                 plugins: Mapping[str, object] | None = None,
                 load_entry_points: bool | None = None) -> None:
        """``plugins``: extra plugin objects by name, registered before the faculties are
        collected (a test's faculties, a guardrail); ``load_entry_points``: whether to load
        the ``animus`` entry points (default: ``settings.plugins_autoload``)."""
        self.settings = settings or Settings.from_env()
        self._db = db
        self._owns_db = db is None
        self._actor = actor or f"animus:{getpass.getuser()}"
        self._pool_size = pool_size
        self._migrate: Migrate = migrate
        self._plugins = dict(plugins or {})
        self._load_entry_points = load_entry_points
        self._pm: pluggy.PluginManager | None = None
        self._faculties: Faculties | None = None
        self.problems: list[PluginProblem] = []
        self._engine: Engine | None = None

    # -- opening -----------------------------------------------------------------------------

    async def open(self) -> Self:
        """Connect to the database; the faculties are loaded when first needed (an engine,
        :meth:`load_faculties`)."""
        await self.open_db()
        return self

    async def open_db(self) -> Db:
        """Connect (unless a database was given) and bring the schema up to date as the
        ``migrate`` policy says."""
        if self._db is None:
            self._db = await Db.connect(settings=self.settings, max_size=self._pool_size,
                                        actor=self._actor)
        try:
            await self._check_migrations(self._db)
        except BaseException:
            await self.close()
            raise
        return self._db

    async def _check_migrations(self, db: Db) -> None:
        if self._migrate == "always":
            await db.migrate()
            return
        status = await db.migration_status()
        if not status.pending:
            return
        if self._migrate == "embedded" and self.settings.database_url is None:
            await db.migrate()
            return
        raise MigrationError(
            f"the database at {describe_url(db.url)} has pending animus migrations "
            f"({', '.join(f'{v:04d}' for v in status.pending)}): run `animus db migrate`")

    async def load_faculties(self) -> Faculties:
        """The plugin manager and the faculties its plugins register (once). What could not
        be loaded is in :attr:`problems`."""
        if self._faculties is None:
            pm, problems = make_plugin_manager(self.settings,
                                               load_entry_points=self._load_entry_points)
            for name, plugin in self._plugins.items():
                pm.register(plugin, name=name)
            faculties, more = await collect_faculties(pm, self.settings)
            self._pm, self._faculties, self.problems = pm, faculties, problems + more
        return self._faculties

    async def close(self) -> None:
        if self._db is not None and self._owns_db:
            await self._db.close()
            self._db = None

    async def __aenter__(self) -> Self:
        return await self.open()

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()

    # -- parts -------------------------------------------------------------------------------

    @property
    def db(self) -> Db:
        """The store (ungoverned: rules apply through the engine and the governed API)."""
        if self._db is None:
            raise RuntimeError("open the Animus first (async with Animus(...) as animus)")
        return self._db

    @functools.cached_property
    def rules(self) -> RuleSet:
        """The rules of ``settings.rules_dir``, read when first needed (a command that
        submits nothing does not fail on a broken rules file)."""
        return RuleSet.load(self.settings.rules_dir)

    @property
    def governed(self) -> GovernedWork:
        """Submissions with this animus's rules applied (see :mod:`animus_core.governance`)."""
        return GovernedWork(self.db, self.rules)

    @property
    def pm(self) -> pluggy.PluginManager:
        if self._pm is None:
            raise RuntimeError("load the faculties first (Animus.open or load_faculties)")
        return self._pm

    @property
    def faculties(self) -> Faculties:
        if self._faculties is None:
            raise RuntimeError("load the faculties first (Animus.open or load_faculties)")
        return self._faculties

    # -- the engine --------------------------------------------------------------------------

    def engine(self, options: EngineOptions | None = None) -> Engine:
        """The engine of this animus (made once, with ``options`` the first time)."""
        if self._engine is None:
            self._engine = Engine(self.db, self.pm, self.faculties, self.settings, options,
                                  rules=self.rules)
        return self._engine

    async def run(self, options: EngineOptions | None = None) -> None:
        """Run the engine until :meth:`stop` (or a signal handler calling it)."""
        await self.load_faculties()
        await self.engine(options).run()

    def stop(self) -> None:
        if self._engine is not None:
            self._engine.stop()

    async def wait_finished(self, work_id: UUID | str, timeout: float) -> WorkItem:
        """The item once it is finished (completed, dead, merged or cancelled), or as it is
        when ``timeout`` seconds have passed."""
        deadline = time.monotonic() + timeout
        while True:
            item = await self.db.get_work_item(work_id)
            if item.state in TERMINAL or time.monotonic() > deadline:
                return item
            await asyncio.sleep(0.1)

    @contextlib.asynccontextmanager
    async def running(self, options: EngineOptions | None = None, *,
                      start_timeout: float | None = None,
                      stop_timeout: float | None = None) -> AsyncIterator[Engine]:
        """The engine running in the background for the block, started and listening when
        it begins; stopped (drained) when it ends. ``TimeoutError`` when it takes longer
        than ``start_timeout`` to start or ``stop_timeout`` to stop."""
        await self.load_faculties()
        engine = self.engine(options)
        task = asyncio.create_task(engine.run(), name="animus-engine")
        try:
            ready = asyncio.create_task(_ready(engine))
            await asyncio.wait([task, ready], timeout=start_timeout,
                               return_when=asyncio.FIRST_COMPLETED)
            ready.cancel()
            if task.done():
                task.result()  # raises what made the engine stop
            if not ready.done() or ready.cancelled():
                raise TimeoutError(f"the engine did not start within {start_timeout:g}s")
            yield engine
        finally:
            engine.stop()
            await asyncio.wait_for(task, stop_timeout)


async def _ready(engine: Engine) -> None:
    await engine.started.wait()
    await engine.listener_connected.wait()
