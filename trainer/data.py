"""Training data: exact Delta snapshots streamed by Petastorm, sharded by rank.

``resolve_pairs`` pins one version of ``pairs/<split>`` and lists its Parquet files
(docs/design.md decision 2); the version goes into the model manifest. ``train_batches`` hands
that file list to Petastorm's batch ``Reader`` (what ``make_batch_reader`` builds) with
``cur_shard=rank, shard_count=world`` (row groups are dealt to ranks). Its reader threads turn
each row group into numpy columns in one call per column (no per-row conversion: Petastorm's
own results reader ``np.vstack``-ed the list columns row by row), the row groups are put back
in Petastorm's seeded order, and ``shuffled_batches`` permutes windows of
``shuffle_buffer`` rows with a numpy stream of (seed, epoch, rank) instead of Petastorm's
torch-drawn shuffling buffer, so batches are deterministic with any number of reader
threads. On ML-100K this took the loader from 0.16x to about 0.8x the rows/s of a raw
pyarrow read of the same files (benchmarks/bench_train.py --only loader; docs/training.md).
``synchronized`` makes every rank run the same
number of steps: the ranks agree (one all-reduce per 16 steps) on how many full batches all
of them still have, so uneven shards never hang DDP and no rank trains alone.
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
    """Index columns as int64; a null (a NaN in a float array) becomes 0 = unknown."""
    values = np.asarray(array)
    if values.dtype.kind == "f":
        values = np.nan_to_num(values, nan=0.0)
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.int64))


def _list_array(column: pa.Array | pa.ChunkedArray) -> pa.Array:
    if isinstance(column, pa.ChunkedArray):
        return column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    return column


def _fixed_lists(column: pa.Array | pa.ChunkedArray, width: int) -> np.ndarray:
    """A list column as a ``(rows, width)`` integer matrix. ``pairs.hist`` is written padded to
    N, so its flat values are viewed as that matrix as they are (zero-copy, the file's dtype);
    a ragged or null list is truncated and 0-padded by ``pad_list_array``. Either way one numpy
    call per row group, no per-row Python."""
    array = _list_array(column)
    values = array.flatten()
    if not array.null_count and not values.null_count and len(array) and width and \
            bool(np.all(np.diff(np.asarray(array.offsets)) == width)):
        return np.asarray(values).reshape(len(array), width)
    return pad_list_array(array, width)


def _scalars(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """An index column as numpy in the file's dtype; a null becomes 0 = unknown."""
    return (column.fill_null(0) if column.null_count else column).to_numpy()


def _offline_negatives(table: pa.Table, width: int, kinds: tuple[str, ...] | None) -> np.ndarray:
    """``neg_item_idx`` of one row group as ``(rows, width)`` int64: only the negatives whose
    ``neg_kind`` is in ``kinds`` (all when None), in their order, truncated and 0-padded;
    vectorised over the flat Arrow values."""
    negatives = _list_array(table.column("neg_item_idx"))
    if kinds is not None:
        keep = pc.is_in(_list_array(table.column("neg_kind")).flatten(), value_set=pa.array(kinds, pa.string()))
        keep = np.asarray(keep.fill_null(False), dtype=bool)
        offsets = np.asarray(negatives.offsets, dtype=np.int64)
        rows = np.repeat(np.arange(len(negatives)), np.diff(offsets))
        lengths = np.bincount(rows[keep], minlength=len(negatives))
        new_offsets = np.concatenate([[0], np.cumsum(lengths)])
        values = np.asarray(negatives.flatten().fill_null(0), dtype=np.int64)[keep]
        negatives = pa.ListArray.from_arrays(pa.array(new_offsets, pa.int32()), pa.array(values, pa.int64()))
    return pad_list_array(negatives, width)


@dataclass(frozen=True)
class _Columns:
    """How one row group (an Arrow table) becomes the int64 numpy columns of a batch."""

    schema: FeatureSchema
    negatives_width: int
    negative_kinds: tuple[str, ...] | None

    @property
    def read(self) -> list[str]:
        columns = [*user_columns(self.schema), "item_idx"]
        return [*columns, "neg_item_idx", "neg_kind"] if self.negatives_width else columns

    def convert(self, table: pa.Table) -> dict[str, np.ndarray]:
        """Integer numpy columns (the file's dtype; ``_as_int64`` widens them per batch), one
        numpy call per column."""
        out = {"hist": _fixed_lists(table.column("hist"), self.schema.history_length)}
        scalars = ["user_idx", "item_idx"]
        for spec in self.schema.user_fields:
            if spec.kind == "multi_valued":
                # padded to the feature contract's width, as evaluation and serving pad it
                out[spec.name] = pad_list_array(table.column(spec.name), MULTI_VALUED_WIDTH)
            else:
                scalars.append(spec.name)
        for name in scalars:
            out[name] = _scalars(table.column(name))
        if self.negatives_width:
            out["neg_item_idx"] = _offline_negatives(table, self.negatives_width, self.negative_kinds)
        return out


def _numbering_pool(workers: int, results_queue_size: int):
    """Petastorm's ThreadPool, numbering every row group it is handed. Petastorm's one
    ventilator thread hands them over in its seeded order, so the numbers ARE that order, and
    the results can be put back in it whichever reader thread finishes first."""
    from petastorm.workers_pool.thread_pool import ThreadPool

    class NumberingThreadPool(ThreadPool):
        def __init__(self) -> None:
            super().__init__(workers, results_queue_size)
            self.handed_out = 0

        def ventilate(self, *args, **kwargs) -> None:
            kwargs["sequence"] = self.handed_out
            self.handed_out += 1
            super().ventilate(*args, **kwargs)

    return NumberingThreadPool()


def _columns_worker(columns: _Columns):
    """Petastorm's ``ArrowReaderWorker`` reading its row group straight into the batch's numpy
    columns on the reader thread, published as ``(number, columns)`` (``None`` for an empty row
    group, so the order never waits for it). Its own ``process`` would open each file twice
    more and build a dataset per thread for predicates, row drops and caches that this reader
    never uses (no predicate, one row-drop partition, no cache: asserted)."""
    from petastorm.arrow_reader_worker import ArrowReaderWorker

    class ColumnsWorker(ArrowReaderWorker):
        def process(self, piece_index, worker_predicate, shuffle_row_drop_partition, sequence) -> None:
            assert worker_predicate is None and tuple(shuffle_row_drop_partition) == (0, 1)
            piece = self._split_pieces[piece_index]
            table = piece.read(columns=columns.read, use_threads=True, partitions=None)
            self.publish_func((sequence, columns.convert(table) if table.num_rows else None))

        @staticmethod
        def new_results_queue_reader():
            return _InOrder()

    return ColumnsWorker


class _InOrder:
    """Petastorm results-queue reader: row groups' columns in the ventilator's order. At most
    the row groups in flight (reader threads + ventilation queue + results queue) wait here."""

    def __init__(self) -> None:
        self.waiting: dict[int, dict[str, np.ndarray] | None] = {}
        self.next = 0

    @property
    def batched_output(self) -> bool:
        return True

    def read_next(self, workers_pool, schema, ngram):
        from petastorm.workers_pool import EmptyResultError

        while True:
            while self.next not in self.waiting:
                try:
                    sequence, columns = workers_pool.get_results()
                except EmptyResultError:
                    if self.waiting:
                        raise RuntimeError(f"Petastorm finished without row group {self.next}") from None
                    raise StopIteration from None
                self.waiting[sequence] = columns
            columns = self.waiting.pop(self.next)
            self.next += 1
            if columns is not None and len(columns["item_idx"]):
                return columns


@dataclass(frozen=True)
class LoaderSettings:
    batch_size: int
    workers: int
    shuffle_buffer: int
    seed: int
    negatives_width: int = 0  # > 0: read and pad pairs.neg_item_idx (pointwise loss)
    negative_kinds: tuple[str, ...] | None = None  # offline negative kinds kept (None: all)
    pin_memory: bool = False  # page-locked batches for asynchronous host-to-GPU copies


def shuffle_rng(settings: LoaderSettings, epoch: int, rank: int) -> np.random.Generator | None:
    """The shuffle's own stream: a function of (seed, epoch, rank) alone; None without shuffling."""
    if not settings.shuffle_buffer:
        return None
    return np.random.default_rng([settings.seed, epoch, rank])


def _rows(array: np.ndarray) -> np.ndarray:
    """A ``(rows, width)`` matrix as a vector of ``rows`` opaque ``width``-wide records, so that
    gathering rows copies whole records (several times faster than numpy's 2-D fancy indexing)."""
    if array.ndim == 1 or not array.shape[1]:
        return array
    array = np.ascontiguousarray(array)
    return array.view(np.dtype((np.void, array.shape[1] * array.itemsize))).reshape(len(array))


def _take(records: np.ndarray, like: np.ndarray, rows) -> np.ndarray:
    """Rows ``rows`` (a slice or indices) of ``like``, gathered from its ``_rows`` view."""
    if records is like:
        return like[rows]
    return records[rows].view(like.dtype).reshape(-1, like.shape[1])


def _as_int64(array: np.ndarray) -> torch.Tensor:
    """A column as an int64 tensor of its own memory (Arrow's zero-copy buffers are read-only).
    numpy widens on this thread alone: torch's ``.long()`` splits the copy over its intra-op
    threads, which on a busy machine wait for each other (measured 10x slower here)."""
    if array.dtype == np.int64 and array.flags.writeable:
        return torch.from_numpy(array)
    return torch.from_numpy(array.astype(np.int64))


def shuffled_batches(groups: Iterator[dict[str, np.ndarray]], batch_size: int, window: int,
                     rng: np.random.Generator | None) -> Iterator[Batch]:
    """Full batches of ``batch_size`` rows (int64 tensors) from row groups' numpy columns, in
    order. Row groups are pooled until at least ``window`` rows (and one batch) are there; the
    pool is permuted by ``rng`` (kept in order when None) in one gather per column, widened to
    int64 once, and cut into batches (views, no per-batch copy); the rows left over (fewer than
    a batch) join the next pool. The last partial batch is dropped. Every row is in exactly one
    batch or in that last remainder."""
    need = max(window, batch_size)
    pending: list[dict[str, np.ndarray]] = []
    rows = 0

    def flush(final: bool) -> Iterator[Batch]:
        nonlocal pending, rows
        pool = pending[0] if len(pending) == 1 else {k: np.concatenate([p[k] for p in pending]) for k in pending[0]}
        records = {k: _rows(v) for k, v in pool.items()}
        order = None if rng is None else rng.permutation(rows)
        full = rows - rows % batch_size
        used = slice(0, full) if order is None else order[:full]
        window = {k: _as_int64(_take(records[k], v, used)) for k, v in pool.items()}
        for start in range(0, full, batch_size):
            yield {k: v[start:start + batch_size] for k, v in window.items()}
        rest = slice(full, rows) if order is None else order[full:]
        pending = [] if final or full == rows else [{k: _take(records[k], v, rest) for k, v in pool.items()}]
        rows -= full

    for group in groups:
        pending.append(group)
        rows += len(group["item_idx"])
        if rows >= need:
            yield from flush(final=False)
    if rows >= batch_size:
        yield from flush(final=True)


@contextmanager
def train_batches(snapshot: DeltaSnapshot, schema: FeatureSchema, ctx: DistContext, settings: LoaderSettings,
                  epoch: int) -> Iterator[Iterator[Batch]]:
    """Petastorm batches of this rank's shard of ``snapshot`` for one epoch (full batches of
    ``settings.batch_size`` rows; the last partial batch is dropped).

    Petastorm reads the snapshot's files (``Reader`` with ``cur_shard=rank, shard_count=world``:
    row groups dealt to ranks; row-group order seeded by ``seed + epoch``); each row group is
    converted to int64 numpy on the reader threads (list columns reshaped or padded in one call,
    not per row), put back in Petastorm's order whatever thread finishes first, and batched by
    ``shuffled_batches`` with a permutation seeded by (seed, epoch, rank) over windows of
    ``settings.shuffle_buffer`` rows. So an epoch's batches are a function of (snapshot, seed,
    epoch, rank, world) alone, with any number of reader threads: a resume that replays the
    first batches lands exactly where the killed run was."""
    from petastorm.errors import NoDataAvailableError
    from petastorm.reader import Reader, get_filesystem_and_path_or_paths, normalize_dataset_url_or_urls

    columns = _Columns(schema, settings.negatives_width, settings.negative_kinds)
    urls = normalize_dataset_url_or_urls(list(snapshot.files))
    filesystem, paths = get_filesystem_and_path_or_paths(urls)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            reader = Reader(
                filesystem, paths, schema_fields=columns.read, worker_class=_columns_worker(columns),
                reader_pool=_numbering_pool(settings.workers, results_queue_size=max(4, 2 * settings.workers)),
                seed=settings.seed + epoch, shuffle_row_groups=True, shard_seed=settings.seed,
                cur_shard=ctx.rank if ctx.distributed else None,
                shard_count=ctx.world_size if ctx.distributed else None, num_epochs=1, is_batched_reader=True,
            )
    except NoDataAvailableError as err:  # Petastorm's check: fewer row groups than shards
        raise BadInputError(f"pairs table has fewer row groups than the {ctx.world_size} ranks need (one each): "
                            "rebuild the pairs with more files or train with fewer processes") from err
    try:
        groups = shuffled_batches(iter(reader), settings.batch_size, settings.shuffle_buffer,
                                  shuffle_rng(settings, epoch, ctx.rank))

        def batches() -> Iterator[Batch]:
            for batch in groups:
                yield {k: v.pin_memory() for k, v in batch.items()} if settings.pin_memory else batch

        yield batches()
    finally:
        reader.stop()
        reader.join()


def synchronized(batches: Iterator[Batch], ctx: DistContext, max_steps: int | None = None,
                 lookahead: int = 16) -> Iterator[Batch]:
    """Yield batches while EVERY rank has one (and fewer than ``max_steps`` were yielded).

    The ranks agree once per ``lookahead`` steps, not before every step: each reads up to
    ``lookahead`` batches ahead, one all-reduce takes the smallest count, and every rank yields
    that many. Same batches and the same number of steps as agreeing step by step (the
    smallest shard's full batches), with one tiny collective per ``lookahead`` steps."""
    from collections import deque

    ahead: deque[Batch] = deque()
    step, exhausted = 0, False
    while max_steps is None or step < max_steps:
        want = lookahead if max_steps is None else min(lookahead, max_steps - step)
        while not exhausted and len(ahead) < want:
            batch = next(batches, None)
            if batch is None:
                exhausted = True
            else:
                ahead.append(batch)
        agreed = int(ctx.all_reduce(torch.tensor([min(len(ahead), want)], dtype=torch.int64), "min").item())
        if agreed == 0:
            return
        for _ in range(agreed):
            step += 1
            yield ahead.popleft()


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
