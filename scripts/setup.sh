#!/usr/bin/env bash
# Creates and fills Towerlake's two environments. Safe to re-run: on a ready machine it
# checks a stamp and returns in seconds.
#
#   .venv          pipeline env: Spark 4.0, Delta (delta-rs + delta-spark API), Petastorm,
#                  torch (CPU wheel), FAISS, Horovod (built here, C++17 recipe), recbole's
#                  MovieLens-100K files, dev tools.
#   .venv-airflow  Airflow 3.3 + the Spark provider (kept apart: see requirements/airflow.txt).
#   .jars          the delta-spark jars (native Delta engine), by scripts/fetch_jars.sh.
#
# Env knobs: PYTHON (interpreter, default python3.11), TOWERLAKE_SKIP_HOROVOD=1,
# TOWERLAKE_SKIP_AIRFLOW=1 (for a laptop that only wants the pipeline), TOWERLAKE_SKIP_JARS=1
# (no delta-spark jars: the jobs then use the delta-rs engine).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python3.11}
VENV=$ROOT/.venv
AF_VENV=$ROOT/.venv-airflow
HOROVOD_VERSION=0.28.1
RECBOLE_VERSION=1.2.1

log() { printf '[setup %s] %s\n' "$(date +%H:%M:%S)" "$*"; }
# pip, quietly: drop this machine's "Location ... is ignored" notes about unused local indexes.
pipq() { "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }
die() { printf '[setup] ERROR: %s\n' "$*" >&2; exit 1; }

command -v "$PY" >/dev/null || die "no $PY on PATH; set PYTHON=/path/to/python3.11"
command -v java >/dev/null || die "Spark needs Java 17 (java not on PATH): install openjdk-17-jre-headless"

# The jars first and on every run: fetch_jars.sh is a no-op in milliseconds when they are
# there, so a deleted .jars/ comes back even when the environments' stamp matches.
if [[ ${TOWERLAKE_SKIP_JARS:-0} == 1 ]]; then
  log "delta-spark jars skipped (TOWERLAKE_SKIP_JARS=1): jobs use the delta-rs engine"
else
  bash scripts/fetch_jars.sh
fi

stamp_of() {
  cat pyproject.toml requirements/airflow.txt scripts/setup.sh scripts/cxx17 scripts/fetch_jars.sh \
    | { sha256sum; echo "skip_horovod=${TOWERLAKE_SKIP_HOROVOD:-0} skip_airflow=${TOWERLAKE_SKIP_AIRFLOW:-0}"; } \
    | sha256sum | cut -d' ' -f1
}
STAMP=$(stamp_of)
if [[ -f $VENV/.towerlake-stamp && $(cat "$VENV/.towerlake-stamp") == "$STAMP" ]]; then
  log "environments are ready (stamp matches); nothing to do"
  exit 0
fi

start=$(date +%s)
setup_airflow() {
  [[ ${TOWERLAKE_SKIP_AIRFLOW:-0} == 1 ]] && { log "airflow env skipped (TOWERLAKE_SKIP_AIRFLOW=1)"; return 0; }
  [[ -x $AF_VENV/bin/python ]] || "$PY" -m venv "$AF_VENV"
  pipq "$AF_VENV/bin/pip" install -q --upgrade pip
  pipq "$AF_VENV/bin/pip" install -q -r requirements/airflow.txt
  "$AF_VENV/bin/airflow" version >/dev/null
}

# The Airflow env installs in the background while the pipeline env fills: both are mostly
# downloads, and the two envs share nothing.
AF_LOG=$(mktemp)
setup_airflow >"$AF_LOG" 2>&1 &
AF_PID=$!
log "airflow env: installing in the background ($AF_VENV)"

log "pipeline env: $VENV"
[[ -x $VENV/bin/python ]] || "$PY" -m venv "$VENV"
pipq "$VENV/bin/pip" install -q --upgrade pip
# torch first, by exact version: pip takes the machine's local CPU wheel (find-links).
pipq "$VENV/bin/pip" install -q torch==2.13.0
pipq "$VENV/bin/pip" install -q -e ".[dev]"
# recbole only for the MovieLens-100K files inside its wheel: --no-deps keeps its (torch,
# scipy, ...) requirements out, and nothing here ever imports recbole.
# (pip then warns that recbole's own requirements are missing: expected, so that is hidden.)
RB_LOG=$(mktemp)
"$VENV/bin/pip" install -q --no-deps "recbole==$RECBOLE_VERSION" >"$RB_LOG" 2>&1 || { cat "$RB_LOG" >&2; die "recbole install failed"; }
rm -f "$RB_LOG"
log "pipeline env: python packages installed"

if [[ ${TOWERLAKE_SKIP_HOROVOD:-0} == 1 ]]; then
  log "horovod skipped (TOWERLAKE_SKIP_HOROVOD=1)"
elif "$VENV/bin/python" -c "import horovod.torch" 2>/dev/null; then
  log "horovod already built"
else
  log "horovod $HOROVOD_VERSION: building with the C++17 wrapper (about 8 min on 2 cores the first time; pip caches the wheel)"
  # --no-build-isolation: Horovod's build must see the installed torch. pip caches the
  # built wheel (~/.cache/pip/wheels), so a later setup on this machine reuses it.
  pipq "$VENV/bin/pip" install -q cmake==3.31.6 packaging cloudpickle psutil pyyaml
  CXX=$ROOT/scripts/cxx17 CC=gcc MAKEFLAGS=-j$(nproc) \
    HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_MPI=1 \
    HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1 HOROVOD_CPU_OPERATIONS=gloo \
    pipq "$VENV/bin/pip" install -q --no-build-isolation "horovod[pytorch]==$HOROVOD_VERSION" \
    || die "horovod build failed; see the pip output above (TOWERLAKE_SKIP_HOROVOD=1 skips it)"
  "$VENV/bin/python" -c "import horovod.torch" || die "horovod built but does not import"
fi

if ! wait "$AF_PID"; then
  cat "$AF_LOG" >&2
  die "airflow env failed to install (log above)"
fi
log "airflow env: ready"
rm -f "$AF_LOG"

"$VENV/bin/python" - <<'PY'
import importlib.metadata as md
for name in ["torch", "pyspark", "pyarrow", "numpy", "pandas", "petastorm", "deltalake",
             "delta-spark", "faiss-cpu", "recbole"]:
    print(f"  {name:12s} {md.version(name)}")
PY
echo "$STAMP" >"$VENV/.towerlake-stamp"
log "done in $(( $(date +%s) - start ))s"
