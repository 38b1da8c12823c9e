"""Offline negative sampling for pointwise (BCE) two-tower training, entirely inside Spark.

For every positive pair ``(pair_id, user_idx, item_idx)`` and every :class:`NegativeSpec`
``kind:count`` this module emits up to ``count`` negatives of that kind:

* ``random``: uniform over the catalog (``items``);
* ``popularity``: ``P(item) ∝ popularity ** 0.75`` (word2vec smoothing); items with popularity
  0 are never drawn;
* ``hard``: uniform over the items of the user's preferred categories: the user's
  ``hard_top_categories`` categories with most rows in ``user_items`` (ties by
  ``category_idx`` ascending, category 0 = unknown excluded). Each draw picks one of those
  categories uniformly, then one of its items uniformly. When ``ranked`` gives the user a
  list of release-ranked items (the items a published release ranks 20-100 for them, see
  ``index_builder.release_negatives``), a hard draw takes one of those instead with
  probability ``ranked_share`` (always, for a user without preferred categories). Users
  with neither get no hard negatives.

Invariant: a negative is never in ``user_items`` for its user, never the pair's own positive
item, and never repeated within one ``(pair_id, neg_kind)``. Candidates are drawn in rounds
("attempts") of ``count * oversample`` draws; the emitted negatives are the first ``count``
eligible distinct candidates in ``(attempt, draw)`` order, so ``neg_rank`` is that order.
A pair whose user has too few eligible items gets fewer rows, never a positive.

How it scales (no per-row Python, no collect of anything that grows with users or events):

* every draw is an equi-join against a catalog-sized table that is broadcast (a draw from
  the user's ranked list needs none: the list rides on the request row): a uniform
  draw is ``position = floor(u * n_items)`` joined to items numbered ``0..n-1`` by
  ``item_idx``; a hard draw is ``(category_idx, floor(u * n_in_category))`` joined to items
  numbered within their category; a popularity draw uses a *guide table* (Chen & Asau's
  indexed inverse-CDF search): the CDF scaled to ``[0, B)`` for ``B`` weighted items is cut
  into ``B`` unit buckets, each item is listed under every bucket its CDF interval touches
  (at most ``2B`` rows), and a draw ``y = u * B`` joins on ``floor(y)`` and keeps the one
  item whose interval holds ``y`` (about 2 rows per draw before that filter);
* the positive check is one join of the candidates with ``user_items`` on
  ``(user_idx, item_idx)``, and the selection is a few windows over ``(pair_id, neg_kind)``
  after one shuffle;
* attempt 0 runs for every pair; only the pairs it left short run attempts
  ``1..max_attempts-1`` (all at once, excluding what attempt 0 already took). The short
  pairs' plan reads attempt 0's shuffles again (Spark reuses identical exchanges in one
  query), so attempt 0 is not recomputed.

Determinism: every uniform comes from ``xxhash64(seed, stream, pair_id, attempt, draw)``
(``F.rand`` is never used) and every window has a total order, so the same inputs and seed
give the same rows whatever the partitioning of the inputs or of the shuffles.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Literal, get_args

from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F
from pyspark.sql import types as T

NegativeKind = Literal["random", "popularity", "hard"]
NEGATIVE_KINDS: tuple[str, ...] = get_args(NegativeKind)

# word2vec's unigram ** 0.75: flattens the head so popular items do not crowd out the rest.
POPULARITY_EXPONENT = 0.75
# Draws per attempt are count * oversample; 2 leaves room for collisions with the user's
# positives and for repeats, so almost every pair is filled by attempt 0.
DEFAULT_OVERSAMPLE = 2

NEGATIVES_SCHEMA = T.StructType(
    [
        T.StructField("pair_id", T.LongType(), nullable=False),
        T.StructField("user_idx", T.IntegerType(), nullable=False),
        T.StructField("item_idx", T.IntegerType(), nullable=False),
        T.StructField("neg_kind", T.StringType(), nullable=False),
        T.StructField("neg_rank", T.IntegerType(), nullable=False),  # 0..count-1 within (pair_id, neg_kind)
    ]
)

_MAX_SEED = 2**63 - 1
_COUNT_PATTERN = re.compile(r"[0-9]+")
_ALLOWED_KINDS_TEXT = ", ".join(NEGATIVE_KINDS)

_POSITIVES_COLUMNS = {"pair_id": T.LongType(), "user_idx": T.IntegerType(), "item_idx": T.IntegerType()}
_USER_ITEMS_COLUMNS = {"user_idx": T.IntegerType(), "item_idx": T.IntegerType()}
_ITEMS_COLUMNS = {"item_idx": T.IntegerType(), "category_idx": T.IntegerType(), "popularity": T.LongType()}

# One row per (pair, kind) still to fill: what it needs in total, what earlier attempts took.
_REQUEST_COLUMNS = ("pair_id", "user_idx", "positive_item", "neg_kind", "need", "taken", "offset")
_CANDIDATE_COLUMNS = (*_REQUEST_COLUMNS, "draw_key", "item_idx")
_CATEGORIES_TYPE = "array<struct<category_rank:int,category_idx:int,n_items:bigint>>"
_RANKED_COLUMNS = {"user_idx": T.IntegerType(), "items": T.ArrayType(T.IntegerType())}
DEFAULT_RANKED_SHARE = 0.5


@dataclass(frozen=True)
class NegativeSpec:
    """``count`` (>= 1) negatives of ``kind`` per positive pair."""

    kind: NegativeKind
    count: int

    def __post_init__(self) -> None:
        if self.kind not in NEGATIVE_KINDS:
            raise ValueError(f"NegativeSpec.kind must be one of {_ALLOWED_KINDS_TEXT}, got {self.kind!r}")
        if isinstance(self.count, bool) or not isinstance(self.count, int) or self.count < 1:
            raise ValueError(f"NegativeSpec.count must be an int >= 1, got {self.count!r}")


def parse_negative_specs(text: str) -> tuple[NegativeSpec, ...]:
    """Parse ``"random:4,popularity:2,hard:2"`` into specs, in the order given.

    ``""`` and ``"none"`` mean no negatives. Whitespace around names, counts and commas is
    ignored; kinds are lower case; each kind may appear once.
    """
    if not isinstance(text, str):
        raise ValueError(f"negative specs must be a string like 'random:4,hard:2', got {text!r}")
    stripped = text.strip()
    if stripped in ("", "none"):
        return ()
    specs: list[NegativeSpec] = []
    for raw_part in stripped.split(","):
        part = raw_part.strip()
        kind, colon, count_text = (piece.strip() for piece in part.partition(":"))
        if not colon or not kind or not count_text:
            raise ValueError(
                f"negative spec {part!r} in {text!r} must be KIND:COUNT (e.g. 'random:4') "
                f"with KIND one of {_ALLOWED_KINDS_TEXT}"
            )
        if kind not in NEGATIVE_KINDS:
            raise ValueError(f"unknown negative kind {kind!r} in {part!r}; allowed: {_ALLOWED_KINDS_TEXT}")
        if not _COUNT_PATTERN.fullmatch(count_text) or int(count_text) < 1:
            raise ValueError(f"negative count in {part!r} must be an integer >= 1, got {count_text!r}")
        if any(spec.kind == kind for spec in specs):
            raise ValueError(
                f"negative kind {kind!r} is given more than once in {text!r}; give each kind once"
            )
        specs.append(NegativeSpec(kind=kind, count=int(count_text)))  # type: ignore[arg-type]
    return tuple(specs)


def sample_negatives(
    positives: DataFrame,
    user_items: DataFrame,
    items: DataFrame,
    specs: Sequence[NegativeSpec],
    seed: int = 0,
    hard_top_categories: int = 2,
    max_attempts: int = 4,
    oversample: int = DEFAULT_OVERSAMPLE,
    ranked: DataFrame | None = None,
    ranked_share: float = DEFAULT_RANKED_SHARE,
) -> DataFrame:
    """Negatives for each positive pair, one row per negative, as :data:`NEGATIVES_SCHEMA`.

    ``positives``: ``pair_id`` long (unique), ``user_idx`` int, ``item_idx`` int.
    ``user_items``: ``user_idx`` int, ``item_idx`` int: every item each user interacted with
    positively in the training window; duplicates allowed. It decides what may never be a
    negative, and its rows (duplicates included: each row is one positive) rank the user's
    categories for ``hard``.
    ``items``: ``item_idx`` int (>= 1, unique), ``category_idx`` int (0 = unknown),
    ``popularity`` long (training positives, >= 0).
    ``ranked`` (optional, used by ``hard``): ``user_idx`` int (unique), ``items`` array<int>:
    the user's release-ranked candidates; ``ranked_share`` in [0, 1] is the probability that
    a hard draw of a user who has both a ranked list and preferred categories uses the list.

    Per pair and spec at most ``spec.count`` rows with ``neg_rank`` ``0..`` in draw order;
    fewer only when ``max_attempts`` rounds of ``spec.count * oversample`` draws found fewer
    eligible distinct items. Lazy: nothing runs until an action; cache or write the result
    if it is used more than once. The catalog-sized lookup tables are broadcast.
    """
    specs = _validate_specs(specs)
    _require_int("seed", seed, 0, _MAX_SEED)
    _require_int("hard_top_categories", hard_top_categories, 1)
    _require_int("max_attempts", max_attempts, 1)
    _require_int("oversample", oversample, 1)
    positives = _conform_input("positives", positives, _POSITIVES_COLUMNS)
    user_items = _conform_input("user_items", user_items, _USER_ITEMS_COLUMNS)
    items = _conform_input("items", items, _ITEMS_COLUMNS)
    if ranked is not None:
        ranked = _conform_input("ranked", ranked, _RANKED_COLUMNS)
    if isinstance(ranked_share, bool) or not isinstance(ranked_share, int | float) or not 0 <= ranked_share <= 1:
        raise ValueError(f"sample_negatives ranked_share must be a number in [0, 1], got {ranked_share!r}")
    if not specs:
        return _as_negatives(positives.limit(0).select(*_empty_negative_columns()))

    catalog = _build_catalog(items, user_items, hard_top_categories)
    with_hard = any(spec.kind == "hard" for spec in specs)
    draws = _DrawPlan(seed=seed, oversample=oversample, catalog=catalog, with_hard=with_hard,
                      ranked=ranked if with_hard else None, ranked_share=float(ranked_share))
    # distinct: the flag join below must not multiply candidates by duplicate rows.
    positive_flags = user_items.distinct().withColumn("is_positive", F.lit(True))

    # One request per (pair, kind): the user's categories are joined per pair, before the
    # kinds multiply the rows.
    kinds = F.array(
        *[F.struct(F.lit(spec.kind).alias("neg_kind"), F.lit(spec.count).alias("need")) for spec in specs]
    )
    first_requests = draws.with_user_categories(positives).select(
        "pair_id",
        "user_idx",
        F.col("item_idx").alias("positive_item"),
        F.inline(kinds),
        F.array().cast("array<int>").alias("taken"),
        F.lit(0).cast("long").alias("offset"),
        "categories",
        "ranked",
    )
    first_round = _select_round(draws.candidates(first_requests, 0, 1), positive_flags)
    negatives = _chosen_rows(first_round)
    if max_attempts > 1:
        got = F.col("offset") + F.size("chosen")
        short = first_round.where(got < F.col("need")).select(
            "pair_id", "user_idx", "positive_item", "neg_kind", "need",
            F.concat("taken", "chosen").alias("taken"), got.alias("offset"),
        )  # fmt: skip
        retry_requests = draws.with_user_categories(short)
        retry_round = _select_round(draws.candidates(retry_requests, 1, max_attempts), positive_flags)
        negatives = negatives.union(_chosen_rows(retry_round))
    return _as_negatives(negatives)


def negative_counts(negatives: DataFrame) -> dict[str, int]:
    """Rows per ``neg_kind`` of a :func:`sample_negatives` result (kinds with no rows absent).

    One row per kind reaches the driver; ordered as :data:`NEGATIVE_KINDS`, then any others.
    """
    rows = negatives.groupBy("neg_kind").count().collect()
    counts = {row["neg_kind"]: int(row["count"]) for row in rows}
    order = {kind: index for index, kind in enumerate(NEGATIVE_KINDS)}
    return dict(sorted(counts.items(), key=lambda entry: (order.get(entry[0], len(order)), entry[0])))


# --- catalog lookup tables -----------------------------------------------------------------

# Lookup spaces: which numbering a draw's slot refers to.
_SPACE_CATALOG = 0  # slot = position of the item among all items by item_idx (group 0)
_SPACE_POPULARITY = 1  # slot = guide-table bucket (group 0)
_SPACE_CATEGORY = 2  # slot = position of the item within its category (group = category_idx)


@dataclass(frozen=True)
class _Catalog:
    """Tables derived from ``items`` (and, for ``user_categories``, ``user_items``).

    ``sizes``: at most one row: ``n_items``, ``n_weighted`` (items with popularity > 0);
    none for an empty catalog, which then yields no negatives.
    ``lookup``: catalog-sized (at most ``n_items + 2 * n_weighted + n_items`` rows), broadcast:
    ``(lookup_space, lookup_group, lookup_slot)`` -> ``item_idx``, plus for the popularity
    space the item's CDF interval ``[cdf_low, cdf_high)`` in bucket units (null elsewhere).
    ``user_categories``: users-sized: ``user_idx`` -> ``categories``
    array<struct<category_rank, category_idx, n_items>> sorted by rank, only users with at
    least one preferred category.
    """

    sizes: DataFrame
    lookup: DataFrame
    user_categories: DataFrame


def _build_catalog(items: DataFrame, user_items: DataFrame, hard_top_categories: int) -> _Catalog:
    numbered = _number_items(items)
    sizes = numbered.select("n_items", "n_weighted").limit(1)

    null_double = F.lit(None).cast("double")
    by_position = numbered.select(
        F.lit(_SPACE_CATALOG).alias("lookup_space"),
        F.lit(0).alias("lookup_group"),
        F.col("position").alias("lookup_slot"),
        "item_idx",
        null_double.alias("cdf_low"),
        null_double.alias("cdf_high"),
    )
    last_bucket = F.col("n_weighted") - 1
    by_bucket = numbered.where(F.col("popularity") > 0).select(
        F.lit(_SPACE_POPULARITY).alias("lookup_space"),
        F.lit(0).alias("lookup_group"),
        F.explode(
            F.sequence(F.least(F.floor("cdf_low"), last_bucket), F.least(F.floor("cdf_high"), last_bucket))
        ).alias("lookup_slot"),
        "item_idx",
        "cdf_low",
        # Rounding can put a draw at n_weighted itself; the last interval takes it.
        F.when(F.col("is_last_weighted"), F.lit(float("inf"))).otherwise(F.col("cdf_high")).alias("cdf_high"),
    )
    by_category = numbered.where(F.col("category_idx") != 0).select(
        F.lit(_SPACE_CATEGORY).alias("lookup_space"),
        F.col("category_idx").alias("lookup_group"),
        F.col("category_position").alias("lookup_slot"),
        "item_idx",
        null_double.alias("cdf_low"),
        null_double.alias("cdf_high"),
    )
    lookup = by_position.union(by_bucket).union(by_category)

    item_categories = numbered.where(F.col("category_idx") != 0).select(
        "item_idx", "category_idx", F.col("category_size").alias("n_items")
    )
    category_order = Window.partitionBy("user_idx").orderBy(F.desc("n_positives"), F.asc("category_idx"))
    user_categories = (
        user_items.join(F.broadcast(item_categories), "item_idx")
        # One shuffle by user serves the count, the ranking window and the collect below.
        .repartition("user_idx")
        .groupBy("user_idx", "category_idx", "n_items")
        .agg(F.count(F.lit(1)).alias("n_positives"))
        .select("*", F.row_number().over(category_order).alias("category_rank"))
        .where(F.col("category_rank") <= hard_top_categories)
        .groupBy("user_idx")
        # collect_list order depends on the shuffle; sorting by rank makes the array exact.
        .agg(
            F.array_sort(F.collect_list(F.struct("category_rank", "category_idx", "n_items"))).alias(
                "categories"
            )
        )
    )
    return _Catalog(sizes=sizes, lookup=lookup, user_categories=user_categories)


def _number_items(items: DataFrame) -> DataFrame:
    """``items`` with the numbering and popularity CDF every lookup is built from.

    Adds ``position`` (0-based by item_idx), ``n_items``, ``category_position`` (0-based by
    item_idx within the category), ``category_size``, ``n_weighted``, and for the popularity
    guide table (Chen & Asau's indexed search) the interval ``[cdf_low, cdf_high)`` of the
    CDF of ``popularity ** 0.75`` scaled to ``[0, n_weighted)``; zero-width for popularity 0.
    ``cdf_low`` is exactly the previous item's ``cdf_high`` (``lag``, not a second sum), so
    the intervals tile without float gaps, and ``floor`` of this monotone map is monotone, so
    the item owning a draw ``y`` is listed under bucket ``floor(y)``.

    A window without partitions moves the catalog to one task: fine for one row per item, and
    it makes the numbering and the running sums a fixed sequential order, hence deterministic.
    The per-category window reuses that single partition (no second shuffle).
    """
    by_item = Window.orderBy("item_idx")
    running = by_item.rowsBetween(Window.unboundedPreceding, Window.currentRow)
    whole = by_item.rowsBetween(Window.unboundedPreceding, Window.unboundedFollowing)
    in_category = Window.partitionBy("category_idx").orderBy("item_idx")
    is_weighted = F.col("popularity") > 0
    weight = F.when(is_weighted, F.pow(F.col("popularity").cast("double"), POPULARITY_EXPONENT)).otherwise(
        0.0
    )
    n_weighted = F.count(F.when(is_weighted, 1)).over(whole)
    with_cdf = items.select(
        "*",
        (F.row_number().over(by_item) - 1).cast("long").alias("position"),
        F.count(F.lit(1)).over(whole).alias("n_items"),
        n_weighted.alias("n_weighted"),
        (F.sum(weight).over(running) / F.sum(weight).over(whole) * n_weighted).alias("cdf_high"),
        (is_weighted & (F.count(F.when(is_weighted, 1)).over(running) == n_weighted)).alias(
            "is_last_weighted"
        ),
    )
    return with_cdf.select(
        "*",
        F.lag("cdf_high", 1, 0.0).over(by_item).alias("cdf_low"),
        (F.row_number().over(in_category) - 1).cast("long").alias("category_position"),
        F.count(F.lit(1)).over(Window.partitionBy("category_idx")).alias("category_size"),
    )


# --- drawing candidates --------------------------------------------------------------------


@dataclass(frozen=True)
class _DrawPlan:
    seed: int
    oversample: int
    catalog: _Catalog
    with_hard: bool
    ranked: DataFrame | None = None
    ranked_share: float = DEFAULT_RANKED_SHARE

    def with_user_categories(self, rows: DataFrame) -> DataFrame:
        """``rows`` plus ``categories`` (empty for users without a preferred category) and
        ``ranked`` (the user's release-ranked items; empty without).

        Never null: Spark 4.0.5 compiled ``element_at`` over the left join's null arrays
        without a null check (an NPE inside an inferred filter), so the gap is an empty array.
        """
        no_categories = F.array().cast(_CATEGORIES_TYPE)
        no_ranked = F.array().cast("array<int>")
        if not self.with_hard:
            return rows.select("*", no_categories.alias("categories"), no_ranked.alias("ranked"))
        joined = rows.join(self.catalog.user_categories, "user_idx", "left")
        ranked = no_ranked
        if self.ranked is not None:
            joined = joined.join(self.ranked.withColumnRenamed("items", "ranked"), "user_idx", "left")
            ranked = F.coalesce("ranked", no_ranked)
        return joined.select(*rows.columns, F.coalesce("categories", no_categories).alias("categories"),
                             ranked.alias("ranked"))

    def candidates(self, requests: DataFrame, first_attempt: int, end_attempt: int) -> DataFrame:
        """Candidates (``_CANDIDATE_COLUMNS``) of attempts ``[first_attempt, end_attempt)``.

        ``requests`` has ``_REQUEST_COLUMNS``, ``categories`` and ``ranked``. Every kind turns a
        draw into a lookup key, so all kinds share one explode and one broadcast join; a draw
        from the ranked list already holds its item (``direct_item``) and matches no lookup row
        (the join is a left join; a draw left with no item is dropped). ``draw_key =
        attempt * draws_per_attempt + draw`` orders a (pair, kind)'s draws.
        """
        per_attempt = self._per_attempt
        exploded = requests.crossJoin(F.broadcast(self.catalog.sizes)).select(
            *_REQUEST_COLUMNS,
            "categories",
            "ranked",
            "n_items",
            "n_weighted",
            F.explode(F.sequence(per_attempt * first_attempt, per_attempt * end_attempt - 1)).alias(
                "draw_key"
            ),
        )
        keyed = exploded.select(*_REQUEST_COLUMNS, "draw_key", *self._lookup_key)
        point = F.col("cdf_point")
        return (
            keyed.join(F.broadcast(self.catalog.lookup), ["lookup_space", "lookup_group", "lookup_slot"], "left")
            .where(point.isNull() | ((F.col("cdf_low") <= point) & (point < F.col("cdf_high"))))
            .withColumn("item_idx", F.coalesce("direct_item", "item_idx"))
            .where(F.col("item_idx").isNotNull())
            .select(*_CANDIDATE_COLUMNS)
        )

    def _uniform(self, stream: str, per_attempt: Column) -> Column:
        """double Column uniform in [0, 1): the top 53 bits of xxhash64(seed, stream, pair, attempt, draw).

        All ids are cast to long: xxhash64 hashes an int and a long of one value differently.
        """
        draw_key = F.col("draw_key").cast("long")
        hashed = F.xxhash64(
            F.lit(self.seed).cast("long"),
            F.lit(stream),
            F.col("pair_id").cast("long"),
            F.floor(draw_key / per_attempt).cast("long"),
            F.pmod(draw_key, per_attempt).cast("long"),
        )
        return F.shiftrightunsigned(hashed, 11).cast("double") * (1.0 / 2**53)

    @cached_property
    def _per_attempt(self) -> Column:
        """long Column: draws per attempt of a request, ``need * oversample``."""
        return F.col("need").cast("long") * self.oversample

    @cached_property
    def _lookup_key(self) -> list[Column]:
        """``lookup_space``, ``lookup_group``, ``lookup_slot``, ``cdf_point`` of one draw row.

        random: a position among all items; popularity: a point of the scaled CDF and its
        bucket; hard: either (probability ``ranked_share``, or always without categories) an
        item of the user's ranked list as ``direct_item`` with a null key, or one of the user's
        categories, then a position within it (null, so no candidate, for a user with neither).
        """
        per_attempt = self._per_attempt
        kind = F.col("neg_kind")
        n_items, n_weighted = F.col("n_items"), F.col("n_weighted")
        position = F.least(F.floor(self._uniform("negatives:random", per_attempt) * n_items), n_items - 1)
        point = self._uniform("negatives:popularity", per_attempt) * n_weighted
        bucket = F.least(F.floor(point), n_weighted - 1)

        n_categories = F.size("categories")
        slot = F.least(
            F.floor(self._uniform("negatives:hard_category", per_attempt) * n_categories), n_categories - 1
        )
        # get is 0-based and null out of bounds (slot -1 for no categories): no candidate.
        category = F.get("categories", slot.cast("int"))
        n_in_category = category["n_items"]
        in_category = F.least(
            F.floor(self._uniform("negatives:hard_item", per_attempt) * n_in_category), n_in_category - 1
        )

        n_ranked = F.size("ranked")
        use_ranked = (kind == "hard") & (n_ranked > 0) & (
            (n_categories == 0) | (self._uniform("negatives:hard_source", per_attempt) < F.lit(self.ranked_share)))
        ranked_slot = F.least(
            F.floor(self._uniform("negatives:hard_ranked", per_attempt) * n_ranked), n_ranked - 1
        )

        is_random, is_popularity = kind == "random", kind == "popularity"
        return [
            F.when(use_ranked, F.lit(None))
            .when(is_random, _SPACE_CATALOG)
            .when(is_popularity, _SPACE_POPULARITY)
            .otherwise(_SPACE_CATEGORY)
            .alias("lookup_space"),
            F.when(is_random | is_popularity, 0)
            .otherwise(category["category_idx"])
            .cast("int")
            .alias("lookup_group"),
            F.when(is_random, position)
            .when(is_popularity, bucket)
            .otherwise(in_category)
            .cast("long")
            .alias("lookup_slot"),
            F.when(is_popularity, point).alias("cdf_point"),
            F.when(use_ranked, F.get("ranked", ranked_slot.cast("int"))).cast("int").alias("direct_item"),
        ]


# --- selecting negatives -------------------------------------------------------------------


def _select_round(candidates: DataFrame, positive_flags: DataFrame) -> DataFrame:
    """One row per (pair, kind) that drew candidates: the request columns plus ``chosen``.

    ``chosen`` (array<int>, at most ``need - offset`` items) holds the first eligible distinct
    items in ``draw_key`` order; eligible means not a positive of the user, not the pair's own
    item and not taken by an earlier attempt. A pair whose every draw missed still gets a row
    with an empty ``chosen`` (the flag join is a left join), so it is seen as short.
    """
    eligible = (
        F.col("is_positive").isNull()
        & (F.col("item_idx") != F.col("positive_item"))
        & ~F.array_contains("taken", F.col("item_idx"))
    )
    flagged = candidates.join(positive_flags, ["user_idx", "item_idx"], "left").select(
        *_REQUEST_COLUMNS,
        # An ineligible draw keeps its row (so the pair is still seen) but no item.
        F.struct("draw_key", F.when(eligible, F.col("item_idx")).alias("item_idx")).alias("draw"),
    )
    # collect_list order depends on the shuffle; sorting by draw_key (unique within the group)
    # makes it exact. Only built-in array functions, no lambdas: sort_array orders structs by
    # their first field natively (array_sort would compare through an interpreted lambda),
    # draws.item_idx extracts the field from every element, array_compact drops the
    # ineligible nulls and array_distinct keeps first occurrences in order.
    in_draw_order = F.sort_array(F.collect_list("draw"))
    eligible_items = F.array_compact(F.col("draws.item_idx"))
    return (
        flagged.groupBy(*_REQUEST_COLUMNS)
        .agg(in_draw_order.alias("draws"))
        .select(
            *_REQUEST_COLUMNS,
            F.slice(F.array_distinct(eligible_items), 1, (F.col("need") - F.col("offset")).cast("int")).alias(
                "chosen"
            ),
        )
    )


def _chosen_rows(round_rows: DataFrame) -> DataFrame:
    """One row per chosen negative, ``neg_rank`` continuing after the earlier attempts'."""
    return round_rows.select(
        "pair_id", "user_idx", "neg_kind", "offset", F.posexplode("chosen").alias("pos", "item_idx")
    ).select(
        "pair_id", "user_idx", "item_idx", "neg_kind", (F.col("offset") + F.col("pos")).alias("neg_rank")
    )


# --- validation and schema -----------------------------------------------------------------


def _validate_specs(specs: Sequence[NegativeSpec]) -> tuple[NegativeSpec, ...]:
    if isinstance(specs, str) or not isinstance(specs, Sequence):
        raise ValueError(
            f"specs must be a sequence of NegativeSpec (see parse_negative_specs), got {specs!r}"
        )
    seen: set[str] = set()
    for spec in specs:
        if not isinstance(spec, NegativeSpec):
            raise ValueError(f"specs must contain NegativeSpec objects, got {spec!r}")
        if spec.kind in seen:
            raise ValueError(f"specs give negative kind {spec.kind!r} more than once; give each kind once")
        seen.add(spec.kind)
    return tuple(specs)


def _require_int(name: str, value: object, low: int, high: int | None = None) -> None:
    allowed = f">= {low}" if high is None else f"in [{low}, {high}]"
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or value < low
        or (high is not None and value > high)
    ):
        raise ValueError(f"sample_negatives {name} must be an int {allowed}, got {value!r}")


def _conform_input(name: str, df: DataFrame, columns: dict[str, T.DataType]) -> DataFrame:
    """Select and cast the columns this module reads. Nulls are not dropped silently: one
    that reaches the output fails the job (see ``_as_negatives``)."""
    missing = [column for column in columns if column not in df.columns]
    if missing:
        raise ValueError(f"{name} is missing column(s) {missing}; it has {df.columns}")
    return df.select(*[F.col(column).cast(data_type).alias(column) for column, data_type in columns.items()])


def _empty_negative_columns() -> list[Column]:
    return [
        F.col("pair_id"),
        F.col("user_idx"),
        F.col("item_idx"),
        F.lit("").alias("neg_kind"),
        F.lit(0).alias("neg_rank"),
    ]


def _as_negatives(df: DataFrame) -> DataFrame:
    """Columns of NEGATIVES_SCHEMA in order, typed non-nullable.

    Every output column is built from non-null inputs, but Spark types joins and window sums
    as nullable. ``coalesce(column, raise_error(...), literal)`` carries the proof: a null
    (only possible from a null id in the inputs) fails the job with a message instead of
    passing through, and the trailing literal, never reached, makes Spark type it non-null.
    """
    result = df.select(
        *[
            F.coalesce(
                F.col(field.name).cast(field.dataType),
                F.raise_error(
                    F.lit(
                        f"sample_negatives produced a null {field.name}: positives, user_items and "
                        "items must have no null ids"
                    )
                ).cast(field.dataType),
                F.lit("" if isinstance(field.dataType, T.StringType) else -1).cast(field.dataType),
            ).alias(field.name)
            for field in NEGATIVES_SCHEMA.fields
        ]
    )
    assert result.schema == NEGATIVES_SCHEMA, f"negatives schema {result.schema} != {NEGATIVES_SCHEMA}"
    return result
