"""Bronze tables -> indexed feature tables ``features/users`` and ``features/items``.

Pure DataFrame -> DataFrame transforms; the job (``jobs/build_features.py``) reads bronze,
updates vocabularies, calls these and writes. Column roles (categorical, numeric,
multi_valued, text) come from the bronze schema's metadata, written by ingest.

features/users: ``user_idx, user_id``, ``<cat>_idx`` per categorical (and derived prefix),
``<num>_bucket`` per numeric, activity as of the cutoff (``n_events``, ``n_events_bucket``,
``last_event_ts``, ``recency_days``, ``recency_bucket``), ``as_of``.

features/items: ``item_idx, item_id``, the same per-attribute columns (multi-valued ->
``<col>_idx`` array<int>), ``n_events`` / ``n_positives`` (training window),
``popularity_bucket``, ``primary_category_idx`` and ``log_q`` = log of the item's share of
training positives (the sampling probability used by logQ correction; items without a
training positive get half a positive, so log_q is finite).

Buckets: numeric attributes use quantile boundaries computed once per full build and stored
in ``features/spec``; activity/recency use the fixed log-scale boundaries. Bucket 0 means
null/unknown; values get 1 + (number of boundaries <= x). Every rule (buckets, prefixes,
history) is ``lake_contract.feature_contract``'s, which serving applies too.
"""

from __future__ import annotations

from dataclasses import dataclass

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F
from pyspark.sql import types as T

from lake_contract.feature_contract import (
    ACTIVITY_BOUNDARIES,
    RECENCY_DAY_BOUNDARIES,
    bucket_sql,
    prefix_column,
    prefix_sql,
)

FEATURE_SPEC_SCHEMA = T.StructType([
    T.StructField("table", T.StringType(), False),
    T.StructField("column", T.StringType(), False),
    T.StructField("feature", T.StringType(), False),
    T.StructField("kind", T.StringType(), False),  # categorical | multi_valued | bucket
    T.StructField("vocab", T.StringType(), True),
    T.StructField("boundaries", T.ArrayType(T.DoubleType(), False), True),
])


@dataclass(frozen=True)
class FeatureColumn:
    """One model input column of a feature table and where its indices come from."""

    table: str  # users | items
    column: str  # bronze column
    feature: str  # output column in features/<table>
    kind: str  # categorical | multi_valued | bucket
    vocab: str | None = None
    boundaries: tuple[float, ...] | None = None


def spark_ident(column: str) -> str:
    """A column name quoted for Spark SQL text."""
    return "`" + column.replace("`", "``") + "`"


def bucketize(column: str, boundaries: tuple[float, ...] | list[float]) -> Column:
    """The contract's bucket of the column named ``column`` (``feature_contract.bucket_sql``:
    0 for null, else 1 + the number of boundaries <= x, int). The same SQL text runs in the
    serving query. A sum of comparisons with literals compiles to plain code (a filter lambda
    over an array would be interpreted per row)."""
    return F.expr(bucket_sql(spark_ident(column), boundaries))


def quantile_boundaries(df: DataFrame, column: str, n_buckets: int) -> tuple[float, ...]:
    """Interior quantile boundaries (n_buckets - 1 of them, de-duplicated) of a numeric column."""
    probs = [i / n_buckets for i in range(1, n_buckets)]
    values = df.select(F.col(column).cast("double").alias("x")).where(F.col("x").isNotNull())
    found = values.approxQuantile("x", probs, 0.001) if probs else []
    return tuple(sorted(set(float(v) for v in found)))


def vocab_name(table: str, column: str) -> str:
    return f"{table}.{column}".lower()


def plan_feature_columns(table: str, roles: dict[str, str], prefixes: dict[str, int]) -> list[FeatureColumn]:
    """The feature columns a bronze users/items table yields, from its column roles."""
    out: list[FeatureColumn] = []
    for column, role in roles.items():
        if role == "categorical":
            out.append(FeatureColumn(table, column, f"{column}_idx", "categorical", vocab_name(table, column)))
        elif role == "multi_valued":
            out.append(FeatureColumn(table, column, f"{column}_idx", "multi_valued", vocab_name(table, column)))
        elif role == "numeric":
            out.append(FeatureColumn(table, column, f"{column}_bucket", "bucket"))
    for key in prefixes:
        tab, column = key.split(".", 1)
        if tab == table:
            if column not in roles:
                raise ValueError(f"prefix column {key!r}: bronze {table} has no column {column!r} (has {sorted(roles)})")
            derived = prefix_column(column)
            out.append(FeatureColumn(table, derived, f"{derived}_idx", "categorical", vocab_name(table, derived)))
    return out


def with_prefix_columns(df: DataFrame, table: str, prefixes: dict[str, int]) -> DataFrame:
    for key, length in prefixes.items():
        tab, column = key.split(".", 1)
        if tab == table:
            df = df.withColumn(prefix_column(column), F.expr(prefix_sql(spark_ident(column), length)))
    return df


def activity_columns(events: DataFrame, key: str, cutoff_ts: Column) -> DataFrame:
    """Per ``key``: n_events, last_event_ts, recency_days (as of the cutoff) and their buckets.

    ``events`` must already be restricted to event_ts < cutoff.
    """
    agg = events.groupBy(key).agg(F.count(F.lit(1)).alias("n_events"), F.max("event_ts").alias("last_event_ts"))
    return activity_from_counts(agg, key, cutoff_ts)


def activity_from_counts(counts: DataFrame, key: str, cutoff_ts: Column) -> DataFrame:
    """``activity_columns`` from per-``key`` ``n_events`` and ``last_event_ts`` already counted
    (e.g. a user's state row plus the events since it)."""
    recency = (cutoff_ts.cast("double") - F.col("last_event_ts").cast("double")) / 86400.0
    return counts.withColumn("recency_days", recency).select(
        key, "n_events", bucketize("n_events", ACTIVITY_BOUNDARIES).alias("n_events_bucket"),
        "last_event_ts", "recency_days", bucketize("recency_days", RECENCY_DAY_BOUNDARIES).alias("recency_bucket"),
    )


def log_q_column(n_positives: Column, total_positives: int) -> Column:
    """log(share of training positives); an item with none gets half a positive."""
    total = float(max(total_positives, 1))
    return F.log(F.greatest(n_positives.cast("double"), F.lit(0.5)) / F.lit(total))
