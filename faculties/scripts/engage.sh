#!/usr/bin/env bash
# engage: do the work (here: upper-case the text).
set -euo pipefail
python3 - <<'PY'
import json
content = json.load(open("orient-out.json"))["content"]
json.dump({"result": content.upper(), "words": len(content.split())}, open("engage-out.json", "w"))
PY
