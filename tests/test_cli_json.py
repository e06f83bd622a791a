"""``--json`` on every command that prints data: approve, reject, cancel, retry, signal,
roles, pipeline run, memory forget and faculty check lacked it."""

from __future__ import annotations

import json

from animus_core import NewWorkItem, State
from animus_core.values.waits import Wait
from tests.engine_helpers import run_cli, write_toml_faculty


async def test_commands_that_change_things_print_json_when_asked(db, cli_env, tmp_path):
    env = {**cli_env, "ANIMUS_DISABLE_PLUGIN_AUTOLOAD": "1",
           "ANIMUS_FACULTIES": str(tmp_path / "faculties"), "ANIMUS_RULES": str(tmp_path / "no")}
    write_toml_faculty(tmp_path, "ok", hooks={"engage": "true"})

    async def cli(*args: str) -> object:
        code, out, err = await run_cli(env, tmp_path, *args)
        assert code == 0, f"{args}: {out}{err}"
        return json.loads(out)

    queued = (await db.submit_work(NewWorkItem("later"))).id
    cancelled = await cli("work", "cancel", str(queued), "--json")
    assert isinstance(cancelled, dict)
    assert (cancelled["id"], cancelled["state"]) == (str(queued), "cancelled")

    await db.submit_work(NewWorkItem("waits"))
    [c] = await db.claim(work_types=["waits"], lease_seconds=60, start=True)
    await db.suspend(c.lease, Wait.for_event(1, "go"), wake_at=None)
    sent = await cli("work", "signal", str(c.item.id), "go", "--data", '{"n": 1}', "--json")
    assert isinstance(sent, dict)
    assert sent["woke"] is True

    await db.submit_work(NewWorkItem("flaky"))
    [f] = await db.claim(work_types=["flaky"], lease_seconds=60, start=True)
    await db.fail(f.lease, "boom")
    again = await cli("work", "retry", str(f.item.id), "--json")
    assert isinstance(again, dict)
    assert again["state"] == "queued"
    assert (await db.get_work_item(f.item.id)).state == State.QUEUED

    code, out, err = await run_cli(env, tmp_path, "memory", "forget",
                                   "01a23745-ce4c-73cf-aa37-6099a086fee1", "--json")
    assert code == 1, err  # not all of them were there to forget
    assert json.loads(out) == {"forgot": 0, "asked": 1}

    checked = await cli("faculty", "check", "--json")
    assert isinstance(checked, dict)
    assert sorted(f["name"] for f in checked["faculties"]) == ["ok", "pipeline"]
    assert checked["problems"] == []

    roles = await cli("roles", "setup", "--json")
    assert roles == {"roles": ["animus_reader", "animus_submitter", "animus_approver",
                               "animus_operator", "animus_admin"]}


async def test_faculty_check_names_a_tool_no_plugin_registers(cli_env, tmp_path):
    env = {**cli_env, "ANIMUS_DISABLE_PLUGIN_AUTOLOAD": "1",
           "ANIMUS_FACULTIES": str(tmp_path / "faculties")}
    path = write_toml_faculty(tmp_path, "thinker", hooks={},
                              extra='[faculty.engage]\nmodel = "claude-x"\n'
                                    'tools = ["memory_search", "nope"]\n')
    code, out, err = await run_cli(env, tmp_path, "faculty", "check", "--json")
    assert code == 2, out + err
    [problem] = json.loads(out)["problems"]
    assert problem.startswith(f"{path}: faculty.engage.tools: no tool is named 'nope' (known: ")
    assert "memory_search" in problem  # a built-in tool: known, not a problem
