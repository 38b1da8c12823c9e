"""Release-ranked hard negatives: for every user, the items the CURRENT release ranks 20-100.

Items the model ranks just below the top of a user's list are the confusable ones: close
enough to be retrieved, yet (as far as the data knows) not what the user picked. Training on
them sharpens the boundary the retrieval stage actually works at; the very top ranks are
skipped because they hold many unlabelled positives (items the user would like but has not
met yet). Ranks are counted among items the user has NOT interacted with, exactly as
``jobs.recommend`` serves them (seen items are dropped before ranking).

``mine_release_negatives`` runs the release's user tower and FAISS index (``Retriever``) over
every user of ``vocab/user_id`` in batches and overwrites the Delta table
``negatives/release_ranked`` in ONE commit: one row per user with at least one candidate,

    user_idx int, items array<int> (item_idx in rank order, ranks first_rank..last_rank),
    release_version string, first_rank int

The feature build (``spark_features.training_data``) reads that table for the ``hard``
negative kind: each hard draw of a user who has candidates takes one of them (see
``spark_features.negatives``). Indices are ``vocab`` indices, stable forever (vocabularies are
append-only), so a table mined from yesterday's release stays valid for today's build.
Memory holds one batch of users; nothing grows with the number of users.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from lake_contract.lake import Lake

RELEASE_RANKED_TABLE = "negatives/release_ranked"
DEFAULT_FIRST_RANK = 20
DEFAULT_LAST_RANK = 100

RELEASE_RANKED_SCHEMA = pa.schema([
    pa.field("user_idx", pa.int32(), nullable=False),
    pa.field("items", pa.list_(pa.int32()), nullable=False),
    pa.field("release_version", pa.string(), nullable=False),
    pa.field("first_rank", pa.int32(), nullable=False),
])


@dataclass(frozen=True)
class MinedNegatives:
    table_uri: str
    table_version: int
    release_version: str
    users: int  # users with at least one candidate
    candidates: int  # items over all users
    first_rank: int
    last_rank: int
    seconds: float


def ranked_slice(ids: np.ndarray, kept: np.ndarray, first_rank: int, last_rank: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Ranks ``first_rank..last_rank`` (1-based, inclusive) of each row of ``ids`` (B, K >= last_rank)
    whose first ``kept[row]`` slots are valid: ``(offsets (B+1,), values)`` as a CSR of item indices."""
    width = last_rank - first_rank + 1
    window = ids[:, first_rank - 1:last_rank]
    valid = np.arange(width)[None, :] < (kept[:, None] - (first_rank - 1))
    counts = valid.sum(axis=1)
    offsets = np.zeros(len(ids) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    return offsets, window[valid].astype(np.int32)


def mine_release_negatives(lake_root: str, first_rank: int = DEFAULT_FIRST_RANK, last_rank: int = DEFAULT_LAST_RANK,
                           batch_users: int = 4096, device: str = "cpu",
                           on_batch: Callable[[int, int], None] | None = None) -> MinedNegatives | None:
    """Mine ranks ``first_rank..last_rank`` of CURRENT for every user into ``negatives/release_ranked``.

    None (and nothing written) when no release is published. ``on_batch(done, total)``
    reports progress in users. Users the vocab knows but the release's tower does not (added
    since the release was trained) are still ranked: the tower maps their index to unknown and
    serves them from history and features, exactly like ``jobs.recommend``.
    """
    import time

    from index_builder.recommendation_writer import overwrite_delta
    from index_builder.release import current_release
    from index_builder.retrieval import Retriever

    if not (isinstance(first_rank, int) and isinstance(last_rank, int) and 1 <= first_rank <= last_rank):
        raise ValueError(f"ranks must satisfy 1 <= first_rank <= last_rank, got {first_rank!r}..{last_rank!r}")
    lake = Lake(lake_root)
    if current_release(lake.root) is None:
        return None
    start = time.monotonic()
    retriever = Retriever(lake.root, device=device)
    try:
        k = min(last_rank, retriever.index.ntotal)
        release = retriever.release.version
        total = retriever.queries.count_users()
        counts = {"users": 0, "candidates": 0, "done": 0}

        def batches():
            for user_ids in retriever.queries.iter_user_ids(batch_users):
                queries = retriever.queries.build(user_ids)
                counts["done"] += len(user_ids)
                if on_batch is not None:
                    on_batch(counts["done"], total)
                if not queries.known.any() or k < first_rank:
                    continue
                ids, _scores, kept = retriever.search_known(queries, k)
                offsets, values = ranked_slice(ids, kept, first_rank, k)
                has_any = np.diff(offsets) > 0
                if not has_any.any():
                    continue
                items = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(values, pa.int32()))
                rows = int(has_any.sum())
                counts["users"] += rows
                counts["candidates"] += int(values.size)
                table = pa.table({
                    "user_idx": pa.array(queries.user_idx[queries.known][has_any].astype(np.int32), pa.int32()),
                    "items": items.filter(pa.array(has_any)),
                    "release_version": pa.array([release] * rows, pa.string()),
                    "first_rank": pa.array(np.full(rows, first_rank, dtype=np.int32), pa.int32()),
                }, schema=RELEASE_RANKED_SCHEMA)
                yield from table.to_batches()

        table_uri = lake.table(RELEASE_RANKED_TABLE)
        version = overwrite_delta(table_uri, RELEASE_RANKED_SCHEMA, batches())
    finally:
        retriever.close()
    return MinedNegatives(table_uri=table_uri, table_version=version, release_version=release, users=counts["users"],
                          candidates=counts["candidates"], first_rank=first_rank, last_rank=k,
                          seconds=time.monotonic() - start)
