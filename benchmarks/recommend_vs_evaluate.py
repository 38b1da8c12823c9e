"""Does serving agree with the offline metric? recommend's hit rate on the held-out last
events vs ``jobs.evaluate``'s, for the model of ``releases/CURRENT``.

For every row of ``pairs/test`` (at the version the served model's manifest pins, else the
latest) it asks the served path, ``index_builder.retrieval.Retriever.recommend``, for the
top-K items *as of that row's event time*: the query is built from the lake like a live
request (history strictly before that moment, the activity bucket then), searched in the
release's FAISS index at its tuned nprobe, seen items dropped. A hit is the held-out item in
the top K. In the same process it runs ``trainer.evaluation.evaluate_split`` (exact
full-catalog ranking, the number ``jobs.evaluate`` and the report print) on the same rows
and prints both with one standard error ``sqrt(p (1 - p) / n)`` of the evaluator's rate.
The two differ only by the ANN search (IVF at the tuned nprobe vs exact), so they should
agree within one SE; a larger gap means serving and training disagree about an input.

  .venv/bin/python benchmarks/recommend_vs_evaluate.py --lake lake     # after make demo
  .venv/bin/python benchmarks/recommend_vs_evaluate.py --lake lake --ks 10,50,100

Exit 0 when every K agrees within one SE, 1 otherwise.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    parser.add_argument("--lake", default="lake", help="lake root with a CURRENT release (default: ./lake)")
    parser.add_argument("--ks", default="10,50", help="cut-offs, comma-separated (default: 10,50)")
    parser.add_argument("--batch-users", type=int, default=4096, help="users per recommend call (default: 4096)")
    args = parser.parse_args(argv)
    ks = tuple(sorted({int(k) for k in args.ks.split(",")}))

    import pyarrow as pa
    import torch

    from index_builder.retrieval import Retriever, held_out_hit_ranks
    from lake_contract.delta_snapshot import read_snapshot_arrow
    from lake_contract.lake import Lake
    from lake_contract.vocab_registry import read_vocab_mapping
    from trainer.artifacts import ModelDataError, model_snapshot
    from trainer.data import resolve_pairs
    from trainer.evaluation import evaluate_split
    from trainer.item_store import load_item_store

    lake = Lake(args.lake)
    retriever = Retriever(lake.root)
    loaded = retriever.loaded
    try:
        test = model_snapshot(lake.root, loaded, "pairs/test")
    except ModelDataError:
        test = resolve_pairs(lake.root, "test")
    print(f"release {retriever.release.version}: model {loaded.version}, nprobe {retriever.nprobe} of "
          f"{retriever.index.nlist} lists; pairs/test@v{test.version}")
    rows = read_snapshot_arrow(test, ["user_idx", "item_idx", "event_ts"])
    id_of = {index: value for value, index in read_vocab_mapping(lake.root, "user_id").items()}
    user_ids = [id_of[i] for i in rows.column("user_idx").to_pylist()]
    targets = np.asarray(rows.column("item_idx").to_numpy(), dtype=np.int64)
    times = rows.column("event_ts").to_pylist()

    started = time.perf_counter()
    tables = []
    try:
        for start in range(0, len(user_ids), args.batch_users):
            stop = start + args.batch_users
            tables.append(retriever.recommend(user_ids[start:stop], max(ks), as_of=times[start:stop]).table)
    finally:
        retriever.close()
    served_s = time.perf_counter() - started
    ranks = held_out_hit_ranks(pa.concat_tables(tables), user_ids, targets, read_vocab_mapping(lake.root, "item_id"))

    started = time.perf_counter()
    store = load_item_store(retriever.model_tables["features/items"], loaded.schema)
    evaluated = evaluate_split(loaded.model, store, test, loaded.schema, ks, torch.device("cpu"),
                               negatives_width=0, with_itempop=False)["model"]
    evaluate_s = time.perf_counter() - started

    n = len(user_ids)
    print(f"{n:,} held-out events; recommend (as of each event) {served_s:.1f} s, evaluate (exact) {evaluate_s:.1f} s")
    print(f"{'K':>4} {'recommend':>10} {'evaluate':>9} {'|diff|':>7} {'one SE':>7}  agree")
    ok = True
    for k in ks:
        served, p = float((ranks <= k).mean()), float(evaluated[f"hr@{k}"])
        se = math.sqrt(max(p * (1 - p), 1e-12) / n)
        agree = abs(served - p) <= se
        ok &= agree
        print(f"{k:>4} {served:>10.4f} {p:>9.4f} {abs(served - p):>7.4f} {se:>7.4f}  {'yes' if agree else 'NO'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
