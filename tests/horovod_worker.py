"""Run under ``horovodrun -np 2 --gloo``: one training step of each test config on this
rank's half of a fixed batch; rank 0 saves the parameters (see tests/test_horovod.py)."""

from __future__ import annotations

import sys

import torch

from tests.test_ddp import CONFIGS, ROWS_PER_RANK, _global_batch
from tests.trainer_fixtures import tiny_schema, tiny_store
from trainer.distributed import init_distributed, shutdown, wrap_model, wrap_optimizer
from trainer.task import TwoTowerTrainTask
from trainer.towers import TwoTowerModel


def main(name: str, out: str) -> None:
    ctx = init_distributed("horovod")
    try:
        config = CONFIGS[name]
        torch.manual_seed(0)
        model = TwoTowerModel(config.model, tiny_schema())
        optimizer = wrap_optimizer(torch.optim.SGD(model.parameters(), lr=0.5), model, ctx)
        task = TwoTowerTrainTask(wrap_model(model, ctx), tiny_store(), config, ctx)
        rank = ctx.rank
        batch = {k: v[rank * ROWS_PER_RANK:(rank + 1) * ROWS_PER_RANK] for k, v in _global_batch(config).items()}
        loss = task.loss(batch, step=0).total
        loss.backward()
        optimizer.step()
        total = ctx.all_reduce(loss.detach().clone()) / ctx.world_size
        if rank == 0:
            torch.save({"state": model.state_dict(), "loss": total, "world": ctx.world_size}, out)
    finally:
        shutdown(ctx)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
