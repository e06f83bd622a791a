"""``animus work list``: paging that says more exist, and filters by source, age and
excluded types."""

from __future__ import annotations

import json

from animus_core import NewWorkItem
from tests.engine_helpers import run_cli


async def test_work_list_pages_say_more_exist_and_filter(db, cli_env, tmp_path):
    await db.submit_many([NewWorkItem("a", source="cron").params({"i": i}) for i in range(5)])
    await db.submit_many([NewWorkItem("b", source="web").params({"i": i}) for i in range(3)])
    async with db.connection() as conn:  # one old item
        await conn.execute("ALTER TABLE animus.work_items DISABLE TRIGGER USER")
        try:
            await conn.execute("UPDATE animus.work_items SET created_at = now() - "
                               "interval '3 days' WHERE work_type = 'b' AND params->>'i' = '0'")
        finally:
            await conn.execute("ALTER TABLE animus.work_items ENABLE TRIGGER USER")

    async def cli(*args: str) -> tuple[str, str]:
        code, out, err = await run_cli(cli_env, tmp_path, "work", "list", *args)
        assert code == 0, err
        return out, err

    out, _ = await cli("--limit", "3")
    rows = [line for line in out.splitlines()[1:] if not line.startswith("(")]
    assert len(rows) == 3
    last = rows[-1].split()[0]
    assert out.splitlines()[-1] == f"(more exist: the next 3 with --before {last})"
    out, _ = await cli("--limit", "10")
    assert "more exist" not in out
    assert len(out.splitlines()) == 9
    out, err = await cli("--limit", "2", "--json")
    assert len(json.loads(out)) == 2
    assert err.startswith("more items exist: the next page is --before ")

    out, _ = await cli("--source", "web", "--json")
    assert sorted(i["params"]["i"] for i in json.loads(out)) == [0, 1, 2]
    out, _ = await cli("--exclude-type", "a", "--since", "1d", "--json")
    assert sorted((i["work_type"], i["params"]["i"]) for i in json.loads(out)) == [
        ("b", 1), ("b", 2)]
    out, _ = await cli("--exclude-type", "a", "--exclude-type", "b", "--json")
    assert json.loads(out) == []
    code, out, err = await run_cli(cli_env, tmp_path, "work", "list", "--since", "yesterday")
    assert code == 2
    assert "'yesterday' is neither an ISO time" in err
    code, out, err = await run_cli(cli_env, tmp_path, "work", "list", "--limit", "0")
    assert code == 2
    assert "is not a page size from 1 to 10000" in err
