"""Item embeddings (the ``embeddings/items`` Delta table) and held-out user query vectors.

``write_item_embeddings`` streams the ``features/items`` snapshot file by file, in batches of
``batch_rows`` items, through the item tower (on the GPU when there is one) and writes the
result to ``embeddings/items`` with delta-rs as ONE commit: columns ``item_id`` string,
``item_idx`` int64, ``vector`` list<float32> (L2-normalised, the tower's output),
``model_version`` string; partitioned by ``model_version``. A run replaces exactly its model
version's partition (overwrite with the predicate ``model_version = '<v>'``), so a re-run
never duplicates rows and other versions' rows are untouched. Only one batch of features is
in memory at a time; the vectors themselves are kept (one ``(n, dim) float32`` array),
because the FAISS index is built from them next.

Items whose index (or a feature value) is beyond the model's vocabularies (added to the lake
after the model was trained) are embedded as unknown in that input (index 0, the padding
row): from their other features only. Their count is reported.

``embed_user_queries`` turns the rows of a held-out pairs split (``pairs/valid``) into user
tower outputs: the realistic queries ``tune_nprobe`` measures recall on.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torch import nn

from lake_contract.delta_snapshot import (
    DeltaSnapshot,
    deltars_location,
    open_table,
    resolve_snapshot,
    snapshot_file_path,
)
from lake_contract.feature_contract import known_history
from lake_contract.lake import Lake
from trainer.data import iter_eval_batches
from trainer.feature_schema import MULTI_VALUED_WIDTH, FeatureSchema
from trainer.item_store import pad_list_array

EMBEDDINGS_TABLE = "embeddings/items"
EMBEDDING_BATCH_ROWS = 65_536
MAX_BATCH_ROWS = 1 << 22  # rows x dim must fit the int32 offsets of a list column (dim < 512)
EMBEDDINGS_SCHEMA = pa.schema([
    pa.field("item_id", pa.string()),
    pa.field("item_idx", pa.int64()),
    pa.field("vector", pa.list_(pa.float32())),
    pa.field("model_version", pa.string()),
])
_SAFE_VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass
class ItemEmbeddings:
    """What ``write_item_embeddings`` wrote: ``item_idx`` (n,) int64, ``vectors`` (n, dim)
    float32 L2-normalised and ``item_id`` (n,) string, row i is item ``item_idx[i]``; ``table_version`` the
    Delta version of ``embeddings/items`` that holds them; ``unknown_to_model`` how many items
    had an index or feature value beyond the model's vocabularies."""

    item_idx: np.ndarray
    vectors: np.ndarray
    item_id: pa.ChunkedArray
    table_version: int
    unknown_to_model: int

    @property
    def num_items(self) -> int:
        return int(self.item_idx.shape[0])

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])


def _int64(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    return np.asarray(column.fill_null(0).to_numpy(zero_copy_only=False), dtype=np.int64)


def _item_feature_batches(snapshot: DeltaSnapshot, schema: FeatureSchema, batch_rows: int
                          ) -> Iterator[tuple[pa.Array, np.ndarray, dict[str, np.ndarray], int]]:
    """(item_id, item_idx (b,) int64, {field: (b,) or (b, 16) int64}, unknown count) per batch
    of real items (index > 0), with out-of-vocabulary values mapped to 0."""
    columns = ["item_idx", "item_id", *[f.name for f in schema.item_fields]]
    for file in snapshot.files:
        for record_batch in pq.ParquetFile(snapshot_file_path(file)).iter_batches(batch_size=batch_rows,
                                                                                  columns=columns):
            table = pa.Table.from_batches([record_batch])
            table = table.filter(pc.greater(table.column("item_idx"), 0))
            if table.num_rows == 0:
                continue
            item_idx = _int64(table.column("item_idx"))
            unknown = item_idx >= schema.num_items
            fields = {}
            for spec in schema.item_fields:
                if spec.kind == "multi_valued":
                    values = pad_list_array(table.column(spec.name), MULTI_VALUED_WIDTH)
                    outside = (values >= spec.size) | (values < 0)
                    unknown |= outside.any(axis=1)
                else:
                    values = _int64(table.column(spec.name))
                    outside = (values >= spec.size) | (values < 0)
                    unknown |= outside
                fields[spec.name] = np.where(outside, 0, values)
            item_ids = table.column("item_id").combine_chunks()
            if item_ids.null_count:
                raise ValueError(f"features/items has {item_ids.null_count} rows without item_id; "
                                 "rebuild the features (python -m jobs.build_features)")
            yield item_ids, item_idx, fields, int(unknown.sum())


@torch.no_grad()
def embed_item_batches(model: nn.Module, snapshot: DeltaSnapshot, schema: FeatureSchema, device: torch.device,
                       batch_rows: int = EMBEDDING_BATCH_ROWS
                       ) -> Iterator[tuple[pa.Array, np.ndarray, np.ndarray, int]]:
    """Item-tower vectors of every real item of the ``features/items`` snapshot, streamed:
    ``(item_id (b,) string, item_idx (b,) int64, vectors (b, dim) float32 L2-normalised,
    unknown count)`` per batch of at most ``batch_rows`` items."""
    model.eval()
    for item_ids, item_idx, fields, unknown in _item_feature_batches(snapshot, schema, batch_rows):
        ids = torch.from_numpy(item_idx).to(device)
        inputs = {"item_idx": torch.where(ids < schema.num_items, ids, torch.zeros_like(ids)),
                  **{name: torch.from_numpy(values).to(device) for name, values in fields.items()}}
        vectors = model.embed_items(inputs).float().cpu().numpy()
        yield item_ids, item_idx, np.ascontiguousarray(vectors, dtype=np.float32), unknown


def write_item_embeddings(lake_root: str, model_version: str, model: nn.Module, snapshot: DeltaSnapshot,
                          schema: FeatureSchema, device: torch.device,
                          batch_rows: int = EMBEDDING_BATCH_ROWS) -> ItemEmbeddings:
    """Embed every real item of ``snapshot`` (``features/items``) and replace the
    ``model_version`` partition of ``embeddings/items`` with them in one Delta commit."""
    from deltalake import write_deltalake

    if not _SAFE_VERSION.match(model_version):
        raise ValueError(f"model version must be letters, digits, '.', '_', '-', got {model_version!r}")
    if not 1 <= batch_rows <= MAX_BATCH_ROWS:
        raise ValueError(f"batch_rows must be in [1, {MAX_BATCH_ROWS}], got {batch_rows!r}")
    idx_parts: list[np.ndarray] = []
    id_parts: list[pa.Array] = []
    vector_parts: list[np.ndarray] = []
    unknown_total = 0

    def record_batches() -> Iterator[pa.RecordBatch]:
        nonlocal unknown_total
        for item_ids, item_idx, vectors, unknown in embed_item_batches(model, snapshot, schema, device, batch_rows):
            rows, dim = vectors.shape
            idx_parts.append(item_idx)
            id_parts.append(item_ids.cast(pa.string()))
            vector_parts.append(vectors)
            unknown_total += unknown
            offsets = pa.array(np.arange(0, (rows + 1) * dim, dim, dtype=np.int32), pa.int32())
            vector = pa.ListArray.from_arrays(offsets, pa.array(vectors.reshape(-1), pa.float32()))
            yield pa.record_batch([
                id_parts[-1],
                pa.array(item_idx, pa.int64()),
                vector,
                pa.array(np.full(rows, model_version, dtype=object), pa.string()),
            ], schema=EMBEDDINGS_SCHEMA)

    uri = Lake(lake_root).table(EMBEDDINGS_TABLE)
    write_deltalake(deltars_location(uri), pa.RecordBatchReader.from_batches(EMBEDDINGS_SCHEMA, record_batches()),
                    partition_by=["model_version"], mode="overwrite",
                    predicate=f"model_version = '{model_version}'")
    if not idx_parts:
        raise ValueError(f"{snapshot.table_uri} version {snapshot.version} has no items with item_idx > 0: "
                         "rebuild the features (python -m jobs.build_features)")
    return ItemEmbeddings(item_idx=np.concatenate(idx_parts), vectors=np.concatenate(vector_parts),
                          item_id=pa.chunked_array(id_parts, pa.string()),
                          table_version=open_table(uri).version(), unknown_to_model=unknown_total)


def read_item_embeddings(lake_root: str, model_version: str, version: int | None = None
                         ) -> tuple[np.ndarray, np.ndarray, pa.Array]:
    """``(item_idx (n,) int64, vectors (n, dim) float32, item_id (n,) string)`` of one model
    version's partition of ``embeddings/items`` (at Delta ``version``, latest when None),
    sorted by item_idx. Reads only that partition's files."""
    snapshot = resolve_snapshot(Lake(lake_root).table(EMBEDDINGS_TABLE), version)
    tables = [pq.read_table(snapshot_file_path(f), columns=["item_id", "item_idx", "vector"])
              for f, values in zip(snapshot.files, snapshot.partition_values, strict=True)
              if values.get("model_version") == model_version]
    if not tables:
        raise ValueError(f"embeddings/items@v{snapshot.version} has no rows for model version {model_version!r}: "
                         "run python -m jobs.build_index --model " + model_version)
    table = pa.concat_tables(tables)
    table = table.take(pc.sort_indices(table.column("item_idx")))
    vectors = table.column("vector").combine_chunks()
    dim = len(vectors[0]) if len(vectors) else 0
    flat = np.asarray(vectors.flatten().to_numpy(zero_copy_only=False), dtype=np.float32)
    return _int64(table.column("item_idx")), flat.reshape(-1, dim), table.column("item_id").combine_chunks()


@torch.no_grad()
def embed_user_queries(model: nn.Module, snapshot: DeltaSnapshot, schema: FeatureSchema, device: torch.device,
                       max_rows: int | None = None) -> np.ndarray:
    """User-tower vectors of the rows of a held-out pairs snapshot (each row's user features
    and point-in-time history): ``(m, dim) float32`` L2-normalised, m = min(rows, max_rows),
    in file order."""
    model.eval()
    parts, total = [], 0
    for batch in iter_eval_batches(snapshot, schema):
        users = {name: values.to(device) for name, values in batch.users.items()}
        users["user_idx"] = torch.where(users["user_idx"] < schema.num_users, users["user_idx"], 0)
        # Items newer than the model: dropped and the history re-packed (the feature contract).
        users["hist"] = torch.from_numpy(known_history(users["hist"].cpu().numpy(), schema.num_items)).to(device)
        vectors = model.embed_users(users).float().cpu().numpy()
        if max_rows is not None:
            vectors = vectors[: max_rows - total]
        parts.append(vectors)
        total += vectors.shape[0]
        if max_rows is not None and total >= max_rows:
            break
    if not total:
        raise ValueError(f"{snapshot.table_uri} version {snapshot.version} has no rows to use as queries")
    return np.ascontiguousarray(np.concatenate(parts), dtype=np.float32)
