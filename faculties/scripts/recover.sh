#!/usr/bin/env bash
# recover: exit 0 to retry while attempts remain, non-zero to dead-letter now.
echo "recovering $ANIMUS_WORK_ID after a failure in $ANIMUS_FAILED_PHASE" >&2
exit 0
