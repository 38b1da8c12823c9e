"""Multi-process DDP (gloo on CPU) against single-process references, and uneven shards."""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp

from tests.trainer_fixtures import free_port, set_dist_env, tiny_batch, tiny_schema, tiny_store
from trainer.config import ModelConfig, TrainConfig
from trainer.distributed import DistContext, exit_process, init_distributed, shutdown, wrap_model
from trainer.task import TwoTowerTrainTask
from trainer.towers import TwoTowerModel

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(180)]

WORLD = 2
ROWS_PER_RANK = 8

CONFIGS = {
    # in-batch softmax with logQ over the GLOBAL batch, plus DAT's mimic and category alignment
    # losses (the latter on gathered candidates), SENet on both towers, attention pooling
    "softmax-dat": TrainConfig(loss="softmax", logq=True, dat_mimic_weight=0.5, dat_cal_weight=1.0,
                               model=ModelConfig(field_dim=8, hidden=(16,), out_dim=8, dat=True, senet_user=True,
                                                 senet_item=True, history_pooling="attention",
                                                 learn_temperature=True)),
    # the sequential user tower (causal self-attention blocks over the history) under the
    # default preset's losses; dropout 0: each rank would draw its own dropout masks
    "transformer-dat": TrainConfig(loss="softmax", logq=True, dat_mimic_weight=0.5, dat_cal_weight=1.0,
                                   model=ModelConfig(field_dim=8, hidden=(16,), out_dim=8, dat=True,
                                                     history_pooling="transformer", seq_layers=2, seq_heads=2,
                                                     seq_dropout=0.0)),
    "bce": TrainConfig(loss="bce", logq=False, max_offline_negatives=3,
                       model=ModelConfig(field_dim=8, hidden=(16,), out_dim=8, history_pooling="mean+recent")),
}


def _one_step(model: torch.nn.Module, config: TrainConfig, ctx: DistContext, batch: dict) -> torch.Tensor:
    task = TwoTowerTrainTask(wrap_model(model, ctx), tiny_store(), config, ctx)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    loss = task.loss(batch, step=0).total
    loss.backward()
    optimizer.step()
    return loss.detach()


def _global_batch(config: TrainConfig) -> dict:
    return tiny_batch(ROWS_PER_RANK * WORLD, seed=11, negatives=3 if config.loss == "bce" else 0)


def _worker(rank: int, port: int, name: str, out: str) -> None:
    set_dist_env(rank, WORLD, port)
    ctx = init_distributed("ddp", timeout_s=60)
    try:
        config = CONFIGS[name]
        torch.manual_seed(0)
        model = TwoTowerModel(config.model, tiny_schema())
        batch = {k: v[rank * ROWS_PER_RANK:(rank + 1) * ROWS_PER_RANK] for k, v in _global_batch(config).items()}
        loss = _one_step(model, config, ctx, batch)
        total = ctx.all_reduce(loss.clone()) / WORLD
        if rank == 0:
            torch.save({"state": model.state_dict(), "loss": total}, out)
        ctx.barrier()
    finally:
        shutdown(ctx)
    exit_process(0)  # gloo: skip interpreter finalisation (see exit_process)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_one_ddp_step_equals_a_single_process_step_on_the_concatenated_batch(tmp_path, name):
    out = str(tmp_path / "rank0.pt")
    mp.spawn(_worker, args=(free_port(), name, out), nprocs=WORLD, join=True)
    config = CONFIGS[name]
    torch.manual_seed(0)
    reference = TwoTowerModel(config.model, tiny_schema())
    before = {k: v.clone() for k, v in reference.state_dict().items()}
    ref_loss = _one_step(reference, config, DistContext(), _global_batch(config))
    got = torch.load(out, weights_only=True)
    torch.testing.assert_close(got["loss"], ref_loss, rtol=1e-5, atol=1e-6)
    changed = 0
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(got["state"][key], value, rtol=1e-5, atol=1e-6, msg=f"parameter {key}")
        changed += int(not torch.equal(value, before[key]))
    assert changed >= 10  # the step really moved the towers (the comparison is not vacuous)


# ---------------------------------------------------------------- uneven shards


def _write_uneven_pairs(root: str, sizes: list[int]) -> None:
    import numpy as np
    import pyarrow as pa
    from deltalake import write_deltalake

    start = 0
    for size in sizes:
        ids = np.arange(start, start + size)
        start += size
        table = pa.table({
            "user_idx": pa.array(ids % 19 + 1, pa.int32()),
            "item_idx": pa.array(ids % 29 + 1, pa.int32()),
            "hist": pa.array([[int(i % 29) + 1] * 6 for i in ids], pa.list_(pa.int32())),
            "gender_idx": pa.array(ids % 3, pa.int32()),
            "age_bucket": pa.array(ids % 6, pa.int32()),
        })
        write_deltalake(root, table, mode="append")


def _shard_worker(rank: int, port: int, table: str, out: str) -> None:
    from lake_contract.delta_snapshot import resolve_snapshot
    from trainer.data import LoaderSettings, synchronized, train_batches

    set_dist_env(rank, WORLD, port)
    ctx = init_distributed("ddp", timeout_s=60)
    try:
        snapshot = resolve_snapshot(table)
        settings = LoaderSettings(batch_size=32, workers=1, shuffle_buffer=0, seed=5)
        with train_batches(snapshot, tiny_schema(), ctx, settings, epoch=0) as batches:
            own = sum(1 for _ in batches)  # this rank's full batches, unsynchronized
        with train_batches(snapshot, tiny_schema(), ctx, settings, epoch=0) as batches:
            synced = sum(1 for _ in synchronized(batches, ctx))
        with train_batches(snapshot, tiny_schema(), ctx, settings, epoch=0) as batches:
            capped = sum(1 for _ in synchronized(batches, ctx, max_steps=3, lookahead=2))
        counts = torch.tensor([own, synced, capped])
        gathered = [torch.zeros_like(counts) for _ in range(WORLD)]
        torch.distributed.all_gather(gathered, counts)
        if rank == 0:
            torch.save(torch.stack(gathered), out)
        ctx.barrier()
    finally:
        shutdown(ctx)
    exit_process(0)


def test_uneven_shards_run_the_same_number_of_steps_on_every_rank_without_hanging(tmp_path):
    table = str(tmp_path / "pairs")
    _write_uneven_pairs(table, [640, 32, 96, 352, 64])
    out = str(tmp_path / "counts.pt")
    mp.spawn(_shard_worker, args=(free_port(), table, out), nprocs=WORLD, join=True)
    counts = torch.load(out, weights_only=True)  # rows: rank; columns: own batches, synchronized steps
    own, synced, capped = counts[:, 0], counts[:, 1], counts[:, 2]
    assert capped.tolist() == [3] * WORLD
    assert own[0] != own[1], f"the shards should be uneven for this test to mean anything: {own.tolist()}"
    assert synced.tolist() == [int(own.min())] * WORLD
    assert int(own.sum()) == (640 + 32 + 96 + 352 + 64) // 32  # every full batch is dealt to some rank


# ---------------------------------------------------------------- every row once across ranks


def _rows_worker(rank: int, port: int, table: str, out: str) -> None:
    from lake_contract.delta_snapshot import resolve_snapshot
    from tests.test_loader import as_rows
    from trainer.data import LoaderSettings, synchronized, train_batches

    set_dist_env(rank, WORLD, port)
    ctx = init_distributed("ddp", timeout_s=60)
    try:
        settings = LoaderSettings(batch_size=32, workers=2, shuffle_buffer=100, seed=7)
        with train_batches(resolve_snapshot(table), tiny_schema(), ctx, settings, epoch=1) as batches:
            rows = [as_rows(b) for b in synchronized(batches, ctx)]
        gathered = ctx.gather_object(rows)
        if rank == 0:
            torch.save(gathered, out)
        ctx.barrier()
    finally:
        shutdown(ctx)
    exit_process(0)


def test_two_ranks_train_on_every_row_of_the_snapshot_once_in_equal_steps(tmp_path):
    import numpy as np

    from lake_contract.delta_snapshot import resolve_snapshot
    from tests.test_loader import raw_rows, sorted_rows, write_pairs

    table = str(tmp_path / "pairs")
    write_pairs(table, [96] * 6)  # 3 row groups of 96 rows per rank: 9 batches of 32 each
    out = str(tmp_path / "rows.pt")
    mp.spawn(_rows_worker, args=(free_port(), table, out), nprocs=WORLD, join=True)
    per_rank = torch.load(out, weights_only=False)
    assert [len(steps) for steps in per_rank] == [9, 9]
    got = [np.concatenate(steps) for steps in per_rank]
    both = np.concatenate(got)
    np.testing.assert_array_equal(sorted_rows(both), sorted_rows(raw_rows(resolve_snapshot(table))))
    for rows in got:  # whole row groups are dealt to a rank (user_idx counts rows from 1)
        groups, counts = np.unique((rows[:, 0] - 1) // 96, return_counts=True)
        assert len(groups) == 3 and counts.tolist() == [96] * 3
