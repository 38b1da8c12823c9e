"""Ingest + Delta write throughput on synthetic events, against a plain Parquet baseline.

For each size (default 1M and 10M events) it times, in ONE Spark session:

* baseline: generate the synthetic tables and write the interactions as plain Parquet
  (no validation, no Delta commit): the floor any ingest pays;
* ingest:   the real job's work: validate users, items and interactions (parse, checks,
  unknown-id joins, duplicate detection), write quarantine + bronze Delta tables and commit.

It prints rows/s for both, ingest/baseline ratio, and how the cost grows from the smallest
to the largest size (1.0 = perfectly linear). Run it on an otherwise idle machine:

  .venv/bin/python benchmarks/bench_ingest.py              # 1M and 10M events, local[2]
  .venv/bin/python benchmarks/bench_ingest.py --events 1000000 --master local[2]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--master", default="local[2]")
    parser.add_argument("--workdir", help="scratch folder (default: a temp dir, removed at the end)")
    args = parser.parse_args()

    from jobs.spark_context import build_spark_session
    from lake_contract.lake import Lake
    from spark_features.delta_io import DeltaLakeIO
    from spark_features.ingest import IngestOptions, RawTables, ingest
    from spark_features.sources import synthetic_source_spec
    from spark_features.synthetic import SyntheticConfig, generate_synthetic

    work = Path(args.workdir or tempfile.mkdtemp(prefix="towerlake-bench-"))
    spark = build_spark_session("towerlake-bench-ingest", master=args.master)
    io = DeltaLakeIO(spark)
    print(f"engine={io.resolved_engine} master={args.master} cores={spark.sparkContext.defaultParallelism}")
    # Warm the JVM (class loading, JIT) so the first size does not pay for it.
    generate_synthetic(spark, SyntheticConfig(n_events=10_000, n_users=100, n_items=100)).interactions.count()

    results = []
    for n in sorted(args.events):
        config = SyntheticConfig(n_events=n, n_users=max(1_000, n // 100), n_items=max(1_000, n // 500))
        tables = generate_synthetic(spark, config)

        start = time.monotonic()
        tables.interactions.write.mode("overwrite").parquet(str(work / f"baseline-{n}"))
        baseline = time.monotonic() - start

        lake = Lake(str(work / f"lake-{n}"))
        start = time.monotonic()
        report = ingest(spark, io, lake, RawTables(tables.interactions, tables.users, tables.items),
                        synthetic_source_spec(), IngestOptions(batch=f"bench-{n}"), say=lambda _s: None)
        seconds = time.monotonic() - start
        written = next(t for t in report.tables if t.table == "interactions").written
        assert written is not None and written.rows_written == n, "ingest lost or invented rows"
        results.append((n, baseline, seconds))
        print(f"{n:>12,} events | baseline parquet write {baseline:7.1f}s {n / baseline:>12,.0f} rows/s "
              f"| ingest+delta {seconds:7.1f}s {n / seconds:>12,.0f} rows/s | ingest/baseline "
              f"{seconds / baseline:4.2f}x | stages: "
              + ", ".join(f"{k} {v:.1f}s" for k, v in report.stage_seconds.items()))
        shutil.rmtree(work / f"baseline-{n}", ignore_errors=True)

    if len(results) > 1:
        (n0, b0, s0), (n1, b1, s1) = results[0], results[-1]
        scale = n1 / n0
        print(f"growth {n0:,} -> {n1:,} events ({scale:.0f}x data): ingest time x{s1 / s0:.2f} "
              f"({s1 / s0 / scale:.2f} of linear), baseline time x{b1 / b0:.2f} ({b1 / b0 / scale:.2f} of linear)")
    spark.stop()
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
