"""Postgres roles for animus: the database itself refuses what a role may not do.

``animus roles setup`` creates five group roles (NOLOGIN); people and services get login
roles that are members of one of them (``animus roles add-user``):

    animus_reader     read work, audit, memories
    animus_submitter  reader + submit work (through animus.submit only)
    animus_approver   reader + approve/reject gated work (through animus.decide only)
    animus_operator   submitter + run engines: claim, complete, retry, memories, sealing
    animus_admin      operator + approver + migrations

Nobody, admin included, can alter, delete or truncate the audit trail, the execution
records or the approvals: triggers refuse it for every role. Row-level security on
approvals lets a person record only their own decisions. Audit rows record the connected
database user (session_user).
"""

from __future__ import annotations

import re
from typing import Any

from animus_core.errors import ConfigError, InvalidInput

__all__ = ["ROLES", "add_user", "setup_roles"]

ROLES = ("reader", "submitter", "approver", "operator", "admin")


def check_gate_role(role: str, where: str) -> None:
    """A gate's role must be one of :data:`ROLES`: approvals are checked against
    ``animus_<role>``, and no other such role exists."""
    if role not in ROLES:
        raise ConfigError(f"{where}: role {role!r} is not an animus role; use one of "
                          f"{', '.join(ROLES)}")


SETUP_SQL = """
DO $$
DECLARE r text;
BEGIN
    FOREACH r IN ARRAY ARRAY['animus_reader', 'animus_submitter', 'animus_approver',
                             'animus_operator', 'animus_admin'] LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = r) THEN
            EXECUTE format('CREATE ROLE %I NOLOGIN', r);
        END IF;
    END LOOP;
END
$$;

GRANT animus_reader TO animus_submitter, animus_approver;
GRANT animus_submitter TO animus_operator;
GRANT animus_operator, animus_approver TO animus_admin;

-- Functions are callable by PUBLIC by default: take that back, then grant on purpose.
REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA animus FROM PUBLIC;
REVOKE ALL ON ALL TABLES IN SCHEMA animus FROM PUBLIC;

GRANT USAGE ON SCHEMA animus, pgmq TO animus_reader;
GRANT SELECT ON ALL TABLES IN SCHEMA animus TO animus_reader;
GRANT SELECT ON ALL TABLES IN SCHEMA pgmq TO animus_reader;
GRANT EXECUTE ON FUNCTION animus.actor() TO animus_reader;

-- Submitting goes through the definer function: no direct writes to work_items.
ALTER FUNCTION animus.submit(text, jsonb) SECURITY DEFINER;
ALTER FUNCTION animus.submit(text, jsonb) SET search_path = pg_catalog, pg_temp;
GRANT EXECUTE ON FUNCTION animus.submit(text, jsonb) TO animus_submitter;
GRANT EXECUTE ON FUNCTION animus.decide(uuid, text, text) TO animus_approver;

-- Engines create the queues they serve (animus up): through the definer function, so that
-- operators need no CREATE right on the pgmq schema.
ALTER FUNCTION animus.create_queue(text) SECURITY DEFINER;
ALTER FUNCTION animus.create_queue(text) SET search_path = pg_catalog, pg_temp;
-- ...and fix the memory embedding dimension the first time an engine opens memory (DDL on
-- animus.memories, which only its owner may do); the vector type is found in its schema.
ALTER FUNCTION animus.memory_configure(text, int) SECURITY DEFINER;
DO $$
BEGIN
    EXECUTE format('ALTER FUNCTION animus.memory_configure(text, int) '
                   'SET search_path = pg_catalog, %I, pg_temp',
                   (SELECT n.nspname FROM pg_extension e
                      JOIN pg_namespace n ON n.oid = e.extnamespace WHERE e.extname = 'vector'));
END
$$;

-- Engines: claim, complete, state changes, sealing, memories, schedules, records.
GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA animus TO animus_operator;
GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA pgmq TO animus_operator;
GRANT SELECT, INSERT, UPDATE ON ALL TABLES IN SCHEMA pgmq TO animus_operator;
GRANT DELETE ON ALL TABLES IN SCHEMA pgmq TO animus_operator;
GRANT USAGE ON ALL SEQUENCES IN SCHEMA pgmq TO animus_operator;
GRANT SELECT, INSERT, UPDATE ON animus.work_items, animus.schedule_ticks,
      animus.memories, animus.memory_config TO animus_operator;
GRANT DELETE ON animus.memories TO animus_operator;
GRANT INSERT ON animus.audit_log, animus.audit_seal, animus.audit_gaps,
      animus.execution_records, animus.environments TO animus_operator;
GRANT DELETE ON animus.audit_gaps TO animus_operator;

GRANT ALL ON SCHEMA animus TO animus_admin;
GRANT DELETE ON animus.work_items, animus.schedule_ticks TO animus_admin;  -- animus purge

-- Nobody may rewrite history (the triggers refuse it too, for every role).
REVOKE UPDATE, DELETE, TRUNCATE ON animus.audit_log, animus.audit_seal,
       animus.execution_records, animus.approvals, animus.environments
  FROM animus_reader, animus_submitter, animus_approver, animus_operator, animus_admin;

-- A person may only record their own decisions (decide() runs as owner and checks).
ALTER TABLE animus.approvals ENABLE ROW LEVEL SECURITY;
DROP POLICY IF EXISTS approvals_read ON animus.approvals;
DROP POLICY IF EXISTS approvals_own ON animus.approvals;
CREATE POLICY approvals_read ON animus.approvals FOR SELECT USING (true);
CREATE POLICY approvals_own ON animus.approvals FOR INSERT
    WITH CHECK (approver = session_user);

-- Work items: everyone with a role reads; only operators change state (the state machine
-- and audit triggers apply to them as to anyone).
ALTER TABLE animus.work_items ENABLE ROW LEVEL SECURITY;
DROP POLICY IF EXISTS work_items_read ON animus.work_items;
DROP POLICY IF EXISTS work_items_operate ON animus.work_items;
CREATE POLICY work_items_read ON animus.work_items FOR SELECT USING (true);
CREATE POLICY work_items_operate ON animus.work_items FOR ALL TO animus_operator
    USING (true) WITH CHECK (true);
"""

_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")


async def setup_roles(conn: Any) -> None:
    """Create or refresh the five roles and their grants (idempotent)."""
    async with conn.transaction():
        await conn.execute(SETUP_SQL)


async def add_user(conn: Any, name: str, role: str, password: str | None = None) -> None:
    """Create login role ``name`` (if missing) as a member of ``animus_<role>``."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InvalidInput(f"user name {name!r}: use lowercase letters, digits and _")
    if role not in ROLES:
        raise InvalidInput(f"role {role!r} is not one of {', '.join(ROLES)}")
    async with conn.transaction():
        exists = await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", name)
        if not exists:
            await conn.execute(f'CREATE ROLE "{name}" LOGIN')
        if password is not None:
            await conn.execute(f"ALTER ROLE \"{name}\" PASSWORD {_literal(password)}")
        await conn.execute(f'GRANT animus_{role} TO "{name}"')


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"
