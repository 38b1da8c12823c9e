"""Serving and indexing read the served model's data, not the newest feature build.

A real lake (ingest + full build), a model over it, its index and release; then a SECOND
full build with other user ages moves the quantile bucket boundaries of ``users.age`` (and
so ``features/users.age_bucket``) while that first model stays CURRENT. Recommendations,
the query tensors and the item embeddings for the first model must be exactly what they
were; a builder reading the newest tables (what serving did before) sees other inputs, so
the test would fail without the pin. Manifests that cannot name their data are refused
with the model and the table in the message.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.test_build_features import DAY1, _ingest

pytestmark = pytest.mark.spark

USERS = [f"u{n}" for n in range(1, 9)]
ITEMS = [(f"i{n}", ("a|b", "b", "c", "a|c")[n % 4]) for n in range(1, 13)]
# Every user: 6 positives over two days, items chosen by a fixed pattern (ties included).
EVENTS = [(u, f"i{(3 * k + 2 * j) % 12 + 1}", DAY1 + 3600 * j + 60 * k + (k % 2) * 7, 5)
          for k, u in enumerate(USERS) for j in range(6)]
AGES_FIRST = [(u, "FM"[k % 2], 18 + 4 * k) for k, u in enumerate(USERS)]
AGES_SECOND = [(u, "FM"[k % 2], 60 - 9 * (k % 4) + k) for k, u in enumerate(USERS)]


def _config():
    from lake_contract.feature_config import FeatureConfig

    return FeatureConfig(history_length=3, negatives="random:1", numeric_buckets=3)


def _save_model(lake_root: str, version: str) -> Path:
    """A seeded (untrained) model over the lake's current pairs, saved the way jobs.train
    saves one: its manifest's table_versions come from ``prepare_run``."""
    from tests.tiny_lake import tiny_train_config
    from trainer.artifacts import StagedModel
    from trainer.loop import prepare_run
    from trainer.towers import TwoTowerModel

    config = tiny_train_config()
    inputs = prepare_run(lake_root, config)
    torch.manual_seed(7)
    model = TwoTowerModel(config.model, inputs.schema).eval()
    staged = StagedModel.start(lake_root, version)
    staged.save_weights(model.state_dict())
    staged.write_json("config.json", config.to_dict())
    (staged.folder / "schema.json").write_text(inputs.schema.to_json())
    staged.write_json("metrics.json", {"valid": {}, "history": [], "best_epoch": 0})
    staged.write_json("manifest.json", {"version": version, "kind": "full", "parent": None,
                                        "table_versions": inputs.table_versions})
    return staged.commit()


def _boundaries(lake_root: str, version: int | None = None) -> list[float]:
    from lake_contract.delta_snapshot import read_table_deltars

    rows = read_table_deltars(f"{lake_root}/features/spec", version).to_pylist()
    return next(r["boundaries"] for r in rows if r["table"] == "users" and r["column"] == "age")


@pytest.fixture(scope="module")
def two_builds(spark, tmp_path_factory):
    from index_builder.embeddings import read_item_embeddings
    from index_builder.faiss_index import IndexConfig
    from index_builder.item_index import build_item_index, index_root
    from index_builder.release import publish_release
    from index_builder.retrieval import Retriever
    from lake_contract.lake import Lake
    from spark_features.delta_io import DeltaLakeIO
    from spark_features.training_data import build_training_data

    work = tmp_path_factory.mktemp("pinned")
    root = work / "lake"
    lake = Lake(str(root))
    _ingest(spark, root, work / "first", EVENTS, AGES_FIRST, ITEMS)
    build_training_data(spark, DeltaLakeIO(spark), lake, _config(), say=lambda _s: None)
    model_dir = _save_model(lake.root, "m1")
    first_index = build_item_index(lake.root, "m1", "m1", IndexConfig(use_gpu="never"), say=lambda _s: None)
    first_vectors = read_item_embeddings(lake.root, "m1")
    publish_release(lake.root, "r1", {"model": model_dir, "index": index_root(lake.root) / "m1"},
                    {"model_version": "m1", "index_version": "m1", "metrics": {}})
    retriever = Retriever(lake.root)
    try:
        first = {"recs": retriever.recommend(USERS, 5).table.to_pylist(),
                 "inputs": {k: v.clone() for k, v in retriever.queries.build(USERS).inputs.items()},
                 "tables": retriever.describe()["tables"]}
    finally:
        retriever.close()
    boundaries_first = _boundaries(lake.root)
    spec_first = json.loads((model_dir / "manifest.json").read_text())["table_versions"]["features/spec"]

    _ingest(spark, root, work / "second", EVENTS, AGES_SECOND, ITEMS, batch="c")
    build_training_data(spark, DeltaLakeIO(spark), lake, _config(), say=lambda _s: None)
    return {"lake": lake, "model_dir": model_dir, "first": first, "first_index": first_index,
            "first_vectors": first_vectors, "boundaries": (boundaries_first, _boundaries(lake.root)),
            "spec_first": spec_first}


def test_second_build_moved_the_boundaries_and_the_newest_inputs_differ(two_builds):
    """The premise: without the pin the first model would see other age buckets."""
    from index_builder.queries import UserQueryBuilder
    from trainer.artifacts import load_model_dir

    first, second = two_builds["boundaries"]
    assert first != second
    assert _boundaries(two_builds["lake"].root, two_builds["spec_first"]) == first
    schema = load_model_dir(two_builds["model_dir"]).schema
    newest = UserQueryBuilder(two_builds["lake"].root, schema)
    try:
        age_now = newest.build(USERS).inputs["age_bucket"]
    finally:
        newest.close()
    assert not torch.equal(age_now, two_builds["first"]["inputs"]["age_bucket"])


def test_recommend_for_the_current_model_is_unchanged_after_the_second_build(two_builds):
    from index_builder.retrieval import Retriever

    retriever = Retriever(two_builds["lake"].root)
    try:
        recs = retriever.recommend(USERS, 5).table.to_pylist()
        inputs = retriever.queries.build(USERS).inputs
        tables = retriever.describe()["tables"]
    finally:
        retriever.close()
    first = two_builds["first"]
    assert [(r["user_id"], r["rank"], r["item_id"]) for r in recs] == \
        [(r["user_id"], r["rank"], r["item_id"]) for r in first["recs"]]
    assert [r["score"] for r in recs] == [r["score"] for r in first["recs"]]
    assert set(inputs) == set(first["inputs"])
    for name, tensor in inputs.items():
        assert torch.equal(tensor, first["inputs"][name]), name
    manifest = json.loads((two_builds["model_dir"] / "manifest.json").read_text())["table_versions"]
    for table in ("features/users", "features/items"):
        assert tables[table] == first["tables"][table] == manifest[table], table


def test_build_index_for_the_first_model_reads_its_own_tables(two_builds):
    from index_builder.embeddings import read_item_embeddings
    from index_builder.faiss_index import IndexConfig
    from index_builder.item_index import build_item_index
    from lake_contract.delta_snapshot import table_version

    lake = two_builds["lake"]
    manifest = json.loads((two_builds["model_dir"] / "manifest.json").read_text())["table_versions"]
    assert table_version(lake.table("features/items")) > manifest["features/items"]
    report = build_item_index(lake.root, "m1", "m1-again", IndexConfig(use_gpu="never"), say=lambda _s: None)
    assert report.read == two_builds["first_index"].read == {"features/items": manifest["features/items"],
                                                              "pairs/valid": manifest["pairs/valid"]}
    idx, vectors, ids = read_item_embeddings(lake.root, "m1")
    idx0, vectors0, ids0 = two_builds["first_vectors"]
    np.testing.assert_array_equal(idx, idx0)
    np.testing.assert_array_equal(vectors, vectors0)
    assert ids.to_pylist() == ids0.to_pylist()


def test_growing_the_first_model_onto_moved_boundaries_is_refused(two_builds):
    """grown_to compares sizes only; equal sizes with moved boundaries must not warm-start."""
    from lake_contract.delta_snapshot import table_version
    from trainer.artifacts import load_model_dir
    from trainer.growth import check_bucket_boundaries

    lake, loaded = two_builds["lake"], load_model_dir(two_builds["model_dir"])
    parent = loaded.manifest["table_versions"]
    now = {"features/spec": table_version(lake.table("features/spec"))}
    first, second = two_builds["boundaries"]
    with pytest.raises(ValueError, match=rf"bucket boundaries of \['age_bucket'\] moved between features/spec@v"
                                         rf"{parent['features/spec']} \(the parent's\) and @v{now['features/spec']}"):
        check_bucket_boundaries(lake.root, parent, now, loaded.schema)
    check_bucket_boundaries(lake.root, parent, dict(parent), loaded.schema)  # same version: nothing to check
    assert len(first) == len(second)  # the sizes alone would not have shown it


def _copy_model(two_builds, version: str, edit) -> Path:
    source = two_builds["model_dir"]
    target = source.parent / version
    shutil.copytree(source, target)
    manifest = json.loads((target / "manifest.json").read_text())
    manifest["version"] = version
    edit(manifest["table_versions"])
    (target / "manifest.json").write_text(json.dumps(manifest))
    return target


def test_a_manifest_without_the_table_or_with_a_missing_version_is_refused(two_builds):
    from index_builder.faiss_index import IndexConfig
    from index_builder.item_index import build_item_index
    from trainer.artifacts import ModelDataError, load_model_dir, model_snapshot

    lake = two_builds["lake"]
    path = _copy_model(two_builds, "m-old", lambda v: v.pop("features/items"))
    with pytest.raises(ModelDataError, match=r"model m-old records no version of features/items"):
        build_item_index(lake.root, "m-old", "m-old", IndexConfig(use_gpu="never"), say=lambda _s: None)
    path = _copy_model(two_builds, "m-gone", lambda v: v.update({"features/users": 99}))
    with pytest.raises(ModelDataError, match=r"model m-gone was trained on features/users@v99, which the lake"):
        model_snapshot(lake.root, load_model_dir(path), "features/users")


def test_a_vacuumed_version_is_refused_by_recommend(two_builds, tmp_path):
    """Runs last in this module: it vacuums a copy of the lake (the other tests read the original)."""
    from deltalake import DeltaTable

    from index_builder.retrieval import Retriever
    from trainer.artifacts import ModelDataError

    copy = tmp_path / "lake"
    shutil.copytree(Path(two_builds["model_dir"]).parents[1], copy)
    DeltaTable(str(copy / "features/users")).vacuum(retention_hours=0, enforce_retention_duration=False,
                                                    dry_run=False)
    with pytest.raises(ModelDataError, match=r"model m1 was trained on features/users@v0, whose data files"):
        Retriever(str(copy))
