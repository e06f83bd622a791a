"""Configuration from the environment (docs/configuration.md), read once into :class:`Settings`."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import msgspec
import platformdirs

from animus_core.infra.witness import NO_KEYS, AuditKeys
from animus_core.values.errors import ConfigError

__all__ = ["Settings"]

_LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    """Everything animus reads from its environment.

    ``database_url`` is ``None`` for the embedded server under ``home``.
    """

    database_url: str | None = None
    #: where the engine LISTENs, when DATABASE_URL is a pooler in transaction mode
    #: (ANIMUS_LISTEN_URL; None: DATABASE_URL's server)
    listen_url: str | None = None
    home: Path
    otel_endpoint: str | None = None
    #: a trace's page in the tracing backend, with ``{trace_id}`` in it (the console links it)
    trace_url: str | None = None
    metric_interval_ms: int = 10_000
    log_level: str = "info"
    faculties_dir: Path = Path("faculties")
    rules_dir: Path = Path("rules")
    plugins_autoload: bool = True
    plugins_allow: tuple[str, ...] | None = None
    plugins_block: tuple[str, ...] = ()
    embedder: str = "hashing"
    embedder_url: str | None = None
    embedder_model: str | None = None
    embedder_key: str | None = None
    embedder_dimensions: int | None = None
    #: ANIMUS_AUDIT_KEY or ANIMUS_AUDIT_KEY_FILE (see :mod:`animus_core.infra.witness`)
    audit_keys: AuditKeys = NO_KEYS

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        url = env.get("DATABASE_URL") or None
        if url is not None and not url.startswith(("postgres://", "postgresql://")):
            raise ConfigError(
                f"DATABASE_URL={url!r} is not a Postgres URL: it must start with postgresql:// "
                "(unset it to use the embedded server)"
            )
        listen = env.get("ANIMUS_LISTEN_URL") or None
        if listen is not None and not listen.startswith(("postgres://", "postgresql://")):
            raise ConfigError(
                f"ANIMUS_LISTEN_URL={listen!r} is not a Postgres URL: it must start with "
                "postgresql:// (the server itself, where DATABASE_URL is a pooler)")
        if listen is not None and url is None:
            raise ConfigError("ANIMUS_LISTEN_URL is for a DATABASE_URL that names a pooler; "
                              "the embedded server needs none (unset it)")
        level = env.get("LOG_LEVEL", "info").strip().lower() or "info"
        if level not in _LOG_LEVELS:
            raise ConfigError(f"LOG_LEVEL={level!r} is not one of {', '.join(_LOG_LEVELS)}")
        trace_url = env.get("ANIMUS_TRACE_URL") or None
        if trace_url is not None and not (trace_url.startswith(("http://", "https://"))
                                          and "{trace_id}" in trace_url):
            raise ConfigError(
                f"ANIMUS_TRACE_URL={trace_url!r} must be an http(s) URL with {{trace_id}} in it, "
                "such as http://localhost:16686/trace/{trace_id}")
        home = env.get("ANIMUS_HOME") or platformdirs.user_data_dir("animus", appauthor=False)
        return cls(
            database_url=url,
            listen_url=listen,
            home=Path(home).expanduser(),
            otel_endpoint=env.get("OTEL_ENDPOINT") or None,
            trace_url=trace_url,
            metric_interval_ms=_positive_int(env, "OTEL_METRIC_EXPORT_INTERVAL") or 10_000,
            log_level=level,
            faculties_dir=Path(env.get("ANIMUS_FACULTIES") or "faculties"),
            rules_dir=Path(env.get("ANIMUS_RULES") or "rules"),
            plugins_autoload=env.get("ANIMUS_DISABLE_PLUGIN_AUTOLOAD", "") in ("", "0"),
            plugins_allow=_names(env["ANIMUS_PLUGINS"]) if env.get("ANIMUS_PLUGINS") else None,
            plugins_block=_names(env.get("ANIMUS_BLOCK_PLUGINS", "")),
            embedder=env.get("ANIMUS_EMBEDDER") or "hashing",
            embedder_url=env.get("ANIMUS_EMBEDDER_URL") or None,
            embedder_model=env.get("ANIMUS_EMBEDDER_MODEL") or None,
            embedder_key=env.get("ANIMUS_EMBEDDER_KEY") or None,
            embedder_dimensions=_positive_int(env, "ANIMUS_EMBEDDER_DIMENSIONS"),
            audit_keys=AuditKeys.from_env(env),
        )


def _positive_int(env: Mapping[str, str], name: str) -> int | None:
    value = env.get(name)
    if not value:
        return None
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise ConfigError(f"{name}={value!r} must be a positive integer")
    return n


def _names(value: str) -> tuple[str, ...]:
    return tuple(n.strip() for n in value.split(",") if n.strip())
