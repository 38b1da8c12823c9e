"""Synthetic interaction logs with planted structure, generated entirely inside Spark.

Used for scale tests (10M+ events on a laptop) and as a dataset on which a good two-tower
model must find real signal. Nothing is materialised on the driver: every table starts from
``spark.range`` and every column is a Spark expression (no Python UDFs, no per-row Python).

Generative model (all indexes 0-based):

* **Items.** Item ``j`` has primary category ``k = j % n_categories`` and within-category
  popularity rank ``r = j // n_categories``, so category ``k`` holds the arithmetic sequence
  ``k, k + C, k + 2C, ...`` (``n_k = ceil((n_items - k) / C)`` items) and lower ``j`` means
  more popular.
* **Users.** User ``u`` belongs to taste cluster ``user_cluster_column(u)`` (a hash of
  ``(seed, u)``), and its activity rank is ``u`` itself: user 0 is the most active.
* **Clusters.** Cluster ``c`` prefers ``categories_per_cluster`` distinct categories,
  ``cluster_preferred_categories(config)[c]``, a deterministic function of ``(seed, c)``.
* **Events.** The user is drawn from a power law over user indexes
  (``user_activity_exponent``). With probability ``taste_strength`` the item comes from one
  of the user's cluster's preferred categories (uniformly chosen) by within-category
  popularity; otherwise it is a global draw over all items by popularity. Both popularity
  draws use ``popularity_exponent``.
* **Ratings** (1..5) are higher on average when the item's primary category is one of the
  user's cluster's preferred categories, whichever draw produced the event.
* **Time.** Day uniform in ``[0, days)``, second uniform in ``[0, 86400)``, both UTC.
* **Region** (a user feature) equals the cluster's home region with probability
  ``REGION_AFFINITY``, else a uniform region, so it carries a little taste signal.

Power-law draws: index ``i`` in ``[0, n)`` is ``floor(x) - 1`` where ``x`` follows the
continuous density ``∝ x^-a`` on ``[1, n + 1)``, sampled by inverse CDF, so
``P(i < m) = ((m + 1)^(1-a) - 1) / ((n + 1)^(1-a) - 1)`` (``ln(m + 1) / ln(n + 1)`` at
``a = 1``).

Determinism: every random number is a uniform derived from ``xxhash64(seed, stream, row id)``
where ``row id`` comes from ``spark.range``, so the same config gives the same rows whatever
the number of partitions or cores. ``F.rand`` is never used: it depends on partitioning.
"""

from __future__ import annotations

import datetime
import math
import random
from dataclasses import dataclass

from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

INTERACTIONS_SCHEMA = T.StructType(
    [
        T.StructField("user_id", T.StringType(), nullable=False),
        T.StructField("item_id", T.StringType(), nullable=False),
        T.StructField("rating", T.DoubleType(), nullable=False),
        T.StructField("event_ts", T.TimestampType(), nullable=False),
        T.StructField("event_date", T.DateType(), nullable=False),
    ]
)

USERS_SCHEMA = T.StructType(
    [
        T.StructField("user_id", T.StringType(), nullable=False),
        T.StructField("age", T.IntegerType(), nullable=False),
        T.StructField("gender", T.StringType(), nullable=False),
        T.StructField("region", T.StringType(), nullable=False),
    ]
)

ITEMS_SCHEMA = T.StructType(
    [
        T.StructField("item_id", T.StringType(), nullable=False),
        T.StructField("title", T.StringType(), nullable=False),
        T.StructField("category", T.StringType(), nullable=False),
        T.StructField("genres", T.ArrayType(T.StringType(), containsNull=False), nullable=False),
        T.StructField("release_year", T.IntegerType(), nullable=False),
        T.StructField("price", T.DoubleType(), nullable=False),
    ]
)

USER_ID_PREFIX = "u"
ITEM_ID_PREFIX = "i"
CATEGORY_PREFIX = "c"

REGIONS: tuple[str, ...] = ("north", "south", "east", "west", "central")
# Probability that a user's region is its cluster's home region (REGIONS[cluster % 5]);
# with 5 regions that makes P(home) = 0.35 + 0.65 / 5 = 0.48 against a chance of 0.2.
REGION_AFFINITY = 0.35
AGE_RANGE = (18, 70)  # inclusive, years
RELEASE_YEAR_RANGE = (1980, 2025)  # inclusive
# Prices are x.99 in [0.99, 49.99] (currency units).
PRICE_WHOLE_UNITS = 50
MAX_EXTRA_GENRES = 2

# P(rating = 1..5) for events on a preferred category (mean 4.01) and on any other (mean 3.05):
# "rating >= 4" is 75% vs 35%, so explicit and implicit labels both carry the taste signal.
RATING_PROBS_IN_TASTE = (0.02, 0.05, 0.18, 0.40, 0.35)
RATING_PROBS_OUT_OF_TASTE = (0.10, 0.20, 0.35, 0.25, 0.10)

_SECONDS_PER_DAY = 86_400
_EPOCH = datetime.date(1970, 1, 1)
# The clusters' preferred categories travel to executors as one literal array in the query
# plan; past ~1e5 entries parsing and shipping it takes seconds.
_MAX_PREFERRED_ENTRIES = 100_000
_MAX_SEED = 2**63 - 1

_TITLE_ADJECTIVES = (
    "Silent", "Golden", "Hidden", "Broken", "Electric", "Crimson", "Lonely", "Wild",
    "Frozen", "Secret", "Bright", "Midnight", "Iron", "Paper", "Velvet", "Distant",
)  # fmt: skip
_TITLE_NOUNS = (
    "River", "Garden", "Empire", "Signal", "Harbor", "Machine", "Forest", "Letter",
    "Mirror", "Horizon", "Station", "Orchard", "Voyage", "Canyon", "Lantern", "Island",
)  # fmt: skip


@dataclass(frozen=True)
class SyntheticConfig:
    """Size and shape of one synthetic dataset; validated on construction.

    Counts are rows; ``days`` is the length of the event window in UTC days starting at
    ``start_date`` 00:00:00 UTC; exponents are those of the power laws described in the
    module docstring (0 = uniform).
    """

    n_users: int = 10_000
    n_items: int = 5_000
    n_events: int = 1_000_000
    n_categories: int = 20
    n_clusters: int = 16  # user taste clusters
    categories_per_cluster: int = 3  # each cluster prefers this many categories
    taste_strength: float = 0.8  # P(an event's item comes from the cluster's preferred categories)
    popularity_exponent: float = 1.1  # item popularity power law (within category and globally)
    user_activity_exponent: float = 0.5  # mild skew of events per user; 0 = uniform
    days: int = 30
    start_date: datetime.date = datetime.date(2026, 1, 1)
    seed: int = 0

    def __post_init__(self) -> None:
        _require_int("n_users", self.n_users, 1)
        # Every category needs at least one item, or a taste draw could land in an empty one.
        _require_int("n_categories", self.n_categories, 1)
        _require_int("n_items", self.n_items, self.n_categories, low_label="n_categories")
        _require_int("n_events", self.n_events, 1)
        _require_int("n_clusters", self.n_clusters, 1, _MAX_PREFERRED_ENTRIES)
        _require_int("categories_per_cluster", self.categories_per_cluster, 1)
        if self.categories_per_cluster > self.n_categories:
            raise ValueError(
                "SyntheticConfig.categories_per_cluster must be <= n_categories "
                f"({self.n_categories}), got {self.categories_per_cluster!r}"
            )
        if self.n_clusters * self.categories_per_cluster > _MAX_PREFERRED_ENTRIES:
            raise ValueError(
                "SyntheticConfig.categories_per_cluster must be <= "
                f"{_MAX_PREFERRED_ENTRIES} // n_clusters ({_MAX_PREFERRED_ENTRIES // self.n_clusters}), "
                f"got {self.categories_per_cluster!r}"
            )
        _require_float("taste_strength", self.taste_strength, 0.0, 1.0)
        _require_float("popularity_exponent", self.popularity_exponent, 0.0, None)
        _require_float("user_activity_exponent", self.user_activity_exponent, 0.0, None)
        _require_int("days", self.days, 1)
        if not isinstance(self.start_date, datetime.date) or isinstance(self.start_date, datetime.datetime):
            raise ValueError(
                f"SyntheticConfig.start_date must be a datetime.date (no time part), got {self.start_date!r}"
            )
        _require_int("seed", self.seed, 0, _MAX_SEED)


@dataclass(frozen=True)
class SyntheticTables:
    """The three generated tables; lazy DataFrames matching the module's schema constants.

    ``interactions`` has ``n_events`` rows, ``users`` ``n_users`` rows, ``items`` ``n_items``
    rows. Each is recomputed on every action (cheap and deterministic); cache if reused.
    """

    interactions: DataFrame
    users: DataFrame
    items: DataFrame


def generate_synthetic(
    spark: SparkSession, config: SyntheticConfig, *, num_partitions: int | None = None
) -> SyntheticTables:
    """Build the users, items and interactions tables described by ``config``.

    ``num_partitions`` sets the partitions of each ``spark.range`` (default: Spark's default
    parallelism); it changes only how the work is split, never the rows.
    """
    if num_partitions is not None and (
        isinstance(num_partitions, bool) or not isinstance(num_partitions, int) or num_partitions < 1
    ):
        raise ValueError(f"num_partitions must be an int >= 1 or None, got {num_partitions!r}")
    return SyntheticTables(
        interactions=_generate_interactions(spark, config, num_partitions),
        users=_generate_users(spark, config, num_partitions),
        items=_generate_items(spark, config, num_partitions),
    )


def cluster_preferred_categories(config: SyntheticConfig) -> dict[int, tuple[int, ...]]:
    """Ground truth: cluster index -> its ``categories_per_cluster`` distinct category indexes.

    ``n_clusters`` entries. A deterministic function of ``(seed, cluster)`` only; string
    seeding of ``random.Random`` hashes with SHA-512, so it does not depend on
    ``PYTHONHASHSEED`` or the process.
    """
    return {
        cluster: tuple(
            random.Random(f"towerlake-synthetic:{config.seed}:{cluster}").sample(
                range(config.n_categories), config.categories_per_cluster
            )
        )
        for cluster in range(config.n_clusters)
    }


def user_cluster_column(user_index_col: Column, config: SyntheticConfig) -> Column:
    """int Column in ``[0, n_clusters)``: the taste cluster of a 0-based user index Column.

    The same formula the generator uses, so callers can recover the planted ground truth
    from ``user_id`` (``"u" + index``).
    """
    return F.pmod(
        _hash(config.seed, "user_cluster", user_index_col), F.lit(config.n_clusters).cast("long")
    ).cast("int")


# --- tables --------------------------------------------------------------------------------


def _generate_interactions(
    spark: SparkSession, config: SyntheticConfig, num_partitions: int | None
) -> DataFrame:
    seed, n_categories, cpc = config.seed, config.n_categories, config.categories_per_cluster
    event = F.col("id")
    preferred = _preferred_categories_literal(config)
    # Intermediate values get their own projection so that each is computed once per row:
    # nested Column objects would copy a whole subtree into every place that uses it, and
    # Spark keeps such projections apart rather than duplicate the expensive expressions.
    user_index = _power_law_index(
        _uniform(seed, "event_user", event), F.lit(config.n_users), config.user_activity_exponent
    )
    with_user = spark.range(0, config.n_events, 1, num_partitions).select(
        "id", user_index.alias("user_index")
    )
    with_cluster = with_user.select(
        "*",
        # 1-based start of this user's cluster's block of ``cpc`` entries in ``preferred``.
        (user_cluster_column(F.col("user_index"), config) * cpc + 1).alias("block_start"),
    )

    pick = _index_below(_uniform(seed, "event_taste_pick", event), cpc).cast("int")
    with_taste_category = with_cluster.select(
        "*", F.element_at(preferred, F.col("block_start") + pick).cast("long").alias("taste_category")
    )
    taste_category = F.col("taste_category")
    # Category k holds items k, k + C, ...: n_items // C of them, plus one for k < n_items % C.
    items_in_category = F.lit(config.n_items // n_categories).cast("long") + F.when(
        taste_category < config.n_items % n_categories, 1
    ).otherwise(0)
    with_category_size = with_taste_category.select("*", items_in_category.alias("items_in_category"))

    taste_rank = _power_law_index(
        _uniform(seed, "event_taste_rank", event), F.col("items_in_category"), config.popularity_exponent
    )
    global_item = _power_law_index(
        _uniform(seed, "event_global_item", event), F.lit(config.n_items), config.popularity_exponent
    )
    is_taste_draw = _uniform(seed, "event_is_taste", event) < config.taste_strength
    with_item = with_category_size.select(
        "*",
        F.when(is_taste_draw, taste_category + taste_rank * n_categories)
        .otherwise(global_item)
        .alias("item_index"),
    )
    item_index = F.col("item_index")

    in_taste = F.array_contains(
        F.slice(preferred, F.col("block_start"), cpc), F.pmod(item_index, F.lit(n_categories).cast("long"))
    )
    with_in_taste = with_item.select("*", in_taste.alias("in_taste"))
    rating = _rating(_uniform(seed, "event_rating", event), F.col("in_taste"))

    day = _index_below(_uniform(seed, "event_day", event), config.days)
    second_of_day = _index_below(_uniform(seed, "event_second", event), _SECONDS_PER_DAY)
    start_epoch_seconds = (config.start_date - _EPOCH).days * _SECONDS_PER_DAY
    # Built from (day, second) rather than from a timestamp so event_date is the UTC date
    # whatever the session time zone.
    event_ts = F.timestamp_seconds(F.lit(start_epoch_seconds) + day * _SECONDS_PER_DAY + second_of_day)
    event_date = F.date_add(F.lit(config.start_date), day.cast("int"))

    events = with_in_taste.select(
        _prefixed_id(USER_ID_PREFIX, F.col("user_index")).alias("user_id"),
        _prefixed_id(ITEM_ID_PREFIX, item_index).alias("item_id"),
        rating.alias("rating"),
        event_ts.alias("event_ts"),
        event_date.alias("event_date"),
    )
    return _enforce_schema(events, INTERACTIONS_SCHEMA)


def _generate_users(spark: SparkSession, config: SyntheticConfig, num_partitions: int | None) -> DataFrame:
    seed = config.seed
    user = F.col("id")
    cluster = user_cluster_column(user, config)
    regions = F.array(*[F.lit(name) for name in REGIONS])
    home_region = F.pmod(cluster, F.lit(len(REGIONS)))
    any_region = _index_below(_uniform(seed, "user_region", user), len(REGIONS))
    region_index = F.when(
        _uniform(seed, "user_region_affinity", user) < REGION_AFFINITY, home_region
    ).otherwise(any_region)
    age_low, age_high = AGE_RANGE
    users = spark.range(0, config.n_users, 1, num_partitions).select(
        _prefixed_id(USER_ID_PREFIX, user).alias("user_id"),
        (F.lit(age_low) + _index_below(_uniform(seed, "user_age", user), age_high - age_low + 1)).alias(
            "age"
        ),
        F.when(_uniform(seed, "user_gender", user) < 0.5, F.lit("F")).otherwise(F.lit("M")).alias("gender"),
        F.element_at(regions, (region_index + 1).cast("int")).alias("region"),
    )
    return _enforce_schema(users, USERS_SCHEMA)


def _generate_items(spark: SparkSession, config: SyntheticConfig, num_partitions: int | None) -> DataFrame:
    seed, n_categories = config.seed, config.n_categories
    item = F.col("id")
    category = F.pmod(item, F.lit(n_categories).cast("long"))

    # Extra genres: offsets o1 != o2 in [1, C - 1] from the primary category, so neither
    # repeats it nor each other (o2 is drawn from C - 2 values and skips over o1). o1 gets its
    # own projection because o2 and the genre list both read it.
    offset_1 = 1 + _index_below(_uniform(seed, "item_genre_1", item), max(n_categories - 1, 1))
    offset_2_raw = 1 + _index_below(_uniform(seed, "item_genre_2", item), max(n_categories - 2, 1))
    offset_2 = F.when(offset_2_raw >= F.col("offset_1"), offset_2_raw + 1).otherwise(offset_2_raw)
    n_extra = F.least(
        _index_below(_uniform(seed, "item_n_genres", item), MAX_EXTRA_GENRES + 1),
        F.lit(min(MAX_EXTRA_GENRES, n_categories - 1)).cast("long"),
    )
    candidate_genres = F.array(
        _prefixed_id(CATEGORY_PREFIX, category),
        _prefixed_id(CATEGORY_PREFIX, F.pmod(category + F.col("offset_1"), F.lit(n_categories).cast("long"))),
        _prefixed_id(CATEGORY_PREFIX, F.pmod(category + offset_2, F.lit(n_categories).cast("long"))),
    )
    genres = F.slice(candidate_genres, 1, (n_extra + 1).cast("int"))

    # The item index keeps titles unique; the words only make them look like titles.
    title = F.concat_ws(
        " ",
        _pick_word(_TITLE_ADJECTIVES, _uniform(seed, "item_title_1", item)),
        _pick_word(_TITLE_NOUNS, _uniform(seed, "item_title_2", item)),
        item.cast("string"),
    )

    year_low, year_high = RELEASE_YEAR_RANGE
    # sqrt skews release years towards recent ones, as in real catalogues.
    release_year = F.lit(year_low) + _index_below(
        F.sqrt(_uniform(seed, "item_release_year", item)), year_high - year_low + 1
    )
    price = F.round(_index_below(_uniform(seed, "item_price", item), PRICE_WHOLE_UNITS) + 0.99, 2)

    items = (
        spark.range(0, config.n_items, 1, num_partitions)
        .select("id", offset_1.alias("offset_1"))
        .select(
            _prefixed_id(ITEM_ID_PREFIX, item).alias("item_id"),
            title.alias("title"),
            _prefixed_id(CATEGORY_PREFIX, category).alias("category"),
            genres.alias("genres"),
            release_year.alias("release_year"),
            price.alias("price"),
        )
    )
    return _enforce_schema(items, ITEMS_SCHEMA)


# --- column building blocks ----------------------------------------------------------------


def _hash(seed: int, stream: str, row_id: Column) -> Column:
    """long Column: xxhash64 of (seed, stream name, row id), all with fixed types.

    The casts matter: xxhash64 hashes an int and a long of the same value differently, and
    ``F.lit`` types small Python ints as int, large ones as long.
    """
    return F.xxhash64(F.lit(seed).cast("long"), F.lit(stream), row_id.cast("long"))


def _uniform(seed: int, stream: str, row_id: Column) -> Column:
    """double Column uniform in [0, 1): the top 53 bits of the hash, exact in a double."""
    return F.shiftrightunsigned(_hash(seed, stream, row_id), 11).cast("double") * (1.0 / 2**53)


def _index_below(uniform: Column, n: int) -> Column:
    """long Column uniform in ``[0, n)`` from a uniform in [0, 1); ``n`` is a Python int >= 1."""
    return F.least(F.floor(uniform * n), F.lit(n - 1).cast("long"))


def _power_law_index(uniform: Column, n: Column, exponent: float) -> Column:
    """long Column in ``[0, n)``: ``floor(x) - 1`` with ``x`` power-law distributed on [1, n + 1).

    Inverse CDF of the density ``∝ x^-exponent``; index 0 is the most likely. ``n`` is a
    long Column (>= 1), ``exponent`` >= 0.
    """
    top = n.cast("double") + 1.0
    one_minus_a = 1.0 - exponent
    if abs(one_minus_a) < 1e-12:
        x = F.pow(top, uniform)
    else:
        x = F.pow(1.0 + uniform * (F.pow(top, one_minus_a) - 1.0), 1.0 / one_minus_a)
    # The clamp only guards float rounding at the interval ends.
    return F.least(F.greatest(F.floor(x) - 1, F.lit(0).cast("long")), n.cast("long") - 1)


def _rating(uniform: Column, in_taste: Column) -> Column:
    """double Column in {1.0, ..., 5.0}: 1 + the number of cumulative thresholds ``uniform`` passed."""
    rating = F.lit(1.0)
    cumulative_in = cumulative_out = 0.0
    for p_in, p_out in zip(RATING_PROBS_IN_TASTE[:-1], RATING_PROBS_OUT_OF_TASTE[:-1], strict=True):
        cumulative_in += p_in
        cumulative_out += p_out
        threshold = F.when(in_taste, F.lit(cumulative_in)).otherwise(F.lit(cumulative_out))
        rating = rating + (uniform >= threshold).cast("double")
    return rating


def _pick_word(words: tuple[str, ...], uniform: Column) -> Column:
    """string Column: a uniformly chosen entry of ``words``."""
    index = _index_below(uniform, len(words)) + 1
    return F.element_at(F.array(*[F.lit(word) for word in words]), index.cast("int"))


def _preferred_categories_literal(config: SyntheticConfig) -> Column:
    """array<int> literal of length ``n_clusters * categories_per_cluster``: the clusters'
    preferred categories, cluster by cluster, in ``cluster_preferred_categories`` order."""
    preferred = cluster_preferred_categories(config)
    flat = [category for cluster in range(config.n_clusters) for category in preferred[cluster]]
    # One SQL literal instead of one F.lit per entry: each F.lit is several py4j round trips.
    return F.expr(f"array({', '.join(str(category) for category in flat)})")


def _prefixed_id(prefix: str, index: Column) -> Column:
    return F.concat(F.lit(prefix), index.cast("long").cast("string"))


def _enforce_schema(df: DataFrame, schema: T.StructType) -> DataFrame:
    """Select ``schema``'s fields in order, cast to its types, and make non-nullable fields so.

    Spark types ``floor``, ``%`` and ``element_at`` as nullable although the generator's
    inputs (hashes of ``spark.range`` ids, clamped indexes) never make them null. The
    ``coalesce`` fallback only carries that proof to Spark; it is deliberately an invalid
    value (empty id, rating NaN, the epoch, no genres) so the range tests would catch it if
    it ever fired.
    """
    result = df.select(
        *[_conform(F.col(f.name), f.dataType, f.nullable).alias(f.name) for f in schema.fields]
    )
    assert result.schema == schema, f"generated schema {result.schema} != declared {schema}"
    return result


def _conform(column: Column, data_type: T.DataType, nullable: bool) -> Column:
    if isinstance(data_type, T.ArrayType):
        # Spark refuses to cast array<string> with nullable elements to non-null elements,
        # so the elements are conformed one by one.
        element_type, contains_null = data_type.elementType, data_type.containsNull
        column = F.transform(column, lambda element: _conform(element, element_type, contains_null))
    else:
        column = column.cast(data_type)
    return column if nullable else F.coalesce(column, _invalid_value(data_type))


def _invalid_value(data_type: T.DataType) -> Column:
    if isinstance(data_type, T.StringType):
        return F.lit("")
    if isinstance(data_type, T.IntegerType):
        return F.lit(-1)
    if isinstance(data_type, T.DoubleType):
        return F.lit(float("nan"))
    if isinstance(data_type, T.TimestampType):
        return F.timestamp_seconds(F.lit(0))
    if isinstance(data_type, T.DateType):
        return F.lit(_EPOCH)
    if isinstance(data_type, T.ArrayType):
        return F.array().cast(data_type)
    raise AssertionError(f"no invalid value defined for {data_type}")


# --- validation ----------------------------------------------------------------------------


def _require_int(
    name: str, value: object, low: int, high: int | None = None, *, low_label: str | None = None
) -> None:
    bound = f"{low_label} ({low})" if low_label else str(low)
    allowed = f">= {bound}" if high is None else f"in [{bound}, {high}]"
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"SyntheticConfig.{name} must be an int {allowed}, got {value!r}")
    if value < low or (high is not None and value > high):
        raise ValueError(f"SyntheticConfig.{name} must be {allowed}, got {value!r}")


def _require_float(name: str, value: object, low: float, high: float | None) -> None:
    allowed = f">= {low}" if high is None else f"in [{low}, {high}]"
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"SyntheticConfig.{name} must be a finite number {allowed}, got {value!r}")
    if value < low or (high is not None and value > high):
        raise ValueError(f"SyntheticConfig.{name} must be {allowed}, got {value!r}")
