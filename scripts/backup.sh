#!/usr/bin/env bash
# Back up the docker compose appliance into DIR/YYYYMMDD-HHMMSS/ (UTC):
#
#   scripts/backup.sh [DIR] [--db-only]
#
#   DIR        where to create the backup directory (default: backups/ in the repository)
#   --db-only  Postgres only; skip the observability volumes
#
# The backup directory holds
#   animus.dump        pg_dump -Fc of the animus database (docker compose exec postgres)
#   <volume>.tar.gz    unless --db-only: tempo-data, prometheus-data, loki-data and
#                      grafana-data, archived with tempo, prometheus, loki and grafana
#                      stopped for the moment it takes (they are started again after)
#   SHA256SUMS         sha256 of every file above (sha256sum -c format)
#   manifest.json      written last and atomically: without it the backup is partial, and
#                      scripts/restore.sh and `animus restore` refuse it
#
# Environment: ANIMUS_BACKUP_IMAGE (default alpine:3.20) is the image that runs tar on the
# volumes; COMPOSE_FILE and COMPOSE_PROJECT_NAME work as they do for docker compose.
set -euo pipefail

SERVICES=(tempo prometheus loki grafana)
VOLUMES=(tempo-data prometheus-data loki-data grafana-data)
IMAGE=${ANIMUS_BACKUP_IMAGE:-alpine:3.20}

usage() { sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; }
die() { echo "backup.sh: error: $*" >&2; exit 1; }
say() { echo "backup.sh: $*" >&2; }

ROOT=$(cd "$(dirname "$0")/.." && pwd)
DEST=""
DB_ONLY=0
for arg in "$@"; do
    case "$arg" in
        --db-only) DB_ONLY=1 ;;
        -h | --help) usage; exit 0 ;;
        -*) die "unknown option $arg (see --help)" ;;
        *) [ -z "$DEST" ] || die "more than one DIR: $DEST and $arg"; DEST=$arg ;;
    esac
done
DEST=${DEST:-$ROOT/backups}
mkdir -p -- "$DEST"
DEST=$(cd -- "$DEST" && pwd)   # absolute, before we change directory
cd "$ROOT"

command -v docker >/dev/null || die "docker is not installed"
docker compose version >/dev/null 2>&1 || die "docker compose (v2) is not available"

sha256() {
    if command -v sha256sum >/dev/null; then sha256sum -- "$@"; else shasum -a 256 -- "$@"; fi
}

# shellcheck source=scripts/compose-lib.sh
. "$ROOT/scripts/compose-lib.sh"

running postgres || die "the postgres service is not running: docker compose up -d postgres"

stamp=$(date -u +%Y%m%d-%H%M%S)
dir="$DEST/$stamp"
n=0
until mkdir -- "$dir" 2>/dev/null; do
    n=$((n + 1))
    [ "$n" -lt 100 ] || die "cannot create a backup directory in $DEST"
    dir="$DEST/$stamp-$n"
done

stopped=()
done_ok=0
cleanup() {
    if [ "${#stopped[@]}" -gt 0 ]; then
        say "starting ${stopped[*]} again"
        docker compose start "${stopped[@]}" >/dev/null || say "could not start ${stopped[*]}"
    fi
    if [ "$done_ok" -ne 1 ] && [ -n "$dir" ] && [ -d "$dir" ]; then
        say "backup failed: removing the partial $dir"
        rm -rf -- "$dir"
    fi
}
trap cleanup EXIT

psql_query() {   # run SQL from stdin in the postgres container, unaligned output
    # The variables are the container's own (POSTGRES_USER, POSTGRES_DB in docker-compose.yml).
    # shellcheck disable=SC2016
    docker compose exec -T postgres sh -c \
        'exec psql -X -q -At -F "|" -v ON_ERROR_STOP=1 -U "$POSTGRES_USER" -d "$POSTGRES_DB"' |
        tr -d '\r'
}

has_schema=$(psql_query <<<"SELECT to_regclass('animus.schema_migrations') IS NOT NULL")
[ "$has_schema" = t ] || die "the animus database has no animus schema: nothing to back up"
dbinfo=$(psql_query <<'SQL'
SELECT current_database(), current_setting('server_version'),
       current_setting('server_version_num'),
       (SELECT string_agg(version::text, ',' ORDER BY version) FROM animus.schema_migrations)
SQL
)
IFS='|' read -r db_name server_version server_num migrations <<<"$dbinfo"

say "dumping postgres into $dir/animus.dump"
# shellcheck disable=SC2016
docker compose exec -T postgres sh -c 'exec pg_dump -Fc -U "$POSTGRES_USER" -d "$POSTGRES_DB"' \
    </dev/null >"$dir/animus.dump"
[ -s "$dir/animus.dump" ] || die "pg_dump wrote nothing"

files=(animus.dump)
volumes_json=""
if [ "$DB_ONLY" -eq 0 ]; then
    proj=$(project)
    for service in "${SERVICES[@]}"; do
        if running "$service"; then stopped+=("$service"); fi
    done
    if [ "${#stopped[@]}" -gt 0 ]; then
        say "stopping ${stopped[*]} while their volumes are archived"
        docker compose stop "${stopped[@]}" >/dev/null
    fi
    for i in "${!VOLUMES[@]}"; do
        key=${VOLUMES[$i]}
        vol=$(volume_name "$proj" "$key")
        say "archiving volume $vol into $dir/$key.tar.gz"
        docker run --rm -v "$vol:/data:ro" "$IMAGE" \
            tar -C /data --numeric-owner -czf - . </dev/null >"$dir/$key.tar.gz"
        files+=("$key.tar.gz")
        volumes_json+="${volumes_json:+, }\"$key\": \"$key.tar.gz\""
    done
    if [ "${#stopped[@]}" -gt 0 ]; then
        docker compose start "${stopped[@]}" >/dev/null
        stopped=()
    fi
fi

(cd "$dir" && sha256 "${files[@]}") >"$dir/.SHA256SUMS.tmp"
mv -f -- "$dir/.SHA256SUMS.tmp" "$dir/SHA256SUMS"

files_json=""
while read -r sum name; do
    name=${name#\*}
    size=$(wc -c <"$dir/$name" | tr -d ' ')
    kind="tar.gz of a docker volume"
    [ "$name" != animus.dump ] || kind="pg_dump custom format"
    entry="    \"$name\": {\"sha256\": \"$sum\", \"size\": $size, \"kind\": \"$kind\"}"
    files_json+="${files_json:+,$'\n'}$entry"
done <"$dir/SHA256SUMS"

if [ "$DB_ONLY" -eq 1 ]; then
    db_only=true
    contents="the animus database only (--db-only)"
else
    db_only=false
    contents="the animus database and the observability volumes (traces, metrics, logs, Grafana data)"
fi

cat >"$dir/.manifest.json.tmp" <<EOF
{
  "format": "animus-backup",
  "format_version": 1,
  "producer": "scripts/backup.sh",
  "created_at": "$(date -u +%Y-%m-%dT%H:%M:%SZ)",
  "db_only": $db_only,
  "contents": "$contents",
  "dump": "animus.dump",
  "database": {
    "name": "$db_name",
    "where": "docker compose service postgres",
    "server_version": "$server_version",
    "server_version_num": ${server_num:-0},
    "migrations": [${migrations}]
  },
  "files": {
$files_json
  },
  "volumes": {${volumes_json}}
}
EOF
sync "$dir/.manifest.json.tmp" 2>/dev/null || sync
mv -f -- "$dir/.manifest.json.tmp" "$dir/manifest.json"
sync "$dir" 2>/dev/null || sync
done_ok=1

say "backup complete: $dir"
(cd "$dir" && ls -l -- "${files[@]}" SHA256SUMS manifest.json) >&2
if [ "$DB_ONLY" -eq 1 ]; then
    say "contents: postgres only (--db-only); the observability volumes were not backed up"
fi
printf '%s\n' "$dir"
