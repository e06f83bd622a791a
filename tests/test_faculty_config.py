"""Faculty settings that would break the engine are refused when the faculty is loaded.

Each numeric field has a range and each name a grammar; ``animus faculty check`` (and the
engine at start) names the file and the field. Before, ``rate_limit = -1`` passed the check
and then starved its items and the engine's fallback poll, ``timeout = 0`` or ``nan`` failed
every focus, ``retry_base < 0`` left items failed for ever, and names with spaces, 10,000
characters or a trailing newline reached the database.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

from animus_core.faculties.faculty import Faculty
from animus_core.faculties.plugins import Faculties
from animus_core.faculties.toml import load_file
from animus_core.values.errors import ConfigError
from tests.engine_helpers import run_cli, write_script

LONG = "x" * 10_000


def _toml(tmp_path: Path, faculty: str = "", engage: str = "", extra: str = "") -> Path:
    hook = write_script(tmp_path / "engage.sh", "true")
    path = tmp_path / "f.toml"
    path.write_text(f'[faculty]\nname = "f"\naccepts = ["f"]\n{faculty}\n'
                    f'[faculty.engage]\ncommand = "{hook}"\n{engage}\n{extra}')
    return path


@pytest.mark.parametrize(("faculty", "engage", "extra", "field"), [
    ("rate_limit = -1", "", "", "faculty.rate_limit = -1.0 must be a number above 0"),
    ("rate_limit = 0", "", "", "faculty.rate_limit"),
    ("rate_limit = nan", "", "", "faculty.rate_limit = nan"),
    ("timeout = 0", "", "", "faculty.timeout = 0.0 must be a number above 0"),
    ("timeout = -5", "", "", "faculty.timeout"),
    ("timeout = nan", "", "", "faculty.timeout = nan"),
    ("timeout = inf", "", "", "faculty.timeout = inf"),
    ("retry_base = -1", "", "", "faculty.retry_base = -1.0 must be a number from 0"),
    ("retry_max = 0.5\nretry_base = 2", "", "", "faculty.retry_max = 0.5 must be a number from 2"),
    ("max_attempts = -1", "", "", "faculty.max_attempts = -1 must be an integer from 1"),
    ("max_attempts = 0", "", "", "faculty.max_attempts = 0"),
    ("max_concurrent = 100000", "", "", "faculty.max_concurrent = 100000"),
    ('secrets = ["MY SECRET"]', "", "", "faculty.secrets[0]: 'MY SECRET' is not an environment"),
    (f'secrets = ["{LONG}"]', "", "", "faculty.secrets[0]"),
    ('env = ["A=B"]', "", "", "faculty.env[0]"),
    ("", "timeout = 0", "", "faculty.engage.timeout = 0.0 must be a number above 0"),
    ("", "", '[faculty.recover]\ncommand = "true"\nmax_attempts = -3',
     "faculty.recover.max_attempts = -3"),
    ("", "", '[[faculty.schedule]]\nwork_type = "f"\nevery = "10s"\npriority = 9999999999',
     "faculty.schedule[0].priority"),
    ("", "", '[[faculty.schedule]]\nwork_type = "f"\nevery = "10s"\n[faculty.schedule.params]\n'
     'n = 99999999999999999999', "faculty.schedule[0].params.n: integer too large"),
    ("", "", '[faculty.example]\nn = 99999999999999999999', "faculty.example.n: integer too large"),
])
def test_out_of_range_settings_are_refused_naming_file_and_field(tmp_path, faculty, engage,
                                                                  extra, field):
    path = _toml(tmp_path, faculty, engage, extra)
    with pytest.raises(ConfigError) as caught:
        load_file(path)
    assert str(caught.value).startswith(f"{path}: "), caught.value
    assert field in str(caught.value)
    assert LONG not in str(caught.value)  # a 10,000-character name is not echoed


@pytest.mark.parametrize(("name", "accepts"), [
    ("f", "bad type"), ("f", "ok\n"), ("f", LONG), ("bad name", "f"), ("f\n", "f"), ("f", ""),
])
def test_names_follow_the_grammar_to_the_last_character(tmp_path, name, accepts):
    hook = write_script(tmp_path / "engage.sh", "true")
    path = tmp_path / "f.toml"
    def quoted(text: str) -> str:
        return '"' + text.replace("\n", "\\n") + '"'

    path.write_text(f"[faculty]\nname = {quoted(name)}\naccepts = [{quoted(accepts)}]\n"
                    f'[faculty.engage]\ncommand = "{hook}"\n')
    with pytest.raises(ConfigError, match=r"is not a valid name|accepts is empty"):
        load_file(path)


def test_the_edges_of_each_range_are_accepted(tmp_path):
    faculty = load_file(_toml(tmp_path, "rate_limit = 0.001\ntimeout = 0.01\nretry_base = 0\n"
                                        "retry_max = 0\nmax_attempts = 1000\nmax_concurrent = 10000\n"
                                        'secrets = ["_A1"]'))
    assert faculty.rate_limit == 0.001
    assert faculty.retry_max == 0


@pytest.mark.parametrize(("attribute", "value", "field"), [
    ("rate_limit", -1.0, "Bad.rate_limit"),
    ("timeout", math.nan, "Bad.timeout"),
    ("timeout", 0.0, "Bad.timeout"),
    ("retry_base", -0.5, "Bad.retry_base"),
    ("max_attempts", 0, "Bad.max_attempts"),
    ("requires_env", ("NOT OK",), "Bad.requires_env[0]"),
    ("accepts", ("trailing\n",), "Bad.accepts[0]"),
])
def test_python_faculties_are_held_to_the_same_ranges(attribute, value, field):
    bad = type("Bad", (Faculty,), {"name": "bad", "accepts": ("bad",), attribute: value})()
    bad.origin = "tests"
    with pytest.raises(ConfigError, match="^faculty 'bad' \\(tests\\): " + re.escape(field)):
        Faculties().add(bad)


async def test_faculty_check_refuses_a_negative_rate_limit(tmp_path, cli_env):
    directory = tmp_path / "faculties"
    directory.mkdir()
    path = _toml(directory, "rate_limit = -1")
    env = {**cli_env, "ANIMUS_FACULTIES": str(directory), "ANIMUS_DISABLE_PLUGIN_AUTOLOAD": "1"}
    code, out, err = await run_cli(env, tmp_path, "faculty", "check")
    assert code == 2, out + err
    assert f"{path}: faculty.rate_limit = -1.0 must be a number above 0" in out
