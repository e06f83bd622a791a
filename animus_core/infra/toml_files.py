"""Reading the TOML files animus is configured with (faculties, pipelines, rules): one
place that says, for any of them, what was wrong and where."""

from __future__ import annotations

import difflib
import re
import tomllib
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import msgspec.inspect as mi

from animus_core.values.errors import ConfigError

__all__ = ["convert", "load_toml"]

T = TypeVar("T")

_UNKNOWN = re.compile(
    r"^Object contains unknown field `(?P<field>[^`]*)`(?: - at `\$(?P<at>[^`]*)`)?$")
_STEP = re.compile(r"\.([A-Za-z_][\w-]*)|\[(\d+)\]")


def load_toml(path: Path, schema: type[T]) -> T:
    """The file at ``path``, decoded as ``schema`` (a msgspec type); a :class:`ConfigError`
    naming the file, and what in it is wrong, otherwise."""
    try:
        text = path.read_text("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) else f"not UTF-8 text ({e.reason})"
        where = ("" if path.is_absolute() or not isinstance(e, FileNotFoundError)
                 else f" (a path relative to {Path.cwd()})")
        raise ConfigError(f"{path}: cannot read: {reason}{where}") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: malformed TOML: {e}") from None
    return convert(raw, schema, str(path))


def convert(raw: Any, schema: type[T], where: str) -> T:
    """``raw`` (decoded TOML or JSON) as ``schema``; a :class:`ConfigError` saying what in it
    is wrong, after ``where``, otherwise."""
    try:
        return msgspec.convert(raw, schema)
    except msgspec.ValidationError as e:
        raise ConfigError(f"{where}: {_explain(str(e), schema)}") from None


def _explain(message: str, schema: type[Any]) -> str:
    """msgspec's message with its paths as the file's (``faculty.engage``, not
    ``$.faculty.engage``); an unknown field also gets the fields that may stand there."""
    found = _UNKNOWN.match(message)
    if found is None:
        return message.replace("`$.", "`")
    field, at = found["field"], found["at"] or ""
    known = _fields_at(mi.type_info(schema), at)
    where = f"in {at.lstrip('.')}" if at else "at the top level"
    text = f"unknown field `{field[:60]}` {where}"
    if known:
        close = difflib.get_close_matches(field, known, n=1)
        text += (f": did you mean `{close[0]}`?" if close else "") + \
            f" (it takes: {', '.join(known)})"
    return text


def _fields_at(info: Any, at: str) -> list[str]:
    """The field names of the table at msgspec path ``at`` (``.faculty.schedule[0]``)."""
    for name, _index in _STEP.findall(at):
        if name:
            table = _table(info)
            match = [f for f in table.fields if f.encode_name == name] if table else []
            if not match:
                return []
            info = match[0].type
        else:
            items = _unwrap(info)
            if not isinstance(items, mi.ListType):
                return []
            info = items.item_type
    table = _table(info)
    return [f.encode_name for f in table.fields] if table is not None else []


def _unwrap(info: Any) -> Any:
    """A type without its ``None`` alternative (an optional table or list)."""
    if isinstance(info, mi.UnionType):
        rest = [t for t in info.types if not isinstance(t, mi.NoneType)]
        return rest[0] if len(rest) == 1 else info
    return info


def _table(info: Any) -> mi.StructType | None:
    info = _unwrap(info)
    return info if isinstance(info, mi.StructType) else None
