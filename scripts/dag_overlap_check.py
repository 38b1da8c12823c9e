"""Nightly, hourly and a backfill started together under a real scheduler: do lake writers
ever overlap, and does the hourly yield to the nightly? (docs/airflow.md)

Run with the Airflow env's python; it sets up a fresh AIRFLOW_HOME and lake in a temp
folder (scripts/airflow.sh setup), starts ``airflow standalone``, unpauses the nightly and
hourly DAGs (with catchup off the scheduler creates each one's latest interval at once:
the nightly for yesterday, the hourly for the last hour) and triggers ``feature_backfill``
in the same moment, waits for the three runs, then prints every task instance by start time
and checks from their start/end times that no two lake-writing tasks overlapped and that the
hourly run was skipped while the nightly ran.

  .venv-airflow/bin/python scripts/dag_overlap_check.py [--keep]

Exit 0 when both hold. It takes as long as a nightly run on a small synthetic lake
(minutes); the synthetic day is the day before today (UTC).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
AIRFLOW = ROOT / ".venv-airflow" / "bin" / "airflow"
LAKE_TASKS = {"ingest_day", "ingest_hour", "build_features", "build_features_hour", "train", "finetune",
              "build_index", "publish", "backfill"}
DAG_IDS = ("nightly_full_retrain", "hourly_incremental_finetune", "feature_backfill")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", action="store_true", help="keep the temp folder (AIRFLOW_HOME, lake, logs)")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds to wait for the runs (default 1800)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="towerlake-overlap-"))
    yesterday = (datetime.now(UTC) - timedelta(days=1)).date()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "TOWERLAKE_"))}
    env.update({
        "AIRFLOW_HOME": str(work / "airflow"), "TOWERLAKE_LAKE": str(work / "lake"),
        "AIRFLOW__CORE__PARALLELISM": "4", "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",
        "AIRFLOW__API__PORT": "18080", "AIRFLOW__API__BASE_URL": "http://localhost:18080", "AIRFLOW__SCHEDULER__MIN_FILE_PROCESS_INTERVAL": "5",
        "TOWERLAKE_SOURCE_ARGS": f"--source synthetic --users 300 --items 200 --events 6000 --days 1 "
                                 f"--start-date {yesterday}",
        "TOWERLAKE_FEATURE_ARGS": "--negatives random:2", "TOWERLAKE_TRAIN_ARGS": "--epochs 2 --batch-size 256",
        "TOWERLAKE_SPARK_MASTER": "local[2]", "TOWERLAKE_SHUFFLE_PARTITIONS": "2",
    })
    subprocess.run(["bash", str(ROOT / "scripts" / "airflow.sh"), "setup"], env=env, check=True)
    env["AIRFLOW__CORE__DAGS_FOLDER"] = str(ROOT / "airflow_dags")
    env["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
    env["TOWERLAKE_HOME"] = str(ROOT)
    env["TOWERLAKE_PYTHON"] = str(ROOT / ".venv" / "bin" / "python")
    env.setdefault("AIRFLOW_CONN_SPARK_DEFAULT", '{"conn_type": "spark", "host": "local[2]"}')
    env["PATH"] = f"{AIRFLOW.parent}{os.pathsep}{env.get('PATH', '')}"  # standalone runs `airflow ...` from PATH
    log = open(work / "standalone.log", "w")  # noqa: SIM115 (open for the life of the process)
    standalone = subprocess.Popen([str(AIRFLOW), "standalone"], env=env, stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    try:
        _wait_for_dags(env)
        for dag_id in DAG_IDS:
            _airflow(env, "dags", "unpause", dag_id)
        _airflow(env, "dags", "trigger", "feature_backfill", "-c",
                 json.dumps({"start": str(yesterday), "end": str(yesterday)}))
        print(f"[overlap] unpaused nightly + hourly and triggered feature_backfill at {datetime.now(UTC):%H:%M:%S}",
              flush=True)
        runs = _wait_for_runs(env, args.timeout)
    finally:
        os.killpg(standalone.pid, signal.SIGTERM)
        try:
            standalone.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(standalone.pid, signal.SIGKILL)
        log.close()
    ok = _report(runs)
    if args.keep:
        print(f"[overlap] kept {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


def _airflow(env: dict, *argv: str) -> str:
    done = subprocess.run([str(AIRFLOW), *argv], env=env, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise RuntimeError(f"airflow {' '.join(argv)} failed: {done.stderr[-2000:]}")
    return done.stdout


def _wait_for_dags(env: dict, timeout: int = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            listed = _airflow(env, "dags", "list", "-o", "json")
            if all(dag_id in listed for dag_id in DAG_IDS):
                return
        except RuntimeError:
            pass
        time.sleep(5)
    raise RuntimeError("the DAG processor did not register the three DAGs in time")


def _runs(env: dict) -> dict:
    helper = ROOT / "tests" / "airflow_helper.py"
    out = {}
    for dag_id in DAG_IDS:
        done = subprocess.run([sys.executable, str(helper), "states", dag_id], env=env, capture_output=True,
                              text=True, timeout=120)
        out[dag_id] = json.loads(done.stdout.strip().splitlines()[-1])
    return out


def _wait_for_runs(env: dict, timeout: int) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = _runs(env)
        if all(r["state"] in ("success", "failed") for r in runs.values()):
            return runs
        time.sleep(15)
    raise RuntimeError(f"the runs did not finish within {timeout}s: {_runs(env)}")


def _report(runs: dict) -> bool:
    rows = []
    for dag_id, run in runs.items():
        print(f"[overlap] {dag_id} {run['run_id']}: {run['state']}")
        for task_id, ti in run["tasks"].items():
            rows.append((ti["start"] or "", ti["end"] or "", dag_id, task_id, ti["state"]))
    rows.sort()
    print(f"{'start (UTC)':<27} {'end (UTC)':<27} {'dag':<29} {'task':<20} state")
    for start, end, dag_id, task_id, state in rows:
        print(f"{str(start)[:26]:<27} {str(end)[:26]:<27} {dag_id:<29} {task_id:<20} {state}")
    ran = [(datetime.fromisoformat(str(s)), datetime.fromisoformat(str(e)), f"{d}.{t}")
           for s, e, d, t, state in rows if t in LAKE_TASKS and state == "success" and s and e]
    overlaps = [(a[2], b[2]) for i, a in enumerate(ran) for b in ran[i + 1:] if a[0] < b[1] and b[0] < a[1]]
    hourly = runs["hourly_incremental_finetune"]["tasks"]
    yielded = hourly.get("skip_while_nightly", {}).get("state") == "skipped"
    print(f"[overlap] lake-writing tasks that ran: {len(ran)}; overlapping pairs: {overlaps or 'none'}")
    print(f"[overlap] hourly skip_while_nightly: {hourly.get('skip_while_nightly', {}).get('state')} "
          f"(the rest: {sorted({v['state'] for k, v in hourly.items() if k != 'skip_while_nightly'})})")
    return not overlaps and yielded and runs["nightly_full_retrain"]["state"] == "success"


if __name__ == "__main__":
    sys.exit(main())
