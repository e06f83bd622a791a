"""Printing for the CLI: JSON for machines, aligned tables for people."""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import msgspec

from animus_core.values.errors import InvalidInput

__all__ = ["age", "page_size", "positive", "print_json", "print_table", "seconds", "since"]


def print_json(value: Any) -> None:
    sys.stdout.write(msgspec.json.format(msgspec.json.encode(value), indent=2).decode() + "\n")


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    cells = [[str(h) for h in headers], *[["" if c is None else str(c) for c in r] for r in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def age(when: datetime | None) -> str:
    if when is None:
        return ""
    seconds = (datetime.now(UTC) - when).total_seconds()
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit} ago"
    return f"{max(0, int(seconds))}s ago"


def seconds(text: str) -> float:
    """An argparse type: a finite, non-negative number of seconds."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 <= value <= 10**7:  # NaN fails too
        raise argparse.ArgumentTypeError(f"{text!r:.40} is not a number of seconds from 0 to 10000000")
    return value


def parse_bind(text: str, option: str = "--bind") -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for an IPv6 host; no host: 127.0.0.1) as host and port;
    anything else is an error naming ``option``."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidInput(f"{option} {text!r:.80}: give HOST:PORT, such as 127.0.0.1:8080 (this "
                           "machine only) or 0.0.0.0:8080 (every interface)")
    return host.strip("[]") or "127.0.0.1", int(port)


def http_url(host: str, port: int, path: str = "/") -> str:
    """Where a server bound to ``host:port`` answers (an IPv6 host in brackets)."""
    return f"http://{f'[{host}]' if ':' in host else host}:{port}{path}"


def positive(text: str) -> int:
    """An argparse type: an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r:.40} is not an integer of at least 1")
    return value


def page_size(text: str) -> int:
    """An argparse type: a page size from 1 to 10000."""
    return _integer(text, 10_000, "a page size")


def option_id(text: str | None, option: str) -> UUID | None:
    """The work item id an option gives (None: the option was not given)."""
    if text is None:
        return None
    try:
        return UUID(text)
    except ValueError:
        raise InvalidInput(f"{option}: {text!r:.60} is not a work item id (a UUID, as animus "
                           "work list shows)") from None


def attempts(text: str) -> int:
    """An argparse type: an attempt limit from 1 to 1000."""
    return _integer(text, 1000, "an attempt limit")


def _integer(text: str, most: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= most:
        raise argparse.ArgumentTypeError(f"{text!r:.40} is not {what} from 1 to {most}")
    return value


def since(text: str) -> datetime:
    """An argparse type: an aware ISO time, or an age (``90s``, ``30m``, ``2h``, ``7d``)
    before now."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    if text[-1:] in units and text[:-1].isdigit():
        return datetime.now(UTC) - timedelta(seconds=int(text[:-1]) * units[text[-1]])
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r:.40} is neither an ISO time (2026-12-01T09:00+00:00) nor an age "
            "(30m, 2h, 7d)") from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)
