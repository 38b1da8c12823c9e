#!/usr/bin/env bash
# A local Airflow that runs Towerlake's DAGs (docs/airflow.md): AIRFLOW_HOME under the repo
# (.airflow/, git-ignored), airflow_dags/ as the DAGs folder, the SQLite metadata DB
# migrated, the one-slot lake pool created (a task whose pool is missing waits forever
# without an error) and the spark_default connection given by environment variable
# (`airflow db migrate` creates no connections in Airflow 3); then `airflow standalone`
# (scheduler, DAG processor, triggerer and the UI on http://localhost:8080, or
# TOWERLAKE_AIRFLOW_PORT; it prints the admin password).
#
#   scripts/airflow.sh          set up, then run airflow standalone   (make airflow)
#   scripts/airflow.sh setup    set up only
#
# Set before starting (or as Airflow Variables): TOWERLAKE_SOURCE_ARGS (the ingest source,
# required), TOWERLAKE_LAKE (default ./lake), TOWERLAKE_TRAIN_ARGS etc. (airflow_dags/towerlake_ops.py).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
export AIRFLOW_HOME=${AIRFLOW_HOME:-$ROOT/.airflow}
export AIRFLOW__CORE__DAGS_FOLDER=$ROOT/airflow_dags
export AIRFLOW__CORE__LOAD_EXAMPLES=False
export TOWERLAKE_HOME=${TOWERLAKE_HOME:-$ROOT}
export TOWERLAKE_PYTHON=${TOWERLAKE_PYTHON:-$ROOT/.venv/bin/python}
export TOWERLAKE_LAKE=${TOWERLAKE_LAKE:-$ROOT/lake}
# The Spark master of the spark-submit tasks (feature_backfill); a cluster: spark://host:7077, yarn, k8s://...
export AIRFLOW_CONN_SPARK_DEFAULT=${AIRFLOW_CONN_SPARK_DEFAULT:-'{"conn_type": "spark", "host": "local[*]"}'}
# The API server's port (UI and the execution API the task runners call back). Airflow 3's
# task runners reach it through [api] base_url, which must name the same port, or every task
# hangs in "Pre Execute" and the executor logs "Connection refused".
PORT=${TOWERLAKE_AIRFLOW_PORT:-8080}
export AIRFLOW__API__PORT=${AIRFLOW__API__PORT:-$PORT}
export AIRFLOW__API__BASE_URL=${AIRFLOW__API__BASE_URL:-http://localhost:$AIRFLOW__API__PORT}
AIRFLOW=$ROOT/.venv-airflow/bin/airflow

log() { printf '[airflow %s] %s\n' "$(date +%H:%M:%S)" "$*"; }
[[ -x $AIRFLOW ]] || { echo "no $AIRFLOW: run make setup first" >&2; exit 1; }
[[ -x $TOWERLAKE_PYTHON ]] || { echo "no pipeline python at $TOWERLAKE_PYTHON: run make setup first" >&2; exit 1; }
mkdir -p "$AIRFLOW_HOME"

log "AIRFLOW_HOME=$AIRFLOW_HOME, DAGs from $AIRFLOW__CORE__DAGS_FOLDER, lake $TOWERLAKE_LAKE"
"$AIRFLOW" db migrate >"$AIRFLOW_HOME/db-migrate.log" 2>&1 || { cat "$AIRFLOW_HOME/db-migrate.log" >&2; exit 1; }
"$AIRFLOW" pools set towerlake_lake 1 "Towerlake lake writers: one task at a time" >/dev/null
log "metadata DB migrated; pool towerlake_lake (1 slot) ready"
if [[ -z ${TOWERLAKE_SOURCE_ARGS:-} ]]; then
  log "note: TOWERLAKE_SOURCE_ARGS is not set; the ingest tasks fail until it is, e.g."
  log "      export TOWERLAKE_SOURCE_ARGS='--source csv --mapping /data/mapping.toml'"
fi
[[ ${1:-} == setup ]] && exit 0
# standalone starts its components as `airflow ...` from PATH (the jobs' own PATH is set per task).
export PATH=$ROOT/.venv-airflow/bin:$PATH
exec "$AIRFLOW" standalone
