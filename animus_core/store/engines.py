"""Live engines in the store: an engine registers, beats and deregisters; an operator asks
engines to stop. See ``0026_engines.sql``; the engine's side is
:mod:`animus_core.runtime.heartbeat`, the fleet's view :func:`animus_core.store.read.status`."""

from __future__ import annotations

import math
from uuid import UUID

import msgspec

from animus_core.store.base import DbBase
from animus_core.values.engines import Beat, Engine, EngineInfo, ScheduleInfo
from animus_core.values.errors import InvalidInput
from animus_core.values.work import as_uuid

__all__ = ["deregister", "heartbeat", "register", "registered", "stop_engines"]

CHANNEL = "animus_engines"


async def register(db: DbBase, info: EngineInfo) -> None:
    """Register (or register again) the engine ``info`` describes."""
    async with db.connection() as conn:
        await conn.execute(
            "SELECT animus.engine_register($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
            info.id, info.host, info.pid, info.version, info.heartbeat_seconds,
            info.concurrency, info.queues, msgspec.Raw(msgspec.json.encode(info.faculties)),
            msgspec.Raw(msgspec.json.encode(info.disabled)),
            msgspec.Raw(msgspec.json.encode(info.schedules)))


async def heartbeat(db: DbBase, engine_id: UUID, running: dict[str, int],
                    schedules: list[ScheduleInfo] | None = None) -> Beat:
    """One beat of engine ``engine_id``, with its running foci per faculty (and its
    schedules' next ticks): whether it is still registered, and whether it is asked to
    stop."""
    async with db.connection() as conn:
        row = await conn.fetchrow(
            "SELECT * FROM animus.engine_heartbeat($1, $2, $3)", engine_id,
            msgspec.Raw(msgspec.json.encode(running)),
            None if schedules is None else msgspec.Raw(msgspec.json.encode(schedules)))
    grace = row["stop_grace"]
    return Beat(registered=row["registered"], stop_requested=row["stop_requested"],
                stop_grace=None if grace is None or math.isnan(grace) else grace)


async def deregister(db: DbBase, engine_id: UUID) -> None:
    """The engine stops cleanly: its row goes."""
    async with db.connection() as conn:
        await conn.execute("SELECT animus.engine_deregister($1)", engine_id)


async def stop_engines(db: DbBase, engine: UUID | str | None = None, *,
                       grace: float | None = None) -> list[UUID]:
    """Ask engine ``engine`` (None: every live engine) to drain and stop within ``grace``
    seconds (None: each engine's own); returns the engines asked. Needs the operator role;
    an unknown id raises :class:`~animus_core.values.errors.WorkNotFound`."""
    if grace is not None and not 0 <= grace <= 86400:  # also refuses NaN
        raise InvalidInput(f"a grace period is from 0 to 86400 seconds, got {grace!r}")
    target = None if engine is None else as_uuid(engine, "engine id")
    async with db.connection() as conn:
        rows = await conn.fetch("SELECT * FROM animus.stop_engines($1, $2)", target, grace)
    return [r[0] for r in rows]


_engines = msgspec.json.Decoder(list[Engine])


async def registered(db: DbBase) -> list[Engine]:
    """The registered engines, live and lost, oldest first (the reader role reads them)."""
    async with db.connection() as conn:
        text = await conn.fetchval(
            """SELECT coalesce(jsonb_agg(to_jsonb(e) || jsonb_build_object(
                                             'lost', animus.engine_lost(e))
                                         ORDER BY e.started_at, e.id), '[]')::text
                 FROM animus.engines e""")
    return _engines.decode(text)
