"""FAISS IVF build time, tuned nprobe, recall and QPS against exact search, on synthetic catalogs.

For each catalog size it generates clustered, L2-normalised item vectors (power-law cluster
sizes, like real catalogs where a few genres hold most items) and user-like queries (a query is
the normalised mean of a few items of one cluster, picked by cluster popularity, plus noise;
never an item vector itself, which would flatter the index), then in ONE run:

* builds the IVF index with ``index_builder.faiss_index`` (nlist by ``choose_nlist``);
* tunes nprobe for recall@100 >= 0.95 and reports recall@10 / recall@100 there;
* times exact search (``IndexFlatIP``) on the same queries: QPS and the IVF/exact speedup
  (best of ``--repeats`` timings, exact and IVF alternating, so load from other work on a
  shared machine hits both alike);
* finds the smallest nprobe with recall@10 >= 0.95 and its speedup (k=10 on both sides).

Goal: recall@10 >= 0.95 at >= 10x the exact QPS at 1M items. Run on an otherwise idle machine:

  .venv/bin/python benchmarks/bench_faiss.py                           # 100k and 1M items
  .venv/bin/python benchmarks/bench_faiss.py --sizes 100000 --dim 64 --queries 2000
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CHUNK_ROWS = 262_144


def _normalise_rows(x: np.ndarray) -> np.ndarray:
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def make_catalog(
    n_items: int, dim: int, n_queries: int, seed: int, item_noise: float, query_noise: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(items (n, dim) float32 normalised, ids (n,) int64, queries (m, dim) float32 normalised)."""
    rng = np.random.default_rng(seed)
    n_clusters = max(16, n_items // 1_000)
    # Zipf-like cluster sizes: cluster r gets a share proportional to 1 / (r + 1)^0.9.
    share = 1.0 / np.arange(1, n_clusters + 1) ** 0.9
    sizes = np.maximum(1, np.floor(share / share.sum() * n_items).astype(np.int64))
    sizes[0] += n_items - sizes.sum()
    labels = np.repeat(np.arange(n_clusters), sizes)
    centers = _normalise_rows(rng.standard_normal((n_clusters, dim), dtype=np.float32))

    items = np.empty((n_items, dim), dtype=np.float32)
    for start in range(0, n_items, CHUNK_ROWS):
        stop = min(n_items, start + CHUNK_ROWS)
        noise = rng.standard_normal((stop - start, dim), dtype=np.float32) * (item_noise / np.sqrt(dim))
        items[start:stop] = _normalise_rows(centers[labels[start:stop]] + noise)
    ids = rng.permutation(n_items).astype(np.int64)

    offsets = np.concatenate([[0], np.cumsum(sizes)])
    query_clusters = rng.choice(n_clusters, size=n_queries, p=sizes / sizes.sum())
    picks = offsets[query_clusters, None] + (
        rng.random((n_queries, 3)) * sizes[query_clusters, None]
    ).astype(np.int64)
    mixed = items[picks].mean(axis=1)
    mixed /= np.linalg.norm(mixed, axis=1, keepdims=True)
    noise = rng.standard_normal((n_queries, dim), dtype=np.float32) * (query_noise / np.sqrt(dim))
    queries = _normalise_rows(mixed + noise).astype(np.float32)
    return items, ids, queries


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="100000,1000000", help="comma-separated catalog sizes")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--queries", type=int, default=2000)
    parser.add_argument("--target", type=float, default=0.95, help="recall target for both tunings")
    parser.add_argument(
        "--train-sample", type=int, default=262_144,
        help="max training points for the quantizer (default 64 per list at 4096 lists, keeps a 1M build in"
        " minutes on 2 cores; 0 = all, faiss then caps k-means at 256 per list)",
    )
    parser.add_argument("--item-noise", type=float, default=0.8, help="item spread around its cluster centre")
    parser.add_argument("--query-noise", type=float, default=0.3, help="query noise around its item mix")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="timings per QPS figure (best is kept)")
    args = parser.parse_args()
    sizes = [int(s.replace("_", "")) for s in args.sizes.split(",") if s.strip()]

    import faiss

    from index_builder.faiss_index import (
        IndexConfig,
        build_index,
        exact_search,
        recall_at_k,
        search_index,
        tune_nprobe,
    )

    print(
        f"faiss {faiss.__version__}, threads={faiss.omp_get_max_threads()}, gpus={faiss.get_num_gpus()}, "
        f"dim={args.dim}, queries={args.queries}, target={args.target}"
    )
    rows = []
    for n_items in sizes:
        started = time.perf_counter()
        items, ids, queries = make_catalog(n_items, args.dim, args.queries, args.seed, args.item_noise, args.query_noise)
        gen_s = time.perf_counter() - started
        config100 = IndexConfig(
            recall_k=100, recall_target=args.target, seed=args.seed, train_sample=args.train_sample or None
        )
        built = build_index(items, ids, config100)
        print(
            f"[{n_items:,}] generated in {gen_s:.1f} s; built {built.factory} on {built.device} from "
            f"{built.train_points:,} training points in {built.build_seconds:.1f} s",
            flush=True,
        )
        tune_started = time.perf_counter()
        at100 = tune_nprobe(built, items, ids, queries, config100)
        config10 = IndexConfig(recall_k=10, recall_target=args.target, seed=args.seed)
        at10 = tune_nprobe(built, items, ids, queries, config10)
        print(
            f"[{n_items:,}] tuned in {time.perf_counter() - tune_started:.1f} s; recall@100 curve "
            + " ".join(f"{p}:{r:.3f}" for p, r, _ in at100.curve),
            flush=True,
        )
        flat = faiss.IndexFlatIP(args.dim)
        flat.add(items)
        _, true10 = exact_search(items, ids, queries, 10)
        _, found10 = search_index(built, queries, 10, at100.nprobe)
        recall10_at100 = recall_at_k(found10, true10)
        timed = {}
        for k, nprobe in ((100, at100.nprobe), (10, at10.nprobe)):
            exact_s, ivf_s = [], []
            for _ in range(args.repeats):
                started = time.perf_counter()
                flat.search(queries, k)
                exact_s.append(time.perf_counter() - started)
                started = time.perf_counter()
                search_index(built, queries, k, nprobe)
                ivf_s.append(time.perf_counter() - started)
            timed[k] = (args.queries / min(ivf_s), args.queries / min(exact_s))
        del flat
        shape = (built.nlist, built.train_points, built.build_seconds)
        rows.append((n_items, shape, at100, recall10_at100, at10, timed))
        del items, ids, queries, built

    header = (
        f"{'items':>9} {'nlist':>5} {'train':>9} {'build_s':>7} | {'nprobe':>6} {'R@10':>6} {'R@100':>6} "
        f"{'ivf_qps':>8} {'exact_qps':>9} {'speedup':>7} | {'np@10':>5} {'R@10':>6} {'ivf_qps':>8} "
        f"{'exact_qps':>9} {'speedup':>7}"
    )
    print()
    print("left: smallest nprobe with recall@100 >= target (k=100 searches); "
          "right: smallest nprobe with recall@10 >= target (k=10 searches)")
    print(header)
    print("-" * len(header))
    for n_items, (nlist, train_points, build_seconds), at100, recall10, at10, timed in rows:
        (ivf100, exact100), (ivf10, exact10) = timed[100], timed[10]
        print(
            f"{n_items:>9,} {nlist:>5} {train_points:>9,} {build_seconds:>7.1f} | "
            f"{at100.nprobe:>6} {recall10:>6.3f} {at100.recall:>6.3f} {ivf100:>8,.0f} {exact100:>9,.0f} "
            f"{ivf100 / exact100:>6.1f}x | {at10.nprobe:>5} {at10.recall:>6.3f} {ivf10:>8,.0f} "
            f"{exact10:>9,.0f} {ivf10 / exact10:>6.1f}x"
        )
    n_items, _, _, _, at10, timed = rows[-1]
    speedup = timed[10][0] / timed[10][1]
    goal_met = at10.reached and speedup >= 10.0
    print(
        f"\ngoal (recall@10 >= {args.target} at >= 10x exact QPS) at {n_items:,} items: "
        f"{'met' if goal_met else 'NOT met'} ({speedup:.1f}x at recall@10 {at10.recall:.3f})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
