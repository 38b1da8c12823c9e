"""Build vocabularies, feature tables and training pairs from the bronze tables.

Modes:
  full         (nightly) rebuild features/* and pairs/{train,valid,test} from all of bronze
  incremental  (hourly / daily) only one window's new events: append new ids to the
               vocabularies, MERGE the changed users/items into features/*, write that
               window's pairs to its own partition of pairs/incremental; a window with no
               pairs exits 99 (nothing to do: the DAG skips the fine-tune)

Feature settings: a full build saves the settings it ran with (the flags below, defaults
filled in) in features/config. An incremental run uses those saved settings; a feature flag
given to it must equal the saved value, or the run is refused naming the fields (exit 2).

Examples:
  python -m jobs.build_features --prefix users.zip_code:3
  python -m jobs.build_features --label-min-rating 4 --negatives random:4,popularity:2,hard:2
  python -m jobs.build_features --split time --cut 1998-03-01 --valid-cut 1998-02-15
  python -m jobs.build_features --mode incremental --hour 2026-01-05T13
  spark-submit jobs/build_features.py --mode incremental --date 2026-01-05
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal

if __package__ in (None, ""):  # spark-submit jobs/build_features.py runs this file as a script
    import os

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jobs.cli import job_parser, run_job, setup_logging


@dataclass(frozen=True)
class BuildConfig:
    """The typed configuration of one build_features run."""

    lake: str
    mode: Literal["full", "incremental"]
    window_start: datetime | None
    window_end: datetime | None
    as_of: datetime | None
    engine: str
    master: str | None
    features: object  # lake_contract.feature_config.FeatureConfig (imported lazily): full mode's settings
    release_negatives: Literal["auto", "off"] = "auto"
    feature_overrides: dict | None = None  # the feature flags given (FeatureConfig fields): incremental mode

    def __post_init__(self) -> None:
        if self.mode not in ("full", "incremental"):
            raise ValueError(f"--mode must be 'full' or 'incremental', got {self.mode!r}")
        if self.mode == "incremental" and self.window_start is None:
            raise ValueError("--mode incremental needs --hour YYYY-MM-DDTHH or --date YYYY-MM-DD")
        if self.mode == "full" and self.window_start is not None:
            raise ValueError("--hour/--date only apply to --mode incremental")

    @property
    def window_key(self) -> str:
        """Partition name of an incremental window: '2026-01-05T13' (hour) or '2026-01-05' (day)."""
        assert self.window_start is not None and self.window_end is not None
        if self.window_end - self.window_start == timedelta(hours=1):
            return self.window_start.strftime("%Y-%m-%dT%H")
        return self.window_start.strftime("%Y-%m-%d")


def _utc(text: str, fmt: str) -> datetime:
    try:
        return datetime.strptime(text, fmt).replace(tzinfo=UTC)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected {fmt.replace('%', '')}, got {text!r}") from err


def _hour(text: str) -> datetime:
    return _utc(text, "%Y-%m-%dT%H")


def _day(text: str) -> datetime:
    return _utc(text, "%Y-%m-%d")


def _moment(text: str) -> datetime:
    for fmt in ("%Y-%m-%dT%H:%M:%S", "%Y-%m-%dT%H", "%Y-%m-%d"):
        try:
            return _utc(text, fmt)
        except argparse.ArgumentTypeError:
            continue
    raise argparse.ArgumentTypeError(f"expected YYYY-MM-DD[THH[:MM:SS]] (UTC), got {text!r}")


def _prefix(text: str) -> tuple[str, int]:
    column, _, length = text.rpartition(":")
    if not column or not length.isdigit():
        raise argparse.ArgumentTypeError(f"expected TABLE.COLUMN:LENGTH like users.zip_code:3, got {text!r}")
    return column, int(length)


def build_parser() -> argparse.ArgumentParser:
    p = job_parser("build_features", __doc__)
    p.add_argument("--mode", choices=("full", "incremental"), default="full")
    window = p.add_mutually_exclusive_group()
    window.add_argument("--hour", type=_hour, help="incremental window: one UTC hour, YYYY-MM-DDTHH")
    window.add_argument("--date", type=_day, help="incremental window: one UTC day, YYYY-MM-DD (backfills)")
    p.add_argument("--as-of", type=_moment, help="full mode: ignore events at/after this UTC time "
                   "(default: just after the last event)")
    # Feature flags default to "not given" (SUPPRESS): full mode fills in FeatureConfig's defaults
    # (listed in each help), incremental mode the full build's saved settings.
    features = p.add_argument_group("feature settings (saved by a full build, reused by incremental runs)")
    features.add_argument("--history-length", type=int, default=argparse.SUPPRESS,
                          help="items of point-in-time history per pair (default 50)")
    features.add_argument("--label-min-rating", type=float, default=argparse.SUPPRESS,
                          help="positives are ratings >= this (default: every interaction)")
    features.add_argument("--split", choices=("leave-last-out", "time"), default=argparse.SUPPRESS,
                          help="default leave-last-out")
    features.add_argument("--min-positives", type=int, default=argparse.SUPPRESS,
                          help="leave-last-out: users with fewer keep all in train (default 3)")
    features.add_argument("--cut", type=_moment, default=argparse.SUPPRESS,
                          help="--split time: test = events at/after this UTC time")
    features.add_argument("--valid-cut", type=_moment, default=argparse.SUPPRESS,
                          help="--split time: valid = events in [valid-cut, cut)")
    features.add_argument("--negatives", default=argparse.SUPPRESS,
                          help="offline negatives per positive, KIND:COUNT,... over random|popularity|hard, or none "
                          "(default random:4,popularity:2,hard:2)")
    p.add_argument("--release-negatives", choices=("auto", "off"), default="auto",
                   help="full mode, hard negatives: auto = when a release is published, also draw them from the "
                   "items it ranks 20-100 for each user (mined into negatives/release_ranked first); off = "
                   "categories only")
    features.add_argument("--ranked-share", type=float, default=argparse.SUPPRESS,
                          help="share of hard draws taken from the release's ranked list for users who also have "
                          "preferred categories (default 0.5)")
    features.add_argument("--id-min-count", type=int, default=argparse.SUPPRESS,
                          help="ids seen fewer times map to unknown (0) (default 1)")
    features.add_argument("--min-count", type=int, default=argparse.SUPPRESS,
                          help="categorical values seen fewer times map to unknown (0) (default 1)")
    features.add_argument("--buckets", type=int, default=argparse.SUPPRESS,
                          help="quantile buckets per numeric attribute (default 10)")
    features.add_argument("--prefix", type=_prefix, action="append", default=argparse.SUPPRESS,
                          help="derived categorical: TABLE.COLUMN:LENGTH, e.g. users.zip_code:3 (repeatable)")
    features.add_argument("--primary-category", default=argparse.SUPPRESS,
                          help="items column holding the primary category (default: auto)")
    features.add_argument("--seed", type=int, default=argparse.SUPPRESS, help="default 0")
    p.add_argument("--engine", choices=("auto", "native", "delta-rs"), default="auto")
    p.add_argument("--master", help="Spark master (default: spark-submit's, else local[*])")
    return p


# flag dest -> FeatureConfig field
FEATURE_FLAGS = {
    "id_min_count": "id_min_count", "min_count": "categorical_min_count", "buckets": "numeric_buckets",
    "history_length": "history_length", "label_min_rating": "label_min_rating", "split": "split",
    "min_positives": "min_positives_for_holdout", "cut": "time_cut", "valid_cut": "valid_cut",
    "negatives": "negatives", "seed": "seed", "prefix": "prefix_columns", "primary_category": "primary_category",
    "ranked_share": "hard_ranked_share",
}


def parse_config(argv: list[str] | None = None) -> BuildConfig:
    a = build_parser().parse_args(argv)
    from lake_contract.feature_config import FeatureConfig
    from spark_features.negatives import parse_negative_specs

    given = {field: getattr(a, dest) for dest, field in FEATURE_FLAGS.items() if hasattr(a, dest)}
    if "prefix_columns" in given:
        given["prefix_columns"] = dict(given["prefix_columns"])
    if "negatives" in given:
        parse_negative_specs(given["negatives"])  # fail fast on a typo, before Spark starts
    # Incremental mode applies the flags to the saved settings (and validates them there).
    features = FeatureConfig(**given) if a.mode == "full" else None
    start = a.hour or a.date
    end = None if start is None else start + (timedelta(hours=1) if a.hour else timedelta(days=1))
    return BuildConfig(lake=a.lake, mode=a.mode, window_start=start, window_end=end, as_of=a.as_of,
                       engine=a.engine, master=a.master, features=features, release_negatives=a.release_negatives,
                       feature_overrides=given)


def main(argv: list[str] | None = None) -> int:
    config = parse_config(argv)
    setup_logging("build_features")
    from jobs.spark_context import build_spark_session
    from lake_contract.lake import Lake
    from spark_features.delta_io import DeltaLakeIO

    lake = Lake(config.lake)
    print(f"build_features: mode={config.mode} lake={lake.root}"
          + (f" window={config.window_key}" if config.mode == "incremental" else ""))
    features = _incremental_features(lake, config) if config.mode == "incremental" else None  # before Spark
    spark = build_spark_session("towerlake-build-features", master=config.master)
    try:
        io = DeltaLakeIO(spark, engine=config.engine)
        if config.mode == "full":
            from spark_features.training_data import build_training_data

            ranked = _release_ranked(io, lake, config)
            report = build_training_data(spark, io, lake, config.features, as_of=config.as_of, ranked=ranked)
            _print_full(report)
        else:
            from spark_features.incremental import build_incremental

            report = build_incremental(spark, io, lake, features, config.window_start, config.window_end,
                                       config.window_key)
            _print_incremental(report)
    finally:
        spark.stop()
    if config.mode == "incremental" and report.pairs == 0:
        from lake_contract.errors import NothingToDo

        # The window is recorded complete in runs/build_features: a fine-tune has nothing to train.
        raise NothingToDo(f"window {config.window_key} has no new pairs ({report.events:,} events): "
                          "nothing to fine-tune")
    return 0


def _incremental_features(lake, config: BuildConfig):
    """The full build's saved settings; feature flags given must equal them (refused, naming
    the fields, otherwise: FeatureConfigMismatchError, exit 2)."""
    from dataclasses import replace

    from lake_contract.feature_config import (
        FEATURE_CONFIG_TABLE,
        require_same_feature_config,
        require_saved_feature_config,
    )

    what = "the incremental build"
    saved = require_saved_feature_config(lake.root, what)
    given = replace(saved.config, **(config.feature_overrides or {}))
    require_same_feature_config(saved, given, what, advice=(
        "drop the differing flags (the saved settings are used), or run a full build with them first"))
    print(f"  read: feature settings of the full build, {FEATURE_CONFIG_TABLE} v{saved.version}")
    return saved.config


def _release_ranked(io, lake, config: BuildConfig):
    """Mine CURRENT's ranks 20-100 for every user into negatives/release_ranked and return them
    as a DataFrame (user_idx, items); None when off, when --negatives has no hard kind, or when
    no release is published yet (the first night: hard negatives come from categories)."""
    from spark_features.negatives import parse_negative_specs

    if config.release_negatives == "off" or not any(s.kind == "hard" for s in parse_negative_specs(
            config.features.negatives)):
        return None
    from tqdm import tqdm

    from index_builder.release_negatives import mine_release_negatives

    with tqdm(desc="mine release negatives", unit="user", dynamic_ncols=True, mininterval=1.0) as bar:
        def advance(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        mined = mine_release_negatives(lake.root, on_batch=advance)
    if mined is None:
        print("hard negatives: no published release yet; drawing them from each user's preferred categories")
        return None
    print(f"hard negatives: release {mined.release_version} ranks {mined.first_rank}-{mined.last_rank} for "
          f"{mined.users:,} users ({mined.candidates:,} candidates) -> {mined.table_uri} v{mined.table_version} "
          f"in {mined.seconds:.1f}s; share of hard draws from them: {config.features.hard_ranked_share}")
    return io.read_table(mined.table_uri, mined.table_version).select("user_idx", "items")


def _print_full(report) -> None:
    print(f"as of {report.as_of.isoformat()}; vocab sizes (incl. index 0): "
          + ", ".join(f"{k}={v.size:,}" for k, v in report.vocabs.items()))
    print("wrote:")
    for name, result in report.written.items():
        print(f"  {name}: {result.rows_written:,} rows -> version {result.version} ({result.files_added} files)")
    if report.holdout_users:
        print(f"leave-last-out: {report.holdout_users:,} users have a test (and valid) pair")
    for split, mix in sorted(report.negative_mix.items()):
        print(f"negatives in pairs/{split}: " + ", ".join(f"{k}={v:,}" for k, v in sorted(mix.items())))
    print(f"done in {sum(report.stage_seconds.values()):.1f}s")


def _print_incremental(report) -> None:
    if report.events == 0:
        print(f"window {report.window}: no events; nothing changed")
        return
    print(f"window {report.window}: {report.events:,} events, {report.pairs:,} pairs, "
          f"new ids: users={report.new_users:,} items={report.new_items:,}")
    for name, result in report.written.items():
        print(f"  {name}: {result.rows_written:,} rows -> version {result.version} ({result.mode})")
    print(f"done in {sum(report.stage_seconds.values()):.1f}s")


if __name__ == "__main__":
    run_job("build_features", lambda: main(sys.argv[1:]))
