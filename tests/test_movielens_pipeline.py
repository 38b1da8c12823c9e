"""MovieLens-100K through ingest and the full feature build: the invariants at real scale."""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.spark, pytest.mark.slow]


def test_every_user_has_exactly_one_test_and_one_valid_pair(ml_lake):
    io, lake, report = ml_lake
    assert report.vocabs["user_id"].size == 944 and report.vocabs["item_id"].size == 1683
    assert report.pair_counts == {"train": 98_114, "valid": 943, "test": 943}
    for split in ("valid", "test"):
        per_user = io.read_table(lake.table(f"pairs/{split}")).groupBy("user_idx").count()
        assert per_user.count() == 943 and per_user.where("count != 1").count() == 0


def test_no_history_element_is_at_or_after_its_pairs_event(ml_lake):
    from pyspark.sql import functions as F

    io, lake, _ = ml_lake
    user_vocab = io.read_table(lake.table("vocab/user_id")).select(F.col("value").alias("user_id"),
                                                                   F.col("index").alias("user_idx"))
    item_vocab = io.read_table(lake.table("vocab/item_id")).select(F.col("value").alias("item_id"),
                                                                   F.col("index").alias("h_item"))
    # ML-100K has one rating per (user, item): its time is the time of that history element.
    events = (io.read_table(lake.table("bronze/interactions")).join(user_vocab, "user_id").join(item_vocab, "item_id")
              .select("user_idx", "h_item", F.col("event_ts").alias("h_ts")))
    for split in ("train", "valid", "test"):
        pairs = io.read_table(lake.table(f"pairs/{split}"))
        exploded = pairs.select("user_idx", "event_ts", F.explode("hist").alias("h_item")).where("h_item > 0")
        joined = exploded.join(events, ["user_idx", "h_item"], "left")
        assert joined.where(F.col("h_ts").isNull()).count() == 0, "history item the user never rated"
        assert joined.where(F.col("h_ts") >= F.col("event_ts")).count() == 0, f"future leaked into {split}"
    full = io.read_table(lake.table("pairs/train")).where("prior_events >= 50")
    assert full.where("hist_len != 50 OR array_contains(hist, 0)").count() == 0


def test_no_negative_is_a_positive_of_its_user_and_the_mix_is_reported(ml_lake):
    from pyspark.sql import functions as F

    io, lake, report = ml_lake
    pairs = [io.read_table(lake.table(f"pairs/{s}")) for s in ("train", "valid", "test")]
    positives = pairs[0].select("user_idx", "item_idx")
    for frame in pairs[1:]:
        positives = positives.unionByName(frame.select("user_idx", "item_idx"))
    for frame in pairs:
        negs = frame.select("user_idx", F.explode("neg_item_idx").alias("item_idx"))
        assert negs.join(positives, ["user_idx", "item_idx"], "left_semi").count() == 0
    train_mix = report.negative_mix["train"]
    assert set(train_mix) == {"random", "popularity", "hard"}
    assert train_mix["random"] == 4 * 98_114  # ML users leave plenty of unseen items: no shortfall
