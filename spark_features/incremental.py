"""Incremental (hourly / daily) build: only one window's new events.

For the window [start, end):

1. new user/item ids (and new categorical values of the users/items touched) are appended
   to the vocabularies: existing indices never move;
2. the touched users and items get their ``features/*`` rows recomputed from bronze as of
   ``end`` and MERGEd in (one commit per table, other rows untouched; ``DeltaLakeIO.upsert``:
   a Delta MERGE on the native engine, file-level copy-on-write on delta-rs), and so do
   their ``features/user_state`` rows (last items, event count, seen items) when the full
   build created that table;
3. the window's positives get point-in-time history (from the users' earlier events in
   bronze) and offline negatives, and replace partition ``window=<key>`` of
   ``pairs/incremental``.

Everything is recomputed from bronze rather than incremented, so re-running a window gives
the same tables (idempotent): the MERGE writes the same rows again and the pairs partition
is replaced, never appended. Numeric buckets reuse the boundaries stored in
``features/spec`` by the last full build (a full build must exist first), and every setting
(history length, labels, negatives, prefixes, ...) is the one that build saved in
``features/config``: a run given other settings is refused, naming the fields. ``log_q`` of the
touched items uses the current total of positives; untouched items keep theirs until the
next full build (a constant shift for them).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.storagelevel import StorageLevel

from lake_contract.delta_snapshot import table_exists
from lake_contract.errors import TableNotFoundError
from lake_contract.feature_config import (
    FeatureConfig,
    require_same_feature_config,
    require_saved_feature_config,
)
from lake_contract.feature_contract import USER_STATE_TABLE, state_recent_length
from lake_contract.lake import BRONZE_TABLES, Lake
from lake_contract.run_ledger import completed_windows, mark_complete
from spark_features.delta_io import DeltaLakeIO, WriteResult
from spark_features.features import plan_feature_columns, with_prefix_columns
from spark_features.ingest import column_roles
from spark_features.negatives import parse_negative_specs, sample_negatives
from spark_features.pairs import label_positives, max_same_time_events, pair_id_column, with_history
from spark_features.training_data import (
    attach_negatives,
    entity_features,
    item_feature_rows,
    pair_rows,
    primary_category_column,
    user_feature_rows,
    user_state_rows,
    with_all_ids,
)
from spark_features.vocab import load_vocab, update_vocab

INCREMENTAL_PAIRS = "pairs/incremental"
LEDGER_JOB = "build_features"


@dataclass
class IncrementalReport:
    window: str
    events: int = 0
    pairs: int = 0
    new_users: int = 0
    new_items: int = 0
    written: dict[str, WriteResult] = field(default_factory=dict)
    stage_seconds: dict[str, float] = field(default_factory=dict)


def build_incremental(
    spark: SparkSession,
    io: DeltaLakeIO,
    lake: Lake,
    config: FeatureConfig | None,
    start: datetime,
    end: datetime,
    window_key: str,
    say: Callable[[str], None] = print,
) -> IncrementalReport:
    """Build window [start, end) (module docstring) with the full build's saved settings.

    ``config``: None uses them; a config is checked against them and refused
    (``FeatureConfigMismatchError``, naming the differing fields) unless equal."""
    report = IncrementalReport(window=window_key)
    clock = [time.monotonic()]

    def done(stage: str, detail: str = "") -> None:
        now = time.monotonic()
        report.stage_seconds[stage] = now - clock[0]
        clock[0] = now
        say(f"  [{stage}] {report.stage_seconds[stage]:.1f}s{'  ' + detail if detail else ''}")

    for needed in ("features/spec", "features/users", "features/items"):
        if not table_exists(lake.table(needed)):
            raise TableNotFoundError(
                f"{lake.table(needed)} is missing: run a full build first (python -m jobs.build_features)")
    config = resolve_feature_config(lake, config, "the incremental build")
    interactions = io.read_table(lake.table(BRONZE_TABLES["interactions"]))
    last_day = (end - timedelta(microseconds=1)).date()
    # The event_date bound lets the read skip every other date partition.
    in_window = (F.col("event_date").between(F.lit(start.date()), F.lit(last_day))
                 & (F.col("event_ts") >= F.lit(start)) & (F.col("event_ts") < F.lit(end)))
    window_events = interactions.where(in_window).persist(StorageLevel.MEMORY_AND_DISK)
    report.events = window_events.count()
    if report.events == 0:
        window_events.unpersist()
        done("read window", "no events in this window: nothing to do")
        mark_complete(lake, LEDGER_JOB, window_key, 0, 0)
        return report
    users = _optional(io, lake, "users")
    items = _optional(io, lake, "items")
    prefixes = dict(config.prefix_columns)
    users = with_prefix_columns(users, "users", prefixes) if users is not None else None
    items = with_prefix_columns(items, "items", prefixes) if items is not None else None
    user_cols = plan_feature_columns("users", _roles(users), prefixes) if users is not None else []
    item_cols = plan_feature_columns("items", _roles(items), prefixes) if items is not None else []
    touched_user_ids = window_events.select("user_id").distinct()
    touched_item_ids = window_events.select("item_id").distinct()
    touched_users = users.join(touched_user_ids, "user_id", "left_semi") if users is not None else None
    touched_items = items.join(touched_item_ids, "item_id", "left_semi") if items is not None else None
    done("read window", f"{report.events:,} events")

    # 1. vocabularies grow; nothing already indexed moves
    report.new_users = update_vocab(io, lake, "user_id", window_events.select(F.col("user_id").alias("value")),
                                    config.id_min_count, window_key).added
    report.new_items = update_vocab(io, lake, "item_id", window_events.select(F.col("item_id").alias("value")),
                                    config.id_min_count, window_key).added
    for frame, cols in ((touched_users, user_cols), (touched_items, item_cols)):
        for col in cols:
            if col.vocab is not None:
                values = frame.select(
                    (F.explode_outer(col.column) if col.kind == "multi_valued" else F.col(col.column)).alias("value")
                ).select(F.col("value").cast("string"))
                update_vocab(io, lake, col.vocab, values, config.categorical_min_count, window_key)
    done("vocabularies", f"new users={report.new_users:,}, new items={report.new_items:,}")

    # 2. recompute the touched users' and items' feature rows as of the window end; MERGE
    user_vocab = load_vocab(io, lake, "user_id")
    item_vocab = load_vocab(io, lake, "item_id")
    vocab_frames = {c.vocab: load_vocab(io, lake, c.vocab) for c in [*user_cols, *item_cols] if c.vocab}
    boundaries = _stored_boundaries(io, lake)
    upto_end = interactions.where(F.col("event_ts") < F.lit(end))
    touched_user_idx = window_events.select("user_id").distinct()
    their_events = _indexed(upto_end.join(touched_user_idx, "user_id", "left_semi"), user_vocab, item_vocab)
    their_events = label_positives(their_events, config.label_min_rating).persist(StorageLevel.MEMORY_AND_DISK)
    user_rows = user_feature_rows(
        with_all_ids(entity_features(touched_users, "user_id", "user_idx", user_vocab, user_cols, vocab_frames,
                                     boundaries), _touched_ids(user_vocab, touched_user_ids, "user_id", "user_idx"),
                     "user_id", "user_idx"),
        their_events, end,
    )
    item_events = _indexed(upto_end.join(touched_item_ids, "item_id", "left_semi"), user_vocab, item_vocab)
    item_events = label_positives(item_events, config.label_min_rating)
    total_positives = label_positives(upto_end, config.label_min_rating).where("is_positive").count()
    item_rows = item_feature_rows(
        with_all_ids(entity_features(touched_items, "item_id", "item_idx", item_vocab, item_cols, vocab_frames,
                                     boundaries), _touched_ids(item_vocab, touched_item_ids, "item_id", "item_idx"),
                     "item_id", "item_idx"),
        item_events, item_events.where("is_positive"), total_positives,
        primary_category_column(item_cols, config.primary_category),
    )
    report.written["features/users"] = io.upsert(_like_table(io, lake, "features/users", user_rows),
                                                 lake.table("features/users"), ["user_idx"])
    report.written["features/items"] = io.upsert(_like_table(io, lake, "features/items", item_rows),
                                                 lake.table("features/items"), ["item_idx"])
    state_detail = f"; no {USER_STATE_TABLE} (a full build creates it): serving reads the users' events"
    if table_exists(lake.table(USER_STATE_TABLE)):
        state_rows = user_state_rows(with_all_ids(None, _touched_ids(user_vocab, touched_user_ids, "user_id",
                                                                     "user_idx"), "user_id", "user_idx"),
                                     their_events, end, state_recent_length(config.history_length))
        report.written[USER_STATE_TABLE] = io.upsert(_like_table(io, lake, USER_STATE_TABLE, state_rows),
                                                     lake.table(USER_STATE_TABLE), ["user_idx"])
        state_detail = f", user_state={report.written[USER_STATE_TABLE].rows_written:,}"
    done("features merged", f"users={report.written['features/users'].rows_written:,} rows rewritten, "
         f"items={report.written['features/items'].rows_written:,}{state_detail}")

    # 3. the window's pairs with history from earlier events, and their negatives
    ties = max_same_time_events(their_events)
    history = with_history(their_events, config.history_length, ties)
    positives = (history.where(F.col("is_positive") & (F.col("event_ts") >= F.lit(start)))
                 .withColumn("pair_id", pair_id_column()).persist(StorageLevel.MEMORY_AND_DISK))
    user_features = io.read_table(lake.table("features/users"))
    user_static = user_features.select("user_idx", *[c.feature for c in user_cols])
    pairs = pair_rows(positives, user_static)
    specs = parse_negative_specs(config.negatives)
    negatives = None
    if specs:
        catalog = io.read_table(lake.table("features/items")).select(
            "item_idx", F.col("primary_category_idx").alias("category_idx"), F.col("n_positives").alias("popularity"))
        negatives = sample_negatives(
            positives.select("pair_id", "user_idx", "item_idx"),
            their_events.where("is_positive").select("user_idx", "item_idx"), catalog, specs, seed=config.seed)
    pairs = attach_negatives(pairs, negatives).withColumn("window", F.lit(window_key))
    result = io.write_table(pairs.repartition(4, "pair_id"), lake.table(INCREMENTAL_PAIRS), mode="overwrite",
                            partition_by=["window"], replace_where={"window": [window_key]})
    report.written[INCREMENTAL_PAIRS] = result
    report.pairs = result.rows_written
    done("pairs written", f"{report.pairs:,} pairs in {INCREMENTAL_PAIRS} window={window_key}")
    for frame in (window_events, their_events, positives):
        frame.unpersist()
    mark_complete(lake, LEDGER_JOB, window_key, report.events, report.pairs)  # last: the window is complete
    return report


def resolve_feature_config(lake: Lake, config: FeatureConfig | None, what: str) -> FeatureConfig:
    """The full build's saved settings; ``config`` (when given) must equal them."""
    saved = require_saved_feature_config(lake.root, what)
    if config is not None:
        require_same_feature_config(saved, config, what, advice=(
            "drop the differing settings (the saved ones are used), or run a full build with them first"))
    return saved.config


def backfill_days(
    spark: SparkSession,
    io: DeltaLakeIO,
    lake: Lake,
    config: FeatureConfig | None,
    days: list,
    force: bool = False,
    progress: Callable | None = None,
    say: Callable[[str], None] = print,
) -> dict[str, IncrementalReport]:
    """Run the incremental build for each UTC date in ``days``, in order, skipping dates the
    ledger already records as complete (unless ``force``). Returns the reports of the dates
    that ran; a failure stops the backfill there, and a re-run resumes at that date.
    ``config``: as in ``build_incremental`` (None: the full build's saved settings)."""
    config = resolve_feature_config(lake, config, "the backfill")
    done = completed_windows(lake, LEDGER_JOB)
    todo = [d for d in days if force or d.isoformat() not in done]
    say(f"backfill: {len(days)} date(s), {len(days) - len(todo)} already complete, {len(todo)} to build")
    reports = {}
    for day in (progress(todo) if progress else todo):
        start = datetime(day.year, day.month, day.day, tzinfo=UTC)
        report = build_incremental(spark, io, lake, config, start, start + timedelta(days=1), day.isoformat(),
                                   say=lambda _s: None)
        say(f"  {day}: {report.events:,} events, {report.pairs:,} pairs, new users {report.new_users:,}, "
            f"new items {report.new_items:,}")
        reports[day.isoformat()] = report
    return reports


def _optional(io: DeltaLakeIO, lake: Lake, table: str) -> DataFrame | None:
    uri = lake.table(BRONZE_TABLES[table])
    return io.read_table(uri) if table_exists(uri) else None


def _roles(frame: DataFrame) -> dict[str, str]:
    return {k: v for k, v in column_roles(frame.schema).items() if v != "id"}


def _indexed(events: DataFrame, user_vocab: DataFrame, item_vocab: DataFrame) -> DataFrame:
    from spark_features.vocab import index_column

    out = index_column(index_column(events, "user_id", user_vocab, "user_idx"), "item_id", item_vocab, "item_idx")
    return out.where((F.col("user_idx") > 0) & (F.col("item_idx") > 0))


def _touched_ids(vocab: DataFrame, touched: DataFrame, id_col: str, idx_col: str) -> DataFrame:
    """The vocab rows of the touched ids (as ``value``/``index`` for ``with_all_ids``)."""
    return vocab.join(touched.select(F.col(id_col).alias("value")), "value", "left_semi")


def _stored_boundaries(io: DeltaLakeIO, lake: Lake) -> dict[str, tuple[float, ...]]:
    rows = io.read_table(lake.table("features/spec")).where("kind = 'bucket'").collect()  # a few rows
    return {f"{r['table']}.{r['column']}": tuple(r["boundaries"] or ()) for r in rows}


def _like_table(io: DeltaLakeIO, lake: Lake, table: str, rows: DataFrame) -> DataFrame:
    """``rows`` with the column order and types of the existing table."""
    schema = io.read_table(lake.table(table)).schema
    missing = [f.name for f in schema.fields if f.name not in rows.columns]
    if missing:
        raise ValueError(f"{table}: the incremental rows lack {missing}; the users/items columns changed since the "
                         "last full build: run a full build")
    return rows.select(*[F.col(f.name).cast(f.dataType) for f in schema.fields])


__all__ = ["INCREMENTAL_PAIRS", "LEDGER_JOB", "IncrementalReport", "backfill_days", "build_incremental",
           "resolve_feature_config"]
