"""``animus backup``, ``animus restore`` and ``animus purge``: keeping the database safe and small."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from animus_core.cli.context import open_db
from animus_core.cli.output import positive, print_json
from animus_core.infra.config import Settings
from animus_core.store.backup import (
    Manifest,
    Tool,
    backup,
    describe_counts,
    restore,
    verify_backup,
)
from animus_core.store.db import describe_url, resolve_url
from animus_core.store.retention import PurgeReport, parse_age, purge
from animus_core.values.errors import InvalidInput


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("backup", help="back up the database into DIR/YYYYMMDD-HHMMSS/ "
                       "(pg_dump and a checksummed manifest)")
    p.add_argument("dir", nargs="?", metavar="DIR",
                   help="where to create the backup directory (default: $ANIMUS_HOME/backups)")
    p.add_argument("--db-only", action="store_true",
                   help="the database only; the CLI never backs up observability data, which "
                        "lives in the compose stack (scripts/backup.sh), so this only labels it")
    p.add_argument("--json", action="store_true", help="print the manifest")
    p.set_defaults(handler=backup_cmd)

    p = sub.add_parser("restore", help="verify a backup, then replace the database with it")
    p.add_argument("dir", metavar="DIR", help="a backup directory (with its manifest.json)")
    p.add_argument("--db-only", action="store_true",
                   help="restore only the database of a compose backup that also holds "
                        "observability volumes (scripts/restore.sh restores those)")
    p.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")
    p.add_argument("--no-owner", action="store_true",
                   help="make the connecting user own the restored objects (for a server "
                        "without the original owner role)")
    p.set_defaults(handler=restore_cmd)

    p = sub.add_parser("purge", help="delete old finished work and archived queue messages "
                       "(audit rows are never deleted)")
    p.add_argument("--older-than", default="30d", metavar="AGE",
                   help="finished (resolved) or archived longer ago than this: 30d, 12h, 2w "
                        "(default 30d)")
    p.add_argument("--dry-run", action="store_true", help="count what would go; delete nothing")
    p.add_argument("--audit-export", type=Path, metavar="DIR",
                   help="first export the purged items' audit rows, with their seal hashes, "
                        "as JSON lines into DIR")
    p.add_argument("--batch-size", type=positive, default=1000, metavar="N",
                   help="rows per transaction (default 1000)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(handler=purge_cmd)


def _size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"  # pragma: no cover


def _tool(tool: Tool) -> str:
    if tool.origin == "bundled":
        return f"{tool.version}, the embedded server's ({tool.path})"
    return f"{tool.version} from PATH ({tool.path}): the bundled one is older than the server"


def _describe(manifest: Manifest) -> list[tuple[str, str]]:
    lines: list[tuple[str, str]] = []
    db = manifest.database
    if db is not None:
        lines.append(("database", f"{db.name} on PostgreSQL {db.server_version} ({db.where})"))
    lines.append(("made", f"{manifest.created_at.isoformat(timespec='seconds')} by "
                          f"{manifest.producer}"
                          + (f" (animus {manifest.animus_version})" if manifest.animus_version else "")))
    if manifest.pg_dump is not None:
        lines.append(("pg_dump", _tool(manifest.pg_dump)))
    for name, entry in sorted(manifest.files.items()):
        lines.append(("file", f"{name}  {_size(entry.size)}  sha256 {entry.sha256[:16]}"))
    if manifest.row_counts is not None:
        lines.append(("rows", describe_counts(manifest.row_counts)))
    lines.append(("contents", manifest.contents or ("database only" if manifest.db_only else "")))
    return lines


def _print_pairs(pairs: list[tuple[str, str]]) -> None:
    width = max(len(k) for k, _ in pairs)
    for key, value in pairs:
        print(f"  {key.ljust(width)}  {value}")


async def backup_cmd(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    url = await resolve_url(settings)
    dest = Path(args.dir) if args.dir else settings.home / "backups"
    path = await backup(url, dest, db_only=args.db_only)
    manifest = await asyncio.to_thread(verify_backup, path)  # read back what was written
    if args.json:
        print_json(manifest)
        return 0
    print(f"backup written to {path} (read back and verified)")
    _print_pairs(_describe(manifest))
    return 0


async def restore_cmd(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    src = Path(args.dir)
    manifest = await asyncio.to_thread(verify_backup, src)
    print(f"backup {src}: manifest and {len(manifest.files)} file(s) verified (sha256)")
    _print_pairs(_describe(manifest))
    url = await resolve_url(settings)
    where = describe_url(url)
    if not args.yes:
        if not sys.stdin.isatty():
            raise InvalidInput(
                f"restore replaces every work item, audit row, memory and queue in {where} "
                "with the backup's: pass --yes to confirm")
        answer = await asyncio.to_thread(
            input, f"Replace the animus database at {where} with this backup? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            print("nothing restored")
            return 1
    report = await restore(url, src, db_only=args.db_only, no_owner=args.no_owner,
                           verified=manifest)
    print(f"restored into {where} in {report.seconds:.1f}s with pg_restore {_tool(report.pg_restore)}")
    matched = (": every table matches the manifest" if report.manifest.row_counts is not None
               else "")
    print(f"  rows     {describe_counts(report.row_counts)}{matched}")
    if report.manifest.audit is not None and report.manifest.audit.head_seq is not None:
        print(f"  audit    chain ends at position {report.manifest.audit.head_seq} with the "
              "recorded hash; run `animus audit verify` to recompute it")
    if not report.manifest.volumes:
        print("  contents the database only: this backup holds no observability data "
              "(scripts/restore.sh restores that for the compose stack)")
    for note in report.notes:
        print(f"  note     {note}")
    return 0


def _print_purge(report: PurgeReport, args: argparse.Namespace) -> None:
    verb = "would delete" if report.dry_run else "deleted"
    cutoff = report.cutoff.isoformat(timespec="seconds")
    print(f"purge of finished work resolved before {cutoff} (older than {args.older_than})"
          + (": dry run, nothing was deleted" if report.dry_run else ""))
    states = ", ".join(f"{state} {n}" for state, n in sorted(report.items.items()))
    print(f"  {verb} {report.total_items} work items" + (f" ({states})" if states else ""))
    if report.kept_referenced:
        print(f"  kept {report.kept_referenced} old finished items that other rows still point "
              "at (newer work's parent_id, merged_into or replay_of, which go when that work "
              "does; approval decisions, which stay)")
    print(f"  {verb} {report.schedule_ticks} schedule ticks of those items")
    archived = ", ".join(f"{q} {n}" for q, n in report.archived_messages.items() if n)
    total = sum(report.archived_messages.values())
    print(f"  {verb} {total} archived queue messages" + (f" ({archived})" if archived else ""))
    print(f"  kept {report.audit_rows} audit rows of those items: the audit trail is append-only "
          "and never purged")
    if report.audit_export:
        print(f"  exported them first to {report.audit_export} (sha256 "
              f"{report.audit_export_sha256}); the rows stay in the database")
    elif args.audit_export and report.dry_run:
        print(f"  --audit-export: nothing written to {args.audit_export} in a dry run")
    elif args.audit_export:
        print(f"  --audit-export: no audit rows to export, nothing written to {args.audit_export}")


async def purge_cmd(args: argparse.Namespace) -> int:
    age = parse_age(args.older_than)
    async with await open_db() as db:
        report = await purge(db, older_than=age, dry_run=args.dry_run,
                             audit_export=args.audit_export, batch_size=args.batch_size)
    if args.json:
        print_json(report)
    else:
        _print_purge(report, args)
    return 0
