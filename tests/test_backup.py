"""Backup, restore and retention, against the real test server and the real ``animus`` command.

A backup is restored into a database whose schemas were dropped, and every row comes back
with the audit chain intact; corrupt and partial backups are refused before anything is
touched; a restore that fails half-way leaves the database as it was; purge deletes only
old finished work and never an audit row.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import asyncpg
import pytest

from animus_core import Created, Db, Merged, NewWorkItem
from animus_core.faculties.embedders import HashingEmbedder
from animus_core.infra.embedded import pg_bin_dir
from animus_core.store.audit import UNSEALED_SQL, row_hash
from animus_core.store.backup import DUMP, MANIFEST, SUMS, backup, find_tool, restore, verify_backup
from animus_core.store.memory import Memory
from animus_core.store.retention import parse_age, purge
from animus_core.store.roles import setup_roles
from animus_core.values.errors import DatabaseError, InvalidInput
from tests.conftest import ROOT
from tests.support import one_error_line, raw

# Every table a restore must bring back, row for row (vectors and jsonb as text).
SNAPSHOT = {
    "work_items": "SELECT * FROM animus.work_items ORDER BY id",
    "audit_log": "SELECT * FROM animus.audit_log ORDER BY id",
    "audit_seal": "SELECT * FROM animus.audit_seal ORDER BY seq",
    "audit_gaps": "SELECT * FROM animus.audit_gaps ORDER BY audit_id",
    "unsealed": UNSEALED_SQL,
    "memories": """SELECT id, content, memory_type, source, metadata::text, embedding::text,
                          embedder, work_id, created_at, updated_at FROM animus.memories ORDER BY id""",
    "memory_config": "SELECT embedder, dimension FROM animus.memory_config",
    "schedule_ticks": "SELECT * FROM animus.schedule_ticks ORDER BY name, tick",
    "schema_migrations": "SELECT version, checksum FROM animus.schema_migrations ORDER BY version",
    "queues": "SELECT queue_name FROM pgmq.meta ORDER BY queue_name",
    "q_work": "SELECT msg_id, read_ct, vt, message::text FROM pgmq.q_work ORDER BY msg_id",
    "a_work": "SELECT msg_id, archived_at, message::text FROM pgmq.a_work ORDER BY msg_id",
    "q_side": "SELECT msg_id, message::text FROM pgmq.q_side ORDER BY msg_id",
    # no ACL and the owner's default one are the same privileges (a dump writes neither)
    "privileges": """SELECT c.relname, c.relrowsecurity,
                            coalesce(c.relacl, acldefault('r', c.relowner))::text FROM pg_class c
                       JOIN pg_namespace n ON n.oid = c.relnamespace
                      WHERE n.nspname = 'animus' AND c.relkind = 'r' ORDER BY 1""",
    "policies": "SELECT tablename, policyname, cmd, roles::text FROM pg_policies ORDER BY 1, 2",
}


async def snapshot(db_url: str) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of :data:`SNAPSHOT`'s tables (``[("missing",)]`` for a missing table)."""
    out: dict[str, list[tuple[Any, ...]]] = {}
    async with raw(db_url) as conn:
        for name, sql in SNAPSHOT.items():
            try:
                out[name] = [tuple(r) for r in await conn.fetch(sql)]
            except asyncpg.UndefinedTableError:
                out[name] = [("missing",)]
    return out


async def table_counts(db_url: str) -> dict[str, int]:
    async with raw(db_url) as conn:
        return {t: await conn.fetchval(f"SELECT count(*) FROM {t}") for t in (
            "animus.work_items", "animus.audit_log", "animus.audit_seal", "animus.memories",
            "pgmq.q_work", "pgmq.a_work")}


def ok(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert "Traceback" not in proc.stderr
    return proc.stdout


async def one(db: Db, work_type: str, *, start: bool = True) -> Any:
    [claimed] = await db.claim(work_types=[work_type], start=start)
    return claimed


async def populate(db: Db) -> None:
    """Work in every state, lineage links, memories, a schedule tick, two queues, and an
    audit trail with sealed and unsealed rows."""
    first = await db.submit_work(NewWorkItem("dedup", source="t").dedup_key("k").params({"n": 1}))
    dup = await db.submit_work(NewWorkItem("dedup", source="t").dedup_key("k"))
    assert isinstance(first, Created)
    assert isinstance(dup, Merged)
    parent = await db.submit_work(NewWorkItem("parent", source="t").params({"é": "ü"}))
    await db.submit_work(NewWorkItem("child", source="t").parent(parent.id))
    done = await one(db, "parent")
    await db.complete(done.lease, {"answer": [1, 2, {"x": None}]}, duration_ms=5)
    failing = await db.submit_work(NewWorkItem("failing", source="t").max_attempts(1))
    c = await one(db, "failing")
    await db.fail(c.lease, "boom")
    await db.dead_letter(failing.id, "gave up")
    await db.replay(failing.id)
    cancelled = await db.submit_work(NewWorkItem("cancelled", source="t"))
    await db.cancel(cancelled.id)
    await db.submit_scheduled("nightly", datetime(2026, 1, 1, tzinfo=UTC),
                              NewWorkItem("scheduled", source="schedule"))
    await db.create_queue("side")
    await db.submit_work(NewWorkItem("side", source="t"), queue="side")
    memory = await Memory.open(db, HashingEmbedder(32))
    await memory.store("the cat sat on the mat", metadata={"k": "v"}, source="t")
    await memory.store("backups are verified before restore", memory_type="episodic")
    async with db.connection() as conn:  # grants and row-level security must come back too
        await setup_roles(conn)
    await db.seal_audit()
    await one(db, "child", start=False)  # claimed: leaves unsealed audit rows behind


# -- backup and restore ------------------------------------------------------------------------


async def test_backup_destroy_restore_brings_everything_back(db_url, animus, tmp_path):
    db = await Db.connect(db_url, actor="test")
    try:
        await populate(db)
    finally:
        await db.close()
    before = await snapshot(db_url)
    assert before["memories"]
    assert before["unsealed"] != [(0,)]
    assert before["schedule_ticks"]

    out = ok(animus("backup", str(tmp_path)))
    [path] = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert f"backup written to {path}" in out
    assert "Observability data" in out
    assert "scripts/backup.sh" in out
    assert sorted(p.name for p in path.iterdir()) == [SUMS, DUMP, MANIFEST]  # no temporary left
    assert (path / SUMS).read_text() == f"{hashlib.sha256((path / DUMP).read_bytes()).hexdigest()}  {DUMP}\n"
    manifest = json.loads((path / MANIFEST).read_text())
    dump = (path / DUMP).read_bytes()
    assert manifest["files"][DUMP] == {"sha256": hashlib.sha256(dump).hexdigest(),
                                       "size": len(dump), "kind": "pg_dump custom format"}
    assert manifest["db_only"] is False
    assert manifest["pg_dump"]["origin"] == "bundled"
    assert manifest["database"]["server_version"].startswith("18")
    counts = manifest["row_counts"]
    assert counts["animus.work_items"] == len(before["work_items"])
    assert counts["animus.audit_log"] == len(before["audit_log"])
    assert counts["animus.memories"] == 2
    assert counts["pgmq.q_side"] == 1
    assert manifest["audit"]["head_seq"] == len(before["audit_seal"])

    async with raw(db_url) as conn:  # destroy
        await conn.execute("DROP SCHEMA animus CASCADE; DROP SCHEMA pgmq CASCADE")

    out = ok(animus("restore", str(path), "--yes"))
    assert "every table matches the manifest" in out
    assert await snapshot(db_url) == before

    assert "audit chain intact" in ok(animus("audit", "verify"))
    db = await Db.connect(db_url, actor="test")
    try:
        result = await db.verify_audit()
        assert result.ok, result
        assert result.checked == len(before["audit_log"])
        # The restored schema works: triggers, sequences and queues came back.
        async with raw(db_url) as conn:
            with pytest.raises(Exception, match="append-only"):
                await conn.execute("DELETE FROM animus.audit_log")
        new = await db.submit_work(NewWorkItem("after", source="t"))
        [event] = await db.history(new.id)
        assert event.id > max(r[0] for r in before["audit_log"])
        claimed = await one(db, "dedup")
        await db.complete(claimed.lease, {"ok": True})
        assert (await db.verify_audit()).ok
    finally:
        await db.close()


async def test_a_corrupt_backup_is_refused_and_nothing_is_touched(db_url, animus, tmp_path):
    db = await Db.connect(db_url, actor="test")
    try:
        await populate(db)
        path = await backup(db_url, tmp_path, db_only=True)
        await db.submit_work(NewWorkItem("after-backup", source="t"))  # the state to keep
    finally:
        await db.close()
    assert json.loads((path / MANIFEST).read_text())["db_only"] is True
    data = bytearray((path / DUMP).read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit
    (path / DUMP).write_bytes(bytes(data))
    before = await snapshot(db_url)

    with pytest.raises(InvalidInput, match=rf"{DUMP} fails its checksum"):
        await restore(db_url, path, db_only=True)
    line = one_error_line(animus("restore", str(path), "--yes").stderr)
    assert f"{path / DUMP} fails its checksum" in line
    assert "corrupt" in line
    assert await snapshot(db_url) == before


async def test_partial_backups_are_refused_naming_the_file(db_url, animus, tmp_path):
    db = await Db.connect(db_url, actor="test")
    try:
        await populate(db)
    finally:
        await db.close()
    good = await backup(db_url, tmp_path / "b", db_only=False)
    before = await snapshot(db_url)

    no_manifest = tmp_path / "no-manifest"
    shutil.copytree(good, no_manifest)
    (no_manifest / MANIFEST).unlink()
    with pytest.raises(InvalidInput, match=r"has no manifest\.json: the backup is partial"):
        await restore(db_url, no_manifest, db_only=False)

    no_dump = tmp_path / "no-dump"
    shutil.copytree(good, no_dump)
    (no_dump / DUMP).unlink()
    with pytest.raises(InvalidInput, match=rf"{no_dump / DUMP} is missing"):
        await restore(db_url, no_dump, db_only=False)
    line = one_error_line(animus("restore", str(no_dump), "--yes").stderr)
    assert f"{no_dump / DUMP} is missing" in line

    truncated = tmp_path / "truncated"
    shutil.copytree(good, truncated)
    with (truncated / DUMP).open("r+b") as f:
        f.truncate(1000)
    with pytest.raises(InvalidInput, match=rf"{DUMP} is 1000 bytes but the manifest says"):
        await restore(db_url, truncated, db_only=False)

    with pytest.raises(InvalidInput, match="does not exist"):
        verify_backup(tmp_path / "nowhere")
    assert await snapshot(db_url) == before
    verify_backup(good)  # the original is still fine


async def test_a_restore_that_fails_inside_rolls_back_completely(db_url, tmp_path):
    """The row-count check runs inside the restore's transaction, after the schemas were
    dropped and refilled: failing it must leave the database exactly as it was."""
    db = await Db.connect(db_url, actor="test")
    try:
        await populate(db)
        path = await backup(db_url, tmp_path, db_only=False)
        await db.submit_work(NewWorkItem("after-backup", source="t"))
        # An animus process still connected: refused before anything happens, saying that
        # the pids are the server's (killing one would not stop the engine) and where the
        # engines' own are
        async with db.connection() as conn:
            backend = await conn.fetchval("SELECT pg_backend_pid()")
        with pytest.raises(DatabaseError) as refused:
            await restore(db_url, path, db_only=False)
        message = str(refused.value)
        assert "animus connection(s) are open" in message
        assert f"(Postgres backend pids {backend}, not the processes that opened them)" in message
        assert "`animus status` lists them with their hosts and pids" in message
    finally:
        await db.close()
    manifest = json.loads((path / MANIFEST).read_text())
    newer = {**manifest, "database": {**manifest["database"], "server_version": "19.0",
                                      "server_version_num": 190000}}
    (path / MANIFEST).write_text(json.dumps(newer))
    with pytest.raises(InvalidInput, match="older major version is not supported"):
        await restore(db_url, path, db_only=False)
    manifest["row_counts"]["animus.work_items"] += 1  # the manifest itself is not checksummed
    (path / MANIFEST).write_text(json.dumps(manifest))
    before = await snapshot(db_url)
    with pytest.raises(DatabaseError, match=r"rolled back.*animus\.work_items has \d+ rows"):
        await restore(db_url, path, db_only=False)
    assert await snapshot(db_url) == before


async def test_restore_refuses_a_compose_backup_with_volumes_unless_db_only(db_url, tmp_path):
    path = await backup(db_url, tmp_path, db_only=False)
    manifest = json.loads((path / MANIFEST).read_text())
    (path / "tempo.tar.gz").write_bytes(b"not really a tarball")
    manifest["files"]["tempo.tar.gz"] = {
        "sha256": hashlib.sha256(b"not really a tarball").hexdigest(), "size": 20}
    manifest["volumes"] = {"tempo-data": "tempo.tar.gz"}
    (path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(InvalidInput, match=r"only scripts/restore\.sh can restore"):
        await restore(db_url, path, db_only=False)
    report = await restore(db_url, path, db_only=True)
    assert any("volume archives" in n for n in report.notes)


def test_find_tool_prefers_the_bundled_programs(tmp_path):
    assert find_tool("pg_dump", 18).origin == "bundled"
    # The bundled one missing (or too old): the one on PATH, if it is new enough.
    on_path = find_tool("pg_dump", 18, bundled_dir=tmp_path, search_path=str(pg_bin_dir()))
    assert on_path.origin == "PATH"
    with pytest.raises(DatabaseError, match="install the PostgreSQL 99 client programs"):
        find_tool("pg_dump", 99, search_path=str(tmp_path))


# -- retention ---------------------------------------------------------------------------------


async def test_purge_deletes_old_finished_work_and_keeps_the_audit_trail(db_url, animus, tmp_path):
    db = await Db.connect(db_url, actor="test")
    ids: dict[str, UUID] = {}
    try:
        async def submit(name: str, item: NewWorkItem) -> UUID:
            result = await db.submit_work(item)
            ids[name] = result.id
            return result.id

        async def finish(name: str) -> UUID:
            wid = await submit(name, NewWorkItem(name, source="t"))
            c = await one(db, name)
            await db.complete(c.lease, {"name": name})
            return wid

        await finish("old_completed")
        await db.cancel(await submit("old_cancelled", NewWorkItem("c", source="t")))
        await db.dead_letter(await submit("old_dead", NewWorkItem("d", source="t")), "no")
        await finish("recent_completed")
        await finish("old_approved")
        await submit("live", NewWorkItem("live", source="t"))
        await submit("canonical", NewWorkItem("m", source="t").dedup_key("m"))
        await submit("old_merged", NewWorkItem("m", source="t").dedup_key("m"))
        p = await finish("old_parent_live_child")
        await submit("live_child", NewWorkItem("lc", source="t").parent(p))
        p2 = await finish("old_parent")
        child = await submit("old_child", NewWorkItem("old_child", source="t").parent(p2))
        c = await one(db, "old_child")
        await db.complete(c.lease, None)
        d = await submit("old_dead_replayed", NewWorkItem("r", source="t"))
        await db.dead_letter(d, "no")
        ids["live_replay"] = (await db.replay(d)).id
        tick = await db.submit_scheduled("nightly", datetime(2026, 1, 1, tzinfo=UTC),
                                         NewWorkItem("ticked", source="schedule"))
        assert tick is not None
        ids["old_ticked"] = tick.id
        c = await one(db, "ticked")
        await db.complete(c.lease, None)
        assert child == ids["old_child"]
    finally:
        await db.close()

    old = ["old_completed", "old_cancelled", "old_dead", "old_merged", "old_parent_live_child",
           "old_parent", "old_child", "old_dead_replayed", "old_ticked", "old_approved"]
    kept = {ids["old_parent_live_child"], ids["old_dead_replayed"], ids["old_approved"]}
    gone = {ids[n] for n in old} - kept
    async with raw(db_url) as conn:
        # An approval decision (append-only, with a foreign key) pins its item for good.
        await conn.execute(
            "INSERT INTO animus.approvals (work_id, decision, reason) VALUES ($1, 'approve', 'ok')",
            ids["old_approved"])
        await conn.execute(
            "UPDATE animus.work_items SET resolved_at = now() - interval '40 days' "
            "WHERE id = ANY ($1::uuid[])", [ids[n] for n in old])
        await conn.execute(
            "UPDATE pgmq.a_work SET archived_at = now() - interval '40 days' "
            "WHERE message->>'id' = ANY ($1::text[])", [str(i) for i in gone])
        old_archived = await conn.fetchval(
            "SELECT count(*) FROM pgmq.a_work WHERE archived_at < now() - interval '30 days'")
        audit_of_gone = await conn.fetchval(
            "SELECT count(*) FROM animus.audit_log WHERE work_id = ANY ($1::uuid[])", list(gone))
    assert old_archived >= 4
    before = await snapshot(db_url)

    # A dry run counts and deletes nothing.
    out = ok(animus("purge", "--older-than", "30d", "--dry-run"))
    assert f"would delete {len(gone)} work items" in out
    assert "kept 3 old finished items that other rows still point at" in out
    assert f"would delete {old_archived} archived queue messages" in out
    assert "nothing was deleted" in out
    assert await snapshot(db_url) == before

    export = tmp_path / "export"
    report = json.loads(ok(animus("purge", "--older-than", "30d", "--audit-export", str(export),
                                  "--batch-size", "1", "--json")))
    assert sum(report["items"].values()) == len(gone)
    assert report["items"] == {"cancelled": 1, "completed": 4, "dead": 1, "merged": 1}
    assert report["kept_referenced"] == 3
    assert report["schedule_ticks"] == 1
    assert report["archived_messages"]["work"] == old_archived
    assert report["audit_rows"] == audit_of_gone

    after = await snapshot(db_url)
    remaining = {r[0] for r in after["work_items"]}
    assert not remaining & gone
    assert remaining == {r[0] for r in before["work_items"]} - gone
    assert after["audit_log"] == before["audit_log"]  # not one audit row touched
    assert after["schedule_ticks"] == []
    assert len(after["a_work"]) == len(before["a_work"]) - old_archived

    # The export: every audit row of the purged items, with the hashes that chain it.
    [exported] = list(export.iterdir())
    assert str(exported) == report["audit_export"]
    assert hashlib.sha256(exported.read_bytes()).hexdigest() == report["audit_export_sha256"]
    lines = [json.loads(line) for line in exported.read_text().splitlines()]
    assert len(lines) == audit_of_gone
    assert {UUID(line["work_id"]) for line in lines} == gone
    for line in lines:
        seal = line.pop("seal")
        line["at"] = datetime.fromisoformat(line["at"])
        assert row_hash(bytes.fromhex(seal["prev_hash"]), line).hex() == seal["hash"]

    assert "audit chain intact" in ok(animus("audit", "verify"))
    again = json.loads(ok(animus("purge", "--json")))
    assert again["items"] == {}
    assert again["audit_export"] is None


async def test_purge_with_the_library_and_bad_ages(db_url):
    db = await Db.connect(db_url, actor="test")
    try:
        report = await purge(db, older_than=timedelta(days=30), dry_run=True)
        assert report.total_items == 0
        assert report.dry_run
    finally:
        await db.close()
    assert parse_age("2w") == timedelta(days=14)
    for bad in ("0d", "30", "thirty days", "-1d"):
        with pytest.raises(InvalidInput, match="--older-than"):
            parse_age(bad)


# -- the compose scripts -----------------------------------------------------------------------


def test_compose_scripts_are_valid_shell():
    scripts = [str(ROOT / "scripts" / name)
               for name in ("backup.sh", "restore.sh", "compose-lib.sh")]
    subprocess.run(["bash", "-n", *scripts], check=True, timeout=30)
    if shutil.which("shellcheck"):
        proc = subprocess.run(["shellcheck", "-x", *scripts], capture_output=True, text=True,
                              timeout=60, cwd=ROOT)
        assert proc.returncode == 0, proc.stdout
