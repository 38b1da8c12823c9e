"""Hourly incremental fine-tune: the hour's events in, the CURRENT model fine-tuned on the
hour's pairs, published only while CURRENT still serves its parent (docs/airflow.md).

skip_while_nightly -> skip_if_published -> ingest_hour -> build_features_hour -> finetune
  -> build_index -> publish

One run covers one UTC hour [data_interval_start, +1 hour) and names its model, index and
release ``hourly-YYYYMMDDTHH``. An hour without pairs ends at build_features_hour (exit 99:
skipped) and everything after it is skipped; so is a whole run while a nightly retrain is
active (the nightly supersedes it). The publish gate also skips (exit 99) when CURRENT moved
on from the model this hour fine-tuned.
"""

from __future__ import annotations

import pendulum
from airflow.sdk import DAG, CronDataIntervalTimetable, Param
from towerlake_ops import (
    HOUR,
    HOURLY_VERSION,
    LAKE_POOL,
    SkipWhileDagRunning,
    TowerlakeJobOperator,
    default_args,
)

with DAG(
    dag_id="hourly_incremental_finetune",
    description="ingest the hour, incremental features, fine-tune CURRENT's model, index, publish",
    schedule=CronDataIntervalTimetable("0 * * * *", timezone="UTC"),
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args=default_args(retries=1),
    params={"launcher": Param("python", type="string", description="python, torchrun:N, horovodrun:N or torch-distributor:N")},
    tags=["towerlake"],
    doc_md=__doc__,
) as dag:
    lake = {"pool": LAKE_POOL, "priority_weight": 1, "weight_rule": "absolute"}
    skip_while_nightly = SkipWhileDagRunning(
        task_id="skip_while_nightly", dag_ids=["nightly_full_retrain"], retries=0)
    skip_if_published = TowerlakeJobOperator(
        task_id="skip_if_published", job="publish", args=["--skip-if-published", HOURLY_VERSION], retries=0)
    ingest = TowerlakeJobOperator(
        task_id="ingest_hour", job="ingest", args=["--hour", HOUR],
        extra_args_from="TOWERLAKE_SOURCE_ARGS", required_setting=True, **lake)
    features = TowerlakeJobOperator(
        task_id="build_features_hour", job="build_features", args=["--mode", "incremental", "--hour", HOUR],
        extra_args_from="TOWERLAKE_FEATURE_ARGS", **lake)
    finetune = TowerlakeJobOperator(
        task_id="finetune", job="train",
        args=["--mode", "finetune", "--window", HOUR, "--version", HOURLY_VERSION, "--exist-ok", "--no-progress"],
        extra_args_from="TOWERLAKE_FINETUNE_ARGS", launcher="{{ params.launcher }}", **lake)
    index = TowerlakeJobOperator(
        task_id="build_index", job="build_index", args=["--model", HOURLY_VERSION, "--exist-ok"],
        extra_args_from="TOWERLAKE_INDEX_ARGS", **lake)
    publish = TowerlakeJobOperator(
        task_id="publish", job="publish",
        args=["--model", HOURLY_VERSION, "--index", HOURLY_VERSION, "--release-version", HOURLY_VERSION,
              "--exist-ok", "--require-parent-current"],
        extra_args_from="TOWERLAKE_PUBLISH_ARGS", **lake)
    skip_while_nightly >> skip_if_published >> ingest >> features >> finetune >> index >> publish
