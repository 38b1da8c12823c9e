"""Serving cost against lake size: every user's "now" query on a small and a large lake.

Two synthetic lakes with the SAME users and items and 10x more events in the second (default
1M and 10M events, 10,000 users, 5,000 items, 30 days) are ingested and feature-built with
the real jobs' functions (one Spark session, not timed). Then, per lake, every user's query
(the user tower's inputs and the seen items: the part of ``jobs.recommend --all-users`` that
reads the lake; embedding the users and the FAISS search do not depend on the number of
events) is built in batches of 4,096, once from ``features/user_state`` (the serving path) and
once from every event of the users (the reference path, ``use_state=False``). It prints the
seconds, users/s, the files each path reads, and the large/small time ratio of each path
(goal for the state path: <= 1.3x). The first batch of each lake is also checked to be equal
both ways (tests/test_user_state.py checks every user on MovieLens-100K).

  .venv/bin/python benchmarks/bench_serving.py                          # 1M and 10M events
  .venv/bin/python benchmarks/bench_serving.py --events 200000 2000000  # a quicker pair
  .venv/bin/python benchmarks/bench_serving.py --workdir /tmp/lakes     # keep (and reuse) the lakes
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


def build_lake(root: Path, n_events: int, args) -> None:
    """Ingest + full build of one synthetic lake (skipped when ``root`` already holds one)."""
    from jobs.spark_context import build_spark_session
    from lake_contract.feature_config import FeatureConfig
    from lake_contract.feature_contract import USER_STATE_TABLE
    from lake_contract.lake import Lake
    from spark_features.delta_io import DeltaLakeIO
    from spark_features.ingest import IngestOptions, RawTables, ingest
    from spark_features.sources import synthetic_source_spec
    from spark_features.synthetic import SyntheticConfig, generate_synthetic
    from spark_features.training_data import build_training_data

    lake = Lake(str(root))
    if (root / USER_STATE_TABLE / "_delta_log").is_dir():
        print(f"  reusing {root}")
        return
    spark = build_spark_session("towerlake-bench-serving", master=args.master)
    io = DeltaLakeIO(spark)
    tables = generate_synthetic(spark, SyntheticConfig(n_events=n_events, n_users=args.users, n_items=args.items,
                                                       days=args.days))
    start = time.monotonic()
    ingest(spark, io, lake, RawTables(tables.interactions, tables.users, tables.items), synthetic_source_spec(),
           IngestOptions(batch="bench"), say=lambda _s: None)
    build_training_data(spark, io, lake, FeatureConfig(negatives=args.negatives), say=lambda _s: None)
    print(f"  built {root.name} in {time.monotonic() - start:.0f}s (ingest + full build, engine {io.resolved_engine})")


def time_queries(root: Path, batch_users: int) -> dict:
    """Seconds to build every user's query both ways, and the files each way reads."""
    import numpy as np

    from index_builder.queries import UserQueryBuilder, snapshot_column_names
    from lake_contract.delta_snapshot import resolve_snapshot
    from lake_contract.lake import BRONZE_INTERACTIONS, Lake
    from trainer.feature_schema import load_feature_schema

    lake = Lake(str(root))
    columns = snapshot_column_names(resolve_snapshot(lake.table("pairs/train")))
    schema = load_feature_schema(lake.root, columns, history_length=50)
    out = {"bronze_files": len(resolve_snapshot(lake.table(BRONZE_INTERACTIONS)).files)}
    first = {}
    for name, use_state in (("state", True), ("events", False)):
        start = time.monotonic()
        builder = UserQueryBuilder(lake.root, schema, use_state=use_state)
        users = 0
        for batch in builder.iter_user_ids(batch_users):
            queries = builder.build(batch)
            first.setdefault(name, queries)
            users += len(batch)
        out[name] = time.monotonic() - start
        out[f"{name}_files"] = builder.fresh_files if use_state else out["bronze_files"]
        out["users"] = users
        builder.close()
    a, b = first["state"], first["events"]
    same = all(np.array_equal(a.inputs[k].numpy(), b.inputs[k].numpy()) for k in a.inputs) and np.array_equal(
        a.seen_values, b.seen_values) and np.array_equal(a.n_events, b.n_events)
    if not same:
        raise SystemExit(f"{root.name}: the state path and the events path disagree on the first batch")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, nargs=2, default=[1_000_000, 10_000_000], metavar=("SMALL", "LARGE"))
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument("--items", type=int, default=5_000)
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--batch-users", type=int, default=4096)
    parser.add_argument("--negatives", default="random:1", help="offline negatives of the build (not timed)")
    parser.add_argument("--master", default="local[2]")
    parser.add_argument("--workdir", help="keep the lakes here (reused when present)")
    args = parser.parse_args()

    work = Path(args.workdir or tempfile.mkdtemp(prefix="towerlake-bench-serving-"))
    results = {}
    for n_events in args.events:
        root = work / f"synthetic-{n_events}"
        print(f"lake {n_events:,} events, {args.users:,} users, {args.items:,} items:")
        build_lake(root, n_events, args)
        results[n_events] = r = time_queries(root, args.batch_users)
        print(f"  {r['users']:,} users: state path {r['state']:.2f}s ({r['users'] / r['state']:,.0f} users/s, "
              f"{r['state_files']} of {r['bronze_files']} bronze files) | events path {r['events']:.2f}s "
              f"({r['users'] / r['events']:,.0f} users/s, every file) | load {os.getloadavg()[0]:.1f}")
    small, large = (results[n] for n in args.events)
    ratio = args.events[1] / args.events[0]
    print(f"{ratio:.0f}x the events: state path x{large['state'] / small['state']:.2f} (goal <= 1.3), "
          f"events path x{large['events'] / small['events']:.2f}")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
