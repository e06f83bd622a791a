"""The plugin manager: built by a factory, owned by whoever builds it (engine, CLI, tests).

Load order: the hook specs, then animus's own default plugins (the TOML command faculties),
then third-party plugins from the ``animus`` entry-point group, unless autoloading is off
(``ANIMUS_DISABLE_PLUGIN_AUTOLOAD=1``). ``ANIMUS_PLUGINS=a,b`` loads only the named entry
points; ``ANIMUS_BLOCK_PLUGINS=x,y`` skips the named ones (entry-point or distribution
names). A plugin that fails to import or register is reported with its distribution name
and skipped; it never takes the engine down.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import logging
from collections.abc import Callable, Iterator
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
    "Phases",
    "PluginManager",
    "PluginProblem",
    "await_me_maybe",
    "call_lifecycle",
    "check_phases",
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


# -- the phases' signatures ----------------------------------------------------------------

_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
#: phase -> the argument names of its hook spec, in order
_SPEC_ARGS = {phase: tuple(inspect.signature(getattr(contract, phase)).parameters)
              for phase in PHASES}


def check_phases(faculty: Faculty, where: str) -> None:
    """Refuse a faculty whose phase methods do not take the whole signature of their hook
    spec (pluggy hands an implementation only the arguments it names, so a method lacking
    one would run without it), or that need an argument the spec does not provide. One
    line: ``<where>: engage(self, focus) lacks argument 'oriented' of the engage hook spec``.
    """
    for phase in PHASES:
        method = getattr(faculty, phase, None)
        if not callable(method):
            raise ConfigError(f"{where}: {phase} is not a method")
        try:
            params = inspect.signature(method).parameters
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: {phase} has no signature to check") from None
        shown = str(inspect.Signature([p.replace(annotation=p.empty)
                                       for p in params.values()]))[1:-1]
        if inspect.ismethod(method):
            shown = f"self, {shown}" if shown else "self"
        spec = _SPEC_ARGS[phase]
        for arg in spec:
            if arg not in params or params[arg].kind not in _POSITIONAL:
                raise ConfigError(f"{where}: {phase}({shown}) lacks argument {arg!r} of the "
                                  f"{phase} hook spec")
        for name, param in params.items():
            if (name not in spec and param.default is inspect.Parameter.empty
                    and param.kind not in (param.VAR_POSITIONAL, param.VAR_KEYWORD)):
                raise ConfigError(f"{where}: {phase}({shown}) needs argument {name!r}, which "
                                  f"the {phase} hook spec does not provide (it provides "
                                  f"{', '.join(spec)})")


# -- the plugin manager --------------------------------------------------------------------


class PluginManager(pluggy.PluginManager):
    """animus's plugin manager (see :func:`make_plugin_manager`).

    Faculties' phase methods are hook implementations without needing the marker, so a
    subclass overriding ``engage`` is still validated against the spec; their signatures
    must be whole (:func:`check_phases`). Any other plugin may only wrap the phases: a
    plain phase implementation would answer for every faculty, and is refused.
    """

    def __init__(self, project_name: str) -> None:
        super().__init__(project_name)
        #: plugin name -> "distribution version", for reports and ``animus faculty list``
        self.origins: dict[str, str] = {}
        #: counts registrations and unregistrations: a :class:`Phases` built before the
        #: last one looks its implementations up again
        self.generation = 0

    def parse_hookimpl_opts(self, plugin: object, name: str) -> Any:
        if isinstance(plugin, Faculty) and name in PHASES:
            return {}
        if isinstance(plugin, Faculty):
            return None
        return super().parse_hookimpl_opts(plugin, name)

    def register(self, plugin: object, name: str | None = None) -> str | None:
        label = name or self.get_canonical_name(plugin)
        if isinstance(plugin, Faculty):
            try:
                check_phases(plugin, f"faculty {plugin.name!r:.60} ({plugin.origin or label})")
            except ConfigError as e:
                raise pluggy.PluginValidationError(plugin, str(e)) from None
        else:
            for attr in dir(plugin):
                opts = self.parse_hookimpl_opts(plugin, attr)
                hook = (opts or {}).get("specname") or attr
                if opts is not None and hook in PHASES and not (
                        opts.get("wrapper") or opts.get("hookwrapper")):
                    raise pluggy.PluginValidationError(plugin, (
                        f"plugin {label!r}: {attr} is a plain implementation of the {hook} "
                        "phase hook: only faculties implement phases; another plugin may "
                        "wrap them with @hookimpl(wrapper=True)"))
        registered = super().register(plugin, name)
        self.generation += 1
        return registered

    def unregister(self, plugin: object | None = None, name: str | None = None) -> Any:
        removed = super().unregister(plugin, name)
        self.generation += 1
        return removed


class Phases:
    """How the runtime calls one faculty's phases: through pluggy, as a ``firstresult`` hook
    call with keyword arguments (``call("engage", focus=focus, oriented=oriented)``), on
    this faculty's implementation and every plugin's wrappers, leaving out every other
    faculty's implementation of the phase.

    The runtime keeps its own deadlines, so the call is split: :meth:`is_async` tells
    whether the faculty's method is ``async def``. If it is not, run :meth:`call` whole in
    a worker thread (``asyncio.to_thread``: the wrappers run there too); if it is,
    :meth:`call` returns (on the event loop) the awaitable to await, or a value when a
    wrapper replaced it. :meth:`run` does either, without a deadline.

    A call costs one to two microseconds more than calling the method itself: the
    implementations are looked up once per change of the plugin manager's registrations,
    not per call.
    """

    __slots__ = ("_async", "_exec", "_generation", "_impls", "_pm", "faculty")

    def __init__(self, pm: PluginManager, faculty: Faculty) -> None:
        self.faculty = faculty
        self._pm = pm
        # pluggy's own hook execution (what a hook call runs, hook-call monitoring included),
        # given this faculty's share of the implementations
        self._exec = pm._hookexec
        self._async = {p: inspect.iscoroutinefunction(getattr(faculty, p)) for p in PHASES}
        self._impls: dict[str, list[pluggy.HookImpl]] = {}
        self._generation = -1
        self._refresh()

    def is_async(self, phase: str) -> bool:
        """Whether the faculty's ``phase`` method is ``async def``."""
        return self._async[phase]

    def call(self, phase: str, /, **kwargs: Any) -> Any:
        """The pluggy call of ``phase`` (see the class docstring for where to run it)."""
        if self._generation != self._pm.generation:
            self._refresh()
        return self._exec(phase, self._impls[phase], kwargs, True)

    async def run(self, phase: str, /, **kwargs: Any) -> Any:
        """Call ``phase`` and return its result: in a worker thread when the method is sync."""
        if not self._async[phase]:
            return await asyncio.to_thread(self.call, phase, **kwargs)
        return await await_me_maybe(self.call(phase, **kwargs))

    def _refresh(self) -> None:
        generation = self._pm.generation
        impls: dict[str, list[pluggy.HookImpl]] = {}
        for phase in PHASES:
            impls[phase] = [i for i in getattr(self._pm.hook, phase).get_hookimpls()
                            if i.plugin is self.faculty or i.wrapper or i.hookwrapper]
            if not any(i.plugin is self.faculty for i in impls[phase]):
                raise ConfigError(f"faculty {self.faculty.name!r} is not registered with "
                                  "this plugin manager")
        self._impls = impls
        self._generation = generation


async def call_lifecycle(pm: pluggy.PluginManager, hook: str, /, *,
                         failed: Callable[[str, Exception], None] | None = None,
                         **kwargs: Any) -> None:
    """Call lifecycle hook ``hook`` (``startup``, ``shutdown``) with keyword arguments, one
    implementation at a time in pluggy's order, each through pluggy (wrappers included) and
    awaited, when it returns an awaitable, before the next is called. An implementation's
    exception propagates, unless ``failed(plugin_name, exception)`` is given: then it is
    told, and the next implementation is called."""
    plain = [i for i in getattr(pm.hook, hook).get_hookimpls()
             if not (i.wrapper or i.hookwrapper)]
    for impl in reversed(plain):  # pluggy calls the last registered first
        caller = pm.subset_hook_caller(hook, [i.plugin for i in plain if i is not impl])
        try:
            for result in caller(**kwargs):
                await await_me_maybe(result)
        except Exception as e:
            if failed is None:
                raise
            failed(impl.plugin_name, e)


def make_plugin_manager(
    settings: Settings | None = None, *, load_entry_points: bool | None = None
) -> tuple[PluginManager, list[PluginProblem]]:
    """A new plugin manager with the default plugins and (unless disabled) entry points."""
    settings = settings or Settings.from_env()
    pm = PluginManager(ENTRY_POINT_GROUP)
    pm.add_hookspecs(contract)
    problems: list[PluginProblem] = []
    for modname, plugin_name in DEFAULT_PLUGINS.items():
        pm.register(importlib.import_module(modname), name=plugin_name)
    if load_entry_points is None:
        load_entry_points = settings.plugins_autoload
    if load_entry_points:
        installed: set[str] = set()
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            dist = ep.dist.name if ep.dist else "unknown distribution"
            names = {ep.name, dist}
            installed |= names
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
        for variable, listed in (("ANIMUS_PLUGINS", settings.plugins_allow or ()),
                                 ("ANIMUS_BLOCK_PLUGINS", settings.plugins_block)):
            unknown = sorted(set(listed) - installed - set(DEFAULT_PLUGINS.values()))
            if unknown:  # a misspelt name would otherwise do nothing, silently
                problem = PluginProblem(plugin=variable, error=(
                    f"{', '.join(unknown)}: no installed plugin has this name (installed: "
                    f"{', '.join(sorted(installed)) or 'none'})"))
                _log.error("%s: %s", problem.plugin, problem.error)
                problems.append(problem)
    return pm, problems


class Faculties:
    """The registered faculties, by name and by the work types they accept.

    With a plugin manager (``Faculties(pm)``, as :func:`collect_faculties` builds it), each
    faculty added is registered with it as plugin ``faculty:<name>`` and gets its
    :class:`Phases`, the way the runtime calls it: ``faculties.phases(faculty)``.
    """

    def __init__(self, pm: pluggy.PluginManager | None = None) -> None:
        if pm is not None and not isinstance(pm, PluginManager):
            raise TypeError("faculties need animus's plugin manager (make_plugin_manager)")
        self.pm = pm
        self.by_name: dict[str, Faculty] = {}
        self.by_type: dict[str, Faculty] = {}
        self._phases: dict[str, Phases] = {}

    def add(self, faculty: Faculty) -> None:
        if not isinstance(faculty, Faculty):
            raise ConfigError(f"register() needs a Faculty instance, got {faculty!r}")
        if not faculty.name:
            raise ConfigError(f"{type(faculty).__name__} has no name")
        if not faculty.accepts:
            raise ConfigError(f"faculty {faculty.name!r} accepts no work types")
        where = f"faculty {faculty.name!r:.60} ({faculty.origin})"
        check_faculty(faculty, where, f"{type(faculty).__name__}.")
        check_phases(faculty, where)
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
        if self.pm is not None:
            assert isinstance(self.pm, PluginManager)
            try:
                self.pm.register(faculty, name=f"faculty:{faculty.name}")
            except (pluggy.PluginValidationError, ValueError) as e:
                raise ConfigError(f"{where}: {e}") from None
            self._phases[faculty.name] = Phases(self.pm, faculty)
        self.by_name[faculty.name] = faculty
        for work_type in faculty.accepts:
            self.by_type[work_type] = faculty

    def phases(self, faculty: Faculty) -> Phases:
        """How to call ``faculty``'s phases (see :class:`Phases`)."""
        try:
            return self._phases[faculty.name]
        except KeyError:
            raise ConfigError(f"faculty {faculty.name!r} was not added with a plugin "
                              "manager") from None

    def remove(self, name: str) -> Faculty:
        """Take faculty ``name`` out; its work types have no faculty then."""
        faculty = self.by_name.pop(name)
        for work_type in faculty.accepts:
            self.by_type.pop(work_type, None)
        if self._phases.pop(name, None) is not None and self.pm is not None:
            self.pm.unregister(faculty)
        return faculty

    def __iter__(self) -> Iterator[Faculty]:
        return iter(self.by_name.values())

    def __len__(self) -> int:
        return len(self.by_name)


async def collect_faculties(
    pm: pluggy.PluginManager, settings: Settings
) -> tuple[Faculties, list[PluginProblem]]:
    """Call every plugin's ``register_faculties`` in isolation and validate each faculty."""
    faculties = Faculties(pm)
    problems: list[PluginProblem] = []
    for impl in reversed(pm.hook.register_faculties.get_hookimpls()):
        origin = _origin(pm, impl.plugin, impl.plugin_name)

        def register(faculty: Faculty, origin: str = origin) -> None:
            if not getattr(faculty, "origin", ""):
                faculty.origin = origin
            faculties.add(faculty)

        kwargs: dict[str, Any] = {"register": _isolated(register, problems, origin),
                                  "settings": settings}
        try:
            await await_me_maybe(impl.function(*[kwargs[a] for a in impl.argnames]))
        except Exception as e:
            error = str(e) if isinstance(e, ConfigError) else f"{type(e).__name__}: {e}"
            problems.append(PluginProblem(plugin=origin, error=error))
            _log.error("plugin %s reported a problem (the faculties it registered are kept): "
                       "%s", origin, error)
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
    if isinstance(pm, PluginManager) and name in pm.origins:
        return pm.origins[name]
    return "animus (built-in)" if name in DEFAULT_PLUGINS.values() else name
