"""Hourly incremental build: does one hour cost the hour, or the lake?

For each lake size (synthetic events over 30 days, the SAME users and items at every size)
it ingests the lake and runs the full build (timed, for reference), then ingests one hour of
``--hour-events`` new events after the lake's last day (``--hour``-style ingest: exactly that
hour) and times ``build_incremental`` for that hour. The hour is the same at every size (its
own generator seed), so the ratio of the largest to the smallest size is the hourly cost's
growth with the lake (goal <= 1.3x). Each line prints the incremental stages, where the read
of the past started (``past since``) and how many touched users / items had no usable state
row (their whole history is read: should be 0 after a full build). One Spark session; run it
on an otherwise idle machine (the load average is printed).

  .venv/bin/python benchmarks/bench_hourly.py                            # 100k and 1M lakes
  .venv/bin/python benchmarks/bench_hourly.py --lake-events 1000000 10000000
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lake-events", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--hour-events", type=int, default=10_000)
    parser.add_argument("--users", type=int, default=10_000, help="users at every lake size (default 10,000)")
    parser.add_argument("--items", type=int, default=5_000, help="items at every lake size (default 5,000)")
    parser.add_argument("--negatives", default="random:4,popularity:2,hard:2")
    parser.add_argument("--master", default="local[2]")
    parser.add_argument("--workdir", help="keep the lakes here (default: a temporary folder, removed)")
    args = parser.parse_args()

    from pyspark.sql import functions as F

    from jobs.spark_context import build_spark_session
    from lake_contract.feature_config import FeatureConfig
    from lake_contract.lake import Lake
    from spark_features.delta_io import DeltaLakeIO
    from spark_features.incremental import build_incremental
    from spark_features.ingest import IngestOptions, RawTables, ingest
    from spark_features.sources import synthetic_source_spec
    from spark_features.synthetic import SyntheticConfig, generate_synthetic
    from spark_features.training_data import build_training_data

    work = Path(args.workdir or tempfile.mkdtemp(prefix="towerlake-bench-hourly-"))
    spark = build_spark_session("towerlake-bench-hourly", master=args.master)
    io = DeltaLakeIO(spark)
    spec = synthetic_source_spec()
    config = FeatureConfig(negatives=args.negatives)
    quiet = lambda _s: None  # noqa: E731
    lake_days = 30
    hour = dt.datetime(2026, 1, 1, tzinfo=dt.UTC) + dt.timedelta(days=lake_days, hours=10)
    print(f"engine={io.resolved_engine} master={args.master} users={args.users:,} items={args.items:,} "
          f"hour={hour:%Y-%m-%dT%H} with {args.hour_events:,} events")

    # The hour: its own seed, squeezed into [hour, hour + 1h); interactions only.
    hour_tables = generate_synthetic(spark, SyntheticConfig(
        n_events=args.hour_events, n_users=args.users, n_items=args.items, days=1, start_date=hour.date(), seed=1))
    hour_start = int(hour.timestamp())
    hour_ts = F.timestamp_seconds(F.lit(hour_start) + F.unix_timestamp("event_ts") % 3600)
    hour_events = hour_tables.interactions.withColumn("event_ts", hour_ts).withColumn(
        "event_date", F.to_date(F.lit(hour.date().isoformat()))).cache()
    hour_events.count()

    timings = {}
    for n in sorted(args.lake_events):
        lake = Lake(str(work / f"lake-{n}"))
        tables = generate_synthetic(spark, SyntheticConfig(n_events=n, n_users=args.users, n_items=args.items,
                                                           days=lake_days))
        ingest(spark, io, lake, RawTables(tables.interactions, tables.users, tables.items), spec,
               IngestOptions(batch="bench"), say=quiet)
        start = time.monotonic()
        build_training_data(spark, io, lake, config, say=quiet)
        full_seconds = time.monotonic() - start
        ingest(spark, io, lake, RawTables(hour_events), spec,
               IngestOptions(batch="bench-hour", only_hour=hour), say=quiet)
        start = time.monotonic()
        report = build_incremental(spark, io, lake, None, hour, hour + dt.timedelta(hours=1),
                                   f"{hour:%Y-%m-%dT%H}", say=quiet)
        seconds = time.monotonic() - start
        timings[n] = seconds
        print(f"lake {n:>11,} events: full build {full_seconds:6.1f}s | hour: {report.events:,} events -> "
              f"{report.pairs:,} pairs in {seconds:5.1f}s (load {os.getloadavg()[0]:.1f}); past since "
              f"{report.past_since}, whole history for {report.fallback_users} user(s) / "
              f"{report.fallback_items} item(s) | " + ", ".join(f"{k} {v:.1f}s" for k, v in report.stage_seconds.items()))
        shutil.rmtree(work / f"lake-{n}", ignore_errors=True)

    if len(timings) > 1:
        (n0, s0), (n1, s1) = min(timings.items()), max(timings.items())
        print(f"the same hour on a {n1 / n0:.0f}x larger lake: time x{s1 / s0:.2f} (goal <= 1.3)")
    spark.stop()
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
