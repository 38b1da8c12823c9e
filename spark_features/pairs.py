"""Indexed events -> point-in-time training pairs and time-based splits (pure transforms).

Point-in-time correctness (docs/design.md decision 6): a pair's history holds only events
STRICTLY before the pair's event time, so other events at the same timestamp are never in
it. Ordering ties: which of several same-second positives is "the last" for leave-last-out
is decided by ``tie_key_column`` (a hash of the item index, independent of popularity).

``hist``: array<int> of exactly N item indices, most recent first, 0-padded at the end.
``prior_events``: how many events of the user happened strictly before this one.
"""

from __future__ import annotations

from datetime import datetime

from pyspark.sql import DataFrame
from pyspark.sql import functions as F
from pyspark.sql.window import Window

from lake_contract.feature_contract import HISTORY_ORDER

SPLITS = ("train", "valid", "test")


def label_positives(events: DataFrame, label_min_rating: float | None) -> DataFrame:
    """Adds ``is_positive``: every event, or those with rating >= the threshold."""
    if label_min_rating is None:
        return events.withColumn("is_positive", F.lit(True))
    return events.withColumn("is_positive", F.coalesce(F.col("rating") >= F.lit(label_min_rating), F.lit(False)))


def max_same_time_events(events: DataFrame) -> int:
    """Largest number of one user's events sharing one timestamp (a scalar)."""
    row = events.groupBy("user_idx", "event_ts").count().agg(F.max("count").alias("m")).collect()[0]
    return int(row["m"] or 1)


def with_history(events: DataFrame, history_length: int, max_ties: int) -> DataFrame:
    """Adds ``hist`` (N most recent earlier items, most recent first, 0-padded), ``hist_len``
    and ``prior_events`` to every event of ``events`` (user_idx, item_idx, event_ts, ...).

    One ordered pass per user: a single window sort by ``(event_ts, item_idx)`` yields the
    event's position ``p``, ``prior_events`` (how many events are strictly earlier) and the
    items of the ``N + max_ties - 1`` rows before it. The last ``p - prior_events`` of those
    share this event's timestamp, so dropping them leaves only strictly-earlier items (at
    least N of them in reach, even behind a run of same-time events); the last N of the rest,
    reversed, are the history. Only plain array functions (no lambdas, no per-element struct),
    and the window list is computed once and referenced by column. Cost is
    O(events x (N + max_ties)), independent of how many events a user has.
    """
    n = history_length
    lookback = n + max(max_ties, 1) - 1
    by_user = Window.partitionBy("user_idx").orderBy(*HISTORY_ORDER)  # the contract's order and tie rule
    recent = F.collect_list("item_idx").over(by_user.rowsBetween(-lookback, -1))
    prior = F.rank().over(Window.partitionBy("user_idx").orderBy("event_ts")) - 1
    with_window = events.select(
        "*",
        recent.alias("_tl_recent"),
        (F.row_number().over(by_user) - 1).alias("_tl_position"),
        prior.cast("long").alias("prior_events"),
    )
    # Strictly-earlier items at the front of _tl_recent (never negative: see the docstring).
    earlier = F.size("_tl_recent") - (F.col("_tl_position") - F.col("prior_events")).cast("int")
    hist_len = F.least(earlier, F.lit(n))
    items = F.reverse(F.slice("_tl_recent", earlier - hist_len + 1, hist_len))
    padded = F.concat(items, F.array_repeat(F.lit(0), F.lit(n) - hist_len))
    columns = [c for c in with_window.columns if c not in ("_tl_recent", "_tl_position", "prior_events")]
    return with_window.select(
        *columns,
        padded.cast("array<int>").alias("hist"),
        hist_len.cast("int").alias("hist_len"),
        "prior_events",
    )


def pair_id_column() -> F.Column:
    """Stable id of a pair: hash of (user_idx, item_idx, event_ts, rating)."""
    return F.xxhash64("user_idx", "item_idx", "event_ts", "rating")


def tie_key_column() -> F.Column:
    """Order of one user's positives that share a timestamp, for leave-last-out: a hash of
    the item index. Stable forever (indices are), and unrelated to popularity: ordering ties
    by the index itself (assigned by count, descending) would make the held-out "last" item
    of a same-second burst always the least popular one (44% of MovieLens-100K test rows
    sit in such a burst), a systematically harder test than the data holds."""
    return F.xxhash64(F.col("item_idx"))


def assign_leave_last_out(positives: DataFrame, min_positives: int) -> DataFrame:
    """``split``: a user's last positive is test, the one before valid, the rest train, for
    users with at least ``min_positives`` positives (others: all train). Same-time positives
    are ordered by ``tie_key_column``."""
    latest_first = Window.partitionBy("user_idx").orderBy(F.col("event_ts").desc(), tie_key_column().desc())
    per_user = Window.partitionBy("user_idx")
    rank = F.row_number().over(latest_first)
    count = F.count(F.lit(1)).over(per_user)
    split = (
        F.when(count < min_positives, F.lit("train"))
        .when(rank == 1, F.lit("test"))
        .when(rank == 2, F.lit("valid"))
        .otherwise(F.lit("train"))
    )
    return positives.withColumn("split", split)


def assign_time_split(positives: DataFrame, time_cut: datetime, valid_cut: datetime | None) -> DataFrame:
    """``split`` by a global time cut: [valid_cut, time_cut) valid, >= time_cut test."""
    ts = F.col("event_ts")
    split = F.when(ts >= F.lit(time_cut), F.lit("test"))
    if valid_cut is not None:
        split = split.when(ts >= F.lit(valid_cut), F.lit("valid"))
    return positives.withColumn("split", split.otherwise(F.lit("train")))


def seen_before(holdout: DataFrame, events: DataFrame) -> DataFrame:
    """(pair_id, seen_items): every distinct item the user interacted with strictly before the
    holdout pair's event, sorted, for excluding already-seen items at evaluation time."""
    h = holdout.select("pair_id", "user_idx", F.col("event_ts").alias("_tl_at"))
    e = events.select("user_idx", F.col("item_idx").alias("_tl_item"), F.col("event_ts").alias("_tl_ts"))
    joined = h.join(e, "user_idx").where(F.col("_tl_ts") < F.col("_tl_at"))
    seen = joined.groupBy("pair_id").agg(F.array_sort(F.collect_set("_tl_item")).cast("array<int>").alias("seen_items"))
    return holdout.select("pair_id").join(seen, "pair_id", "left").select(
        "pair_id", F.coalesce("seen_items", F.array().cast("array<int>")).alias("seen_items")
    )
