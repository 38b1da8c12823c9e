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

from towerlake_ops import (
    HOUR,
    HOURLY_VERSION,
    SkipWhileDagRunning,
    TowerlakeJobOperator,
    index_and_publish,
    lake_task_args,
    towerlake_dag,
)

with towerlake_dag(
    "hourly_incremental_finetune",
    description="ingest the hour, incremental features, fine-tune CURRENT's model, index, publish",
    cron="0 * * * *",
    retries=1,
    doc_md=__doc__,
) as dag:
    lake = lake_task_args(priority=1)
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
    index, publish = index_and_publish(HOURLY_VERSION, priority=1, publish_args=["--require-parent-current"])
    skip_while_nightly >> skip_if_published >> ingest >> features >> finetune >> index
