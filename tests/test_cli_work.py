"""``animus work``: the real command, run as a subprocess against the per-test database."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from animus_core import NewWorkItem, State
from animus_core.values.waits import Wait
from tests.conftest import ROOT
from tests.support import counts, one_error_line, raw, shared_database

Run = Callable[..., subprocess.CompletedProcess[str]]


def ok(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert "Traceback" not in proc.stderr
    return proc.stdout


async def test_submit_list_show(db, db_url, animus):
    parent = ok(animus("work", "submit", "parent-type")).split()
    assert parent[0] == "created"
    parent_id = parent[1]

    out = ok(animus(
        "work", "submit", "transform",
        "--param", "k=v", "--param", "n=3", "--param", "flag=true",
        "--params", '{"content": "hello world", "n": 1, "nested": {"a": [1, 2]}}',
        "--dedup-key", "task-123", "--priority", "5", "--source", "me", "--parent", parent_id,
        "--json",
    ))
    result = json.loads(out)
    assert result["type"] == "created"
    item = result["item"]
    wid = item["id"]
    # --param is applied over --params; values are JSON when they parse, else text.
    assert item["params"] == {"content": "hello world", "n": 3, "k": "v", "flag": True,
                              "nested": {"a": [1, 2]}}
    assert (item["work_type"], item["dedup_key"], item["priority"]) == ("transform", "task-123", 5)
    assert item["provenance"] == {"source": "me", "trigger": None}
    assert (item["parent_id"], item["state"]) == (parent_id, "queued")
    stored = await db.get_work_item(wid)
    assert stored.params == item["params"]
    assert stored.parent_id == uuid.UUID(parent_id)
    # The CLI acts as cli:<user>, recorded in the audit trail.
    [submitted] = await db.history(wid)
    assert submitted.provenance["actor"].startswith("cli:")

    dup = ok(animus("work", "submit", "transform", "--dedup-key", "task-123")).split()
    assert dup[0] == "merged"
    assert dup[3] == wid

    table = ok(animus("work", "list")).splitlines()
    assert table[0].split()[:3] == ["id", "type", "state"]
    rows = {line.split()[0]: line.split() for line in table[1:]}
    assert rows[wid][1:5] == ["transform", "queued", "0/3", "5"]
    assert rows[dup[1]][2] == "merged"
    assert len(rows) == 3

    listed = json.loads(ok(animus("work", "list", "--json", "--state", "queued",
                                  "--type", "transform")))
    assert [i["id"] for i in listed] == [wid]
    assert [i["id"] for i in json.loads(ok(animus("work", "list", "--json",
                                                  "--parent", parent_id)))] == [wid]
    newest_first = [i["id"] for i in json.loads(ok(animus("work", "list", "--json")))]
    assert newest_first[-1] == parent_id
    page = json.loads(ok(animus("work", "list", "--json", "--before", newest_first[0],
                                "--limit", "1")))
    assert [i["id"] for i in page] == newest_first[1:2]

    shown = ok(animus("work", "show", wid))
    fields = dict(line.split(":", 1) for line in shown.splitlines())
    assert fields["id"].strip() == wid
    assert fields["state"].strip() == "queued"
    assert fields["dedup key"].strip() == "task-123"
    assert fields["source"].strip() == "me"
    assert json.loads(fields["params"]) == item["params"]
    assert json.loads(ok(animus("work", "show", wid, "--json"))) == {
        **item, "updated_at": json.loads(ok(animus("work", "show", wid, "--json")))["updated_at"],
        "steps": [], "signals": []}


async def test_cancel_and_retry(db, animus):
    queued = (await db.submit_work(NewWorkItem("t", source="s"))).id
    out = ok(animus("work", "cancel", str(queued)))
    assert out.strip() == f"cancelled {queued}"
    cancelled = await db.get_work_item(queued)
    assert cancelled.state == State.CANCELLED
    assert cancelled.reason == "cancelled from the command line"

    # failed -> queued
    failing = (await db.submit_work(NewWorkItem("t", source="s").params({"x": 1}))).id
    [c] = await db.claim(start=True)
    await db.fail(c.lease, "boom")
    out = ok(animus("work", "retry", str(failing)))
    assert out.strip() == f"queued {failing} for another attempt"
    assert (await db.get_work_item(failing)).state == State.QUEUED

    # dead -> replayed as a new item
    await db.dead_letter(failing, "gave up")
    words = ok(animus("work", "retry", str(failing))).split()
    assert words[:3] == ["replayed", str(failing), "as"]
    replay = await db.get_work_item(words[3])
    assert replay.replay_of == failing
    assert replay.state == State.QUEUED
    assert replay.params == {"x": 1}
    assert replay.provenance.source == "cli"


async def test_signal_and_what_waiting_items_wait_for(db, animus):
    wid = (await db.submit_work(NewWorkItem("waiter", source="s"))).id
    [c] = await db.claim(start=True)
    until = datetime.now(UTC) + timedelta(hours=2)
    await db.suspend(c.lease, Wait.for_event(1, "approved", until), wake_at=until)
    listed = ok(animus("work", "list", "--state", "waiting"))
    assert "waits for" in listed.splitlines()[0]
    assert f"'approved' until {until.isoformat()}" in listed
    shown = ok(animus("work", "show", str(wid)))
    assert f"waits for:   'approved' until {until.isoformat()}" in shown
    assert "attempts:    0/3 counted, 1 in all (1 suspended)" in shown

    out = ok(animus("work", "signal", str(wid), "rejected", "--data", '{"why": "no"}'))
    assert out.strip().endswith("kept until a wait of the item takes it")
    out = ok(animus("work", "signal", str(wid), "approved", "--data", '{"by": "ann"}'))
    assert out.strip().endswith("it was waiting for it and is queued again")
    assert (await db.get_work_item(wid)).state == State.QUEUED
    assert [(s.event, s.payload) for s in await db.signals(wid)] == [
        ("rejected", {"why": "no"}), ("approved", {"by": "ann"})]
    shown = ok(animus("work", "show", str(wid)))
    assert "signals:" in shown
    assert "not taken yet" in shown

    # a waiting item is cancelled at once
    other = (await db.submit_work(NewWorkItem("waiter", source="s"))).id
    [c] = await db.claim(start=True, work_types=["waiter"])
    assert c.item.id in (wid, other)
    await db.suspend(c.lease, Wait.for_event(1, "never"), wake_at=None)
    assert ok(animus("work", "cancel", str(c.item.id))).strip() == f"cancelled {c.item.id}"
    assert (await db.get_work_item(c.item.id)).state == State.CANCELLED

    # a finished item takes no signals: one line, exit status 2
    proc = animus("work", "signal", str(c.item.id), "approved")
    assert proc.returncode == 2, proc
    assert "a finished item takes no signals" in one_error_line(proc.stderr)


async def test_show_says_how_many_children_a_waiting_parent_has_seen_finish(db, animus):
    wid = (await db.submit_work(NewWorkItem("brood", source="s"))).id
    [c] = await db.claim(start=True, work_types=["brood"])
    kids = await db.submit_children(c.lease, 1, "submit children", [
        NewWorkItem("kid", source="s").parent(wid) for _ in range(3)], queue="work",
        started_at=datetime.now(UTC))
    await db.suspend(c.lease, Wait.for_children(2, [str(k.id) for k in kids]), wake_at=None)
    await db.cancel(kids[0].id, "not needed")
    shown = ok(animus("work", "show", str(wid)))
    assert "waits for:   1 of 3 children finished" in shown
    assert "reason:      waiting for 3 children" in shown
    listed = ok(animus("work", "list", "--state", "waiting"))
    assert "3 children" in listed


_MISSING = "00000000-0000-0000-0000-00000000abcd"


@pytest.fixture(scope="module")
async def one_cli(
    server_url: str, template_url: str, animus_home: Path
) -> AsyncIterator[tuple[Run, str]]:
    """``animus`` on one database shared by the bad-input cases (each checks it wrote
    nothing)."""
    async with shared_database(server_url) as url:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST", "COV_"))}
        env.update(DATABASE_URL=url, ANIMUS_HOME=str(animus_home))

        def run(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([sys.executable, "-m", "animus_core", *args], env=env,
                                  capture_output=True, text=True, timeout=60, cwd=ROOT)

        yield run, url


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["work", "submit", "t", "--params", "{not json"], "--params is not valid JSON"),
        (["work", "submit", "t", "--params", "[1, 2]"], "must be a JSON object"),
        (["work", "submit", "t", "--param", "novalue"], "key=value"),
        (["work", "submit", "t", "--param", "x=NaN"], "nan"),
        (["work", "submit", "bad type!"], "work type"),
        (["work", "submit", "t", "--parent", _MISSING], _MISSING),
        (["work", "submit", "t", "--parent", "nope"], "UUID"),
        (["work", "submit", "t", "--queue", "nosuch"], "nosuch"),
        (["work", "show", _MISSING], _MISSING),
        (["work", "show", "not-an-id"], "UUID"),
        (["work", "cancel", _MISSING], _MISSING),
        (["work", "retry", _MISSING], _MISSING),
        (["work", "list", "--before", _MISSING], _MISSING),
    ],
    ids=lambda v: v if isinstance(v, str) else " ".join(v[1:3]),
)
async def test_bad_input_is_one_clear_line_exit_2_and_writes_nothing(one_cli, args, words):
    animus, db_url = one_cli
    before = await counts(db_url)
    proc = animus(*args)
    assert proc.returncode == 2, proc
    line = one_error_line(proc.stderr)
    assert words in line
    assert proc.stdout == ""
    assert await counts(db_url) == before


async def test_illegal_transition_from_cli(db, db_url, animus):
    wid = (await db.submit_work(NewWorkItem("t", source="s"))).id
    [c] = await db.claim(start=True)
    await db.complete(c.lease, {"done": True})
    before = await counts(db_url)
    async with raw(db_url) as conn:
        row = await conn.fetchrow("SELECT * FROM animus.work_items WHERE id = $1", wid)

    for command in ("cancel", "retry"):
        proc = animus("work", command, str(wid))
        assert proc.returncode == 2, proc
        line = one_error_line(proc.stderr)
        assert "completed -> " in line
        assert str(wid) in line

    assert await counts(db_url) == before
    async with raw(db_url) as conn:
        assert await conn.fetchrow("SELECT * FROM animus.work_items WHERE id = $1", wid) == row


def test_options_are_refused_naming_the_option_and_its_command(animus):
    """What a command does not take, or an option's bad value, is refused with that
    command's usage and the option named (exit 2, before any database is touched)."""
    typo = animus("work", "submit", "transform", "--wiat")
    assert typo.returncode == 2
    assert typo.stderr.strip().splitlines()[-1] == (
        "animus work submit: error: unrecognized arguments: --wiat")
    assert "usage: animus work submit" in typo.stderr
    zero = animus("work", "submit", "transform", "--max-attempts", "0")
    assert zero.stderr.strip().splitlines()[-1] == (
        "animus work submit: error: argument --max-attempts: '0' is not an attempt limit "
        "from 1 to 1000")
    page = animus("work", "list", "--before", "nope")
    assert one_error_line(page.stderr) == (
        "animus: error: --before: 'nope' is not a work item id (a UUID, as animus work list "
        "shows)")
    empty = animus("work", "submit", "transform", "--parent", "")  # an unset shell variable
    assert one_error_line(empty.stderr) == (
        "animus: error: --parent: '' is not a work item id (a UUID, as animus work list shows)")
    top = animus("--bogus", "work", "list")
    assert top.stderr.strip().splitlines()[-1] == "animus: error: unrecognized arguments: --bogus"


async def test_a_signal_payload_that_is_not_json_says_how_to_send_text(db, animus):
    wid = (await db.submit_work(NewWorkItem("sig-text"))).id
    proc = animus("work", "signal", str(wid), "go", "--data", "notjson")
    assert proc.returncode == 2
    line = one_error_line(proc.stderr)
    assert line.startswith("animus: error: --data is not valid JSON: ")
    assert line.endswith("""(a text is JSON in quotes: --data '"text"')""")


def test_a_plugin_name_that_nothing_installed_has_is_a_problem(animus, cli_env):
    env = {**cli_env, "ANIMUS_PLUGINS": "summarise", "ANIMUS_BLOCK_PLUGINS": "nosuch"}
    proc = subprocess.run([sys.executable, "-m", "animus_core", "faculty", "check"], env=env,
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 2
    assert ("ANIMUS_PLUGINS: summarise: no installed plugin has this name (installed: "
            "animus-faculty-summarize, summarize)") in proc.stdout
    assert "ANIMUS_BLOCK_PLUGINS: nosuch: no installed plugin has this name" in proc.stdout
    env = {**cli_env, "ANIMUS_PLUGINS": "summarize,pipelines"}  # a built-in: always loaded
    proc = subprocess.run([sys.executable, "-m", "animus_core", "faculty", "check"], env=env,
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
