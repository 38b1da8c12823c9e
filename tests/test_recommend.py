"""Retrieval over the CURRENT release (index_builder/queries.py, retrieval.py, recommendation_writer.py, jobs/recommend.py).

A tiny Spark-free lake (tests/tiny_lake.py) gets a release built here the way build_index +
publish make one: every item through the saved model's item tower, an IVF-Flat index whose
tuned nprobe is nlist (a full scan, i.e. exact), the id map and manifests. Every expected
value is computed independently: histories from the lake's literal rows, seen sets from
bronze, top-K by numpy brute force over unseen items, popularity from features/items.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from deltalake import write_deltalake

from index_builder.faiss_index import IndexConfig, build_index, save_index
from index_builder.queries import UserQueryBuilder
from index_builder.release import publish_release
from index_builder.release_negatives import mine_release_negatives, ranked_slice
from index_builder.retrieval import NO_RELEASE_MESSAGE, NoReleaseError, Retriever, csr_rows, drop_seen_top_k
from jobs import recommend as recommend_job
from lake_contract.delta_snapshot import read_snapshot_arrow, read_table_deltars, resolve_snapshot
from lake_contract.feature_config import ACTIVITY_BOUNDARIES
from lake_contract.lake import Lake
from tests.tiny_lake import item_id_of, make_tiny_lake, user_id_of
from trainer.artifacts import load_model_dir
from trainer.feature_schema import FieldSpec
from trainer.item_store import load_item_store

REPO = Path(__file__).resolve().parents[1]
RELEASE = "r1"


def publish_tiny_release(root: Path, model_path: Path, work: Path) -> dict:
    """Embed every item with the model, build an exact (nprobe = nlist) IVF index, publish."""
    loaded = load_model_dir(model_path)
    store = load_item_store(resolve_snapshot(Lake(str(root)).table("features/items")), loaded.schema)
    item_idx = torch.from_numpy(np.flatnonzero(store.valid.numpy()))
    with torch.no_grad():
        vectors = loaded.model.embed_items({"item_idx": item_idx, **store.features(item_idx)}).numpy()
    ids = item_idx.numpy().astype(np.int64)
    built = build_index(vectors, ids, IndexConfig(use_gpu="never"))
    built.set_nprobe(built.nlist)
    index_dir = work / "index"
    save_index(built, index_dir)
    pq.write_table(pa.table({"item_idx": pa.array(ids, pa.int64()),
                             "item_id": pa.array([item_id_of(i) for i in ids], pa.string())}),
                   index_dir / "id_map.parquet")
    (index_dir / "manifest.json").write_text(json.dumps({"nprobe": built.nlist, "recall": 1.0, "recall_k": 10}))
    publish_release(str(root), RELEASE, {"model": model_path, "index": index_dir},
                    {"model_version": "m1", "index_version": "i1", "metrics": {}})
    return {"vectors": vectors, "ids": ids, "model": loaded}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    work = tmp_path_factory.mktemp("recommend")
    root = work / "lake"
    lake = make_tiny_lake(root)
    release = publish_tiny_release(root, Path(lake["model_path"]), work)
    return {"root": root, "lake": lake, **release}


@pytest.fixture(scope="module")
def retriever(served):
    r = Retriever(str(served["root"]), device="cpu")
    yield r
    r.close()


def bronze_seen(root: Path) -> dict[str, set[int]]:
    """user_id -> item indices of every bronze event (vocab lookup in Python: the reference)."""
    lake = Lake(str(root))
    vocab = read_snapshot_arrow(resolve_snapshot(lake.table("vocab/item_id")), ["value", "index"]).to_pylist()
    index_of = {row["value"]: row["index"] for row in vocab}
    seen: dict[str, set[int]] = {}
    for row in read_table_deltars(lake.table("bronze/interactions")).to_pylist():
        if row["item_id"] in index_of:
            seen.setdefault(row["user_id"], set()).add(index_of[row["item_id"]])
    return seen


def expected_history(lake: dict, row: int, n: int) -> list[int]:
    """tiny_lake's bronze order: the held-out target is the newest event, then hist[0], hist[1]..."""
    items = [int(lake["targets"][row]), *[int(i) for i in lake["hist"][row] if i > 0]]
    return (items + [0] * n)[:n]


# ---------------------------------------------------------------------------------------------
# pure helpers


def test_drop_seen_top_k_literal_rows():
    ids = np.array([[5, 3, 9, 1, -1], [2, 4, 6, 8, 10]], dtype=np.int64)
    offsets, values = np.array([0, 2, 2]), np.array([3, 9])  # row 0 saw 3 and 9, row 1 nothing
    keep, count = drop_seen_top_k(ids, offsets, values, k=2)
    assert keep.tolist() == [[True, False, False, True, False], [True, True, False, False, False]]
    assert count.tolist() == [2, 2]
    keep, count = drop_seen_top_k(ids, offsets, values, k=4)
    assert count.tolist() == [2, 4]  # -1 (nothing found) never counts
    sub_offsets, sub_values = csr_rows(np.array([0, 2, 2, 5]), np.array([1, 2, 7, 8, 9]), np.array([2, 0]))
    assert sub_offsets.tolist() == [0, 3, 5] and sub_values.tolist() == [7, 8, 9, 1, 2]


def test_bucket_sql_is_the_feature_rule_in_duckdb():
    import duckdb

    from lake_contract.feature_contract import bucket_sql

    counts = [0, 1, 3, 4, 1000, None]
    expected = [1 + sum(b <= c for b in ACTIVITY_BOUNDARIES) if c is not None else 0 for c in counts]
    got = duckdb.sql(f"SELECT {bucket_sql('x', ACTIVITY_BOUNDARIES)} AS b FROM "
                     "(SELECT unnest([0, 1, 3, 4, 1000, NULL]) AS x, generate_subscripts([0, 1, 3, 4, 1000, NULL], 1) "
                     "AS i) ORDER BY i").fetchall()
    assert [r[0] for r in got] == expected == [1, 2, 3, 4, 11, 0]

# ---------------------------------------------------------------------------------------------
# queries


def test_user_queries_match_bronze_and_features(served, tmp_path):
    root, lake, schema = served["root"], served["lake"], served["model"].schema
    # A features/spec with its own boundaries, and a schema that also reads prior_events_bucket:
    # the bucket must come from the spec's pairs row, not the default boundaries.
    spec_root = tmp_path / "lake"
    shutil.copytree(root, spec_root)
    write_deltalake(str(spec_root / "features/spec"), pa.table({
        "table": ["pairs", "users"], "column": ["prior_events", "n_events"],
        "feature": ["prior_events_bucket", "n_events_bucket"], "kind": ["bucket", "bucket"],
        "vocab": pa.array([None, None], pa.string()),
        "boundaries": pa.array([[1.0, 4.0, 6.0], [100.0]], pa.list_(pa.float64())),
    }))
    from dataclasses import replace

    schema = replace(schema, user_fields=(*schema.user_fields, FieldSpec("prior_events_bucket", "bucket", 5)))
    builder = UserQueryBuilder(str(spec_root), schema)
    users = [*lake["user_ids"], "nobody"]
    queries = builder.build(users)
    features = {r["user_id"]: r for r in read_table_deltars(Lake(str(root)).table("features/users")).to_pylist()}
    seen = bronze_seen(root)
    n = schema.history_length
    for row, user in enumerate(lake["user_ids"]):
        assert queries.user_idx[row] == row + 1 and user == user_id_of(row + 1)
        assert queries.inputs["hist"][row].tolist() == expected_history(lake, row, n)
        assert queries.inputs["gender_idx"][row] == features[user]["gender_idx"]
        assert queries.inputs["age_bucket"][row] == features[user]["age_bucket"]
        assert set(queries.seen(row).tolist()) == seen[user]
        assert queries.n_events[row] == len(seen[user])  # tiny lake: no repeated items
        assert queries.inputs["prior_events_bucket"][row] == 1 + sum(b <= len(seen[user]) for b in (1, 4, 6))
    assert not queries.known[-1] and queries.seen(len(users) - 1).size == 0
    assert all(int(t[-1].abs().sum()) == 0 for t in queries.inputs.values())
    builder.close()


def test_history_ties_repeats_and_unknown_items(served, tmp_path):
    """Same-time events: larger item_idx first; a repeated item appears twice in hist but once
    in seen; an item missing from vocab/item_id is ignored (as the feature build drops it)."""
    root = tmp_path / "lake"
    shutil.copytree(served["root"], root)
    lake, row = served["lake"], 0
    user = lake["user_ids"][row]
    old = int(lake["hist"][row][0])
    at = pa.array([datetime(2026, 6, 1, tzinfo=UTC)] * 4, pa.timestamp("us", tz="UTC"))
    write_deltalake(str(root / "bronze/interactions"), pa.table({
        "user_id": [user] * 4, "item_id": [item_id_of(3), item_id_of(17), item_id_of(old), "not-in-vocab"],
        "rating": [5.0] * 4, "event_ts": at, "event_date": pa.array([datetime(2026, 6, 1).date()] * 4, pa.date32()),
    }), mode="append", partition_by=["event_date"])
    schema = served["model"].schema
    queries = UserQueryBuilder(str(root), schema).build([user])
    before = expected_history(lake, row, schema.history_length)
    newest = sorted([3, 17, old], reverse=True)
    assert queries.inputs["hist"][0].tolist() == (newest + before)[: schema.history_length]
    assert set(queries.seen(0).tolist()) == set(before) - {0} | {3, 17}
    assert len(queries.seen(0)) == len(set(queries.seen(0).tolist()))
    assert queries.n_events[0] == len(set(before) - {0}) + 3


# ---------------------------------------------------------------------------------------------
# recommend


def brute_force_top_k(served, user_vector: np.ndarray, seen: set[int], k: int) -> tuple[list[int], np.ndarray]:
    scores = served["vectors"] @ user_vector
    order = [int(i) for i in np.argsort(-scores, kind="stable") if int(served["ids"][i]) not in seen][:k]
    return [int(served["ids"][i]) for i in order], scores[order]


def reference_user_vectors(served) -> np.ndarray:
    """Every tiny-lake user's tower output, built independently from the lake's literal rows."""
    root, lake = served["root"], served["lake"]
    users = lake["user_ids"]
    features = {r["user_id"]: r for r in read_table_deltars(Lake(str(root)).table("features/users")).to_pylist()}
    n = served["model"].schema.history_length
    with torch.no_grad():
        return served["model"].model.embed_users({
            "user_idx": torch.arange(1, len(users) + 1),
            "hist": torch.tensor([expected_history(lake, r, n) for r in range(len(users))]),
            "gender_idx": torch.tensor([features[u]["gender_idx"] for u in users]),
            "age_bucket": torch.tensor([features[u]["age_bucket"] for u in users]),
        }).numpy()


@pytest.mark.parametrize("max_extra", [2048, 0])  # 0: the first search is too short, rows are re-searched
def test_recommend_is_exact_top_k_of_unseen_items(served, max_extra):
    root, lake, k = served["root"], served["lake"], 10
    retriever = Retriever(str(root), device="cpu", max_extra=max_extra)
    users = lake["user_ids"]
    result = retriever.recommend(users, k)
    assert result.unknown_users == [] and result.messages == []
    assert result.table.num_rows == len(users) * k
    rows = result.table.to_pylist()
    seen = bronze_seen(root)
    vectors = reference_user_vectors(served)
    item_id_to_idx = {item_id_of(i): i for i in served["ids"]}
    for row, user in enumerate(users):
        mine = [r for r in rows if r["user_id"] == user]
        assert [r["rank"] for r in mine] == list(range(1, k + 1))
        got = [item_id_to_idx[r["item_id"]] for r in mine]
        assert not set(got) & seen[user], f"{user} was recommended items they interacted with"
        want_ids, want_scores = brute_force_top_k(served, vectors[row], seen[user], k)
        assert got == want_ids
        scores = np.array([r["score"] for r in mine], dtype=np.float32)
        np.testing.assert_allclose(scores, want_scores, rtol=0, atol=1e-5)
        assert (np.diff(scores) <= 0).all()
        assert all(r["title"] == f"Tiny Movie {item_id_to_idx[r['item_id']]} ({1990 + item_id_to_idx[r['item_id']]})"
                   for r in mine)
    retriever.close()


def test_unknown_user_gets_unseen_popular_items_with_a_message(served, tmp_path):
    root = tmp_path / "lake"
    shutil.copytree(served["root"], root)
    popular = read_table_deltars(Lake(str(root)).table("features/items")).to_pylist()
    popular.sort(key=lambda r: (-r["n_positives"], r["item_idx"]))
    ranking = [r["item_idx"] for r in popular]
    # A user who arrived after the feature build: not in vocab/user_id but with bronze events.
    newcomer_items = ranking[:2]
    write_deltalake(str(root / "bronze/interactions"), pa.table({
        "user_id": ["newcomer", "newcomer"], "item_id": [item_id_of(i) for i in newcomer_items],
        "rating": [5.0, 4.0], "event_ts": pa.array([datetime(2026, 3, 1, tzinfo=UTC)] * 2, pa.timestamp("us", tz="UTC")),
        "event_date": pa.array([datetime(2026, 3, 1).date()] * 2, pa.date32()),
    }), mode="append", partition_by=["event_date"])
    retriever = Retriever(str(root), device="cpu")
    result = retriever.recommend(["ghost", "newcomer", served["lake"]["user_ids"][0]], 5)
    retriever.close()
    assert result.unknown_users == ["ghost", "newcomer"]
    assert len(result.messages) == 2 and "'ghost' is not in vocab/user_id" in result.messages[0]
    assert "most popular" in result.messages[0]
    rows = result.table.to_pylist()
    ghost = [r for r in rows if r["user_id"] == "ghost"]
    newcomer = [r for r in rows if r["user_id"] == "newcomer"]
    assert [r["item_id"] for r in ghost] == [item_id_of(i) for i in ranking[:5]]
    assert [r["item_id"] for r in newcomer] == [item_id_of(i) for i in ranking[2:7]]  # seen ones skipped
    assert all(r["score"] != r["score"] for r in ghost + newcomer)  # NaN
    assert [r["rank"] for r in ghost] == [1, 2, 3, 4, 5]
    known = [r for r in rows if r["user_id"] == served["lake"]["user_ids"][0]]
    assert len(known) == 5 and all(r["score"] == r["score"] for r in known)


def test_k_beyond_the_catalog_is_a_clear_error(retriever):
    with pytest.raises(ValueError, match=r"k must be an int in \[1, 29\]"):
        retriever.recommend(["u101"], 30)


# ---------------------------------------------------------------------------------------------
# the job


def test_job_prints_a_table_for_one_user(served, capsys):
    user = served["lake"]["user_ids"][0]
    assert recommend_job.main(["--lake", str(served["root"]), "--user-id", user, "--user-id", "ghost",
                               "--k", "3"]) == 0
    out = capsys.readouterr().out
    assert f"release {RELEASE} (model m1, index i1, 29 items, nprobe 1/1" in out
    assert f"user {user}: top 3 (model)" in out and "user ghost: top 3 (popular fallback)" in out
    assert "rank  item_id" in out and "Tiny Movie" in out
    assert "note: user 'ghost' is not in vocab/user_id" in out


def test_batch_modes_write_the_delta_table(served, tmp_path):
    root = served["root"]
    users = served["lake"]["user_ids"]
    k = 4
    assert recommend_job.main(["--lake", str(root), "--all-users", "--k", str(k), "--batch-users", "7",
                               "--output", "recs_all"]) == 0
    table = read_table_deltars(Lake(str(root)).table("recs_all"))
    assert table.schema.names == ["user_id", "item_id", "rank", "score", "release_version"]
    assert [str(t) for t in table.schema.types] == ["string", "string", "int32", "float", "string"]
    assert table.num_rows == len(users) * k
    rows = table.to_pylist()
    assert sorted({r["user_id"] for r in rows}) == sorted(users)
    for user in users:
        assert sorted(r["rank"] for r in rows if r["user_id"] == user) == list(range(1, k + 1))
    assert {r["release_version"] for r in rows} == {RELEASE}

    users_file = tmp_path / "users.txt"
    users_file.write_text(f"# a comment\n{users[0]}\n\n{users[1]}\nghost\n{users[0]}\n")
    assert recommend_job.main(["--lake", str(root), "--users-file", str(users_file), "--k", str(k),
                               "--output", "recs_all"]) == 0
    rows = read_table_deltars(Lake(str(root)).table("recs_all")).to_pylist()
    assert len(rows) == 3 * k  # overwritten, duplicates in the file answered once
    assert {r["user_id"] for r in rows} == {users[0], users[1], "ghost"}
    assert all(r["score"] != r["score"] for r in rows if r["user_id"] == "ghost")


def test_no_release_is_exit_2_with_the_next_step(tmp_path):
    lake = make_tiny_lake(tmp_path / "lake", model_version=None)
    with pytest.raises(NoReleaseError, match="no published release"):
        Retriever(lake["root"])
    proc = subprocess.run([sys.executable, "-m", "jobs.recommend", "--lake", lake["root"], "--user-id", "u101"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == f"error: recommend: {NO_RELEASE_MESSAGE}"


def test_help_and_config_errors_without_torch():
    code = ("import sys, jobs.recommend as r; r.build_parser().format_help(); "
            "bad = [['--k', '3'], ['--user-id', 'a', '--all-users'], ['--user-id', 'a', '--k', '0']]\n"
            "for argv in bad:\n"
            "    try:\n        r.parse_config(argv)\n    except ValueError as e:\n        print(e)\n"
            "assert 'torch' not in sys.modules and 'faiss' not in sys.modules")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("pick exactly one of --user-id, --users-file, --all-users, got 0")
    assert lines[1].startswith("pick exactly one") and "--user-id, --all-users" in lines[1]
    assert lines[2] == "--k must be >= 1, got 0"


# ---------------------------------------------------------------------------------------------
# release-ranked hard negatives (index_builder/release_negatives.py)


def test_mined_release_negatives_are_exactly_ranks_first_to_last_of_the_unseen_brute_force_order(served, tmp_path):
    root = tmp_path / "lake"
    shutil.copytree(served["root"], root)
    mined = mine_release_negatives(str(root), first_rank=5, last_rank=12, batch_users=7)  # 3 batches
    lake = served["lake"]
    assert (mined.release_version, mined.first_rank, mined.last_rank) == (RELEASE, 5, 12)
    rows = read_table_deltars(mined.table_uri).to_pylist()
    by_user = {r["user_idx"]: r for r in rows}
    assert len(by_user) == len(rows) == len(lake["user_ids"]) == mined.users
    seen = bronze_seen(root)
    vectors = reference_user_vectors(served)
    for row, user in enumerate(lake["user_ids"]):
        want, _ = brute_force_top_k(served, vectors[row], seen[user], 12)
        assert by_user[row + 1]["items"] == want[4:12], user
        assert by_user[row + 1]["release_version"] == RELEASE and by_user[row + 1]["first_rank"] == 5
        assert not set(by_user[row + 1]["items"]) & seen[user]
    assert mined.candidates == sum(len(r["items"]) for r in rows) == 8 * len(rows)
    again = mine_release_negatives(str(root), first_rank=5, last_rank=12)  # re-run: one overwrite, same rows
    assert again.table_version == mined.table_version + 1
    assert sorted(read_table_deltars(again.table_uri).to_pylist(), key=lambda r: r["user_idx"]) == sorted(
        rows, key=lambda r: r["user_idx"])


def test_mining_without_a_release_writes_nothing_and_bad_ranks_are_refused(served, tmp_path):
    root = tmp_path / "lake"
    make_tiny_lake(root)
    assert mine_release_negatives(str(root)) is None
    assert not (root / "negatives").exists()
    for first, last in ((0, 10), (20, 10)):
        with pytest.raises(ValueError, match="1 <= first_rank <= last_rank"):
            mine_release_negatives(str(served["root"]), first_rank=first, last_rank=last)


def test_ranked_slice_keeps_only_valid_slots():
    ids = np.array([[9, 8, 7, 6, 5], [4, 3, -1, -1, -1], [1, 2, 3, 4, -1]], dtype=np.int64)
    offsets, values = ranked_slice(ids, np.array([5, 2, 4]), first_rank=2, last_rank=4)
    assert offsets.tolist() == [0, 3, 4, 7] and values.tolist() == [8, 7, 6, 3, 2, 3, 4]
