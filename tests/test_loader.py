"""The Petastorm training loader (trainer/data.py ``train_batches``) on a real Delta table:
every row of the pinned snapshot once per epoch, exactly as a raw pyarrow read has it, and an
epoch's batch order a function of (seed, epoch, rank) alone, with 1 or 2 reader threads, so a
resume that replays the first batches is bit-exact. (Two ranks: tests/test_ddp.py.)"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from tests.trainer_fixtures import HIST, tiny_schema
from trainer.distributed import DistContext

# Row groups of uneven sizes (one file each); 1,120 rows = 70 batches of 16.
SIZES = [96, 40, 200, 8, 120, 64, 152, 24, 88, 136, 48, 144]
BATCH = 16


def write_pairs(root: str, sizes: list[int]) -> None:
    """``pairs``-shaped Delta table, one file per entry of ``sizes``; every row is unique
    (``user_idx`` counts rows), ``hist`` padded to HIST as build_features writes it."""
    from deltalake import write_deltalake

    start = 0
    for size in sizes:
        ids = np.arange(start, start + size)
        start += size
        write_deltalake(root, pa.table({
            "user_idx": pa.array(ids + 1, pa.int32()),
            "item_idx": pa.array(ids % 29 + 1, pa.int32()),
            "hist": pa.array([[int(i + j) % 29 + 1 if j <= i % HIST else 0 for j in range(HIST)] for i in ids],
                             pa.list_(pa.int32())),
            "gender_idx": pa.array([None if i % 7 == 0 else int(i % 3) for i in ids], pa.int32()),
            "age_bucket": pa.array(ids % 6, pa.int32()),
        }), mode="append")


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory):
    from lake_contract.delta_snapshot import resolve_snapshot

    root = str(tmp_path_factory.mktemp("loader") / "pairs")
    write_pairs(root, SIZES)
    return resolve_snapshot(root)


def raw_rows(snapshot) -> np.ndarray:
    """Every row of the snapshot as read by plain pyarrow: (rows, columns) int64, nulls as 0."""
    from lake_contract.delta_snapshot import snapshot_file_path

    table = pa.concat_tables([pq.read_table(snapshot_file_path(f)) for f in snapshot.files])
    hist = np.asarray(table.column("hist").combine_chunks().flatten(), dtype=np.int64).reshape(-1, HIST)
    scalars = [np.asarray(table.column(c).fill_null(0), dtype=np.int64)[:, None]
               for c in ("user_idx", "item_idx", "gender_idx", "age_bucket")]
    return np.concatenate([*scalars, hist], axis=1)


def as_rows(batch: dict[str, torch.Tensor]) -> np.ndarray:
    scalars = [batch[c].numpy()[:, None] for c in ("user_idx", "item_idx", "gender_idx", "age_bucket")]
    return np.concatenate([*scalars, batch["hist"].numpy()], axis=1)


def sorted_rows(rows: np.ndarray) -> np.ndarray:
    return rows[np.lexsort(rows.T[::-1])]


def epoch(snapshot, workers: int = 1, shuffle_buffer: int = 100, epoch: int = 0, seed: int = 3,
          skip: int = 0) -> list[dict[str, torch.Tensor]]:
    from trainer.data import LoaderSettings, train_batches

    settings = LoaderSettings(batch_size=BATCH, workers=workers, shuffle_buffer=shuffle_buffer, seed=seed)
    with train_batches(snapshot, tiny_schema(), DistContext(), settings, epoch) as batches:
        for _ in range(skip):
            next(batches)  # what trainer.loop does on resume
        return list(batches)


def same_batches(a: list[dict[str, torch.Tensor]], b: list[dict[str, torch.Tensor]]) -> bool:
    return len(a) == len(b) and all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
                                    for x, y in zip(a, b, strict=True))


def test_one_epoch_yields_every_row_of_the_snapshot_once_as_pyarrow_reads_it(snapshot):
    raw = raw_rows(snapshot)
    assert len(raw) == sum(SIZES) and len(raw) % BATCH == 0
    batches = epoch(snapshot)
    assert len(batches) == len(raw) // BATCH
    for batch in batches:
        assert {k: (v.dtype, tuple(v.shape)) for k, v in batch.items()} == {
            "user_idx": (torch.int64, (BATCH,)), "item_idx": (torch.int64, (BATCH,)),
            "gender_idx": (torch.int64, (BATCH,)), "age_bucket": (torch.int64, (BATCH,)),
            "hist": (torch.int64, (BATCH, HIST))}
    got = np.concatenate([as_rows(b) for b in batches])
    np.testing.assert_array_equal(sorted_rows(got), sorted_rows(raw))  # the same multiset: each row once
    assert (got[:, 2] == 0).sum() == (raw[:, 2] == 0).sum() > 0  # null gender_idx arrives as 0 = unknown


def test_shuffling_mixes_row_groups_and_changes_with_the_epoch(snapshot):
    plain = np.concatenate([as_rows(b) for b in epoch(snapshot, shuffle_buffer=0)])
    first = np.concatenate([as_rows(b) for b in epoch(snapshot, epoch=0)])
    second = np.concatenate([as_rows(b) for b in epoch(snapshot, epoch=1)])
    # Unshuffled: each row group's rows stay together in file order (row groups in Petastorm's
    # seeded order).
    group = row_group_of(plain)
    same = np.diff(group) == 0
    assert same.sum() == len(plain) - len(SIZES) and (np.diff(plain[:, 0])[same] == 1).all()
    assert not np.array_equal(first, plain) and not np.array_equal(first, second)
    np.testing.assert_array_equal(sorted_rows(first), sorted_rows(second))
    # A batch draws from a window of >= shuffle_buffer rows: the first 400 rows span several row groups.
    wide = epoch(snapshot, shuffle_buffer=400)
    assert all(len(set(row_group_of(as_rows(b)).tolist())) > 1 for b in wide[:400 // BATCH])


def row_group_of(rows: np.ndarray) -> np.ndarray:
    return np.searchsorted(np.cumsum(SIZES), rows[:, 0] - 1, side="right")


@pytest.mark.parametrize("workers", [1, 2])
def test_an_epoch_is_the_same_batches_every_time_and_a_mid_epoch_replay_is_bit_exact(snapshot, workers):
    reference = epoch(snapshot, workers=1)
    again = epoch(snapshot, workers=workers)
    assert same_batches(again, reference)  # 2 reader threads: racy completion, same order
    resumed = epoch(snapshot, workers=workers, skip=23)
    assert same_batches(resumed, reference[23:])


def test_a_null_or_ragged_history_is_padded_like_evaluation(tmp_path):
    from deltalake import write_deltalake

    from lake_contract.delta_snapshot import resolve_snapshot
    from trainer.data import LoaderSettings, train_batches
    from trainer.item_store import pad_list_array

    hist = pa.array([[1, 2, 3, 4, 5, 6], None, [7, 8], [9] * 9], pa.list_(pa.int32()))
    write_deltalake(str(tmp_path / "pairs"), pa.table({
        "user_idx": pa.array([1, 2, 3, 4], pa.int32()), "item_idx": pa.array([1, 2, 3, 4], pa.int32()),
        "hist": hist, "gender_idx": pa.array([1, 1, 1, 1], pa.int32()),
        "age_bucket": pa.array([1, 1, 1, 1], pa.int32())}))
    settings = LoaderSettings(batch_size=4, workers=1, shuffle_buffer=0, seed=0)
    with train_batches(resolve_snapshot(str(tmp_path / "pairs")), tiny_schema(), DistContext(), settings, 0) as b:
        (batch,) = list(b)
    np.testing.assert_array_equal(batch["hist"].numpy(), pad_list_array(hist, HIST))


@pytest.mark.parametrize("max_steps", [None, 37, 16, 1])
def test_synchronized_yields_the_loaders_batches_in_order_whatever_its_lookahead(snapshot, max_steps):
    from trainer.data import synchronized

    reference = epoch(snapshot)
    for lookahead in (1, 16, 100):
        got = list(synchronized(iter(reference), DistContext(), max_steps, lookahead))
        assert same_batches(got, reference[:max_steps])
