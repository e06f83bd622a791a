"""The faculty contract pluggy enforces (docs/hooks.md, "How the phases are called"):

* phases are pluggy hook calls with keyword arguments on the one faculty that accepts the
  item, with every other plugin's wrappers around them and no other faculty's
  implementation; a plain phase implementation outside a faculty is refused;
* a faculty whose phase method lacks an argument of its spec (or needs one the spec does
  not provide) is refused when it is registered, in one line;
* ``after`` lets one wrapper treat sync and async phases alike;
* lifecycle hooks are called per implementation with keyword arguments, and awaited;
* the documented guardrail plugin wraps every faculty's engage, TOML and Python alike, in a
  real engine.
"""

from __future__ import annotations

import asyncio
import logging
import types
from collections.abc import Generator
from pathlib import Path
from typing import Any

import pluggy
import pytest

from animus_core import ConfigError, Faculty, Focus, NewWorkItem, State, hookimpl
from animus_core.faculties.contract import EngineView, after
from animus_core.faculties.plugins import (
    Faculties,
    PluginManager,
    call_lifecycle,
    make_plugin_manager,
)
from animus_core.infra.config import Settings
from tests.engine_helpers import run_engine, wait_finished, write_toml_faculty
from tests.support import code_blocks

SECRET = "-----BEGIN PRIVATE KEY-----abc-----END PRIVATE KEY-----"


def plugin_manager() -> PluginManager:
    pm, problems = make_plugin_manager(Settings.from_env({}), load_entry_points=False)
    assert problems == []
    return pm


class AsyncEcho(Faculty):
    name = "async-echo"
    accepts = ("async-echo",)

    async def engage(self, focus: Focus, oriented: Any) -> Any:
        return {"by": self.name, **oriented}


class SyncEcho(Faculty):
    name = "sync-echo"
    accepts = ("sync-echo",)

    def engage(self, focus: Focus, oriented: Any) -> Any:
        return {"by": self.name, **oriented}


class Tagger:
    """A wrapper of every faculty's engage adding ``tagged``, counting its calls."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    @hookimpl(wrapper=True)
    def engage(self, focus: Any, oriented: Any) -> Generator[None, Any, Any]:
        self.seen.append(focus)
        result = yield
        return after(result, lambda engaged: {**engaged, "tagged": True})


async def call(faculties: Faculties, faculty: Faculty, hook: str, /, **kwargs: Any) -> Any:
    return await faculties.phases(faculty).run(hook, **kwargs)


# -- dispatch ---------------------------------------------------------------------------------------


async def test_a_phase_reaches_one_faculty_and_every_wrapper() -> None:
    pm = plugin_manager()
    tagger = Tagger()
    pm.register(tagger, name="tagger")
    faculties = Faculties(pm)
    a, s = AsyncEcho(), SyncEcho()
    faculties.add(a)
    faculties.add(s)
    assert faculties.phases(a).is_async("engage")
    assert not faculties.phases(s).is_async("engage")
    assert await call(faculties, a, "engage", focus="f1", oriented={"x": 1}) == {
        "by": "async-echo", "x": 1, "tagged": True}
    assert await call(faculties, s, "engage", focus="f2", oriented={"x": 2}) == {
        "by": "sync-echo", "x": 2, "tagged": True}
    assert tagger.seen == ["f1", "f2"]
    # the inherited phases go through pluggy too (Faculty's defaults)
    assert await call(faculties, s, "consolidate", focus="f3", engaged={"y": 3}) == {"y": 3}
    assert await call(faculties, s, "recover", focus="f3", error="e", phase="engage") is None

    # a wrapper registered later wraps the phases from then on; unregistered, it is gone
    class Doubler:
        @hookimpl(hookwrapper=True)  # pluggy's old-style wrapper
        def engage(self) -> Generator[None, pluggy.Result[Any], None]:
            outcome = yield
            outcome.force_result(after(outcome.get_result(), lambda v: [v, v]))

    pm.register(Doubler(), name="doubler")
    doubled = await call(faculties, a, "engage", focus="f4", oriented={})
    assert doubled == [{"by": "async-echo", "tagged": True}] * 2
    pm.unregister(name="doubler")
    pm.unregister(tagger)
    assert await call(faculties, s, "engage", focus="f5", oriented={}) == {"by": "sync-echo"}


async def test_a_sync_phase_runs_with_its_wrappers_in_a_worker_thread() -> None:
    import threading

    threads: dict[str, int] = {}

    class Where:
        @hookimpl(wrapper=True)
        def engage(self, focus: Any) -> Generator[None, Any, Any]:
            threads[focus] = threading.get_ident()
            return (yield)

    pm = plugin_manager()
    pm.register(Where(), name="where")
    faculties = Faculties(pm)
    a, s = AsyncEcho(), SyncEcho()
    faculties.add(a)
    faculties.add(s)
    await call(faculties, a, "engage", focus="async", oriented={})
    await call(faculties, s, "engage", focus="sync", oriented={})
    assert threads["async"] == threading.get_ident()
    assert threads["sync"] != threading.get_ident()


def test_a_plain_phase_implementation_outside_a_faculty_is_refused() -> None:
    class Hijack:
        @hookimpl
        def engage(self, focus: Any, oriented: Any) -> Any:
            return "hijacked"

    class Renamed:
        @hookimpl(specname="recover")
        def retry_always(self, focus: Any) -> bool:
            return True

    pm = plugin_manager()
    with pytest.raises(pluggy.PluginValidationError, match=(
            r"^plugin 'hijack': engage is a plain implementation of the engage phase hook: "
            r"only faculties implement phases; another plugin may wrap them with "
            r"@hookimpl\(wrapper=True\)$")):
        pm.register(Hijack(), name="hijack")
    with pytest.raises(pluggy.PluginValidationError, match="retry_always is a plain "
                       "implementation of the recover phase hook"):
        pm.register(Renamed(), name="renamed")
    assert pm.get_plugin("hijack") is None
    assert pm.get_plugin("renamed") is None


def test_after_applies_now_to_a_value_and_later_to_an_awaitable() -> None:
    assert after(2, lambda v: v * 10) == 20

    async def three() -> int:
        return 3

    pending = after(three(), lambda v: v * 10)
    assert asyncio.iscoroutine(pending)
    assert asyncio.run(pending) == 30

    async def fails() -> int:
        raise KeyError("no")

    seen: list[int] = []
    with pytest.raises(KeyError):
        asyncio.run(after(fails(), seen.append))
    assert seen == []


# -- signatures -------------------------------------------------------------------------------------


class LacksOriented(Faculty):
    name = "lacks"
    accepts = ("lacks",)

    async def engage(self, focus: Focus) -> Any:  # type: ignore[override]
        return None


class NeedsMore(Faculty):
    name = "needs"
    accepts = ("needs",)

    def consolidate(self, focus: Focus, engaged: Any, store: Any) -> Any:  # type: ignore[override]
        return engaged


class KeywordOnly(Faculty):
    name = "kwonly"
    accepts = ("kwonly",)

    def recover(self, focus: Focus, error: str, *, phase: str) -> bool | None:  # type: ignore[override]
        return None


class Lenient(Faculty):
    """Arguments of its own with defaults, and *args/**kwargs, are fine."""

    name = "lenient"
    accepts = ("lenient",)

    def orient(self, focus: Focus, verbose: bool = False, *args: Any, **kwargs: Any) -> Any:
        return {"verbose": verbose}


@pytest.mark.parametrize(("faculty", "error"), [
    (LacksOriented(), "faculty 'lacks' (mine): engage(self, focus) lacks argument 'oriented' "
                      "of the engage hook spec"),
    (NeedsMore(), "faculty 'needs' (mine): consolidate(self, focus, engaged, store) needs "
                  "argument 'store', which the consolidate hook spec does not provide (it "
                  "provides focus, engaged)"),
    (KeywordOnly(), "faculty 'kwonly' (mine): recover(self, focus, error, *, phase) lacks "
                    "argument 'phase' of the recover hook spec"),
])
@pytest.mark.parametrize("with_pm", [True, False])
def test_a_phase_method_without_the_whole_signature_is_refused(
        faculty: Faculty, error: str, with_pm: bool) -> None:
    faculty.origin = "mine"
    pm = plugin_manager()
    faculties = Faculties(pm if with_pm else None)
    with pytest.raises(ConfigError) as refused:
        faculties.add(faculty)
    assert str(refused.value) == error
    assert len(faculties) == 0
    assert pm.get_plugin(f"faculty:{faculty.name}") is None
    # registered with the plugin manager directly, it is refused the same way
    with pytest.raises(pluggy.PluginValidationError, match=error.replace("(", r"\(")
                       .replace(")", r"\)").replace("*", r"\*")):
        pm.register(faculty, name="direct")


async def test_arguments_of_its_own_with_defaults_are_accepted() -> None:
    faculties = Faculties(plugin_manager())
    lenient = Lenient()
    faculties.add(lenient)
    assert await call(faculties, lenient, "orient", focus=None) == {"verbose": False}


# -- lifecycle ----------------------------------------------------------------------------------


async def test_lifecycle_hooks_are_called_per_implementation_and_awaited() -> None:
    calls: list[tuple[str, object]] = []

    class First:
        @hookimpl
        async def startup(self, engine: Any) -> None:
            await asyncio.sleep(0)
            calls.append(("first", engine))

        @hookimpl
        def shutdown(self, engine: Any) -> None:
            calls.append(("first down", engine))

    class Second:
        @hookimpl
        def startup(self) -> None:  # any subset of the arguments
            calls.append(("second", None))

        @hookimpl
        async def shutdown(self, engine: Any) -> None:
            raise RuntimeError("second cannot stop")

    class Around:
        @hookimpl(wrapper=True)
        def startup(self, engine: Any) -> Generator[None, Any, Any]:
            calls.append(("around", engine))
            return (yield)

    pm = plugin_manager()
    pm.register(First(), name="first")
    pm.register(Second(), name="second")
    pm.register(Around(), name="around")
    engine = object()
    await call_lifecycle(pm, "startup", engine=engine)
    # pluggy's order (the last registered first), each awaited before the next, each wrapped
    assert calls == [("around", engine), ("second", None), ("around", engine),
                     ("first", engine)]

    calls.clear()
    failures: list[tuple[str, str]] = []
    await call_lifecycle(pm, "shutdown", engine=engine,
                         failed=lambda plugin, e: failures.append((plugin, str(e))))
    assert failures == [("second", "second cannot stop")]
    assert calls == [("first down", engine)]
    with pytest.raises(RuntimeError, match="second cannot stop"):
        await call_lifecycle(pm, "shutdown", engine=engine)


# -- in a real engine ---------------------------------------------------------------------------


def documented_guardrail() -> types.ModuleType:
    """The plugin module of docs/hooks.md, "Wrapping the phases", as written there."""
    [code] = code_blocks("hooks.md", "## Wrapping the phases", "python")
    module = types.ModuleType("guardrail")
    exec(compile(code, "docs/hooks.md (Wrapping the phases)", "exec"), module.__dict__)
    return module


async def test_the_documented_guardrail_wraps_every_faculty(db: Any, db_url: str,
                                                            tmp_path: Path) -> None:
    guardrail = documented_guardrail()
    toml = write_toml_faculty(tmp_path, "toml-echo", hooks={"engage": "cp work.json engage-out.json"})
    async with run_engine(db_url, tmp_path / "home", faculties=[AsyncEcho(), SyncEcho()],
                          faculties_dir=toml.parent,
                          plugins={"guardrail": guardrail, "cost-meter": guardrail.meter}) as run:
        assert run.problems == []
        work_types = ("async-echo", "sync-echo", "toml-echo")
        for work_type in work_types:
            clean = await db.submit_work(NewWorkItem(work_type).params({"text": "hello"}))
            item = await wait_finished(db, clean.id)
            assert item.state == State.COMPLETED, item.reason
            leaked = await db.submit_work(
                NewWorkItem(work_type).params({"text": SECRET}).max_attempts(1))
            item = await wait_finished(db, leaked.id)
            assert item.state == State.DEAD
            assert "engage failed: ValueError: engage output withheld: it carries a private " \
                   "key" in (item.reason or ""), item.reason
        assert sorted(guardrail.meter.seconds) == sorted(work_types)
        assert all(s > 0 for s in guardrail.meter.seconds.values())
        assert guardrail.meter.usd == dict.fromkeys(work_types, 0.0)


async def test_a_faculty_with_a_wrong_signature_is_refused_at_start(db: Any, db_url: str,
                                                                    tmp_path: Path,
                                                                    caplog: Any) -> None:
    events: list[str] = []

    class Lifecycle:
        @hookimpl
        async def startup(self, engine: Any) -> None:
            names = {f.name for f in engine.faculties}
            events.append(f"startup: echo {'async-echo' in names}, lacks {'lacks' in names}")

        @hookimpl
        def shutdown(self, engine: Any) -> None:
            events.append("shutdown")

    class Broken:
        @hookimpl
        def shutdown(self) -> None:
            raise RuntimeError("cannot stop")

    caplog.set_level(logging.ERROR)
    async with run_engine(db_url, tmp_path / "home", faculties=[LacksOriented(), AsyncEcho()],
                          plugins={"lifecycle": Lifecycle(), "broken": Broken()}) as run:
        assert [(p.plugin, p.error) for p in run.problems] == [(
            "test-faculties", "faculty 'lacks' (test-faculties): engage(self, focus) lacks "
            "argument 'oriented' of the engage hook spec")]
        assert sorted(run.origins()) == ["async-echo"]
        assert events == ["startup: echo True, lacks False"]
        view: EngineView = run.engine  # what plugins are told of the engine, checked by mypy
        assert view.faculties.by_type["async-echo"].name == "async-echo"
        item = await wait_finished(db, (await db.submit_work(NewWorkItem("async-echo"))).id)
        assert item.state == State.COMPLETED
    # a failing shutdown hook is reported and the others still run
    assert events[-1] == "shutdown"
    assert "shutdown hook of broken failed" in caplog.text
