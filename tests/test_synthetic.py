"""The synthetic generator: contract (schemas, counts, ids, time window), determinism, and the
planted structure (power laws, taste clusters, ratings, region) measured with Spark aggregates."""

from __future__ import annotations

import dataclasses
import datetime
import math

import pytest
from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F

from spark_features.synthetic import (
    AGE_RANGE,
    INTERACTIONS_SCHEMA,
    ITEMS_SCHEMA,
    REGIONS,
    RELEASE_YEAR_RANGE,
    USERS_SCHEMA,
    SyntheticConfig,
    SyntheticTables,
    cluster_preferred_categories,
    generate_synthetic,
    user_cluster_column,
)

pytestmark = pytest.mark.spark

# Small enough for 2 cores, large enough that the statistical bounds below sit many standard
# errors away from the expected values.
SMALL = SyntheticConfig(n_users=2_000, n_items=500, n_events=50_000, seed=7)


@pytest.fixture(scope="module")
def tables(spark):
    generated = generate_synthetic(spark, SMALL)
    cached = SyntheticTables(
        interactions=generated.interactions.cache(),
        users=generated.users.cache(),
        items=generated.items.cache(),
    )
    yield cached
    for df in (cached.interactions, cached.users, cached.items):
        df.unpersist()


@pytest.fixture(scope="module")
def no_taste_events(spark):
    """Interactions of SMALL with taste_strength=0 plus ground-truth columns, cached."""
    config = dataclasses.replace(SMALL, taste_strength=0.0)
    generated = generate_synthetic(spark, config)
    events = _with_ground_truth(generated.interactions, generated.items, config).cache()
    yield events
    events.unpersist()


# --- config validation -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "expected_message"),
    [
        ({"n_users": 0}, "SyntheticConfig.n_users must be >= 1, got 0"),
        ({"n_users": 2.5}, "SyntheticConfig.n_users must be an int >= 1, got 2.5"),
        ({"n_users": True}, "SyntheticConfig.n_users must be an int >= 1, got True"),
        ({"n_events": -3}, "SyntheticConfig.n_events must be >= 1, got -3"),
        ({"n_items": 10, "n_categories": 20}, "SyntheticConfig.n_items must be >= n_categories (20), got 10"),
        ({"n_clusters": 0}, "SyntheticConfig.n_clusters must be in [1, 100000], got 0"),
        (
            {"categories_per_cluster": 21},
            "SyntheticConfig.categories_per_cluster must be <= n_categories (20), got 21",
        ),
        (
            {"n_clusters": 50_000, "n_categories": 5, "n_items": 5, "categories_per_cluster": 3},
            "SyntheticConfig.categories_per_cluster must be <= 100000 // n_clusters (2), got 3",
        ),
        ({"taste_strength": 1.5}, "SyntheticConfig.taste_strength must be in [0.0, 1.0], got 1.5"),
        (
            {"taste_strength": math.nan},
            "SyntheticConfig.taste_strength must be a finite number in [0.0, 1.0], got nan",
        ),
        ({"popularity_exponent": -0.1}, "SyntheticConfig.popularity_exponent must be >= 0.0, got -0.1"),
        ({"user_activity_exponent": -1}, "SyntheticConfig.user_activity_exponent must be >= 0.0, got -1"),
        ({"days": 0}, "SyntheticConfig.days must be >= 1, got 0"),
        ({"seed": -1}, "SyntheticConfig.seed must be in [0, 9223372036854775807], got -1"),
        (
            {"start_date": datetime.datetime(2026, 1, 1, 12)},
            "SyntheticConfig.start_date must be a datetime.date (no time part), got datetime.datetime(2026, 1, 1, 12, 0)",
        ),
    ],
)
def test_config_rejects_invalid_values_naming_field_range_and_value(overrides, expected_message):
    with pytest.raises(ValueError) as raised:
        SyntheticConfig(**overrides)
    assert str(raised.value) == expected_message


def test_generate_rejects_invalid_num_partitions(spark):
    with pytest.raises(ValueError, match=r"num_partitions must be an int >= 1 or None, got 0"):
        generate_synthetic(spark, SMALL, num_partitions=0)


# --- contract --------------------------------------------------------------------------------


def test_tables_match_declared_schemas_and_exact_counts(tables):
    assert tables.interactions.schema == INTERACTIONS_SCHEMA
    assert tables.users.schema == USERS_SCHEMA
    assert tables.items.schema == ITEMS_SCHEMA
    assert tables.interactions.count() == SMALL.n_events
    assert tables.users.count() == SMALL.n_users
    assert tables.items.count() == SMALL.n_items


def test_users_are_exactly_u0_to_un_with_attributes_in_range(tables):
    index = _index_of("user_id", "u")
    row = tables.users.agg(
        F.countDistinct("user_id").alias("distinct_ids"),
        F.min(index).alias("min_index"),
        F.max(index).alias("max_index"),
        F.sum((F.concat(F.lit("u"), index.cast("string")) != F.col("user_id")).cast("int")).alias(
            "malformed_ids"
        ),
        F.min("age").alias("min_age"),
        F.max("age").alias("max_age"),
        F.sort_array(F.collect_set("gender")).alias("genders"),
        F.sort_array(F.collect_set("region")).alias("regions"),
    ).first()
    assert (row.distinct_ids, row.min_index, row.max_index, row.malformed_ids) == (
        SMALL.n_users,
        0,
        SMALL.n_users - 1,
        0,
    )
    # 2000 users hit both ends of a 53-value uniform range with overwhelming probability.
    assert (row.min_age, row.max_age) == AGE_RANGE
    assert row.genders == ["F", "M"]
    assert row.regions == sorted(REGIONS)


def test_items_are_exactly_i0_to_in_with_category_first_in_distinct_genres(tables):
    index = _index_of("item_id", "i")
    expected_category = F.concat(F.lit("c"), F.pmod(index, F.lit(SMALL.n_categories)).cast("string"))
    valid_categories = F.array(*[F.lit(f"c{k}") for k in range(SMALL.n_categories)])
    row = tables.items.agg(
        F.countDistinct("item_id").alias("distinct_ids"),
        F.min(index).alias("min_index"),
        F.max(index).alias("max_index"),
        F.sum((F.concat(F.lit("i"), index.cast("string")) != F.col("item_id")).cast("int")).alias(
            "malformed_ids"
        ),
        F.sum((F.col("category") != expected_category).cast("int")).alias("wrong_category"),
        F.sum((F.col("genres")[0] != F.col("category")).cast("int")).alias("category_not_first"),
        F.sum((F.size(F.array_distinct("genres")) != F.size("genres")).cast("int")).alias("duplicate_genres"),
        F.sum((F.size(F.array_except("genres", valid_categories)) > 0).cast("int")).alias("unknown_genres"),
        F.sort_array(F.collect_set(F.size("genres"))).alias("genre_counts"),
        F.countDistinct("title").alias("distinct_titles"),
        F.min("release_year").alias("min_year"),
        F.max("release_year").alias("max_year"),
        F.min("price").alias("min_price"),
        F.max("price").alias("max_price"),
    ).first()
    assert (row.distinct_ids, row.min_index, row.max_index, row.malformed_ids) == (
        SMALL.n_items,
        0,
        SMALL.n_items - 1,
        0,
    )
    assert (row.wrong_category, row.category_not_first, row.duplicate_genres, row.unknown_genres) == (
        0,
        0,
        0,
        0,
    )
    assert row.genre_counts == [1, 2, 3]
    assert row.distinct_titles == SMALL.n_items
    assert RELEASE_YEAR_RANGE[0] <= row.min_year <= row.max_year <= RELEASE_YEAR_RANGE[1]
    assert 0.99 <= row.min_price <= row.max_price <= 49.99


def test_genres_never_repeat_even_with_two_categories(spark):
    config = SyntheticConfig(n_users=5, n_items=200, n_events=10, n_categories=2, categories_per_cluster=1)
    row = (
        generate_synthetic(spark, config)
        .items.agg(
            F.max(F.size("genres")).alias("max_genres"),
            F.sum((F.size(F.array_distinct("genres")) != F.size("genres")).cast("int")).alias("duplicates"),
        )
        .first()
    )
    assert (row.max_genres, row.duplicates) == (2, 0)


def test_every_event_references_an_existing_user_and_item(tables):
    events = tables.interactions
    assert events.join(tables.users, "user_id", "left_anti").count() == 0
    assert events.join(tables.items, "item_id", "left_anti").count() == 0


def test_event_times_are_whole_seconds_in_the_window_and_event_date_is_their_utc_date(spark, tables):
    assert spark.conf.get("spark.sql.session.timeZone") == "UTC"  # to_date below is then the UTC date
    window_start = datetime.datetime(2026, 1, 1)
    window_end = window_start + datetime.timedelta(days=SMALL.days)
    row = tables.interactions.agg(
        F.min("event_ts").alias("first_ts"),
        F.max("event_ts").alias("last_ts"),
        F.sum((F.unix_micros("event_ts") % 1_000_000 != 0).cast("int")).alias("fractional_seconds"),
        F.sum((F.col("event_date") != F.to_date("event_ts")).cast("int")).alias("wrong_dates"),
        F.countDistinct("event_date").alias("distinct_dates"),
        F.sort_array(F.collect_set("rating")).alias("ratings"),
    ).first()
    assert window_start <= row.first_ts <= row.last_ts < window_end
    assert row.fractional_seconds == 0
    assert row.wrong_dates == 0
    assert row.distinct_dates == SMALL.days
    assert row.ratings == [1.0, 2.0, 3.0, 4.0, 5.0]


# --- determinism -----------------------------------------------------------------------------


def test_same_seed_gives_identical_rows_for_any_partitioning(spark, tables):
    reference = {name: _fingerprint(getattr(tables, name)) for name in ("interactions", "users", "items")}
    for num_partitions in (1, 7):
        regenerated = generate_synthetic(spark, SMALL, num_partitions=num_partitions)
        for name, expected in reference.items():
            other = getattr(regenerated, name)
            assert other.rdd.getNumPartitions() == num_partitions
            assert _fingerprint(other) == expected, (name, num_partitions)


def test_fingerprint_detects_a_single_changed_rating(tables):
    # Guards the determinism test above: it must fail for tables that differ in one value.
    events = tables.interactions
    first = events.first()
    is_first = (
        (F.col("user_id") == first.user_id)
        & (F.col("item_id") == first.item_id)
        & (F.col("event_ts") == F.lit(first.event_ts))
    )
    assert events.where(is_first).count() == 1
    changed = events.withColumn(
        "rating", F.when(is_first, F.pmod(F.col("rating"), F.lit(5.0)) + 1.0).otherwise(F.col("rating"))
    )
    assert _fingerprint(changed) != _fingerprint(events)


def test_different_seed_gives_different_rows(spark, tables):
    other_config = dataclasses.replace(SMALL, seed=SMALL.seed + 1)
    other = generate_synthetic(spark, other_config)
    assert tables.interactions.intersectAll(other.interactions).count() < 0.01 * SMALL.n_events
    assert tables.users.intersectAll(other.users).count() < 0.05 * SMALL.n_users
    assert cluster_preferred_categories(other_config) != cluster_preferred_categories(SMALL)


# --- planted structure -----------------------------------------------------------------------


def test_top_one_percent_of_items_hold_far_more_than_one_percent_of_events(tables):
    top_count = SMALL.n_items // 100
    top_events = (
        tables.interactions.groupBy("item_id")
        .count()
        .orderBy(F.desc("count"))
        .limit(top_count)
        .agg(F.sum("count"))
    ).first()[0]
    # ~0.12 here: taste draws spread events over 20 categories of only 25 items each, which
    # dilutes the head; the pure power law (test below) puts ~0.35 on the top 5 of 500 items.
    assert top_events / SMALL.n_events > 0.10


def test_global_item_and_user_draws_follow_their_analytic_power_law_cdf(no_taste_events):
    # taste_strength=0: every item is a global popularity draw, so P(item index < m) is the
    # continuous power law's CDF at m + 1 (module docstring); users likewise.
    config, events = SMALL, no_taste_events
    item_index, user_index = _index_of("item_id", "i"), _index_of("user_id", "u")
    item_cuts, user_cuts = (1, 5, 50), (20, 200, 1000)
    row = events.agg(
        *[F.avg((item_index < m).cast("double")).alias(f"item_{m}") for m in item_cuts],
        *[F.avg((user_index < m).cast("double")).alias(f"user_{m}") for m in user_cuts],
    ).first()
    for m in item_cuts:
        expected = _power_law_cdf(m, config.n_items, config.popularity_exponent)
        assert row[f"item_{m}"] == pytest.approx(expected, abs=0.01), m
    for m in user_cuts:
        expected = _power_law_cdf(m, config.n_users, config.user_activity_exponent)
        assert row[f"user_{m}"] == pytest.approx(expected, abs=0.01), m


def test_full_taste_draws_only_preferred_categories_by_within_category_popularity(spark):
    config = dataclasses.replace(SMALL, taste_strength=1.0)
    generated = generate_synthetic(spark, config)
    events = _with_ground_truth(generated.interactions, generated.items, config)
    items_per_category = config.n_items // config.n_categories  # 25: n_items is a multiple of C here
    rank = F.floor(_index_of("item_id", "i") / config.n_categories)
    row = events.agg(
        F.avg(F.col("in_taste").cast("double")).alias("in_taste_share"),
        F.avg((rank == 0).cast("double")).alias("rank_0_share"),
        F.avg((rank < 5).cast("double")).alias("rank_below_5_share"),
    ).first()
    assert row.in_taste_share == 1.0
    assert row.rank_0_share == pytest.approx(
        _power_law_cdf(1, items_per_category, config.popularity_exponent), abs=0.01
    )
    assert row.rank_below_5_share == pytest.approx(
        _power_law_cdf(5, items_per_category, config.popularity_exponent), abs=0.01
    )


def test_active_users_most_frequent_category_is_one_their_cluster_prefers(tables):
    chance = SMALL.categories_per_cluster / SMALL.n_categories
    assert chance == 0.15
    events = _with_ground_truth(tables.interactions, tables.items, SMALL)
    in_taste_share = events.agg(F.avg(F.col("in_taste").cast("double"))).first()[0]
    assert in_taste_share >= SMALL.taste_strength  # taste draws plus global draws that land in taste
    share, users = _mode_category_hit_rate(events, min_events=10)
    assert users > 1_000
    assert share > 0.9, f"{share:.3f} of {users} users (chance {chance})"


def test_without_taste_the_most_frequent_category_is_preferred_only_at_about_chance(no_taste_events):
    share, users = _mode_category_hit_rate(no_taste_events, min_events=10)
    # Global popularity favours low category indexes a little, so allow a margin above 0.15.
    assert users > 1_000
    assert share < 0.35, f"{share:.3f} of {users} users"


def test_in_taste_events_are_rated_higher(tables):
    events = _with_ground_truth(tables.interactions, tables.items, SMALL)
    rows = {
        row.in_taste: row
        for row in events.groupBy("in_taste")
        .agg(F.avg("rating").alias("mean"), F.avg((F.col("rating") >= 4).cast("double")).alias("positive"))
        .collect()
    }
    # Expected from RATING_PROBS_*: means 4.01 vs 3.05, P(rating >= 4) 0.75 vs 0.35.
    assert rows[True].mean == pytest.approx(4.01, abs=0.05)
    assert rows[False].mean == pytest.approx(3.05, abs=0.05)
    assert rows[True].positive == pytest.approx(0.75, abs=0.02)
    assert rows[False].positive == pytest.approx(0.35, abs=0.02)


def test_region_carries_a_weak_cluster_signal_and_clusters_are_all_used(tables):
    regions = F.array(*[F.lit(name) for name in REGIONS])
    cluster = user_cluster_column(_index_of("user_id", "u"), SMALL)
    home_region = F.element_at(regions, F.pmod(cluster, F.lit(len(REGIONS))) + 1)
    row = tables.users.agg(
        F.avg((F.col("region") == home_region).cast("double")).alias("home_share"),
        F.countDistinct(cluster).alias("clusters_used"),
    ).first()
    # 0.35 + 0.65 / 5 = 0.48 expected, chance 0.2; one standard error is 0.011.
    assert 0.43 < row.home_share < 0.53
    assert row.clusters_used == SMALL.n_clusters


def test_cluster_preferred_categories_are_distinct_in_range_and_reproducible():
    preferred = cluster_preferred_categories(SMALL)
    assert sorted(preferred) == list(range(SMALL.n_clusters))
    for cluster, categories in preferred.items():
        assert len(categories) == len(set(categories)) == SMALL.categories_per_cluster, cluster
        assert all(0 <= category < SMALL.n_categories for category in categories), cluster
    assert cluster_preferred_categories(dataclasses.replace(SMALL)) == preferred
    # Not all clusters share one taste, or the planted signal would not separate users.
    assert len(set(preferred.values())) > SMALL.n_clusters // 2


# --- helpers ---------------------------------------------------------------------------------


def _index_of(id_column: str, prefix: str) -> Column:
    return F.substring(F.col(id_column), len(prefix) + 1, 20).cast("long")


def _power_law_cdf(m: int, n: int, exponent: float) -> float:
    """P(index < m) for the floored continuous power law on [1, n + 1)."""
    if exponent == 1.0:
        return math.log(m + 1) / math.log(n + 1)
    b = 1.0 - exponent
    return ((m + 1) ** b - 1.0) / ((n + 1) ** b - 1.0)


def _with_ground_truth(events: DataFrame, items: DataFrame, config: SyntheticConfig) -> DataFrame:
    """events + ``cluster`` (int), ``category`` (int, from the items table) and ``in_taste``
    (the category is one of the cluster's preferred ones, per ``cluster_preferred_categories``)."""
    preferred = cluster_preferred_categories(config)
    preferred_by_cluster = F.array(
        *[
            F.array(*[F.lit(category) for category in preferred[cluster]])
            for cluster in range(config.n_clusters)
        ]
    )
    item_categories = items.select("item_id", _index_of("category", "c").cast("int").alias("category"))
    cluster = user_cluster_column(_index_of("user_id", "u"), config)
    return (
        events.join(F.broadcast(item_categories), "item_id")
        .withColumn("cluster", cluster)
        .withColumn(
            "in_taste", F.array_contains(F.element_at(preferred_by_cluster, cluster + 1), F.col("category"))
        )
    )


def _mode_category_hit_rate(events: DataFrame, min_events: int) -> tuple[float, int]:
    """(share of users with >= ``min_events`` events whose most frequent category is preferred
    by their cluster, number of such users). Ties go to the lowest category index."""
    per_category = events.groupBy("user_id", "cluster", "category", "in_taste").count()
    by_user = Window.partitionBy("user_id")
    ranked = (
        per_category.withColumn("user_events", F.sum("count").over(by_user))
        .withColumn("position", F.row_number().over(by_user.orderBy(F.desc("count"), F.asc("category"))))
        .where((F.col("position") == 1) & (F.col("user_events") >= min_events))
    )
    row = ranked.agg(
        F.avg(F.col("in_taste").cast("double")).alias("share"), F.count("*").alias("users")
    ).first()
    return row.share, row.users


def _fingerprint(df: DataFrame) -> tuple[int, int, int]:
    """Order- and partitioning-independent fingerprint of a table's multiset of rows: the row
    count and the sums of two independent row hashes (40 and 30 bits; sums stay far below the
    long range). Two tables that differ in any row match with probability ~2^-70."""
    row = df.agg(
        F.count("*").alias("rows"),
        F.sum(F.pmod(F.xxhash64(*df.columns), F.lit(2**40))).alias("xxhash_sum"),
        F.sum(F.pmod(F.hash(*df.columns), F.lit(2**30))).alias("murmur_sum"),
    ).first()
    return row.rows, row.xxhash_sum, row.murmur_sum
