"""The names of animus's governance roles: each is the Postgres group role ``animus_<name>``
(docs/governance.md, Roles). An approval gate names one of them: only its members decide."""

from __future__ import annotations

__all__ = ["ROLES"]

ROLES = ("reader", "submitter", "approver", "operator", "admin")
