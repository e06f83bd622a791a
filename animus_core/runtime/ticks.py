"""Schedule ticks: each schedule submits its work at every tick; the database lets one
engine win a tick (several engines may run the same schedule)."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime

from animus_core.governance.work import GovernedWork
from animus_core.infra.telemetry import instruments
from animus_core.runtime.health import Health
from animus_core.values.errors import AnimusError
from animus_core.values.schedules import Schedule
from animus_core.values.work import NewWorkItem

__all__ = ["tick"]

_log = logging.getLogger("animus.engine")


async def tick(work: GovernedWork, health: Health, schedule: Schedule) -> None:
    """Submit ``schedule``'s work at each of its ticks, forever."""
    while True:
        at = schedule.next_tick(datetime.now(UTC))
        await asyncio.sleep(max(0.0, (at - datetime.now(UTC)).total_seconds()))
        item = (NewWorkItem(schedule.work_type, source="schedule", trigger=schedule.name)
                .params(schedule.params).priority(schedule.priority))
        try:
            result = await work.submit_scheduled(schedule.name, at, item)
        except AnimusError as e:
            health.retrying(e, "schedule %s could not submit its %s tick: %s", schedule.name,
                            at.isoformat(), e)
            continue
        if result is not None:
            instruments.schedule_ticks.add(1, {"schedule": schedule.name})
            _log.info("schedule %s fired for %s: %s", schedule.name, at.isoformat(), result.id)
