"""What an incremental window needs of its users' and items' past, without reading the lake.

The window ``[start, end)`` touches some users and items. Their rows of ``features/user_state``
and ``features/item_state`` (``lake_contract.feature_contract``) hold everything before each
row's ``as_of``; adding the events from ``as_of`` to ``end`` gives the same state, feature
rows and point-in-time histories as recounting their whole history, so the read is the
bronze files that can hold an event at or after the oldest ``as_of`` involved (their logged
maximum ``event_ts`` says which; ``DeltaLakeIO.read_table(newer_than=...)``): after a nightly
full build and in-order hours, the files written since that build, not the lake.

Where to start reading, per touched user or item (``low``):

* its state row's ``as_of``, when that is at or before ``start``;
* no state row, ``id_min_count`` 1 and the full build's ``as_of`` at or before ``start``: that
  ``as_of`` (such a user or item had no event before it, or the full build would have given
  it an index and a state row);
* otherwise (a re-run or retry of this window: the row already holds it; an older window
  backfilled; a table built before the state existed; ``id_min_count`` > 1): nothing is
  assumed and its WHOLE history is read (``slow``). That costs a scan of bronze, and gives
  the same rows, so a re-run is still identical to the first run.

History from a state row: its ``recent`` items (the last 2N known items, newest first) become
stand-in events just before its ``as_of`` (one microsecond apart, in order), never positive,
so the window sort of ``pairs.with_history`` sees them exactly where the real events were;
``prior_events`` adds back the state's older events (``n_events - size(recent)``).
Late events (ingested after a state row was written, with an older timestamp than its
``as_of``) are not seen by these rows until the next full build, which recounts everything.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from pyspark.sql import DataFrame
from pyspark.sql import functions as F
from pyspark.storagelevel import StorageLevel

from lake_contract.delta_snapshot import as_utc, table_exists, table_version
from lake_contract.feature_config import FeatureConfig
from lake_contract.feature_contract import HISTORY_ORDER, ITEM_STATE_TABLE, USER_STATE_TABLE
from lake_contract.lake import BRONZE_TABLES, Lake
from spark_features.delta_io import DeltaLakeIO
from spark_features.pairs import label_positives
from spark_features.vocab import index_column

USER_STATE_COLUMNS = ("user_idx", "user_id", "n_events", "last_event_ts", "recent", "seen", "as_of")
ITEM_STATE_COLUMNS = ("item_idx", "n_events", "n_positives", "as_of")
_EVENT_COLUMNS = ("user_idx", "item_idx", "event_ts", "rating", "is_positive")


def indexed_events(events: DataFrame, user_vocab: DataFrame, item_vocab: DataFrame) -> DataFrame:
    """Events with ``user_idx`` / ``item_idx``; events of unknown users or items dropped."""
    out = index_column(index_column(events, "user_id", user_vocab, "user_idx"), "item_id", item_vocab, "item_idx")
    return out.where((F.col("user_idx") > 0) & (F.col("item_idx") > 0))


@dataclass
class WindowPast:
    """The touched users' and items' bases (state values and ``low``) and their events from
    ``low`` to ``end`` (module docstring). Build with :meth:`read`."""

    user_base: DataFrame  # user_idx, n_events, last_event_ts, recent, seen, low (null: whole history)
    item_base: DataFrame  # item_idx, n_events, n_positives, low
    user_events: DataFrame  # _EVENT_COLUMNS of the touched users, [low, end)
    item_events: DataFrame  # _EVENT_COLUMNS of the touched items, [low, end)
    since: datetime | None  # the oldest low of the users and items read from their state
    slow_users: int
    slow_items: int
    has_user_state: bool
    has_item_state: bool
    fresh: DataFrame | None = None  # the bronze rows since ``since`` (cached)

    @classmethod
    def read(cls, io: DeltaLakeIO, lake: Lake, interactions: DataFrame, window: DataFrame, user_vocab: DataFrame,
             item_vocab: DataFrame, config: FeatureConfig, full_as_of: datetime | None, start: datetime,
             end: datetime) -> WindowPast:
        """``interactions``: bronze (latest); ``window``: the window's indexed events."""
        full_as_of = as_utc(full_as_of) if full_as_of is not None else None
        new_low = full_as_of if config.id_min_count == 1 and full_as_of is not None and full_as_of <= start else None
        users, has_user_state = _base(io, lake, USER_STATE_TABLE, window.select("user_idx").distinct(), "user_idx",
                                      {"n_events": "0L", "last_event_ts": "CAST(NULL AS TIMESTAMP)",
                                       "recent": "CAST(array() AS array<int>)", "seen": "CAST(array() AS array<int>)"},
                                      start, new_low)
        items, has_item_state = _base(io, lake, ITEM_STATE_TABLE, window.select("item_idx").distinct(), "item_idx",
                                      {"n_events": "0L", "n_positives": "0L"}, start, new_low)
        users = users.persist(StorageLevel.MEMORY_AND_DISK)
        items = items.persist(StorageLevel.MEMORY_AND_DISK)
        lows = users.select("low").unionByName(items.select("low")).agg(
            F.min("low").alias("since"), F.count(F.when(F.col("low").isNull(), 1)).alias("slow")).collect()[0]
        slow = {name: frame.where(F.col("low").isNull()).count() if lows["slow"] else 0
                for name, frame in (("users", users), ("items", items))}
        since = lows["since"].astimezone(UTC) if lows["since"] is not None else None  # Spark answers local time

        def labelled(frame: DataFrame) -> DataFrame:
            return label_positives(indexed_events(frame, user_vocab, item_vocab), config.label_min_rating)

        upto_end = F.col("event_ts") < F.lit(end)
        fresh = None
        if since is not None:
            uri = lake.table(BRONZE_TABLES["interactions"])
            recent = io.read_table(uri, newer_than=("event_ts", since)).where(
                (F.col("event_date") >= F.lit(since.date())) & upto_end)
            fresh = labelled(recent).select(*_EVENT_COLUMNS).persist(StorageLevel.MEMORY_AND_DISK)
        whole = labelled(interactions.where(upto_end)).select(*_EVENT_COLUMNS) if lows["slow"] else None

        def events_of(base: DataFrame, key: str) -> DataFrame:
            parts = []
            if fresh is not None:
                parts.append(fresh.join(base.where(F.col("low").isNotNull()).select(key, "low"), key)
                             .where(F.col("event_ts") >= F.col("low")).drop("low"))
            if whole is not None:
                parts.append(whole.join(base.where(F.col("low").isNull()).select(key), key, "left_semi"))
            if not parts:  # every event of the window had an unknown id
                return label_positives(window, None).limit(0).select(*_EVENT_COLUMNS)
            out = parts[0].select(*_EVENT_COLUMNS)
            for part in parts[1:]:
                out = out.unionByName(part.select(*_EVENT_COLUMNS))
            return out

        past = cls(
            user_base=users, item_base=items,
            user_events=events_of(users, "user_idx").persist(StorageLevel.MEMORY_AND_DISK),
            item_events=events_of(items, "item_idx"),
            since=since, slow_users=slow["users"], slow_items=slow["items"],
            has_user_state=has_user_state, has_item_state=has_item_state, fresh=fresh,
        )
        return past

    def describe(self) -> str:
        read = f"events since {self.since}" if self.since is not None else "no state rows to start from"
        return (f"{read}; whole history read for {self.slow_users:,} user(s), {self.slow_items:,} item(s) "
                "(no usable state row)")

    def history_context(self) -> DataFrame:
        """The touched users' events [low, end) plus their state's ``recent`` items as stand-in
        events just before its ``as_of`` (never positive): the input of ``with_history``."""
        stand_in = self.user_base.where(F.col("low").isNotNull()).select(
            "user_idx", "low", F.posexplode("recent").alias("_tl_pos", "item_idx")).select(
            "user_idx", F.col("item_idx").cast("int").alias("item_idx"),
            F.expr("timestamp_micros(unix_micros(low) - _tl_pos - 1)").alias("event_ts"),
            F.lit(None).cast("double").alias("rating"), F.lit(False).alias("is_positive"))
        events = self.user_events.select(*_EVENT_COLUMNS)
        return events.unionByName(stand_in.select(*[F.col(c).cast(events.schema[c].dataType) for c in _EVENT_COLUMNS]))

    def prior_offsets(self) -> DataFrame:
        """(user_idx, _tl_offset): the state's events older than its ``recent`` items, which
        ``prior_events`` counted in the stand-ins' place."""
        return self.user_base.select("user_idx", (F.col("n_events") - F.size("recent")).alias("_tl_offset"))

    def user_state(self, users: DataFrame, recent_length: int, end: datetime) -> DataFrame:
        """New ``features/user_state`` rows (``USER_STATE_COLUMNS``) of ``users`` (``user_id``,
        ``user_idx``) as of ``end``: the base plus the events since ``low``."""
        order = F.struct(*[F.col(c) for c in HISTORY_ORDER])
        recent = self.history_context().groupBy("user_idx").agg(
            F.slice(F.sort_array(F.collect_list(order), asc=False), 1, recent_length).getField("item_idx")
            .alias("_tl_recent"))
        fresh = self.user_events.groupBy("user_idx").agg(
            F.count(F.lit(1)).alias("_tl_n"), F.max("event_ts").alias("_tl_last"),
            F.collect_set("item_idx").alias("_tl_seen"))
        empty = F.array().cast("array<int>")
        return (users.select("user_idx", "user_id").join(self.user_base, "user_idx", "left")
                .join(fresh, "user_idx", "left").join(recent, "user_idx", "left").select(
            F.col("user_idx").cast("int").alias("user_idx"), "user_id",
            (F.coalesce("n_events", F.lit(0)) + F.coalesce("_tl_n", F.lit(0))).cast("long").alias("n_events"),
            F.greatest("last_event_ts", "_tl_last").alias("last_event_ts"),
            F.coalesce(F.col("_tl_recent").cast("array<int>"), empty).alias("recent"),
            F.array_sort(F.array_distinct(F.concat(F.coalesce("seen", empty), F.coalesce("_tl_seen", empty))))
            .cast("array<int>").alias("seen"),
            F.lit(end).cast("timestamp").alias("as_of")))

    def item_state(self, end: datetime) -> DataFrame:
        """New ``features/item_state`` rows (``ITEM_STATE_COLUMNS``) of the touched items."""
        fresh = self.item_events.groupBy("item_idx").agg(
            F.count(F.lit(1)).alias("_tl_n"), F.count(F.when(F.col("is_positive"), 1)).alias("_tl_pos"))
        return self.item_base.join(fresh, "item_idx", "left").select(
            F.col("item_idx").cast("int").alias("item_idx"),
            (F.col("n_events") + F.coalesce("_tl_n", F.lit(0))).cast("long").alias("n_events"),
            (F.col("n_positives") + F.coalesce("_tl_pos", F.lit(0))).cast("long").alias("n_positives"),
            F.lit(end).cast("timestamp").alias("as_of"))

    def unpersist(self) -> None:
        for frame in (self.user_base, self.item_base, self.user_events, self.fresh):
            if frame is not None:
                frame.unpersist()


def _base(io: DeltaLakeIO, lake: Lake, table: str, touched: DataFrame, key: str, zeros: dict[str, str],
          start: datetime, new_low: datetime | None) -> tuple[DataFrame, bool]:
    """One row per touched key: the state values to add to and ``low`` (module docstring)."""
    uri = lake.table(table)
    no_low = F.lit(None).cast("timestamp")
    if not table_exists(uri):
        return touched.select(key, *[F.expr(v).alias(c) for c, v in zeros.items()], no_low.alias("low")), False
    # Pinned to the version read now: this job upserts the table later, and Delta re-caches a
    # cached frame of the latest table after such a write (it would then see rows as of ``end``).
    state = io.read_table(uri, table_version(uri)).select(key, *zeros, "as_of").join(touched, key, "left_semi")
    joined = touched.join(state, key, "left")
    usable = F.coalesce(F.col("as_of") <= F.lit(start), F.lit(False))  # a row newer than start holds the window
    low = (F.when(usable, F.col("as_of")).when(F.col("as_of").isNotNull(), no_low)
           .otherwise(F.lit(new_low).cast("timestamp") if new_low is not None else no_low))
    values = [F.when(usable, F.col(c)).otherwise(F.expr(v)).alias(c) for c, v in zeros.items()]
    return joined.select(key, *values, low.alias("low")), True
