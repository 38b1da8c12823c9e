"""Embed every item with a model version, build its FAISS IVF index and tune nprobe.

Reads models/<version>, and features/items and pairs/valid at the versions that model's
manifest records (refused when the lake no longer holds them); writes the model's partition of
embeddings/items (replaced on a re-run) and index/<index version>/ (index.faiss, index.json,
id_map.parquet, manifest.json), assembled in a staging folder and renamed into place. nprobe
is the smallest value whose recall@K against exact search, measured on user-tower vectors of
the pairs/valid rows, reaches the target. Publish the result with python -m jobs.publish.

Examples:
  python -m jobs.build_index                                   # the newest model version
  python -m jobs.build_index --model 20261123T101500Z-1a2b3c --recall-target 0.98
  python -m jobs.build_index --factory 'IVF{nlist},PQ16' --recall-k 50 --force
  python -m jobs.build_index --use-gpu never                   # CPU even where there is a GPU
  python -m jobs.build_index --model nightly-20261201 --exist-ok  # a re-run finds it built: exit 0

nlist: 4 * sqrt(items) rounded to a power of two, capped so every list gets >= 39 training
points (index_builder/faiss_index.py, choose_nlist).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass

if __package__ in (None, ""):  # python jobs/build_index.py
    import os

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jobs.cli import job_parser, run_job, setup_logging

USE_GPU_CHOICES = ("auto", "never", "always")


@dataclass(frozen=True)
class BuildIndexJobConfig:
    lake: str
    model: str | None
    index_version: str | None
    index: object  # index_builder.faiss_index.IndexConfig (imported after parsing: --help must not load faiss)
    max_queries: int
    batch_rows: int
    force: bool
    exist_ok: bool = False

    def __post_init__(self) -> None:
        if self.max_queries < 1:
            raise ValueError(f"--max-queries must be >= 1, got {self.max_queries!r}")
        if not 1 <= self.batch_rows <= 1 << 22:
            raise ValueError(f"--batch-rows must be in [1, 4194304], got {self.batch_rows!r}")


def build_parser() -> argparse.ArgumentParser:
    p = job_parser("build_index", __doc__)
    p.add_argument("--model", help="model version under models/ (default: the newest)")
    p.add_argument("--index-version", help="name of the index folder (default: the model version)")
    p.add_argument("--factory", help="faiss factory string of an IVF index; {nlist} is replaced by the "
                   "chosen nlist (default: IVF{nlist},Flat, exact within the probed lists)")
    p.add_argument("--recall-target", type=float, default=0.95,
                   help="recall@K vs exact search the tuned nprobe must reach (default: 0.95)")
    p.add_argument("--recall-k", type=int, default=100, help="K of that recall (default: 100)")
    p.add_argument("--use-gpu", choices=USE_GPU_CHOICES, default="auto",
                   help="towers and faiss on the GPU: auto (when present), never, always (default: auto)")
    p.add_argument("--max-queries", type=int, default=20_000,
                   help="at most this many pairs/valid rows are tuning queries (default: 20000)")
    p.add_argument("--batch-rows", type=int, default=65_536, help="items per item-tower batch (default: 65536)")
    p.add_argument("--seed", type=int, default=0, help="k-means seed (default: 0)")
    p.add_argument("--force", action="store_true", help="replace an existing index version")
    p.add_argument("--exist-ok", action="store_true",
                   help="a complete index version built from the same model is success: exit 0 without building "
                   "again (a scheduler's retry or re-run of the same run)")
    return p


def parse_config(argv: list[str] | None = None) -> BuildIndexJobConfig:
    a = build_parser().parse_args(argv)
    from index_builder.faiss_index import IndexConfig

    index = IndexConfig(factory=a.factory, recall_k=a.recall_k, recall_target=a.recall_target, use_gpu=a.use_gpu,
                        seed=a.seed)
    return BuildIndexJobConfig(lake=a.lake, model=a.model, index_version=a.index_version, index=index,
                               max_queries=a.max_queries, batch_rows=a.batch_rows, force=a.force,
                               exist_ok=a.exist_ok and not a.force)


def main(argv: list[str] | None = None) -> int:
    job = parse_config(argv)
    setup_logging("build_index")
    from index_builder.item_index import build_item_index
    from lake_contract.lake import Lake
    from trainer.artifacts import resolve_model_version

    lake = Lake(job.lake)
    version = resolve_model_version(lake.root, job.model)
    index_version = job.index_version or version
    if job.exist_ok:
        from index_builder.item_index import index_root

        manifest_file = index_root(lake.root) / index_version / "manifest.json"
        if manifest_file.is_file():
            import json

            built_from = json.loads(manifest_file.read_text()).get("model_version")
            if built_from != version:
                raise ValueError(f"index version {index_version} already exists, built from model {built_from}, "
                                 f"not {version}: pick another --index-version or pass --force")
            print(f"build_index: index/{index_version} of model {version} is already complete; nothing to do "
                  "(--exist-ok)")
            return 0
    started = time.monotonic()
    print(f"build_index: model {version} -> index/{index_version} (lake {lake.root})")
    report = build_item_index(lake.root, version, index_version, job.index, force=job.force,
                              max_queries=job.max_queries, batch_rows=job.batch_rows)
    m = report.manifest
    print(f"  nprobe {m['nprobe']} of {m['nlist']} lists: recall@{m['recall_k']} vs exact = {m['recall']:.4f} "
          f"(target {m['recall_target']:g}{'' if m['reached'] else ', NOT REACHED'}) on {m['num_queries']:,} "
          f"user queries; {m['qps']:,.0f} QPS vs exact {m['exact_qps']:,.0f} QPS "
          f"({m['qps'] / max(m['exact_qps'], 1e-9):.1f}x)")
    print("  curve (nprobe: recall, QPS): "
          + ", ".join(f"{int(p)}: {r:.3f}, {q:,.0f}" for p, r, q in m["curve"]))
    print(f"wrote index/{index_version}{' (replaced)' if report.replaced else ''} -> {report.path} "
          f"({m['num_items']:,} items, dim {m['dim']}, {m['factory']}); total {time.monotonic() - started:.1f}s")
    if not m["reached"]:
        print(f"warning: recall target {m['recall_target']} not reached even at nprobe {m['nprobe']}: "
              "jobs.publish will refuse this index (gate index_recall)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    run_job("build_index", lambda: main(sys.argv[1:]))
