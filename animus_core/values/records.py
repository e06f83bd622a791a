"""Execution records: every focus attempt bound to explicit, hashed inputs.

A record holds the hash of the canonical params (RFC 8785 with Unicode NFC, see
:mod:`animus_core.values.canonical`), the faculty's identity (distribution and version for Python
faculties; the TOML file and each hook script's digest for command faculties), the engine
version, the environment (Python, platform, installed distributions: stored once, by hash),
the models called, and the hash of the outcome. Two runs of "the same" work can then be
compared field by field (:func:`diff`), and a rerun can say whether its inputs changed or
the faculty is nondeterministic (:func:`verdict`).

An attempt whose lease ran out while it ran is recorded by the database when the item is
taken back, with result ``lost``: the engine that ran it may be gone, so the inputs only it
knew (params hash, faculty, engine version, environment) are ``None`` in that record.
"""

from __future__ import annotations

import hashlib
import platform
import re
import sys
import time
from datetime import datetime
from importlib import metadata
from pathlib import Path
from typing import Any
from uuid import UUID

import msgspec

from animus_core.values.canonical import canonical_hash

__all__ = ["FILE_TEXT_LIMIT", "ExecutionRecord", "changed_files", "diff", "environment",
           "file_digest", "file_text", "verdict"]


class ExecutionRecord(msgspec.Struct, frozen=True, kw_only=True):
    work_id: UUID
    attempt: int
    #: ``completed``, ``failed`` or ``lost``
    result: str
    work_type: str
    # None only in a lost attempt's record: what the engine that ran it knew
    params_hash: str | None
    faculty: dict[str, Any] | None
    faculty_hash: str | None
    engine_version: str | None
    environment_hash: str | None
    models: list[str]
    outcome_hash: str | None
    error: str | None
    started_at: datetime
    finished_at: datetime | None = None
    environment: dict[str, Any] | None = None
    #: the durable steps the attempt ran and replayed, ``{"ran": [{"position": 1, "name":
    #: "fetch"}, ...], "replayed": [...]}``; ``None`` when it called none (or was lost)
    steps: dict[str, Any] | None = None

    @classmethod
    def from_row(cls, row: Any) -> ExecutionRecord:
        keys = set(row.keys())  # asyncpg records test values with `in`
        return cls(**{f: row[f] for f in cls.__struct_fields__ if f in keys})


def environment() -> tuple[str, dict[str, Any]]:
    """This process's environment and its hash."""
    dists = {}
    for dist in metadata.distributions():
        name, version = name_and_version(dist)
        if name:
            dists[name.lower()] = version
    env = {
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "distributions": dict(sorted(dists.items())),
    }
    return canonical_hash(env), env


def name_and_version(dist: metadata.Distribution) -> tuple[str | None, str | None]:
    """A distribution's ``Name`` and ``Version`` as its metadata gives them. Parsing the whole
    metadata file as an email message (what ``dist.metadata`` does, twice with
    ``dist.version``) took 36 ms of an engine's start for a hundred distributions: the
    header lines are read instead, and the parser is left what they do not settle."""
    plain = _plain_name_and_version(dist.read_text("METADATA") or dist.read_text("PKG-INFO")
                                    or "")
    return plain if plain is not None else (dist.metadata["Name"], dist.version)


def _plain_name_and_version(text: str) -> tuple[str, str] | None:
    """``Name`` and ``Version`` from the headers of a metadata file, when both are plain
    ``Key: value`` lines before any line that is not (folded onto the next line, malformed);
    None otherwise."""
    found: dict[str, str] = {}
    key = ""
    pos = 0
    while pos < len(text):
        line = _LINE.match(text, pos)
        assert line is not None  # it matches the empty string
        pos = line.end()
        if not line[1]:
            break  # an empty line ends the headers
        if line[1][0] in " \t":  # the previous header goes on
            if key in found:
                return None
            continue
        if len(found) == 2:
            break  # both, and neither folded: the lines after cannot change them
        header = _HEADER.match(line[1])
        if header is None:
            return None
        key = header[1].lower()
        if key in ("name", "version"):
            found.setdefault(key, header[2].lstrip(" \t"))
    return (found["name"], found["version"]) if len(found) == 2 else None


#: a line and its break, and a header line, as Python's email parser reads them
_LINE = re.compile(r"([^\r\n]*)(?:\r\n|\r|\n|$)")
_HEADER = re.compile(r"([\041-\071\073-\176]+):(.*)")


# Digests by (path, inode, size, mtime, ctime): a hook's interpreter or script is hashed once,
# not at every attempt. A file changed within the last seconds is not remembered, as its
# timestamps may not tell a second change within the same clock tick apart ("racy" files).
_DIGESTS: dict[tuple[str, int, int, int, int], str] = {}
_SETTLED_NS = 2_000_000_000


#: the largest file whose text is kept for ``work diff`` (a bigger one is named by digest only)
FILE_TEXT_LIMIT = 256 * 1024


def file_text(path: Path, digest: str) -> str | None:
    """The text of ``path`` if it still has ``digest`` and is UTF-8 text of at most
    :data:`FILE_TEXT_LIMIT` bytes; None for anything else (changed since, binary, too big)."""
    try:
        with path.open("rb") as f:
            data = f.read(FILE_TEXT_LIMIT + 1)
    except OSError:
        return None
    if len(data) > FILE_TEXT_LIMIT or "sha256:" + hashlib.sha256(data).hexdigest() != digest:
        return None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return None if "\x00" in text else text


def changed_files(a: ExecutionRecord, b: ExecutionRecord,
                  differences: dict[str, tuple[Any, Any]]) -> list[tuple[str, str, str, str, str]]:
    """The faculty files whose digest differs between two records: (field, path in a, path
    in b, digest in a, digest in b), for the TOML file and each hook's script or file."""
    out = []
    for field, (da, db) in differences.items():
        if not (field.startswith("faculty.") and isinstance(da, str) and isinstance(db, str)
                and da.startswith("sha256:") and db.startswith("sha256:")):
            continue
        out.append((field, _file_of(a.faculty or {}, field), _file_of(b.faculty or {}, field),
                    da, db))
    return out


def _file_of(faculty: dict[str, Any], field: str) -> str:
    parts = field.split(".")[1:]
    if parts == ["file_sha256"]:
        return str(faculty.get("file", field))
    if len(parts) == 3 and parts[0] == "hooks" and parts[2] == "sha256":
        command = str(faculty.get("hooks", {}).get(parts[1], {}).get("command", ""))
        return command.split(" ", 1)[0] or field
    if len(parts) >= 4 and parts[0] == "hooks" and parts[2] == "files":
        return ".".join(parts[3:])
    return field


def file_digest(path: Path) -> str:
    try:
        st = path.stat()
        key = (str(path), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        if (known := _DIGESTS.get(key)) is not None:
            return known
        digest = "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as e:
        return f"unreadable: {e.strerror}"
    if time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns) > _SETTLED_NS:
        if len(_DIGESTS) > 4096:
            _DIGESTS.clear()
        _DIGESTS[key] = digest
    return digest


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: value}


def diff(a: ExecutionRecord, b: ExecutionRecord, *, params_a: dict[str, Any] | None = None,
         params_b: dict[str, Any] | None = None, outcome_a: Any = None,
         outcome_b: Any = None) -> dict[str, tuple[Any, Any]]:
    """Field -> (a, b) for every input or output that differs (nested fields dotted). With
    the items' params and outcomes, the values that differ are named (``params.KEY``,
    ``outcome.KEY``) instead of their hashes."""
    out: dict[str, tuple[Any, Any]] = {}
    if a.work_type != b.work_type:
        out["work_type"] = (a.work_type, b.work_type)
    if a.params_hash != b.params_hash:
        if params_a is not None and params_b is not None:
            fa, fb = _flatten(params_a), _flatten(params_b)
            for key in sorted(fa.keys() | fb.keys()):
                if canonical_hash(fa.get(key), nfc=True) != canonical_hash(fb.get(key), nfc=True):
                    out[f"params.{key}"] = (fa.get(key), fb.get(key))
        if not any(k.startswith("params") for k in out):
            out["params_hash"] = (a.params_hash, b.params_hash)
    fa, fb = _flatten(a.faculty or {}), _flatten(b.faculty or {})
    for key in sorted(fa.keys() | fb.keys()):
        if fa.get(key) != fb.get(key):
            out[f"faculty.{key}"] = (fa.get(key), fb.get(key))
    if a.engine_version != b.engine_version:
        out["engine_version"] = (a.engine_version, b.engine_version)
    if a.environment_hash != b.environment_hash:
        ea, eb = _flatten(a.environment or {}), _flatten(b.environment or {})
        for key in sorted(ea.keys() | eb.keys()):
            if ea.get(key) != eb.get(key):
                out[f"environment.{key}"] = (ea.get(key), eb.get(key))
        if not any(k.startswith("environment.") for k in out):
            out["environment_hash"] = (a.environment_hash, b.environment_hash)
    if sorted(a.models) != sorted(b.models):
        out["models"] = (a.models, b.models)
    if a.result != b.result:
        out["result"] = (a.result, b.result)
    if a.outcome_hash != b.outcome_hash:
        oa = _flatten(outcome_a) if isinstance(outcome_a, dict) else {"": outcome_a}
        ob = _flatten(outcome_b) if isinstance(outcome_b, dict) else {"": outcome_b}
        changed = [k for k in sorted(oa.keys() | ob.keys())
                   if canonical_hash(oa.get(k), nfc=True) != canonical_hash(ob.get(k), nfc=True)]
        for key in changed if (outcome_a is not None or outcome_b is not None) else ():
            out["outcome" + (f".{key}" if key else "")] = (oa.get(key), ob.get(key))
        if not any(k == "outcome" or k.startswith("outcome.") for k in out):
            out["outcome_hash"] = (a.outcome_hash, b.outcome_hash)
    return out


OUTPUTS = ("result", "outcome_hash")


def verdict(differences: dict[str, tuple[Any, Any]]) -> str:
    """``identical``, ``changed inputs: ...`` or ``nondeterministic: ...``."""
    outputs = [k for k in differences
               if k in OUTPUTS or k == "outcome" or k.startswith("outcome.")]
    inputs = [k for k in differences if k not in outputs]
    if not differences:
        return "identical: same inputs, same output"
    if inputs:
        return "changed inputs: " + ", ".join(inputs) + (
            " (output changed too)" if outputs else " (output unchanged)")
    return "nondeterministic: same inputs, different output (" + ", ".join(outputs) + ")"
