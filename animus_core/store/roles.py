"""Postgres roles for animus: the database itself refuses what a role may not do.

``animus roles setup`` creates five group roles (NOLOGIN); people and services get login
roles that are members of one of them (``animus roles add-user``):

    animus_reader     read work, audit, memories, signals
    animus_submitter  reader + submit work (through animus.submit only), signal work
    animus_approver   reader + approve/reject gated work (through animus.decide only)
    animus_operator   submitter + run engines: claim, complete, retry, memories, sealing
    animus_admin      operator + approver + purge finished work

No role, admin included, writes work items or audit rows directly: every change goes
through a SECURITY DEFINER function that checks the rules (see 0012_separation_of_duties.sql).
Nobody can alter, delete or truncate the audit trail, the execution records or the
approvals: triggers refuse it for every role. Row-level security on approvals lets a person
record only their own decisions. Audit rows record the connected database user
(session_user), whatever an INSERT says.
"""

from __future__ import annotations

import re
from typing import Any

import msgspec

from animus_core.values.errors import ConfigError, InvalidInput
from animus_core.values.roles import ROLES

__all__ = ["ROLES", "RoleMember", "add_user", "members", "remove_user", "set_only_role",
           "setup_roles"]


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

-- Start from nothing (PUBLIC's default rights, and whatever an earlier version of this
-- setup granted), then grant each role exactly its own. None of them is ever granted
-- INSERT or UPDATE on work_items, INSERT on audit_log, nor UPDATE, DELETE or TRUNCATE on
-- the audit trail, seals, approvals or execution records (triggers refuse those anyway).
REVOKE ALL ON SCHEMA animus FROM PUBLIC, animus_reader, animus_submitter, animus_approver,
       animus_operator, animus_admin;
REVOKE ALL ON ALL TABLES IN SCHEMA animus FROM PUBLIC, animus_reader, animus_submitter,
       animus_approver, animus_operator, animus_admin;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA animus FROM PUBLIC, animus_reader, animus_submitter,
       animus_approver, animus_operator, animus_admin;

GRANT USAGE ON SCHEMA animus, pgmq TO animus_reader;
GRANT SELECT ON ALL TABLES IN SCHEMA animus TO animus_reader;
GRANT SELECT ON ALL TABLES IN SCHEMA pgmq TO animus_reader;
GRANT EXECUTE ON FUNCTION animus.actor() TO animus_reader;

-- Every write to work items and every decision goes through these functions. They run as
-- their owner with a fixed search_path, and check who calls (session_user), the transition
-- and the lease themselves. Migrations create them so; asserting it here sets right one that
-- a later migration replaced without these attributes. A function a migration not applied
-- yet would create is skipped (and granted to nobody).
DO $$
DECLARE
    d record;
    f regprocedure;
BEGIN
    FOR d IN SELECT * FROM (VALUES
        ('animus.submit(text, jsonb)', 'animus_submitter'),
        -- operators may call decide(): it refuses them unless the gate names their role,
        -- and says which role it wanted
        ('animus.decide(uuid, text, text)', 'animus_approver, animus_operator'),
        -- engines: claim, and the moves of the items they hold; people: retry, dead-letter,
        -- cancel (animus work ...)
        ('animus.claim(text, int, int, text[], bool)', 'animus_operator'),
        -- with the faculties' own attempt limits (0027_faculty_attempts.sql)
        ('animus.claim(text, int, int, text[], bool, jsonb)', 'animus_operator'),
        ('animus.complete(uuid[], bigint[], int[], jsonb[], bigint[])', 'animus_operator'),
        ('animus.start(uuid, bigint, int)', 'animus_operator'),
        ('animus.extend_leases(text, uuid[], bigint[], int[], int)', 'animus_operator'),
        ('animus.fail(uuid, bigint, int, text, bigint)', 'animus_operator'),
        ('animus.release(uuid, bigint, int, text)', 'animus_operator'),
        ('animus.retry(uuid, float8, text)', 'animus_operator'),
        ('animus.dead_letter(uuid, text)', 'animus_operator'),
        ('animus.cancel(uuid, text)', 'animus_operator'),
        ('animus.add_usage(uuid, jsonb)', 'animus_operator'),
        -- a failed or cancelled attempt in one call (0014_one_trip_failure.sql)
        ('animus.fail_attempt(uuid, bigint, int, text, bigint, jsonb, jsonb, float8, text)',
         'animus_operator'),
        ('animus.cancel_attempt(uuid, bigint, int, bigint, jsonb, int)', 'animus_operator'),
        -- durable steps (0015_steps.sql): the lease holder records one; whoever submits a
        -- rerun or replay copies the original's steps into it (--from-step)
        ('animus.record_step(uuid, bigint, int, int, text, jsonb, text, timestamptz, bigint)',
         'animus_operator'),
        ('animus.copy_steps(uuid, uuid, text)', 'animus_submitter'),
        -- many steps in one call (0025_resume_in_one_read.sql), as record_step
        ('animus.record_steps(uuid[], bigint[], int[], int[], text[], jsonb[], text[], '
         'timestamptz[], bigint[])', 'animus_operator'),
        -- suspension (0017_waiting.sql): the lease holder suspends its attempt and takes
        -- the signals its waits are woken by; whoever submits work signals it
        ('animus.suspend(uuid, bigint, int, jsonb, timestamptz, bigint, jsonb)',
         'animus_operator'),
        ('animus.take_signal(uuid, bigint, int, text, int)', 'animus_operator'),
        ('animus.signal(uuid, text, jsonb)', 'animus_submitter'),
        -- many signals in one call (0023_signal_many.sql), as signal
        ('animus.signal_many(uuid[], text[], jsonb[])', 'animus_submitter'),
        -- engines create the queues they serve (animus up) without rights on schema pgmq
        ('animus.create_queue(text)', 'animus_operator'),
        -- live engines (0026_engines.sql): engines register, beat and deregister;
        -- operators ask them to stop; whoever reads sees the fleet (animus status)
        ('animus.engine_register(uuid, text, int, text, float8, int, text[], jsonb, jsonb, '
         'jsonb)', 'animus_operator'),
        ('animus.engine_heartbeat(uuid, jsonb, jsonb)', 'animus_operator'),
        ('animus.engine_deregister(uuid)', 'animus_operator'),
        ('animus.stop_engines(uuid, float8)', 'animus_operator'),
        ('animus.engine_lost(animus.engines)', 'animus_reader'),
        ('animus.status_view(int, int)', 'animus_reader'),
        -- what a fleet scales on (0035_scaling_depth.sql): KEDA's login reads it
        ('animus.scaling_depth(text, text[])', 'animus_reader')) AS x(fn, grantees) LOOP
        f := to_regprocedure(d.fn);
        CONTINUE WHEN f IS NULL;
        EXECUTE format('ALTER FUNCTION %s SECURITY DEFINER', f);
        EXECUTE format('ALTER FUNCTION %s SET search_path = pg_catalog, pg_temp', f);
        EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO %s', f, d.grantees);
    END LOOP;
END
$$;
-- Engines fix the memory embedding dimension the first time they open memory (DDL on
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
GRANT EXECUTE ON FUNCTION animus.memory_configure(text, int),
      animus.new_id()  -- the default id of a memory
   TO animus_operator;

-- Engines also seal the audit trail, write memories, schedule ticks and execution records.
GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA pgmq TO animus_operator;
GRANT SELECT, INSERT, UPDATE ON ALL TABLES IN SCHEMA pgmq TO animus_operator;
GRANT DELETE ON ALL TABLES IN SCHEMA pgmq TO animus_operator;
GRANT USAGE ON ALL SEQUENCES IN SCHEMA pgmq TO animus_operator;
GRANT SELECT, INSERT, UPDATE ON animus.schedule_ticks, animus.memories, animus.memory_config
   TO animus_operator;
GRANT DELETE ON animus.memories TO animus_operator;
GRANT INSERT ON animus.audit_seal, animus.audit_gaps, animus.execution_records,
      animus.environments TO animus_operator;
DO $$
BEGIN
    IF to_regclass('animus.faculty_files') IS NOT NULL THEN  -- from migration 0029 on
        GRANT INSERT ON animus.faculty_files TO animus_operator;
    END IF;
END
$$;
GRANT DELETE ON animus.audit_gaps TO animus_operator;
DO $$
BEGIN
    IF to_regclass('animus.console_users') IS NOT NULL THEN  -- from migration 0031 on
        -- the console's password hashes: for no role (the console reads them as the owner)
        REVOKE ALL ON animus.console_users FROM animus_reader, animus_submitter,
            animus_approver, animus_operator, animus_admin;
    END IF;
END
$$;

GRANT DELETE ON animus.work_items, animus.schedule_ticks TO animus_admin;  -- animus purge

-- A person may only record their own decisions (decide() runs as owner and checks).
ALTER TABLE animus.approvals ENABLE ROW LEVEL SECURITY;
DROP POLICY IF EXISTS approvals_read ON animus.approvals;
DROP POLICY IF EXISTS approvals_own ON animus.approvals;
CREATE POLICY approvals_read ON animus.approvals FOR SELECT USING (true);
CREATE POLICY approvals_own ON animus.approvals FOR INSERT
    WITH CHECK (approver = session_user);

-- Work items: everyone with a role reads; admins delete finished ones (a trigger keeps
-- live work). Nobody writes them but the functions above, which run as the owner.
ALTER TABLE animus.work_items ENABLE ROW LEVEL SECURITY;
DROP POLICY IF EXISTS work_items_read ON animus.work_items;
DROP POLICY IF EXISTS work_items_operate ON animus.work_items;
DROP POLICY IF EXISTS work_items_purge ON animus.work_items;
CREATE POLICY work_items_read ON animus.work_items FOR SELECT USING (true);
CREATE POLICY work_items_purge ON animus.work_items FOR DELETE TO animus_admin USING (true);
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


async def set_only_role(conn: Any, name: str, role: str, password: str) -> None:
    """Make ``name`` a login role with ``password`` that is a member of ``animus_<role>`` and
    of no other animus role, in one transaction. The roles are set up first where this
    database has not granted them their rights (roles belong to the server, grants to each
    database)."""
    ready = await conn.fetchval(
        "SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'animus_reader') "
        "AND has_schema_privilege('animus_reader', 'animus', 'USAGE')")
    if not ready:
        await setup_roles(conn)
    async with conn.transaction():
        await add_user(conn, name, role, password)
        for other in ROLES:
            if other != role:
                await conn.execute(f'REVOKE animus_{other} FROM "{name}"')


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


class RoleMember(msgspec.Struct, frozen=True, kw_only=True):
    """A database user and the animus roles it is a member of (directly)."""

    name: str
    roles: list[str]
    login: bool
    superuser: bool


async def members(conn: Any) -> list[RoleMember]:
    """Every database user that is a member of an animus role, by name."""
    rows = await conn.fetch(
        """SELECT u.rolname, array_agg(substr(g.rolname, 8) ORDER BY g.rolname) AS roles,
                  u.rolcanlogin, u.rolsuper
             FROM pg_auth_members m
             JOIN pg_roles g ON g.oid = m.roleid
             JOIN pg_roles u ON u.oid = m.member
            WHERE g.rolname = ANY ($1::text[]) AND NOT u.rolname = ANY ($1::text[])
            GROUP BY u.rolname, u.rolcanlogin, u.rolsuper
            ORDER BY u.rolname""", [f"animus_{r}" for r in ROLES])
    return [RoleMember(name=r[0], roles=list(r[1]), login=r[2], superuser=r[3]) for r in rows]


async def remove_user(conn: Any, name: str, *, drop: bool = False) -> list[str]:
    """Take ``name`` out of every animus role (and, with ``drop``, drop the login role);
    returns the roles it left. :class:`InvalidInput` when it is in none."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InvalidInput(f"user name {name!r}: use lowercase letters, digits and _")
    async with conn.transaction():
        left = [m.roles for m in await members(conn) if m.name == name]
        if not left:
            raise InvalidInput(f"{name} is a member of no animus role (animus roles list "
                               "shows who is)")
        for role in left[0]:
            await conn.execute(f'REVOKE animus_{role} FROM "{name}"')
        if drop:
            await conn.execute(f'DROP ROLE "{name}"')
    return left[0]
