"""Training data: exact Delta snapshots streamed by Petastorm, sharded by rank.

``resolve_pairs`` pins one version of ``pairs/<split>`` and lists its Parquet files
(docs/design.md decision 2); the version goes into the model manifest. ``train_batches`` hands
that file list to Petastorm's ``make_batch_reader`` with ``cur_shard=rank,
shard_count=world`` (row groups are dealt to ranks) and batches it with Petastorm's
``BatchedDataLoader`` (shuffling buffer). ``synchronized`` makes every rank run the same
number of steps: before each step the ranks agree (one all-reduce of a flag) that all of
them still have a full batch, so uneven shards never hang DDP and no rank trains alone.
A rank's unused remainder is at most its shard's excess over the smallest shard.

Evaluation reads valid/test with plain pyarrow (``iter_eval_batches``): those rows carry
variable-length ``seen_items`` lists, which Petastorm's batch reader cannot collate.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from lake_contract.delta_snapshot import DeltaSnapshot, resolve_snapshot, snapshot_file_path
from lake_contract.errors import BadInputError
from lake_contract.lake import Lake
from trainer.distributed import DistContext
from trainer.feature_schema import MULTI_VALUED_WIDTH, FeatureSchema
from trainer.item_store import pad_list_array

log = logging.getLogger(__name__)

Batch = dict[str, torch.Tensor]


def resolve_pairs(lake_root: str, split: str, version: int | None = None) -> DeltaSnapshot:
    """Pin ``pairs/<split>`` at ``version`` (latest when None)."""
    snapshot = resolve_snapshot(Lake(lake_root).table(f"pairs/{split}"), version)
    if not snapshot.files:
        raise BadInputError(f"pairs/{split} version {snapshot.version} has no rows: rebuild features "
                            "(python -m jobs.build_features) or check the split settings")
    return snapshot


def snapshot_columns(snapshot: DeltaSnapshot) -> list[str]:
    import json

    return [f["name"] for f in json.loads(snapshot.schema_json)["fields"]]


def user_columns(schema: FeatureSchema) -> list[str]:
    """Pairs columns the user tower reads."""
    return ["user_idx", "hist", *[f.name for f in schema.user_fields]]


def _int64(array) -> torch.Tensor:
    """Index columns as int64; a null (which Petastorm hands over as NaN in a float array)
    becomes 0 = unknown, as in the evaluation path."""
    values = np.asarray(array)
    if values.dtype.kind == "f":
        values = np.nan_to_num(values, nan=0.0)
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.int64))


def _batch_from_numpy(columns: dict[str, np.ndarray], schema: FeatureSchema) -> Batch:
    out = {name: _int64(columns[name]) for name in ("user_idx", "item_idx", "hist")}
    for spec in schema.user_fields:
        out[spec.name] = _int64(columns[spec.name])
    if "neg_item_idx" in columns:
        out["neg_item_idx"] = _int64(columns["neg_item_idx"])
    return out


def _padded_lists(arrays, width: int) -> np.ndarray:
    """A column of list cells (numpy arrays, or None for a null list) as a ``(rows, width)``
    int64 matrix, truncated and 0-padded (``pad_list_array``), vectorised over the flat values."""
    lengths = np.fromiter((0 if a is None else len(a) for a in arrays), dtype=np.int64, count=len(arrays))
    present = [np.asarray(a, dtype=np.int64) for a in arrays if a is not None and len(a)]
    flat = np.concatenate(present) if present else np.zeros(0, np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    return pad_list_array(pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(flat, pa.int64())), width)


def _pairs_transform(schema: FeatureSchema, width: int, kinds: tuple[str, ...] | None):
    """Petastorm TransformSpec, or None when nothing needs it: every multi-valued user field
    padded to the feature contract's ``MULTI_VALUED_WIDTH`` (as evaluation and serving pad
    it; variable-length lists cannot be collated), and, when ``width`` > 0, the offline
    negatives of ``kinds`` (all when None) padded to ``width`` with 0 and ``neg_kind``
    dropped. Vectorised over the flattened lists of one row group."""
    multi_valued = [f.name for f in schema.user_fields if f.kind == "multi_valued"]
    if not width and not multi_valued:
        return None
    from petastorm import TransformSpec

    def pad(frame):
        for name in multi_valued:
            frame[name] = list(_padded_lists(frame[name].to_numpy(), MULTI_VALUED_WIDTH).astype(np.int32))
        if not width:
            return frame
        arrays = frame["neg_item_idx"].to_numpy()
        lengths = np.fromiter((len(a) for a in arrays), dtype=np.int64, count=len(arrays))
        flat = np.concatenate(arrays).astype(np.int64) if len(arrays) else np.zeros(0, np.int64)
        if kinds is not None:
            flat_kinds = np.concatenate(frame["neg_kind"].to_numpy()) if len(arrays) else np.zeros(0, str)
            keep = np.isin(flat_kinds, kinds)
            rows = np.repeat(np.arange(len(arrays)), lengths)
            flat = flat[keep]
            lengths = np.bincount(rows[keep], minlength=len(arrays))
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        padded = pad_list_array(pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(flat, pa.int64())),
                                width)
        frame["neg_item_idx"] = list(padded.astype(np.int32))
        return frame.drop(columns=["neg_kind"], errors="ignore")

    edit_fields = [(name, np.int32, (MULTI_VALUED_WIDTH,), False) for name in multi_valued]
    if width:
        edit_fields.append(("neg_item_idx", np.int32, (width,), False))
    return TransformSpec(pad, edit_fields=edit_fields, removed_fields=["neg_kind"] if width else [])


@dataclass(frozen=True)
class LoaderSettings:
    batch_size: int
    workers: int
    shuffle_buffer: int
    seed: int
    negatives_width: int = 0  # > 0: read and pad pairs.neg_item_idx (pointwise loss)
    negative_kinds: tuple[str, ...] | None = None  # offline negative kinds kept (None: all)
    pin_memory: bool = False  # page-locked batches for asynchronous host-to-GPU copies


@contextmanager
def train_batches(snapshot: DeltaSnapshot, schema: FeatureSchema, ctx: DistContext, settings: LoaderSettings,
                  epoch: int) -> Iterator[Iterator[Batch]]:
    """Petastorm batches of this rank's shard of ``snapshot`` for one epoch (full batches of
    ``settings.batch_size`` rows; the last partial batch is dropped). Row-group order and the
    shuffle buffer are seeded by ``seed + epoch``."""
    from petastorm import make_batch_reader
    from petastorm.pytorch import BatchedDataLoader

    columns = [*user_columns(schema), "item_idx"]
    if settings.negatives_width:
        columns += ["neg_item_idx", "neg_kind"]
    n_row_groups = _row_group_count(snapshot)
    if n_row_groups < ctx.world_size:
        raise BadInputError(f"pairs table has {n_row_groups} row groups but {ctx.world_size} ranks need one each: "
                            "rebuild the pairs with more files or train with fewer processes")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reader = make_batch_reader(
            list(snapshot.files), schema_fields=columns, reader_pool_type="thread",
            workers_count=settings.workers, seed=settings.seed + epoch, shuffle_row_groups=True,
            shard_seed=settings.seed, cur_shard=ctx.rank if ctx.distributed else None,
            shard_count=ctx.world_size if ctx.distributed else None, num_epochs=1,
            transform_spec=_pairs_transform(schema, settings.negatives_width, settings.negative_kinds),
        )
    try:
        loader = BatchedDataLoader(reader, batch_size=settings.batch_size,
                                   shuffling_queue_capacity=settings.shuffle_buffer)

        def batches() -> Iterator[Batch]:
            for raw in loader:
                if raw["user_idx"].shape[0] < settings.batch_size:
                    continue  # the last partial batch: every rank must gather equal shapes
                batch = _batch_from_numpy({k: v.numpy() for k, v in raw.items()}, schema)
                yield {k: v.pin_memory() for k, v in batch.items()} if settings.pin_memory else batch

        yield batches()
    finally:
        reader.stop()
        reader.join()


def synchronized(batches: Iterator[Batch], ctx: DistContext, max_steps: int | None = None) -> Iterator[Batch]:
    """Yield batches while EVERY rank has one (and fewer than ``max_steps`` were yielded)."""
    step = 0
    while max_steps is None or step < max_steps:
        batch = next(batches, None)
        if not ctx.all_agree(batch is not None):
            return
        step += 1
        yield batch  # type: ignore[misc]


def _row_group_count(snapshot: DeltaSnapshot) -> int:
    return sum(pq.ParquetFile(snapshot_file_path(f)).metadata.num_row_groups for f in snapshot.files)


@dataclass
class EvalBatch:
    """One batch of held-out rows: user inputs, ``item_idx`` (B,) targets, ``seen_offsets``
    (B+1,) / ``seen_values`` CSR of items seen before each row's event, and (when the pairs
    carry offline negatives) ``random_negatives`` (B, M) 0-padded random-kind negatives."""

    users: Batch
    item_idx: torch.Tensor
    seen_offsets: torch.Tensor
    seen_values: torch.Tensor
    random_negatives: torch.Tensor | None


def iter_eval_batches(snapshot: DeltaSnapshot, schema: FeatureSchema, batch_rows: int = 8192,
                      negatives_width: int = 0) -> Iterator[EvalBatch]:
    """Stream a valid/test snapshot file by file, ``batch_rows`` rows at a time."""
    available = set(snapshot_columns(snapshot))
    if "seen_items" not in available:
        raise BadInputError(f"{snapshot.table_uri} has no seen_items column: it is not a valid/test pairs table")
    columns = [*user_columns(schema), "item_idx", "seen_items"]
    use_negatives = negatives_width > 0 and {"neg_item_idx", "neg_kind"} <= available
    if use_negatives:
        columns += ["neg_item_idx", "neg_kind"]
    for file in snapshot.files:
        for record_batch in pq.ParquetFile(snapshot_file_path(file)).iter_batches(batch_size=batch_rows,
                                                                                  columns=columns):
            table = pa.Table.from_batches([record_batch])
            users = {name: _int64(table.column(name).to_numpy()) for name in ("user_idx", "item_idx")}
            users["hist"] = torch.from_numpy(pad_list_array(table.column("hist"), schema.history_length))
            for spec in schema.user_fields:
                if spec.kind == "multi_valued":
                    users[spec.name] = torch.from_numpy(pad_list_array(table.column(spec.name), MULTI_VALUED_WIDTH))
                else:
                    users[spec.name] = _int64(table.column(spec.name).fill_null(0).to_numpy())
            seen = table.column("seen_items").combine_chunks()
            offsets = np.asarray(seen.offsets, dtype=np.int64)
            seen_offsets = torch.from_numpy(offsets - offsets[0])
            seen_values = _int64(seen.flatten().fill_null(0).to_numpy())
            random_negatives = None
            if use_negatives:
                negs = table.column("neg_item_idx").combine_chunks()
                kinds = table.column("neg_kind").combine_chunks()
                is_random = pc.cast(pc.equal(kinds.flatten(), "random"), pa.int64())
                keep = pa.ListArray.from_arrays(kinds.offsets, is_random)
                values = pad_list_array(negs, negatives_width) * pad_list_array(keep, negatives_width)
                random_negatives = torch.from_numpy(values)
            item_idx = users.pop("item_idx")
            yield EvalBatch(users=users, item_idx=item_idx, seen_offsets=seen_offsets, seen_values=seen_values,
                            random_negatives=random_negatives)
