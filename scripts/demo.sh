#!/usr/bin/env bash
# The README's main command (via `make demo`): the pipeline on the MovieLens-100K files that
# ship inside the recbole wheel. Today: ingest into bronze Delta tables and show them.
set -euo pipefail
cd "$(dirname "$0")/.."
LAKE=${1:-lake}
PY=.venv/bin/python
start=$(date +%s)
$PY -m jobs.ingest --source movielens-100k --lake "$LAKE"
$PY -m jobs.show_lake --lake "$LAKE"
echo "demo finished in $(( $(date +%s) - start ))s; lake at $LAKE"
