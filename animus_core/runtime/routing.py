"""Which faculty takes which work type in this engine, and what to say about work that none
takes (no faculty accepts its type, or the one that would is disabled)."""

from __future__ import annotations

import logging
import os
import time

from animus_core.faculties.faculty import Faculty
from animus_core.faculties.plugins import Faculties
from animus_core.infra.telemetry import instruments

__all__ = ["Routing"]

_log = logging.getLogger("animus.engine")
REPEAT = 300.0  # seconds between warnings about the same unroutable work type


class Routing:
    def __init__(self, faculties: Faculties) -> None:
        self.faculties = faculties
        #: faculties switched off at start (name -> why); their work stays queued
        self.disabled: dict[str, str] = {}
        #: work type -> the disabled faculty that accepts it
        self.disabled_types: dict[str, str] = {}
        #: the disabled faculties themselves (the engine registers them with why)
        self.disabled_faculties: list[Faculty] = []
        #: work type -> when work of it was last found unroutable (monotonic)
        self.unroutable: dict[str, float] = {}
        self._disable_unconfigured()

    def _disable_unconfigured(self) -> None:
        """Take out the faculties that miss an environment variable they require."""
        for fac in list(self.faculties):
            missing = [v for v in fac.requires_env if not os.environ.get(v)]
            if missing:
                self.disabled[fac.name] = f"{', '.join(missing)} not set"
                self.disabled_types.update(dict.fromkeys(fac.accepts, fac.name))
                self.disabled_faculties.append(fac)
                self.faculties.remove(fac.name)
                _log.error("faculty %s is disabled: %s (its work stays queued)", fac.name,
                           self.disabled[fac.name])

    def route(self, work_type: str) -> Faculty | None:
        """The faculty that takes ``work_type``, or None (and a note of it)."""
        fac = self.faculties.by_type.get(work_type)
        if fac is None:
            self.note_unroutable(work_type)
        return fac

    def note_unroutable(self, work_type: str) -> None:
        instruments.unroutable.add(1, {"work_type": work_type})
        now = time.monotonic()
        if now - self.unroutable.get(work_type, -1e9) > REPEAT:
            if work_type in self.disabled_types:
                name = self.disabled_types[work_type]
                _log.warning("work type %r belongs to faculty %s, which is disabled (%s): its "
                             "items stay queued until it is enabled", work_type, name,
                             self.disabled[name])
            else:
                _log.warning("work type %r has no faculty: its items stay queued until a "
                             "faculty that accepts it is installed", work_type)
        self.unroutable[work_type] = now
