"""Evaluate a trained model version on the full catalog, side by side with ItemPop.

Exact full-catalog ranking for every valid/test row, with the user's point-in-time history,
excluding items the user interacted with before that moment (trainer/metrics.py explains
the protocol and the tie rule): HR@K (= Recall@K, one held-out item per row), NDCG@K for
K in 10, 20, 50, 100, and AUC on the held-out positives vs their offline random negatives.

Examples:
  python -m jobs.evaluate                          # the newest model version, test split
  python -m jobs.evaluate --model 20261123T101500Z-1a2b3c --split valid
  python -m jobs.evaluate --pairs-version 3        # a pinned version of pairs/test
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass

if __package__ in (None, ""):
    import os

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jobs.cli import job_parser, run_job, setup_logging


@dataclass(frozen=True)
class EvaluateConfig:
    lake: str
    model: str | None
    splits: tuple[str, ...]
    pairs_version: int | None
    ks: tuple[int, ...]
    json_out: str | None

    def __post_init__(self) -> None:
        if not self.ks or any(k <= 0 for k in self.ks):
            raise ValueError(f"--ks must be positive integers, got {self.ks!r}")


def build_parser() -> argparse.ArgumentParser:
    p = job_parser("evaluate", __doc__)
    p.add_argument("--model", help="model version under models/ (default: the newest)")
    p.add_argument("--split", action="append", choices=("valid", "test"), help="repeatable (default: valid and test)")
    p.add_argument("--pairs-version", type=int, help="Delta version of the pairs tables (default: latest)")
    p.add_argument("--ks", default="10,20,50,100", help="cut-offs, comma-separated (default: 10,20,50,100)")
    p.add_argument("--json", dest="json_out", help="also write the metrics to this JSON file")
    return p


def parse_config(argv: list[str] | None = None) -> EvaluateConfig:
    a = build_parser().parse_args(argv)
    try:
        ks = tuple(int(k) for k in a.ks.split(","))
    except ValueError as err:
        raise ValueError(f"--ks must be comma-separated integers like 10,50, got {a.ks!r}") from err
    return EvaluateConfig(lake=a.lake, model=a.model, splits=tuple(a.split or ("valid", "test")),
                          pairs_version=a.pairs_version, ks=ks, json_out=a.json_out)


def main(argv: list[str] | None = None) -> int:
    config = parse_config(argv)
    setup_logging("evaluate")
    from lake_contract.delta_snapshot import resolve_snapshot
    from lake_contract.lake import Lake
    from trainer.artifacts import load_model_dir, model_path, model_snapshot, resolve_model_version
    from trainer.data import resolve_pairs
    from trainer.evaluation import evaluate_split
    from trainer.item_store import load_item_store
    from trainer.report import metrics_table

    lake = Lake(config.lake)
    version = resolve_model_version(lake.root, config.model)
    loaded = load_model_dir(model_path(lake.root, version))
    # the item features the model was trained on (as serving reads them), not the newest build's
    pinned = "features/items" in (loaded.manifest.get("table_versions") or {})
    items = model_snapshot(lake.root, loaded, "features/items") if pinned else resolve_snapshot(lake.table("features/items"))
    schema = loaded.schema
    store = load_item_store(items, schema)
    print(f"evaluate: model {version} on {', '.join(config.splits)} (features/items@v{items.version})")
    results = {}
    for split in config.splits:
        snapshot = resolve_pairs(lake.root, split, config.pairs_version)
        print(f"  read pairs/{split}@v{snapshot.version}: {snapshot.num_rows:,} rows")
        results[split] = evaluate_split(loaded.model, store, snapshot, schema, config.ks, loaded.model.log_scale.device,
                                        negatives_width=loaded.config.max_offline_negatives)
    print(metrics_table(results))
    if config.json_out:
        with open(config.json_out, "w", encoding="utf-8") as fh:
            json.dump({"model": version, **results}, fh, indent=2)
        print(f"wrote {config.json_out}")
    return 0


if __name__ == "__main__":
    run_job("evaluate", lambda: main(sys.argv[1:]))
