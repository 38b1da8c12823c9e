"""Nightly full retrain: the day's events in, a new model and index out, published as one
release if it passes the gates (docs/airflow.md).

skip_if_published -> ingest_day -> build_features -> train -> build_index -> publish

One run covers one UTC day [data_interval_start, +1 day); it names everything it makes
after that day (model, index and release ``nightly-YYYYMMDD``), so a retry or a re-run of
the same day finds its own artifacts instead of making new ones.

No DeadlineAlert: in Airflow 3.3.2 a DAG with one cannot run under ``airflow dags test``
(dag.test's round-tripped DAG hands the alert definitions, not their ids, to
DagRun.update_state, which fails when the run finishes: StatementError "'dict' object has
no attribute 'hex'"); docs/airflow.md says how to watch the run time instead.
"""

from __future__ import annotations

from towerlake_ops import (
    DAY,
    INTERVAL_END,
    NIGHTLY_VERSION,
    TowerlakeJobOperator,
    index_and_publish,
    lake_task_args,
    towerlake_dag,
)

with towerlake_dag(
    "nightly_full_retrain",
    description="ingest the day, rebuild features and pairs, retrain, index, gate and publish",
    cron="0 0 * * *",
    retries=2,
    doc_md=__doc__,
) as dag:
    lake = lake_task_args(priority=10)
    skip_if_published = TowerlakeJobOperator(
        task_id="skip_if_published", job="publish", args=["--skip-if-published", NIGHTLY_VERSION], retries=0)
    ingest = TowerlakeJobOperator(
        task_id="ingest_day", job="ingest", args=["--date", DAY],
        extra_args_from="TOWERLAKE_SOURCE_ARGS", required_setting=True, **lake)
    features = TowerlakeJobOperator(
        task_id="build_features", job="build_features", args=["--mode", "full", "--as-of", INTERVAL_END],
        extra_args_from="TOWERLAKE_FEATURE_ARGS", **lake)
    train = TowerlakeJobOperator(
        task_id="train", job="train", args=["--version", NIGHTLY_VERSION, "--exist-ok", "--no-progress"],
        extra_args_from="TOWERLAKE_TRAIN_ARGS", launcher="{{ params.launcher }}", **lake)
    index, publish = index_and_publish(NIGHTLY_VERSION, priority=10)
    skip_if_published >> ingest >> features >> train >> index
