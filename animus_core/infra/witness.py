"""A witness of the audit chain outside the database: keys it does not hold, and checkpoints.

A hash chain that lives only in the database proves nothing to someone who can rewrite the
database: the superuser can delete the last rows with their seals, empty the trail, or edit
a row and recompute every seal after it with the same public function. Two things outside
the database change that:

* **audit keys** (``ANIMUS_AUDIT_KEY`` or ``ANIMUS_AUDIT_KEY_FILE``): secrets the engine
  seals with (HMAC-SHA256 instead of SHA-256), so a seal cannot be recomputed without one.
  Each seal names its key by a fingerprint (:func:`key_id`), never the key.
* **checkpoints**: the chain's length and head hash at a moment, signed with the key when
  there is one, kept where the database's superuser cannot reach (a file under
  ``ANIMUS_HOME``, the log stream, wherever an operator copies ``animus audit checkpoint``).
  A chain that no longer holds a checkpoint's hash at its position was rewritten or cut.

The standard library's HMAC is enough for both: whoever verifies a seal must be able to
make one anyway (to recompute the chain), so a public-key signature would add a dependency
without letting anyone verify who could not also seal.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import msgspec

from animus_core.values.canonical import canonical_json
from animus_core.values.errors import ConfigError, InvalidInput

__all__ = [
    "FORMAT", "KEY_MIN_BYTES", "NO_KEYS", "AuditKeys", "Checkpoint", "append_checkpoint",
    "checkpoint_path", "key_id", "new_checkpoint", "read_checkpoints", "sign", "signature_ok",
]

KEY_MIN_BYTES = 32
FORMAT = "animus-audit-checkpoint/1"
_CHECKPOINT_MAC = b"animus audit checkpoint\x00"
_HEX = re.compile(r"(?:[0-9a-fA-F]{2})+")
_HOW = "give at least 32 random bytes as hex or base64 (for example `openssl rand -hex 32`)"


def key_id(key: bytes) -> str:
    """The name of a key in seals and checkpoints: a fingerprint that reveals nothing of it."""
    return hashlib.sha256(b"animus audit key id\x00" + key).hexdigest()[:16]


@dataclass(frozen=True)
class AuditKeys:
    """The audit keys a process holds: the first seals and signs, all of them verify."""

    keys: tuple[bytes, ...] = ()
    _by_id: dict[str, bytes] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_id", {key_id(k): k for k in self.keys})

    def __bool__(self) -> bool:
        return bool(self.keys)

    @property
    def sealing(self) -> bytes | None:
        return self.keys[0] if self.keys else None

    @property
    def sealing_id(self) -> str | None:
        return key_id(self.keys[0]) if self.keys else None

    def get(self, kid: str) -> bytes | None:
        return self._by_id.get(kid)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> AuditKeys:
        text = env.get("ANIMUS_AUDIT_KEY") or ""
        path = env.get("ANIMUS_AUDIT_KEY_FILE") or ""
        if text and path:
            raise ConfigError("ANIMUS_AUDIT_KEY and ANIMUS_AUDIT_KEY_FILE are both set: set one "
                              "of them, not both")
        if text:
            parts = [p for p in text.split(",") if p.strip()]
            return cls(tuple(_decode(p, "ANIMUS_AUDIT_KEY" if len(parts) == 1
                                     else f"ANIMUS_AUDIT_KEY (key {n} of {len(parts)})")
                             for n, p in enumerate(parts, 1)))
        if path:
            try:
                lines = Path(path).expanduser().read_text("utf-8").splitlines()
            except (OSError, UnicodeDecodeError) as e:
                reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
                raise ConfigError(f"cannot read ANIMUS_AUDIT_KEY_FILE={path}: {reason}") from None
            keys = tuple(_decode(line, f"ANIMUS_AUDIT_KEY_FILE ({path}) line {n}")
                         for n, line in enumerate(lines, 1)
                         if line.strip() and not line.lstrip().startswith("#"))
            if not keys:
                raise ConfigError(f"ANIMUS_AUDIT_KEY_FILE ({path}) holds no key: {_HOW}")
            return cls(keys)
        return cls()


NO_KEYS = AuditKeys()


def _decode(text: str, where: str) -> bytes:
    """A key written as hex or base64 (standard or URL-safe); never shown in an error."""
    text = text.strip()
    if _HEX.fullmatch(text):
        key = bytes.fromhex(text)
    else:
        try:
            key = base64.b64decode(text + "=" * (-len(text) % 4),
                                   altchars=b"-_" if "-" in text or "_" in text else None,
                                   validate=True)
        except (binascii.Error, ValueError):
            raise ConfigError(f"{where} is neither hex nor base64: {_HOW}") from None
    if len(key) < KEY_MIN_BYTES:
        raise ConfigError(f"{where} is {len(key)} bytes, and an audit key must be at least "
                          f"{KEY_MIN_BYTES} bytes: {_HOW}")
    return key


# -- checkpoints ----------------------------------------------------------------------------


class Checkpoint(msgspec.Struct, frozen=True, kw_only=True):
    """The chain's head at a moment: ``seq`` positions long, ending with ``hash`` (hex) at
    audit row ``audit_id``; signed (``mac``) with the key ``key_id`` when there is one."""

    format: str = FORMAT
    database: str
    seq: int
    audit_id: int | None
    hash: str
    at: str
    key_id: str | None = None
    mac: str | None = None

    def line(self) -> str:
        """One line of JSON, so that checkpoints append to a file as JSON lines."""
        return msgspec.json.encode(self).decode()


def new_checkpoint(database: str, seq: int, audit_id: int | None, head: bytes,
                   keys: AuditKeys) -> Checkpoint:
    at = datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")
    return sign(Checkpoint(database=database, seq=seq, audit_id=audit_id, hash=head.hex(), at=at),
                keys)


def _mac(cp: Checkpoint, key: bytes) -> str:
    fields = msgspec.to_builtins(cp)
    del fields["mac"]  # everything else is signed, the key's name too
    return hmac.new(key, _CHECKPOINT_MAC + canonical_json(fields).encode(), "sha256").hexdigest()


def sign(cp: Checkpoint, keys: AuditKeys) -> Checkpoint:
    """The checkpoint signed with the sealing key (unchanged without one)."""
    key = keys.sealing
    if key is None:
        return cp
    signed = msgspec.structs.replace(cp, key_id=key_id(key), mac=None)
    return msgspec.structs.replace(signed, mac=_mac(signed, key))


def signature_ok(cp: Checkpoint, keys: AuditKeys) -> bool | None:
    """Whether the checkpoint's signature is right; ``None`` when it has none, or when its
    key is not among ``keys``."""
    if cp.mac is None or cp.key_id is None:
        return None
    key = keys.get(cp.key_id)
    if key is None:
        return None
    return hmac.compare_digest(cp.mac, _mac(msgspec.structs.replace(cp, mac=None), key))


def _check(cp: Checkpoint) -> str | None:
    if cp.format != FORMAT:
        return f"format is {cp.format!r}, not {FORMAT!r}"
    if cp.seq < 0 or (cp.seq > 0) != (cp.audit_id is not None):
        return "seq and audit_id do not go together"
    if not re.fullmatch(r"[0-9a-f]{64}", cp.hash):
        return "hash is not 64 hex digits"
    if (cp.key_id is None) != (cp.mac is None):
        return "key_id and mac go together"
    if cp.mac is not None and not re.fullmatch(r"[0-9a-f]{64}", cp.mac):
        return "mac is not 64 hex digits"
    return None


_decoder = msgspec.json.Decoder(Checkpoint)


def read_checkpoints(path: Path) -> list[tuple[str, Checkpoint]]:
    """The checkpoints in a file, each with where it is (``line N of PATH``): JSON lines, or
    one JSON object. Text before the JSON on a line (a log line's prefix) is skipped."""
    try:
        text = path.read_text("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise InvalidInput(f"cannot read the checkpoint file {path}: {reason}") from None
    stripped = text.strip()
    if stripped.startswith("{") and "\n" in stripped:
        try:
            return [(f"line 1 of {path}", _valid(_decoder.decode(stripped), f"{path} line 1"))]
        except msgspec.DecodeError:
            pass  # not one object written over several lines: JSON lines, then
    found = []
    for n, line in enumerate(text.splitlines(), 1):
        start = line.find("{")
        if not line.strip():
            continue
        where = f"{path} line {n}"
        if start < 0:
            raise InvalidInput(f"{where} is not an audit checkpoint: no JSON object on it")
        try:
            cp = _decoder.decode(line[start:])
        except msgspec.DecodeError as e:
            raise InvalidInput(f"{where} is not an audit checkpoint: {e}") from None
        found.append((f"line {n} of {path}", _valid(cp, where)))
    if not found:
        raise InvalidInput(f"{path} holds no audit checkpoint")
    return found


def _valid(cp: Checkpoint, where: str) -> Checkpoint:
    problem = _check(cp)
    if problem:
        raise InvalidInput(f"{where} is not an audit checkpoint: {problem}")
    return cp


def checkpoint_path(home: Path, database: str) -> Path:
    """Where an engine keeps the checkpoints of ``database``: one JSON-lines file each."""
    name = re.sub(r"[^A-Za-z0-9_.@-]", "_", database) or "database"
    return home / "audit-checkpoints" / f"{name}.jsonl"


def append_checkpoint(path: Path, cp: Checkpoint) -> None:
    """Append one line and sync it: a checkpoint is only worth something once it is stored."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("ab") as f:
        f.write(cp.line().encode() + b"\n")
        f.flush()
        os.fsync(f.fileno())
