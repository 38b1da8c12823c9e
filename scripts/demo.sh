#!/usr/bin/env bash
# The README's main command (via `make demo`): the whole pipeline on the MovieLens-100K files
# that ship inside the recbole wheel: ingest -> features + pairs -> train -> item embeddings +
# FAISS index -> publish a release -> recommend -> report.
set -euo pipefail
cd "$(dirname "$0")/.."
LAKE=${1:-lake}
PY=.venv/bin/python
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
start=$(date +%s)
step() { printf '\n==== %s (%ss)\n' "$*" "$(( $(date +%s) - start ))"; }
# The Delta engine the jobs will use (each Spark job also logs "Delta engine: ..." at start):
# native delta-spark when setup put its jars in .jars/, delta-rs otherwise or with
# TOWERLAKE_DELTA_ENGINE=delta-rs.
ENGINE=$($PY -c 'from jobs.spark_context import delta_session_conf as c; print("native (delta-spark jars in .jars/)" if "spark.sql.extensions" in c({}) else "delta-rs (Spark writes Parquet, delta-rs commits)")')
echo "Delta engine: $ENGINE"
step "ingest MovieLens-100K"
$PY -m jobs.ingest --source movielens-100k --lake "$LAKE"
step "features and training pairs"
$PY -m jobs.build_features --lake "$LAKE" --prefix users.zip_code:3
step "train (default preset)"
$PY -m jobs.train --lake "$LAKE" --no-progress
step "item embeddings + FAISS index"
$PY -m jobs.build_index --lake "$LAKE"
step "publish (quality gates, atomic release)"
$PY -m jobs.publish --lake "$LAKE"
step "recommend for user 196"
$PY -m jobs.recommend --lake "$LAKE" --user-id 196 --k 10
step "report"
$PY -m jobs.report --lake "$LAKE"
echo
echo "demo finished in $(( $(date +%s) - start ))s; lake at $LAKE; report at $LAKE/report/report.md"
