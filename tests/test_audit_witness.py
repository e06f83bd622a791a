"""A witness outside the database: seals keyed with a secret the database does not hold, and
checkpoints of the chain's head kept elsewhere.

The attacker in these tests is the database superuser: they switch the append-only triggers
off (``session_replication_role = replica``), delete, truncate and rewrite rows, and reseal
with animus's own public hash function (:func:`animus_core.store.audit.record_hash`). What each
of them can get past, and what they cannot, is the table in docs/governance.md.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from animus_core import Db, NewWorkItem, State
from animus_core.infra.config import Settings
from animus_core.store.audit import _HASHED_COLUMNS, GENESIS, record_hash
from animus_core.values.errors import ConfigError
from tests.engine_helpers import run_cli, run_engine, wait_finished
from tests.support import console_examples, raw

KEY = bytes(range(32)).hex()
OTHER_KEY = bytes(range(100, 132)).hex()


async def _work(db: Db, n: int = 3) -> None:
    """Some history: ``n`` items submitted, claimed, run and completed (4 rows each)."""
    for i in range(n):
        await db.submit_work(NewWorkItem("witnessed", source="t").params({"i": i}))
    for c in await db.claim(limit=n, start=True):
        await db.complete(c.lease, {"done": True}, duration_ms=1)


@pytest.fixture
def cli(cli_env: dict[str, str], tmp_path: Path) -> Any:
    """``await cli(*args, key=KEY)``: the real CLI, with or without an audit key."""

    async def run(*args: str, key: str | None = None, **env: str) -> tuple[int, str, str]:
        full = {k: v for k, v in cli_env.items()
                if k not in ("ANIMUS_AUDIT_KEY", "ANIMUS_AUDIT_KEY_FILE")}
        full.update(env)
        if key is not None:
            full["ANIMUS_AUDIT_KEY"] = key
        return await run_cli(full, tmp_path, *args)

    return run


def _append(path: Path, text: str) -> None:
    with path.open("a") as f:
        f.write(text)


async def _checkpoint(cli: Any, path: Path, key: str | None = None) -> dict[str, Any]:
    """``animus audit checkpoint --json``, appended to ``path`` as an operator would."""
    code, out, err = await cli("audit", "checkpoint", "--json", key=key)
    assert code == 0, err
    _append(path, out)
    checkpoint: dict[str, Any] = json.loads(out)
    return checkpoint


async def _as_superuser(db_url: str, *statements: str) -> None:
    async with raw(db_url) as conn:
        await conn.execute("SET session_replication_role = replica")
        for sql in statements:
            await conn.execute(sql)


async def _reseal(db_url: str, from_seq: int, *, drop_key: bool = False) -> None:
    """Recompute every seal from chain position ``from_seq`` on with the public hash, as the
    superuser can (with ``drop_key``, also marking those seals as sealed without a key)."""
    async with raw(db_url) as conn:
        await conn.execute("SET session_replication_role = replica")
        prev = GENESIS if from_seq == 1 else bytes(await conn.fetchval(
            "SELECT hash FROM animus.audit_seal WHERE seq = $1", from_seq - 1))
        rows = await conn.fetch(
            f"""SELECT s.seq, {_HASHED_COLUMNS} FROM animus.audit_seal s
                  JOIN animus.audit_log a ON a.id = s.audit_id
                 WHERE s.seq >= $1 ORDER BY s.seq""", from_seq)
        for r in rows:
            digest = record_hash(prev, tuple(r)[1:])
            await conn.execute(
                "UPDATE animus.audit_seal SET prev_hash = $2, hash = $3 WHERE seq = $1",
                r["seq"], prev, digest)
            if drop_key:
                await conn.execute(
                    "UPDATE animus.audit_seal SET key_id = NULL WHERE seq = $1", r["seq"])
            prev = digest


async def _head(db_url: str) -> tuple[int, int]:
    async with raw(db_url) as conn:
        row = await conn.fetchrow(
            "SELECT seq, audit_id FROM animus.audit_seal ORDER BY seq DESC LIMIT 1")
    return row["seq"], row["audit_id"]


# -- checkpoints ---------------------------------------------------------------------------------


@pytest.mark.parametrize("key", [None, KEY], ids=["unkeyed", "keyed"])
async def test_a_checkpoint_names_the_head_of_the_chain(db, db_url, cli, key):
    await _work(db)
    code, out, err = await cli("audit", "checkpoint", "--json", key=key)
    assert code == 0, err
    assert len(out.strip().splitlines()) == 1, "one line, so that checkpoints append as JSON lines"
    cp = json.loads(out)
    async with raw(db_url) as conn:
        head = await conn.fetchrow(
            "SELECT seq, audit_id, hash FROM animus.audit_seal ORDER BY seq DESC LIMIT 1")
        rows = await conn.fetchval("SELECT count(*) FROM animus.audit_log")
    assert head["seq"] == rows == 12  # the checkpoint seals what is pending first
    assert (cp["seq"], cp["audit_id"], cp["hash"]) == (
        head["seq"], head["audit_id"], bytes(head["hash"]).hex())
    assert cp["at"].endswith("Z")
    if key is None:
        assert (cp["key_id"], cp["mac"]) == (None, None)
    else:
        assert re.fullmatch(r"[0-9a-f]{16}", cp["key_id"])
        assert re.fullmatch(r"[0-9a-f]{64}", cp["mac"])
    code, out, err = await cli("audit", "checkpoint", key=key)
    assert code == 0, err
    assert f"position {head['seq']}" in out
    assert bytes(head["hash"]).hex() in out


@pytest.mark.parametrize("key", [None, KEY], ids=["unkeyed", "keyed"])
async def test_truncating_the_tail_is_detected_against_a_checkpoint(
        db, db_url, cli, tmp_path, key):
    await _work(db)
    cp = await _checkpoint(cli, tmp_path / "cp.jsonl", key)
    seq, audit_id = await _head(db_url)
    await _as_superuser(
        db_url,
        f"DELETE FROM animus.audit_seal WHERE seq > {seq - 2}",
        f"DELETE FROM animus.audit_log WHERE id > {audit_id - 2}")

    # The chain alone cannot tell: what is left is a valid, shorter chain.
    code, out, _ = await cli("audit", "verify", key=key)
    assert (code, out.split(":")[0]) == (0, "audit chain intact")

    code, out, _ = await cli("audit", "verify", "--against", str(tmp_path / "cp.jsonl"), key=key)
    assert code == 1, out
    assert "BROKEN" in out
    assert f"ends at position {seq - 2}" in out
    assert f"position {cp['seq']}" in out


async def test_emptying_the_trail_is_detected_against_a_checkpoint(db, db_url, cli, tmp_path):
    await _work(db)
    await _checkpoint(cli, tmp_path / "cp.jsonl", KEY)
    await _as_superuser(db_url, "TRUNCATE animus.audit_log, animus.audit_seal, animus.audit_gaps")
    code, out, _ = await cli("audit", "verify", key=KEY)
    assert code == 0, out
    assert "0 rows" in out
    code, out, _ = await cli("audit", "verify", "--against", str(tmp_path / "cp.jsonl"), key=KEY)
    assert code == 1, out
    assert "the chain is empty" in out


async def test_a_rewrite_resealed_with_the_public_hash_is_detected_against_a_checkpoint(
        db, db_url, cli, tmp_path):
    """Without a key, the superuser can edit a row and recompute every seal after it: the
    chain verifies. A checkpoint taken before the rewrite does not match any more, and the
    last one that still matches bounds where the rewrite began."""
    await _work(db)
    early = await _checkpoint(cli, tmp_path / "cp.jsonl")
    await _work(db)
    late = await _checkpoint(cli, tmp_path / "cp.jsonl")
    target_seq = early["seq"] + 2
    async with raw(db_url) as conn:
        target = await conn.fetchval("SELECT audit_id FROM animus.audit_seal WHERE seq = $1",
                                     target_seq)
    await _as_superuser(
        db_url, "UPDATE animus.audit_log SET payload = payload || '{\"outcome\": \"forged\"}' "
                f"WHERE id = {target}")
    await _reseal(db_url, target_seq)

    code, out, _ = await cli("audit", "verify")
    assert code == 0, out  # the public hash alone cannot tell
    code, out, _ = await cli("audit", "verify", "--against", str(tmp_path / "cp.jsonl"))
    assert code == 1, out
    assert f"chain position {late['seq']}" in out
    assert f"after position {early['seq']}" in out
    assert "2 checkpoints" in out or "checkpoint" in out


async def test_checkpoints_that_still_match_are_reported(db, cli, tmp_path):
    await _work(db)
    await _checkpoint(cli, tmp_path / "cp.jsonl", KEY)
    await _work(db)
    await _checkpoint(cli, tmp_path / "cp.jsonl", KEY)
    await _work(db)
    code, out, err = await cli("audit", "verify", "--against", str(tmp_path / "cp.jsonl"),
                               "--json", key=KEY)
    assert code == 0, out + err
    result = json.loads(out)
    assert result["ok"]
    assert result["checkpoints"] == 2
    assert result["authenticated"] == result["checked"] == 36


async def test_a_checkpoint_of_another_database_says_so(db, cli, tmp_path):
    """Checked against the wrong file (or after a restore into another cluster), a chain
    that differs says whose checkpoint it was compared with."""
    await _work(db)
    cp = await _checkpoint(cli, tmp_path / "cp.jsonl")
    (tmp_path / "other.jsonl").write_text(json.dumps(
        {**cp, "database": "animus@1", "seq": cp["seq"] + 5, "audit_id": cp["audit_id"] + 5})
        + "\n")
    code, out, _ = await cli("audit", "verify", "--against", str(tmp_path / "other.jsonl"))
    assert code == 1, out
    assert f"the checkpoint is of animus@1, and this database is {cp['database']}" in out


async def test_a_checkpoint_of_an_empty_chain_holds_for_any_chain(db, cli, tmp_path):
    await _checkpoint(cli, tmp_path / "cp.jsonl", KEY)
    await _work(db)
    code, out, err = await cli("audit", "verify", "--against", str(tmp_path / "cp.jsonl"),
                               "--json", key=KEY)
    assert code == 0, out + err
    assert json.loads(out)["checkpoints"] == 1


async def test_a_forged_checkpoint_is_refused(db, db_url, cli, tmp_path):
    """To hide a truncation, the attacker rewrites the stored checkpoint to the new head: its
    signature, made with the key, no longer matches."""
    await _work(db)
    path = tmp_path / "cp.jsonl"
    cp = await _checkpoint(cli, path, KEY)
    await _as_superuser(db_url, f"DELETE FROM animus.audit_seal WHERE seq > {cp['seq'] - 1}",
                        f"DELETE FROM animus.audit_log WHERE id > {cp['audit_id'] - 1}")
    async with raw(db_url) as conn:
        new_head = await conn.fetchrow(
            "SELECT seq, audit_id, hash FROM animus.audit_seal ORDER BY seq DESC LIMIT 1")
    forged = {**cp, "seq": new_head["seq"], "audit_id": new_head["audit_id"],
              "hash": bytes(new_head["hash"]).hex()}
    path.write_text(json.dumps(forged) + "\n")
    code, out, _ = await cli("audit", "verify", "--against", str(path), key=KEY)
    assert code == 1, out
    assert "signature" in out
    assert "line 1" in out


async def test_a_checkpoint_file_that_is_not_one_is_a_usage_error(db, cli, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"seq": "many"}\n')
    code, out, err = await cli("audit", "verify", "--against", str(bad))
    assert code == 2, out + err
    assert err.startswith("animus: error:")
    assert f"{bad} line 1" in err
    code, out, err = await cli("audit", "verify", "--against", str(tmp_path / "missing.jsonl"))
    assert code == 2, out + err
    assert "missing.jsonl" in err


# -- keyed seals ---------------------------------------------------------------------------------


async def test_seals_made_with_a_key_say_which_key(db, db_url, cli):
    await _work(db)
    code, out, err = await cli("audit", "verify", "--json", key=KEY)
    assert code == 0, err
    result = json.loads(out)
    assert (result["ok"], result["checked"], result["authenticated"]) == (True, 12, 12)
    async with raw(db_url) as conn:
        key_ids = {r[0] for r in await conn.fetch("SELECT DISTINCT key_id FROM animus.audit_seal")}
    assert len(key_ids) == 1
    (key_id,) = key_ids
    assert key_id is not None
    assert result["key_ids"] == [key_id]


@pytest.mark.parametrize(("forgery", "problem"), [
    ("keeps the key id", "changed after it was sealed"),
    ("drops the key from the edit on", "sealed without a key after"),
    ("drops the key from the whole chain", "no row is sealed with"),
])
async def test_with_a_key_an_edit_resealed_without_it_is_detected(
        db, db_url, cli, forgery, problem):
    await _work(db)
    code, _, err = await cli("audit", "verify", key=KEY)  # seals everything with the key
    assert code == 0, err
    async with raw(db_url) as conn:
        target = await conn.fetchval("SELECT audit_id FROM animus.audit_seal WHERE seq = 5")
    await _as_superuser(
        db_url, f"UPDATE animus.audit_log SET db_user = 'nobody' WHERE id = {target}")
    from_seq = 1 if forgery.endswith("whole chain") else 5
    await _reseal(db_url, from_seq, drop_key="drops" in forgery)

    code, out, _ = await cli("audit", "verify", key=KEY)
    assert code == 1, out
    assert problem in out
    if from_seq == 5:
        assert f"BROKEN at row {target}" in out


async def test_verifying_a_keyed_chain_without_the_key_says_what_was_not_checked(db, cli):
    await _work(db)
    assert (await cli("audit", "verify", key=KEY))[0] == 0
    code, out, err = await cli("audit", "verify", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert (result["checked"], result["authenticated"], result["unauthenticated"]) == (12, 0, 12)
    code, out, err = await cli("audit", "verify")
    assert code == 0, err
    assert "not authenticated" in out
    assert "ANIMUS_AUDIT_KEY" in out


async def test_a_process_without_the_key_does_not_extend_a_keyed_chain(db, db_url, cli):
    """Sealing without the key after seals made with it would be a downgrade that nobody
    could tell from a forgery: the rows wait for a process that holds the key."""
    await _work(db)
    assert (await cli("audit", "verify", key=KEY))[0] == 0
    await _work(db, 1)
    code, out, err = await cli("audit", "verify")
    assert code == 0, err
    assert "4 rows wait to be sealed" in out
    assert (await _head(db_url))[0] == 12
    assert await db.seal_audit() == 0  # a Db without the key refuses too
    code, out, err = await cli("audit", "verify", "--json", key=KEY)
    assert code == 0, err
    assert json.loads(out)["authenticated"] == 16


async def test_a_chain_sealed_before_a_key_was_set_goes_on_with_it(db, db_url, cli):
    await _work(db)
    assert await db.seal_audit() == 12  # sealed without a key
    await _work(db, 1)
    code, out, err = await cli("audit", "verify", "--json", key=KEY)
    assert code == 0, out + err
    result = json.loads(out)
    assert (result["checked"], result["authenticated"], result["unkeyed"]) == (16, 4, 12)
    code, out, err = await cli("audit", "verify", key=KEY)
    assert code == 0, err
    assert "12 sealed before a key was set" in out

    # a rewrite of the unkeyed part, resealed, no longer matches the first keyed seal
    async with raw(db_url) as conn:
        target = await conn.fetchval("SELECT audit_id FROM animus.audit_seal WHERE seq = 3")
        first_keyed = await conn.fetchval("SELECT audit_id FROM animus.audit_seal WHERE seq = 13")
    await _as_superuser(
        db_url, f"UPDATE animus.audit_log SET event = 'forged' WHERE id = {target}")
    await _reseal(db_url, 3)  # the keyed seals after it keep their key id, not their hash
    code, out, _ = await cli("audit", "verify", key=KEY)
    assert code == 1, out
    assert f"BROKEN at row {first_keyed}" in out
    assert "or a row before it, was changed after it was sealed" in out


async def test_a_chain_sealed_with_a_key_the_verifier_lacks_is_broken_for_it(db, cli):
    await _work(db)
    assert (await cli("audit", "verify", key=KEY))[0] == 0
    code, out, _ = await cli("audit", "verify", key=OTHER_KEY)
    assert code == 1, out
    assert "not among the keys" in out
    code, out, err = await cli("audit", "verify", key=f"{OTHER_KEY},{KEY}")
    assert code == 0, out + err


@pytest.mark.parametrize(("env", "message"), [
    ({"ANIMUS_AUDIT_KEY": "abcd"}, "at least 32 bytes"),
    ({"ANIMUS_AUDIT_KEY": "not hex, not base64!"}, "neither hex nor base64"),
    ({"ANIMUS_AUDIT_KEY": KEY, "ANIMUS_AUDIT_KEY_FILE": "/dev/null"}, "not both"),
    ({"ANIMUS_AUDIT_KEY_FILE": "/nonexistent/animus.key"}, "cannot read"),
])
def test_bad_audit_keys_are_refused_by_name(env, message):
    with pytest.raises(ConfigError, match=message) as err:
        Settings.from_env(env)
    name = "ANIMUS_AUDIT_KEY_FILE" if "cannot read" in message else "ANIMUS_AUDIT_KEY"
    assert name in str(err.value)
    assert KEY not in str(err.value)


def test_a_key_file_holds_keys_one_a_line(tmp_path):
    path = tmp_path / "audit.key"
    path.write_text(f"# the key that seals first, then an older one that still verifies\n"
                    f"{KEY}\n{OTHER_KEY}\n")
    keys = Settings.from_env({"ANIMUS_AUDIT_KEY_FILE": str(path)}).audit_keys
    assert keys.sealing == bytes.fromhex(KEY)
    assert len(keys.keys) == 2
    b64 = Settings.from_env({"ANIMUS_AUDIT_KEY": "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="})
    assert b64.audit_keys.sealing == bytes.fromhex(KEY)


# -- the engine keeps a witness -----------------------------------------------------------------


async def test_the_engine_writes_signed_checkpoints_under_animus_home(
        db, db_url, tmp_path, cli, caplog, monkeypatch):
    monkeypatch.setenv("ANIMUS_AUDIT_KEY", KEY)
    from tests.test_engine import Echo  # a plain Python faculty

    home = tmp_path / "home"
    caplog.set_level("INFO", logger="animus.audit")
    async with run_engine(db_url, home, faculties=[Echo()]):
        for i in range(3):
            created = await db.submit_work(NewWorkItem("echo", source="t").params({"i": i}))
            assert (await wait_finished(db, created.id)).state == State.COMPLETED
    files = list((home / "audit-checkpoints").glob("*.jsonl"))
    assert len(files) == 1, files
    lines = files[0].read_text().splitlines()
    assert lines
    last = json.loads(lines[-1])
    assert (last["seq"], last["audit_id"]) == await _head(db_url)
    assert last["mac"] is not None
    logged = [r for r in caplog.records if "audit checkpoint" in r.getMessage()]
    assert logged
    assert json.loads(getattr(logged[-1], "animus.audit.checkpoint")) == last

    code, out, err = await cli("audit", "verify", "--against", str(files[0]), key=KEY)
    assert code == 0, out + err
    assert "checkpoint" in out


# -- the documentation ---------------------------------------------------------------------------


def _shape(lines: list[str]) -> list[str]:
    """Lines with what differs between runs made generic: the database's name, times,
    hashes and key ids, numbers."""
    out = []
    for line in lines:
        line = re.sub(r"[\w.]+@\d+", "DB", line)
        line = re.sub(r"\d{4}-\d\d-\d\dT[\d:.]+Z", "T", line)
        line = re.sub(r"\b[0-9a-f]{16,}\b", "H", line)
        out.append(re.sub(r"\d+", "N", line))
    return out


@pytest.mark.parametrize(("page", "heading"), [
    ("governance.md", "## The audit witness"),
    ("operations.md", "## Verifying the audit trail"),
    ("cli.md", "### animus audit checkpoint"),
])
async def test_the_documented_witness_examples_run_as_shown(db, db_url, cli, tmp_path, page,
                                                            heading):
    """Each ``$ animus audit ...`` example of the section, run in order with a key (a shell
    redirection ``>> FILE`` appends to a file of that name here); an example that shows a
    broken chain runs after the newest two rows and their seals were deleted."""
    examples = [(args, shown) for args, shown in console_examples(page, heading)
                if args[:2] == ["audit", "checkpoint"] or "--against" in args]
    assert any("--against" in args or args[1] == "checkpoint" for args, _ in examples)
    await _work(db)
    files: dict[str, Path] = {}

    def local(path: str) -> str:
        return str(files.setdefault(path, tmp_path / Path(path).name))

    for args, expected in examples:
        if "BROKEN" in "".join(expected):
            seq, audit_id = await _head(db_url)
            await _as_superuser(db_url, f"DELETE FROM animus.audit_seal WHERE seq > {seq - 2}",
                                f"DELETE FROM animus.audit_log WHERE id > {audit_id - 2}")
        appends_to = None
        if ">>" in args:
            appends_to = local(args[args.index(">>") + 1])
            args = args[:args.index(">>")]
        if "--against" in args:
            at = args.index("--against") + 1
            args = [*args[:at], local(args[at]), *args[at + 1:]]
        code, out, err = await cli(*args, key=KEY)
        assert code == (1 if "BROKEN" in "".join(expected) else 0), out + err
        if appends_to is not None:
            _append(Path(appends_to), out)
            out = ""  # it went to the file
        for shown, here in files.items():
            out = out.replace(str(here), shown)
        assert _shape(out.splitlines()) == _shape(expected), (args, out)


async def test_a_key_that_sealed_nothing_is_reported_with_its_likely_cause(db, cli):
    """Rows sealed by engines that run without the key this process holds: the chain is
    reported broken with no row to name, and the message says what probably happened."""
    await _work(db, 1)
    await db.seal_audit()  # sealed without a key, as by an engine that has none
    code, out, _ = await cli("audit", "verify", key=KEY)
    assert code == 1
    assert out.startswith("audit chain BROKEN: no row is sealed with a key, though this "
                          "process holds one (key "), out
    assert "the engines that seal the rows run without it (give them ANIMUS_AUDIT_KEY or " \
           "ANIMUS_AUDIT_KEY_FILE)" in out
    assert "row None" not in out
    assert out.rstrip().endswith("rows verified)")
