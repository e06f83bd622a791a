"""Size limits: one submission or one hook cannot fill the database.

Before, a hook could write a 52 MB outcome (stored twice: on the item and in its audit row)
and ``source`` could be 100,000 characters. Over a limit, the value is refused with an error
naming the limit, and nothing is stored.
"""

from __future__ import annotations

import pytest

from animus_core import InvalidInput, NewWorkItem, State
from animus_core.values.errors import ConfigError
from animus_core.values.limits import Limits, clip
from tests.engine_helpers import run_engine, wait_finished, write_toml_faculty
from tests.support import counts, one_error_line, raw


async def test_params_over_the_limit_are_refused_and_nothing_is_stored(db, db_url):
    before = await counts(db_url)
    with pytest.raises(InvalidInput, match=r"^params is 2 MiB of JSON, over the limit of "
                                           r"1 MiB \(ANIMUS_MAX_PARAMS_BYTES\)"):
        await db.submit_work(NewWorkItem("x").params({"blob": "x" * (2 << 20)}))
    assert await counts(db_url) == before


@pytest.mark.parametrize("field", ["source", "trigger"])
def test_provenance_over_the_limit_is_refused(field):
    with pytest.raises(InvalidInput, match=rf"^{field} is 100000 characters long, over the "
                                           r"limit of 256 \(ANIMUS_MAX_SOURCE_CHARS\)"):
        NewWorkItem("x", **{field: "s" * 100_000})


def test_the_cli_refuses_a_long_source_in_one_line(animus):
    out = animus("work", "submit", "x", "--source", "s" * 100_000)
    assert out.returncode == 2
    assert "over the limit of 256 (ANIMUS_MAX_SOURCE_CHARS)" in one_error_line(out.stderr)


async def test_a_huge_hook_outcome_fails_the_focus_and_is_never_stored(db, db_url, tmp_path):
    toml = write_toml_faculty(tmp_path, "huge", hooks={
        "engage": "head -c 3000000 /dev/zero | tr '\\0' 'x' | sed 's/.*/\"&\"/' > engage-out.json",
    })
    async with run_engine(db_url, tmp_path / "home", faculties_dir=toml.parent):
        wid = (await db.submit_work(NewWorkItem("huge").max_attempts(1))).id
        item = await wait_finished(db, wid, timeout=30)
    assert item.state == State.DEAD
    assert "engage-out.json is 3000002 bytes, over the limit of 1048576" in (item.reason or "")
    async with raw(db_url) as conn:
        biggest = await conn.fetchval(
            "SELECT max(octet_length(payload::text)) FROM animus.audit_log WHERE work_id = $1", wid)
    assert biggest < 20_000


async def test_a_reason_over_the_limit_is_refused(db):
    created = await db.submit_work(NewWorkItem("x"))
    with pytest.raises(InvalidInput, match=r"^reason is 9000 characters long, over the limit "
                                           r"of 8000 \(ANIMUS_MAX_REASON_CHARS\)"):
        await db.cancel(created.id, "r" * 9000)
    assert (await db.get_work_item(created.id)).state == State.QUEUED


def test_reasons_animus_writes_are_cut_to_the_limit_saying_so():
    text = clip("e" * 20_000, 8000)
    assert len(text) <= 8000
    assert text.endswith("[... 12040 more characters cut]")
    assert clip("short", 8000) == "short"


def test_limits_are_settings_with_a_floor():
    assert Limits.from_env({"ANIMUS_MAX_PARAMS_BYTES": "4096"}).params_bytes == 4096
    with pytest.raises(ConfigError, match=r"ANIMUS_MAX_OUTCOME_BYTES='10' must be an integer "
                                          r"of at least 1024"):
        Limits.from_env({"ANIMUS_MAX_OUTCOME_BYTES": "10"})
