"""Backfill features and pairs day by day over a date range, resumably.

Runs the incremental build (``jobs/build_features.py --mode incremental --date D``) for each
UTC date from --start to --end inclusive, in order, in one Spark session. A date already
recorded as complete in ``runs/build_features`` is skipped unless --force, so a backfill
that died half-way continues where it stopped when re-run. A full build must exist first:
every feature setting (history length, labels, negatives, prefixes, ...) is the one it saved
in features/config, so backfilled pairs match the pairs the full build made.

Examples:
  python -m jobs.backfill --start 2026-01-01 --end 2026-01-31
  spark-submit jobs/backfill.py --start 2026-01-01 --end 2026-01-31 --force
"""

from __future__ import annotations

import argparse
import sys
from datetime import date, timedelta

if __package__ in (None, ""):  # spark-submit jobs/backfill.py runs this file as a script
    import os

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jobs.cli import default_lake, run_job, setup_logging


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jobs.backfill", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--start", type=date.fromisoformat, required=True, help="first UTC date, YYYY-MM-DD")
    p.add_argument("--end", type=date.fromisoformat, required=True, help="last UTC date (inclusive)")
    p.add_argument("--force", action="store_true", help="rebuild dates already complete")
    p.add_argument("--lake", default=default_lake())
    p.add_argument("--engine", choices=("auto", "native", "delta-rs"), default="auto")
    p.add_argument("--master")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.end < args.start:
        raise ValueError(f"--end ({args.end}) is before --start ({args.start})")
    setup_logging("backfill")
    from tqdm import tqdm

    from jobs.spark_context import build_spark_session
    from lake_contract.feature_config import FEATURE_CONFIG_TABLE, require_saved_feature_config
    from lake_contract.lake import Lake
    from spark_features.delta_io import DeltaLakeIO
    from spark_features.incremental import backfill_days

    lake = Lake(args.lake)
    saved = require_saved_feature_config(lake.root, "the backfill")  # before Spark starts
    days = [args.start + timedelta(days=i) for i in range((args.end - args.start).days + 1)]
    print(f"backfill {args.start}..{args.end} lake={lake.root}")
    print(f"  read: feature settings of the full build, {FEATURE_CONFIG_TABLE} v{saved.version}: {saved.config.to_json()}")
    spark = build_spark_session("towerlake-backfill", master=args.master)
    try:
        io = DeltaLakeIO(spark, engine=args.engine)
        backfill_days(spark, io, lake, saved.config, days, force=args.force,
                      progress=lambda todo: tqdm(todo, desc="backfill", unit="day"), say=tqdm.write)
    finally:
        spark.stop()
    return 0


if __name__ == "__main__":
    run_job("backfill", lambda: main(sys.argv[1:]))
