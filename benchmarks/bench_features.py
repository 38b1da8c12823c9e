"""Features + pairs (full build) wall time on MovieLens-100K and synthetic 1M / 10M events.

Everything runs in ONE Spark session. For each dataset it ingests the bronze tables first
(not timed), then times ``build_training_data`` (vocabularies, features/*, pairs with
history and offline negatives) and prints rows/s, per-stage seconds, and the growth from
the smallest to the largest synthetic size (1.0 = perfectly linear; the goal is <= 1.2).
Each line also gives the CPU seconds of the driver, the JVM and the Python workers (from
/proc) and the 1-minute load average: on a shared machine wall time follows the load, CPU
time much less. Run it on an otherwise idle machine for wall-time figures. The old defaults
(8 shuffle partitions, 4g) ran out of heap at 10M; the defaults are now 64 partitions with
AQE coalescing (``TOWERLAKE_SHUFFLE_PARTITIONS`` / ``TOWERLAKE_DRIVER_MEMORY`` override them).

  .venv/bin/python benchmarks/bench_features.py                       # ML-100K, 1M, 10M
  .venv/bin/python benchmarks/bench_features.py --synthetic 1000000   # ML-100K and 1M only
  .venv/bin/python benchmarks/bench_features.py --no-movielens --synthetic 200000 2000000
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def tree_cpu_seconds() -> float | None:
    """CPU seconds (user + system) used so far by this process and every live descendant
    (the Spark JVM, its Python daemon and, through the daemon's reaped children, the Python
    workers). On a shared machine wall time follows the load; CPU time much less so.
    None where /proc is not available."""
    proc = Path("/proc")
    if not (proc / "self" / "stat").exists():
        return None
    tick = os.sysconf("SC_CLK_TCK")
    parent, cpu = {}, {}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parent[int(entry.name)] = int(fields[1])
        cpu[int(entry.name)] = sum(int(v) for v in fields[11:15]) / tick  # utime stime cutime cstime
    me, total = os.getpid(), 0.0
    for pid in cpu:
        node = pid
        while node not in (0, 1, me) and node in parent:
            node = parent[node]
        if node == me:
            total += cpu[pid]
    return total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--synthetic", type=int, nargs="*", default=[1_000_000, 10_000_000])
    parser.add_argument("--no-movielens", action="store_true")
    parser.add_argument("--negatives", default="random:4,popularity:2,hard:2")
    parser.add_argument("--master", default="local[2]")
    parser.add_argument("--workdir")
    args = parser.parse_args()

    from jobs.spark_context import build_spark_session
    from lake_contract.feature_config import FeatureConfig
    from lake_contract.lake import Lake
    from spark_features.delta_io import DeltaLakeIO
    from spark_features.ingest import IngestOptions, RawTables, ingest, read_source
    from spark_features.sources import movielens_100k_spec, synthetic_source_spec
    from spark_features.synthetic import SyntheticConfig, generate_synthetic
    from spark_features.training_data import build_training_data

    work = Path(args.workdir or tempfile.mkdtemp(prefix="towerlake-bench-features-"))
    spark = build_spark_session("towerlake-bench-features", master=args.master)
    io = DeltaLakeIO(spark)
    print(f"engine={io.resolved_engine} master={args.master} negatives={args.negatives}")
    quiet = lambda _s: None  # noqa: E731

    datasets = []
    if not args.no_movielens:
        datasets.append(("movielens-100k", 100_000, None))
    datasets += [(f"synthetic-{n}", n, n) for n in sorted(args.synthetic)]
    timings = {}
    for name, n_events, synthetic_n in datasets:
        lake = Lake(str(work / name))
        if synthetic_n is None:
            spec = movielens_100k_spec()
            raw = read_source(spark, spec)
            config = FeatureConfig(prefix_columns={"users.zip_code": 3}, negatives=args.negatives)
        else:
            synth = SyntheticConfig(n_events=synthetic_n, n_users=max(1_000, synthetic_n // 100),
                                    n_items=max(1_000, synthetic_n // 500))
            tables = generate_synthetic(spark, synth)
            spec, raw = synthetic_source_spec(), RawTables(tables.interactions, tables.users, tables.items)
            config = FeatureConfig(negatives=args.negatives)
        ingest(spark, io, lake, raw, spec, IngestOptions(batch="bench"), say=quiet)
        start, cpu_start = time.monotonic(), tree_cpu_seconds()
        report = build_training_data(spark, io, lake, config, say=quiet)
        seconds = time.monotonic() - start
        cpu_end = tree_cpu_seconds()
        cpu = f", {cpu_end - cpu_start:.0f} CPU s" if cpu_start is not None and cpu_end is not None else ""
        pairs = sum(report.pair_counts.values())
        timings[name] = (n_events, seconds)
        print(f"{name:>20s}: {n_events:>11,} events -> {pairs:>11,} pairs in {seconds:7.1f}s "
              f"({n_events / seconds:>9,.0f} events/s{cpu}, load {os.getloadavg()[0]:.1f}) | "
              + ", ".join(f"{k} {v:.1f}s" for k, v in report.stage_seconds.items()))
        shutil.rmtree(work / name, ignore_errors=True)

    synth = [v for k, v in timings.items() if k.startswith("synthetic")]
    if len(synth) > 1:
        (n0, s0), (n1, s1) = synth[0], synth[-1]
        print(f"growth {n0:,} -> {n1:,} events ({n1 / n0:.0f}x data): time x{s1 / s0:.2f} "
              f"= {s1 / s0 / (n1 / n0):.2f} of linear (goal <= 1.2)")
    spark.stop()
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
