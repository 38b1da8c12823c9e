"""Ingest raw logs into the lake's bronze tables (interactions, users, items), quarantining bad rows.

What a load replaces (nothing else changes; a re-run of the same load writes nothing new):
  interactions  --hour H: exactly UTC hour H; --date D: exactly UTC day D; neither: the UTC
                dates that have events in the load. Events of the file outside --hour/--date
                are quarantined as outside_window (and count toward --max-bad-fraction).
  users, items  upserted by id: new ids added, changed ids replaced, ids absent from the load kept.
  --replace-all replaces every table of the load as a whole, and says how many rows it removes.

Examples:
  python -m jobs.ingest --source movielens-100k
  python -m jobs.ingest --source csv --mapping mapping.toml --date 2026-01-05
  python -m jobs.ingest --source csv --mapping hour.toml --hour 2026-01-05T13 --lake /abs/lake
  python -m jobs.ingest --source csv --mapping all.toml --replace-all
  python -m jobs.ingest --source synthetic --events 10000000 --users 100000 --items 20000
  spark-submit jobs/ingest.py --source movielens-100k --lake s3://bucket/lake
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Literal

if __package__ in (None, ""):  # spark-submit jobs/ingest.py runs this file as a script
    import os

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jobs.cli import default_lake, run_job, setup_logging

SOURCES = ("movielens-100k", "csv", "parquet", "synthetic")
Source = Literal["movielens-100k", "csv", "parquet", "synthetic"]


@dataclass(frozen=True)
class SyntheticArgs:
    users: int
    items: int
    events: int
    categories: int
    clusters: int
    days: int
    start_date: date
    seed: int


@dataclass(frozen=True)
class IngestConfig:
    """The typed, validated configuration of one ingest run."""

    source: Source
    lake: str
    mapping: str | None
    only_date: date | None
    max_bad_fraction: float
    engine: str
    master: str | None
    synthetic: SyntheticArgs
    only_hour: datetime | None = None
    replace_all: bool = False

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"--source must be one of {list(SOURCES)}, got {self.source!r}")
        if self.source in ("csv", "parquet") and not self.mapping:
            raise ValueError(f"--source {self.source} needs --mapping FILE (TOML or JSON column mapping)")
        if self.source not in ("csv", "parquet") and self.mapping:
            raise ValueError(f"--mapping only applies to --source csv/parquet, got --source {self.source}")
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ValueError(f"--max-bad-fraction must be within [0, 1], got {self.max_bad_fraction}")
        chosen = [flag for flag, on in (("--date", self.only_date is not None), ("--hour", self.only_hour is not None),
                                        ("--replace-all", self.replace_all)) if on]
        if len(chosen) > 1:
            raise ValueError(f"{' and '.join(chosen)} exclude each other: give at most one")

    @property
    def batch(self) -> str:
        """Names the load; a re-run of the same batch replaces its own quarantine rows."""
        if self.only_hour is not None:
            scope = self.only_hour.strftime("%Y-%m-%dT%H")
        else:
            scope = self.only_date.isoformat() if self.only_date else "all"
        return f"{self.source}__{scope}"


def _day(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected a UTC date YYYY-MM-DD, got {text!r}") from err


def _hour(text: str) -> datetime:
    try:
        return datetime.strptime(text, "%Y-%m-%dT%H").replace(tzinfo=UTC)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected a UTC hour YYYY-MM-DDTHH (e.g. 2026-12-01T10), got {text!r}") from err


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.ingest",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--source", choices=SOURCES, default="movielens-100k",
                        help="where the raw logs come from (default: %(default)s, embedded in the recbole wheel)")
    parser.add_argument("--lake", default=default_lake(), help="lake root folder or URI (default: $TOWERLAKE_LAKE or ./lake)")
    parser.add_argument("--mapping", help="column mapping file (TOML/JSON) for --source csv/parquet; see spark_features/sources.py")
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument("--date", type=_day, dest="only_date",
                       help="the load is UTC day YYYY-MM-DD: replaces exactly that day's events")
    scope.add_argument("--hour", type=_hour, dest="only_hour",
                       help="the load is UTC hour YYYY-MM-DDTHH: replaces exactly that hour's events "
                       "(the rest of the day stays)")
    scope.add_argument("--replace-all", action="store_true",
                       help="replace each table of the load as a whole (removes the events of every other date "
                       "and the ids the load lacks; the job prints how many rows)")
    parser.add_argument("--max-bad-fraction", type=float, default=0.01,
                        help="fail when more than this fraction of a table's rows is bad (default: %(default)s)")
    parser.add_argument("--engine", choices=("auto", "native", "delta-rs"), default="auto",
                        help="Delta engine: native needs the delta-spark jars (default: %(default)s)")
    parser.add_argument("--master", help="Spark master (default: spark-submit's, else local[*])")
    synth = parser.add_argument_group("synthetic source")
    synth.add_argument("--users", type=int, default=10_000)
    synth.add_argument("--items", type=int, default=5_000)
    synth.add_argument("--events", type=int, default=1_000_000)
    synth.add_argument("--categories", type=int, default=20)
    synth.add_argument("--clusters", type=int, default=16)
    synth.add_argument("--days", type=int, default=30)
    synth.add_argument("--start-date", type=date.fromisoformat, default=date(2026, 1, 1))
    synth.add_argument("--seed", type=int, default=0)
    return parser


def parse_config(argv: list[str] | None = None) -> IngestConfig:
    args = build_parser().parse_args(argv)
    return IngestConfig(
        source=args.source, lake=args.lake, mapping=args.mapping, only_date=args.only_date,
        max_bad_fraction=args.max_bad_fraction, engine=args.engine, master=args.master,
        synthetic=SyntheticArgs(args.users, args.items, args.events, args.categories, args.clusters,
                                args.days, args.start_date, args.seed),
        only_hour=args.only_hour, replace_all=args.replace_all,
    )


def main(argv: list[str] | None = None) -> int:
    config = parse_config(argv)
    setup_logging("ingest")
    # Heavy imports only now, so --help never starts Spark.
    from jobs.spark_context import build_spark_session
    from lake_contract.delta_snapshot import table_version
    from lake_contract.lake import BRONZE_TABLES, Lake
    from spark_features.delta_io import DeltaLakeIO
    from spark_features.ingest import IngestOptions, ingest

    lake = Lake(config.lake)
    options = IngestOptions(batch=config.batch, only_date=config.only_date, only_hour=config.only_hour,
                            replace_all=config.replace_all, max_bad_fraction=config.max_bad_fraction)
    print(f"ingest: source={config.source} lake={lake.root} batch={options.batch} run_id={options.run_id}")
    before = {t: table_version(lake.table(p)) for t, p in BRONZE_TABLES.items()}
    print("  read: bronze versions before this run: "
          + ", ".join(f"{t}={'none' if v is None else v}" for t, v in before.items()))
    spark = build_spark_session("towerlake-ingest", master=config.master)
    try:
        io = DeltaLakeIO(spark, engine=config.engine)
        spec, raw = _load_source(spark, config)
        report = ingest(spark, io, lake, raw, spec, options)
    finally:
        spark.stop()
    print("wrote:")
    for table in report.tables:
        if table.written is not None:
            print(f"  bronze/{table.table}: {table.written.rows_written:,} rows -> version {table.written.version} "
                  f"({table.written.files_added} files); {table.action}")
        elif table.action:
            print(f"  bronze/{table.table}: {table.action}")
    for q in report.quarantine_writes:
        if q.rows_written:
            print(f"  {q.table_uri.removeprefix(lake.root + '/')}: {q.rows_written:,} rows -> version {q.version}")
    total = sum(report.stage_seconds.values())
    print(f"ingest done in {total:.1f}s: " + ", ".join(f"{k} {v:.1f}s" for k, v in report.stage_seconds.items()))
    return 0


def _load_source(spark, config: IngestConfig):
    from spark_features.ingest import RawTables, read_source
    from spark_features.sources import load_mapping, movielens_100k_spec

    if config.source == "synthetic":
        from spark_features.sources import synthetic_source_spec
        from spark_features.synthetic import SyntheticConfig, generate_synthetic

        s = config.synthetic
        synth = SyntheticConfig(n_users=s.users, n_items=s.items, n_events=s.events, n_categories=s.categories,
                                n_clusters=s.clusters, days=s.days, start_date=s.start_date, seed=s.seed)
        tables = generate_synthetic(spark, synth)
        return synthetic_source_spec(), RawTables(tables.interactions, tables.users, tables.items)
    spec = movielens_100k_spec() if config.source == "movielens-100k" else load_mapping(config.mapping, config.source)
    return spec, read_source(spark, spec)


if __name__ == "__main__":
    run_job("ingest", lambda: main(sys.argv[1:]))
