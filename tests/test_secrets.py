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

import contextlib
import json
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

import animus_core.runtime.runner
from animus_core import Created, Faculty, NewWorkItem, State
from animus_core.faculties.focus import Focus
from animus_core.faculties.toml import STDERR_TAIL
from animus_core.runtime.engine import EngineOptions
from tests.engine_helpers import (
    EngineProcess,
    run_engine,
    wait_finished,
    wait_listening,
    wait_until,
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
    monkeypatch.setattr(animus_core.runtime.runner, "tracer", provider.get_tracer("test-secrets"))
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


# -- cuts and encodings -------------------------------------------------------------------------

#: Mixed case, digits: no uuid, path or English word holds four of its characters in a row.
CUT_CANARY = "Qv8ZkW3xJt7PmR2nLc9H"
#: A secret JSON and Python cannot write as it is: a quote, a backslash, a tab, non-ASCII.
ODD_CANARY = 'Kp"7\\Wq\tzé-Xr4'


def fragments(text: str, secret: str, shortest: int = 4) -> list[str]:
    """The prefixes and suffixes of ``secret`` (``shortest`` characters or more, the whole
    of it included) that occur in ``text``."""
    parts = {secret[:n] for n in range(shortest, len(secret) + 1)}
    parts |= {secret[-n:] for n in range(shortest, len(secret) + 1)}
    return sorted(p for p in parts if p in text)


async def test_a_secret_cut_anywhere_by_the_tail_leaks_no_fragment(db, db_url, tmp_path,
                                                                   monkeypatch, caplog):
    """The failure reason keeps the end of a hook's standard error. A secret placed at every
    offset around where that tail begins must leave no prefix or suffix of itself in the
    reason, the audit trail, the execution record or the log (stdout is logged the same way)."""
    monkeypatch.setenv("CUT_TOKEN", CUT_CANARY)
    write_toml_faculty(tmp_path, "cut", fields={"max_concurrent": 8, "max_attempts": 1,
                                               "env": ["CUT_TOKEN"]}, hooks={"engage": """
        after=$(sed -n 's/.*"after": *\\([0-9]*\\).*/\\1/p' work.json)
        line="$(head -c 100 /dev/zero | tr '\\0' x)$CUT_TOKEN$(head -c "$after" /dev/zero | tr '\\0' y)"
        printf '%s\\n' "$line"
        printf '%s\\n' "$line" >&2
        exit 3
    """})
    caplog.set_level(logging.DEBUG)
    size = len(CUT_CANARY)
    # the tail (the output's last STDERR_TAIL characters) starts `shift` characters into the
    # secret: before it, at each of its characters, after it
    shifts = range(-2, size + 3)
    async with run_engine(db_url, tmp_path / "home", faculties_dir=tmp_path / "faculties"):
        results = await db.submit_many([
            NewWorkItem("cut").params({"after": STDERR_TAIL - (size - shift) - 1})
            for shift in shifts])
        items = [await wait_finished(db, r.id) for r in results]

    leaks: list[str] = []
    for shift, item in zip(shifts, items, strict=True):
        assert item.state == State.DEAD, item.reason
        assert "exited with status 3" in (item.reason or "")
        texts = {"reason": item.reason or "", "outcome.error": item.outcome.error or ""}
        for event in await db.history(item.id):
            texts[f"audit {event.event}"] = json.dumps(event.payload, ensure_ascii=False)
        for record in await db.executions(item.id):
            texts[f"execution record {record.attempt}"] = record.error or ""
        leaks += [f"shift {shift}, {where}: {found}" for where, text in texts.items()
                  if (found := fragments(text, CUT_CANARY))]
        # the tail was cut where it should be: the filler after the secret is all there
        assert "y" * max(0, STDERR_TAIL - size - 3) in (item.reason or "")
    for record in caplog.records:
        if found := fragments(record.getMessage(), CUT_CANARY):
            leaks.append(f"log {record.name}:{record.lineno}: {found}")
    assert any("stdout" in r.getMessage() for r in caplog.records), "no stdout was logged"
    assert not leaks, "secret fragments leaked:\n" + "\n".join(leaks)


def odd_forms() -> dict[str, str]:
    """How the odd secret looks in JSON text, one and two levels deep, and in Python text."""
    once_ascii = json.dumps(ODD_CANARY)[1:-1]
    once = json.dumps(ODD_CANARY, ensure_ascii=False)[1:-1]
    return {"as it is": ODD_CANARY, "JSON": once, "JSON, ASCII only": once_ascii,
            "JSON in JSON": json.dumps(once, ensure_ascii=False)[1:-1],
            "JSON in JSON, ASCII only": json.dumps(once_ascii)[1:-1],
            "Python repr": repr(ODD_CANARY)[1:-1]}


def odd_leaks(text: str, where: str) -> list[str]:
    return [f"{where}: {name} ({form!r})" for name, form in odd_forms().items() if form in text]


def strings(value: Any) -> Iterator[str]:
    """Every string in a JSON value, and in the JSON documents those strings hold."""
    if isinstance(value, str):
        yield value
        with contextlib.suppress(ValueError):
            inner = json.loads(value)
            if not isinstance(inner, str):
                yield from strings(inner)
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from strings(k)
            yield from strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from strings(v)


class Escaper(Faculty):
    """Puts the secret into its outcome inside JSON text (once and twice encoded, ASCII-only
    or not) and Python text; ``escaper-fail`` raises with it JSON-encoded."""

    name = "escaper"
    accepts = ("escaper", "escaper-fail")
    max_attempts = 1

    async def engage(self, focus: Focus, oriented: Any) -> Any:
        secret = os.environ["ODD_TOKEN"]
        doc = {"token": secret}
        if focus.work.work_type == "escaper-fail":
            raise RuntimeError(f"upstream said {json.dumps(doc)}")
        return {"json": json.dumps(doc), "json_utf8": json.dumps(doc, ensure_ascii=False),
                "json_in_json": json.dumps({"body": json.dumps(doc)}),
                "repr": f"got {secret!r}", "plain": f"token={secret}"}


async def test_a_secret_in_json_or_python_text_is_redacted(db, db_url, tmp_path, monkeypatch,
                                                           caplog):
    monkeypatch.setenv("ODD_TOKEN", ODD_CANARY)
    write_toml_faculty(tmp_path, "odd-hook", fields={"secrets": ["ODD_TOKEN"],
                                                    "max_attempts": 1}, hooks={"engage": """
        python3 -c 'import json, os, sys; print(json.dumps({"t": os.environ["ODD_TOKEN"]}), file=sys.stderr)'
        exit 1
    """})
    caplog.set_level(logging.DEBUG)
    async with run_engine(db_url, tmp_path / "home", faculties=[Escaper()],
                          faculties_dir=tmp_path / "faculties"):
        items = {}
        for work_type in ("escaper", "escaper-fail", "odd-hook"):
            result = await db.submit_work(NewWorkItem(work_type, source="test"))
            items[work_type] = await wait_finished(db, result.id)

    done = items["escaper"]
    assert done.state == State.COMPLETED, done.reason
    assert set(done.outcome.data) == {"json", "json_utf8", "json_in_json", "repr", "plain"}
    assert "[redacted ODD_TOKEN]" in done.outcome.data["json"]
    assert all(odd not in s for s in strings(done.outcome.data)
               for odd in odd_forms().values()), done.outcome.data
    for work_type in ("escaper-fail", "odd-hook"):
        assert items[work_type].state == State.DEAD
        assert "[redacted ODD_TOKEN]" in (items[work_type].reason or ""), items[work_type].reason
    leaks: list[str] = []
    for record in caplog.records:
        leaks += odd_leaks(record.getMessage(), f"log {record.name}:{record.lineno}")
    async with raw(db_url) as conn:
        for table in ("work_items", "audit_log", "execution_records"):
            for row in await conn.fetch(f"SELECT r::text AS t FROM animus.{table} AS r"):
                leaks += odd_leaks(row["t"], f"animus.{table}")
    assert not leaks, "the secret leaked in an encoded form:\n" + "\n".join(leaks)


async def test_a_secret_in_a_malformed_notification_leaks_no_fragment_to_the_log(
        db, db_url, tmp_path, monkeypatch, caplog):
    """The engine logs the start of a notification it cannot read; a secret placed across
    where that start is cut leaves nothing of itself in the log."""
    monkeypatch.setenv("CUT_TOKEN", CUT_CANARY)
    caplog.set_level(logging.DEBUG)
    size = len(CUT_CANARY)
    shifts = range(-2, size + 3)
    async with run_engine(db_url, tmp_path / "home") as run:
        async with raw(db_url) as conn:
            for shift in shifts:  # the logged start ends `shift` characters into the secret
                payload = f"not json {shift:>3} " + "x" * (200 - 13 - shift) + CUT_CANARY
                await conn.execute("SELECT pg_notify('animus_work', $1)", payload)
        await run.wait_quiet()
        await wait_until(lambda: sum("malformed" in r.getMessage() for r in caplog.records)
                         == len(shifts), message="every notification to be logged")
    leaks = [f"log: {found}" for r in caplog.records
             if (found := fragments(r.getMessage(), CUT_CANARY))]
    assert not leaks, "secret fragments leaked:\n" + "\n".join(leaks)
