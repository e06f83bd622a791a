"""Backups of the animus database, verified before anything is restored from them.

A backup is a directory ``DEST/YYYYMMDD-HHMMSS/`` (UTC) holding ``animus.dump`` (``pg_dump
-Fc`` of the whole database), ``SHA256SUMS`` (for ``sha256sum -c``) and ``manifest.json``,
written last and atomically: a directory without a manifest is a partial backup and is
refused. The manifest records every file's
sha256 and size, the row count of every table in the ``animus`` and ``pgmq`` schemas and
the head of the audit chain, all read in the very snapshot the dump was taken from.

Restoring checks the manifest and every checksum before it touches the database, then runs
one transaction: drop the ``animus`` and ``pgmq`` schemas, replay the dump in pg_restore's
order (tables, data, then indexes, constraints and triggers, so the audit trail's triggers
never see the restored rows), compare every row count and the audit chain head with the
manifest, and only then commit. Any failure rolls the whole restore back.

``scripts/backup.sh`` writes the same layout for the docker compose stack, plus archives of
the observability volumes; this module restores only the database part of such a backup.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import unquote, urlsplit, urlunsplit

import asyncpg
import msgspec

from animus_core.infra.embedded import pg_bin_dir
from animus_core.store import migrations
from animus_core.store.db import describe_url
from animus_core.values.errors import DatabaseError, DatabaseUnavailable, InvalidInput

__all__ = [
    "DUMP",
    "MANIFEST",
    "SUMS",
    "AuditHead",
    "DatabaseInfo",
    "FileEntry",
    "Manifest",
    "RestoreReport",
    "Tool",
    "backup",
    "describe_counts",
    "find_tool",
    "restore",
    "verify_backup",
]

MANIFEST = "manifest.json"
DUMP = "animus.dump"
SUMS = "SHA256SUMS"
FORMAT = "animus-backup"
FORMAT_VERSION = 1
SCHEMAS = ("animus", "pgmq")
_APP = "animus-backup"

CLI_FULL_CONTENTS = (
    "the animus database only (work items, audit trail, memories, queues, schedules). "
    "Observability data (traces, metrics, logs, Grafana dashboards) is not in this backup: "
    "it lives in the docker compose stack's volumes; back those up with scripts/backup.sh"
)
CLI_DB_ONLY_CONTENTS = "the animus database only (--db-only)"


# -- the manifest ------------------------------------------------------------------------------


class FileEntry(msgspec.Struct, frozen=True, kw_only=True):
    sha256: str
    size: int
    kind: str = ""


class Tool(msgspec.Struct, frozen=True, kw_only=True):
    """A PostgreSQL client program, its version, and where it came from."""

    name: str
    path: str
    version: str
    major: int
    origin: str  # "bundled" (the embedded server's) or "PATH"


class DatabaseInfo(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    where: str
    server_version: str
    server_version_num: int
    migrations: list[int] = []
    components: dict[str, str] = {}


class AuditHead(msgspec.Struct, frozen=True, kw_only=True):
    rows: int
    sealed: int
    head_seq: int | None = None
    head_hash: str | None = None


class Manifest(msgspec.Struct, frozen=True, kw_only=True):
    format: str
    format_version: int
    producer: str
    created_at: datetime
    db_only: bool
    files: dict[str, FileEntry]
    dump: str = DUMP
    contents: str = ""
    animus_version: str | None = None
    database: DatabaseInfo | None = None
    pg_dump: Tool | None = None
    row_counts: dict[str, int] | None = None
    audit: AuditHead | None = None
    volumes: dict[str, str] = {}  # compose backups: volume -> archive file


class RestoreReport(msgspec.Struct, frozen=True, kw_only=True):
    manifest: Manifest
    row_counts: dict[str, int]
    pg_restore: Tool
    seconds: float
    notes: list[str] = []


# -- client programs ---------------------------------------------------------------------------

_VERSION = re.compile(r"\(PostgreSQL\)\s+((\d+)\S*)")


def _tool_version(path: str) -> tuple[str, int] | None:
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30,
                             check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = _VERSION.search(out)
    return (m[1], int(m[2])) if m else None


def find_tool(name: str, server_major: int, *, bundled_dir: Path | None = None,
              search_path: str | None = None) -> Tool:
    """The bundled ``name`` (pg_dump, pg_restore, psql) unless it is older than the server,
    else the one on ``PATH`` if that is new enough; pg_dump cannot dump a newer server."""
    bundled = (bundled_dir or pg_bin_dir()) / name
    found = _tool_version(str(bundled)) if bundled.is_file() else None
    if found and found[1] >= server_major:
        return Tool(name=name, path=str(bundled), version=found[0], major=found[1], origin="bundled")
    on_path = shutil.which(name, path=search_path)
    other = _tool_version(on_path) if on_path else None
    if on_path and other and other[1] >= server_major:
        return Tool(name=name, path=on_path, version=other[0], major=other[1], origin="PATH")
    raise DatabaseError(
        f"no {name} can work with this PostgreSQL {server_major} server: the bundled {name} is "
        f"{found[0] if found else 'missing'}, {name} on PATH is "
        f"{other[0] if other else on_path or 'not found'}; install the PostgreSQL {server_major} "
        f"client programs (e.g. the postgresql-client-{server_major} package) and put them on PATH"
    )


def _libpq_target(url: str) -> tuple[str, dict[str, str]]:
    """The URL without its password (so it does not show in ``ps``) and the environment
    that passes the password instead."""
    parts = urlsplit(url)
    env = dict(os.environ)
    if parts.password is not None:
        env["PGPASSWORD"] = unquote(parts.password)
        user = parts.username or ""
        host = parts.netloc.rsplit("@", 1)[-1]
        parts = parts._replace(netloc=f"{user}@{host}" if user else host)
    return urlunsplit(parts), env


def _tail(text: str, lines: int = 6) -> str:
    kept = [ln for ln in text.strip().splitlines() if ln.strip()]
    errors = [ln for ln in kept if "ERROR" in ln or "FATAL" in ln or "error:" in ln]
    return " | ".join((errors or kept)[-lines:]) or "no message"


# -- files -------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _new_backup_dir(dest: Path, now: datetime) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    stamp = now.strftime("%Y%m%d-%H%M%S")
    for n in range(100):
        path = dest / (stamp if n == 0 else f"{stamp}-{n}")
        try:
            path.mkdir()
        except FileExistsError:
            continue
        return path
    raise InvalidInput(f"cannot create a backup directory for {stamp} in {dest}: 100 already exist")


def _write_synced(path: Path, data: bytes) -> None:
    """Write ``data`` under a temporary name, sync it, rename it into place, sync the
    directory: ``path`` either does not exist or is complete."""
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync(path.parent)


def _write_manifest(directory: Path, manifest: Manifest) -> None:
    _write_synced(directory / MANIFEST,
                  msgspec.json.format(msgspec.json.encode(manifest), indent=2) + b"\n")


def _plain_name(name: str) -> bool:
    return bool(name) and name not in (".", "..") and "/" not in name and "\\" not in name


def verify_backup(directory: Path) -> Manifest:
    """Read the manifest and check every file it lists; raise :class:`InvalidInput` naming
    the file when the backup is partial, truncated or corrupt. Reads only."""
    if not directory.is_dir():
        raise InvalidInput(f"backup directory {directory} does not exist or is not a directory")
    path = directory / MANIFEST
    if not path.is_file():
        raise InvalidInput(
            f"{directory} has no {MANIFEST}: the backup is partial (the manifest is written "
            "last, so the backup was interrupted) or this is not an animus backup; nothing "
            "was restored"
        )
    try:
        manifest = msgspec.json.decode(path.read_bytes(), type=Manifest)
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        raise InvalidInput(f"{path} is not a valid backup manifest: {e}") from None
    if manifest.format != FORMAT:
        raise InvalidInput(f"{path}: format is {manifest.format!r}, not {FORMAT!r}")
    if manifest.format_version > FORMAT_VERSION:
        raise InvalidInput(
            f"{path}: format_version {manifest.format_version} is newer than this animus reads "
            f"({FORMAT_VERSION}): restore it with a newer animus"
        )
    if manifest.dump not in manifest.files:
        raise InvalidInput(f"{path} lists no database dump ({manifest.dump})")
    for name in manifest.volumes.values():
        if name not in manifest.files:
            raise InvalidInput(f"{path}: volume archive {name} is not among the listed files")
    for name, entry in sorted(manifest.files.items()):
        if not _plain_name(name):
            raise InvalidInput(f"{path}: {name!r} is not a plain file name")
        file = directory / name
        if not file.is_file():
            raise InvalidInput(
                f"{file} is missing: the manifest lists it, so the backup is incomplete; "
                "nothing was restored"
            )
        size = file.stat().st_size
        if size != entry.size:
            raise InvalidInput(
                f"{file} is {size} bytes but the manifest says {entry.size}: the file was "
                "truncated or changed; the backup is corrupt and nothing was restored"
            )
        digest = _sha256(file)
        if digest != entry.sha256.lower():
            raise InvalidInput(
                f"{file} fails its checksum (sha256 {digest[:16]}..., the manifest says "
                f"{entry.sha256[:16]}...): the file is corrupt; nothing was restored"
            )
    return manifest


# -- reading the database ----------------------------------------------------------------------


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


async def _connect(url: str, app: str) -> asyncpg.Connection:
    try:
        return await asyncpg.connect(url, server_settings={"application_name": app}, timeout=10)
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as e:
        raise DatabaseUnavailable(f"cannot connect to Postgres at {describe_url(url)}: {e}") from e


async def _tables(conn: asyncpg.Connection) -> list[str]:
    rows = await conn.fetch(
        """SELECT n.nspname || '.' || c.relname FROM pg_class c
             JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE n.nspname = ANY ($1::text[]) AND c.relkind IN ('r', 'p')
              AND NOT c.relispartition
            ORDER BY 1""",
        list(SCHEMAS),
    )
    return [r[0] for r in rows]


def _qualified(table: str) -> str:
    schema, _, name = table.partition(".")
    return f"{_ident(schema)}.{_ident(name)}"


async def _row_counts(conn: asyncpg.Connection) -> dict[str, int]:
    return {t: await conn.fetchval(f"SELECT count(*) FROM {_qualified(t)}")
            for t in await _tables(conn)}


async def _audit_head(conn: asyncpg.Connection) -> AuditHead | None:
    if not await conn.fetchval("SELECT to_regclass('animus.audit_seal') IS NOT NULL"):
        return None
    head = await conn.fetchrow(
        "SELECT seq, encode(hash, 'hex') AS hash FROM animus.audit_seal ORDER BY seq DESC LIMIT 1")
    return AuditHead(
        rows=await conn.fetchval("SELECT count(*) FROM animus.audit_log"),
        sealed=await conn.fetchval("SELECT count(*) FROM animus.audit_seal"),
        head_seq=head["seq"] if head else None,
        head_hash=head["hash"] if head else None,
    )


async def _database_info(conn: asyncpg.Connection, url: str) -> DatabaseInfo:
    info = await conn.fetchrow(
        """SELECT current_database() AS name, current_setting('server_version') AS version,
                  current_setting('server_version_num')::int AS num""")
    applied: list[int] = []
    components: dict[str, str] = {}
    if await conn.fetchval("SELECT to_regclass('animus.schema_migrations') IS NOT NULL"):
        applied = [r[0] for r in await conn.fetch(
            "SELECT version FROM animus.schema_migrations ORDER BY version")]
        components = {r["name"]: f"{r['version']} ({r['install']})" for r in await conn.fetch(
            "SELECT name, install, version FROM animus.components ORDER BY name")}
    return DatabaseInfo(name=info["name"], where=describe_url(url),
                        server_version=info["version"], server_version_num=info["num"],
                        migrations=applied, components=components)


async def _run(cmd: Sequence[str], env: dict[str, str], what: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE, env=env)
    _, err = await proc.communicate()
    if proc.returncode != 0:
        raise DatabaseError(f"{what} failed (exit {proc.returncode}): "
                            f"{_tail(err.decode(errors='replace'))}")


# -- backup ------------------------------------------------------------------------------------


async def backup(url: str, dest_dir: Path, *, db_only: bool, producer: str = "animus backup") -> Path:
    """Dump the database at ``url`` into a new ``dest_dir/YYYYMMDD-HHMMSS/``; return it.

    Row counts and the audit chain head are read in the snapshot pg_dump dumps (exported
    from a repeatable-read transaction), so they match the dump exactly even while engines
    keep working. On failure the new directory is removed.
    """
    from animus_core.values.version import __version__

    conn = await _connect(url, _APP)
    try:
        db = await _database_info(conn, url)
        if not await conn.fetchval("SELECT to_regnamespace('animus') IS NOT NULL"):
            raise InvalidInput(
                f"the database at {db.where} has no animus schema: there is nothing to back up "
                "(is DATABASE_URL right? `animus db migrate` creates the schema)")
        tool = await asyncio.to_thread(find_tool, "pg_dump", db.server_version_num // 10000)
        now = datetime.now(UTC)
        directory = await asyncio.to_thread(_new_backup_dir, dest_dir, now)
        try:
            target, env = _libpq_target(url)
            env["PGAPPNAME"] = _APP
            async with conn.transaction(isolation="repeatable_read", readonly=True):
                snapshot = await conn.fetchval("SELECT pg_export_snapshot()")
                counts = await _row_counts(conn)
                head = await _audit_head(conn)
                await _run([tool.path, "--format=custom", f"--snapshot={snapshot}",
                            f"--file={directory / DUMP}", f"--dbname={target}"],
                           env, f"{tool.path} (pg_dump {tool.version})")
            dump = directory / DUMP
            digest = await asyncio.to_thread(_sha256, dump)
            await asyncio.to_thread(_fsync, dump)
            # for `sha256sum -c` and scripts/restore.sh; the manifest stays the authority
            await asyncio.to_thread(_write_synced, directory / SUMS, f"{digest}  {DUMP}\n".encode())
            manifest = Manifest(
                format=FORMAT, format_version=FORMAT_VERSION, producer=producer,
                animus_version=__version__, created_at=now, db_only=db_only,
                contents=CLI_DB_ONLY_CONTENTS if db_only else CLI_FULL_CONTENTS,
                dump=DUMP, database=db, pg_dump=tool,
                files={DUMP: FileEntry(sha256=digest, size=dump.stat().st_size,
                                       kind="pg_dump custom format")},
                row_counts=counts, audit=head,
            )
            await asyncio.to_thread(_write_manifest, directory, manifest)
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)
            raise
    finally:
        await conn.close()
    return directory


# -- restore -----------------------------------------------------------------------------------


def _check_counts_sql(manifest: Manifest) -> str:
    """A DO block, run just before COMMIT, that fails the restore on any difference."""
    checks: list[str] = []
    for table, expected in sorted((manifest.row_counts or {}).items()):
        schema, _, name = table.partition(".")
        if schema not in SCHEMAS or not name:
            raise InvalidInput(f"the manifest counts rows of {table!r}, which is not an animus "
                               "or pgmq table")
        checks.append(
            f"    SELECT count(*) INTO n FROM {_qualified(table)};\n"
            f"    IF n <> {int(expected)} THEN\n"
            f"        RAISE EXCEPTION 'restore check failed: % has % rows, the backup manifest "
            f"says %', {_literal(table)}, n, {int(expected)};\n"
            f"    END IF;")
    head = manifest.audit
    if head is not None and head.head_seq is not None and head.head_hash is not None:
        if not re.fullmatch(r"[0-9a-f]{64}", head.head_hash):
            raise InvalidInput(f"the manifest's audit head hash {head.head_hash!r} is not hex")
        checks.append(
            f"    IF NOT EXISTS (SELECT 1 FROM animus.audit_seal WHERE seq = {int(head.head_seq)}\n"
            f"                      AND hash = decode('{head.head_hash}', 'hex'))\n"
            f"       OR EXISTS (SELECT 1 FROM animus.audit_seal WHERE seq > {int(head.head_seq)}) THEN\n"
            f"        RAISE EXCEPTION 'restore check failed: the audit chain does not end at "
            f"position {int(head.head_seq)} with the hash the manifest records';\n"
            f"    END IF;")
    if not checks:
        return ""
    body = "\n".join(checks)
    return f"DO $animus_restore_check$\nDECLARE n bigint;\nBEGIN\n{body}\nEND\n$animus_restore_check$;\n"


@contextlib.contextmanager
def _scratch() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="animus-restore-") as d:
        yield Path(d)


async def _pipe_restore(restore_cmd: list[str], psql_cmd: list[str], env: dict[str, str],
                        prefix: str, suffix: str, scratch: Path) -> None:
    """``pg_restore -f -`` into psql, between our prefix and suffix. The suffix (checks and
    COMMIT) is sent only when pg_restore produced the whole script: a truncated script
    ends without COMMIT, and the server rolls everything back when psql disconnects."""
    with (scratch / "pg_restore.err").open("w+b") as rerr, (scratch / "psql.err").open("w+b") as perr:
        producer = await asyncio.create_subprocess_exec(
            *restore_cmd, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=rerr, env=env)
        consumer = await asyncio.create_subprocess_exec(
            *psql_cmd, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL,
            stderr=perr, env=env)
        assert producer.stdout is not None
        assert consumer.stdin is not None
        broken = False
        try:
            consumer.stdin.write(prefix.encode())
            await consumer.stdin.drain()
            while chunk := await producer.stdout.read(1 << 16):
                consumer.stdin.write(chunk)
                await consumer.stdin.drain()
        except (BrokenPipeError, ConnectionResetError):
            broken = True  # psql stopped at an error; its stderr says which
            with contextlib.suppress(ProcessLookupError):
                producer.kill()
        restore_rc = await producer.wait()
        if restore_rc == 0 and not broken:
            try:
                consumer.stdin.write(suffix.encode())
                await consumer.stdin.drain()
            except (BrokenPipeError, ConnectionResetError):
                broken = True
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            consumer.stdin.close()
            await consumer.stdin.wait_closed()
        psql_rc = await consumer.wait()
        perr.seek(0)
        rerr.seek(0)
        psql_err = perr.read().decode(errors="replace")
        restore_err = rerr.read().decode(errors="replace")
    if psql_rc != 0 or broken:
        hint = ""
        if re.search(r'role "[^"]*" does not exist', psql_err):
            hint = ("; the backup names roles this server lacks: create the animus roles first "
                    "(`animus db migrate`, then `animus roles setup`), and restore with "
                    "--no-owner if the owner role is missing")
        raise DatabaseError(
            "the restore failed and was rolled back, the database is as it was: "
            f"{_tail(psql_err)}{hint}")
    if restore_rc != 0:
        raise DatabaseError(
            f"pg_restore could not read the dump (exit {restore_rc}): {_tail(restore_err)}; "
            "the restore was rolled back, the database is as it was")


async def restore(url: str, src_dir: Path, *, db_only: bool, no_owner: bool = False,
                  lock_timeout: float = 10.0, verified: Manifest | None = None) -> RestoreReport:
    """Replace the ``animus`` and ``pgmq`` schemas at ``url`` with the backup in ``src_dir``.

    The backup is verified first (manifest, every file's size and sha256, the dump's table
    of contents); a partial or corrupt backup raises :class:`InvalidInput` and the database
    is not touched (``verified``: what :func:`verify_backup` already returned for it).
    Animus processes connected to the database must be stopped first.
    """
    from animus_core.values.version import __version__

    started = time.monotonic()
    manifest = (verified if verified is not None
                else await asyncio.to_thread(verify_backup, src_dir))
    notes: list[str] = []
    if manifest.volumes:
        if not db_only:
            raise InvalidInput(
                f"{src_dir} also holds observability volumes ({', '.join(sorted(manifest.volumes))}), "
                "which only scripts/restore.sh can restore (it runs docker): use it, or pass "
                "--db-only to restore just the database")
        notes.append("the observability volume archives in this backup were not restored "
                     "(--db-only; scripts/restore.sh restores them)")
    if manifest.database is not None:
        known = {m.version for m in migrations.load()}
        unknown = [v for v in manifest.database.migrations if v not in known]
        if unknown:
            raise InvalidInput(
                f"the backup was made by animus {manifest.animus_version} with migration(s) "
                f"{', '.join(f'{v:04d}' for v in unknown)}, which this animus ({__version__}) "
                "does not know: upgrade animus before restoring it")
        pending = sorted(known - set(manifest.database.migrations))
        if pending:
            notes.append(
                f"the backup predates migration(s) {', '.join(f'{v:04d}' for v in pending)}: "
                "run `animus db migrate` (the embedded database migrates on its next use)")
    if manifest.row_counts is None:
        notes.append("the manifest has no row counts (not written by `animus backup`): the "
                     "restored rows were not counted against it")
    check_sql = _check_counts_sql(manifest)

    conn = await _connect(url, "animus-restore")
    try:
        server_num = await conn.fetchval("SELECT current_setting('server_version_num')::int")
        source = manifest.database
        if source is not None and source.server_version_num // 10000 > server_num // 10000:
            raise InvalidInput(
                f"the backup comes from PostgreSQL {source.server_version} and this server runs "
                f"{server_num // 10000}: restoring into an older major version is not supported "
                "(the schema may use what the older server lacks, such as uuidv7); restore into "
                f"PostgreSQL {source.server_version_num // 10000} or newer; nothing was restored")
        pg_restore = await asyncio.to_thread(find_tool, "pg_restore", server_num // 10000)
        psql = await asyncio.to_thread(find_tool, "psql", server_num // 10000)
        target, env = _libpq_target(url)
        env["PGAPPNAME"] = "animus-restore"
        dump = src_dir / manifest.dump
        with _scratch() as scratch:
            toc = await asyncio.create_subprocess_exec(
                pg_restore.path, "--list", str(dump), stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env)
            out, err = await toc.communicate()
            if toc.returncode != 0:
                raise InvalidInput(
                    f"{dump} is not a dump that {pg_restore.path} ({pg_restore.version}) can "
                    f"read: {_tail(err.decode(errors='replace'))}; nothing was restored")
            entries = out.decode(errors="replace").splitlines()
            if any(re.match(r"^\d+; \d+ \d+ (BLOB|LARGE OBJECT)", e) for e in entries):
                raise InvalidInput(f"{dump} holds large objects, which animus never writes: "
                                   "restore it by hand with pg_restore")
            # Comments on extensions need the extension's owner and say nothing we need.
            kept = [e for e in entries if not re.match(r"^\d+; \d+ \d+ COMMENT - EXTENSION ", e)]
            (scratch / "toc.list").write_text("\n".join(kept) + "\n")

            others = await conn.fetch(
                """SELECT pid, application_name, coalesce(client_addr::text, 'local') AS client
                     FROM pg_stat_activity
                    WHERE datname = current_database() AND pid <> pg_backend_pid()
                      AND application_name LIKE 'animus%' ORDER BY pid""")
            if others:
                who = ", ".join(f"{r['application_name']} from {r['client']}"
                                for r in others[:5])
                raise DatabaseError(
                    f"{len(others)} animus connection(s) are open on {describe_url(url)}: {who} "
                    "(Postgres backend pids "
                    f"{', '.join(str(r['pid']) for r in others[:5])}, not the processes that "
                    "opened them). Stop every engine (animus up; `animus status` lists them "
                    "with their hosts and pids) and command using this database, then restore "
                    "again; nothing was restored")

            prefix = (
                "SET client_min_messages = warning;\n"
                f"SET lock_timeout = '{int(lock_timeout * 1000)}ms';\n"
                "BEGIN;\n"
                + "".join(f"DROP SCHEMA IF EXISTS {_ident(s)} CASCADE;\n" for s in SCHEMAS)
            )
            restore_cmd = [pg_restore.path, "--file=-", f"--use-list={scratch / 'toc.list'}"]
            if no_owner:
                restore_cmd.append("--no-owner")
            restore_cmd.append(str(dump))
            psql_cmd = [psql.path, "--no-psqlrc", "--quiet", "--set=ON_ERROR_STOP=1",
                        f"--dbname={target}"]
            await _pipe_restore(restore_cmd, psql_cmd, env, prefix, check_sql + "COMMIT;\n",
                                scratch)

        counts = await _row_counts(conn)
        for table in counts:
            await conn.execute(f"ANALYZE {_qualified(table)}")
    finally:
        await conn.close()
    if manifest.row_counts is not None and counts != manifest.row_counts:
        # checked before COMMIT already: a difference now is a write since then
        diff = sorted(set(counts.items()) ^ set(manifest.row_counts.items()))
        notes.append(f"the restore committed with the manifest's row counts; something wrote "
                     f"to the database since: {diff}")
    return RestoreReport(manifest=manifest, row_counts=counts, pg_restore=pg_restore,
                         seconds=time.monotonic() - started, notes=notes)


def describe_counts(counts: dict[str, int]) -> str:
    """``1,204 work items, 9,311 audit rows, ...`` for the tables people ask about."""
    names = (("animus.work_items", "work items"), ("animus.audit_log", "audit rows"),
             ("animus.memories", "memories"), ("animus.schedule_ticks", "schedule ticks"))
    parts = [f"{counts[t]:,} {label}" for t, label in names if t in counts]
    live = sum(n for t, n in counts.items() if t.startswith("pgmq.q_"))
    archived = sum(n for t, n in counts.items() if t.startswith("pgmq.a_"))
    parts.append(f"{live:,} queued messages ({archived:,} archived)")
    return ", ".join(parts)
