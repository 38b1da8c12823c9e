"""IVF index build/tune/save against brute force on seeded clustered vectors (no Spark, no torch)."""

from __future__ import annotations

import itertools
import json

import faiss
import numpy as np
import pytest

from index_builder.faiss_index import (
    BuiltIndex,
    IndexConfig,
    build_index,
    choose_nlist,
    exact_search,
    load_index,
    recall_at_k,
    save_index,
    search_index,
    tune_nprobe,
)

N_ITEMS, DIM, N_CLUSTERS, N_QUERIES = 20_000, 32, 64, 500


def _normalise(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def catalog():
    """20k x 32 items in 64 planted clusters; queries are perturbed items (never items themselves)."""
    rng = np.random.default_rng(7)
    centers = rng.standard_normal((N_CLUSTERS, DIM)).astype(np.float32)
    labels = rng.integers(0, N_CLUSTERS, N_ITEMS)
    items = _normalise(centers[labels] + 0.35 * rng.standard_normal((N_ITEMS, DIM)).astype(np.float32))
    # Sparse, shuffled ids so a test can tell ids from row positions.
    ids = rng.permutation(N_ITEMS).astype(np.int64) * 10 + 5
    seeds = items[rng.integers(0, N_ITEMS, N_QUERIES)]
    queries = _normalise(seeds + 0.3 * rng.standard_normal((N_QUERIES, DIM)).astype(np.float32))
    return items, ids, queries


@pytest.fixture(scope="module")
def tuned(catalog):
    items, ids, queries = catalog
    config = IndexConfig(recall_k=100, recall_target=0.95, seed=0)
    built = build_index(items, ids, config)
    choice = tune_nprobe(built, items, ids, queries, config)
    _, true_ids = exact_search(items, ids, queries, 100)
    return built, choice, true_ids


def _recall_at(built: BuiltIndex, queries: np.ndarray, true_ids: np.ndarray, nprobe: int) -> float:
    _, found = search_index(built, queries, true_ids.shape[1], nprobe)
    return recall_at_k(found, true_ids)


# ---------------------------------------------------------------------------------------------
# nlist rule and config


@pytest.mark.parametrize(
    ("n_items", "n_train", "expected"),
    [(1, None, 1), (77, None, 1), (78, None, 2), (1_000, None, 16), (20_000, None, 512),
     (100_000, None, 1_024), (1_000_000, None, 4_096), (1_000_000, 100_000, 2_048), (1_000_000, 10, 1)],
)
def test_choose_nlist_rule(n_items, n_train, expected):
    assert choose_nlist(n_items, n_train) == expected


def test_choose_nlist_rejects_non_positive():
    with pytest.raises(ValueError, match="n_items must be a positive int, got 0"):
        choose_nlist(0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"factory": "Flat"}, r"IndexConfig.factory must be None or a faiss factory string of an IVF index.*got 'Flat'"),
        ({"recall_k": 0}, r"IndexConfig.recall_k must be an int >= 1, got 0"),
        ({"recall_target": 1.5}, r"IndexConfig.recall_target must be a number in \(0, 1\], got 1.5"),
        ({"max_nprobe": 0}, r"IndexConfig.max_nprobe must be an int >= 1 or None, got 0"),
        ({"use_gpu": "yes"}, r"IndexConfig.use_gpu must be one of \('auto', 'never', 'always'\), got 'yes'"),
        ({"seed": -1}, r"IndexConfig.seed must be an int >= 0, got -1"),
        ({"train_sample": 0}, r"IndexConfig.train_sample must be an int >= 1 or None, got 0"),
    ],
)
def test_index_config_names_field_allowed_and_given(kwargs, message):
    with pytest.raises(ValueError, match=message):
        IndexConfig(**kwargs)


# ---------------------------------------------------------------------------------------------
# build + tune against brute force


def test_build_attaches_ids_inner_product_cpu(tuned, catalog):
    items, ids, _ = catalog
    built, _, _ = tuned
    assert (built.nlist, built.factory, built.device, built.ntotal, built.dim) == (512, "IVF512,Flat", "cpu", N_ITEMS, DIM)
    assert built.index.metric_type == faiss.METRIC_INNER_PRODUCT
    # An item's own vector finds itself (id, not row position) with score 1 when every list is probed.
    scores, found = search_index(built, items[:50], 1, built.nlist)
    np.testing.assert_array_equal(found[:, 0], ids[:50])
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)


def test_exact_search_matches_numpy_brute_force(catalog):
    items, ids, queries = catalog
    scores, found = exact_search(items, ids, queries[:20], 10)
    full = queries[:20] @ items.T
    order = np.argsort(-full, axis=1, kind="stable")[:, :10]
    np.testing.assert_array_equal(found, ids[order])
    np.testing.assert_allclose(scores, np.take_along_axis(full, order, axis=1), rtol=1e-5, atol=1e-6)


def test_recall_at_k_counts_intersection_and_ignores_missing():
    true_ids = np.array([[1, 2, 3, 4], [5, 6, 7, 8]], dtype=np.int64)
    found = np.array([[4, 3, 9, 10], [5, -1, -1, -1]], dtype=np.int64)
    assert recall_at_k(found, true_ids) == 3 / 8
    assert recall_at_k(true_ids[:, ::-1].copy(), true_ids) == 1.0


def test_tuned_nprobe_meets_target_and_is_smallest(tuned, catalog):
    _, _, queries = catalog
    built, choice, true_ids = tuned
    assert (choice.k, choice.target, choice.reached) == (100, 0.95, True)
    assert built.nprobe == choice.nprobe  # the index is left at the tuned value
    assert choice.recall >= 0.95
    assert choice.recall == _recall_at(built, queries, true_ids, choice.nprobe)
    assert 1 < choice.nprobe < built.nlist  # the fixture is hard enough that the search matters
    assert _recall_at(built, queries, true_ids, choice.nprobe - 1) < 0.95
    assert choice.qps > 0 and choice.exact_qps > 0


def test_curve_is_power_of_two_sweep_then_binary_search(tuned):
    _, choice, _ = tuned
    probes = [p for p, _, _ in choice.curve]
    assert probes == sorted(probes) and len(set(probes)) == len(probes)
    powers = [p for p in probes if p & (p - 1) == 0]
    first_pass = powers[-1]
    assert powers == [2**i for i in range(len(powers))]
    assert first_pass // 2 < choice.nprobe <= first_pass
    for p, recall, _ in choice.curve:
        assert (recall >= 0.95) == (p >= choice.nprobe)
    assert choice.curve[probes.index(choice.nprobe)][1] == choice.recall


def test_full_curve_non_decreasing_and_exact_at_nlist(tuned, catalog):
    items, ids, queries = catalog
    built, tuned_choice, true_ids = tuned
    try:
        choice = tune_nprobe(built, items, ids, queries[:200], IndexConfig(recall_target=1.0))
    finally:
        built.set_nprobe(tuned_choice.nprobe)  # the index is shared by the module's tests
    recalls = [r for _, r, _ in choice.curve]
    assert all(b >= a for a, b in itertools.pairwise(recalls))
    assert choice.reached and choice.recall == 1.0
    # Probing every list of an IVF-Flat index is an exhaustive scan: exactly brute force.
    assert _recall_at(built, queries, true_ids, built.nlist) == 1.0


def test_unreachable_target_reports_not_reached(tuned, catalog):
    items, ids, queries = catalog
    built, _, _ = tuned
    choice = tune_nprobe(built, items, ids, queries, IndexConfig(recall_target=0.99, max_nprobe=2))
    assert (choice.reached, choice.nprobe, [p for p, _, _ in choice.curve]) == (False, 2, [1, 2])
    assert choice.recall < 0.99


def test_recall_k_is_clipped_to_catalog_size():
    rng = np.random.default_rng(3)
    items = _normalise(rng.standard_normal((100, 8)).astype(np.float32))
    ids = np.arange(100, dtype=np.int64)
    built = build_index(items, ids, IndexConfig(recall_k=500))
    assert built.nlist == 2
    choice = tune_nprobe(built, items, ids, items[:10], IndexConfig(recall_k=500))
    assert (choice.k, choice.nprobe, choice.recall) == (100, 2, 1.0)


def test_train_sample_limits_training_and_nlist(catalog):
    items, ids, _ = catalog
    built = build_index(items, ids, IndexConfig(train_sample=2_000))
    assert (built.train_points, built.nlist, built.factory) == (2_000, 32, "IVF32,Flat")


def test_same_seed_same_index(catalog):
    items, ids, queries = catalog
    config = IndexConfig(seed=3, train_sample=4_000)
    first, second = build_index(items, ids, config), build_index(items, ids, config)
    a = search_index(first, queries[:100], 10, 4)
    b = search_index(second, queries[:100], 10, 4)
    np.testing.assert_array_equal(a[1], b[1])
    np.testing.assert_array_equal(a[0], b[0])


def test_explicit_factory_is_used(catalog):
    items, ids, _ = catalog
    built = build_index(items[:4_000], ids[:4_000], IndexConfig(factory="IVF{nlist},SQ8"))
    assert (built.nlist, built.factory) == (64, "IVF64,SQ8")
    with pytest.raises(ValueError, match=r"'IVF4096,Flat' has 4096 lists but only 4000 training points"):
        build_index(items[:4_000], ids[:4_000], IndexConfig(factory="IVF4096,Flat"))


# ---------------------------------------------------------------------------------------------
# input errors


def test_bad_inputs_raise_clear_errors(catalog):
    items, ids, _ = catalog
    small, small_ids = items[:200].copy(), ids[:200].copy()
    cases = [
        (small.astype(np.float64), small_ids, r"vectors must be float32, got float64; convert with .astype"),
        (small[0], small_ids, r"vectors must have shape \(n, dim\) with n, dim >= 1, got shape \(32,\)"),
        (small * 2, small_ids, r"vectors must be L2-normalised .*row 0 has norm 2"),
        (small, small_ids.astype(np.int32), r"ids must be int64, got int32"),
        (small, small_ids[:199], r"ids must have one id per vector: 200 vectors but 199 ids"),
        (small, np.r_[small_ids[:199], small_ids[5]], rf"ids must be unique; 1 duplicate\(s\), e.g. id {small_ids[5]}"),
        (small, np.r_[small_ids[:199], np.int64(-1)], r"ids must be >= 0 .*got min id -1"),
    ]
    for vectors, bad_ids, message in cases:
        with pytest.raises(ValueError, match=message):
            build_index(vectors, bad_ids)
    with_nan = small.copy()
    with_nan[17, 3] = np.nan
    with pytest.raises(ValueError, match="vectors must be finite; row 17 has NaN or inf"):
        build_index(with_nan, small_ids)


def test_query_and_k_errors(tuned, catalog):
    built, _, _ = tuned
    items, ids, queries = catalog
    with pytest.raises(ValueError, match=r"queries must have dim 32 \(the index's\), got shape \(5, 16\)"):
        search_index(built, queries[:5, :16].copy(), 10)
    with pytest.raises(ValueError, match=r"k must be an int in \[1, n_items=20000\], got 0"):
        exact_search(items, ids, queries[:5], 0)
    with pytest.raises(ValueError, match=r"nprobe must be an int in \[1, nlist=512\], got 513"):
        search_index(built, queries[:5], 10, nprobe=513)


@pytest.mark.skipif(faiss.get_num_gpus() > 0, reason="checks the no-GPU error")
def test_use_gpu_always_without_gpu_errors(catalog):
    items, ids, _ = catalog
    with pytest.raises(ValueError, match="use_gpu='always' but faiss sees no GPU"):
        build_index(items[:1_000], ids[:1_000], IndexConfig(use_gpu="always"))


@pytest.mark.gpu
@pytest.mark.skipif(faiss.get_num_gpus() == 0, reason="needs a faiss GPU build and a CUDA device")
def test_gpu_build_matches_cpu_recall(catalog):
    items, ids, queries = catalog
    built = build_index(items, ids, IndexConfig(use_gpu="always"))
    assert built.device == "gpu" and built.ntotal == N_ITEMS
    _, true_ids = exact_search(items, ids, queries, 100)
    assert _recall_at(built, queries, true_ids, built.nlist) == 1.0


# ---------------------------------------------------------------------------------------------
# persistence


def test_save_load_round_trip_identical_results(tuned, catalog, tmp_path):
    _, _, queries = catalog
    built, choice, _ = tuned
    built.set_nprobe(choice.nprobe)
    folder = save_index(built, tmp_path / "index")
    meta = json.loads((folder / "index.json").read_text())
    assert {key: meta[key] for key in ("nlist", "factory", "d", "ntotal", "metric", "nprobe")} == {
        "nlist": 512, "factory": "IVF512,Flat", "d": DIM, "ntotal": N_ITEMS,
        "metric": "inner_product", "nprobe": choice.nprobe,
    }
    loaded = load_index(folder)
    assert (loaded.nlist, loaded.factory, loaded.nprobe, loaded.ntotal) == (512, "IVF512,Flat", choice.nprobe, N_ITEMS)
    expected = built.index.search(queries, 100)
    actual = loaded.index.search(queries, 100)  # at the persisted nprobe
    np.testing.assert_array_equal(actual[1], expected[1])
    np.testing.assert_array_equal(actual[0], expected[0])
    assert sorted(p.name for p in folder.iterdir()) == ["index.faiss", "index.json"]


def test_load_index_missing_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"index\.faiss is missing"):
        load_index(tmp_path)
