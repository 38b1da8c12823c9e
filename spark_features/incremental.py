"""Incremental (hourly / daily) build: only one window's new events.

For the window [start, end):

1. new user/item ids (and new categorical values of the users/items touched) are appended
   to the vocabularies: existing indices never move;
2. the touched users' and items' past is their rows of ``features/user_state`` /
   ``features/item_state`` plus only their events since each row's ``as_of``
   (``spark_features.window_past``): the hour reads the bronze files written since the
   last build, not the lake. A user or item without a usable row (a re-run of this window,
   an older window backfilled, a lake built before the state tables) reads its whole
   history instead, which gives the same rows;
3. their new state rows (running counts, last items, seen items) and ``features/users`` /
   ``features/items`` rows as of ``end`` are MERGEd in (one commit per table, other rows
   untouched; ``DeltaLakeIO.upsert``: a Delta MERGE on the native engine, file-level
   copy-on-write on delta-rs);
4. the window's positives get point-in-time history (the state's recent items and the
   events since) and offline negatives (never an item the user touched before ``end``:
   the state's ``seen``), and replace partition ``window=<key>`` of ``pairs/incremental``.

A re-run gives the same tables (idempotent): the rows are recomputed (from the whole
history, as the state rows are then newer than the window), the MERGE writes the same rows
again and the pairs partition is replaced, never appended. Numeric buckets reuse the boundaries stored in
``features/spec`` by the last full build (a full build must exist first), and every setting
(history length, labels, negatives, prefixes, ...) is the one that build saved in
``features/config``: a run given other settings is refused, naming the fields. ``log_q`` of the
touched items uses the total of ``features/item_state``'s running positives; untouched items
keep theirs until the next full build (a constant shift for them).
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
from lake_contract.feature_contract import ITEM_STATE_TABLE, USER_STATE_TABLE, state_recent_length
from lake_contract.lake import BRONZE_TABLES, Lake
from lake_contract.run_ledger import completed_windows, mark_complete
from spark_features.delta_io import DeltaLakeIO, WriteResult
from spark_features.features import plan_feature_columns, with_prefix_columns
from spark_features.ingest import column_roles
from spark_features.negatives import parse_negative_specs, sample_negative_lists
from spark_features.pairs import label_positives, max_same_time_events, pair_id_column, with_history
from spark_features.training_data import (
    attach_negatives,
    categorical_vocab_updates,
    entity_features,
    item_feature_rows,
    pair_rows,
    primary_category_column,
    user_feature_rows,
    with_all_ids,
)
from spark_features.vocab import load_vocab, update_vocabs
from spark_features.window_past import USER_STATE_COLUMNS, WindowPast, indexed_events

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
    past_since: datetime | None = None  # bronze was read from here on (None: no state row to start from)
    fallback_users: int = 0  # touched users whose whole history was read (no usable state row)
    fallback_items: int = 0


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
    saved_as_of = require_saved_feature_config(lake.root, "the incremental build").as_of
    interactions = io.read_table(lake.table(BRONZE_TABLES["interactions"]))
    last_day = (end - timedelta(microseconds=1)).date()
    # The event_date bound lets the read skip every other date partition.
    in_window = (F.col("event_date").between(F.lit(start.date()), F.lit(last_day))
                 & (F.col("event_ts") >= F.lit(start)) & (F.col("event_ts") < F.lit(end)))
    window_events = io.read_table(lake.table(BRONZE_TABLES["interactions"]), newer_than=("event_ts", start)).where(
        in_window).persist(StorageLevel.MEMORY_AND_DISK)
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
    touched_user_rows = users.join(touched_user_ids, "user_id", "left_semi") if users is not None else None
    touched_item_rows = items.join(touched_item_ids, "item_id", "left_semi") if items is not None else None
    done("read window", f"{report.events:,} events")

    # 1. vocabularies grow; nothing already indexed moves
    grown = update_vocabs(io, lake, {
        "user_id": (window_events.select(F.col("user_id").alias("value")), config.id_min_count),
        "item_id": (window_events.select(F.col("item_id").alias("value")), config.id_min_count),
        **categorical_vocab_updates(((touched_user_rows, user_cols), (touched_item_rows, item_cols)),
                                    config.categorical_min_count),
    }, window_key)  # one counting pass for all of them
    report.new_users, report.new_items = grown["user_id"].added, grown["item_id"].added
    done("vocabularies", f"new users={report.new_users:,}, new items={report.new_items:,}")

    # 2. the touched users' and items' past: their state rows plus only their events since
    #    (one whose state cannot answer reads its whole history: spark_features.window_past)
    user_vocab = load_vocab(io, lake, "user_id")
    item_vocab = load_vocab(io, lake, "item_id")
    vocab_frames = {c.vocab: load_vocab(io, lake, c.vocab) for c in [*user_cols, *item_cols] if c.vocab}
    boundaries = _stored_boundaries(io, lake)
    past = WindowPast.read(io, lake, interactions, indexed_events(window_events, user_vocab, item_vocab), user_vocab,
                      item_vocab, config, saved_as_of, start, end)
    report.past_since, report.fallback_users, report.fallback_items = (past.since, past.slow_users,
                                                                       past.slow_items)
    done("past read", past.describe())

    # 3. new state rows and feature rows of the touched users and items; MERGE
    recent_length = state_recent_length(config.history_length)
    touched_users = _touched_ids(user_vocab, touched_user_ids, "user_id", "user_idx")
    user_state = past.user_state(with_all_ids(None, touched_users, "user_id", "user_idx"), recent_length, end
                                 ).persist(StorageLevel.MEMORY_AND_DISK)
    user_rows = user_feature_rows(
        with_all_ids(entity_features(touched_user_rows, "user_id", "user_idx", user_vocab, user_cols, vocab_frames,
                                     boundaries), touched_users, "user_id", "user_idx"),
        None, end, counts=user_state,
    )
    item_state = past.item_state(end).persist(StorageLevel.MEMORY_AND_DISK)
    if past.has_item_state:
        report.written[ITEM_STATE_TABLE] = io.upsert(_like_table(io, lake, ITEM_STATE_TABLE, item_state),
                                                     lake.table(ITEM_STATE_TABLE), ["item_idx"])
        # Every item's running count (catalog-sized): the total the log_q shares are of.
        total_positives = io.read_table(lake.table(ITEM_STATE_TABLE)).agg(F.sum("n_positives")).collect()[0][0] or 0
    else:  # a lake built before features/item_state: count the lake's positives once
        total_positives = label_positives(indexed_events(interactions.where(F.col("event_ts") < F.lit(end)),
                                                         user_vocab, item_vocab),
                                          config.label_min_rating).where("is_positive").count()
    item_rows = item_feature_rows(
        with_all_ids(entity_features(touched_item_rows, "item_id", "item_idx", item_vocab, item_cols, vocab_frames,
                                     boundaries), _touched_ids(item_vocab, touched_item_ids, "item_id", "item_idx"),
                     "item_id", "item_idx"),
        None, None, int(total_positives), primary_category_column(item_cols, config.primary_category),
        counts=item_state,
    )
    report.written["features/users"] = io.upsert(_like_table(io, lake, "features/users", user_rows),
                                                 lake.table("features/users"), ["user_idx"])
    report.written["features/items"] = io.upsert(_like_table(io, lake, "features/items", item_rows),
                                                 lake.table("features/items"), ["item_idx"])
    state_detail = f"; no {USER_STATE_TABLE} (a full build creates it)"
    if past.has_user_state:
        report.written[USER_STATE_TABLE] = io.upsert(
            _like_table(io, lake, USER_STATE_TABLE, user_state.select(*USER_STATE_COLUMNS)),
            lake.table(USER_STATE_TABLE), ["user_idx"])
        state_detail = f", user_state={report.written[USER_STATE_TABLE].rows_written:,}"
    done("features merged", f"users={report.written['features/users'].rows_written:,} rows rewritten, "
         f"items={report.written['features/items'].rows_written:,}{state_detail}")

    # 4. the window's pairs with history from earlier events, and their negatives
    context = past.history_context()
    history = with_history(context, config.history_length, max_same_time_events(context))
    positives = (history.where(F.col("is_positive") & (F.col("event_ts") >= F.lit(start)))
                 .join(past.prior_offsets(), "user_idx", "left")
                 .withColumn("prior_events", F.col("prior_events") + F.coalesce("_tl_offset", F.lit(0)))
                 .drop("_tl_offset").withColumn("pair_id", pair_id_column()).persist(StorageLevel.MEMORY_AND_DISK))
    user_features = io.read_table(lake.table("features/users")).join(user_state.select("user_idx"), "user_idx",
                                                                     "left_semi")
    user_static = user_features.select("user_idx", *[c.feature for c in user_cols])
    pairs = pair_rows(positives, user_static)
    specs = parse_negative_specs(config.negatives)
    negatives = None
    if specs:
        catalog = io.read_table(lake.table("features/items")).select(
            "item_idx", F.col("primary_category_idx").alias("category_idx"), F.col("n_positives").alias("popularity"))
        # What a negative must avoid (and what ranks a user's categories): every distinct item
        # the user touched before the window end, the state's ``seen``.
        seen = user_state.select("user_idx", F.explode("seen").alias("item_idx"))
        negatives = sample_negative_lists(positives.select("pair_id", "user_idx", "item_idx"), seen, catalog, specs,
                                     seed=config.seed)
    pairs = attach_negatives(pairs, negatives).withColumn("window", F.lit(window_key))
    result = io.write_table(pairs.repartition(4, "pair_id"), lake.table(INCREMENTAL_PAIRS), mode="overwrite",
                            partition_by=["window"], replace_where={"window": [window_key]})
    report.written[INCREMENTAL_PAIRS] = result
    report.pairs = result.rows_written
    done("pairs written", f"{report.pairs:,} pairs in {INCREMENTAL_PAIRS} window={window_key}")
    for frame in (window_events, user_state, item_state, positives):
        frame.unpersist()
    past.unpersist()
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
