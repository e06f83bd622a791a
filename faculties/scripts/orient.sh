#!/usr/bin/env bash
# orient: read the work item and note what engage needs.
set -euo pipefail
python3 - <<'PY'
import json
work = json.load(open("work.json"))
content = work["params"].get("content")
if not isinstance(content, str):
    raise SystemExit("params.content must be a string")
json.dump({"content": content}, open("orient-out.json", "w"))
PY
