"""Secrets: a hook sees only what its faculty declares, and a secret value it prints reaches
nothing animus writes.

Canary values are planted in the engine's environment: the faculties declare
``CANARY_TOKEN`` under ``env`` (its name says it is a secret, so it is redacted either way)
and ``PLAIN_CANARY`` (an ordinary name) under ``secrets``; ``OTHER_SECRET`` is declared by
none. ``REGION``, an ordinary ``env`` variable, reaches the hook and is not redacted.

The hooks do their worst: they echo the declared values to stdout and stderr, put them in
their outputs (as values, inside longer strings and as object keys), and fail with them in
their error output. A Python faculty raises exceptions carrying the secret from engage and
from recover.

Then every place animus writes is searched for the canaries:

* log records (``caplog`` at DEBUG, for the engine in this process; the stderr of a real
  ``animus up`` process at LOG_LEVEL=debug);
* spans: an in-memory exporter on the in-process engine's tracer, and everything the real
  process exported over OTLP (traces, metrics and logs, as raw protobuf bytes);
* every row of every table in the ``animus`` and ``pgmq`` schemas, as text (work items with
  their reasons, outcomes and errors, audit rows, execution records, approvals, memories,
  queue messages);
* the files the engine writes in focus directories (``work.json``).

Excluded on purpose, because the hook wrote them itself and a hook is trusted with the value
it declared: the hooks' own output files (``*-out.json``) and the ``seen/`` files where the
hooks note what they saw (which is how the test knows they did see the declared values and not
``OTHER_SECRET``).
"""

from __future__ import annotations

import logging
import os
import signal
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import animus_core.engine
from animus_core import Created, Faculty, NewWorkItem, State
from animus_core.engine import EngineOptions
from animus_core.focus import Focus
from tests.engine_helpers import (
    EngineProcess,
    run_engine,
    wait_finished,
    wait_listening,
    write_toml_faculty,
)
from tests.otlp_receiver import OtlpReceiver
from tests.support import raw

CANARY = "canary-7f3a9b2c41d8e6055a1f"
PLAIN = "plaincanary-0d9e8f7a6b5c"
OTHER = "othersecret-5e4d3c2b1a09"
SECRETS = {"CANARY_TOKEN": CANARY, "PLAIN_CANARY": PLAIN, "OTHER_SECRET": OTHER}
REGION = "eu-north-7"  # declared in env, not a secret: visible and written as it is
HOOK_OUTPUTS = ("orient-out.json", "engage-out.json", "consolidate-out.json")


def leaky_faculties(root: Path, seen: Path) -> None:
    """``leaky`` succeeds with the secrets in its outcome; ``leaky-fail`` fails with them in
    its error output (twice: its recover hook asks for a retry, printing them again)."""
    def hook(body: str) -> str:  # note the environment first, then do the damage
        return (f'mkdir -p {seen}\nenv > "{seen}/$ANIMUS_WORK_TYPE-$ANIMUS_PHASE-'
                f'$ANIMUS_ATTEMPT.env"\n' + textwrap.dedent(body).lstrip("\n"))

    declared = {"env": ["CANARY_TOKEN", "REGION"], "secrets": ["PLAIN_CANARY"]}
    write_toml_faculty(root, "leaky", fields=declared, hooks={
        "orient": hook("""
            echo "orient stderr $CANARY_TOKEN" >&2
            echo "{\\"t\\": \\"$CANARY_TOKEN\\"}" > orient-out.json
        """),
        "engage": hook("""
            echo "engage stdout $CANARY_TOKEN $PLAIN_CANARY"
            echo "engage stderr $CANARY_TOKEN" >&2
            other=$([ -n "${OTHER_SECRET+set}" ] && echo true || echo false)
            cat > engage-out.json <<EOF
            {"token": "$CANARY_TOKEN", "inside": "Bearer $CANARY_TOKEN; plain=$PLAIN_CANARY",
             "other_visible": $other}
            EOF
        """),
        "consolidate": hook("""
            cat > consolidate-out.json <<EOF
            {"$CANARY_TOKEN": "as a key", "list": ["$PLAIN_CANARY", 1],
             "nested": {"deep": "x${CANARY_TOKEN}x"}, "region": "$REGION",
             "other_visible": $([ -n "${OTHER_SECRET+set}" ] && echo true || echo false)}
            EOF
        """),
    })
    write_toml_faculty(root, "leaky-fail", fields={**declared, "max_attempts": 2,
                                                    "retry_base": 0.05, "keep_failed": True},
                       hooks={
        "engage": hook("""
            echo "engage stdout $CANARY_TOKEN"
            echo "could not log in with token=$CANARY_TOKEN plain=$PLAIN_CANARY" >&2
            exit 1
        """),
        "recover": hook("""
            echo "recover saw $CANARY_TOKEN in: $ANIMUS_ERROR" >&2
            exit 0
        """),
    })


class PythonLeak(Faculty):
    """Raises with the secret in the message, from engage and again from recover."""

    name = "py-leak"
    accepts = ("py-leak",)
    max_attempts = 1

    async def engage(self, focus: Focus, oriented: Any) -> Any:
        raise RuntimeError(f"upstream refused token {os.environ['CANARY_TOKEN']}")

    async def recover(  # type: ignore[override]  # the engine awaits async phases
            self, focus: Focus, error: str, phase: str) -> bool | None:
        raise ValueError(f"cannot recover with {os.environ['CANARY_TOKEN']}")


def find(text: str | bytes, where: str) -> list[str]:
    """``where: NAME`` for each canary in ``text``."""
    if isinstance(text, bytes):
        return [f"{where}: {n}" for n, v in SECRETS.items() if v.encode() in text]
    return [f"{where}: {n}" for n, v in SECRETS.items() if v in text]


async def database_leaks(db_url: str) -> list[str]:
    """Every row of every table in the animus and pgmq schemas, as text."""
    found: list[str] = []
    async with raw(db_url) as conn:
        tables = await conn.fetch(
            """SELECT table_schema, table_name FROM information_schema.tables
                WHERE table_schema IN ('animus', 'pgmq') AND table_type = 'BASE TABLE'
                ORDER BY 1, 2""")
        assert {("animus", t) for t in ("work_items", "audit_log", "execution_records",
                                        "environments", "approvals", "memories")} <= {
            (r[0], r[1]) for r in tables}
        for schema, table in tables:
            rows = await conn.fetch(f'SELECT r::text AS t FROM "{schema}"."{table}" AS r')
            for row in rows:
                found += find(row["t"], f"{schema}.{table}")
    return found


def file_leaks(root: Path) -> tuple[list[str], int]:
    """Canaries in the files under ``root`` the engine wrote (hook outputs excluded)."""
    found, checked = [], 0
    for path in root.rglob("*"):
        if path.is_file() and path.name not in HOOK_OUTPUTS:
            checked += 1
            found += find(path.read_bytes(), str(path))
    return found, checked


def hooks_saw(seen: Path) -> dict[str, str]:
    """What the hooks' environments held: file name -> text (the hooks' own notes)."""
    notes = {p.name: p.read_text() for p in sorted(seen.glob("*.env"))}
    assert notes, f"the hooks left no notes in {seen}"
    return notes


def check_hook_environments(seen: Path) -> None:
    for name, text in hooks_saw(seen).items():
        assert f"CANARY_TOKEN={CANARY}" in text, name  # declared: visible to the hook
        assert f"PLAIN_CANARY={PLAIN}" in text, name
        assert f"REGION={REGION}" in text, name
        assert "OTHER_SECRET" not in text, f"{name}: an undeclared variable reached the hook"
        assert OTHER not in text, name


def check_outcomes(items: dict[str, Any]) -> None:
    ok = items["leaky"]
    assert ok.state == State.COMPLETED, ok.reason
    assert ok.outcome.data == {
        "[redacted CANARY_TOKEN]": "as a key", "list": ["[redacted PLAIN_CANARY]", 1],
        "nested": {"deep": "x[redacted CANARY_TOKEN]x"}, "region": REGION,
        "other_visible": False}
    failed = items["leaky-fail"]
    assert failed.state == State.DEAD
    assert failed.attempts == 2
    assert "could not log in with token=[redacted CANARY_TOKEN] plain=[redacted PLAIN_CANARY]" \
        in (failed.reason or "")


# -- in this process: caplog and an in-memory span exporter -------------------------------------


@pytest.fixture
def spans(monkeypatch: pytest.MonkeyPatch) -> Iterator[InMemorySpanExporter]:
    """The engine's tracer, pointed at an in-memory exporter (no global provider is set)."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(animus_core.engine, "tracer", provider.get_tracer("test-secrets"))
    yield exporter
    provider.shutdown()


async def test_secrets_reach_no_log_span_row_or_file(db, db_url, tmp_path, monkeypatch, caplog,
                                                     spans):
    for name, value in {**SECRETS, "REGION": REGION}.items():
        monkeypatch.setenv(name, value)
    seen = tmp_path / "seen"
    leaky_faculties(tmp_path, seen)
    # keep every focus directory, so that the files the engine wrote can be searched
    monkeypatch.setattr(Focus, "cleanup", lambda self, *, keep: self._directory)
    caplog.set_level(logging.DEBUG)
    options = EngineOptions(poll_interval=1.0, lease_seconds=30, grace=5.0, seal_interval=0.2,
                            keep_foci=True)
    items: dict[str, Any] = {}
    async with run_engine(db_url, tmp_path / "home", faculties=[PythonLeak()],
                          faculties_dir=tmp_path / "faculties", options=options) as engine:
        for work_type in ("leaky", "leaky-fail", "py-leak"):
            result = await db.submit_work(NewWorkItem(work_type, source="test"))
            assert isinstance(result, Created)
            items[work_type] = await wait_finished(db, result.id)
        foci = engine.foci_root

    check_hook_environments(seen)
    check_outcomes(items)
    py = items["py-leak"]
    assert py.state == State.DEAD
    assert "upstream refused token [redacted CANARY_TOKEN]" in (py.reason or "")
    assert "recover failed too" in (py.reason or "")

    leaks: list[str] = []
    # log records, as every handler would see them (caplog has no redacting filter)
    for record in caplog.records:
        leaks += find(record.getMessage(), f"log record {record.name}:{record.lineno}")
        leaks += find(record.exc_text or "", f"log traceback {record.name}:{record.lineno}")
    leaks += find(caplog.text, "caplog text")
    assert any("leaky-fail" in r.getMessage() for r in caplog.records), "no log to search"
    # spans: names, attributes, events (recorded exceptions too), status descriptions
    finished = spans.get_finished_spans()
    assert {"orient", "engage", "consolidate"} <= {s.name for s in finished}
    for s in finished:
        leaks += find(s.to_json(), f"span {s.name!r}")
    leaks += await database_leaks(db_url)
    found, checked = file_leaks(foci)
    assert checked >= 3, f"expected work.json files under {foci}"
    leaks += found
    assert not leaks, "secret values leaked:\n" + "\n".join(leaks)


# -- a real `animus up`: its stderr and everything it exported over OTLP ------------------------


async def test_a_real_engine_leaks_no_secret_to_stderr_or_otlp(db, db_url, cli_env, tmp_path):
    seen = tmp_path / "seen"
    leaky_faculties(tmp_path, seen)
    with OtlpReceiver() as receiver:
        env = {k: v for k, v in cli_env.items() if not k.startswith(("OTEL_", "TRACEPARENT"))}
        env.update(SECRETS, REGION=REGION, ANIMUS_FACULTIES=str(tmp_path / "faculties"),
                   ANIMUS_HOME=str(tmp_path / "home"), ANIMUS_DISABLE_PLUGIN_AUTOLOAD="1",
                   LOG_LEVEL="debug", OTEL_ENDPOINT=receiver.endpoint,
                   OTEL_BSP_SCHEDULE_DELAY="100", OTEL_BLRP_SCHEDULE_DELAY="100",
                   OTEL_METRIC_EXPORT_INTERVAL="500")
        proc = EngineProcess(["--poll", "1", "--grace", "5", "--keep-foci"], env, tmp_path,
                             tmp_path / "engine.log")
        try:
            await wait_listening(db_url, [proc])
            items: dict[str, Any] = {}
            for work_type in ("leaky", "leaky-fail"):
                result = await db.submit_work(NewWorkItem(work_type, source="test"))
                items[work_type] = await wait_finished(db, result.id)
            proc.signal(signal.SIGTERM)
            assert await proc.wait(30) == 0, proc.output()
            output = proc.output()
        finally:
            proc.close()
        traces, _metrics, logs = receiver.requests()
        assert traces, "no spans were exported to search"
        assert logs, "no logs were exported to search"
        store = receiver._store
        exported = [(f"OTLP {kind} request", req.SerializeToString())
                    for kind, reqs in (("trace", store.traces), ("metrics", store.metrics),
                                       ("logs", store.logs)) for req in reqs]

    check_hook_environments(seen)
    check_outcomes(items)
    assert "leaky-fail" in output, output  # there was a log to search, at DEBUG
    assert " DEBUG " in output, output
    assert "[redacted CANARY_TOKEN]" in output
    leaks = find(output, "engine stderr")
    for where, data in exported:
        leaks += find(data, where)
    leaks += await database_leaks(db_url)
    found, checked = file_leaks(tmp_path / "home" / "foci")
    assert checked >= 1, "the failed foci were not kept"
    leaks += found
    assert not leaks, "secret values leaked:\n" + "\n".join(leaks)
