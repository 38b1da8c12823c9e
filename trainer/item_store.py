"""The item feature table as tensors indexed by ``item_idx``, loaded once per run.

The item tower needs an item's features wherever the item appears: as a positive, as an
offline negative, as a uniformly sampled extra negative, and when the whole catalog is
embedded for evaluation or the index. ``ItemFeatureStore`` holds every item field of
``features/items`` as one tensor of ``num_items`` rows (row ``i`` = item index ``i``; row 0 and
rows of ids without features are all-zero = unknown), on the training device. Memory:
``num_items x (fields + 16 per multi-valued field)`` int32, e.g. 1M items x 20 = 80 MB.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from lake_contract.delta_snapshot import DeltaSnapshot, read_snapshot_arrow
from trainer.feature_schema import MULTI_VALUED_WIDTH, FeatureSchema


def pad_list_array(array: pa.Array | pa.ChunkedArray, width: int, fill: int = 0) -> np.ndarray:
    """A list<int> Arrow column as a ``(rows, width)`` int64 matrix: each list truncated to
    ``width`` and right-padded with ``fill``; null lists are all ``fill``. Vectorised over the
    Arrow offsets (no per-row Python)."""
    if isinstance(array, pa.ChunkedArray):
        array = array.combine_chunks() if array.num_chunks != 1 else array.chunk(0)
    n = len(array)
    out = np.full((n, width), fill, dtype=np.int64)
    if n == 0:
        return out
    offsets = np.asarray(array.offsets)
    values = np.asarray(array.flatten().fill_null(fill), dtype=np.int64)
    lengths = np.minimum(np.diff(offsets), width)
    if array.null_count:
        lengths = np.where(np.asarray(array.is_null()), 0, lengths)
    rows = np.repeat(np.arange(n), lengths)
    starts = np.cumsum(lengths) - lengths
    cols = np.arange(lengths.sum()) - np.repeat(starts, lengths)
    src = np.repeat(offsets[:-1] - offsets[0], lengths) + cols
    out[rows, cols] = values[src]
    return out


@dataclass
class ItemFeatureStore:
    """``fields[name]``: (num_items,) int64, or (num_items, 16) int64 for multi-valued fields
    (0-padded). ``log_q``: (num_items,) float32 log share of training positives (the
    in-batch sampling probability for logQ correction). ``category``: (num_items,) int64
    primary category index. ``popularity``: (num_items,) float32 training positives
    (ItemPop). ``valid``: (num_items,) bool, True for items that exist (index > 0)."""

    fields: dict[str, torch.Tensor]
    log_q: torch.Tensor
    category: torch.Tensor
    popularity: torch.Tensor
    valid: torch.Tensor

    @property
    def num_items(self) -> int:
        return int(self.log_q.shape[0])

    def features(self, item_idx: torch.Tensor) -> dict[str, torch.Tensor]:
        """Item fields for ``item_idx`` of any shape (...,) -> {name: (..., [16])}."""
        return {name: table[item_idx] for name, table in self.fields.items()}

    def to(self, device: torch.device | str) -> ItemFeatureStore:
        return ItemFeatureStore(
            fields={k: v.to(device) for k, v in self.fields.items()}, log_q=self.log_q.to(device),
            category=self.category.to(device), popularity=self.popularity.to(device), valid=self.valid.to(device),
        )

    def grown(self, num_items: int) -> ItemFeatureStore:
        """Pad to ``num_items`` rows (new rows unknown, never sampled)."""
        extra = num_items - self.num_items
        if extra <= 0:
            return self

        def pad(t: torch.Tensor, value=0) -> torch.Tensor:
            return torch.cat([t, torch.full((extra, *t.shape[1:]), value, dtype=t.dtype, device=t.device)])

        return ItemFeatureStore(fields={k: pad(v) for k, v in self.fields.items()},
                                log_q=pad(self.log_q, float(self.log_q.min())), category=pad(self.category),
                                popularity=pad(self.popularity), valid=pad(self.valid, False))


def load_item_store(snapshot: DeltaSnapshot, schema: FeatureSchema) -> ItemFeatureStore:
    """Read ``features/items`` (pinned ``snapshot``) into an ``ItemFeatureStore`` sized by
    ``schema.num_items``. Items whose index is beyond the schema's vocabulary raise."""
    wanted = ["item_idx", "log_q", "primary_category_idx", "n_positives", *[f.name for f in schema.item_fields]]
    table = read_snapshot_arrow(snapshot, wanted)
    idx = np.asarray(table.column("item_idx").to_numpy(zero_copy_only=False), dtype=np.int64)
    n = schema.num_items
    if len(idx) and (idx.max() >= n or idx.min() < 0):
        raise ValueError(f"features/items has item_idx {idx.max()} but vocab/item_id has size {n}: "
                         "the feature table and vocabulary come from different builds; re-run jobs.build_features")
    fields: dict[str, torch.Tensor] = {}
    for spec in schema.item_fields:
        column = table.column(spec.name)
        if spec.kind == "multi_valued":
            dense = np.zeros((n, MULTI_VALUED_WIDTH), dtype=np.int64)
            dense[idx] = pad_list_array(column, MULTI_VALUED_WIDTH)
        else:
            dense = np.zeros(n, dtype=np.int64)
            dense[idx] = np.asarray(column.fill_null(0).to_numpy(zero_copy_only=False), dtype=np.int64)
        if dense.max(initial=0) >= spec.size:
            raise ValueError(f"features/items.{spec.name} has index {dense.max()} >= its vocabulary size {spec.size}")
        fields[spec.name] = torch.from_numpy(dense)
    log_q = np.full(n, np.nan, dtype=np.float32)
    log_q[idx] = table.column("log_q").fill_null(np.nan).to_numpy(zero_copy_only=False)
    floor = np.nanmin(log_q) if np.isfinite(log_q).any() else 0.0
    log_q = np.where(np.isfinite(log_q), log_q, floor).astype(np.float32)
    category = np.zeros(n, dtype=np.int64)
    category[idx] = table.column("primary_category_idx").fill_null(0).to_numpy(zero_copy_only=False)
    popularity = np.zeros(n, dtype=np.float32)
    popularity[idx] = table.column("n_positives").fill_null(0).to_numpy(zero_copy_only=False)
    valid = np.zeros(n, dtype=bool)
    valid[idx] = True
    valid[0] = False
    return ItemFeatureStore(fields=fields, log_q=torch.from_numpy(log_q), category=torch.from_numpy(category),
                            popularity=torch.from_numpy(popularity), valid=torch.from_numpy(valid))
