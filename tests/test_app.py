"""The application object and the testing harness (docs/python-api.md, "Running an animus";
docs/writing-faculties.md, "Testing a faculty"): the documented examples run as shown."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from animus_core import ConfigError, Faculty
from animus_core.app import Animus
from animus_core.testing import run_faculties
from tests.support import code_blocks

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(("heading", "test"), [("### Testing a faculty", "test_shout"),
                                               ("### Durable steps", "test_digest"),
                                               ("### Sleeping and waiting", "test_reminder")])
async def test_the_documented_faculty_tests_run(db_url, tmp_path, monkeypatch, heading, test):
    monkeypatch.setenv("DATABASE_URL", db_url)
    (example,) = code_blocks("writing-faculties.md", heading, "python")
    namespace: dict[str, Any] = {}
    exec(compile(example, "writing-faculties.md", "exec"), namespace)
    await namespace[test](tmp_path)


async def test_the_documented_program_runs_an_engine(db_url, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DATABASE_URL", db_url)
    monkeypatch.setenv("ANIMUS_HOME", str(tmp_path))
    monkeypatch.setenv("ANIMUS_FACULTIES", str(ROOT / "faculties"))
    monkeypatch.setenv("ANIMUS_DISABLE_PLUGIN_AUTOLOAD", "1")
    (example,) = code_blocks("python-api.md", "## Running an animus: `Animus`", "python")
    assert example.rstrip().endswith("asyncio.run(main())")
    namespace: dict[str, Any] = {}
    exec(compile(example.rstrip().removesuffix("asyncio.run(main())"), "python-api.md",
                 "exec"), namespace)
    await namespace["main"]()  # this test already runs in an event loop
    assert capsys.readouterr().out.startswith("completed {")


async def test_a_faculty_that_cannot_register_fails_the_harness(db_url, tmp_path):
    class Twin(Faculty):
        name = "twin"
        accepts = ("twin",)

    with pytest.raises(ConfigError, match="twin"):
        async with run_faculties([Twin(), Twin()], home=tmp_path, database_url=db_url):
            pass


async def test_an_animus_given_a_database_leaves_it_open(db, tmp_path):
    settings_env = {"DATABASE_URL": db.url, "ANIMUS_HOME": str(tmp_path)}
    from animus_core.infra.config import Settings

    async with Animus(Settings.from_env(settings_env), db=db) as animus:
        assert animus.db is db
    assert (await db.queues())  # still usable


async def test_parts_are_refused_before_they_exist(tmp_path):
    from animus_core.infra.config import Settings

    animus = Animus(Settings.from_env({"ANIMUS_HOME": str(tmp_path)}))
    with pytest.raises(RuntimeError, match="open the Animus first"):
        _ = animus.db
    with pytest.raises(RuntimeError, match="load the faculties first"):
        _ = animus.faculties



async def test_rules_are_read_only_when_something_needs_them(db, tmp_path):
    """A broken rules file stops what submits, and nothing else."""
    from animus_core.infra.config import Settings

    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "broken.toml").write_text("[[rule]\n")
    settings = Settings.from_env({"DATABASE_URL": db.url, "ANIMUS_HOME": str(tmp_path),
                                  "ANIMUS_RULES": str(rules)})
    async with Animus(settings, db=db) as animus:
        assert await animus.db.queues()
        with pytest.raises(ConfigError, match=r"broken\.toml: malformed TOML"):
            _ = animus.governed
