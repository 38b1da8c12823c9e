"""A tiny, consistent lake written WITHOUT Spark (delta-rs only), plus a saved model version.

For index/publish/recommend tests that need lake tables and a model but not a real feature
build or a training run. Sizes match ``tests/trainer_fixtures.py`` (NUM_USERS=20,
NUM_ITEMS=30, HIST=6: indices 1..19 / 1..29 are real, 0 is unknown/padding). Ids are NOT
equal to indices (user index i is ``"u{100+i}"``, item index i is ``"i{500+i}"``), so code
that confuses an id with an index fails.

What ``make_tiny_lake(root)`` writes (all deterministic):

* ``vocab/user_id``, ``vocab/item_id``: value, index int64, count int64, min_count int32, added_by
* ``features/items``: item_idx int32, item_id, genres_idx list<int32> (1-3 genres of 1..4),
  year_bucket int32 (0..3), log_q double, primary_category_idx int32 (1..3), n_positives int64
* ``features/users``: user_idx int32, user_id, gender_idx int32 (0..2), age_bucket int32 (0..5)
* ``pairs/valid``: one row per user: user_idx int32, item_idx int32 (the held-out item),
  hist list<int32> of exactly 6 (most recent first, 0-padded), gender_idx, age_bucket,
  seen_items list<int32> (the history's items), event_ts timestamp[us, UTC]
* ``bronze/interactions``: user_id, item_id, rating double, event_ts timestamp[us, UTC],
  event_date date (partition): each user's history events, then the held-out event last
* ``bronze/items``: item_id, title
* ``models/m1``: a randomly initialised (seeded) small ``TwoTowerModel`` over ``tiny_schema()``
  with config/schema/manifest/metrics.json as ``jobs.train`` writes them; its metrics are
  the REAL full-catalog metrics of that model on ``pairs/valid`` (valid and test alike).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from deltalake import write_deltalake

from tests.trainer_fixtures import HIST, NUM_ITEMS, NUM_USERS, tiny_schema

MODEL_VERSION = "m1"
EVAL_KS = (5, 10, 20, 50)
_BASE_TS = datetime(2026, 1, 1, tzinfo=UTC)


def user_id_of(user_idx: int) -> str:
    return f"u{100 + int(user_idx)}"


def item_id_of(item_idx: int) -> str:
    return f"i{500 + int(item_idx)}"


def _write(root: Path, relative: str, table: pa.Table, partition_by: list[str] | None = None) -> str:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    write_deltalake(str(path), table, partition_by=partition_by)
    return relative


def _vocab(ids: list[str], counts: np.ndarray) -> pa.Table:
    n = len(ids)
    return pa.table({
        "value": pa.array(ids, pa.string()),
        "index": pa.array(np.arange(1, n + 1), pa.int64()),
        "count": pa.array(counts, pa.int64()),
        "min_count": pa.array([1] * n, pa.int32()),
        "added_by": pa.array(["tiny_lake"] * n, pa.string()),
    })


def tiny_lake_rows(seed: int = 0) -> dict[str, Any]:
    """The lake's content as numpy arrays (what ``make_tiny_lake`` writes)."""
    rng = np.random.default_rng(seed)
    items = np.arange(1, NUM_ITEMS)
    users = np.arange(1, NUM_USERS)
    genre_lengths = rng.integers(1, 4, size=items.size)
    genres = [sorted(rng.choice(np.arange(1, 5), size=n, replace=False).tolist()) for n in genre_lengths]
    hist = np.zeros((users.size, HIST), dtype=np.int32)
    targets = np.zeros(users.size, dtype=np.int32)
    for row in range(users.size):
        length = HIST if row % 3 else 3  # every third user has a short history
        picks = rng.choice(items, size=length + 1, replace=False)
        hist[row, :length] = picks[:length]
        targets[row] = picks[length]
    n_positives = np.bincount(np.concatenate([hist[hist > 0], targets]), minlength=NUM_ITEMS)[1:]
    return {
        "items": items, "users": users, "genres": genres,
        "year_bucket": rng.integers(0, 4, size=items.size), "category": rng.integers(1, 4, size=items.size),
        "n_positives": n_positives, "gender": rng.integers(0, 3, size=users.size),
        "age": rng.integers(0, 6, size=users.size), "hist": hist, "targets": targets,
    }


def make_tiny_lake(root: str | Path, seed: int = 0, model_version: str | None = MODEL_VERSION) -> dict[str, Any]:
    """Write the tiny lake under ``root`` (created) and, unless ``model_version`` is None, a
    model version. Returns ``{"root", "tables": {name: relative path}, "model_version",
    "model_path", "user_ids", "item_ids", "hist", "targets"}`` (ids in index order, index 1
    first; ``hist``/``targets`` the pairs/valid rows in user order)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    r = tiny_lake_rows(seed)
    items, users = r["items"], r["users"]
    item_ids = [item_id_of(i) for i in items]
    user_ids = [user_id_of(u) for u in users]
    hist, targets = r["hist"], r["targets"]
    n_pos = r["n_positives"]
    tables = {}

    tables["vocab/item_id"] = _write(root, "vocab/item_id", _vocab(item_ids, n_pos + 1))
    tables["vocab/user_id"] = _write(root, "vocab/user_id", _vocab(user_ids, (hist > 0).sum(1) + 1))
    log_q = np.log(np.maximum(n_pos, 0.5) / n_pos.sum())
    tables["features/items"] = _write(root, "features/items", pa.table({
        "item_idx": pa.array(items, pa.int32()),
        "item_id": pa.array(item_ids, pa.string()),
        "genres_idx": pa.array(r["genres"], pa.list_(pa.int32())),
        "year_bucket": pa.array(r["year_bucket"], pa.int32()),
        "log_q": pa.array(log_q, pa.float64()),
        "primary_category_idx": pa.array(r["category"], pa.int32()),
        "n_positives": pa.array(n_pos, pa.int64()),
    }))
    tables["features/users"] = _write(root, "features/users", pa.table({
        "user_idx": pa.array(users, pa.int32()),
        "user_id": pa.array(user_ids, pa.string()),
        "gender_idx": pa.array(r["gender"], pa.int32()),
        "age_bucket": pa.array(r["age"], pa.int32()),
    }))
    last_ts = [_BASE_TS + timedelta(days=int(u), hours=HIST + 1) for u in users]
    tables["pairs/valid"] = _write(root, "pairs/valid", pa.table({
        "user_idx": pa.array(users, pa.int32()),
        "item_idx": pa.array(targets, pa.int32()),
        "hist": pa.array(hist.tolist(), pa.list_(pa.int32())),
        "gender_idx": pa.array(r["gender"], pa.int32()),
        "age_bucket": pa.array(r["age"], pa.int32()),
        "seen_items": pa.array([row[row > 0].tolist() for row in hist], pa.list_(pa.int32())),
        "event_ts": pa.array(last_ts, pa.timestamp("us", tz="UTC")),
    }))
    # Bronze events: hist[j] happened j+1 hours before the held-out event (most recent first).
    ev_user, ev_item, ev_ts = [], [], []
    for row, u in enumerate(users):
        for j, item in enumerate(hist[row]):
            if item > 0:
                ev_user.append(user_id_of(u))
                ev_item.append(item_id_of(item))
                ev_ts.append(last_ts[row] - timedelta(hours=j + 1))
        ev_user.append(user_id_of(u))
        ev_item.append(item_id_of(targets[row]))
        ev_ts.append(last_ts[row])
    tables["bronze/interactions"] = _write(root, "bronze/interactions", pa.table({
        "user_id": pa.array(ev_user, pa.string()),
        "item_id": pa.array(ev_item, pa.string()),
        "rating": pa.array([5.0 if k % 2 else 4.0 for k in range(len(ev_user))], pa.float64()),
        "event_ts": pa.array(ev_ts, pa.timestamp("us", tz="UTC")),
        "event_date": pa.array([t.date() for t in ev_ts], pa.date32()),
    }), partition_by=["event_date"])
    tables["bronze/items"] = _write(root, "bronze/items", pa.table({
        "item_id": pa.array(item_ids, pa.string()),
        "title": pa.array([f"Tiny Movie {i} ({1990 + int(i)})" for i in items], pa.string()),
    }))
    model_path = save_tiny_model(root, model_version, seed=seed) if model_version else None
    return {"root": str(root), "tables": tables, "model_version": model_version, "model_path": model_path,
            "user_ids": user_ids, "item_ids": item_ids, "hist": hist, "targets": targets}


def tiny_train_config():
    from trainer.config import ModelConfig, TrainConfig

    return TrainConfig(model=ModelConfig(field_dim=8, hidden=(16,), out_dim=8), eval_ks=EVAL_KS)


def save_tiny_model(root: str | Path, version: str, seed: int = 0, parent: str | None = None,
                    valid_overrides: dict[str, float] | None = None) -> Path:
    """Save a seeded, untrained small model as ``models/<version>`` the way ``jobs.train`` does.

    metrics.json holds the model's real metrics on ``pairs/valid`` (as both "valid" and
    "test"); ``valid_overrides`` (e.g. ``{"hr@10": 0.0}``) replaces some of the model's VALID
    metrics, to stage a model that looks worse than the current release."""
    import torch

    from lake_contract.delta_snapshot import resolve_snapshot, table_version
    from lake_contract.lake import Lake
    from trainer.artifacts import StagedModel
    from trainer.data import resolve_pairs
    from trainer.evaluation import evaluate_split
    from trainer.item_store import load_item_store
    from trainer.towers import TwoTowerModel

    lake = Lake(str(root))
    schema = tiny_schema()
    config = tiny_train_config()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = TwoTowerModel(config.model, schema)
    model.eval()
    store = load_item_store(resolve_snapshot(lake.table("features/items")), schema)
    valid = evaluate_split(model, store, resolve_pairs(lake.root, "valid"), schema, EVAL_KS, torch.device("cpu"),
                           negatives_width=0)
    metrics = {"valid": json.loads(json.dumps(valid)), "test": json.loads(json.dumps(valid))}
    metrics["valid"]["model"].update(valid_overrides or {})
    versions = {t: table_version(lake.table(t)) for t in ("features/items", "features/users", "pairs/valid",
                                                          "vocab/item_id", "vocab/user_id")}
    staged = StagedModel.start(lake.root, version)
    try:
        staged.save_weights({k: v.cpu() for k, v in model.state_dict().items()})
        staged.write_json("config.json", config.to_dict())
        (staged.folder / "schema.json").write_text(schema.to_json())
        staged.write_json("metrics.json", {**metrics, "history": [], "best_epoch": 0})
        staged.write_json("manifest.json", {
            "version": version, "parent": parent, "preset": "tiny", "kind": "full" if parent is None else "finetune",
            "table_versions": versions, "backend": "single", "world_size": 1, "device": "cpu",
            "torch": torch.__version__, "train_seconds": 0.0, "samples_per_s": 0.0, "best_epoch": 0,
        })
        return staged.commit()
    except BaseException:
        staged.abort()
        raise
