"""Offline negative sampling for pointwise (BCE) two-tower training: Spark moves the rows,
numpy draws them.

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

* the catalog (one row per item: a few arrays of numbers) is read to the driver once and
  shipped with the function: the item numbering, the CDF of ``popularity ** 0.75`` and the
  items of every category, sorted;
* the pairs, the ``user_items`` rows and the ranked lists are unioned and grouped by a
  hash bucket of the user (``groupBy(bucket).applyInArrow``: one shuffle, every row of a
  user in one group), and each group is sampled with whole-array numpy: uniform draws,
  ``searchsorted`` on the CDF for popularity, category slices for hard draws, the
  not-a-positive check by ``searchsorted`` on the group's sorted ``user << 32 | item`` keys,
  first-distinct selection by one sort; only the (pair, kind)s a round left short are
  drawn again;
* a group holds ``1 / n_buckets`` of the users (``n_buckets``: given by the caller, who knows
  how many pairs there are (see ``negative_buckets``), else 4 x the shuffle partitions)
  and is sampled in slices of at most ``_PAIRS_PER_SLICE`` pairs, so a worker's memory is
  bounded by the bucket, not by the data.

Determinism: every uniform is a counter-based hash (splitmix64) of ``(seed, stream, pair_id,
attempt, draw)`` and a user's categories depend on that user's rows only, so the same inputs
and seed give the same rows whatever the partitioning of the inputs, the shuffles or the
number of buckets.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Literal, get_args

import numpy as np
import pyarrow as pa
from pyspark.sql import Column, DataFrame
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
_RANKED_COLUMNS = {"user_idx": T.IntegerType(), "items": T.ArrayType(T.IntegerType())}
DEFAULT_RANKED_SHARE = 0.5

# Rows of the grouped input: what each row is (ROLE_*), whose, which item, and for a pair its
# id, for a ranked-list entry its position in the list.
_ROLE_PAIR, _ROLE_USER_ITEM, _ROLE_RANKED = 0, 1, 2
_GROUPED_SCHEMA = "role tinyint, user_idx int, item_idx int, pair_id bigint, position int"
_OUTPUT_DDL = "pair_id bigint, user_idx int, item_idx int, neg_kind string, neg_rank int"
# Buckets per shuffle partition: groups small enough for a worker, few enough to amortise
# the per-group Arrow round trip.
_BUCKETS_PER_PARTITION = 4
# Pairs per group that negative_buckets aims at: large enough to amortise a group's overhead,
# small enough that a group's Arrow input stays in the tens of MB.
_PAIRS_PER_BUCKET = 25_000
# Pairs sampled at once inside a group: bounds the (pairs x draws) arrays of one slice.
_PAIRS_PER_SLICE = 65_536

# One hash stream per independent uniform of a draw.
_STREAM_RANDOM, _STREAM_POPULARITY = 1, 2
_STREAM_HARD_CATEGORY, _STREAM_HARD_ITEM, _STREAM_HARD_SOURCE, _STREAM_HARD_RANKED = 3, 4, 5, 6


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
    n_buckets: int | None = None,
    *,
    layout: Literal["rows", "lists"] = "rows",
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
    eligible distinct items. Reads the catalog (``items``, one row per item) to the driver
    now; everything else is lazy: nothing runs until an action, so cache or write the result
    if it is used more than once. ``n_buckets`` (default 4 x the shuffle partitions; see
    :func:`negative_buckets`) sets how many groups the users are sampled in; it never changes
    the rows. ``layout="lists"``: the same negatives one row per pair that got any, as
    :data:`NEGATIVE_LISTS_SCHEMA` (see :func:`sample_negative_lists`).
    """
    if layout not in ("rows", "lists"):
        raise ValueError(f"sample_negatives layout must be 'rows' or 'lists', got {layout!r}")
    specs = _validate_specs(specs)
    _require_int("seed", seed, 0, _MAX_SEED)
    _require_int("hard_top_categories", hard_top_categories, 1)
    _require_int("max_attempts", max_attempts, 1)
    _require_int("oversample", oversample, 1)
    if n_buckets is not None:
        _require_int("n_buckets", n_buckets, 1)
    positives = _conform_input("positives", positives, _POSITIVES_COLUMNS)
    user_items = _conform_input("user_items", user_items, _USER_ITEMS_COLUMNS)
    items = _conform_input("items", items, _ITEMS_COLUMNS)
    if ranked is not None:
        ranked = _conform_input("ranked", ranked, _RANKED_COLUMNS)
    if isinstance(ranked_share, bool) or not isinstance(ranked_share, int | float) or not 0 <= ranked_share <= 1:
        raise ValueError(f"sample_negatives ranked_share must be a number in [0, 1], got {ranked_share!r}")
    if not specs:
        return _no_negatives(positives, layout)

    catalog = _Catalog.from_arrow(items.toArrow())
    with_hard = any(spec.kind == "hard" for spec in specs)
    if catalog.n_items == 0:
        return _no_negatives(positives, layout)
    plan = _SamplePlan(
        specs=tuple((spec.kind, spec.count) for spec in specs), seed=seed, hard_top_categories=hard_top_categories,
        max_attempts=max_attempts, oversample=oversample, ranked_share=float(ranked_share), catalog=catalog,
    )
    no_position = F.lit(0).cast("int").alias("position")
    rows = positives.select(F.lit(_ROLE_PAIR).cast("tinyint").alias("role"), "user_idx", "item_idx", "pair_id",
                            no_position)
    rows = rows.unionByName(user_items.select(
        F.lit(_ROLE_USER_ITEM).cast("tinyint").alias("role"), "user_idx", "item_idx",
        F.lit(0).cast("long").alias("pair_id"), no_position))
    if ranked is not None and with_hard:
        rows = rows.unionByName(ranked.select(
            F.lit(_ROLE_RANKED).cast("tinyint").alias("role"), "user_idx", F.posexplode("items")).select(
            "role", "user_idx", F.col("col").alias("item_idx"), F.lit(0).cast("long").alias("pair_id"),
            F.col("pos").cast("int").alias("position")).where(F.col("item_idx").isNotNull()))
    session = positives.sparkSession
    if n_buckets is None:
        n_buckets = _BUCKETS_PER_PARTITION * int(session.conf.get("spark.sql.shuffle.partitions"))
    bucket = F.pmod(F.xxhash64(F.col("user_idx").cast("long")), F.lit(n_buckets)).alias("_tl_bucket")
    grouped = rows.select(bucket, *[F.col(name) for name in ("role", "user_idx", "item_idx", "pair_id", "position")]
                          ).groupBy("_tl_bucket")
    if layout == "rows":
        return _as_negatives(grouped.applyInArrow(partial(_sample_group, plan), _OUTPUT_DDL))
    return _as_negative_lists(grouped.applyInArrow(partial(_sample_group_lists, plan), _LISTS_DDL))


def sample_negative_lists(*args, **kwargs) -> DataFrame:
    """:func:`sample_negatives` (same arguments, same draws) with ``layout="lists"``: one row
    per pair that got any negative, ``pair_id``, ``neg_item_idx`` array<int>, ``neg_kind``
    array<string>, ordered by kind name, then ``neg_rank`` (the pairs tables' layout). Built
    inside the sampling function, so the training build needs no shuffle and sort of one row
    per negative to regroup them."""
    return sample_negatives(*args, layout="lists", **kwargs)


def _no_negatives(positives: DataFrame, layout: str) -> DataFrame:
    if layout == "rows":
        return _as_negatives(positives.limit(0).select(*_empty_negative_columns()))
    return _as_negative_lists(positives.limit(0).select(
        "pair_id", F.array().cast("array<int>").alias("neg_item_idx"), F.array().cast("array<string>").alias("neg_kind")))


def negative_buckets(spark_parallelism: int, shuffle_partitions: int, pairs: int) -> int:
    """Buckets (``applyInArrow`` groups) for ``pairs`` positive pairs: about
    ``_PAIRS_PER_BUCKET`` pairs each, at least two per core so both cores work, at most 4 per
    shuffle partition. Every group costs a Python call and an Arrow round trip, so a small
    input in hundreds of tiny groups spends its time on overhead, not on sampling."""
    wanted = math.ceil(max(pairs, 0) / _PAIRS_PER_BUCKET)
    return max(2 * max(spark_parallelism, 1), min(_BUCKETS_PER_PARTITION * max(shuffle_partitions, 1), wanted))


def negative_counts(negatives: DataFrame) -> dict[str, int]:
    """Rows per ``neg_kind`` of a :func:`sample_negatives` result (kinds with no rows absent).

    One row per kind reaches the driver; ordered as :data:`NEGATIVE_KINDS`, then any others.
    """
    rows = negatives.groupBy("neg_kind").count().collect()
    counts = {row["neg_kind"]: int(row["count"]) for row in rows}
    order = {kind: index for index, kind in enumerate(NEGATIVE_KINDS)}
    return dict(sorted(counts.items(), key=lambda entry: (order.get(entry[0], len(order)), entry[0])))


# --- the catalog, as arrays ----------------------------------------------------------------


@dataclass(frozen=True)
class _Catalog:
    """The item catalog as sorted numpy arrays (one entry per item; shipped to the workers).

    ``items``: every item_idx, ascending (uniform draws index it). ``weighted`` / ``cdf``: the
    items with popularity > 0, ascending, and the running sum of ``popularity ** 0.75`` (item
    ``i`` owns ``[cdf[i-1], cdf[i])``). ``item_category``: category of ``items[i]``.
    ``category_ids`` (ascending, 0 excluded), ``category_start`` / ``category_size``: the
    items of category ``category_ids[c]`` are ``category_items[start:start + size]``,
    ascending.
    """

    items: np.ndarray
    item_category: np.ndarray
    weighted: np.ndarray
    cdf: np.ndarray
    category_ids: np.ndarray
    category_start: np.ndarray
    category_size: np.ndarray
    category_items: np.ndarray

    @property
    def n_items(self) -> int:
        return int(self.items.size)

    @classmethod
    def from_arrow(cls, table: pa.Table) -> _Catalog:
        item = _ids(table, "item_idx", "items")
        category = table.column("category_idx").fill_null(0).to_numpy().astype(np.int64)
        popularity = table.column("popularity").fill_null(0).to_numpy().astype(np.int64)
        order = np.argsort(item, kind="stable")
        item, category, popularity = item[order], category[order], popularity[order]
        if item.size and np.any(item[1:] == item[:-1]):
            raise ValueError("sample_negatives items must have unique item_idx; deduplicate the catalog")
        is_weighted = popularity > 0
        known = category != 0
        by_category = np.lexsort((item[known], category[known]))
        category_items, sorted_categories = item[known][by_category], category[known][by_category]
        category_ids, category_start, category_size = np.unique(
            sorted_categories, return_index=True, return_counts=True)
        return cls(
            items=item, item_category=category, weighted=item[is_weighted],
            cdf=np.cumsum(popularity[is_weighted].astype(np.float64) ** POPULARITY_EXPONENT),
            category_ids=category_ids, category_start=category_start.astype(np.int64),
            category_size=category_size.astype(np.int64), category_items=category_items,
        )


@dataclass(frozen=True)
class _SamplePlan:
    specs: tuple[tuple[str, int], ...]
    seed: int
    hard_top_categories: int
    max_attempts: int
    oversample: int
    ranked_share: float
    catalog: _Catalog


# --- counter-based uniforms ----------------------------------------------------------------

_MASK64 = (1 << 64) - 1
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX_1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX_2 = np.uint64(0x94D049BB133111EB)


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, element-wise on uint64 (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * _MIX_1
        x = (x ^ (x >> np.uint64(27))) * _MIX_2
    return x ^ (x >> np.uint64(31))


def _uniforms(seed: int, stream: int, pair_ids: np.ndarray, attempt: int, n_draws: int) -> np.ndarray:
    """(pairs, n_draws) float64 in [0, 1): the top 53 bits of a hash of (seed, stream,
    pair_id, attempt, draw). A pure function of those five numbers."""
    with np.errstate(over="ignore"):
        key = _mix64(np.array([(seed * 0x9E3779B97F4A7C15 + stream) & _MASK64], dtype=np.uint64))
        per_pair = _mix64(pair_ids.astype(np.uint64) ^ key)
        counter = _mix64((np.uint64(attempt) << np.uint64(32)) + np.arange(n_draws, dtype=np.uint64) + _GOLDEN)
        hashed = _mix64(per_pair[:, None] + counter[None, :])
    return (hashed >> np.uint64(11)).astype(np.float64) * (1.0 / 2**53)


def _index_of(u: np.ndarray, size: np.ndarray | int) -> np.ndarray:
    """floor(u * size) clamped to size - 1 (int64; -1 where size is 0)."""
    return np.minimum(np.floor(u * size).astype(np.int64), np.asarray(size, dtype=np.int64) - 1)


# --- one group of users --------------------------------------------------------------------


def _ids(table: pa.Table, column: str, what: str) -> np.ndarray:
    values = table.column(column)
    if values.null_count:
        raise ValueError(f"sample_negatives {what} have a null {column}: positives, user_items and items must "
                         "have no null ids")
    return values.to_numpy().astype(np.int64)


def _user_keys(users: np.ndarray, items: np.ndarray) -> np.ndarray:
    """uint64 ``user << 32 | item`` (each as its 32-bit pattern): one sortable key per pair."""
    return (users.astype(np.uint32).astype(np.uint64) << np.uint64(32)) | items.astype(np.uint32).astype(np.uint64)


def _contains(sorted_keys: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """bool array: which ``keys`` are in ``sorted_keys`` (ascending)."""
    if sorted_keys.size == 0:
        return np.zeros(keys.shape, dtype=bool)
    at = np.minimum(np.searchsorted(sorted_keys, keys), sorted_keys.size - 1)
    return sorted_keys[at] == keys


def _member(sorted_values: np.ndarray, values: np.ndarray) -> np.ndarray:
    """bool array: which ``values`` are in ``sorted_values`` (ascending, non-empty)."""
    at = np.minimum(np.searchsorted(sorted_values, values), sorted_values.size - 1)
    return sorted_values[at] == values


@dataclass(frozen=True)
class _GroupUsers:
    """Per-user state of one group, indexed by the position of the user in ``users``.

    ``categories``: (users, top) int64, row ``u`` holds indices into the catalog's
    category arrays of the user's preferred categories by rank (-1 padded), ``n_categories``
    how many. ``ranked_items`` / ``ranked_start`` / ``ranked_size``: the user's ranked list.
    """

    users: np.ndarray
    positive_keys: np.ndarray
    categories: np.ndarray
    n_categories: np.ndarray
    ranked_items: np.ndarray
    ranked_start: np.ndarray
    ranked_size: np.ndarray


def _group_users(plan: _SamplePlan, users: np.ndarray, user_item_users: np.ndarray, user_item_items: np.ndarray,
                 ranked_users: np.ndarray, ranked_items: np.ndarray, ranked_positions: np.ndarray) -> _GroupUsers:
    catalog = plan.catalog
    n_users, top = users.size, plan.hard_top_categories
    # The group also holds rows of users without a pair here (their pairs were filtered
    # out upstream): only the pairs' users matter.
    mine = _member(users, user_item_users)
    user_item_users, user_item_items = user_item_users[mine], user_item_items[mine]
    mine = _member(users, ranked_users)
    ranked_users, ranked_items, ranked_positions = ranked_users[mine], ranked_items[mine], ranked_positions[mine]
    categories = np.full((n_users, top), -1, dtype=np.int64)
    n_categories = np.zeros(n_users, dtype=np.int64)
    if user_item_users.size and catalog.category_ids.size:
        at = np.minimum(np.searchsorted(catalog.items, user_item_items), catalog.n_items - 1)
        in_catalog = catalog.items[at] == user_item_items
        category = np.where(in_catalog, catalog.item_category[at], 0)
        known = category != 0
        category_pos = np.searchsorted(catalog.category_ids, category[known])
        user_pos = np.searchsorted(users, user_item_users[known])
        # rows per (user, category): unique keys with counts
        pairs, n_rows = np.unique(user_pos * catalog.category_ids.size + category_pos, return_counts=True)
        pair_user, pair_category = pairs // catalog.category_ids.size, pairs % catalog.category_ids.size
        # by user, most rows first, then category_idx ascending (category_pos is in id order)
        order = np.lexsort((pair_category, -n_rows, pair_user))
        pair_user, pair_category = pair_user[order], pair_category[order]
        first = np.searchsorted(pair_user, pair_user, side="left")
        rank = np.arange(pair_user.size) - first
        keep = rank < top
        categories[pair_user[keep], rank[keep]] = pair_category[keep]
        np.add.at(n_categories, pair_user[keep], 1)
    order = np.lexsort((ranked_positions, ranked_users))
    ranked_users, ranked_items = ranked_users[order], ranked_items[order]
    ranked_user_pos = np.searchsorted(users, ranked_users)
    ranked_start = np.searchsorted(ranked_user_pos, np.arange(n_users), side="left")
    ranked_size = np.searchsorted(ranked_user_pos, np.arange(n_users), side="right") - ranked_start
    return _GroupUsers(
        users=users, positive_keys=np.unique(_user_keys(user_item_users, user_item_items)),
        categories=categories, n_categories=n_categories, ranked_items=ranked_items,
        ranked_start=ranked_start, ranked_size=ranked_size,
    )


def _draw(plan: _SamplePlan, state: _GroupUsers, kind: str, pair_ids: np.ndarray, user_pos: np.ndarray,
          attempt: int, n_draws: int) -> np.ndarray:
    """(pairs, n_draws) int64 candidate items of one attempt; -1 where a draw has no item."""
    catalog, seed = plan.catalog, plan.seed
    if kind == "random":
        u = _uniforms(seed, _STREAM_RANDOM, pair_ids, attempt, n_draws)
        return catalog.items[_index_of(u, catalog.n_items)]
    if kind == "popularity":
        if catalog.weighted.size == 0:
            return np.full((pair_ids.size, n_draws), -1, dtype=np.int64)
        point = _uniforms(seed, _STREAM_POPULARITY, pair_ids, attempt, n_draws) * catalog.cdf[-1]
        at = np.minimum(np.searchsorted(catalog.cdf, point, side="right"), catalog.weighted.size - 1)
        return catalog.weighted[at]
    # hard: the ranked list with probability ranked_share (always without categories), else
    # a preferred category, then an item of it; nothing for a user with neither.
    n_categories = state.n_categories[user_pos][:, None]
    n_ranked = state.ranked_size[user_pos][:, None]
    use_ranked = (n_ranked > 0) & (
        (n_categories == 0)
        | (_uniforms(seed, _STREAM_HARD_SOURCE, pair_ids, attempt, n_draws) < plan.ranked_share))
    out = np.full((pair_ids.size, n_draws), -1, dtype=np.int64)
    if state.ranked_items.size:
        slot = _index_of(_uniforms(seed, _STREAM_HARD_RANKED, pair_ids, attempt, n_draws), n_ranked)
        at = np.clip(state.ranked_start[user_pos][:, None] + slot, 0, state.ranked_items.size - 1)
        out = np.where(use_ranked, state.ranked_items[at], out)
    if catalog.category_ids.size:
        rank = _index_of(_uniforms(seed, _STREAM_HARD_CATEGORY, pair_ids, attempt, n_draws), n_categories)
        category = state.categories[user_pos[:, None], np.maximum(rank, 0)]
        has_category = (n_categories > 0) & (category >= 0)
        category = np.maximum(category, 0)
        size = catalog.category_size[category]
        within = _index_of(_uniforms(seed, _STREAM_HARD_ITEM, pair_ids, attempt, n_draws), size)
        item = catalog.category_items[catalog.category_start[category] + np.maximum(within, 0)]
        out = np.where(~use_ranked & has_category, item, out)
    return out


def _sample_kind(plan: _SamplePlan, state: _GroupUsers, kind: str, count: int, pair_ids: np.ndarray,
                 user_pos: np.ndarray, positive_items: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(chosen (pairs, count) int64, -1 padded, in draw order; how many per pair)."""
    n_pairs = pair_ids.size
    chosen = np.full((n_pairs, count), -1, dtype=np.int64)
    got = np.zeros(n_pairs, dtype=np.int64)
    n_draws = count * plan.oversample
    active = np.arange(n_pairs)
    for attempt in range(plan.max_attempts):
        if active.size == 0:
            break
        candidates = _draw(plan, state, kind, pair_ids[active], user_pos[active], attempt, n_draws)
        users = state.users[user_pos[active]]
        eligible = (candidates >= 0) & (candidates != positive_items[active][:, None])
        eligible &= ~_contains(state.positive_keys, _user_keys(np.repeat(users, n_draws), candidates.ravel())
                               ).reshape(candidates.shape)
        row, draw = np.nonzero(eligible)
        item = candidates[row, draw]
        # What earlier attempts took joins as order -1, so a repeat of it is dropped below.
        taken_row, taken_slot = np.nonzero(chosen[active] >= 0)
        row = np.concatenate([taken_row, row])
        item = np.concatenate([chosen[active][taken_row, taken_slot], item])
        order = np.concatenate([np.full(taken_row.size, -1, dtype=np.int64), draw])
        # first occurrence of each (row, item) in draw order
        by_item = np.lexsort((order, item, row))
        row, item, order = row[by_item], item[by_item], order[by_item]
        first = np.ones(row.size, dtype=bool)
        first[1:] = (row[1:] != row[:-1]) | (item[1:] != item[:-1])
        new = first & (order >= 0)
        row, item, order = row[new], item[new], order[new]
        by_draw = np.lexsort((order, row))
        row, item = row[by_draw], item[by_draw]
        slot = np.arange(row.size) - np.searchsorted(row, row, side="left") + got[active][row]
        fits = slot < count
        pair = active[row[fits]]
        chosen[pair, slot[fits]] = item[fits]
        np.add.at(got, pair, 1)
        active = active[got[active] < count]
    return chosen, got


def _sample_group(plan: _SamplePlan, table: pa.Table) -> pa.Table:
    """Negatives (``_OUTPUT_DDL``) of one bucket of users: ``table`` has the rows of
    ``_GROUPED_SCHEMA`` (plus the bucket) of every pair, user_items row and ranked entry of
    its users."""
    pieces = []
    for draws in _group_draws(plan, table):
        for kind, count, pair_ids, pair_users, chosen, got in draws:
            row, rank = np.nonzero(np.arange(count)[None, :] < got[:, None])
            pieces.append(pa.table({
                "pair_id": pa.array(pair_ids[row], pa.int64()),
                "user_idx": pa.array(pair_users[row].astype(np.int32), pa.int32()),
                "item_idx": pa.array(chosen[row, rank].astype(np.int32), pa.int32()),
                "neg_kind": pa.repeat(pa.scalar(kind, pa.string()), row.size),
                "neg_rank": pa.array(rank.astype(np.int32), pa.int32()),
            }))
    return pa.concat_tables(pieces) if pieces else _ARROW_OUTPUT.empty_table()


def _group_draws(plan: _SamplePlan, table: pa.Table):
    """Yields, per slice of one bucket's pairs and per kind: ``(kind, count, pair_ids,
    pair_users, chosen, got)`` (``chosen[i, :got[i]]`` are pair i's negatives in rank order)."""
    role = table.column("role").to_numpy()
    user = _ids(table, "user_idx", "rows")
    item = _ids(table, "item_idx", "rows")
    is_pair, is_user_item, is_ranked = role == _ROLE_PAIR, role == _ROLE_USER_ITEM, role == _ROLE_RANKED
    pair_ids, pair_users, pair_items = _ids(table, "pair_id", "positives")[is_pair], user[is_pair], item[is_pair]
    by_pair = np.argsort(pair_ids, kind="stable")
    pair_ids, pair_users, pair_items = pair_ids[by_pair], pair_users[by_pair], pair_items[by_pair]
    if pair_ids.size == 0:
        return
    users = np.unique(pair_users)
    state = _group_users(plan, users, user[is_user_item], item[is_user_item], user[is_ranked], item[is_ranked],
                         table.column("position").to_numpy()[is_ranked])
    user_pos = np.searchsorted(users, pair_users)
    for low in range(0, pair_ids.size, _PAIRS_PER_SLICE):
        part = slice(low, low + _PAIRS_PER_SLICE)
        yield [(kind, count, pair_ids[part], pair_users[part],
                *_sample_kind(plan, state, kind, count, pair_ids[part], user_pos[part], pair_items[part]))
               for kind, count in plan.specs]


def _sample_group_lists(plan: _SamplePlan, table: pa.Table) -> pa.Table:
    """:func:`_sample_group`'s negatives as ``_LISTS_DDL``: one row per pair with any, the
    kinds in name order (as ``sort_array`` of (kind, rank, item) would put them), ranks in order."""
    names = pa.array(sorted(kind for kind, _ in plan.specs), pa.string())
    pieces = []
    for draws in _group_draws(plan, table):
        draws = sorted(draws, key=lambda d: d[0])  # kind name order: draw i has code i in names
        pair_ids = draws[0][2]
        chosen = np.hstack([d[4] for d in draws])
        keep = np.hstack([np.arange(d[1])[None, :] < d[5][:, None] for d in draws])
        codes = np.hstack([np.full((pair_ids.size, d[1]), code, np.int8) for code, d in enumerate(draws)])
        lengths = keep.sum(axis=1)
        has = lengths > 0
        offsets = pa.array(np.concatenate([[0], np.cumsum(lengths[has])]).astype(np.int32), pa.int32())
        kinds = pa.DictionaryArray.from_arrays(pa.array(codes[keep], pa.int8()), names)
        pieces.append(pa.table({
            "pair_id": pa.array(pair_ids[has], pa.int64()),
            "neg_item_idx": pa.ListArray.from_arrays(offsets, pa.array(chosen[keep].astype(np.int32), pa.int32())),
            "neg_kind": pa.ListArray.from_arrays(offsets, kinds.dictionary_decode()),
        }))
    return pa.concat_tables(pieces) if pieces else _ARROW_LISTS.empty_table()


_ARROW_LISTS = pa.schema([("pair_id", pa.int64()), ("neg_item_idx", pa.list_(pa.int32())),
                          ("neg_kind", pa.list_(pa.string()))])
_LISTS_DDL = "pair_id bigint, neg_item_idx array<int>, neg_kind array<string>"


_ARROW_OUTPUT = pa.schema([("pair_id", pa.int64()), ("user_idx", pa.int32()), ("item_idx", pa.int32()),
                           ("neg_kind", pa.string()), ("neg_rank", pa.int32())])


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


NEGATIVE_LISTS_SCHEMA = T.StructType([
    T.StructField("pair_id", T.LongType(), nullable=False),
    T.StructField("neg_item_idx", T.ArrayType(T.IntegerType(), containsNull=True), nullable=True),
    T.StructField("neg_kind", T.ArrayType(T.StringType(), containsNull=True), nullable=True),
])


def _as_negative_lists(df: DataFrame) -> DataFrame:
    """Columns of NEGATIVE_LISTS_SCHEMA in order; a null pair id fails the job (see _as_negatives)."""
    pair_id = F.coalesce(F.col("pair_id").cast("long"), F.raise_error(F.lit(
        "sample_negatives produced a null pair_id: positives, user_items and items must have no null ids")
    ).cast("long"), F.lit(-1).cast("long")).alias("pair_id")
    return df.select(pair_id, F.col("neg_item_idx").cast("array<int>"), F.col("neg_kind").cast("array<string>"))


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
