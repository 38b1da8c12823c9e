"""jobs.build_index and jobs.publish on a tiny Spark-free lake (tests/tiny_lake.py).

Every expected value is computed on an independent path: item vectors through the
ItemFeatureStore (the trainer's evaluation path) instead of the job's streaming reader, user
queries from the lake's literal rows, recall from the saved index file against brute force.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch

from index_builder import item_index
from index_builder.embeddings import EMBEDDINGS_TABLE
from index_builder.faiss_index import exact_search, load_index, recall_at_k, search_index
from index_builder.release import current_release, list_releases, load_release
from jobs import build_index as build_job
from jobs import publish as publish_job
from lake_contract.delta_snapshot import open_table, read_table_deltars, resolve_snapshot
from lake_contract.lake import Lake
from tests.tiny_lake import item_id_of, make_tiny_lake, save_tiny_model, tiny_lake_rows
from tests.trainer_fixtures import NUM_ITEMS
from trainer.artifacts import load_model_dir
from trainer.item_store import load_item_store

REPO = Path(__file__).resolve().parents[1]
PQ_ARGS = ["--factory", "IVF{nlist},PQ2x4", "--recall-k", "5"]  # lossy codes: recall < 1 on 29 items


@pytest.fixture(scope="module")
def base_lake(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny") / "lake"
    make_tiny_lake(root)
    save_tiny_model(root, "m2", seed=1, parent="m1")
    return root


@pytest.fixture
def lake(base_lake, tmp_path) -> Path:
    root = tmp_path / "lake"
    shutil.copytree(base_lake, root)
    return root


def _build(lake: Path, *extra: str) -> dict:
    assert build_job.main(["--lake", str(lake), "--use-gpu", "never", *extra]) == 0
    version = extra[extra.index("--index-version") + 1] if "--index-version" in extra else (
        extra[extra.index("--model") + 1] if "--model" in extra else "m2")
    return json.loads((lake / "index" / version / "manifest.json").read_text())


def _publish_cli(lake: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jobs.publish", "--lake", str(lake), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def _item_tower_vectors(lake: Path, model: str) -> np.ndarray:
    """(NUM_ITEMS, d): row i = item i through the trainer's ItemFeatureStore path."""
    loaded = load_model_dir(lake / "models" / model)
    store = load_item_store(resolve_snapshot(Lake(str(lake)).table("features/items")), loaded.schema)
    idx = torch.arange(NUM_ITEMS)
    with torch.no_grad():
        return loaded.model.embed_items({"item_idx": idx, **store.features(idx)}).numpy()


def _user_queries(lake: Path, model: str) -> np.ndarray:
    """User-tower vectors of the pairs/valid rows, built from the tiny lake's literal rows."""
    rows = tiny_lake_rows()
    loaded = load_model_dir(lake / "models" / model)
    users = {"user_idx": torch.from_numpy(rows["users"]).long(), "hist": torch.from_numpy(rows["hist"]).long(),
             "gender_idx": torch.from_numpy(rows["gender"]).long(), "age_bucket": torch.from_numpy(rows["age"]).long()}
    with torch.no_grad():
        return loaded.model.embed_users(users).numpy()


# ---------------------------------------------------------------------------------------------
# embeddings/items


def test_embeddings_are_the_item_tower_outputs_one_row_per_item_and_a_rerun_replaces_its_partition(lake):
    _build(lake, "--model", "m1")
    uri = Lake(str(lake)).table(EMBEDDINGS_TABLE)
    table = read_table_deltars(uri)
    assert table.schema == pa.schema([("item_id", pa.string()), ("item_idx", pa.int64()),
                                      ("vector", pa.list_(pa.float32())), ("model_version", pa.string())])
    assert open_table(uri).metadata().partition_columns == ["model_version"]
    table = table.sort_by("item_idx")
    idx = table.column("item_idx").to_numpy()
    np.testing.assert_array_equal(idx, np.arange(1, NUM_ITEMS))  # every real item once, never index 0
    assert table.column("item_id").to_pylist() == [item_id_of(i) for i in idx]
    assert set(table.column("model_version").to_pylist()) == {"m1"}
    vectors = np.stack(table.column("vector").to_numpy(zero_copy_only=False)).astype(np.float32)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(vectors, _item_tower_vectors(lake, "m1")[idx], rtol=0, atol=1e-6)

    first_version = open_table(uri).version()
    _build(lake, "--model", "m1", "--force")  # same model again: its partition is replaced
    _build(lake, "--model", "m2")  # another model: a partition of its own
    again = read_table_deltars(uri)
    assert open_table(uri).version() == first_version + 2
    counts = dict(zip(*np.unique(again.column("model_version").to_numpy(zero_copy_only=False),
                                 return_counts=True), strict=True))
    assert counts == {"m1": NUM_ITEMS - 1, "m2": NUM_ITEMS - 1}
    m1_again = again.filter(pc.equal(again.column("model_version"), "m1")).sort_by("item_idx")
    np.testing.assert_array_equal(np.stack(m1_again.column("vector").to_numpy(zero_copy_only=False)), vectors)
    history = open_table(uri).history(2)
    assert history[1]["operationParameters"]["predicate"] == "model_version = 'm1'"
    assert not np.allclose(np.stack(again.filter(pc.equal(again.column("model_version"), "m2"))
                                    .column("vector").to_numpy(zero_copy_only=False))[:3], vectors[:3])


# ---------------------------------------------------------------------------------------------
# index/<version>/


def test_index_folder_maps_faiss_ids_to_item_ids_and_meets_the_recall_target(lake):
    manifest = _build(lake, "--model", "m1")
    folder = lake / "index" / "m1"
    assert sorted(p.name for p in folder.iterdir()) == ["id_map.parquet", "index.faiss", "index.json",
                                                        "manifest.json"]
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]
    id_map = pq.read_table(folder / "id_map.parquet")
    assert id_map.schema == pa.schema([("item_idx", pa.int64()), ("item_id", pa.string())])
    assert dict(zip(*id_map.to_pydict().values(), strict=True)) == {i: item_id_of(i) for i in range(1, NUM_ITEMS)}
    assert {"index_version", "model_version", "embeddings_table_version", "num_items", "dim", "nlist", "factory",
            "nprobe", "recall", "recall_k", "recall_target", "qps", "exact_qps", "curve", "build_seconds",
            "device"} <= set(manifest)
    assert (manifest["index_version"], manifest["model_version"], manifest["num_items"], manifest["dim"]) == (
        "m1", "m1", NUM_ITEMS - 1, 8)
    assert manifest["embeddings_table_version"] == open_table(Lake(str(lake)).table(EMBEDDINGS_TABLE)).version()
    assert manifest["device"] == "cpu" and manifest["num_queries"] == 19
    assert manifest["recall"] >= manifest["recall_target"] == 0.95 and manifest["reached"]

    # The saved index answers item indices, best first, exactly as brute force over the item tower.
    built = load_index(folder)
    assert built.nprobe == manifest["nprobe"]
    items = _item_tower_vectors(lake, "m1")[1:]
    ids = np.arange(1, NUM_ITEMS, dtype=np.int64)
    queries = _user_queries(lake, "m1")
    _, found = search_index(built, queries, 10)
    _, exact = exact_search(items, ids, queries, 10)
    np.testing.assert_array_equal(found, exact)


def test_recall_is_measured_on_user_queries_against_exact_search(lake):
    manifest = _build(lake, "--model", "m1", "--index-version", "pq", *PQ_ARGS)
    built = load_index(lake / "index" / "pq")
    items = _item_tower_vectors(lake, "m1")[1:]
    ids = np.arange(1, NUM_ITEMS, dtype=np.int64)

    def recall_for(queries: np.ndarray) -> float:
        _, found = search_index(built, queries, 5)
        return recall_at_k(found, exact_search(items, ids, queries, 5)[1])

    user_recall = recall_for(_user_queries(lake, "m1"))
    assert manifest["recall_k"] == 5 and 0 < manifest["recall"] < 1  # PQ codes lose neighbours
    assert manifest["recall"] == pytest.approx(user_recall, abs=1e-12)
    assert manifest["recall"] != pytest.approx(recall_for(items), abs=1e-6)  # not item vectors as queries
    assert [p[0] for p in manifest["curve"]] == [1] and manifest["curve"][0][1] == manifest["recall"]


def test_existing_index_needs_force_and_a_failed_build_leaves_the_old_index(lake, monkeypatch):
    before = _build(lake, "--model", "m1")
    with pytest.raises(ValueError, match=r"index version m1 already exists .* --force"):
        build_job.main(["--lake", str(lake), "--model", "m1", "--use-gpu", "never"])

    def crash(*_args, **_kwargs):
        raise OSError("disk full (injected)")

    monkeypatch.setattr(item_index, "write_id_map", crash)
    with pytest.raises(OSError, match="injected"):
        build_job.main(["--lake", str(lake), "--model", "m1", "--use-gpu", "never", "--force"])
    assert json.loads((lake / "index" / "m1" / "manifest.json").read_text()) == before
    assert sorted(p.name for p in (lake / "index").iterdir()) == ["m1"]  # no staging left behind


# ---------------------------------------------------------------------------------------------
# jobs.publish


def _releases(lake: Path) -> list[str]:
    return [r.version for r in list_releases(lake)]


def _gate_failure(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    return proc.stderr.strip().splitlines()[-1]


def test_index_recall_gate_blocks_publishing(lake):
    manifest = _build(lake, "--model", "m1", "--index-version", "pq", *PQ_ARGS, "--recall-target", "0.999")
    assert not manifest["reached"]
    last = _gate_failure(_publish_cli(lake, "--index", "pq"))
    assert last == f"error: publish: gate index_recall: recall@5={manifest['recall']:.4f}".rstrip("0") + \
        " < target 0.999"
    assert not (lake / "releases").exists() or _releases(lake) == []
    assert current_release(lake) is None


def test_model_worse_than_current_is_blocked_then_allowed_with_tolerance(lake):
    _build(lake, "--model", "m1")
    assert _publish_cli(lake, "--model", "m1", "--release-version", "r1").returncode == 0
    hr10 = json.loads((lake / "models" / "m1" / "metrics.json").read_text())["valid"]["model"]["hr@10"]
    save_tiny_model(lake, "m3", seed=0, parent="m1", valid_overrides={"hr@10": hr10 - 0.25})
    _build(lake, "--model", "m3")

    last = _gate_failure(_publish_cli(lake, "--model", "m3", "--metric", "hr@10", "--release-version", "r2"))
    assert last.startswith("error: publish: gate model_quality: valid hr@10=")
    assert f"worse than the current release's {hr10:.4f}".rstrip("0") in last
    assert last.endswith("by more than the tolerance 0.01")
    assert (lake / "releases" / "CURRENT").read_text() == "r1\n" and _releases(lake) == ["r1"]

    ok = _publish_cli(lake, "--model", "m3", "--metric", "hr@10", "--tolerance", "0.3", "--release-version", "r2")
    assert ok.returncode == 0, ok.stderr
    assert "CURRENT r1 -> r2" in ok.stdout
    assert current_release(lake).version == "r2"


def test_publish_writes_a_complete_release_and_rollback_switches_back(lake):
    index1 = _build(lake, "--model", "m1")
    _build(lake, "--model", "m2")
    assert publish_job.main(["--lake", str(lake), "--model", "m1", "--release-version", "r1"]) == 0
    proc = _publish_cli(lake, "--release-version", "r2")  # defaults: the newest model (m2) and its index
    assert proc.returncode == 0, proc.stderr
    assert "gate index_recall: recall@29=1.0000 >= target 0.9500: passed" in proc.stdout
    assert "current r1 has 1.0000, tolerance 0.01" in proc.stdout and "CURRENT r1 -> r2" in proc.stdout

    r1 = load_release(lake, "r1")  # verifies every file against its sha256
    model_manifest = json.loads((lake / "models" / "m1" / "manifest.json").read_text())
    metrics = json.loads((lake / "models" / "m1" / "metrics.json").read_text())
    m = r1.manifest
    assert (m["model_version"], m["parent"], m["index_version"]) == ("m1", None, "m1")
    assert m["table_versions"] == model_manifest["table_versions"]
    assert m["metrics"] == {"valid": metrics["valid"], "test": metrics["test"]}
    assert m["index"] == {k: index1[k] for k in ("nprobe", "recall", "recall_k", "recall_target", "qps",
                                                 "exact_qps", "nlist", "factory", "num_items", "dim")}
    assert m["gates"]["index_recall"]["passed"] and m["gates"]["model_quality"]["current"] is None
    assert load_release(lake, "r2").manifest["parent"] == "m1"
    folder = Path(r1.path)
    assert (folder / "model" / "weights.pt").read_bytes() == (lake / "models" / "m1" / "weights.pt").read_bytes()
    assert (folder / "index" / "id_map.parquet").is_file() and (folder / "index" / "index.faiss").is_file()
    load_model_dir(folder / "model")  # the release's model copy loads on its own

    back = _publish_cli(lake, "--rollback")
    assert back.returncode == 0, back.stderr
    assert back.stdout.startswith("rollback: CURRENT r2 -> r1")
    assert (lake / "releases" / "CURRENT").read_text() == "r1\n"
    assert publish_job.main(["--lake", str(lake), "--rollback", "r2"]) == 0
    assert current_release(lake).version == "r2"
    listed = _publish_cli(lake, "--list").stdout.splitlines()
    assert [line[:4] for line in listed[1:]] == ["  r1", "* r2"]
    unknown = _gate_failure(_publish_cli(lake, "--rollback", "r9"))
    assert unknown.startswith("error: publish: unknown release version 'r9'")


# ---------------------------------------------------------------------------------------------
# job contract


def test_help_needs_no_torch_and_bad_input_exits_2_with_a_reason(tmp_path):
    code = ("import sys, jobs.build_index as b, jobs.publish as p\n"
            "b.build_parser().format_help(); p.build_parser().format_help()\n"
            "for argv in (['--tolerance', '-1'], ['--metric', 'hr50'], ['--keep', '0']):\n"
            "    try:\n        p.parse_config(argv)\n    except ValueError as e:\n        print(e)\n"
            "assert 'torch' not in sys.modules and 'faiss' not in sys.modules, 'heavy import'")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "--tolerance must be a number >= 0, got -1.0",
        "--metric must be hr@K, recall@K, ndcg@K or auc (e.g. hr@50), got 'hr50'",
        "--keep must be >= 1, got 0",
    ]
    empty = subprocess.run([sys.executable, "-m", "jobs.build_index", "--lake", str(tmp_path)], cwd=REPO,
                           capture_output=True, text=True, timeout=120)
    assert empty.returncode == 2
    assert empty.stderr.strip().splitlines()[-1] == (f"error: build_index: no model under {tmp_path.as_uri()}/models: "
                                                    "run `python -m jobs.train` first")
