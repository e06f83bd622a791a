# Shared by scripts/backup.sh and scripts/restore.sh (sourced, not run): finding the compose
# project, its running services and the docker volumes behind its named volumes. Each script
# defines die() and ROOT before sourcing this.
# shellcheck shell=bash

running() {   # is compose service $1 running?
    docker compose ps --status running --services 2>/dev/null | grep -x -- "$1" >/dev/null
}

project() {
    local name
    name=$(docker compose config 2>/dev/null | awk '/^name:/ && !done { sub(/^name: */, ""); print; done = 1 }')
    [ -n "$name" ] || die "cannot read the compose project name (docker compose config failed)"
    printf '%s\n' "$name"
}

volume_name() {   # the docker volume behind compose volume $2 of project $1
    local vol
    vol=$(docker volume ls -q --filter "label=com.docker.compose.project=$1" \
        --filter "label=com.docker.compose.volume=$2")
    if [ -z "$vol" ] && docker volume inspect "$1_$2" >/dev/null 2>&1; then
        vol="$1_$2"
    fi
    [ -n "$vol" ] || die "volume $2 of compose project $1 does not exist (has the stack run?)"
    printf '%s\n' "$vol"
}
