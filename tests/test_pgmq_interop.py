"""animus's queues are real pgmq queues: the official ``pgmq`` client reads them, given the
connection parts ``animus db url --format json|pgmq`` prints (docs/operations.md, Reading the
queues with other pgmq clients). A read only hides a message for its visibility timeout; the
item is then claimed as ever."""

from __future__ import annotations

import asyncio
import json
import time
import uuid

import pytest
from pgmq import PGMQueue

from animus_core import NewWorkItem, State
from tests.engine_helpers import run_cli


@pytest.mark.filterwarnings("ignore:list_queues\\(\\) now returns:UserWarning")
async def test_the_pgmq_client_reads_a_message_and_the_work_still_runs(db, cli_env, tmp_path):
    code, out, err = await run_cli(cli_env, tmp_path, "db", "url", "--format", "json")
    assert code == 0, err
    parts = json.loads(out)
    code, out, err = await run_cli(cli_env, tmp_path, "db", "url", "--format", "pgmq")
    assert code == 0, err
    assert f"export PG_DATABASE={parts['database']}" in out.splitlines()
    assert "export PG_INIT_EXTENSION=false" in out.splitlines()

    item = (await db.submit_work(NewWorkItem("report").priority(3))).id
    # the client as it comes, but with conn_string="" (it would read DATABASE_URL, which
    # it cannot parse for a unix socket) and without CREATE EXTENSION (the SQL-only install)
    queue = PGMQueue(conn_string="", host=parts["host"], port=parts["port"],
                     database=parts["database"], username=parts["username"],
                     password=parts["password"] or "postgres", init_extension=False)

    def read() -> object:
        try:
            assert "work" in [q.queue_name for q in queue.list_queues()]
            return queue.read("work", vt=1)
        finally:
            queue.close()

    message = await asyncio.to_thread(read)
    assert message is not None
    body = message.message  # type: ignore[attr-defined]
    assert body == {"id": str(item), "t": "report", "p": 3}  # the documented message body
    assert message.read_ct == 1  # type: ignore[attr-defined]
    # hidden for the read's visibility timeout; the item is still queued, and claimed after
    assert await db.claim(work_types=["report"], lease_seconds=30, start=True) == []
    deadline = time.monotonic() + 10
    while not (claimed := await db.claim(work_types=["report"], lease_seconds=30, start=True)):
        assert time.monotonic() < deadline, "the message never came back"
        await asyncio.sleep(0.2)
    assert claimed[0].item.id == item
    assert claimed[0].lease.token == 2  # the read counted
    await db.complete(claimed[0].lease, None)
    assert (await db.get_work_item(item)).state == State.COMPLETED


async def test_a_message_sent_around_animus_runs_nothing(db):
    """A message that names no work item is archived by the claim that finds it."""
    async with db.connection() as conn:
        await conn.execute("SELECT pgmq.send('work', jsonb_build_object('id', $1::text, "
                           "'t', 'report', 'p', 0))", str(uuid.uuid4()))
    assert await db.claim(work_types=["report"], lease_seconds=30, start=True) == []
    async with db.connection() as conn:
        assert await conn.fetchval('SELECT count(*) FROM pgmq."q_work"') == 0
        assert await conn.fetchval('SELECT count(*) FROM pgmq."a_work"') == 1
