"""The plugin manager: built by a factory, owned by whoever builds it (engine, CLI, tests).

Load order: the hook specs, then animus's own default plugins (the TOML command faculties),
then third-party plugins from the ``animus`` entry-point group, unless autoloading is off
(``ANIMUS_DISABLE_PLUGIN_AUTOLOAD=1``). ``ANIMUS_PLUGINS=a,b`` loads only the named entry
points; ``ANIMUS_BLOCK_PLUGINS=x,y`` skips the named ones (entry-point or distribution
names). A plugin that fails to import or register is reported with its distribution name
and skipped; it never takes the engine down.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any, TypeVar

import msgspec
import pluggy

from animus_core.faculties import contract
from animus_core.faculties.contract import hookimpl
from animus_core.faculties.faculty import PHASES, Faculty, check_faculty
from animus_core.infra.config import Settings
from animus_core.values.errors import ConfigError

__all__ = [
    "ENTRY_POINT_GROUP",
    "Faculties",
    "PluginProblem",
    "await_me_maybe",
    "collect_faculties",
    "hookimpl",
    "make_plugin_manager",
]

ENTRY_POINT_GROUP = "animus"
#: module -> plugin name (the names predate the layout; ANIMUS_BLOCK_PLUGINS does not take them)
DEFAULT_PLUGINS = {
    "animus_core.faculties.toml": "toml_faculties",
    "animus_core.faculties.pipelines": "pipelines",
    "animus_core.faculties.embedders": "embedders",
    "animus_core.faculties.llm": "llm",
}

_log = logging.getLogger(__name__)
T = TypeVar("T")


class PluginProblem(msgspec.Struct, frozen=True, kw_only=True):
    """A plugin or faculty that could not be loaded, and why."""

    plugin: str
    error: str


async def await_me_maybe(value: T | Any) -> Any:
    """Await ``value`` if it is awaitable: the one place async hook results are resolved."""
    if inspect.isawaitable(value):
        return await value
    return value


class _PluginManager(pluggy.PluginManager):
    """Faculties' phase methods are hook implementations without needing the marker, so a
    subclass overriding ``engage`` is still validated against the spec."""

    def __init__(self, project_name: str) -> None:
        super().__init__(project_name)
        #: plugin name -> "distribution version", for reports and ``animus faculty list``
        self.origins: dict[str, str] = {}

    def parse_hookimpl_opts(self, plugin: object, name: str) -> Any:
        if isinstance(plugin, Faculty) and name in PHASES:
            return {}
        if isinstance(plugin, Faculty):
            return None
        return super().parse_hookimpl_opts(plugin, name)


def make_plugin_manager(
    settings: Settings | None = None, *, load_entry_points: bool | None = None
) -> tuple[pluggy.PluginManager, list[PluginProblem]]:
    """A new plugin manager with the default plugins and (unless disabled) entry points."""
    settings = settings or Settings.from_env()
    pm = _PluginManager(ENTRY_POINT_GROUP)
    pm.add_hookspecs(contract)
    problems: list[PluginProblem] = []
    import importlib

    for modname, plugin_name in DEFAULT_PLUGINS.items():
        pm.register(importlib.import_module(modname), name=plugin_name)
    if load_entry_points is None:
        load_entry_points = settings.plugins_autoload
    if load_entry_points:
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            dist = ep.dist.name if ep.dist else "unknown distribution"
            names = {ep.name, dist}
            if settings.plugins_allow is not None and not names & set(settings.plugins_allow):
                continue
            if names & set(settings.plugins_block) or pm.is_blocked(ep.name):
                continue
            if pm.get_plugin(ep.name) is not None:
                continue
            try:
                plugin = ep.load()
                pm.register(plugin, name=ep.name)
                pm.origins[ep.name] = f"{dist} {ep.dist.version if ep.dist else ''}".strip()
            except Exception as e:
                problem = PluginProblem(
                    plugin=f"{ep.name} (from {dist})",
                    error=f"failed to load: {type(e).__name__}: {e}",
                )
                _log.error("plugin %s: %s", problem.plugin, problem.error)
                problems.append(problem)
    return pm, problems


class Faculties:
    """The registered faculties, by name and by the work types they accept."""

    def __init__(self) -> None:
        self.by_name: dict[str, Faculty] = {}
        self.by_type: dict[str, Faculty] = {}

    def add(self, faculty: Faculty) -> None:
        if not isinstance(faculty, Faculty):
            raise ConfigError(f"register() needs a Faculty instance, got {faculty!r}")
        if not faculty.name:
            raise ConfigError(f"{type(faculty).__name__} has no name")
        if not faculty.accepts:
            raise ConfigError(f"faculty {faculty.name!r} accepts no work types")
        check_faculty(faculty, f"faculty {faculty.name!r:.60} ({faculty.origin})",
                      f"{type(faculty).__name__}.")
        if faculty.name in self.by_name:
            other = self.by_name[faculty.name]
            raise ConfigError(
                f"faculty name {faculty.name!r} from {faculty.origin} is already taken by "
                f"{other.origin}"
            )
        for work_type in faculty.accepts:
            if work_type in self.by_type:
                other = self.by_type[work_type]
                raise ConfigError(
                    f"work type {work_type!r} is claimed by two faculties: {other.name!r} "
                    f"({other.origin}) and {faculty.name!r} ({faculty.origin})"
                )
        self.by_name[faculty.name] = faculty
        for work_type in faculty.accepts:
            self.by_type[work_type] = faculty

    def remove(self, name: str) -> Faculty:
        """Take faculty ``name`` out; its work types have no faculty then."""
        faculty = self.by_name.pop(name)
        for work_type in faculty.accepts:
            self.by_type.pop(work_type, None)
        return faculty

    def __iter__(self) -> Any:
        return iter(self.by_name.values())

    def __len__(self) -> int:
        return len(self.by_name)


async def collect_faculties(
    pm: pluggy.PluginManager, settings: Settings
) -> tuple[Faculties, list[PluginProblem]]:
    """Call every plugin's ``register_faculties`` in isolation and validate each faculty."""
    faculties = Faculties()
    problems: list[PluginProblem] = []
    for impl in reversed(pm.hook.register_faculties.get_hookimpls()):
        origin = _origin(pm, impl.plugin, impl.plugin_name)

        def register(faculty: Faculty, origin: str = origin) -> None:
            if not getattr(faculty, "origin", ""):
                faculty.origin = origin
            faculties.add(faculty)
            try:
                pm.register(faculty, name=f"faculty:{faculty.name}")
            except pluggy.PluginValidationError as e:
                faculties.by_name.pop(faculty.name, None)
                for t in faculty.accepts:
                    faculties.by_type.pop(t, None)
                raise ConfigError(f"faculty {faculty.name!r} ({faculty.origin}): {e}") from None

        kwargs: dict[str, Any] = {"register": _isolated(register, problems, origin),
                                  "settings": settings}
        try:
            await await_me_maybe(impl.function(*[kwargs[a] for a in impl.argnames]))
        except Exception as e:
            error = str(e) if isinstance(e, ConfigError) else f"{type(e).__name__}: {e}"
            problems.append(PluginProblem(plugin=origin, error=error))
            _log.error("plugin %s failed to register faculties: %s", origin, error)
    return faculties, problems


def _isolated(
    register: Callable[[Faculty], None], problems: list[PluginProblem], origin: str
) -> Callable[[Faculty], None]:
    """A register callback that reports a refused faculty instead of raising into the plugin."""

    def safe(faculty: Faculty) -> None:
        try:
            register(faculty)
        except ConfigError as e:
            problems.append(PluginProblem(plugin=origin, error=str(e)))
            _log.error("%s", e)

    return safe


def _origin(pm: pluggy.PluginManager, plugin: object, name: str) -> str:
    if isinstance(pm, _PluginManager) and name in pm.origins:
        return pm.origins[name]
    return "animus (built-in)" if name in DEFAULT_PLUGINS.values() else name
