"""Telemetry end to end: a real ``animus up`` process exports traces, metrics and logs over
OTLP/gRPC to a real OTLP receiver (:mod:`tests.otlp_receiver`), and the tests read back what
arrived.

The engine runs in a subprocess so that the global OpenTelemetry providers it installs never
leak into the other tests. Its faculties:

* ``traced`` (TOML): its engage hook is a small Python program that continues the focus's
  trace from ``TRACEPARENT``, exports one span ``hook-work`` with the OpenTelemetry SDK, and
  submits child work with ``animus work submit kid --parent "$ANIMUS_WORK_ID"``;
* ``kid`` (TOML): a trivial bash engage;
* ``broken`` (TOML): engage exits non-zero, one attempt, so the engine logs a warning inside
  the focus span and dead-letters the item;
* ``summarize`` (the first-party plugin in ``plugins/``): with ``split_into`` its consolidate
  submits child items from inside the engine, which is what counts ``animus.work.submitted``
  there (submissions by other processes, like the CLI, count in those processes).
"""

from __future__ import annotations

import json
import shlex
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from animus_core import Created, NewWorkItem, State, __version__
from animus_core.infra.telemetry import METRICS
from tests.engine_helpers import (
    EngineProcess,
    free_port,
    wait_finished,
    wait_listening,
    wait_until,
    write_toml_faculty,
)
from tests.otlp_receiver import OtlpReceiver, Span

pytestmark = pytest.mark.slow

HOOK_PROGRAM = """\
import os
import subprocess

from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.propagate import extract
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

provider = TracerProvider(resource=Resource.create({"service.name": "traced-hook"}))
provider.add_span_processor(SimpleSpanProcessor(
    OTLPSpanExporter(endpoint=os.environ["OTEL_ENDPOINT"], insecure=True)))
parent = extract({"traceparent": os.environ["TRACEPARENT"]})
with provider.get_tracer("traced-hook").start_as_current_span(
        "hook-work", context=parent, attributes={"hook.pid": os.getpid()}):
    subprocess.run(["animus", "work", "submit", "kid", "--parent", os.environ["ANIMUS_WORK_ID"]],
                   check=True, stdout=subprocess.DEVNULL)
provider.shutdown()
with open("engage-out.json", "w") as out:
    out.write('{"hooked": true}')
"""

#: Eight short sentences: summarize with sentences=1 and split_into=2 makes two children.
SPLIT_TEXT = " ".join(f"Sentence number {n} talks about bees and their dances." for n in range(8))


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as rx:
        yield rx


@pytest.fixture
def base_env(cli_env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in cli_env.items() if not k.startswith(("OTEL_", "TRACEPARENT"))}
    env.update(ANIMUS_FACULTIES=str(tmp_path / "faculties"), ANIMUS_HOME=str(tmp_path / "home"),
               ANIMUS_PLUGINS="summarize", LOG_LEVEL="info")
    return env


@pytest.fixture
def engines(tmp_path: Path) -> Iterator[Any]:
    started: list[EngineProcess] = []

    def start(env: dict[str, str]) -> EngineProcess:
        p = EngineProcess(["--poll", "1", "--grace", "5"], env, tmp_path,
                          tmp_path / f"engine-{len(started)}.log")
        started.append(p)
        return p

    yield start
    for p in started:
        p.close()


def kid_faculty(tmp_path: Path) -> None:
    write_toml_faculty(tmp_path, "kid", hooks={"engage": """
        echo '{"kid": true}' > engage-out.json
    """})


def broken_faculty(tmp_path: Path) -> None:
    write_toml_faculty(tmp_path, "broken", fields={"max_attempts": 1}, hooks={"engage": """
        echo "deliberate failure for the telemetry test" >&2
        exit 3
    """})


def traced_faculty(tmp_path: Path) -> None:
    program = tmp_path / "hooks" / "traced_engage.py"
    program.parent.mkdir(parents=True, exist_ok=True)
    program.write_text(HOOK_PROGRAM)
    # The engine's python explicitly: the one with the OpenTelemetry SDK installed.
    write_toml_faculty(tmp_path, "traced", fields={"env": ["OTEL_ENDPOINT"]}, hooks={
        "orient": "echo '{\"oriented\": true}' > orient-out.json",
        "engage": f"exec {shlex.quote(sys.executable)} {shlex.quote(str(program))}",
        "consolidate": "cp engage-out.json consolidate-out.json",
    })


async def submit(db: Any, new: NewWorkItem) -> Any:
    result = await db.submit_work(new)
    assert isinstance(result, Created)
    return result.id


async def stop(proc: EngineProcess, timeout: float = 30.0) -> float:
    """SIGTERM the engine; how long it took to exit (it must exit 0)."""
    started = time.monotonic()
    proc.signal(signal.SIGTERM)
    code = await proc.wait(timeout)
    assert code == 0, proc.output()
    return time.monotonic() - started


def only(spans: list[Span], what: str) -> Span:
    assert len(spans) == 1, f"expected one {what}, got {len(spans)}: {spans}"
    return spans[0]


def focus_span(rx: OtlpReceiver, work_id: Any) -> Span:
    return only([s for s in rx.spans() if s.name.startswith("focus ")
                 and s.attributes.get("animus.work.id") == str(work_id)], f"focus span of {work_id}")


def children(rx: OtlpReceiver, parent: Span) -> dict[str, Span]:
    return {s.name: s for s in rx.spans()
            if s.parent_span_id == parent.span_id and s.trace_id == parent.trace_id}


# -- the collector is up ------------------------------------------------------------------------


async def test_a_focus_is_traced_measured_and_logged_end_to_end(
        db, db_url, tmp_path, base_env, receiver, engines):
    for write in (traced_faculty, kid_faculty, broken_faculty):
        write(tmp_path)
    env = {**base_env, "OTEL_ENDPOINT": receiver.endpoint, "OTEL_METRIC_EXPORT_INTERVAL": "500"}
    proc = engines(env)
    await wait_listening(db_url, [proc])

    traced = await submit(db, NewWorkItem("traced", source="test"))
    split = await submit(db, NewWorkItem("summarize", source="test").params(
        {"text": SPLIT_TEXT, "sentences": 1, "split_into": 2}))
    broken = await submit(db, NewWorkItem("broken", source="test"))

    assert (await wait_finished(db, traced)).state == State.COMPLETED, proc.output()
    assert (await wait_finished(db, split)).state == State.COMPLETED, proc.output()
    dead = await wait_finished(db, broken)
    assert dead.state == State.DEAD
    (kid,) = await db.list_work(parent_id=traced)
    assert kid.work_type == "kid"
    split_kids = await db.list_work(parent_id=split)
    assert len(split_kids) == 2
    for item in [kid, *split_kids]:
        assert (await wait_finished(db, item.id)).state == State.COMPLETED, proc.output()

    # Metrics arrive while the engine runs (every 500 ms), not only when it stops.
    await wait_until(lambda: {"animus.focus.duration", "animus.work.submitted"}
                     <= receiver.metric_names(), 15, interval=0.1,
                     message="periodic metric exports")
    await stop(proc)
    output = proc.output()
    assert "engine started" in output  # LOG_LEVEL=info shows INFO lines
    assert "queues work, on uvloop" in output  # animus up runs on uvloop (ANIMUS_EVENT_LOOP)
    assert "Traceback" not in output, output

    # -- traces: focus -> phases -> the hook's own span, and child work in the same trace --------
    focus = focus_span(receiver, traced)
    assert focus.name == "focus traced"
    assert focus.resource["service.name"] == "animus"
    phases = children(receiver, focus)
    assert {"orient", "engage", "consolidate"} <= set(phases), phases
    engage = phases["engage"]
    assert engage.attributes == {"animus.faculty": "traced", "animus.phase": "engage"}
    hook = only(receiver.span_named("hook-work"), "hook-work span")
    assert hook.resource["service.name"] == "traced-hook"
    assert (hook.trace_id, hook.parent_span_id) == (focus.trace_id, engage.span_id)
    # state transitions are span events, with from/to
    events = dict(focus.events)
    assert events["running"] == {"from": "claimed", "to": "running"}
    assert events["completed"] == {"from": "running", "to": "completed"}
    assert focus.attributes["animus.result"] == "completed"

    # the child submitted by `animus work submit --parent` inside the hook continues the trace
    kid_span = focus_span(receiver, kid.id)
    assert kid_span.name == "focus kid"
    assert kid_span.trace_id == focus.trace_id, (
        "child work submitted from a hook must carry the parent's traceparent")
    assert kid_span.parent_span_id == engage.span_id

    # children submitted by a Python faculty inside the engine: same trace, under consolidate
    split_span = focus_span(receiver, split)
    split_consolidate = children(receiver, split_span)["consolidate"]
    for item in split_kids:
        s = focus_span(receiver, item.id)
        assert (s.trace_id, s.parent_span_id) == (split_span.trace_id, split_consolidate.span_id)

    # a failed focus: error status, failed and dead events
    broken_span = focus_span(receiver, broken)
    assert broken_span.status_code == 2  # STATUS_CODE_ERROR
    assert [name for name, _ in broken_span.events] == ["running", "failed", "dead"], \
        broken_span.events
    assert dict(broken_span.events)["failed"]["to"] == "failed"

    # -- metrics: the names of telemetry.METRICS, with their attributes and resource -----------
    points = receiver.points()
    metric_names = {p.metric for p in points}
    expected = {"animus.work.submitted", "animus.work.transitions", "animus.focus.duration",
                "animus.phase.duration", "animus.queue.depth", "animus.hook.failures"}
    assert expected <= metric_names, metric_names
    assert metric_names <= set(METRICS), f"not in telemetry.METRICS: {metric_names - set(METRICS)}"
    for p in points:
        kind, unit, _ = METRICS[p.metric]
        assert p.unit == unit, p
        assert p.kind == {"counter": "sum", "histogram": "histogram", "gauge": "gauge"}[kind], p
        assert p.resource["service.name"] == "animus"
        assert p.resource["service.version"] == __version__
        assert str(proc.pid) in p.resource["service.instance.id"]

    def of(name: str) -> list[Any]:
        return [p for p in points if p.metric == name]

    assert max(p.value for p in of("animus.work.submitted") if p.attributes == {"queue": "work"}) >= 2
    transitions = {(p.attributes["from"], p.attributes["to"]) for p in of("animus.work.transitions")}
    assert {("running", "completed"), ("running", "failed")} <= transitions, transitions
    assert all(p.monotonic for p in of("animus.work.transitions"))
    focus_results = {(p.attributes["faculty"], p.attributes["result"])
                     for p in of("animus.focus.duration")}
    assert {("traced", "completed"), ("kid", "completed"), ("summarize", "completed"),
            ("broken", "dead")} <= focus_results, focus_results
    phase_keys = {(p.attributes["faculty"], p.attributes["phase"]) for p in of("animus.phase.duration")}
    assert {("traced", "orient"), ("traced", "engage"), ("traced", "consolidate")} <= phase_keys
    assert all(p.count and p.count > 0 for p in of("animus.phase.duration"))
    # duration histograms in seconds need sub-second buckets, or p50/p95 of quick foci are
    # all "somewhere in the first bucket" (the SDK's default boundaries start at 0, 5, 10)
    for name in ("animus.focus.duration", "animus.phase.duration"):
        bounds = {p.bounds for p in of(name)}
        assert len(bounds) == 1, bounds
        (b,) = bounds
        assert len([x for x in b if 0 < x < 1]) >= 4, (name, b)
        assert b[-1] >= 300, (name, b)
    assert "work" in {p.attributes.get("queue") for p in of("animus.queue.depth")}
    # cumulative temporality: each export repeats the running totals
    failures = of("animus.hook.failures")
    assert {tuple(sorted(p.attributes.items())) for p in failures} == {
        (("faculty", "broken"), ("phase", "engage"), ("reason", "exit_status"))}
    assert {p.value for p in failures} == {1}

    # -- logs: exported with the resource, and lines inside a focus carry its trace --------------
    logs = receiver.logs()
    assert logs, "no log records exported"
    assert all(r.resource["service.name"] == "animus" for r in logs)
    started = [r for r in logs if "engine started" in str(r.body)]
    assert started
    assert started[0].severity == "INFO"
    warned = [r for r in logs if "deliberate failure" in str(r.body)]
    assert warned, [r.body for r in logs]
    assert warned[0].severity in ("WARN", "WARNING")
    assert (warned[0].trace_id, warned[0].span_id) == (broken_span.trace_id, broken_span.span_id)
    # the audit chain's head leaves the database through the log stream too (the engine
    # writes a checkpoint when it stops)
    checkpoints = [r for r in logs if "animus.audit.checkpoint" in r.attributes]
    assert checkpoints, [r.body for r in logs]
    last = json.loads(checkpoints[-1].attributes["animus.audit.checkpoint"])
    assert last["seq"] > 0
    assert str(last["seq"]) in str(checkpoints[-1].body)
    # no exporter chatter was fed back into the exported logs
    assert not [r for r in logs if r.scope.startswith(("opentelemetry", "grpc"))
                or "export" in str(r.body).lower()]


async def test_recover_runs_in_its_own_span(db, db_url, tmp_path, base_env, receiver, engines):
    seen = tmp_path / "recover-traceparent"
    write_toml_faculty(tmp_path, "fragile", fields={"max_attempts": 1}, hooks={
        "engage": "exit 3",
        "recover": f'echo "$TRACEPARENT" > {shlex.quote(str(seen))}',
    })
    proc = engines({**base_env, "OTEL_ENDPOINT": receiver.endpoint,
                    "OTEL_METRIC_EXPORT_INTERVAL": "500"})
    await wait_listening(db_url, [proc])
    wid = await submit(db, NewWorkItem("fragile", source="test"))
    assert (await wait_finished(db, wid)).state == State.DEAD
    await stop(proc)
    focus = focus_span(receiver, wid)
    phases = children(receiver, focus)
    assert {"orient", "engage", "recover"} <= set(phases), sorted(phases)
    # the recover hook continues the recover span
    assert seen.read_text().split("-")[2] == phases["recover"].span_id
    assert ("fragile", "recover") in {(p.attributes["faculty"], p.attributes["phase"])
                                      for p in receiver.points()
                                      if p.metric == "animus.phase.duration"}


# -- the collector is down or not configured ---------------------------------------------------


async def test_an_unreachable_collector_never_holds_up_work_and_is_reported_rarely(
        db, db_url, tmp_path, base_env, engines):
    kid_faculty(tmp_path)
    env = {**base_env, "OTEL_ENDPOINT": f"http://127.0.0.1:{free_port()}",
           "OTEL_METRIC_EXPORT_INTERVAL": "500", "OTEL_BSP_SCHEDULE_DELAY": "100",
           "OTEL_BLRP_SCHEDULE_DELAY": "100"}
    proc = engines(env)
    await wait_listening(db_url, [proc])
    began = time.monotonic()
    ids = [await submit(db, NewWorkItem("kid", source="test")) for _ in range(3)]
    for wid in ids:
        assert (await wait_finished(db, wid, timeout=10)).state == State.COMPLETED
    assert time.monotonic() - began < 5, "foci were held up by an unreachable collector"
    # Let the exporters fail and retry for a while (several metric intervals) before stopping.
    await wait_until(lambda: "telemetry:" in proc.output(), 15, interval=0.1,
                     message="the export problem to be reported")
    await wait_until(lambda: time.monotonic() - began > 3, 10)
    took = await stop(proc, timeout=60)
    output = proc.output()
    problems = [line for line in output.splitlines() if "telemetry:" in line]
    assert 1 <= len(problems) <= 6, "\n".join(problems)
    assert "Traceback" not in output, output
    assert took < 40, f"the engine took {took:.1f}s to stop with the collector down"


async def test_without_otel_endpoint_nothing_is_exported_and_log_level_filters(
        db, db_url, tmp_path, base_env, engines):
    kid_faculty(tmp_path)
    broken_faculty(tmp_path)
    proc = engines({**base_env, "LOG_LEVEL": "warning"})
    await wait_listening(db_url, [proc])
    ok = await submit(db, NewWorkItem("kid", source="test"))
    bad = await submit(db, NewWorkItem("broken", source="test"))
    assert (await wait_finished(db, ok)).state == State.COMPLETED
    assert (await wait_finished(db, bad)).state == State.DEAD
    took = await stop(proc)
    output = proc.output()
    assert took < 20, f"the engine took {took:.1f}s to stop:\n{output}"
    assert "deliberate failure" in output, output  # warnings still show
    assert "WARNING" in output, output
    assert " INFO " not in output, output  # LOG_LEVEL=warning hides INFO ("engine started")
    assert "telemetry:" not in output, output
    assert "Traceback" not in output, output
