"""The two Delta engines side by side, in ONE Spark session (built with the delta-spark jars):

* ingest + features: the same synthetic events (same seed) ingested into bronze and built into
  vocab/features/pairs, once with each engine; rows/s and the native/delta-rs ratio;
* a 200-file write: one overwrite of a table made of 200 Parquet files, with each engine,
  next to a plain Parquet write of the same files; for delta-rs also its commit alone (the
  native engine commits inside Spark's write: its overhead is total minus the Parquet write).

Both engines first run a small warm-up (untimed) so neither pays the JVM's class loading and
JIT alone. Run it on an otherwise idle machine:

  .venv/bin/python benchmarks/bench_engines.py                    # 1M events
  .venv/bin/python benchmarks/bench_engines.py --events 200000 --files 200
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ENGINES = ("native", "delta-rs")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--files", type=int, default=200, help="files in the commit-time write")
    parser.add_argument("--negatives", default="random:4,popularity:2,hard:2")
    parser.add_argument("--master", default="local[2]")
    parser.add_argument("--workdir", help="scratch folder (default: a temp dir, removed at the end)")
    args = parser.parse_args()

    from jobs.spark_context import build_spark_session
    from lake_contract.feature_config import FeatureConfig
    from lake_contract.lake import Lake
    from spark_features.delta_io import DeltaLakeIO, native_delta_available
    from spark_features.ingest import IngestOptions, RawTables, ingest
    from spark_features.sources import synthetic_source_spec
    from spark_features.synthetic import SyntheticConfig, generate_synthetic
    from spark_features.training_data import build_training_data

    work = Path(args.workdir or tempfile.mkdtemp(prefix="towerlake-bench-engines-"))
    spark = build_spark_session("towerlake-bench-engines", master=args.master)
    if not native_delta_available(spark):
        print("error: the native engine needs the delta-spark jars in .jars/ (scripts/fetch_jars.sh)", file=sys.stderr)
        return 2
    ios = {engine: DeltaLakeIO(spark, engine=engine) for engine in ENGINES}
    quiet = lambda _s: None  # noqa: E731
    print(f"master={args.master} events={args.events:,} negatives={args.negatives}")

    def ingest_and_build(io, name: str, n_events: int) -> tuple[float, float, int]:
        lake = Lake(str(work / name))
        synth = SyntheticConfig(n_events=n_events, n_users=max(1_000, n_events // 100),
                                n_items=max(1_000, n_events // 500))
        tables = generate_synthetic(spark, synth)
        raw = RawTables(tables.interactions, tables.users, tables.items)
        start = time.monotonic()
        ingest(spark, io, lake, raw, synthetic_source_spec(), IngestOptions(batch="bench"), say=quiet)
        ingest_s = time.monotonic() - start
        start = time.monotonic()
        report = build_training_data(spark, io, lake, FeatureConfig(negatives=args.negatives), say=quiet)
        features_s = time.monotonic() - start
        shutil.rmtree(work / name, ignore_errors=True)
        return ingest_s, features_s, sum(report.pair_counts.values())

    for engine, io in ios.items():  # warm-up, untimed
        ingest_and_build(io, f"warm-{engine}", 20_000)

    pipeline = {}
    for engine, io in ios.items():
        pipeline[engine] = ingest_and_build(io, f"run-{engine}", args.events)
        i, f, pairs = pipeline[engine]
        print(f"  {engine:>8s}: ingest {i:6.1f}s + features {f:6.1f}s -> {pairs:,} pairs")

    rows = spark.range(0, args.files * 1_000).selectExpr(
        "id", "cast(id % 97 as string) AS k", "rand(7) AS x").repartition(args.files).persist()
    rows.count()
    start = time.monotonic()
    rows.write.mode("overwrite").parquet(str(work / "plain"))
    parquet_s = time.monotonic() - start
    commits = {}
    for engine, io in ios.items():
        uri = str(work / f"files-{engine}")
        io.write_table(rows.limit(10), uri)  # the table exists: the timed write is an overwrite
        start = time.monotonic()
        if engine == "delta-rs":
            staged = io.stage_write(rows, uri)
            mid = time.monotonic()
            result = io.commit_staged(staged)
            commit_only = time.monotonic() - mid
        else:
            result = io.write_table(rows, uri)
            commit_only = None
        commits[engine] = (time.monotonic() - start, commit_only, result.files_added)
    rows.unpersist()

    print()
    print(f"{'engine':>8s} | {'ingest s':>8s} | {'features s':>10s} | {'events/s':>9s} | "
          f"{args.files}-file write s | commit alone s | files")
    for engine in ENGINES:
        i, f, _ = pipeline[engine]
        total, commit_only, files = commits[engine]
        alone = f"{commit_only:.2f}" if commit_only is not None else f"~{max(0.0, total - parquet_s):.2f} (total - Parquet)"
        print(f"{engine:>8s} | {i:8.1f} | {f:10.1f} | {args.events / (i + f):9,.0f} | {total:>17.2f} | "
              f"{alone:>14s} | {files}")
    print(f"{'parquet':>8s} | {'':8s} | {'':10s} | {'':9s} | {parquet_s:>17.2f} | {'(no commit)':>14s} | {args.files}")
    native, deltars = (sum(pipeline[e][:2]) for e in ENGINES)
    print(f"ingest+features, native / delta-rs time: {native / deltars:.2f} "
          f"(events/s ratio native/delta-rs: {deltars / native:.2f})")
    print(f"{args.files}-file write, native / delta-rs time: {commits['native'][0] / commits['delta-rs'][0]:.2f}")
    spark.stop()
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
