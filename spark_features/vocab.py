"""Append-only vocabularies, Spark side: count values, assign stable indices, index columns.

A vocabulary ``vocab/<name>`` (``user_id``, ``item_id``, ``users.gender``, ``items.genres``,
...) is a Delta table with one row per value (``VOCAB_SCHEMA``). docs/design.md decision 5, IDs
are stable forever:

* index 0 means unknown/padding and is never assigned;
* a value keeps its index across every later run, nightly or hourly, even when it no longer
  appears or is now below the threshold;
* values seen fewer than ``min_count`` times in the data given to one update are not added
  (they map to 0); the threshold is recorded on the rows it admitted;
* the new values of one update get ``max index + 1, + 2, ...`` in the order count
  descending, then value ascending, so the same input always yields the same vocabulary.

An update that adds nothing writes nothing (no new Delta version), so re-running it is a
no-op. Otherwise the whole vocabulary (old rows + new rows) is written as ONE overwrite
commit planned against the version the old rows were read from: of two concurrent updates
one commits and the other raises ``CommitConflictError`` (re-run it), instead of both
appending colliding indices. Vocabularies are catalog-sized, so rewriting them is cheap;
counting the events happens in Spark, and only scalars reach the driver.

The pyspark-free readers (``read_vocab_info``, ``read_vocab_sizes``, ``read_vocab_mapping``)
and ``VocabInfo`` live in ``lake_contract.vocab_registry``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Literal

from pyspark import StorageLevel
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T
from pyspark.sql.window import Window

from lake_contract.delta_snapshot import table_version
from lake_contract.errors import CommitConflictError, TowerlakeError
from lake_contract.lake import Lake
from lake_contract.vocab_registry import UNKNOWN_INDEX, VocabInfo, vocab_table
from spark_features.delta_io import DeltaLakeIO, WriteResult

__all__ = [
    "MAP_LOOKUP_MAX_VALUES",
    "UNKNOWN_INDEX",
    "VOCAB_SCHEMA",
    "VocabInfo",
    "VocabInvariantError",
    "assign_new_indices",
    "check_vocab_extends",
    "count_values",
    "index_array_column",
    "index_column",
    "load_vocab",
    "update_vocab",
    "vocab_table",
]

log = logging.getLogger(__name__)

VOCAB_SCHEMA = T.StructType([
    T.StructField("value", T.StringType(), False),
    T.StructField("index", T.LongType(), False),
    T.StructField("count", T.LongType(), True),  # occurrences in the update that added the value
    T.StructField("min_count", T.IntegerType(), True),  # threshold in force when it was added
    T.StructField("added_by", T.StringType(), True),  # run key of that update ("full", "2026-01-05T13")
])

# Spark's maps are array-backed (a lookup scans the keys), so the map lookup only pays off
# for small vocabularies; bigger ones go through explode + join + re-aggregate.
MAP_LOOKUP_MAX_VALUES = 1_000

_VALUE = "_tl_vocab_value"
_INDEX = "_tl_vocab_index"
_MAP = "_tl_vocab_map"
_ROW = "_tl_row_id"
_POS = "_tl_pos"
_ELEM = "_tl_elem"
_PAIRS = "_tl_pos_index"


class VocabInvariantError(TowerlakeError):
    """A vocabulary write would break stable ids (a value lost or re-indexed, a duplicate)."""


RaceHook = Callable[[str], None]


# ------------------------------------------------------------------ updates
def update_vocab(
    io: DeltaLakeIO,
    lake: Lake,
    name: str,
    values: DataFrame,
    min_count: int = 1,
    run_key: str = "full",
    *,
    _race_hook: RaceHook | None = None,
) -> VocabInfo:
    """Add the new values of ``values`` to ``vocab/<name>`` and return what the table holds.

    ``values``: one string column ``value``, one row per OCCURRENCE (nulls and blank strings
    are ignored). Values seen at least ``min_count`` times and not yet in the vocabulary get
    the next indices. ``run_key`` is recorded as ``added_by`` on the new rows.

    Raises ``ValueError`` (bad name, min_count, run_key or input column),
    ``CommitConflictError`` (another update committed since this one read the table; nothing
    was written, re-run), ``VocabInvariantError`` (the write would break stable ids; never
    expected). ``_race_hook`` is a test seam, called with ``"planned"`` (old rows read, new
    rows assigned and checked) and ``"staged"`` (files written, not committed).
    """
    table = vocab_table(name)
    _check_min_count(min_count)
    if not isinstance(run_key, str) or not run_key.strip():
        raise ValueError(f"run_key must be a non-empty string such as 'full' or '2026-01-05T13', got {run_key!r}")
    _check_column_type(values, "value", T.StringType(), "values")

    uri = lake.table(table)
    read_version = table_version(uri)
    if read_version is None:
        old = _empty(io.spark, VOCAB_SCHEMA)
        old_rows, old_max, old_min_count = 0, 0, min_count
    else:
        old = io.read_table(uri, read_version)
        old_rows, old_max, old_min_count = _summary(old)

    new_rows = assign_new_indices(count_values(values, min_count), old, old_max, min_count, run_key)
    new_rows = new_rows.persist(StorageLevel.MEMORY_AND_DISK)  # checked, then written: compute once
    try:
        rows, max_index = check_vocab_extends(old, old.unionByName(new_rows))
        added = rows - old_rows
        if added == 0:
            log.info("vocab %s: no new values (version %s, %d values): nothing written", name, read_version, old_rows)
            return VocabInfo(
                name=name, size=old_max + 1, num_values=old_rows,
                min_count=old_min_count, version=read_version,
            )
        if max_index != old_max + added:
            raise VocabInvariantError(
                f"vocab {name}: {added} new value(s) after index {old_max} of version {read_version} should end at "
                f"index {old_max + added}, they end at {max_index}; nothing was written"
            )
        if _race_hook is not None:
            _race_hook("planned")
        # One file set for the whole vocabulary (split at maxRecordsPerFile), in index order:
        # without the coalesce every update would add a file to the next one's read.
        full = _conform(old.unionByName(new_rows)).coalesce(1).sortWithinPartitions("index")
        result = _commit_overwrite(io, full, uri, read_version, _race_hook)
    finally:
        new_rows.unpersist()
    log.info("vocab %s: added %d values (indices %d..%d, min_count %d, %s) -> %s",
             name, added, old_max + 1, old_max + added, min_count, run_key, result.describe())
    return VocabInfo(
        name=name, size=old_max + added + 1, num_values=old_rows + added,
        min_count=min_count, version=result.version, added=added,
    )


def count_values(values: DataFrame, min_count: int = 1) -> DataFrame:
    """Occurrences per value: ``(value string, count long)``, only values seen >= ``min_count`` times.

    Nulls and blank strings (empty or whitespace only) are not values.
    """
    value = F.col("value")
    return (
        values.select(value)
        .where(value.isNotNull() & ~value.rlike(r"(?U)^\s*$"))
        .groupBy("value")
        .agg(F.count(F.lit(1)).alias("count"))
        .where(F.col("count") >= min_count)
    )


def assign_new_indices(
    counts: DataFrame, old: DataFrame, after_index: int, min_count: int, run_key: str
) -> DataFrame:
    """Rows (``VOCAB_SCHEMA`` columns) for the values of ``counts`` that ``old`` lacks.

    Indices are ``after_index + 1, + 2, ...`` by count descending, then value ascending.
    """
    fresh = counts.join(old.select("value"), "value", "left_anti")
    # One window over all new values of ONE update (catalog-sized, not event-sized): a single
    # partition is what makes the numbering dense and deterministic.
    order = Window.orderBy(F.col("count").desc(), F.col("value").asc())
    return fresh.select(
        "value",
        (F.lit(after_index) + F.row_number().over(order)).cast("long").alias("index"),
        F.col("count").cast("long").alias("count"),
        F.lit(min_count).cast("int").alias("min_count"),
        F.lit(run_key).alias("added_by"),
    )


def check_vocab_extends(old: DataFrame, new: DataFrame) -> tuple[int, int]:
    """Check that ``new`` keeps every value of ``old`` at the same index, and is itself sound:
    no null or blank value, values and indices unique, every index >= 1. One Spark job.

    Returns ``(rows, max index)`` of ``new`` (``(0, 0)`` when empty); raises
    ``VocabInvariantError`` naming what is wrong otherwise.
    """
    side_old, index = F.col("_old"), F.col("index")
    per_value = (
        old.select("value", "index", F.lit(True).alias("_old"))
        .unionByName(new.select("value", "index", F.lit(False).alias("_old")))
        .groupBy("value")
        .agg(
            F.count(F.when(side_old, 1)).alias("n_old"),
            F.count(F.when(~side_old, 1)).alias("n_new"),
            F.max(F.when(side_old, index)).alias("old_index"),
            F.min(F.when(~side_old, index)).alias("new_min"),
            F.max(F.when(~side_old, index)).alias("new_index"),
            F.count(F.when(~side_old & (index.isNull() | (index < 1)), 1)).alias("bad_index"),
        )
    )
    n_new, old_index = F.col("n_new"), F.col("old_index")
    lost = (F.col("n_old") > 0) & (
        (n_new == 0) | (F.col("new_min") != old_index) | (F.col("new_index") != old_index)
    )
    blank = (n_new > 0) & (F.col("value").isNull() | F.col("value").rlike(r"(?U)^\s*$"))
    stats = per_value.agg(
        F.sum(n_new).alias("rows"),
        F.count(F.when(lost, 1)).alias("lost"),
        F.min(F.when(lost, F.struct("value", "old_index", "new_index"))).alias("lost_example"),
        F.count(F.when(n_new > 1, 1)).alias("dup_values"),
        F.count(F.when(blank, 1)).alias("blank"),
        F.sum("bad_index").alias("bad_index"),
        F.count_distinct("new_index").alias("indices"),
        F.max("new_index").alias("max_index"),
    ).first()
    rows = int(stats["rows"] or 0)
    problems = []
    if stats["lost"]:
        value, was, now = stats["lost_example"]
        problems.append(
            f"vocab shrinking: {stats['lost']} value(s) of the current vocabulary would be lost or re-indexed, "
            f"e.g. {value!r} ({was} -> {now}); indices are stable forever (docs/design.md decision 5)"
        )
    if stats["blank"]:
        problems.append(f"{stats['blank']} null or blank value(s)")
    if stats["bad_index"]:
        problems.append(f"{stats['bad_index']} index(es) null or < 1 (0 is reserved for unknown)")
    if stats["dup_values"]:
        problems.append(f"{stats['dup_values']} duplicate value(s)")
    elif not stats["bad_index"] and stats["indices"] != rows:
        problems.append(f"duplicate indices ({rows} values, {stats['indices']} distinct indices)")
    if problems:
        raise VocabInvariantError("vocab write refused: " + "; ".join(problems) + "; nothing was written")
    return rows, int(stats["max_index"] or 0)


def _commit_overwrite(
    io: DeltaLakeIO, frame: DataFrame, uri: str, read_version: int | None, race_hook: RaceHook | None
) -> WriteResult:
    """Write ``frame`` as the whole table in one commit that only succeeds on top of ``read_version``."""
    expected = 0 if read_version is None else read_version + 1
    if io.resolved_engine == "native":
        # Spark commits while writing, against the version it sees then: refuse if that moved.
        now = table_version(uri)
        if now != read_version:
            raise CommitConflictError(
                f"{uri} moved from version {read_version} to {now} while this vocabulary update was planned: "
                "nothing was written; re-run the job"
            )
        result = io.write_table(frame, uri, mode="overwrite")
    else:
        # write_table's two halves, so that the commit is pinned to read_version, the version
        # the new indices were planned from, not the (possibly newer) one stage_write saw.
        staged = io.stage_write(frame, uri, mode="overwrite")
        if race_hook is not None:
            race_hook("staged")
        pinned = dataclasses.replace(staged, table_existed=read_version is not None, read_version=read_version)
        result = io.commit_staged(pinned)
    if result.version != expected:
        # Only a writer that bypasses update_vocab can get here (its commit was not a conflict).
        raise VocabInvariantError(
            f"{uri} was committed as version {result.version} although planned against version {read_version}: "
            f"another writer committed in between and its values may be missing; compare versions "
            f"{expected}..{result.version}, restore the right one and re-run"
        )
    return result


def _summary(vocab: DataFrame) -> tuple[int, int, int]:
    """(rows, max index (0 when empty), min_count of the newest row (1 when empty)): one small job."""
    row = vocab.agg(
        F.count(F.lit(1)).alias("rows"),
        F.max("index").alias("max_index"),
        F.max_by("min_count", "index").alias("min_count"),
    ).first()
    return int(row["rows"]), int(row["max_index"] or 0), int(row["min_count"] or 1)


def _conform(full: DataFrame) -> DataFrame:
    """``full`` with exactly ``VOCAB_SCHEMA``, NOT NULL flags included.

    Spark reads Parquet columns back as nullable, and an overwrite with a nullable schema
    would silently relax the table's NOT NULL. ``check_vocab_extends`` has proved there are
    no nulls, so the coalesce changes no value; it only tells the analyser so.
    """
    return full.select(
        F.coalesce(F.col("value"), F.lit("")).alias("value"),
        F.coalesce(F.col("index").cast("long"), F.lit(0).cast("long")).alias("index"),
        F.col("count").cast("long").alias("count"),
        F.col("min_count").cast("int").alias("min_count"),
        F.col("added_by").cast("string").alias("added_by"),
    ).to(VOCAB_SCHEMA)


# -------------------------------------------------------------------- reads
def load_vocab(io: DeltaLakeIO, lake: Lake, name: str, version: int | None = None) -> DataFrame:
    """``(value string, index long)`` of ``vocab/<name>`` (latest when ``version`` is None);
    an empty DataFrame with those columns when the vocabulary does not exist yet."""
    uri = lake.table(vocab_table(name))
    if version is None and table_version(uri) is None:
        return _empty(io.spark, T.StructType(VOCAB_SCHEMA.fields[:2]))
    return io.read_table(uri, version).select("value", "index")


# ----------------------------------------------------------------- indexing
def index_column(df: DataFrame, column: str, vocab: DataFrame, out: str, *, broadcast: bool = True) -> DataFrame:
    """``df`` plus ``out`` (int) = the vocabulary index of string column ``column``; 0 when the
    value is null or unknown. Every row of ``df`` is kept exactly once (left join on the
    vocabulary's unique values); ``out`` replaces a column of that name in place.

    ``vocab``: ``(value, index)`` as from ``load_vocab``. It is broadcast; pass
    ``broadcast=False`` for a vocabulary too big to ship to every executor.
    """
    _check_column_type(df, column, T.StringType(), "df")
    lookup = _lookup(vocab)
    if broadcast:
        lookup = F.broadcast(lookup)
    joined = df.join(lookup, _col(column) == F.col(_VALUE), "left")
    index = F.coalesce(F.col(_INDEX), F.lit(UNKNOWN_INDEX)).cast("int")
    return joined.select(*_with_output(df.columns, out, index))


def index_array_column(
    df: DataFrame,
    column: str,
    vocab: DataFrame,
    out: str,
    *,
    strategy: Literal["auto", "map", "join"] = "auto",
    map_max_values: int = MAP_LOOKUP_MAX_VALUES,
) -> DataFrame:
    """``df`` plus ``out`` (array<int>): the vocabulary index of each element of the
    array<string> column ``column``, same order and length; null or unknown elements -> 0,
    a null array -> ``[]``. Every row of ``df`` is kept exactly once.

    ``strategy``: ``map`` looks elements up in the vocabulary folded into one map, joined to
    every row (no data to the driver); ``join`` explodes the arrays, joins the vocabulary and
    re-assembles each array in position order; ``auto`` takes ``map`` for vocabularies of at
    most ``map_max_values`` values (a Spark map lookup scans its keys).
    """
    _check_column_type(df, column, T.ArrayType(T.StringType()), "df")
    if strategy == "auto":
        strategy = "map" if vocab.count() <= map_max_values else "join"
    if strategy == "map":
        return _index_array_by_map(df, column, vocab, out)
    if strategy == "join":
        return _index_array_by_join(df, column, vocab, out)
    raise ValueError(f"strategy must be one of 'auto', 'map', 'join', got {strategy!r}")


def _index_array_by_map(df: DataFrame, column: str, vocab: DataFrame, out: str) -> DataFrame:
    mapping = vocab.agg(
        F.map_from_entries(F.collect_list(F.struct(F.col("value"), F.col("index").cast("int")))).alias(_MAP)
    )  # exactly one row, so the cross join keeps every row of df once
    joined = df.crossJoin(F.broadcast(mapping))
    looked_up = F.transform(
        _col(column), lambda x: F.coalesce(F.try_element_at(F.col(_MAP), x), F.lit(UNKNOWN_INDEX))
    )
    indices = F.coalesce(looked_up, F.array().cast("array<int>"))
    return joined.select(*_with_output(df.columns, out, indices))


def _index_array_by_join(df: DataFrame, column: str, vocab: DataFrame, out: str) -> DataFrame:
    # The row id is generated once, before the shuffle, and the whole row travels with its
    # elements, so no second evaluation of df has to reproduce the same ids.
    exploded = df.withColumn(_ROW, F.monotonically_increasing_id()).select(
        "*", F.posexplode_outer(_col(column)).alias(_POS, _ELEM)
    )
    joined = exploded.join(_lookup(vocab), F.col(_ELEM) == F.col(_VALUE), "left")
    pair = F.when(
        F.col(_POS).isNotNull(),  # posexplode_outer's row for a null or empty array
        F.struct(F.col(_POS).alias("pos"), F.coalesce(F.col(_INDEX), F.lit(UNKNOWN_INDEX)).cast("int").alias("index")),
    )
    grouped = joined.groupBy(_ROW).agg(
        *[F.first(_col(c)).alias(c) for c in df.columns],
        F.array_sort(F.collect_list(pair)).alias(_PAIRS),  # collect_list skips the nulls
    )
    indices = F.transform(F.col(_PAIRS), lambda p: p["index"])
    return grouped.select(*_with_output(df.columns, out, indices))


# ------------------------------------------------------------------ helpers
def _lookup(vocab: DataFrame) -> DataFrame:
    return vocab.select(F.col("value").alias(_VALUE), F.col("index").alias(_INDEX))


def _with_output(columns: list[str], out: str, expr: Column) -> list[Column]:
    """``columns`` with ``out`` replaced in place by ``expr``, or appended."""
    selected = [expr.alias(out) if c == out else _col(c) for c in columns]
    if out not in columns:
        selected.append(expr.alias(out))
    return selected


def _col(name: str) -> Column:
    """A top-level column by its exact name (dots in a name are not struct access)."""
    return F.col("`" + name.replace("`", "``") + "`")


def _empty(spark: SparkSession, schema: T.StructType) -> DataFrame:
    return spark.createDataFrame([], schema)


def _check_min_count(min_count: int) -> None:
    if isinstance(min_count, bool) or not isinstance(min_count, int) or min_count < 1:
        raise ValueError(f"min_count must be an integer >= 1 (occurrences needed to get an index), got {min_count!r}")


def _check_column_type(df: DataFrame, column: str, expected: T.DataType, what: str) -> None:
    if column not in df.columns:
        raise ValueError(f"{what} has no column {column!r}; it has {df.columns}")
    actual = df.schema[column].dataType
    if isinstance(expected, T.ArrayType):
        ok = isinstance(actual, T.ArrayType) and actual.elementType == expected.elementType
    else:
        ok = actual == expected
    if not ok:
        raise ValueError(
            f"{what}.{column} must be {expected.simpleString()}, got {actual.simpleString()} "
            "(cast it first: vocabulary values are strings)"
        )
