"""What every command works with: the animus of the environment's settings."""

from __future__ import annotations

import contextlib
import getpass
import logging
from collections.abc import Iterator
from typing import Any

from animus_core.app import Animus, Migrate
from animus_core.faculties import plugins
from animus_core.faculties.plugins import Faculties, PluginProblem
from animus_core.governance.rules import RuleSet
from animus_core.governance.work import GovernedWork
from animus_core.infra.config import Settings
from animus_core.store.db import Db

__all__ = ["cli_animus", "governed", "load_faculties", "open_db", "problems_printed"]


def cli_animus(*, pool_size: int = 2, migrate: Migrate = "embedded",
               actor: str | None = None) -> Animus:
    """The animus a command works on, configured from the environment. The embedded
    database is migrated on first use; another server must be migrated on purpose
    (``animus db migrate``)."""
    return Animus(Settings.from_env(), actor=actor or f"cli:{getpass.getuser()}",
                  pool_size=pool_size, migrate=migrate)


async def open_db(max_size: int = 2) -> Db:
    """Connect for a command that needs only the database (the caller closes it)."""
    return await cli_animus(pool_size=max_size).open_db()


async def load_faculties(settings: Settings) -> tuple[Any, Faculties, list[PluginProblem]]:
    """The plugin manager, faculties and plugin problems of ``settings``' animus (for the
    caller to print: they are not logged as well)."""
    animus = Animus(settings)
    with problems_printed():
        faculties = await animus.load_faculties()
    return animus.pm, faculties, animus.problems


@contextlib.contextmanager
def problems_printed() -> Iterator[None]:
    """Faculties loaded by a command that prints their problems itself: not logged twice."""
    log = logging.getLogger(plugins.__name__)
    was, log.disabled = log.disabled, True
    try:
        yield
    finally:
        log.disabled = was


def governed(db: Db) -> GovernedWork:
    """Submissions from the command line, with the rules of ``ANIMUS_RULES`` applied."""
    return GovernedWork(db, RuleSet.load(Settings.from_env().rules_dir))
