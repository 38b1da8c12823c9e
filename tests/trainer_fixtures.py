"""Tiny in-memory schemas, stores and batches for trainer tests (no lake, no Spark)."""

from __future__ import annotations

import os
import socket

import torch

from trainer.feature_schema import FeatureSchema, FieldSpec
from trainer.item_store import ItemFeatureStore

NUM_USERS, NUM_ITEMS, HIST = 20, 30, 6


def tiny_schema() -> FeatureSchema:
    return FeatureSchema(
        num_users=NUM_USERS, num_items=NUM_ITEMS, num_categories=4, history_length=HIST,
        user_fields=(FieldSpec("gender_idx", "categorical", 3), FieldSpec("age_bucket", "bucket", 6)),
        item_fields=(FieldSpec("genres_idx", "multi_valued", 5), FieldSpec("year_bucket", "bucket", 4)),
        table_versions={},
    )


def tiny_store(seed: int = 0) -> ItemFeatureStore:
    g = torch.Generator().manual_seed(seed)
    genres = torch.randint(0, 5, (NUM_ITEMS, 16), generator=g)
    genres[:, 3:] = 0
    popularity = torch.randint(1, 50, (NUM_ITEMS,), generator=g).float()
    popularity[0] = 0
    log_q = torch.log(popularity.clamp_min(0.5) / popularity.sum())
    valid = torch.ones(NUM_ITEMS, dtype=torch.bool)
    valid[0] = False
    return ItemFeatureStore(
        fields={"genres_idx": genres, "year_bucket": torch.randint(0, 4, (NUM_ITEMS,), generator=g)},
        log_q=log_q, category=torch.randint(1, 4, (NUM_ITEMS,), generator=g), popularity=popularity, valid=valid,
    )


def tiny_batch(rows: int, seed: int = 0, negatives: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    hist = torch.randint(1, NUM_ITEMS, (rows, HIST), generator=g)
    hist[: rows // 2, 3:] = 0  # some short histories
    batch = {
        "user_idx": torch.randint(1, NUM_USERS, (rows,), generator=g),
        "hist": hist,
        "gender_idx": torch.randint(0, 3, (rows,), generator=g),
        "age_bucket": torch.randint(0, 6, (rows,), generator=g),
        "item_idx": torch.randint(1, NUM_ITEMS, (rows,), generator=g),
    }
    if negatives:
        negs = torch.randint(1, NUM_ITEMS, (rows, negatives), generator=g)
        negs[::3, -1] = 0  # padding slots
        batch["neg_item_idx"] = negs
    return batch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def set_dist_env(rank: int, world: int, port: int) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(world),
                       "RANK": str(rank), "LOCAL_RANK": str(rank), "TOWERLAKE_FORCE_CPU": "1"})
