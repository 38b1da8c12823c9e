#!/usr/bin/env bash
# The README's main command (via `make demo`): the pipeline on the MovieLens-100K files that
# ship inside the recbole wheel: ingest into bronze Delta tables, build features and pairs.
set -euo pipefail
cd "$(dirname "$0")/.."
LAKE=${1:-lake}
PY=.venv/bin/python
start=$(date +%s)
$PY -m jobs.ingest --source movielens-100k --lake "$LAKE"
$PY -m jobs.build_features --lake "$LAKE" --prefix users.zip_code:3
$PY -m jobs.show_lake --lake "$LAKE" --rows 1
echo "demo finished in $(( $(date +%s) - start ))s; lake at $LAKE"
