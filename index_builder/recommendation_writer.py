"""Batch mode of retrieval: every asked user's top-K streamed into the ``recommendations``
Delta table in one commit."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from index_builder.retrieval import Retriever
from lake_contract.lake import to_local_path

DELTA_SCHEMA = pa.schema([
    pa.field("user_id", pa.string(), nullable=False),
    pa.field("item_id", pa.string(), nullable=False),
    pa.field("rank", pa.int32(), nullable=False),
    pa.field("score", pa.float32()),
    pa.field("release_version", pa.string(), nullable=False),
])
"""The ``recommendations`` Delta table (docs/design.md: user_id, item_id, rank, score + release)."""


# ---------------------------------------------------------------------------------------------
# batch mode


@dataclass(frozen=True)
class BatchWriteResult:
    table_uri: str
    version: int
    users: int
    rows: int
    unknown_users: int


def overwrite_delta(table_uri: str, schema: pa.Schema, batches: Iterable[pa.RecordBatch]) -> int:
    """Overwrite the Delta table at ``table_uri`` with the streamed ``batches`` in ONE commit
    (readers see the old rows until it lands); returns the new version."""
    from deltalake import write_deltalake

    from lake_contract.delta_snapshot import deltars_location, open_table

    local = to_local_path(table_uri)
    if local is not None:
        Path(local).parent.mkdir(parents=True, exist_ok=True)
    reader = pa.RecordBatchReader.from_batches(schema, batches)
    write_deltalake(deltars_location(table_uri), reader, mode="overwrite", schema_mode="overwrite")
    return open_table(table_uri).version()


def write_recommendations(retriever: Retriever, user_batches: Iterable[list[str]], k: int, table_uri: str,
                          on_batch: Callable[[int], None] | None = None) -> BatchWriteResult:
    """Recommend for every batch of ``user_batches`` and overwrite the Delta table at
    ``table_uri`` with all of them in ONE commit (DELTA_SCHEMA rows; readers see the previous
    recommendations until the commit). Batches are streamed into the writer, so memory holds
    one batch of results, not the whole table. ``on_batch(users_in_batch)`` reports progress."""
    counts = {"users": 0, "rows": 0, "unknown": 0}
    release = retriever.release.version

    def batches() -> Iterator[pa.RecordBatch]:
        for user_ids in user_batches:
            if not user_ids:
                continue
            result = retriever.recommend(user_ids, k)
            table = result.table
            counts["users"] += len(user_ids)
            counts["rows"] += table.num_rows
            counts["unknown"] += len(result.unknown_users)
            out = pa.table({
                "user_id": table.column("user_id"), "item_id": table.column("item_id"),
                "rank": table.column("rank"), "score": table.column("score"),
                "release_version": pa.array([release] * table.num_rows, pa.string()),
            }, schema=DELTA_SCHEMA)
            if on_batch is not None:
                on_batch(len(user_ids))
            yield from out.to_batches()

    version = overwrite_delta(table_uri, DELTA_SCHEMA, batches())
    return BatchWriteResult(table_uri=table_uri, version=version, users=counts["users"], rows=counts["rows"],
                            unknown_users=counts["unknown"])
