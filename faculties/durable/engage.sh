#!/usr/bin/env bash
# engage: count the words once (a durable step), then wait for the signal "go".
set -euo pipefail
words=$(animus step count -- python3 -c \
    'import json; print(len(json.load(open("orient-out.json"))["text"].split()))')
if [ "${ANIMUS_RESUMED:-}" != 1 ]; then
    # the first run: suspend the focus until someone sends "go", for an hour at most
    echo '{"wait_for": "go", "timeout": 3600}' > suspend.json
    exit 0
fi
# the run that resumes: resume.json holds the signal's payload, or says the wait timed out
python3 - "$words" <<'PY'
import json, sys
resumed = json.load(open("resume.json"))
json.dump({"words": int(sys.argv[1]), "approved": not resumed.get("timed_out", False),
           "note": resumed.get("payload")}, open("engage-out.json", "w"))
PY
