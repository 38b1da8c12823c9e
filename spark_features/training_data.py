"""The full (nightly) build: bronze -> vocabularies, feature tables, training pairs.

One function, ``build_training_data``, reads the bronze snapshots, grows the append-only
vocabularies, computes ``features/users`` / ``features/items`` / ``features/spec`` /
``features/user_state`` (serving's per-user state), ``features/item_state`` (running item
counts) and writes ``pairs/{train,valid,test}``. Every write goes through ``DeltaLakeIO``; pairs and features
are staged first and committed last, so a failure leaves every table as it was.

pairs/<split> columns: ``pair_id, user_idx, item_idx, event_ts, rating, label, weight,
hist (array<int>, N), hist_len, prior_events, prior_events_bucket``, every user feature index
column of ``features/users`` (static categoricals and numeric buckets), offline negatives
``neg_item_idx`` (array<int>) with ``neg_kind`` (array<string>, same order), and for
valid/test ``seen_items`` (every item the user touched strictly before the event).

Files: rows are hash-distributed over ``ceil(rows / rows_per_file)`` files but at least 16,
each written with 8 MiB row groups, so Petastorm can shard a split over ranks x reader
workers (<= 16 x the number of row groups) on a laptop and on a cluster alike.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.storagelevel import StorageLevel

from lake_contract.delta_snapshot import table_version
from lake_contract.errors import TableNotFoundError
from lake_contract.feature_config import ACTIVITY_BOUNDARIES, FEATURE_CONFIG_TABLE, FeatureConfig
from lake_contract.feature_contract import (
    HISTORY_ORDER,
    ITEM_STATE_TABLE,
    USER_STATE_TABLE,
    state_recent_length,
)
from lake_contract.lake import BRONZE_TABLES, Lake
from spark_features.delta_io import DeltaLakeIO, WriteResult
from spark_features.features import (
    FEATURE_SPEC_SCHEMA,
    FeatureColumn,
    activity_columns,
    activity_from_counts,
    bucketize,
    log_q_column,
    plan_feature_columns,
    quantile_boundaries,
    with_prefix_columns,
)
from spark_features.ingest import column_roles
from spark_features.negatives import (
    negative_buckets,
    negative_counts,
    parse_negative_specs,
    sample_negative_lists,
)
from spark_features.pairs import (
    SPLITS,
    assign_leave_last_out,
    assign_time_split,
    label_positives,
    max_same_time_events,
    pair_id_column,
    seen_before,
    with_history,
)
from spark_features.vocab import VocabInfo, index_array_column, index_column, load_vocab, update_vocabs

MIN_PAIR_FILES = 16
FEATURE_ROWS_PER_FILE = 250_000
ROW_GROUP_BYTES = 8 * 1024 * 1024


@dataclass
class BuildReport:
    bronze_versions: dict[str, int]
    vocabs: dict[str, VocabInfo]
    written: dict[str, WriteResult] = field(default_factory=dict)
    pair_counts: dict[str, int] = field(default_factory=dict)
    holdout_users: int = 0
    negative_mix: dict[str, dict[str, int]] = field(default_factory=dict)
    as_of: datetime | None = None
    stage_seconds: dict[str, float] = field(default_factory=dict)


def build_training_data(
    spark: SparkSession,
    io: DeltaLakeIO,
    lake: Lake,
    config: FeatureConfig,
    as_of: datetime | None = None,
    run_key: str = "full",
    say: Callable[[str], None] = print,
    ranked: DataFrame | None = None,
) -> BuildReport:
    """Full build from the latest bronze snapshots. ``as_of`` (default: just after the last
    event) is the cutoff for activity features; events at or after it are ignored.
    ``ranked`` (``user_idx``, ``items`` array<int>): release-ranked hard-negative candidates
    per user (``index_builder.release_negatives``), mixed into the ``hard`` kind with
    probability ``config.hard_ranked_share``; None: hard negatives come from categories only."""
    timings: dict[str, float] = {}
    clock = [time.monotonic()]

    def done(stage: str, detail: str = "") -> None:
        now = time.monotonic()
        timings[stage] = now - clock[0]
        clock[0] = now
        say(f"  [{stage}] {timings[stage]:.1f}s{'  ' + detail if detail else ''}")

    versions = {}
    for name, rel in BRONZE_TABLES.items():
        version = table_version(lake.table(rel))
        if version is None and name == "interactions":
            raise TableNotFoundError(f"no {lake.table(rel)}: run `python -m jobs.ingest` first")
        versions[name] = version
    say("  read bronze versions: " + ", ".join(f"{k}={v}" for k, v in versions.items()))
    interactions = io.read_table(lake.table(BRONZE_TABLES["interactions"]), versions["interactions"])
    users = io.read_table(lake.table(BRONZE_TABLES["users"]), versions["users"]) if versions["users"] is not None else None
    items = io.read_table(lake.table(BRONZE_TABLES["items"]), versions["items"]) if versions["items"] is not None else None

    if as_of is None:
        last = interactions.agg(F.max("event_ts").alias("m")).collect()[0]["m"]
        if last is None:
            raise TableNotFoundError("bronze/interactions is empty: nothing to build features from")
        as_of = last + timedelta(microseconds=1)
    interactions = interactions.where(F.col("event_ts") < F.lit(as_of))
    prefixes = dict(config.prefix_columns)
    if users is not None:
        users = with_prefix_columns(users, "users", prefixes)
    if items is not None:
        items = with_prefix_columns(items, "items", prefixes)
    user_roles = {**(column_roles(users.schema) if users is not None else {})}
    item_roles = {**(column_roles(items.schema) if items is not None else {})}
    user_cols = plan_feature_columns("users", {k: v for k, v in user_roles.items() if v != "id"}, prefixes)
    item_cols = plan_feature_columns("items", {k: v for k, v in item_roles.items() if v != "id"}, prefixes)

    # ---- vocabularies (append-only; existing indices never change)
    vocabs: dict[str, VocabInfo] = {}
    user_values = interactions.select(F.col("user_id").alias("value"))
    if users is not None:
        user_values = user_values.unionByName(users.select(F.col("user_id").alias("value")))
    item_values = interactions.select(F.col("item_id").alias("value"))
    if items is not None:
        item_values = item_values.unionByName(items.select(F.col("item_id").alias("value")))
    updates = {"user_id": (user_values, config.id_min_count), "item_id": (item_values, config.id_min_count),
               **categorical_vocab_updates(((users, user_cols), (items, item_cols)), config.categorical_min_count)}
    vocabs.update(update_vocabs(io, lake, updates, run_key))  # one counting pass for all of them
    done("vocabularies", ", ".join(f"{k}={v.size}" for k, v in vocabs.items()))

    # ---- indexed events with history, labels, splits
    user_vocab = load_vocab(io, lake, "user_id")
    item_vocab = load_vocab(io, lake, "item_id")
    events = index_column(interactions, "user_id", user_vocab, "user_idx")
    events = index_column(events, "item_id", item_vocab, "item_idx")
    events = events.where((F.col("user_idx") > 0) & (F.col("item_idx") > 0))  # below min_count
    # Only the columns the build reads (the id strings and event_date would ride along in
    # every cache and shuffle below).
    events = label_positives(events, config.label_min_rating).select(*_EVENT_COLUMNS).persist(
        StorageLevel.MEMORY_AND_DISK)
    ties = max_same_time_events(events)
    hist = with_history(events, config.history_length, ties)
    positives = hist.where("is_positive").withColumn("pair_id", pair_id_column())
    if config.split == "leave-last-out":
        positives = assign_leave_last_out(positives, config.min_positives_for_holdout)
    else:
        positives = assign_time_split(positives, config.time_cut, config.valid_cut)
    # The wide rows (N history ids each) are cached on disk only: held in the heap next to
    # the events and the pairs being built they ran a 4g driver out of memory at 10M events.
    positives = positives.persist(StorageLevel.DISK_ONLY)
    split_counts = {r["split"]: int(r["count"]) for r in positives.groupBy("split").count().collect()}
    done("history + splits", f"max same-time events per user={ties}, positives per split={split_counts}")

    # ---- feature tables
    boundaries: dict[str, tuple[float, ...]] = {}
    for frame, cols in ((users, user_cols), (items, item_cols)):
        for col in cols:
            if col.kind == "bucket":
                boundaries[f"{col.table}.{col.column}"] = quantile_boundaries(frame, col.column, config.numeric_buckets)
    vocab_frames = {name: load_vocab(io, lake, name) for name in vocabs if name not in ("user_id", "item_id")}
    train_positives = positives.where(F.col("split") == "train")
    total_train = split_counts.get("train", 0)

    user_attrs = entity_features(users, "user_id", "user_idx", user_vocab, user_cols, vocab_frames, boundaries)
    # Each of these feeds several writes (and the negatives): compute once.
    user_features = user_feature_rows(with_all_ids(user_attrs, user_vocab, "user_id", "user_idx"), events, as_of
                                      ).persist(StorageLevel.MEMORY_AND_DISK)
    item_attrs = entity_features(items, "item_id", "item_idx", item_vocab, item_cols, vocab_frames, boundaries)
    item_features = item_feature_rows(
        with_all_ids(item_attrs, item_vocab, "item_id", "item_idx"), events, train_positives, total_train,
        primary_category_column(item_cols, config.primary_category),
    ).persist(StorageLevel.MEMORY_AND_DISK)
    user_state = user_state_rows(with_all_ids(None, user_vocab, "user_id", "user_idx"), events, as_of,
                                 state_recent_length(config.history_length))
    item_state = item_state_rows(with_all_ids(None, item_vocab, "item_id", "item_idx"), events, as_of)
    spec_rows = [
        (c.table, c.column, c.feature, c.kind, c.vocab,
         list(boundaries.get(f"{c.table}.{c.column}", ())) if c.kind == "bucket" else None)
        for c in [*user_cols, *item_cols]
    ] + [("users", "n_events", "n_events_bucket", "bucket", None, list(ACTIVITY_BOUNDARIES)),
         ("pairs", "prior_events", "prior_events_bucket", "bucket", None, list(ACTIVITY_BOUNDARIES)),
         ("items", "n_events", "popularity_bucket", "bucket", None, list(ACTIVITY_BOUNDARIES))]
    spec = spark.createDataFrame(spec_rows, FEATURE_SPEC_SCHEMA)
    # The settings of this build, committed with the tables they shaped (lake_contract.feature_config).
    saved_config = spark.createDataFrame([(config.to_json(), as_of)], "config_json string, as_of timestamp")

    # ---- negatives and pairs
    negative_specs = parse_negative_specs(config.negatives)
    user_static = user_features.select("user_idx", *[c.feature for c in user_cols])
    base = pair_rows(positives, user_static, extra=["split"])
    negative_mix: dict[str, dict[str, int]] = {}
    negatives = None
    if negative_specs:
        catalog = item_features.select(
            "item_idx", F.col("primary_category_idx").alias("category_idx"), F.col("n_positives").alias("popularity"))
        # Not cached: attach_negatives reads it once, and the mix is counted from base (which
        # carries split and the kinds), so no second pass and no join of the negatives.
        negatives = sample_negative_lists(
            positives.select("pair_id", "user_idx", "item_idx"), positives.select("user_idx", "item_idx"), catalog,
            negative_specs, seed=config.seed, ranked=ranked, ranked_share=config.hard_ranked_share,
            n_buckets=negative_buckets(spark.sparkContext.defaultParallelism,
                                       int(spark.conf.get("spark.sql.shuffle.partitions")), sum(split_counts.values())),
        )
    base = attach_negatives(base, negatives).persist(StorageLevel.DISK_ONLY)  # wide rows: see positives
    if negatives is not None:
        negative_mix = _negative_mix(base)
        if ranked is not None and any(spec.kind == "hard" for spec in negative_specs):
            listed = ranked.select("user_idx", F.explode("items").alias("item_idx"))
            hard = base.select("user_idx", F.explode(F.arrays_zip("neg_item_idx", "neg_kind")).alias("n")).where(
                F.col("n.neg_kind") == "hard").select("user_idx", F.col("n.neg_item_idx").alias("item_idx"))
            negative_mix.setdefault("all", {})["hard in release list"] = (
                hard.join(listed, ["user_idx", "item_idx"], "left_semi").count())
        done("negatives", f"{sum(n for split in SPLITS for n in negative_mix.get(split, {}).values()):,} rows")
    holdout = positives.where(F.col("split") != "train").select("pair_id", "user_idx", "event_ts")
    seen = seen_before(holdout, events).persist(StorageLevel.MEMORY_AND_DISK)  # valid and test both use it

    # ---- stage every write, then commit them all
    staged = []
    # Files sized by each table's own rows (one per FEATURE_ROWS_PER_FILE), so an hourly MERGE
    # rewrites the files of the touched rows, not the whole table.
    users_files = _feature_files(vocabs["user_id"].size)
    items_files = _feature_files(vocabs["item_id"].size)
    for name, frame, n_files, key in (
            ("features/users", user_features, users_files, "user_idx"),
            ("features/items", item_features, items_files, "item_idx"),
            ("features/spec", spec, 1, None), (FEATURE_CONFIG_TABLE, saved_config, 1, None),
            (USER_STATE_TABLE, user_state, users_files, "user_idx"),
            (ITEM_STATE_TABLE, item_state, items_files, "item_idx")):
        frame = frame.coalesce(1) if n_files == 1 else frame.repartitionByRange(n_files, key)
        staged.append((name, io.stage_write(frame, lake.table(name), overwrite_schema=True)))
    for split in SPLITS:
        rows = split_counts.get(split, 0)
        frame = base.where(F.col("split") == split).drop("split")
        if split != "train":
            frame = frame.join(seen, "pair_id", "left")
        n_files = max(MIN_PAIR_FILES, math.ceil(rows / config.rows_per_file))
        frame = frame.repartition(n_files, F.col("pair_id"))
        staged.append((f"pairs/{split}", io.stage_write(
            frame, lake.table(f"pairs/{split}"), overwrite_schema=True,
            options={"parquet.block.size": str(ROW_GROUP_BYTES)})))
    done("features + pairs staged")
    written = {}
    for name, handle in staged:
        written[name] = handle if isinstance(handle, WriteResult) else io.commit_staged(handle)
    done("committed")
    # Counted while positives are still cached (after the unpersist it would re-read bronze).
    holdout_users = positives.where(F.col("split") == "test").select("user_idx").distinct().count() \
        if config.split == "leave-last-out" else 0
    for frame in (events, positives, user_features, item_features, base, seen):
        frame.unpersist()
    return BuildReport(
        bronze_versions=versions, vocabs=vocabs, written=written, pair_counts=split_counts,
        holdout_users=holdout_users, negative_mix=negative_mix, as_of=as_of, stage_seconds=timings,
    )


_EVENT_COLUMNS = ("user_idx", "item_idx", "event_ts", "rating", "is_positive")


def _feature_files(rows: int) -> int:
    return max(1, math.ceil(rows / FEATURE_ROWS_PER_FILE))


def categorical_vocab_updates(frames_and_columns, min_count: int) -> dict[str, tuple[DataFrame, int]]:
    """``update_vocabs`` input for the categorical and multi-valued columns of each (bronze
    frame, planned columns) pair: one occurrence row per value (array elements exploded)."""
    updates = {}
    for frame, cols in frames_and_columns:
        for col in cols:
            if col.vocab is None:
                continue
            values = frame.select(
                (F.explode_outer(col.column) if col.kind == "multi_valued" else F.col(col.column)).alias("value")
            ).select(F.col("value").cast("string"))
            updates[col.vocab] = (values, min_count)
    return updates


def pair_rows(positives: DataFrame, user_static: DataFrame, extra: list[str] | None = None) -> DataFrame:
    """The columns of a pairs table for positive events that already carry history."""
    return positives.select(
        "pair_id", "user_idx", "item_idx", "event_ts", "rating", *(extra or []),
        F.lit(1.0).cast("float").alias("label"), F.lit(1.0).cast("float").alias("weight"),
        "hist", "hist_len", "prior_events",
        bucketize("prior_events", ACTIVITY_BOUNDARIES).alias("prior_events_bucket"),
    ).join(user_static, "user_idx", "left")


def attach_negatives(pairs: DataFrame, negatives: DataFrame | None) -> DataFrame:
    """Adds ``neg_item_idx`` array<int> and ``neg_kind`` array<string> from
    :func:`~spark_features.negatives.sample_negative_lists` rows (already one row per pair,
    by kind name then rank); empty arrays for a pair without negatives, or when there are none."""
    if negatives is None:
        return pairs.withColumn("neg_item_idx", F.array().cast("array<int>")).withColumn(
            "neg_kind", F.array().cast("array<string>"))
    lists = negatives.select("pair_id", F.col("neg_item_idx").alias("_tl_items"), F.col("neg_kind").alias("_tl_kinds"))
    return pairs.join(lists, "pair_id", "left").select(
        "*",
        F.coalesce(F.col("_tl_items"), F.array().cast("array<int>")).alias("neg_item_idx"),
        F.coalesce(F.col("_tl_kinds"), F.array().cast("array<string>")).alias("neg_kind"),
    ).drop("_tl_items", "_tl_kinds")


def entity_features(frame, id_col, idx_col, id_vocab, cols: list[FeatureColumn], vocab_frames, boundaries):
    """Indexed attribute columns of a bronze users/items frame (rows of unknown ids dropped)."""
    if frame is None:
        return None
    out = index_column(frame, id_col, id_vocab, idx_col)
    keep = [idx_col, id_col]
    for col in cols:
        if col.kind == "categorical":
            out = index_column(out.withColumn(col.column, F.col(col.column).cast("string")), col.column,
                               vocab_frames[col.vocab], col.feature)
        elif col.kind == "multi_valued":
            out = index_array_column(out, col.column, vocab_frames[col.vocab], col.feature)
        else:
            out = out.withColumn(col.feature, bucketize(col.column, boundaries[f"{col.table}.{col.column}"]))
        keep.append(col.feature)
    return out.where(F.col(idx_col) > 0).select(*keep)


def with_all_ids(features: DataFrame | None, vocab: DataFrame, id_col: str, idx_col: str) -> DataFrame:
    """Every id of the vocabulary gets a row (ids seen only in interactions have no attributes:
    their feature indices are 0 = unknown)."""
    ids = vocab.select(F.col("value").alias(id_col), F.col("index").cast("int").alias(idx_col))
    if features is None:
        return ids
    feature_cols = [c for c in features.columns if c not in (id_col, idx_col)]
    joined = ids.join(features.drop(id_col), idx_col, "left")
    for col in feature_cols:
        kind = dict(joined.dtypes)[col]
        joined = joined.withColumn(col, F.coalesce(F.col(col), F.array().cast(kind) if kind.startswith("array")
                                                   else F.lit(0)))
    return joined


def user_feature_rows(user_attrs: DataFrame, events: DataFrame | None, as_of: datetime,
                      counts: DataFrame | None = None) -> DataFrame:
    """features/users rows: attributes plus activity as of ``as_of``, from ``events`` (which
    must hold every event of these users before ``as_of``) or from ``counts`` (``user_idx``,
    ``n_events``, ``last_event_ts`` as of ``as_of``: the users' new state rows)."""
    if counts is not None:
        activity = activity_from_counts(counts.select("user_idx", "n_events", "last_event_ts"), "user_idx",
                                        F.lit(as_of))
    else:
        activity = activity_columns(events.where(F.col("event_ts") < F.lit(as_of)), "user_idx", F.lit(as_of))
    return (user_attrs.join(activity, "user_idx", "left").withColumn("as_of", F.lit(as_of))
            .fillna(0, ["n_events", "n_events_bucket", "recency_bucket"]))


def user_state_rows(users: DataFrame, events: DataFrame, as_of: datetime, recent_length: int) -> DataFrame:
    """``features/user_state`` rows (``lake_contract.feature_contract``) for every user of
    ``users`` (``user_id``, ``user_idx``) from ``events`` (indexed, known items only, holding
    every event of these users before ``as_of``): one grouped pass, no window over the lake."""
    order = F.struct(*[F.col(c) for c in HISTORY_ORDER])
    state = (events.where(F.col("event_ts") < F.lit(as_of)).groupBy("user_idx").agg(
        F.count(F.lit(1)).alias("n_events"),
        F.max("event_ts").alias("last_event_ts"),
        F.slice(F.sort_array(F.collect_list(order), asc=False), 1, recent_length).getField("item_idx").alias("recent"),
        F.array_sort(F.collect_set("item_idx")).alias("seen"),
    ))
    empty = F.array().cast("array<int>")
    return (users.select("user_idx", "user_id").join(state, "user_idx", "left").select(
        F.col("user_idx").cast("int").alias("user_idx"), "user_id",
        F.coalesce("n_events", F.lit(0)).cast("long").alias("n_events"), "last_event_ts",
        F.coalesce(F.col("recent").cast("array<int>"), empty).alias("recent"),
        F.coalesce(F.col("seen").cast("array<int>"), empty).alias("seen"),
        F.lit(as_of).cast("timestamp").alias("as_of"),
    ))


def item_state_rows(items: DataFrame, events: DataFrame, as_of: datetime) -> DataFrame:
    """``features/item_state`` rows (``lake_contract.feature_contract.ITEM_STATE_TABLE``) for
    every item of ``items`` (``item_idx``): events and positives (``is_positive``, every split)
    strictly before ``as_of``, from ``events`` (indexed, labelled)."""
    counts = events.where(F.col("event_ts") < F.lit(as_of)).groupBy("item_idx").agg(
        F.count(F.lit(1)).alias("n_events"), F.count(F.when(F.col("is_positive"), 1)).alias("n_positives"))
    return (items.select(F.col("item_idx").cast("int").alias("item_idx")).join(counts, "item_idx", "left").select(
        "item_idx", F.coalesce("n_events", F.lit(0)).cast("long").alias("n_events"),
        F.coalesce("n_positives", F.lit(0)).cast("long").alias("n_positives"),
        F.lit(as_of).cast("timestamp").alias("as_of")))


def item_feature_rows(item_attrs: DataFrame, events: DataFrame | None, counted_positives: DataFrame | None,
                      total_positives: int, primary, counts: DataFrame | None = None) -> DataFrame:
    """features/items rows: attributes, n_events / n_positives, popularity bucket, primary
    category and log_q (share of ``total_positives``). The counts come from ``events`` and
    ``counted_positives``, or ready-made from ``counts`` (``item_idx``, ``n_events``,
    ``n_positives``: the items' new state rows)."""
    if counts is not None:
        joined = item_attrs.join(counts.select("item_idx", "n_events", "n_positives"), "item_idx", "left")
    else:
        item_events = events.groupBy("item_idx").agg(F.count(F.lit(1)).alias("n_events"))
        item_pos = counted_positives.groupBy("item_idx").agg(F.count(F.lit(1)).alias("n_positives"))
        joined = item_attrs.join(item_events, "item_idx", "left").join(item_pos, "item_idx", "left")
    return (
        joined.fillna(0, ["n_events", "n_positives"])
        .withColumn("popularity_bucket", bucketize("n_events", ACTIVITY_BOUNDARIES))
        .withColumn("primary_category_idx", primary)
        .withColumn("log_q", log_q_column(F.col("n_positives"), total_positives))
    )


def primary_category_column(item_cols: list[FeatureColumn], wanted: str | None):
    """Index of an item's primary category: a categorical column, or the first value of a
    multi-valued one. 0 when the items table has no usable column."""
    by_column = {c.column: c for c in item_cols if c.kind in ("categorical", "multi_valued")}
    if wanted is not None and wanted not in by_column:
        raise ValueError(f"primary category column {wanted!r} is not a categorical/multi-valued items column; "
                         f"choose one of {sorted(by_column)}")
    choice = by_column.get(wanted) if wanted else (
        by_column.get("category") or next((c for c in item_cols if c.kind == "multi_valued"), None)
        or next(iter(by_column.values()), None))
    if choice is None:
        return F.lit(0)
    if choice.kind == "categorical":
        return F.col(choice.feature)
    return F.coalesce(F.element_at(F.col(choice.feature), 1), F.lit(0))


def _negative_mix(pairs: DataFrame) -> dict[str, dict[str, int]]:
    """{split: {neg_kind: negatives}} from pairs rows that carry ``split`` and ``neg_kind``."""
    rows = pairs.select("split", F.explode("neg_kind").alias("neg_kind")).groupBy("split", "neg_kind").count().collect()
    mix: dict[str, dict[str, int]] = {}
    for row in rows:  # one row per (split, kind)
        mix.setdefault(row["split"], {})[row["neg_kind"]] = int(row["count"])
    return mix


__all__ = ["BuildReport", "attach_negatives", "build_training_data", "categorical_vocab_updates", "entity_features", "negative_counts",
           "pair_rows"]
