"""Feature backfill: the incremental feature build for each UTC day from ``start`` to
``end`` (inclusive), through spark-submit of jobs/backfill.py (docs/airflow.md). Manual only;
resumable (days the ledger runs/build_features records complete are skipped); never
publishes: a backfill changes training data, the next nightly run decides what to serve.
"""

from __future__ import annotations

from airflow.sdk import Param
from towerlake_ops import LAKE_POOL, TowerlakeSparkSubmitOperator, towerlake_dag

_DATE = r"^\d{4}-\d{2}-\d{2}$"

with towerlake_dag(
    "feature_backfill",
    description="spark-submit jobs/backfill.py over [start, end]; never publishes",
    retries=1,
    params={
        "start": Param("2026-01-01", type="string", pattern=_DATE, description="first UTC date, YYYY-MM-DD"),
        "end": Param("2026-01-01", type="string", pattern=_DATE, description="last UTC date (inclusive)"),
    },
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
