"""Postgres errors become animus errors (:mod:`animus_core.values.errors`) at the store's edge.

Our SQL raises with SQLSTATEs ANI01 (transition), ANI02 (lease), ANI03 (permission) and
ANI04 (not found); a lost connection becomes :class:`DatabaseUnavailable`, which callers may
retry. Every store call runs inside :func:`errors`.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

import asyncpg

from animus_core.values.errors import (
    AnimusError,
    DatabaseError,
    DatabaseUnavailable,
    IllegalTransition,
    InvalidInput,
    LeaseLost,
    PermissionDenied,
    WorkNotFound,
)

__all__ = ["connection_lost", "errors", "translate"]

_BAD_ARGUMENT = re.compile(r"invalid input for query argument (\$\d+):.*?(?:\((.*)\))?$", re.DOTALL)
_NO_QUEUE = re.compile(r'^(?:queue "([^"]*)"|relation "pgmq\.q_([^"]*)"'
                       r'|function animus\.q_(\w*)_(?:claim|archive|set_vt|send)\(.*\)) does not exist')

# SQLSTATEs that mean the connection or the server went away, not that the operation was
# refused: connection exceptions (08), administrator/crash shutdown and start-up (57P01-03),
# too many connections (53300). Whoever retries on DatabaseUnavailable retries these.
_GONE = ("57P01", "57P02", "57P03", "53300")


def translate(e: asyncpg.PostgresError) -> Exception:
    """The animus error that ``e`` means."""
    msg = getattr(e, "message", None) or str(e)
    if connection_lost(e):
        return DatabaseUnavailable(f"lost the database connection: {msg}")
    bad_argument = _BAD_ARGUMENT.match(msg)
    if bad_argument:  # asyncpg's message repeats the value, which may be a secret
        return InvalidInput(f"a value could not be sent to the database (argument "
                            f"{bad_argument[1]}): {bad_argument[2] or 'it has the wrong type'}")
    no_queue = _NO_QUEUE.match(msg) if e.sqlstate in ("ANI04", "42P01", "42883") else None
    if no_queue:  # from animus.submit, a pgmq table or a queue's function that is not there
        name = no_queue[1] or no_queue[2] or no_queue[3]
        return InvalidInput(
            f'queue "{name}" does not exist: create it with `animus queue create {name}` (in '
            "Python Db.create_queue; animus db migrate creates the default queue)"
        )
    if e.sqlstate == "23503" and getattr(e, "constraint_name", "") == "work_items_parent_id_fkey":
        return WorkNotFound(f"the parent work item does not exist: {getattr(e, 'detail', msg)}")
    match e.sqlstate:
        case "ANI01":
            return IllegalTransition(msg)
        case "ANI02":
            return LeaseLost(msg)
        case "ANI04":
            return WorkNotFound(msg)
        case "ANI03" | "42501":
            return PermissionDenied(f"refused: {msg}")
    return DatabaseError(f"the database refused the operation: {msg}")


@contextlib.contextmanager
def errors() -> Iterator[None]:
    """Translate what the database or the client raises inside the block."""
    try:
        yield
    except asyncpg.PostgresError as e:
        if isinstance(e.__cause__, AnimusError):  # one of our codecs refused an argument
            raise e.__cause__ from None
        raise translate(e) from e
    except (OSError, TimeoutError, asyncpg.InterfaceError, asyncpg.InternalClientError) as e:
        if connection_lost(e):
            raise DatabaseUnavailable(f"lost the database connection: {e}") from e
        raise DatabaseError(f"the database client refused the operation: {e}") from e


def connection_lost(e: BaseException) -> bool:
    """Whether ``e`` leaves the connection it happened on unusable: closed, timed out, or in
    a protocol state asyncpg cannot leave (``cannot switch to state ...``, after a backend
    was terminated in the middle of an operation)."""
    if isinstance(e, asyncpg.PostgresError):
        return (e.sqlstate in _GONE or (e.sqlstate or "").startswith("08")
                or "not currently accepting connections" in str(e))  # ALLOW_CONNECTIONS false
    return (isinstance(e, OSError | TimeoutError | asyncpg.ConnectionDoesNotExistError
                       | asyncpg.InternalClientError)
            or (isinstance(e, asyncpg.InterfaceError) and "closed" in str(e)))
