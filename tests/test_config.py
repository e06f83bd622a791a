"""Configuration from the environment (docs/configuration.md): wrong settings are one clear line."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from animus_core import ConfigError
from animus_core.infra import loop
from animus_core.infra.config import Settings
from animus_core.infra.loop import loop_factory, loop_name
from tests.conftest import ROOT
from tests.support import one_error_line

UNREACHABLE = "postgresql://nobody:secret@127.0.0.1:1/x"


@pytest.fixture
def run_with(tmp_path: Path) -> Callable[..., subprocess.CompletedProcess[str]]:
    """Run ``animus`` with some environment variables set. Without a DATABASE_URL of its own
    it gets an unreachable one, so a setting that is not checked fails differently."""
    base = {k: v for k, v in os.environ.items()
            if k not in ("DATABASE_URL", "LOG_LEVEL") and not k.startswith("PYTEST")}

    def run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "animus_core", *args],
            env={**base, "ANIMUS_HOME": str(tmp_path / "home"), "DATABASE_URL": UNREACHABLE,
                 **env},
            capture_output=True, text=True, timeout=60, cwd=ROOT,
        )

    return run


def test_unreachable_server_is_one_line_naming_the_host(run_with):
    proc = run_with({}, "work", "list")
    assert proc.returncode != 0
    line = one_error_line(proc.stderr)
    assert "127.0.0.1" in line
    assert "secret" not in line  # the password is never printed
    assert "DATABASE_URL" in line  # and it says what to check
    assert proc.stdout == ""


@pytest.mark.parametrize(
    "url", ["mysql://root@localhost/db", "localhost:5432", "http://127.0.0.1:5432/x"]
)
def test_database_url_that_is_not_postgres_is_a_config_error(run_with, url):
    proc = run_with({"DATABASE_URL": url}, "work", "list")
    assert proc.returncode == 2
    line = one_error_line(proc.stderr)
    assert "DATABASE_URL" in line
    assert "postgresql://" in line


def test_bogus_log_level_is_a_config_error(run_with):
    proc = run_with({"LOG_LEVEL": "bogus"}, "work", "list")
    assert proc.returncode == 2
    line = one_error_line(proc.stderr)
    assert "LOG_LEVEL" in line
    assert "bogus" in line
    assert "debug" in line
    assert "info" in line


def test_settings_from_env():
    s = Settings.from_env({"ANIMUS_HOME": "/tmp/h", "LOG_LEVEL": " WARNING "})
    assert (s.database_url, s.log_level, s.home) == (None, "warning", Path("/tmp/h"))
    s = Settings.from_env({"ANIMUS_HOME": "/tmp/h", "DATABASE_URL": "postgres://u@h/d"})
    assert s.database_url == "postgres://u@h/d"
    assert s.log_level == "info"
    assert Settings.from_env({"ANIMUS_HOME": "/h", "DATABASE_URL": ""}).database_url is None
    with pytest.raises(ConfigError, match="LOG_LEVEL"):
        Settings.from_env({"LOG_LEVEL": "loud"})
    with pytest.raises(ConfigError, match="DATABASE_URL"):
        Settings.from_env({"DATABASE_URL": "sqlite:///x.db"})


def test_a_metric_interval_that_is_not_milliseconds_is_a_config_error(run_with):
    proc = run_with({"OTEL_METRIC_EXPORT_INTERVAL": "10s"}, "work", "list")
    assert proc.returncode == 2
    line = one_error_line(proc.stderr)
    assert "OTEL_METRIC_EXPORT_INTERVAL='10s' must be a positive integer" in line
    env = {"ANIMUS_HOME": "/tmp/h"}
    assert Settings.from_env(env).metric_interval_ms == 10_000
    assert Settings.from_env({**env, "OTEL_METRIC_EXPORT_INTERVAL": "500"}).metric_interval_ms == 500


def test_an_event_loop_animus_does_not_know_is_a_config_error(run_with):
    proc = run_with({"ANIMUS_EVENT_LOOP": "trio"}, "work", "list")
    assert proc.returncode == 2
    documented = [line for line in (ROOT / "docs" / "configuration.md").read_text().splitlines()
                  if line.startswith("animus: error: ANIMUS_EVENT_LOOP=")]
    assert [one_error_line(proc.stderr)] == documented


def test_each_choice_of_event_loop(monkeypatch):
    def made(environ: dict[str, str]) -> str:
        new = loop_factory(environ)()
        try:
            return loop_name(new)
        finally:
            new.close()

    assert made({}) == "uvloop"  # installed with animus on Linux
    assert made({"ANIMUS_EVENT_LOOP": " UVLOOP "}) == "uvloop"
    assert made({"ANIMUS_EVENT_LOOP": "asyncio"}) == "asyncio"
    assert made({"ANIMUS_EVENT_LOOP": ""}) == "uvloop"

    async def running() -> str:
        return loop_name(asyncio.get_running_loop())

    monkeypatch.setenv("ANIMUS_EVENT_LOOP", "asyncio")
    assert loop.run(running()) == "asyncio"
    monkeypatch.delenv("ANIMUS_EVENT_LOOP")
    assert loop.run(running()) == "uvloop"
    # where uvloop cannot be imported: asyncio's loop, unless uvloop was asked for
    monkeypatch.setitem(sys.modules, "uvloop", None)
    assert made({}) == "asyncio"
    with pytest.raises(ConfigError, match=r"ANIMUS_EVENT_LOOP=uvloop, but uvloop cannot be "
                                          r"imported .*: install it"):
        loop_factory({"ANIMUS_EVENT_LOOP": "uvloop"})
