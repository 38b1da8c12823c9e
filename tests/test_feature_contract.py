"""The feature contract (lake_contract/feature_contract.py): one rule, both engines, both sides.

Literal rows through Spark SQL and DuckDB give the same, expected buckets and prefixes; the
unknown-item rule re-packs histories; and, on the MovieLens-100K lake, the serving query as
of every pairs/test row's event time is EXACTLY the input the evaluator reads from that
row (so the user vectors agree), and recommend's hit rate on those rows agrees with the
evaluator's.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lake_contract.feature_contract import bucket_sql, known_history, prefix_sql

VALUES = [None, -5.0, 0.0, 1.0, 1.5, 2.0, 3.99, 4.0, 1e9, float("nan")]
BOUNDARIES = (1.0, 2.0, 4.0)
EXPECTED_BUCKETS = [0, 1, 1, 2, 2, 3, 3, 4, 4, 4]  # null -> 0; NaN sorts above every number


def _duckdb_column(sql: str, values: list, sql_type: str) -> list:
    import duckdb
    import pyarrow as pa

    con = duckdb.connect()
    arrow_type = pa.float64() if sql_type == "DOUBLE" else pa.string()
    con.register("t", pa.table({"i": list(range(len(values))), "x": pa.array(values, arrow_type)}))
    return [r[0] for r in con.execute(f"SELECT {sql} FROM t ORDER BY i").fetchall()]


def test_known_history_drops_unknown_items_and_repacks():
    hist = np.array([[5, 31, 7, 0, 0], [40, 41, 0, 0, 0], [1, 2, 3, 4, 29], [0, 0, 0, 0, 0]])
    assert known_history(hist, num_items=30).tolist() == [
        [5, 7, 0, 0, 0], [0, 0, 0, 0, 0], [1, 2, 3, 4, 29], [0, 0, 0, 0, 0]]


def test_bucket_rule_is_one_rule_in_duckdb():
    assert _duckdb_column(bucket_sql("x", BOUNDARIES), VALUES, "DOUBLE") == EXPECTED_BUCKETS
    assert _duckdb_column(bucket_sql("x", ()), VALUES, "DOUBLE") == [0] + [1] * (len(VALUES) - 1)
    with pytest.raises(ValueError, match="finite"):
        bucket_sql("x", (1.0, math.inf))


@pytest.mark.spark
def test_spark_applies_the_same_bucket_and_prefix_rules(spark):
    from pyspark.sql import types as T

    from spark_features.features import bucketize, with_prefix_columns

    frame = spark.createDataFrame([(i, v) for i, v in enumerate(VALUES)],
                                  T.StructType([T.StructField("i", T.LongType()), T.StructField("x", T.DoubleType())]))
    got = [r["b"] for r in frame.select("i", bucketize("x", BOUNDARIES).alias("b")).orderBy("i").collect()]
    assert got == EXPECTED_BUCKETS
    codes = ["94110", "9", None, "ab-12"]
    users = spark.createDataFrame([(i, c) for i, c in enumerate(codes)],
                                  T.StructType([T.StructField("i", T.LongType()), T.StructField("zip", T.StringType())]))
    spark_prefixes = [r["zip_prefix"] for r in with_prefix_columns(users, "users", {"users.zip": 3}).orderBy("i").collect()]
    assert spark_prefixes == _duckdb_column(prefix_sql("x", 3), codes, "VARCHAR") == ["941", "9", None, "ab-"]


# ---------------------------------------------------------------------------------------------
# parity on MovieLens-100K


def _test_rows(lake_root: str):
    """The ml_lake's pairs/test snapshot, a schema over it, and per row (file order, as the
    evaluator streams it): user ids and event times."""
    from lake_contract.delta_snapshot import read_snapshot_arrow
    from lake_contract.vocab_registry import read_vocab_mapping
    from tests.tiny_lake import tiny_train_config
    from trainer.loop import prepare_run

    inputs = prepare_run(lake_root, tiny_train_config())
    rows = read_snapshot_arrow(inputs.test, ["user_idx", "item_idx", "event_ts"])
    mapping = read_vocab_mapping(lake_root, "user_id")
    return inputs, rows, mapping


@pytest.mark.spark
def test_serving_query_as_of_each_test_row_is_the_evaluator_input(ml_lake):
    from index_builder.queries import UserQueryBuilder
    from tests.tiny_lake import tiny_train_config
    from trainer.data import iter_eval_batches
    from trainer.towers import TwoTowerModel

    _io, lake, _report = ml_lake
    inputs, rows, mapping = _test_rows(lake.root)
    schema = inputs.schema
    assert "prior_events_bucket" in {f.name for f in schema.user_fields}
    id_of = {index: value for value, index in mapping.items()}
    user_ids = [id_of[i] for i in rows.column("user_idx").to_pylist()]
    as_of = rows.column("event_ts").to_pylist()
    batches = list(iter_eval_batches(inputs.test, schema))
    evaluator = {name: torch.cat([b.users[name] for b in batches]) for name in batches[0].users}
    seen_rows = [b.seen_values[b.seen_offsets[r]:b.seen_offsets[r + 1]].tolist()
                 for b in batches for r in range(len(b.seen_offsets) - 1)]
    assert evaluator["user_idx"].shape[0] == len(user_ids) == 943

    builder = UserQueryBuilder(lake.root, schema)
    try:
        queries = builder.build(user_ids, as_of=as_of)
    finally:
        builder.close()
    assert set(queries.inputs) == set(evaluator)
    for name, tensor in evaluator.items():
        mismatched = (queries.inputs[name] != tensor).reshape(len(user_ids), -1).any(dim=1)
        assert not mismatched.any(), f"{name}: {int(mismatched.sum())} rows differ, e.g. row {int(mismatched.nonzero()[0])}"
    assert [sorted(queries.seen(r).tolist()) for r in range(len(user_ids))] == [sorted(s) for s in seen_rows]

    torch.manual_seed(3)
    model = TwoTowerModel(tiny_train_config().model, schema).eval()
    with torch.no_grad():
        torch.testing.assert_close(model.embed_users(queries.inputs), model.embed_users(evaluator))


@pytest.mark.spark
def test_recommend_hit_rate_on_held_out_events_agrees_with_the_evaluator(ml_lake, tmp_path):
    """recommend (FAISS release, queries as of each test event) vs evaluate_split (exact,
    full catalog) on the same model and the same 943 held-out last events: HR@10 and HR@50
    within one standard error sqrt(p (1 - p) / n). Printed with -s."""
    import shutil

    from index_builder.faiss_index import IndexConfig
    from index_builder.item_index import build_item_index, index_root
    from index_builder.release import publish_release
    from index_builder.retrieval import Retriever, held_out_hit_ranks
    from lake_contract.lake import Lake
    from lake_contract.vocab_registry import read_vocab_mapping
    from tests.tiny_lake import tiny_train_config
    from trainer.artifacts import StagedModel
    from trainer.evaluation import evaluate_split
    from trainer.towers import TwoTowerModel

    _io, ml, _report = ml_lake
    root = tmp_path / "lake"
    shutil.copytree(ml.root.removeprefix("file://"), root,
                    ignore=shutil.ignore_patterns("models", "releases", "index", "embeddings"))
    lake = Lake(str(root))
    inputs, rows, mapping = _test_rows(lake.root)
    config = tiny_train_config()
    torch.manual_seed(11)
    model = TwoTowerModel(config.model, inputs.schema).eval()
    staged = StagedModel.start(lake.root, "m-parity")
    staged.save_weights(model.state_dict())
    staged.write_json("config.json", config.to_dict())
    (staged.folder / "schema.json").write_text(inputs.schema.to_json())
    staged.write_json("metrics.json", {"valid": {}, "history": [], "best_epoch": 0})
    staged.write_json("manifest.json", {"version": "m-parity", "table_versions": inputs.table_versions})
    model_dir = staged.commit()
    build_item_index(lake.root, "m-parity", "m-parity", IndexConfig(use_gpu="never", recall_target=1.0, recall_k=50),
                     say=lambda _s: None)
    publish_release(lake.root, "r-parity", {"model": model_dir, "index": index_root(lake.root) / "m-parity"},
                    {"model_version": "m-parity", "index_version": "m-parity", "metrics": {}})

    id_of = {index: value for value, index in mapping.items()}
    user_ids = [id_of[i] for i in rows.column("user_idx").to_pylist()]
    targets = np.asarray(rows.column("item_idx").to_numpy(), dtype=np.int64)
    retriever = Retriever(lake.root)
    try:
        recs = retriever.recommend(user_ids, 50, as_of=rows.column("event_ts").to_pylist()).table
    finally:
        retriever.close()
    hit_rank = held_out_hit_ranks(recs, user_ids, targets, read_vocab_mapping(lake.root, "item_id"))
    evaluated = evaluate_split(model, inputs.store, inputs.test, inputs.schema, (10, 50), torch.device("cpu"),
                               negatives_width=0, with_itempop=False)["model"]
    n = len(user_ids)
    for k in (10, 50):
        served = float((hit_rank <= k).mean())
        p = evaluated[f"hr@{k}"]
        se = math.sqrt(max(p * (1 - p), 1e-12) / n)
        print(f"\nHR@{k} on {n} held-out last events: recommend {served:.4f}, jobs.evaluate {p:.4f}, "
              f"|diff| {abs(served - p):.4f}, one SE {se:.4f}")
        assert abs(served - p) <= se, (k, served, p, se)


def test_multi_valued_user_fields_are_padded_alike_in_training_and_evaluation(tmp_path):
    """The Petastorm training path pads a multi-valued user field to the contract's width,
    exactly as the evaluation path (and serving) do: same (rows, 16) values per row."""
    import pyarrow as pa
    from deltalake import write_deltalake

    from lake_contract.delta_snapshot import resolve_snapshot
    from lake_contract.feature_contract import MULTI_VALUED_WIDTH
    from trainer.data import LoaderSettings, iter_eval_batches, train_batches
    from trainer.distributed import DistContext
    from trainer.feature_schema import FeatureSchema, FieldSpec

    rows = 40
    tags = [list(range(1, 1 + n % 20)) for n in range(rows)]  # 0 to 19 tags: some beyond the width
    tags[3] = None
    write_deltalake(str(tmp_path / "pairs"), pa.table({
        "user_idx": pa.array(np.arange(1, rows + 1), pa.int32()),
        "item_idx": pa.array(np.arange(rows) % 9 + 1, pa.int32()),
        "hist": pa.array([[1, 2, 0]] * rows, pa.list_(pa.int32())),
        "tags_idx": pa.array(tags, pa.list_(pa.int32())),
        "seen_items": pa.array([[1, 2]] * rows, pa.list_(pa.int32())),
    }))
    schema = FeatureSchema(num_users=rows + 1, num_items=10, num_categories=1, history_length=3,
                           user_fields=(FieldSpec("tags_idx", "multi_valued", 20),), item_fields=(),
                           table_versions={})
    snapshot = resolve_snapshot(str(tmp_path / "pairs"))
    expected = {u + 1: ((t or []) + [0] * MULTI_VALUED_WIDTH)[:MULTI_VALUED_WIDTH] for u, t in enumerate(tags)}
    settings = LoaderSettings(batch_size=rows, workers=1, shuffle_buffer=0, seed=0)
    with train_batches(snapshot, schema, DistContext(), settings, epoch=0) as batches:
        trained = list(batches)
    assert len(trained) == 1 and trained[0]["tags_idx"].shape == (rows, MULTI_VALUED_WIDTH)
    assert {int(u): t.tolist() for u, t in zip(trained[0]["user_idx"], trained[0]["tags_idx"], strict=True)} == expected
    (evaluated,) = list(iter_eval_batches(snapshot, schema))
    assert {int(u): t.tolist() for u, t in zip(evaluated.users["user_idx"], evaluated.users["tags_idx"],
                                               strict=True)} == expected
