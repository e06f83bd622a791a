"""Execution records through a real engine, read back with the real ``animus work`` command.

The engine runs in this event loop (:func:`tests.engine_helpers.run_engine`) with TOML
faculties whose phases are bash scripts; ``animus work explain|diff|rerun`` run as
subprocesses (without blocking the loop, so the engine keeps working while ``rerun``
waits). Faculties:

* ``stamp``: orient, engage and consolidate hooks; its outcome is always ``{"answer": 42}``;
* ``dice``: engage writes a random number and the time: the same inputs, another output;
* ``flaky``: engage prints an error and exits 4; two attempts.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import AsyncIterator
from importlib import metadata
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from animus_core import Created, NewWorkItem, State, __version__
from animus_core.store.db import Db
from animus_core.values.canonical import canonical_hash
from animus_core.values.records import environment, file_digest, name_and_version
from tests.conftest import ROOT
from tests.engine_helpers import (
    RunningEngine,
    run_cli,
    run_engine,
    wait_finished,
    wait_until,
    write_toml_faculty,
)
from tests.support import raw

STAMP_HOOKS = {
    "orient": "echo '{\"oriented\": true}' > orient-out.json",
    "engage": "echo '{\"answer\": 42}' > engage-out.json",
    "consolidate": "cp engage-out.json consolidate-out.json",
}


@pytest.fixture
def faculties(tmp_path: Path) -> Path:
    write_toml_faculty(tmp_path, "stamp", hooks=STAMP_HOOKS)
    write_toml_faculty(tmp_path, "dice", hooks={"engage": """
        echo "{\\"roll\\": $RANDOM$RANDOM, \\"at\\": \\"$(date +%s%N)\\"}" > engage-out.json
    """})
    write_toml_faculty(tmp_path, "flaky", fields={"max_attempts": 2, "retry_base": 0.05},
                       hooks={"engage": """
        echo "the disk is on fire" >&2
        exit 4
    """})
    return tmp_path / "faculties"


@pytest.fixture
async def engine(db_url: str, tmp_path: Path, faculties: Path) -> AsyncIterator[RunningEngine]:
    async with run_engine(db_url, tmp_path / "home", faculties_dir=faculties) as running:
        yield running


@pytest.fixture
def env(cli_env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    # the CLI finds no rules/ directory in tmp_path: everything is allowed
    return {**cli_env, "ANIMUS_HOME": str(tmp_path / "home")}


async def animus(env: dict[str, str], cwd: Path, *args: str) -> str:
    code, out, err = await run_cli(env, cwd, *args)
    assert code == 0, f"animus {' '.join(args)}: exit {code}\n{out}\n{err}"
    assert "Traceback" not in err, err
    return out


async def run(db: Db, work_type: str, params: dict[str, Any] | None = None) -> Any:
    result = await db.submit_work(NewWorkItem(work_type, source="test").params(params or {}))
    assert isinstance(result, Created)
    return await wait_finished(db, result.id)


def hook(root: Path, faculty: str, phase: str) -> Path:
    return root / "hooks" / f"{faculty}-{phase}.sh"


# -- explain ------------------------------------------------------------------------------------


async def test_explain_shows_every_input_an_attempt_was_bound_to(db, engine, env, tmp_path):
    params = {"text": "caf\u00e9", "n": 3}
    item = await run(db, "stamp", params)
    assert item.state == State.COMPLETED, item.reason

    out = await animus(env, tmp_path, "work", "explain", str(item.id))
    assert f"{item.id}  stamp  completed  (1 attempts recorded)" in out
    assert "attempt 1: completed" in out
    params_hash = canonical_hash(params, nfc=True)
    assert f"params        {params_hash}" in out
    toml = tmp_path / "faculties" / "stamp.toml"
    assert f"faculty       {toml} {file_digest(toml)}" in out
    for phase in ("orient", "engage", "consolidate"):
        script = hook(tmp_path, "stamp", phase)
        assert f"{phase:12}{script}  {file_digest(script)}" in out, (phase, out)
    assert f"engine        animus {__version__}" in out
    env_hash, environment_now = environment()
    assert f"environment   {env_hash}  Python {environment_now['python']} on " in out
    assert f"{len(environment_now['distributions'])} distributions" in out
    assert "models        none" in out
    assert f"outcome       {canonical_hash({'answer': 42}, nfc=True)}" in out

    data = json.loads(await animus(env, tmp_path, "work", "explain", str(item.id), "--json"))
    (record,) = data["records"]
    assert record["params_hash"] == params_hash
    assert record["result"] == "completed"
    assert record["attempt"] == 1
    assert record["faculty"]["kind"] == "toml"
    assert set(record["faculty"]["hooks"]) == {"orient", "engage", "consolidate"}
    assert record["faculty_hash"] == canonical_hash(record["faculty"])
    assert record["engine_version"] == __version__
    assert record["environment_hash"] == env_hash
    assert record["environment"]["distributions"]["asyncpg"] == \
        environment_now["distributions"]["asyncpg"]
    assert record["error"] is None


# -- rerun: identical, changed inputs, nondeterministic ----------------------------------------


async def test_rerun_says_identical_then_names_a_changed_hook(db, engine, env, tmp_path):
    first = await run(db, "stamp", {"n": 1})
    assert first.state == State.COMPLETED

    out = await animus(env, tmp_path, "work", "rerun", str(first.id), "--timeout", "30")
    assert "identical: same inputs, same output" in out, out
    rerun_id = out.split()[1].rstrip(":")
    rerun = await db.get_work_item(rerun_id)
    assert rerun.replay_of == first.id
    assert rerun.params == first.params
    assert rerun.state == State.COMPLETED

    # a new version of the engage script, with the same output
    engage = hook(tmp_path, "stamp", "engage")
    old_digest = file_digest(engage)
    engage.write_text(engage.read_text() + "\n# reformatted, same output\n")
    new_digest = file_digest(engage)
    assert new_digest != old_digest

    data = json.loads(await animus(env, tmp_path, "work", "rerun", str(first.id), "--json"))
    assert data["verdict"] == "changed inputs: faculty.hooks.engage.sha256 (output unchanged)"
    assert data["differences"] == {
        "faculty.hooks.engage.sha256": {"a": old_digest, "b": new_digest}}
    out = await animus(env, tmp_path, "work", "rerun", str(first.id))
    assert "changed inputs: faculty.hooks.engage.sha256 (output unchanged)" in out
    assert f"faculty.hooks.engage.sha256: {old_digest} -> {new_digest}" in out


async def test_diff_shows_a_changed_hook_script_as_a_unified_diff(db, db_url, engine, env,
                                                                  tmp_path):
    first = await run(db, "stamp", {"n": 1})
    engage = hook(tmp_path, "stamp", "engage")
    before, old_digest = engage.read_text(), file_digest(engage)
    engage.write_text(before.replace('"answer": 42', '"answer": 43'))
    assert engage.read_text() != before
    second = await run(db, "stamp", {"n": 1})
    assert second.outcome.data == {"answer": 43}

    # the engine keeps each version's text once, in the background of the attempt
    async def kept() -> bool:
        async with raw(db_url) as conn:
            return bool(await conn.fetchval(
                "SELECT count(*) = 2 FROM animus.faculty_files WHERE sha256 = ANY($1)",
                [old_digest, file_digest(engage)]))
    await wait_until(kept, 10, message="both versions of the script kept")

    out = await animus(env, tmp_path, "work", "diff", str(first.id), str(second.id))
    path = str(engage.resolve()).lstrip("/")
    assert f"--- a/{path}\n+++ b/{path}\n" in out, out
    assert "\n-echo '{\"answer\": 42}' > engage-out.json\n" in out, out
    assert "\n+echo '{\"answer\": 43}' > engage-out.json\n" in out, out

    data = json.loads(await animus(env, tmp_path, "work", "diff", str(first.id), str(second.id),
                                   "--json"))
    assert set(data["files"]) == {"faculty.hooks.engage.sha256"}
    assert "+echo '{\"answer\": 43}'" in data["files"]["faculty.hooks.engage.sha256"]

    # a version whose text was not kept (gone from the table as on an older database) says so
    async with raw(db_url) as conn:
        await conn.execute("ALTER TABLE animus.faculty_files DISABLE TRIGGER USER")
        await conn.execute("DELETE FROM animus.faculty_files")
    out = await animus(env, tmp_path, "work", "diff", str(first.id), str(second.id))
    assert "faculty.hooks.engage.sha256: the text of one version was not kept" in out


async def test_rerun_of_a_nondeterministic_faculty_says_so(db, engine, env, tmp_path):
    first = await run(db, "dice")
    assert first.state == State.COMPLETED, first.reason
    data = json.loads(await animus(env, tmp_path, "work", "rerun", str(first.id), "--json"))
    # the values that differ are named, not only their hash
    assert data["verdict"] == ("nondeterministic: same inputs, different output "
                               "(outcome.at, outcome.roll)"), data
    rerun = await db.get_work_item(data["rerun_id"])
    assert data["differences"] == {
        f"outcome.{k}": {"a": first.outcome.data[k], "b": rerun.outcome.data[k]}
        for k in ("at", "roll")}


async def test_rerun_refuses_an_unfinished_item(db, env, tmp_path):
    queued = await db.submit_work(NewWorkItem("stamp", source="test"))
    code, _out, err = await run_cli(env, tmp_path, "work", "rerun", str(queued.id))
    assert code != 0
    assert "is queued: rerun a finished item" in err


# -- diff ---------------------------------------------------------------------------------------


async def test_diff_names_the_params_that_differ(db, engine, env, tmp_path):
    a = await run(db, "stamp", {"n": 1, "label": "x", "cfg": {"lr": 0.1, "depth": 3}})
    b = await run(db, "stamp", {"n": 2, "label": "x", "cfg": {"lr": 0.2, "depth": 3},
                                "extra": True})
    out = await animus(env, tmp_path, "work", "diff", str(a.id), str(b.id))
    lines = out.splitlines()
    # both sides named in full (uuid7 ids of items made together share their first digits)
    assert lines[0] == f"a: {a.id} (completed, attempt 1)"
    assert lines[1] == f"b: {b.id} (completed, attempt 1)"
    assert lines[2] == ("changed inputs: params.cfg.lr, params.extra, params.n "
                        "(output unchanged)"), out
    assert lines[3:6] == ["  params.cfg.lr", "    a: 0.1", "    b: 0.2"]
    assert "label" not in out
    assert "depth" not in out
    data = json.loads(await animus(env, tmp_path, "work", "diff", str(a.id), str(b.id), "--json"))
    assert data["differences"] == {"params.cfg.lr": {"a": 0.1, "b": 0.2},
                                   "params.extra": {"a": None, "b": True},
                                   "params.n": {"a": 1, "b": 2}}


async def test_diff_of_equal_params_spelled_differently_is_identical(db, engine, env, tmp_path):
    # key order, 1 vs 1.0, composed vs decomposed accents: the same params (NFC, RFC 8785)
    a = await run(db, "stamp", {"name": "caf\u00e9", "n": 1, "z": [1.5]})
    b = await run(db, "stamp", {"z": [1.5], "n": 1.0, "name": "cafe\u0301"})
    assert a.params != b.params
    data = json.loads(await animus(env, tmp_path, "work", "diff", str(a.id), str(b.id), "--json"))
    assert data == {"a": str(a.id), "b": str(b.id),
                    "verdict": "identical: same inputs, same output", "differences": {},
                    "files": {}}


async def test_diff_of_different_work_types(db, engine, env, tmp_path):
    a = await run(db, "stamp")
    b = await run(db, "dice")
    data = json.loads(await animus(env, tmp_path, "work", "diff", str(a.id), str(b.id), "--json"))
    assert data["verdict"].startswith("changed inputs: work_type, ")
    assert data["differences"]["work_type"] == {"a": "stamp", "b": "dice"}
    assert "faculty.file" in data["differences"]
    assert any(k == "outcome_hash" or k.startswith("outcome") for k in data["differences"])


async def test_diff_of_an_item_that_never_ran_is_an_error(db, engine, env, tmp_path):
    done = await run(db, "stamp")
    waiting = await db.submit_work(NewWorkItem("nobody-accepts-this", source="test"))
    code, _out, err = await run_cli(env, tmp_path, "work", "diff", str(done.id), str(waiting.id))
    assert code != 0
    assert f"work item {waiting.id} (queued) has no execution record yet" in err


# -- failures, storage --------------------------------------------------------------------------


async def test_a_failed_attempt_is_recorded_with_its_error(db, engine, env, tmp_path):
    item = await run(db, "flaky")
    assert item.state == State.DEAD
    records = await db.executions(item.id)
    assert [(r.attempt, r.result) for r in records] == [(1, "failed"), (2, "failed")]
    for r in records:
        assert r.error is not None
        assert "the disk is on fire" in r.error
        assert "exited with status 4" in r.error
        assert r.outcome_hash is None
        assert r.faculty["hooks"]["engage"]["sha256"] == file_digest(hook(tmp_path, "flaky",
                                                                          "engage"))
    out = await animus(env, tmp_path, "work", "explain", str(item.id))
    assert "attempt 1: failed" in out
    assert "attempt 2: failed" in out
    assert "error         engage hook" in out
    assert "the disk is on fire" in out


async def test_execution_records_are_append_only(db, db_url, engine):
    item = await run(db, "stamp")
    assert item.state == State.COMPLETED
    async with raw(db_url) as conn:
        assert await conn.fetchval("SELECT count(*) FROM animus.execution_records") == 1
        for sql in ("UPDATE animus.execution_records SET result = 'failed'",
                    "UPDATE animus.execution_records SET params_hash = 'sha256:forged'",
                    "DELETE FROM animus.execution_records",
                    "TRUNCATE animus.execution_records",
                    "UPDATE animus.environments SET environment = '{}'",
                    "DELETE FROM animus.environments"):
            with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
                await conn.execute(sql)
        assert await conn.fetchval("SELECT count(*) FROM animus.execution_records") == 1
        assert await conn.fetchval("SELECT result FROM animus.execution_records") == "completed"


async def test_the_environment_is_stored_once(db, db_url, tmp_path, faculties):
    home = tmp_path / "home"
    for _ in range(2):  # two engine runs, several attempts each, one environment
        async with run_engine(db_url, home, faculties_dir=faculties):
            for work_type in ("stamp", "stamp", "dice"):
                assert (await run(db, work_type)).state == State.COMPLETED
    env_hash, env_now = environment()
    async with raw(db_url) as conn:
        rows = await conn.fetch("SELECT hash, environment FROM animus.environments")
        assert [r["hash"] for r in rows] == [env_hash]
        assert json.loads(rows[0]["environment"]) == env_now
        used = await conn.fetch(
            "SELECT environment_hash, count(*) AS n FROM animus.execution_records GROUP BY 1")
        assert [(r["environment_hash"], r["n"]) for r in used] == [(env_hash, 6)]
        # the record rows carry the hash only, not the (large) environment itself
        columns = {r[0] for r in await conn.fetch(
            """SELECT column_name FROM information_schema.columns
                WHERE table_schema = 'animus' AND table_name = 'execution_records'""")}
        assert "environment" not in columns
        assert "environment_hash" in columns


def test_root_has_no_rules_directory() -> None:
    # the engines here load rules from ./rules (ANIMUS_RULES's default): there must be none
    assert not (ROOT / "rules").exists()


# -- file digests and hook identity --------------------------------------------------------------


def test_a_hook_run_by_an_interpreter_is_identified_by_its_script(tmp_path: Path) -> None:
    """For `bash /abs/script.sh` the executable is bash: the script an absolute argument
    names is in the identity too, so editing it shows up in the next record."""
    from animus_core.faculties.toml import load_file

    script = tmp_path / "engage.sh"
    script.write_text("echo '{}' > engage-out.json\n")
    toml = tmp_path / "interp.toml"
    toml.write_text(f'[faculty]\nname = "interp"\naccepts = ["interp"]\n'
                    f'[faculty.engage]\ncommand = "bash {script}"\n')
    hook = load_file(toml).identity()["hooks"]["engage"]
    assert hook["command"].endswith(f"bash {script}")
    assert hook["sha256"] == file_digest(Path(hook["command"].split()[0]))  # bash itself
    assert hook["files"] == {str(script): file_digest(script)}
    script.write_text("echo '{\"v\": 2}' > engage-out.json\n")
    assert load_file(toml).identity()["hooks"]["engage"]["files"][str(script)] != \
        hook["files"][str(script)]


def test_a_settled_file_is_hashed_once_and_a_changed_one_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from animus_core.values import records

    monkeypatch.setattr(records, "_SETTLED_NS", 0)  # every file counts as settled
    path = tmp_path / "big"
    path.write_bytes(b"x" * 1000)
    first = file_digest(path)
    reads: list[Path] = []
    real = Path.read_bytes

    def counting(self: Path) -> bytes:
        reads.append(self)
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", counting)
    assert file_digest(path) == first
    assert reads == []  # remembered
    path.write_bytes(b"y" * 1001)
    assert file_digest(path) != first
    assert reads == [path]


def test_a_file_changed_moments_ago_is_not_remembered(tmp_path: Path) -> None:
    """Two edits within one timestamp tick, same size: the second must still be seen."""
    path = tmp_path / "racy"
    path.write_bytes(b"aaaa")
    first = file_digest(path)
    path.write_bytes(b"bbbb")
    assert file_digest(path) != first


# -- the environment's distributions ---------------------------------------------------------


def test_every_installed_distribution_reads_as_its_metadata_parser_reads_it() -> None:
    dists = list(metadata.distributions())
    assert len(dists) > 20
    for dist in dists:
        assert name_and_version(dist) == (dist.metadata["Name"], dist.version), dist._path  # type: ignore[attr-defined]


_KEYS = st.sampled_from(["Name", "Version", "Name", "Version", "name", "VERSION", "Summary",
                         "Metadata-Version", "From ", "Name ", " Name", ""])
_VALUES = st.one_of(st.sampled_from(["", " 1.0", "\tx ", " a b  ", ":", " é\x0b"]),
                    st.text(st.characters(exclude_characters="\r\n", exclude_categories=["Cs"]),
                            max_size=12))


@settings(max_examples=400)
@given(headers=st.lists(st.tuples(_KEYS, _VALUES, st.booleans()), max_size=6),
       breaks=st.sampled_from(["\n", "\r\n", "\r"]),
       body=st.sampled_from(["", "\n", "\nName: other\nVersion: 9\n", "\n\nVersion: 8"]))
def test_name_and_version_read_as_the_email_parser_reads_them(
        headers: list[tuple[str, str, bool]], breaks: str, body: str) -> None:
    lines = []
    for key, value, folded in headers:
        lines.append(f"{key}:{value}" if key else value)
        if folded:
            lines.append(" goes on")
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "METADATA").write_text(breaks.join(lines) + body.replace("\n", breaks),
                                         encoding="utf-8", newline="")
        dist = metadata.PathDistribution(Path(tmp))
        assert name_and_version(dist) == (dist.metadata["Name"], dist.version)
