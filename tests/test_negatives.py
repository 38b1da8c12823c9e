"""Negative sampling: spec parsing (exact outputs and messages), and the sampler proved by its
invariants on literal users with known answers: no negative is ever a positive of its user,
exact counts and ranks, no repeats, hard negatives only in the user's top categories,
popularity-0 items never drawn, frequencies that follow popularity ** 0.75, determinism."""

from __future__ import annotations

import math
import random
from collections import Counter, defaultdict

import pandas as pd
import pytest
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from spark_features.negatives import (
    NEGATIVES_SCHEMA,
    NegativeSpec,
    negative_buckets,
    negative_counts,
    parse_negative_specs,
    sample_negative_lists,
    sample_negatives,
)

# --- the literal world -------------------------------------------------------------------------
#
# Items 1..30: category 1 = items 1-10, 2 = 11-20, 3 = 21-26, 0 (unknown) = 27-30.
# Popularity: 0 for multiples of 4 (never drawn by popularity sampling), else the item index.
CATEGORY_OF = {
    item: (1 if item <= 10 else 2 if item <= 20 else 3 if item <= 26 else 0) for item in range(1, 31)
}
POPULARITY_OF = {item: 0 if item % 4 == 0 else item for item in range(1, 31)}
ALL_ITEMS = frozenset(CATEGORY_OF)
ZERO_POPULARITY = frozenset(item for item, popularity in POPULARITY_OF.items() if popularity == 0)

# user -> every row of user_items (duplicates on purpose), with the expected top-2 and top-1
# categories (by rows in user_items, ties by category_idx ascending, category 0 excluded).
LITERAL_USERS = {
    # category rows: 1 -> 4 (item 1 twice), 2 -> 2, 3 -> 1
    1: ([1, 1, 2, 3, 11, 12, 21], (1, 2), (1,)),
    # 2 -> 1, 3 -> 1, 0 -> 3: the unknown category never counts, even as the largest
    2: ([21, 11, 27, 28, 29], (2, 3), (2,)),
    # only unknown-category items: no preferred category, so no hard negatives
    3: ([27, 28], (), ()),
    # everything but items 5 (category 1) and 17 (category 2): 1 -> 9, 2 -> 9, 3 -> 6
    4: (sorted(ALL_ITEMS - {5, 17}), (1, 2), (1,)),
    # 1 -> 2 (item 1 twice), 2 -> 1, 3 -> 1: the tie between 2 and 3 goes to 2
    5: ([1, 1, 11, 21], (1, 2), (1,)),
    # rows count, not distinct items: 3 -> 3 rows of one item beats 2 -> 2 distinct items
    6: ([21, 21, 21, 11, 12, 1], (3, 2), (3,)),
}
NEAR_SATURATED_USER = 4
NEAR_SATURATED_ELIGIBLE = frozenset({5, 17})

SPECS = parse_negative_specs("random:4,popularity:2,hard:3")
COUNT_OF = {spec.kind: spec.count for spec in SPECS}
SEED = 11


def _bulk_users() -> dict[int, list[int]]:
    """40 more users with 3-12 random interactions each (repeats allowed), for the invariants
    checked against a Python reference."""
    rng = random.Random(20260101)
    return {user: [rng.randint(1, 30) for _ in range(rng.randint(3, 12))] for user in range(100, 140)}


def _user_items_rows() -> list[tuple[int, int]]:
    rows = [(user, item) for user, (items, _, _) in LITERAL_USERS.items() for item in items]
    rows += [(user, item) for user, items in _bulk_users().items() for item in items]
    return rows


def _positive_rows() -> list[tuple[int, int, int]]:
    """One pair per user_items row except the near-saturated user, who gets 3 pairs."""
    rows: list[tuple[int, int]] = []
    for user, item in _user_items_rows():
        if user != NEAR_SATURATED_USER or sum(1 for u, _ in rows if u == user) < 3:
            rows.append((user, item))
    return [(pair_id, user, item) for pair_id, (user, item) in enumerate(rows)]


def _frame(spark, rows, schema: str) -> DataFrame:
    """A small literal DataFrame built JVM-side (pandas -> Arrow -> LocalRelation): no Python
    workers start when it is scanned."""
    columns = [field.split()[0] for field in schema.split(",")]
    return spark.createDataFrame(pd.DataFrame(rows, columns=columns), schema)


def _top_categories(items: list[int], top: int) -> tuple[int, ...]:
    """Python reference for the hard-negative categories of one user."""
    counts = Counter(CATEGORY_OF[item] for item in items if CATEGORY_OF[item] != 0)
    return tuple(category for category, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:top])


def _as_tuples(negatives: DataFrame) -> list[tuple]:
    return sorted(tuple(row) for row in negatives.collect())


@pytest.fixture(scope="module")
def world(spark):
    return {
        "positives": _frame(spark, _positive_rows(), "pair_id long, user_idx int, item_idx int"),
        "user_items": _frame(spark, _user_items_rows(), "user_idx int, item_idx int"),
        "items": _frame(
            spark,
            [(item, CATEGORY_OF[item], POPULARITY_OF[item]) for item in sorted(ALL_ITEMS)],
            "item_idx int, category_idx int, popularity long",
        ),
    }


@pytest.fixture(scope="module")
def sampled(world):
    """The main sample, cached while in use: (its DataFrame, its sorted rows)."""
    negatives = sample_negatives(
        world["positives"], world["user_items"], world["items"], SPECS, seed=SEED
    ).cache()
    yield negatives, _as_tuples(negatives)
    negatives.unpersist()


def _sample(world, specs=SPECS, **kwargs) -> list[tuple]:
    return _as_tuples(
        sample_negatives(world["positives"], world["user_items"], world["items"], specs, **kwargs)
    )


@pytest.fixture(scope="module")
def variant(world):
    """Another seed and one preferred category. The kinds are drawn independently, so its
    random rows test the seed and its hard rows test hard_top_categories (one Spark run)."""
    rows = _sample(world, parse_negative_specs("random:4,hard:2"), seed=SEED + 1, hard_top_categories=1)
    return {kind: [row for row in rows if row[3] == kind] for kind in ("random", "hard")}


# --- parsing -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "random:4,popularity:2,hard:2",
            (NegativeSpec("random", 4), NegativeSpec("popularity", 2), NegativeSpec("hard", 2)),
        ),
        (" hard : 1 , random:12 ", (NegativeSpec("hard", 1), NegativeSpec("random", 12))),
        ("popularity:3", (NegativeSpec("popularity", 3),)),
        ("", ()),
        ("  ", ()),
        ("none", ()),
    ],
)
def test_parse_negative_specs_gives_exact_specs_in_order(text, expected):
    assert parse_negative_specs(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("rnd:4", "unknown negative kind 'rnd' in 'rnd:4'; allowed: random, popularity, hard"),
        ("random:4,Hard:2", "unknown negative kind 'Hard' in 'Hard:2'; allowed: random, popularity, hard"),
        ("random:0", "negative count in 'random:0' must be an integer >= 1, got '0'"),
        ("random:-1", "negative count in 'random:-1' must be an integer >= 1, got '-1'"),
        ("random:2.5", "negative count in 'random:2.5' must be an integer >= 1, got '2.5'"),
        ("random:4_0", "negative count in 'random:4_0' must be an integer >= 1, got '4_0'"),
        (
            "random",
            "negative spec 'random' in 'random' must be KIND:COUNT (e.g. 'random:4') "
            "with KIND one of random, popularity, hard",
        ),
        (
            "random:4,,hard:2",
            "negative spec '' in 'random:4,,hard:2' must be KIND:COUNT (e.g. 'random:4') "
            "with KIND one of random, popularity, hard",
        ),
        (
            "random:4,hard:2,random:1",
            "negative kind 'random' is given more than once in 'random:4,hard:2,random:1'; give each kind once",
        ),
        (None, "negative specs must be a string like 'random:4,hard:2', got None"),
    ],
)
def test_parse_negative_specs_rejects_bad_input_naming_allowed_and_given(text, message):
    with pytest.raises(ValueError) as raised:
        parse_negative_specs(text)
    assert str(raised.value) == message


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kind": "rnd", "count": 1}, "NegativeSpec.kind must be one of random, popularity, hard, got 'rnd'"),
        ({"kind": "hard", "count": 0}, "NegativeSpec.count must be an int >= 1, got 0"),
        ({"kind": "hard", "count": True}, "NegativeSpec.count must be an int >= 1, got True"),
    ],
)
def test_negative_spec_validates_its_fields(kwargs, message):
    with pytest.raises(ValueError) as raised:
        NegativeSpec(**kwargs)
    assert str(raised.value) == message


@pytest.mark.spark
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"specs": (NegativeSpec("random", 1), NegativeSpec("random", 2))},
            "specs give negative kind 'random' more than once; give each kind once",
        ),
        (
            {"specs": "random:4"},
            "specs must be a sequence of NegativeSpec (see parse_negative_specs), got 'random:4'",
        ),
        ({"seed": -1}, "sample_negatives seed must be an int in [0, 9223372036854775807], got -1"),
        ({"hard_top_categories": 0}, "sample_negatives hard_top_categories must be an int >= 1, got 0"),
        ({"max_attempts": 0}, "sample_negatives max_attempts must be an int >= 1, got 0"),
        ({"oversample": 1.5}, "sample_negatives oversample must be an int >= 1, got 1.5"),
    ],
)
def test_sample_negatives_rejects_bad_arguments(world, kwargs, message):
    arguments = {"specs": SPECS, **kwargs}
    with pytest.raises(ValueError) as raised:
        sample_negatives(world["positives"], world["user_items"], world["items"], **arguments)
    assert str(raised.value) == message


@pytest.mark.spark
def test_sample_negatives_names_a_missing_input_column(world):
    with pytest.raises(ValueError) as raised:
        sample_negatives(world["positives"].drop("pair_id"), world["user_items"], world["items"], SPECS)
    assert str(raised.value) == "positives is missing column(s) ['pair_id']; it has ['user_idx', 'item_idx']"


# --- the invariants ----------------------------------------------------------------------------


@pytest.mark.spark
def test_schema_is_declared_and_no_negative_is_ever_a_positive_of_its_user(world, sampled):
    negatives, rows = sampled
    assert negatives.schema == NEGATIVES_SCHEMA
    # The anti-join proof in Spark: joining the output back to user_items finds nothing.
    assert negatives.join(world["user_items"], ["user_idx", "item_idx"], "left_semi").count() == 0
    # And the same in Python, plus: never the pair's own positive item.
    positives_of = defaultdict(set)
    for user, item in _user_items_rows():
        positives_of[user].add(item)
    positive_item_of = {pair_id: item for pair_id, _, item in _positive_rows()}
    user_of = {pair_id: user for pair_id, user, _ in _positive_rows()}
    assert rows, "the sample is empty"
    for pair_id, user, item, _kind, _rank in rows:
        assert user == user_of[pair_id]
        assert item not in positives_of[user]
        assert item != positive_item_of[pair_id]
        assert item in ALL_ITEMS


@pytest.mark.spark
def test_ranks_are_0_to_n_minus_1_without_repeats_and_exact_counts_where_items_suffice(sampled):
    _, rows = sampled
    by_group: dict[tuple[int, str], list[tuple[int, int]]] = defaultdict(list)
    for pair_id, _user, item, kind, rank in rows:
        by_group[(pair_id, kind)].append((rank, item))
    for (pair_id, kind), ranked in by_group.items():
        ranks = sorted(rank for rank, _ in ranked)
        assert ranks == list(range(len(ranks))), (pair_id, kind, ranks)
        assert len(ranks) <= COUNT_OF[kind]
        items = [item for _, item in ranked]
        assert len(set(items)) == len(items), f"repeated negative in {(pair_id, kind)}: {items}"

    # Users 1, 2, 5, 6 have >= 22 eligible random, >= 16 eligible popularity and >= 14
    # eligible hard items, and each (pair, kind) gets 4 rounds of 2x draws: every such
    # (pair, kind) is full. (The output is deterministic; this is not a flaky bound.)
    full_users = {1, 2, 5, 6}
    for pair_id, user, _item in _positive_rows():
        if user in full_users:
            for kind, count in COUNT_OF.items():
                assert len(by_group[(pair_id, kind)]) == count, (pair_id, user, kind)
    # The user with only unknown-category items gets random and popularity but no hard ones.
    user_3_kinds = {kind for _, user, _, kind, _ in rows if user == 3}
    assert user_3_kinds == {"random", "popularity"}


@pytest.mark.spark
def test_a_user_with_all_but_two_items_gets_only_those_two_and_never_a_positive(sampled):
    _, rows = sampled
    per_pair_kind: dict[tuple[int, str], list[int]] = defaultdict(list)
    for pair_id, user, item, kind, _ in rows:
        if user == NEAR_SATURATED_USER:
            per_pair_kind[(pair_id, kind)].append(item)
    saturated_pairs = {pair_id for pair_id, user, _ in _positive_rows() if user == NEAR_SATURATED_USER}
    assert len(saturated_pairs) == 3
    random_negatives = set()
    for (pair_id, kind), items in per_pair_kind.items():
        assert pair_id in saturated_pairs
        assert set(items) <= NEAR_SATURATED_ELIGIBLE, (pair_id, kind, items)
        assert len(items) <= 2
        if kind == "random":
            random_negatives |= set(items)
    # The retries do reach them: together the 3 pairs found both eligible items.
    assert random_negatives == NEAR_SATURATED_ELIGIBLE


@pytest.mark.spark
def test_hard_negatives_lie_only_in_the_users_top_categories(sampled):
    _, rows = sampled
    hard_categories: dict[int, set[int]] = defaultdict(set)
    for _pair, user, item, kind, _rank in rows:
        if kind == "hard":
            hard_categories[user].add(CATEGORY_OF[item])
    # Literal users: the exact category set (every one of several pairs x 3 draws lands in
    # both categories; user 4 can only get items 5 and 17, one in each).
    for user, (_items, top_two, _) in LITERAL_USERS.items():
        assert hard_categories.get(user, set()) == set(top_two), user
    # Bulk users: never outside the Python reference's top two.
    for user, items in _bulk_users().items():
        assert hard_categories.get(user, set()) <= set(_top_categories(items, 2)), user


@pytest.mark.spark
def test_hard_top_categories_one_keeps_only_the_first_by_count_then_category(variant):
    hard_categories: dict[int, set[int]] = defaultdict(set)
    for _pair, user, item, _kind, _rank in variant["hard"]:
        hard_categories[user].add(CATEGORY_OF[item])
    for user, (_items, _, top_one) in LITERAL_USERS.items():
        if user != NEAR_SATURATED_USER:  # its only category-1 candidate is item 5
            assert hard_categories.get(user, set()) == set(top_one), user
    assert hard_categories[NEAR_SATURATED_USER] <= {1}
    for user, items in _bulk_users().items():
        assert hard_categories.get(user, set()) <= set(_top_categories(items, 1)), user


@pytest.mark.spark
def test_popularity_never_draws_a_popularity_zero_item(sampled):
    _, rows = sampled
    popularity_items = {item for _, _, item, kind, _ in rows if kind == "popularity"}
    assert popularity_items, "no popularity negatives"
    assert not popularity_items & ZERO_POPULARITY
    # Random negatives do reach popularity-0 items: the exclusion is popularity's own.
    assert {item for _, _, item, kind, _ in rows if kind == "random"} & ZERO_POPULARITY


@pytest.mark.spark
def test_negative_counts_reports_rows_per_kind(sampled):
    negatives, rows = sampled
    expected = Counter(kind for _, _, _, kind, _ in rows)
    counts = negative_counts(negatives)
    assert counts == dict(expected)
    assert list(counts) == ["random", "popularity", "hard"]


@pytest.mark.spark
def test_more_attempts_only_add_negatives_after_the_first_attempts_choices(world, sampled):
    _, rows = sampled
    one_attempt = _sample(world, seed=SEED, max_attempts=1)
    assert set(one_attempt) < set(rows)
    added_users = {user for _, user, _, _, _ in set(rows) - set(one_attempt)}
    assert NEAR_SATURATED_USER in added_users


@pytest.mark.spark
def test_empty_specs_give_no_rows_with_the_declared_schema(world):
    negatives = sample_negatives(world["positives"], world["user_items"], world["items"], ())
    assert negatives.schema == NEGATIVES_SCHEMA
    assert negatives.count() == 0


# --- determinism -------------------------------------------------------------------------------


@pytest.mark.spark
def test_same_seed_gives_identical_rows_for_any_partitioning(spark, world, sampled):
    _, rows = sampled
    previous = spark.conf.get("spark.sql.shuffle.partitions")
    spark.conf.set("spark.sql.shuffle.partitions", "7")
    try:
        again = sample_negatives(
            world["positives"].repartition(3),
            world["user_items"].repartition(5, "item_idx"),
            world["items"].repartition(2, "category_idx"),
            SPECS,
            seed=SEED,
        )
        assert _as_tuples(again) == rows
    finally:
        spark.conf.set("spark.sql.shuffle.partitions", previous)


@pytest.mark.spark
@pytest.mark.parametrize("n_buckets", [1, 3, 64])
def test_the_bucket_count_never_changes_the_rows(world, sampled, n_buckets):
    assert _sample(world, seed=SEED, n_buckets=n_buckets) == sampled[1]


def test_negative_buckets_follow_the_pairs_between_two_per_core_and_four_per_partition():
    assert negative_buckets(2, 64, 100_000) == 4  # MovieLens-100K: 4 groups, not 256
    assert negative_buckets(2, 64, 1_000_000) == 40
    assert negative_buckets(2, 64, 10_000_000) == 256  # capped at 4 per shuffle partition
    assert negative_buckets(2, 8, 1_000_000) == 32
    assert negative_buckets(16, 64, 0) == 32  # never fewer than two per core
    with pytest.raises(ValueError, match="n_buckets must be an int >= 1, got 0"):
        sample_negatives(None, None, None, SPECS, n_buckets=0)  # refused before any input is read


@pytest.mark.spark
def test_different_seed_gives_different_rows(sampled, variant):
    _, rows = sampled
    other = variant["random"]
    assert other != [row for row in rows if row[3] == "random"]
    # Different draws, same contract: the full users still get exactly `count` of them.
    full_pairs = [pair_id for pair_id, user, _ in _positive_rows() if user in (1, 2, 5, 6)]
    other_counts = Counter(row[0] for row in other)
    assert [other_counts[pair_id] for pair_id in full_pairs] == [COUNT_OF["random"]] * len(full_pairs)


# --- distributions -----------------------------------------------------------------------------

# 10 candidate items; the positive item 11 (popularity 0) is every user's only positive, so no
# candidate is ever excluded and with count 1 each pair's negative is one plain draw.
STAT_POPULARITY = {1: 0, 2: 1, 3: 2, 4: 5, 5: 10, 6: 20, 7: 50, 8: 100, 9: 0, 10: 7, 11: 0}
STAT_PAIRS = 4_000


def _chi_square(observed: Counter, expected_p: dict[int, float], n: int) -> float:
    return sum((observed.get(item, 0) - n * p) ** 2 / (n * p) for item, p in expected_p.items())


@pytest.mark.spark
def test_random_is_uniform_and_popularity_follows_popularity_to_the_three_quarters(spark):
    items = _frame(
        spark,
        [(item, 1, popularity) for item, popularity in STAT_POPULARITY.items()],
        "item_idx int, category_idx int, popularity long",
    )
    positives = spark.range(STAT_PAIRS).select(
        F.col("id").alias("pair_id"),
        (F.col("id") % 50 + 1).cast("int").alias("user_idx"),
        F.lit(11).alias("item_idx"),
    )
    user_items = spark.range(1, 51).select(
        F.col("id").cast("int").alias("user_idx"), F.lit(11).alias("item_idx")
    )
    rows = _as_tuples(
        sample_negatives(positives, user_items, items, parse_negative_specs("random:1,popularity:1"), seed=3)
    )
    random_counts = Counter(item for _, _, item, kind, _ in rows if kind == "random")
    popularity_counts = Counter(item for _, _, item, kind, _ in rows if kind == "popularity")
    assert sum(random_counts.values()) == sum(popularity_counts.values()) == STAT_PAIRS

    uniform = {item: 1 / 10 for item in range(1, 11)}
    weights = {item: p**0.75 for item, p in STAT_POPULARITY.items() if p > 0}
    smoothed = {item: weight / sum(weights.values()) for item, weight in weights.items()}
    assert set(random_counts) == set(uniform)  # never item 11, the users' positive
    assert set(popularity_counts) == set(smoothed)  # never items 1, 9 or 11 (popularity 0)

    # The sample is a deterministic function of the seed, so these bounds cannot flake. They
    # sit well above what seed 3 produces (max |freq - p| 0.0115 random, 0.0150 popularity;
    # chi-square 10.5 on 9 and 10.5 on 7 degrees of freedom) yet near 4 standard errors
    # (sqrt(p(1-p)/4000) <= 0.0078) and at chi-square p-values of about 4e-4 and 2e-4, so a
    # wrong weighting still fails them: plain popularity (no 0.75 smoothing) would put item 8
    # at 0.513 instead of 0.417. (200k draws with this seed: chi-square 5.9 and 10.0.)
    for counts, expected, chi_square_bound in (
        (random_counts, uniform, 30.0),
        (popularity_counts, smoothed, 28.0),
    ):
        deviation = max(abs(counts[item] / STAT_PAIRS - p) for item, p in expected.items())
        assert deviation < 0.03, (deviation, counts)
        assert _chi_square(counts, expected, STAT_PAIRS) < chi_square_bound
    unsmoothed_item_8 = 100 / sum(STAT_POPULARITY.values())
    assert abs(popularity_counts[8] / STAT_PAIRS - unsmoothed_item_8) > 0.05
    assert math.isclose(sum(smoothed.values()), 1.0)


# --- hard negatives from a release's ranked lists ---------------------------------------------
#
# user -> the items a release ranked 20..100 for them (index_builder.release_negatives).
# User 1's list holds its own positive 1 (never drawn) and two items outside its top
# categories; user 3 has no preferred category, so its hard draws always use the list; every
# bulk user gets the same list of unknown-category items, so a hard negative from the list is
# recognisable (category 0 is never a preferred category).
RANKED = {1: [30, 25, 1], 3: [5, 6, 27, 29], **{user: [27, 28, 29, 30] for user in range(100, 140)}}


def _ranked_sample(world, spark, share: float) -> dict[int, set[int]]:
    ranked = _frame(spark, [(user, items) for user, items in RANKED.items()], "user_idx int, items array<int>")
    rows = _sample(world, parse_negative_specs("random:1,hard:3"), seed=SEED, ranked=ranked, ranked_share=share)
    hard: dict[int, set[int]] = defaultdict(set)
    for _pair, user, item, kind, _rank in rows:
        if kind == "hard":
            hard[user].add(item)
    for user, items in _user_items_rows_by_user().items():
        assert not hard.get(user, set()) & set(items), user  # never a positive, whatever the source
    return hard


def _user_items_rows_by_user() -> dict[int, list[int]]:
    by_user: dict[int, list[int]] = defaultdict(list)
    for user, item in _user_items_rows():
        by_user[user].append(item)
    return by_user


@pytest.mark.spark
def test_ranked_share_one_draws_hard_negatives_only_from_the_ranked_lists(world, spark):
    hard = _ranked_sample(world, spark, 1.0)
    positives = _user_items_rows_by_user()
    assert hard[1] == {25, 30}  # item 1 is user 1's positive: only two eligible, so two rows
    assert hard[3] == {5, 6, 29}  # 27 is a positive of user 3
    for user in range(100, 140):
        assert hard[user] <= set(RANKED[user]) - set(positives[user]), user
    for user in (2, 4, 5, 6):  # no list: their categories, as without ranked lists
        assert hard[user] <= {i for i in ALL_ITEMS if CATEGORY_OF[i] in _top_categories(positives[user], 2)}, user


@pytest.mark.spark
def test_ranked_share_zero_keeps_category_draws_but_a_user_without_categories_uses_the_list(world, spark):
    hard = _ranked_sample(world, spark, 0.0)
    positives = _user_items_rows_by_user()
    assert hard[3] == {5, 6, 29}
    for user in [1, *range(100, 140)]:
        top = _top_categories(positives[user], 2)
        assert all(CATEGORY_OF[item] in top for item in hard[user]), user


@pytest.mark.spark
def test_ranked_share_half_mixes_both_sources(world, spark):
    hard = _ranked_sample(world, spark, 0.5)
    from_list = sum(1 for user in range(100, 140) for item in hard[user] if CATEGORY_OF[item] == 0)
    from_categories = sum(1 for user in range(100, 140) for item in hard[user] if CATEGORY_OF[item] != 0)
    positives = _user_items_rows_by_user()
    for user in range(100, 140):
        allowed = set(RANKED[user]) | {i for i in ALL_ITEMS if CATEGORY_OF[i] in _top_categories(positives[user], 2)}
        assert hard[user] <= allowed - set(positives[user]), user
    # about half of the draws each way (the sample is a fixed function of the seed)
    assert from_list > 20 and from_categories > 20, (from_list, from_categories)


@pytest.mark.spark
@pytest.mark.parametrize("share", [-0.1, 1.5, True, "half"])
def test_ranked_share_outside_zero_one_is_refused(world, share):
    with pytest.raises(ValueError) as raised:
        sample_negatives(world["positives"], world["user_items"], world["items"], SPECS, ranked_share=share)
    assert str(raised.value) == f"sample_negatives ranked_share must be a number in [0, 1], got {share!r}"


def _lists_from_rows(rows: list[tuple]) -> dict[int, tuple[list[int], list[str]]]:
    """Python reference for the pairs layout: per pair, the negatives by kind name then rank."""
    by_pair: dict[int, list[tuple]] = defaultdict(list)
    for pair, _user, item, kind, rank in rows:
        by_pair[pair].append((kind, rank, item))
    return {pair: ([item for _, _, item in sorted(negs)], [kind for kind, _, _ in sorted(negs)])
            for pair, negs in by_pair.items()}


@pytest.mark.spark
@pytest.mark.parametrize("with_ranked", [False, True])
def test_negative_lists_hold_exactly_the_rows_of_sample_negatives_in_the_pairs_order(world, spark, sampled,
                                                                                      with_ranked):
    kwargs = {"seed": SEED}
    if with_ranked:
        kwargs["ranked"] = _frame(spark, [(user, items) for user, items in RANKED.items()],
                                  "user_idx int, items array<int>")
    rows = sampled[1] if not with_ranked else _sample(world, **kwargs)
    lists = sample_negative_lists(world["positives"], world["user_items"], world["items"], SPECS, **kwargs)
    got = {row["pair_id"]: (list(row["neg_item_idx"]), list(row["neg_kind"])) for row in lists.collect()}
    expected = _lists_from_rows(rows)
    assert got == expected
    assert len(got) == len(_positive_rows())  # every pair of this world gets negatives
    assert [f.name for f in lists.schema.fields] == ["pair_id", "neg_item_idx", "neg_kind"]
    assert got[0][1] == ["hard"] * 3 + ["popularity"] * 2 + ["random"] * 4  # kind name order, not spec order


@pytest.mark.spark
def test_negative_lists_without_specs_or_catalog_are_empty(world):
    none = sample_negative_lists(world["positives"], world["user_items"], world["items"], ())
    assert none.collect() == [] and none.columns == ["pair_id", "neg_item_idx", "neg_kind"]
    empty_catalog = sample_negative_lists(world["positives"], world["user_items"], world["items"].limit(0), SPECS)
    assert empty_catalog.collect() == []
