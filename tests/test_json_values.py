"""One JSON value model at every edge, and an audit trail that no stored value can stop.

* whatever JSON-like value hypothesis makes (integers of any size, NaN and infinities, lone
  surrogates and NUL, deep nesting, keys that are not strings), :func:`json_values.encode`
  either refuses it with an :class:`InvalidInput` that names where it is, or returns text that
  reads back equal and has a canonical form;
* such values are refused where they enter: submit, outcomes, hook output, memory metadata,
  the command line (one line, exit 2, no traceback, the value not echoed);
* values written around animus (by hand with SQL) are sealed and verified without a crash,
  each reported as a finding, and a change to such a row is still detected.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from animus_core import InvalidInput, NewWorkItem
from animus_core.values import json_values
from animus_core.values.canonical import canonical_json
from tests.support import console_examples, one_error_line, raw

BIG = int("9" * 320)

anything_scalar = (
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
    | st.integers(min_value=2**53 - 3, max_value=2**53 + 3)
    | st.integers(min_value=-(2**53) - 3, max_value=-(2**53) + 3)
    | st.sampled_from(["\x00", "a\ud800b", "\udfff", BIG, -BIG, 10**400])
)


anything = st.recursive(
    anything_scalar,
    lambda children: st.lists(children, max_size=4) | st.tuples(children)
    | st.dictionaries(st.text(max_size=5) | st.sampled_from(["\x00k", "\ud83d"]), children,
                      max_size=4)
    | st.dictionaries(st.integers(), children, max_size=2),
    max_leaves=25,
)


def _inside(value: Any) -> bool:
    """The model, written out plainly (a reference for the property below)."""
    if value is None or isinstance(value, bool):
        return True
    if isinstance(value, int):
        return abs(value) <= 2**53 - 1
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, str):
        return "\x00" not in value and not any(0xD800 <= ord(c) <= 0xDFFF for c in value)
    if isinstance(value, list | tuple):
        return all(_inside(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _inside(k) and _inside(v) for k, v in value.items())
    return False


@settings(max_examples=500, deadline=None)
@given(anything)
def test_every_value_is_either_refused_with_its_path_or_encoded_faithfully(value: Any) -> None:
    if not _inside(value):
        with pytest.raises(InvalidInput, match=r"^params\.v"):
            json_values.encode({"v": value}, "params")
        return
    text = json_values.encode({"v": value}, "params")
    back = json.loads(text)
    assert back == json.loads(json.dumps({"v": value}))  # tuples read back as lists
    canonical_json(back)  # has an RFC 8785 form, so the audit chain can hash it


def test_depth_is_limited_and_the_limit_itself_is_fine() -> None:
    ok: Any = 0
    for _ in range(json_values.MAX_DEPTH - 1):
        ok = [ok]
    json_values.encode({"v": ok}, "params")
    deep: Any = 0
    for _ in range(5000):
        deep = {"a": deep}
    with pytest.raises(InvalidInput, match=r"^params(\.a)+: nested more than 64 levels deep"):
        json_values.encode(deep, "params")


@pytest.mark.parametrize(("value", "message"), [
    ({"n": BIG}, r"^params\.n: integer too large \(320 digits\): .* send it as a string$"),
    ({"n": 2**53}, r"^params\.n: integer too large \(16 digits\)"),
    ({"list": [1, {"x y": -BIG}]}, r'^params\.list\[1\]\["x y"\]: integer too large'),
    ({"f": float("nan")}, r"^params\.f: nan is not a JSON number"),
    ({"f": float("-inf")}, r"^params\.f: -inf is not a JSON number"),
    ({"s": "a\ud800"}, r"^params\.s: contains a lone surrogate \(\\ud800 at character 1\)"),
    ({"s": "a\x00"}, r"^params\.s: contains a NUL character"),
    ({"a\x00": 1}, r"^params \(a key\): contains a NUL character"),
    ({"k": {1: 2}}, r"^params\.k: an object key is a int"),
    ({"k": {1, 2}}, r"^params\.k: a set is not JSON"),
])
def test_refusals_name_the_path_and_never_echo_the_value(value: Any, message: str) -> None:
    with pytest.raises(InvalidInput, match=message) as caught:
        NewWorkItem("x").params(value)
    assert "999999" not in str(caught.value)


def test_the_largest_exact_integers_are_accepted() -> None:
    item = NewWorkItem("x").params({"max": 2**53 - 1, "min": -(2**53 - 1)})
    assert item.to_json()["params"] == {"max": 2**53 - 1, "min": -(2**53 - 1)}


def test_decode_refuses_numbers_beyond_a_double_and_deep_documents() -> None:
    with pytest.raises(InvalidInput, match=r"^out\.json is not valid JSON: a number beyond"):
        json_values.decode(b'{"a": 1e400}', "out.json")
    with pytest.raises(InvalidInput, match=r"^out\.json\.a: integer too large"):
        json_values.decode(b'{"a": ' + b"9" * 320 + b"}", "out.json")
    with pytest.raises(InvalidInput, match=r"^out\.json is nested more than 64 levels deep"):
        json_values.decode(b"[" * 5000 + b"]" * 5000, "out.json")
    with pytest.raises(InvalidInput, match=r"^out\.json(\[0\])+: nested more than 64"):
        json_values.decode(b"[" * 100 + b"]" * 100, "out.json")


# -- at the edges, through the real entry points ------------------------------------------------


async def test_submit_refuses_a_big_integer_and_stores_nothing(db, db_url):
    from tests.support import counts

    before = await counts(db_url)
    with pytest.raises(InvalidInput, match=r"^params\.n: integer too large \(320 digits\)"):
        await db.submit_work(NewWorkItem("x").params({"n": BIG}))
    assert await counts(db_url) == before


@pytest.mark.parametrize(("args", "message"), [
    (["-p", f"n={BIG}"], "params.n: integer too large (320 digits)"),
    (["--params", "[" * 5000 + "]" * 5000], "is nested more than 64 levels deep"),
    (["--params", '{"s": "\\ud800"}'], "params.s: contains a lone surrogate"),
    (["--params", '{"n": 1e400}'], "a number beyond the range of a double"),
    (["--dedup-key", ""], "dedup key '' must be a non-empty string"),
])
def test_the_cli_refuses_bad_params_in_one_line(animus, args, message):
    out = animus("work", "submit", "x", *args)
    assert out.returncode == 2, out.stderr
    line = one_error_line(out.stderr)
    assert message in line
    assert "9999999999" not in line


def test_the_cli_accepts_the_lowest_priority(animus):
    out = animus("work", "submit", "x", "--priority", str(-(2**31)), "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["item"]["priority"] == -(2**31)
    out = animus("work", "submit", "x", "--priority", str(2**31))
    assert out.returncode == 2
    assert "priority must be an integer from -2147483648 to 2147483647" in one_error_line(out.stderr)


async def test_an_outcome_outside_the_model_fails_the_focus_with_its_path(db, db_url, tmp_path):
    from animus_core.faculties.faculty import Faculty
    from tests.engine_helpers import run_engine, wait_finished

    class Big(Faculty):
        name = "big"
        accepts = ("big",)

        async def consolidate(self, focus: Any, engaged: Any) -> Any:
            return {"n": BIG}

    async with run_engine(db_url, tmp_path, faculties=[Big()]):
        result = await db.submit_work(NewWorkItem("big").max_attempts(1))
        item = await wait_finished(db, result.id)
    assert item.state == "dead"
    assert "outcome.n: integer too large (320 digits)" in (item.reason or "")


async def test_memory_metadata_outside_the_model_is_refused(db):
    from animus_core.faculties.embedders import HashingEmbedder
    from animus_core.store.memory import Memory

    memory = await Memory.open(db, HashingEmbedder())
    with pytest.raises(InvalidInput, match=r"metadata\.n: integer too large"):
        await memory.store("text", metadata={"n": BIG})


# -- the audit trail survives values written around animus --------------------------------------


async def _insert_raw(db_url: str, params_json: str) -> Any:
    async with raw(db_url) as conn:
        return await conn.fetchval(
            "SELECT id FROM animus.submit('work', jsonb_build_array(jsonb_build_object("
            "'work_type', 'x', 'source', 'psql', 'params', $1::text::jsonb)))", params_json)


@pytest.mark.parametrize("params", [
    '{"n": ' + "9" * 320 + "}",
    '{"n": 1e400}',
    '{"n": -1e-400}',
    '{"n": 123456789012345678901234567890.5}',
    "[" * 2000 + "]" * 2000,
])
async def test_the_sealer_and_verify_never_die_on_a_row_the_database_accepted(db, db_url, params):
    params = params if params.startswith("{") else '{"deep": ' + params + "}"
    await _insert_raw(db_url, params)
    await db.submit_work(NewWorkItem("after").params({"ok": 1}))  # the chain goes on after it
    assert await db.seal_audit() >= 2
    result = await db.verify_audit()
    assert result.ok, result
    assert result.unsealed == 0
    if "e-400" in params or ".5}" in params:  # inside a double's range: canonical as usual
        assert result.findings_total == 0
    else:
        assert result.findings_total == 1
        assert "hashed as stored" in result.findings[0]


async def test_a_row_hashed_as_stored_is_still_tamper_evident(db, db_url, animus):
    work_id = await _insert_raw(db_url, '{"n": ' + "9" * 320 + "}")
    await db.seal_audit()
    out = animus("audit", "verify")
    assert out.returncode == 0, out.stderr
    assert "audit chain intact" in out.stdout
    assert "1 rows hold JSON that animus's value model excludes" in out.stdout
    async with raw(db_url) as conn:
        await conn.execute("SET session_replication_role = replica")
        await conn.execute(
            """UPDATE animus.audit_log
                  SET payload = jsonb_set(payload, '{params,n}', ('8' || repeat('9', 319))::jsonb)
                WHERE work_id = $1""", work_id)
    out = animus("audit", "verify")
    assert out.returncode == 1
    assert "was changed after it was sealed" in out.stdout


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=anything)
async def test_whatever_postgres_accepts_the_chain_seals_and_verifies(db, db_url, value):
    """The strongest form of the promise: any JSON text Postgres takes as jsonb, written
    around animus, is sealed and verified without an exception."""
    try:
        text = json.dumps({"v": value}, allow_nan=True)
    except (ValueError, TypeError):
        return
    text = text.replace("NaN", "1e400").replace("Infinity", "1e400")
    try:
        await _insert_raw(db_url, text)
    except Exception:  # Postgres refused it (NUL, surrogates): nothing stored, nothing to seal
        return
    await db.seal_audit()
    assert (await db.verify_audit()).ok


# -- the documented examples, run ------------------------------------------------------------


def _shape(lines: list[str]) -> list[str]:
    return [re.sub(r"\d+", "N", line) for line in lines]


async def test_the_documented_examples_run_as_shown(db, db_url, animus):
    submit, verify = console_examples("concepts.md", "### Names, JSON values and limits") + \
        [e for e in console_examples("concepts.md", "## The audit trail")
         if any("values model" in line or "value model" in line for line in e[1])]
    out = animus(*submit[0])
    assert out.returncode == 2
    assert out.stderr.splitlines() == submit[1]
    await _insert_raw(db_url, '{"n": ' + "9" * 320 + "}")
    out = animus(*verify[0])
    assert out.returncode == 0, out.stderr
    assert _shape(out.stdout.splitlines()) == _shape(verify[1])


async def test_memory_text_with_a_lone_surrogate_is_refused_by_name(db):
    from animus_core.faculties.embedders import HashingEmbedder
    from animus_core.store.memory import Memory

    memory = await Memory.open(db, HashingEmbedder())
    with pytest.raises(InvalidInput, match=r"^the memory: content: contains a lone surrogate"):
        await memory.store("secret\udcffvalue")
    with pytest.raises(InvalidInput, match=r"^query: contains a lone surrogate"):
        await memory.search("secret\udcffvalue")


async def test_a_value_the_driver_cannot_send_is_not_echoed(db):
    """asyncpg's own message repeats the argument (which may be a secret); ours names the
    argument and the reason only."""
    with pytest.raises(InvalidInput) as caught:
        await db.list_work(work_type="hunter2secret\udcff")
    assert "hunter2secret" not in str(caught.value)
    assert "argument $2" in str(caught.value)
    assert "surrogates not allowed" in str(caught.value)


async def test_memory_errors_name_the_memory_and_its_id_as_a_memory_id(db):
    from animus_core.faculties.embedders import HashingEmbedder
    from animus_core.store.memory import Memory, NewMemory

    memory = await Memory.open(db, HashingEmbedder())
    with pytest.raises(InvalidInput, match=r"^the memory: memory_type 'Bad' must be"):
        await memory.store("x", memory_type="Bad")
    with pytest.raises(InvalidInput, match=r"^memory 1: memory_type 'Bad' must be"):
        await memory.store_many([NewMemory(content="a"), NewMemory(content="b",
                                                                    memory_type="Bad")])
    with pytest.raises(InvalidInput, match=r"^id 'notauuid' is not a memory id \(a UUID\)$"):
        await memory.forget(["notauuid"])
