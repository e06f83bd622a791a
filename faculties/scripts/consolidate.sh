#!/usr/bin/env bash
# consolidate: what this writes to consolidate-out.json becomes the outcome.
set -euo pipefail
cp engage-out.json consolidate-out.json
