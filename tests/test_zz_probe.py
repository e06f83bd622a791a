import asyncio, logging
from animus_core import NewWorkItem
from tests.engine_helpers import run_engine, wait_finished, write_toml_faculty
from tests.test_engine import Echo

async def test_echo(db, db_url, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    toml = write_toml_faculty(tmp_path, "shout", hooks={"engage": "echo 1 > engage-out.json"})
    async with run_engine(db_url, tmp_path / "home", faculties=[Echo()], faculties_dir=toml.parent) as run:
        r = await db.submit_many([NewWorkItem("shout"), NewWorkItem("echo").params({"x": 1})])
        for _ in range(12):
            await asyncio.sleep(0.25)
            for x in r:
                it = await db.get_work_item(x.id)
                print(it.work_type, it.state, it.reason, run.engine.inflight.keys(), {k: (s.dirty, s.running) for k, s in run.engine.slots.items()})
