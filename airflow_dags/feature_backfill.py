"""Feature backfill: the incremental feature build for each UTC day from ``start`` to
``end`` (inclusive), through spark-submit of jobs/backfill.py (docs/airflow.md). Manual only;
resumable (days the ledger runs/build_features records complete are skipped); never
publishes: a backfill changes training data, the next nightly run decides what to serve.
"""

from __future__ import annotations

import pendulum
from airflow.sdk import DAG, Param
from towerlake_ops import LAKE_POOL, TowerlakeSparkSubmitOperator, default_args

_DATE = r"^\d{4}-\d{2}-\d{2}$"

with DAG(
    dag_id="feature_backfill",
    description="spark-submit jobs/backfill.py over [start, end]; never publishes",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args=default_args(retries=1),
    params={
        "start": Param("2026-01-01", type="string", pattern=_DATE, description="first UTC date, YYYY-MM-DD"),
        "end": Param("2026-01-01", type="string", pattern=_DATE, description="last UTC date (inclusive)"),
    },
    tags=["towerlake"],
    doc_md=__doc__,
) as dag:
    TowerlakeSparkSubmitOperator(
        task_id="backfill",
        application="jobs/backfill.py",
        application_args=["--start", "{{ params.start }}", "--end", "{{ params.end }}"],
        conn_id="spark_default",
        name="towerlake-backfill",
        pool=LAKE_POOL,
    )
