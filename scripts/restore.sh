#!/usr/bin/env bash
# Restore the docker compose appliance from a backup directory made by scripts/backup.sh
# (or the database part of one made by `animus backup`):
#
#   scripts/restore.sh DIR [--db-only] [--yes]
#
#   --db-only  restore Postgres only, even when the backup holds the observability volumes
#   --yes      do not ask for confirmation (needed when standard input is not a terminal)
#
# Nothing is touched until the backup is verified: manifest.json must be there (it is
# written last, so a partial backup has none), every file in SHA256SUMS must match its
# checksum, and every checksum must be the one manifest.json records.
#
# Postgres is restored in one transaction: drop the animus and pgmq schemas, replay the
# dump (pg_restore's order: tables, data, then indexes, constraints and triggers), commit.
# If anything fails the transaction rolls back and the database is as it was. The animus
# service is stopped meanwhile. Each volume is then emptied and refilled with its service
# stopped. Afterwards `animus audit verify` runs in a one-off animus container.
#
# Environment: ANIMUS_BACKUP_IMAGE (default alpine:3.20) runs tar on the volumes.
set -euo pipefail

SERVICES=(tempo prometheus loki grafana)
VOLUMES=(tempo-data prometheus-data loki-data grafana-data)
IMAGE=${ANIMUS_BACKUP_IMAGE:-alpine:3.20}
CONTAINER_DUMP=/tmp/animus-restore.dump

usage() { sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; }
die() { echo "restore.sh: error: $*" >&2; exit 1; }
say() { echo "restore.sh: $*" >&2; }

ROOT=$(cd "$(dirname "$0")/.." && pwd)
SRC=""
DB_ONLY=0
YES=0
for arg in "$@"; do
    case "$arg" in
        --db-only) DB_ONLY=1 ;;
        --yes | -y) YES=1 ;;
        -h | --help) usage; exit 0 ;;
        -*) die "unknown option $arg (see --help)" ;;
        *) [ -z "$SRC" ] || die "more than one DIR: $SRC and $arg"; SRC=$arg ;;
    esac
done
[ -n "$SRC" ] || die "usage: scripts/restore.sh DIR [--db-only] [--yes]"
[ -d "$SRC" ] || die "backup directory $SRC does not exist"
SRC=$(cd -- "$SRC" && pwd)
cd "$ROOT"

sha256check() {   # sha256sum -c of the list on stdin, or shasum without GNU coreutils
    if command -v sha256sum >/dev/null; then
        sha256sum --check --strict --quiet -
    else
        shasum -a 256 --check --strict --quiet -
    fi
}

# -- 1. verify, before touching anything ----------------------------------------------------

[ -f "$SRC/manifest.json" ] || die "$SRC has no manifest.json: the backup is partial \
(the manifest is written last, so the backup was interrupted) or not an animus backup; \
nothing was restored"
[ -f "$SRC/SHA256SUMS" ] || die "$SRC has no SHA256SUMS: cannot verify it; nothing was restored"
grep -Eq '^[0-9a-f]{64} [ *]animus\.dump$' "$SRC/SHA256SUMS" ||
    die "$SRC/SHA256SUMS lists no animus.dump; nothing was restored"
while read -r sum name; do
    grep -q "\"sha256\": *\"$sum\"" "$SRC/manifest.json" ||
        die "${name#\*}: its checksum in SHA256SUMS is not the one manifest.json records; nothing was restored"
done <"$SRC/SHA256SUMS"
restore_volumes=()
if [ "$DB_ONLY" -eq 0 ]; then
    for key in "${VOLUMES[@]}"; do
        if grep -Eq "^[0-9a-f]{64} [ *]$key\\.tar\\.gz\$" "$SRC/SHA256SUMS"; then
            restore_volumes+=("$key")
        fi
    done
    [ "${#restore_volumes[@]}" -gt 0 ] || die "$SRC holds only the database (made with \
--db-only, or by \`animus backup\`): pass --db-only to restore it"
    [ "${#restore_volumes[@]}" -eq "${#VOLUMES[@]}" ] || die "$SRC lacks some volume archives \
(it has ${restore_volumes[*]}): pass --db-only to restore only the database"
fi
# Check every file that is about to be restored.
pattern='animus\.dump'
for key in ${restore_volumes[@]+"${restore_volumes[@]}"}; do
    pattern+="|$key\\.tar\\.gz"
done
say "verifying checksums in $SRC"
if ! report=$(cd "$SRC" && grep -E "^[0-9a-f]{64} [ *]($pattern)\$" SHA256SUMS | sha256check 2>&1)
then
    die "checksum verification failed, the backup is corrupt or incomplete; nothing was restored:
$report"
fi
if [ "$DB_ONLY" -eq 1 ]; then
    say "backup verified: animus.dump matches its checksum"
else
    say "backup verified: animus.dump and ${#VOLUMES[@]} volume archives match their checksums"
fi

command -v docker >/dev/null || die "docker is not installed"
docker compose version >/dev/null 2>&1 || die "docker compose (v2) is not available"

what="the animus database"
[ "$DB_ONLY" -eq 1 ] || what="the animus database and the observability volumes"
if [ "$YES" -ne 1 ]; then
    [ -t 0 ] || die "restore replaces $what with the backup's: pass --yes to confirm"
    read -r -p "Replace $what with the backup in $SRC? [y/N] " answer
    case "$answer" in
        y | Y | yes | YES) ;;
        *) say "nothing restored"; exit 1 ;;
    esac
fi

# shellcheck source=scripts/compose-lib.sh
. "$ROOT/scripts/compose-lib.sh"

psql_query() {   # run SQL from stdin in the postgres container, unaligned output
    # The variables are the container's own (POSTGRES_USER, POSTGRES_DB in docker-compose.yml).
    # shellcheck disable=SC2016
    docker compose exec -T postgres sh -c \
        'exec psql -X -q -At -v ON_ERROR_STOP=1 -U "$POSTGRES_USER" -d "$POSTGRES_DB"' |
        tr -d '\r'
}

stopped=()
copied=0
cleanup() {
    if [ "$copied" -eq 1 ]; then
        docker compose exec -T postgres rm -f "$CONTAINER_DUMP" </dev/null >/dev/null 2>&1 || true
    fi
    if [ "${#stopped[@]}" -gt 0 ]; then
        say "starting ${stopped[*]} again"
        docker compose start "${stopped[@]}" >/dev/null || say "could not start ${stopped[*]}"
    fi
}
trap cleanup EXIT

# -- 2. postgres ----------------------------------------------------------------------------

say "starting postgres (if needed)"
docker compose up -d --wait postgres >/dev/null
if running animus; then
    say "stopping animus while its database is replaced"
    docker compose stop animus >/dev/null
    stopped+=(animus)
fi

copied=1
docker compose cp "$SRC/animus.dump" "postgres:$CONTAINER_DUMP" >/dev/null
say "restoring postgres (one transaction: all or nothing)"
# The variables are the container's own (POSTGRES_USER, POSTGRES_DB in docker-compose.yml).
# COMMIT is sent only when pg_restore produced the whole script: otherwise psql reaches the
# end of its input inside the transaction and the server rolls everything back.
# shellcheck disable=SC2016
if ! {
    printf '%s\n' "SET client_min_messages = warning;" "SET lock_timeout = '30s';" "BEGIN;" \
        "DROP SCHEMA IF EXISTS animus CASCADE;" "DROP SCHEMA IF EXISTS pgmq CASCADE;"
    if docker compose exec -T postgres pg_restore --file=- "$CONTAINER_DUMP" </dev/null; then
        printf '%s\n' "COMMIT;"
    else
        echo "restore.sh: pg_restore failed: rolling back" >&2
        exit 1
    fi
} | docker compose exec -T postgres sh -c \
    'exec psql -X -q -v ON_ERROR_STOP=1 -U "$POSTGRES_USER" -d "$POSTGRES_DB" >/dev/null'; then
    die "the postgres restore failed and was rolled back: the database is as it was"
fi
counts=$(psql_query <<'SQL'
ANALYZE;
SELECT (SELECT count(*) FROM animus.work_items) || ' work items, '
    || (SELECT count(*) FROM animus.audit_log) || ' audit rows, '
    || (SELECT count(*) FROM animus.memories) || ' memories';
SQL
)
say "postgres restored: $counts"

# -- 3. observability volumes ---------------------------------------------------------------

if [ "$DB_ONLY" -eq 0 ]; then
    proj=$(project)
    docker compose up --no-start "${SERVICES[@]}" >/dev/null   # creates missing volumes
    for service in "${SERVICES[@]}"; do
        if running "$service"; then
            docker compose stop "$service" >/dev/null
            stopped+=("$service")
        fi
    done
    for key in "${VOLUMES[@]}"; do
        vol=$(volume_name "$proj" "$key")
        say "restoring volume $vol from $key.tar.gz"
        docker run --rm -i -v "$vol:/data" "$IMAGE" \
            sh -c 'find /data -mindepth 1 -delete && tar -C /data --numeric-owner -xzpf -' \
            <"$SRC/$key.tar.gz"
    done
fi

# -- 4. start what was running, check the audit chain ---------------------------------------

if [ "${#stopped[@]}" -gt 0 ]; then
    say "starting ${stopped[*]} again"
    docker compose start "${stopped[@]}" >/dev/null
    stopped=()
fi
say "verifying the audit chain"
if ! docker compose run --rm --no-deps -T animus animus audit verify </dev/null; then
    die "the data was restored, but \`animus audit verify\` did not pass (see above)"
fi
say "restore complete from $SRC"
