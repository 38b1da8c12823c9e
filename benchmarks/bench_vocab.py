"""The vocabulary stage alone: seconds and Spark jobs per update, the rewrite-everything
baseline vs ``spark_features.vocab.update_vocab``, in ONE Spark session.

For each lake (MovieLens-100K, synthetic N events) it ingests bronze (not timed), then runs
the full build's vocabulary stage exactly as ``build_training_data`` feeds it (user_id,
item_id, every categorical / multi-valued users and items column) three times on a fresh
vocabulary folder per implementation:

* ``full``: the first build (every vocabulary created);
* ``rerun``: the same build again (nothing to add);
* ``hour k``: an hourly update per id vocabulary that adds ``--new-ids`` unseen ids
  (the values of the lake plus the new ones), repeated ``--hours`` times: the append
  path; the baseline rewrites the whole vocabulary each time.

Then a big vocabulary (``--big`` values, seeded by one update) gets ``--hours`` hourly
updates of ``--new-ids`` new values each: what an hour costs as the vocabulary grows.

Each line gives seconds, Spark jobs (``statusTracker`` job ids of the stage's job group, so
Delta's own jobs count too), Delta files of the biggest vocabulary, the 1-minute load average,
and the ratio baseline/new. On a shared machine wall time follows the load.

  .venv/bin/python benchmarks/bench_vocab.py                          # ML-100K and 1M
  .venv/bin/python benchmarks/bench_vocab.py --synthetic 200000 --big 100000
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def legacy_update_vocab(io, lake, name, values, min_count=1, run_key="full"):
    """The rewrite-everything update (before the append path): summary job, assign, full
    ``check_vocab_extends``, then old + new rows as ONE coalesce(1) overwrite commit."""
    from pyspark import StorageLevel

    from lake_contract.delta_snapshot import table_version
    from lake_contract.vocab_registry import VocabInfo, vocab_table
    from spark_features import vocab as V

    uri = lake.table(vocab_table(name))
    read_version = table_version(uri)
    if read_version is None:
        old = V._empty(io.spark, V.VOCAB_SCHEMA)
        old_rows, old_max, old_min_count = 0, 0, min_count
    else:
        old = io.read_table(uri, read_version)
        old_rows, old_max, old_min_count = V._summary(old)
    new_rows = V.assign_new_indices(V.count_values(values, min_count), old, old_max, min_count, run_key)
    new_rows = new_rows.persist(StorageLevel.MEMORY_AND_DISK)
    try:
        rows, _max_index = V.check_vocab_extends(old, old.unionByName(new_rows))
        added = rows - old_rows
        if added == 0:
            return VocabInfo(name, old_max + 1, old_rows, old_min_count, read_version)
        full = V._conform(old.unionByName(new_rows)).coalesce(1).sortWithinPartitions("index")
        result = V._commit(io, full, uri, read_version, "overwrite", None, None)
    finally:
        new_rows.unpersist()
    return VocabInfo(name, old_max + added + 1, old_rows + added, min_count, result.version, added)


def vocab_inputs(io, lake, config):
    """``{name: (values, min_count)}`` as the full build's vocabulary stage feeds update_vocab."""
    from pyspark.sql import functions as F

    from lake_contract.delta_snapshot import table_version
    from lake_contract.lake import BRONZE_TABLES
    from spark_features.features import plan_feature_columns, with_prefix_columns
    from spark_features.ingest import column_roles

    def bronze(name):
        uri = lake.table(BRONZE_TABLES[name])
        version = table_version(uri)
        return None if version is None else io.read_table(uri, version)

    interactions, users, items = bronze("interactions"), bronze("users"), bronze("items")
    prefixes = dict(config.prefix_columns)
    users = with_prefix_columns(users, "users", prefixes) if users is not None else None
    items = with_prefix_columns(items, "items", prefixes) if items is not None else None
    inputs = {}
    user_values = interactions.select(F.col("user_id").alias("value"))
    item_values = interactions.select(F.col("item_id").alias("value"))
    if users is not None:
        user_values = user_values.unionByName(users.select(F.col("user_id").alias("value")))
    if items is not None:
        item_values = item_values.unionByName(items.select(F.col("item_id").alias("value")))
    inputs["user_id"] = (user_values, config.id_min_count)
    inputs["item_id"] = (item_values, config.id_min_count)
    for frame, table in ((users, "users"), (items, "items")):
        if frame is None:
            continue
        roles = {k: v for k, v in column_roles(frame.schema).items() if v != "id"}
        for col in plan_feature_columns(table, roles, prefixes):
            if col.vocab is None:
                continue
            values = frame.select(
                (F.explode_outer(col.column) if col.kind == "multi_valued" else F.col(col.column)).alias("value")
            ).select(F.col("value").cast("string"))
            inputs[col.vocab] = (values, config.categorical_min_count)
    return inputs


def measured(spark, run):
    """(seconds, Spark jobs) of ``run()``: every job of a fresh job group."""
    group = f"bench-vocab-{uuid.uuid4().hex[:8]}"
    sc = spark.sparkContext
    sc.setJobGroup(group, group)
    start = time.monotonic()
    try:
        run()
    finally:
        seconds = time.monotonic() - start
        sc.setLocalProperty("spark.jobGroup.id", None)
    return seconds, len(sc.statusTracker().getJobIdsForGroup(group))


def file_count(lake, name):
    from lake_contract.delta_snapshot import resolve_snapshot, table_exists
    from lake_contract.vocab_registry import vocab_table

    uri = lake.table(vocab_table(name))
    return len(resolve_snapshot(uri).files) if table_exists(uri) else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--synthetic", type=int, nargs="*", default=[1_000_000])
    parser.add_argument("--no-movielens", action="store_true")
    parser.add_argument("--hours", type=int, default=3)
    parser.add_argument("--new-ids", type=int, default=100)
    parser.add_argument("--big", type=int, default=1_000_000, help="values of the big vocabulary (0: skip)")
    parser.add_argument("--master", default="local[2]")
    parser.add_argument("--impl", choices=["both", "legacy", "new"], default="both")
    args = parser.parse_args()

    from pyspark.sql import functions as F

    from jobs.spark_context import build_spark_session
    from lake_contract.feature_config import FeatureConfig
    from lake_contract.lake import Lake
    from spark_features.delta_io import DeltaLakeIO
    from spark_features.ingest import IngestOptions, RawTables, ingest, read_source
    from spark_features.sources import movielens_100k_spec, synthetic_source_spec
    from spark_features.synthetic import SyntheticConfig, generate_synthetic
    from spark_features.vocab import update_vocab

    impls = {"legacy": legacy_update_vocab, "new": update_vocab}
    if args.impl != "both":
        impls = {args.impl: impls[args.impl]}
    work = Path(tempfile.mkdtemp(prefix="towerlake-bench-vocab-"))
    spark = build_spark_session("towerlake-bench-vocab", master=args.master)
    io = DeltaLakeIO(spark)
    print(f"engine={io.resolved_engine} master={args.master} impls={list(impls)}")
    quiet = lambda _s: None  # noqa: E731
    results: dict[tuple[str, str], tuple[float, int]] = {}

    def report(dataset, step, impl, seconds, jobs, files):
        results[(dataset + " " + step, impl)] = (seconds, jobs)
        print(f"{dataset:>18s} {step:<9s} {impl:<6s} {seconds:6.1f}s {jobs:4d} jobs  "
              f"{files:3d} files  load {os.getloadavg()[0]:.1f}", flush=True)

    datasets = [] if args.no_movielens else [("movielens-100k", None)]
    datasets += [(f"synthetic-{n}", n) for n in args.synthetic]
    for dataset, n_events in datasets:
        lake = Lake(str(work / dataset))
        if n_events is None:
            spec = movielens_100k_spec()
            raw = read_source(spark, spec)
            config = FeatureConfig(prefix_columns={"users.zip_code": 3})
        else:
            tables = generate_synthetic(spark, SyntheticConfig(
                n_events=n_events, n_users=max(1_000, n_events // 100), n_items=max(1_000, n_events // 500)))
            spec, raw = synthetic_source_spec(), RawTables(tables.interactions, tables.users, tables.items)
            config = FeatureConfig()
        ingest(spark, io, lake, raw, spec, IngestOptions(batch="bench"), say=quiet)
        inputs = vocab_inputs(io, lake, config)
        for impl, update in impls.items():
            vlake = Lake(str(work / dataset / f"vocab-{impl}"))  # vocab/ tables only, bronze from `lake`

            def stage(run_key, update=update, vlake=vlake, inputs=inputs):
                return lambda: [update(io, vlake, n, v, m, run_key) for n, (v, m) in inputs.items()]

            for step in ("full", "rerun"):
                seconds, jobs = measured(spark, stage("full"))
                report(dataset, step, impl, seconds, jobs, file_count(vlake, "user_id"))
            for hour in range(args.hours):
                key = f"2026-01-05T{10 + hour:02d}"

                def hourly(key=key, hour=hour, update=update, vlake=vlake, inputs=inputs):
                    for name in ("user_id", "item_id"):
                        values, min_count = inputs[name]
                        new = spark.range(args.new_ids).select(
                            F.concat(F.lit(f"new-{hour}-"), F.col("id").cast("string")).alias("value"))
                        update(io, vlake, name, values.unionByName(new), min_count, key)

                seconds, jobs = measured(spark, hourly)
                report(dataset, f"hour {hour + 1}", impl, seconds, jobs, file_count(vlake, "user_id"))
        shutil.rmtree(work / dataset, ignore_errors=True)

    if args.big:
        dataset = f"vocab-{args.big}"
        for impl, update in impls.items():
            vlake = Lake(str(work / dataset / impl))
            seed = spark.range(args.big).select(F.format_string("v%09d", F.col("id")).alias("value"))
            seconds, jobs = measured(spark, lambda vlake=vlake, update=update, seed=seed:
                                     update(io, vlake, "item_id", seed, 1, "full"))
            report(dataset, "seed", impl, seconds, jobs, file_count(vlake, "item_id"))
            for hour in range(args.hours):
                hour_values = spark.range(args.new_ids * 10).select(
                    F.format_string("v%09d", (F.col("id") * 997) % args.big).alias("value")
                ).unionByName(spark.range(args.new_ids).select(
                    F.format_string(f"h{hour}-%06d", F.col("id")).alias("value")))
                seconds, jobs = measured(spark, lambda vlake=vlake, update=update, v=hour_values, h=hour:
                                         update(io, vlake, "item_id", v, 1, f"2026-01-05T{10 + h:02d}"))
                report(dataset, f"hour {hour + 1}", impl, seconds, jobs, file_count(vlake, "item_id"))
        shutil.rmtree(work / dataset, ignore_errors=True)

    if len(impls) == 2:
        print("\nbaseline / new (seconds, jobs):")
        for (step, impl), (seconds, jobs) in results.items():
            if impl == "legacy" and (step, "new") in results:
                new_s, new_j = results[(step, "new")]
                print(f"  {step:<28s} {seconds:6.1f}s / {new_s:6.1f}s = {seconds / new_s:4.1f}x   "
                      f"{jobs:4d} / {new_j:4d} jobs")
    spark.stop()
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
