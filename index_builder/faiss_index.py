"""Build, tune, save and load the FAISS IVF index over item embeddings (docs/design.md, build_index).

Item vectors come from the item tower as ``(n_items, dim) float32`` rows, L2-normalised, so
inner product equals cosine similarity and every index here uses ``METRIC_INNER_PRODUCT``.
Item ids are the int64 ids the retrieval stage returns (the item vocabulary index); they are
stored inside the index (``add_with_ids``), so a search answers item ids, not row positions.

The index is an IVF: a k-means coarse quantizer splits the catalog into ``nlist`` lists and a
query scans only the ``nprobe`` lists nearest to it. ``tune_nprobe`` measures recall@k against
exact brute-force search on real queries and picks the smallest ``nprobe`` that reaches the
target, so a release can state the recall it serves at.

Pure numpy + faiss: no Spark, no torch. A GPU is used for training/adding when faiss has one.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import faiss
import numpy as np

MIN_POINTS_PER_LIST = 39
"""faiss k-means warns below 39 training points per centroid: the centroids are then noise."""

ADD_BATCH_ROWS = 65_536
SEARCH_BATCH_ROWS = 8_192
_NORM_TOLERANCE = 1e-3
_USE_GPU_VALUES = ("auto", "never", "always")
INDEX_FILE = "index.faiss"
INDEX_META_FILE = "index.json"


def choose_nlist(n_items: int, n_train: int | None = None) -> int:
    """Number of IVF lists for a catalog of ``n_items`` vectors.

    Rule: ``4 * sqrt(n_items)`` rounded to the nearest power of two (the usual faiss guidance
    is 4..16 * sqrt(n); the low end keeps lists large enough that a small ``nprobe`` already
    covers a query's neighbourhood), then clamped DOWN to the largest power of two that still
    leaves every list at least 39 training points (faiss k-means needs that many per
    centroid), and never below 1. ``n_train`` is the number of training points when it is
    smaller than the catalog (``IndexConfig.train_sample``); it defaults to ``n_items``.

    Examples: 1,000 -> 16 (25 lists would get < 39 points), 20,000 -> 512, 100,000 -> 1,024,
    1,000,000 -> 4,096; 1,000,000 trained on 100,000 points -> 2,048.
    """
    if isinstance(n_items, bool) or not isinstance(n_items, int) or n_items < 1:
        raise ValueError(f"n_items must be a positive int, got {n_items!r}")
    if n_train is None:
        n_train = n_items
    if isinstance(n_train, bool) or not isinstance(n_train, int) or n_train < 1:
        raise ValueError(f"n_train must be a positive int or None, got {n_train!r}")
    n_train = min(n_train, n_items)
    target = 4.0 * math.sqrt(n_items)
    nlist = 2 ** round(math.log2(target))
    max_lists = n_train // MIN_POINTS_PER_LIST
    if max_lists < 1:
        return 1
    return max(1, min(nlist, 1 << (max_lists.bit_length() - 1)))


@dataclass(frozen=True)
class IndexConfig:
    """How to build and tune the item index.

    factory:        faiss index_factory string; ``{nlist}`` in it is replaced by
                    ``choose_nlist``; None means ``"IVF{nlist},Flat"`` (exact within lists).
                    Must describe an IVF index (e.g. ``"IVF{nlist},PQ16"``).
    recall_k:       k of recall@k that ``tune_nprobe`` targets (clipped to the catalog size).
    recall_target:  the mean recall@k, in (0, 1], the chosen nprobe must reach.
    max_nprobe:     largest nprobe to try; None means nlist (a full scan, exact for IVF-Flat).
    use_gpu:        "auto" (a GPU when faiss sees one), "never", "always" (error without one).
    seed:           k-means and training-sample seed, 0 <= seed < 2**31.
    train_sample:   at most this many vectors train the quantizer (uniform sample); None = all
                    (faiss itself still caps k-means at 256 points per list).
    """

    factory: str | None = None
    recall_k: int = 100
    recall_target: float = 0.95
    max_nprobe: int | None = None
    use_gpu: Literal["auto", "never", "always"] = "auto"
    seed: int = 0
    train_sample: int | None = None

    def __post_init__(self) -> None:
        if self.factory is not None and (
            not isinstance(self.factory, str) or "IVF" not in self.factory
        ):
            raise ValueError(
                "IndexConfig.factory must be None or a faiss factory string of an IVF index "
                f"such as 'IVF{{nlist}},Flat' or 'IVF{{nlist}},PQ16', got {self.factory!r}"
            )
        _require_int("recall_k", self.recall_k, minimum=1)
        if (
            isinstance(self.recall_target, bool)
            or not isinstance(self.recall_target, int | float)
            or not 0.0 < float(self.recall_target) <= 1.0
        ):
            raise ValueError(
                f"IndexConfig.recall_target must be a number in (0, 1], got {self.recall_target!r}"
            )
        if self.max_nprobe is not None:
            _require_int("max_nprobe", self.max_nprobe, minimum=1, allow_none_hint=True)
        if self.use_gpu not in _USE_GPU_VALUES:
            raise ValueError(f"IndexConfig.use_gpu must be one of {_USE_GPU_VALUES}, got {self.use_gpu!r}")
        _require_int("seed", self.seed, minimum=0)
        if self.seed >= 2**31:
            raise ValueError(f"IndexConfig.seed must be an int in [0, 2**31), got {self.seed!r}")
        if self.train_sample is not None:
            _require_int("train_sample", self.train_sample, minimum=1, allow_none_hint=True)

    def factory_for(self, nlist: int) -> str:
        """The concrete factory string for ``nlist`` lists."""
        return (self.factory or "IVF{nlist},Flat").replace("{nlist}", str(nlist))


def _require_int(name: str, value: Any, *, minimum: int, allow_none_hint: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        allowed = f"an int >= {minimum}" + (" or None" if allow_none_hint else "")
        raise ValueError(f"IndexConfig.{name} must be {allowed}, got {value!r}")


@dataclass
class BuiltIndex:
    """A trained, filled IVF index on the CPU (``faiss.Index``, inner-product metric).

    ``index.search(queries, k)`` returns item ids (not row positions). ``nlist`` is the number
    of IVF lists, ``factory`` the concrete factory string, ``device`` where it was trained and
    filled ("gpu" or "cpu"), ``build_seconds`` wall time of train + add, ``train_points`` the
    number of vectors the quantizer was trained on.
    """

    index: Any
    nlist: int
    factory: str
    device: Literal["gpu", "cpu"]
    build_seconds: float
    train_points: int = 0

    @property
    def dim(self) -> int:
        return int(self.index.d)

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    @property
    def nprobe(self) -> int:
        """The nprobe a plain ``index.search`` uses (set by ``tune_nprobe``)."""
        return int(faiss.extract_index_ivf(self.index).nprobe)

    def set_nprobe(self, nprobe: int) -> None:
        if isinstance(nprobe, bool) or not isinstance(nprobe, int | np.integer) or not 1 <= nprobe <= self.nlist:
            raise ValueError(f"nprobe must be an int in [1, nlist={self.nlist}], got {nprobe!r}")
        faiss.extract_index_ivf(self.index).nprobe = int(nprobe)


@dataclass(frozen=True)
class NprobeChoice:
    """Result of ``tune_nprobe``.

    nprobe:     the smallest nprobe whose mean recall@k reaches ``target`` (or the largest tried
                when none does, with ``reached`` False).
    recall:     mean recall@k at ``nprobe`` against exact search, in [0, 1].
    qps:        IVF queries per second at ``nprobe`` (one batched search of all queries).
    exact_qps:  exact (IndexFlatIP) queries per second on the same queries, same run.
    curve:      every measured (nprobe, recall, qps), sorted by nprobe.
    """

    nprobe: int
    recall: float
    qps: float
    exact_qps: float
    curve: list[tuple[int, float, float]] = field(default_factory=list)
    k: int = 0
    target: float = 0.0
    reached: bool = False

    @property
    def speedup(self) -> float:
        """IVF QPS at the chosen nprobe over exact QPS."""
        return self.qps / self.exact_qps if self.exact_qps > 0 else float("inf")

    def to_manifest(self) -> dict[str, Any]:
        """JSON-ready summary for a release manifest."""
        return {
            "nprobe": self.nprobe,
            "recall": self.recall,
            "k": self.k,
            "target": self.target,
            "reached": self.reached,
            "qps": self.qps,
            "exact_qps": self.exact_qps,
            "curve": [list(point) for point in self.curve],
        }


# ---------------------------------------------------------------------------------------------
# input validation


def _check_vectors(vectors: Any, name: str, *, normalised: bool, dim: int | None = None) -> np.ndarray:
    if not isinstance(vectors, np.ndarray):
        raise ValueError(f"{name} must be a numpy array of shape (n, dim) float32, got {type(vectors).__name__}")
    if vectors.ndim != 2 or vectors.shape[0] < 1 or vectors.shape[1] < 1:
        raise ValueError(f"{name} must have shape (n, dim) with n, dim >= 1, got shape {vectors.shape}")
    if vectors.dtype != np.float32:
        raise ValueError(f"{name} must be float32, got {vectors.dtype}; convert with .astype(np.float32)")
    if dim is not None and vectors.shape[1] != dim:
        raise ValueError(f"{name} must have dim {dim} (the index's), got shape {vectors.shape}")
    vectors = np.ascontiguousarray(vectors)
    # Chunked so a 10M-row catalog does not need a second full-size boolean/float copy.
    for start in range(0, vectors.shape[0], ADD_BATCH_ROWS):
        chunk = vectors[start : start + ADD_BATCH_ROWS]
        finite = np.isfinite(chunk).all(axis=1)
        if not finite.all():
            row = start + int(np.argmin(finite))
            raise ValueError(f"{name} must be finite; row {row} has NaN or inf")
        if normalised:
            norms = np.sqrt(np.einsum("ij,ij->i", chunk, chunk, dtype=np.float64))
            bad = np.abs(norms - 1.0) > _NORM_TOLERANCE
            if bad.any():
                row = start + int(np.argmax(bad))
                raise ValueError(
                    f"{name} must be L2-normalised (row norms 1 ± {_NORM_TOLERANCE}); row {row} has norm "
                    f"{norms[row - start]:.6g}; normalise with v / np.linalg.norm(v, axis=1, keepdims=True)"
                )
    return vectors


def _check_ids(ids: Any, n: int) -> np.ndarray:
    if not isinstance(ids, np.ndarray) or ids.ndim != 1:
        shape = getattr(ids, "shape", None)
        raise ValueError(f"ids must be a 1-d numpy int64 array, got {type(ids).__name__} with shape {shape}")
    if ids.dtype != np.int64:
        raise ValueError(f"ids must be int64, got {ids.dtype}; convert with .astype(np.int64)")
    if ids.shape[0] != n:
        raise ValueError(f"ids must have one id per vector: {n} vectors but {ids.shape[0]} ids")
    if n and ids.min() < 0:
        raise ValueError(f"ids must be >= 0 (faiss uses -1 for 'no result'), got min id {int(ids.min())}")
    sorted_ids = np.sort(ids)
    dup = sorted_ids[1:] == sorted_ids[:-1]
    if dup.any():
        n_dup = int(dup.sum())
        raise ValueError(f"ids must be unique; {n_dup} duplicate(s), e.g. id {int(sorted_ids[1:][dup][0])}")
    return np.ascontiguousarray(ids)


def _gpu_count() -> int:
    get_num_gpus = getattr(faiss, "get_num_gpus", None)
    return int(get_num_gpus()) if get_num_gpus is not None else 0


# ---------------------------------------------------------------------------------------------
# build / search


def build_index(vectors: np.ndarray, ids: np.ndarray, config: IndexConfig | None = None) -> BuiltIndex:
    """Train an IVF index on ``vectors`` and add them with their ``ids``.

    vectors: ``(n, dim) float32``, finite, L2-normalised rows (the item tower's output).
    ids:     ``(n,) int64``, unique, >= 0; ``ids[i]`` is the id of ``vectors[i]``.

    Runs on a GPU when faiss sees one and ``config.use_gpu`` is not "never" (train and add on
    GPU 0, then copy back), on the CPU otherwise; the returned index is always a CPU index
    with nprobe 1 (``tune_nprobe`` sets the tuned value).
    """
    config = config or IndexConfig()
    vectors = _check_vectors(vectors, "vectors", normalised=True)
    n, dim = vectors.shape
    ids = _check_ids(ids, n)

    n_gpus = _gpu_count()
    if config.use_gpu == "always" and n_gpus == 0:
        raise ValueError(
            "IndexConfig.use_gpu='always' but faiss sees no GPU (faiss-cpu build or no CUDA device); "
            "use use_gpu='auto' or 'never', or install faiss-gpu"
        )
    use_gpu = n_gpus > 0 and config.use_gpu != "never"

    n_train = n if config.train_sample is None else min(n, config.train_sample)
    nlist = choose_nlist(n, n_train)
    factory = config.factory_for(nlist)
    try:
        cpu_index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as err:
        raise ValueError(f"faiss cannot build factory {factory!r} for dim {dim}: {err}") from err
    try:
        ivf = faiss.extract_index_ivf(cpu_index)
    except RuntimeError as err:
        raise ValueError(f"IndexConfig.factory must describe an IVF index, got {factory!r}") from err
    nlist = int(ivf.nlist)
    # A '{nlist}' factory gets choose_nlist's count, which is already as few lists as possible
    # (1 for a tiny catalog), exactly like the default factory; only a fixed count is an error.
    if nlist * MIN_POINTS_PER_LIST > n_train and config.factory is not None and "{nlist}" not in config.factory:
        raise ValueError(
            f"factory {factory!r} has {nlist} lists but only {n_train} training points; faiss needs at "
            f"least {MIN_POINTS_PER_LIST} per list: use '{{nlist}}' in the factory or fewer lists"
        )
    ivf.cp.seed = int(config.seed)

    if n_train < n:
        rng = np.random.default_rng(config.seed)
        train = vectors[np.sort(rng.choice(n, size=n_train, replace=False))]
    else:
        train = vectors

    started = time.perf_counter()
    if use_gpu:
        resources = faiss.StandardGpuResources()
        work_index = faiss.index_cpu_to_gpu(resources, 0, cpu_index)
    else:
        work_index = cpu_index
    work_index.train(train)
    for start in range(0, n, ADD_BATCH_ROWS):
        stop = min(n, start + ADD_BATCH_ROWS)
        work_index.add_with_ids(vectors[start:stop], ids[start:stop])
    index = faiss.index_gpu_to_cpu(work_index) if use_gpu else work_index
    build_seconds = time.perf_counter() - started
    faiss.extract_index_ivf(index).nprobe = 1
    return BuiltIndex(
        index=index,
        nlist=nlist,
        factory=factory,
        device="gpu" if use_gpu else "cpu",
        build_seconds=build_seconds,
        train_points=int(train.shape[0]),
    )


def _check_k(k: int, n: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or not 1 <= k <= n:
        raise ValueError(f"k must be an int in [1, n_items={n}], got {k!r}")
    return int(k)


def exact_search(
    item_vectors: np.ndarray, ids: np.ndarray, queries: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force top-``k`` by inner product (``faiss.IndexFlatIP``), queries in batches.

    item_vectors: ``(n, dim) float32``; ids: ``(n,) int64``; queries: ``(m, dim) float32``.
    Returns ``(scores (m, k) float32, ids (m, k) int64)``, best first.
    """
    item_vectors = _check_vectors(item_vectors, "item_vectors", normalised=False)
    n, dim = item_vectors.shape
    ids = _check_ids(ids, n)
    queries = _check_vectors(queries, "queries", normalised=False, dim=dim)
    k = _check_k(k, n)
    flat = faiss.IndexFlatIP(dim)
    flat.add(item_vectors)
    scores, positions = _search_batched(flat, queries, k)
    return scores, ids[positions]


def _search_batched(index: Any, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``index.search`` over ``SEARCH_BATCH_ROWS`` queries at a time (bounds faiss's temp memory)."""
    scores = np.empty((queries.shape[0], k), dtype=np.float32)
    found = np.empty((queries.shape[0], k), dtype=np.int64)
    for start in range(0, queries.shape[0], SEARCH_BATCH_ROWS):
        stop = start + SEARCH_BATCH_ROWS
        scores[start:stop], found[start:stop] = index.search(queries[start:stop], k)
    return scores, found


def search_index(
    built: BuiltIndex, queries: np.ndarray, k: int, nprobe: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` item ids for each query from the IVF index.

    queries: ``(m, dim) float32``. nprobe: lists to scan for this call (None = the index's own nprobe,
    which is left unchanged either way).
    Returns ``(scores (m, k) float32, ids (m, k) int64)``, best first; an id of -1 means fewer
    than k items were found in the probed lists.
    """
    queries = _check_vectors(queries, "queries", normalised=False, dim=built.dim)
    k = _check_k(k, built.ntotal)
    if nprobe is None:
        return _search_batched(built.index, queries, k)
    previous = built.nprobe
    built.set_nprobe(nprobe)
    try:
        return _search_batched(built.index, queries, k)
    finally:
        built.set_nprobe(previous)


def recall_at_k(found_ids: np.ndarray, true_ids: np.ndarray) -> float:
    """Mean over queries of |found ∩ true| / k, for ``(m, k)`` int64 id arrays.

    Vectorised: each row of ``[true | found]`` is sorted and equal neighbours counted, which
    is the intersection size because ids are unique within a row of each array; -1 (no
    result) never counts.
    """
    if found_ids.shape != true_ids.shape or found_ids.ndim != 2:
        raise ValueError(f"found_ids and true_ids must both be (m, k), got {found_ids.shape} and {true_ids.shape}")
    m, k = true_ids.shape
    if m == 0 or k == 0:
        raise ValueError(f"recall needs at least one query and k >= 1, got shape {true_ids.shape}")
    hits = 0
    for start in range(0, m, SEARCH_BATCH_ROWS):
        both = np.concatenate([true_ids[start : start + SEARCH_BATCH_ROWS], found_ids[start : start + SEARCH_BATCH_ROWS]], axis=1)
        both.sort(axis=1)
        hits += int(np.count_nonzero((both[:, 1:] == both[:, :-1]) & (both[:, 1:] >= 0)))
    return hits / (m * k)


# ---------------------------------------------------------------------------------------------
# tuning


def tune_nprobe(
    built: BuiltIndex,
    item_vectors: np.ndarray,
    ids: np.ndarray,
    queries: np.ndarray,
    config: IndexConfig | None = None,
) -> NprobeChoice:
    """The smallest nprobe whose mean recall@k (vs exact search) reaches ``config.recall_target``.

    item_vectors / ids: the ``(n, dim) float32`` / ``(n,) int64`` arrays the index was built
    from (for the exact ground truth); queries: ``(m, dim) float32`` realistic queries (user
    embeddings), NOT item vectors, which would flatter the index. k = ``config.recall_k``
    clipped to n.

    Tries nprobe = 1, 2, 4, ... up to ``config.max_nprobe`` (default nlist) and stops at the
    first that passes; then binary-searches between the last failing and that first passing
    power of two (recall is non-decreasing in nprobe: a larger probe set is a superset of
    candidates). Leaves ``built.index`` at the chosen nprobe, so a saved index serves at it.
    """
    config = config or IndexConfig()
    item_vectors = _check_vectors(item_vectors, "item_vectors", normalised=False, dim=built.dim)
    ids = _check_ids(ids, item_vectors.shape[0])
    if ids.shape[0] != built.ntotal:
        raise ValueError(f"item_vectors/ids must be the {built.ntotal} items of the index, got {ids.shape[0]}")
    queries = _check_vectors(queries, "queries", normalised=False, dim=built.dim)
    m = queries.shape[0]
    k = min(config.recall_k, built.ntotal)
    target = float(config.recall_target)
    max_nprobe = built.nlist if config.max_nprobe is None else min(config.max_nprobe, built.nlist)

    flat = faiss.IndexFlatIP(built.dim)
    flat.add(item_vectors)
    started = time.perf_counter()
    _, positions = _search_batched(flat, queries, k)
    exact_qps = m / max(time.perf_counter() - started, 1e-9)
    true_ids = ids[positions]
    del flat

    measured: dict[int, tuple[float, float]] = {}

    def measure(nprobe: int) -> float:
        built.set_nprobe(nprobe)
        started = time.perf_counter()
        _, found = _search_batched(built.index, queries, k)
        qps = m / max(time.perf_counter() - started, 1e-9)
        recall = recall_at_k(found, true_ids)
        measured[nprobe] = (recall, qps)
        return recall

    nprobe, last_failing = 1, 0
    while True:
        if measure(nprobe) >= target:
            break
        if nprobe >= max_nprobe:
            break
        last_failing, nprobe = nprobe, min(2 * nprobe, max_nprobe)
    reached = measured[nprobe][0] >= target
    if reached:
        lo, hi = last_failing, nprobe
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if measure(mid) >= target:
                hi = mid
            else:
                lo = mid
        nprobe = hi
    built.set_nprobe(nprobe)
    recall, qps = measured[nprobe]
    return NprobeChoice(
        nprobe=nprobe,
        recall=recall,
        qps=qps,
        exact_qps=exact_qps,
        curve=[(p, r, q) for p, (r, q) in sorted(measured.items())],
        k=k,
        target=target,
        reached=reached,
    )


# ---------------------------------------------------------------------------------------------
# persistence


def save_index(built: BuiltIndex, folder: str | os.PathLike[str]) -> Path:
    """Write ``index.faiss`` and ``index.json`` (nlist, factory, d, ntotal, metric, nprobe, ...)
    into the local ``folder`` (created if missing); each file is written to a temp name and
    renamed, so a reader never sees half a file. Returns the folder."""
    path = Path(folder)
    path.mkdir(parents=True, exist_ok=True)
    meta = {
        "nlist": built.nlist,
        "factory": built.factory,
        "d": built.dim,
        "ntotal": built.ntotal,
        "metric": "inner_product",
        "nprobe": built.nprobe,
        "device": built.device,
        "build_seconds": built.build_seconds,
        "train_points": built.train_points,
        "faiss_version": faiss.__version__,
    }
    tmp_index = path / f".{INDEX_FILE}.tmp-{os.getpid()}"
    faiss.write_index(built.index, str(tmp_index))
    os.replace(tmp_index, path / INDEX_FILE)
    with tempfile.NamedTemporaryFile("w", dir=path, prefix=f".{INDEX_META_FILE}.", delete=False) as handle:
        json.dump(meta, handle, indent=2, sort_keys=True)
    os.replace(handle.name, path / INDEX_META_FILE)
    return path


def load_index(folder: str | os.PathLike[str]) -> BuiltIndex:
    """Read an index written by ``save_index``; checks the file against its ``index.json``."""
    path = Path(folder)
    index_file, meta_file = path / INDEX_FILE, path / INDEX_META_FILE
    for needed in (index_file, meta_file):
        if not needed.is_file():
            raise FileNotFoundError(f"{needed} is missing: {path} is not a folder written by save_index")
    meta = json.loads(meta_file.read_text())
    index = faiss.read_index(str(index_file))
    if index.metric_type != faiss.METRIC_INNER_PRODUCT:
        raise ValueError(f"{index_file} does not use the inner-product metric (metric_type {index.metric_type})")
    for key, actual in (("d", index.d), ("ntotal", index.ntotal), ("nlist", faiss.extract_index_ivf(index).nlist)):
        if int(meta[key]) != int(actual):
            raise ValueError(f"{index_file} has {key}={actual} but {meta_file} says {meta[key]}: the files do not match")
    return BuiltIndex(
        index=index,
        nlist=int(meta["nlist"]),
        factory=str(meta["factory"]),
        device=meta.get("device", "cpu"),
        build_seconds=float(meta.get("build_seconds", 0.0)),
        train_points=int(meta.get("train_points", 0)),
    )
