#!/usr/bin/env bash
# orient: check params.text and keep it for engage.
set -euo pipefail
python3 - <<'PY'
import json, sys
text = json.load(open("work.json"))["params"].get("text")
if not isinstance(text, str) or not text.strip():
    sys.exit("params.text must be a non-empty string")
json.dump({"text": text}, open("orient-out.json", "w"))
PY
