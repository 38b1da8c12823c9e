"""Build the item index of one model version: embeddings -> FAISS IVF -> ``index/<version>/``.

Stages (each timed): load the model; embed every item of ``features/items`` and replace that
model's partition of ``embeddings/items``; embed the held-out queries (user-tower outputs of
``pairs/valid`` rows, NOT item vectors, which would flatter the index); build the IVF index
(GPU when faiss has one); tune nprobe to the smallest value whose recall@k against exact
search reaches the target; write the folder.

``index/<index_version>/`` (a local or mounted lake) holds:

* ``index.faiss`` + ``index.json``: the index, at its tuned nprobe (``faiss_index.save_index``);
  the FAISS ids are item indices (``item_idx``);
* ``id_map.parquet``: ``item_idx`` int64, ``item_id`` string, one row per indexed item;
* ``manifest.json``: index_version, model_version, embeddings_table_version, num_items, dim,
  nlist, factory, nprobe, recall, recall_k, recall_target, reached, qps, exact_qps, curve
  ([nprobe, recall, qps] per measured nprobe), build_seconds, device, the input table
  versions, the number of queries and the stage timings.

The folder is assembled in ``index/.staging-<version>-<id>/`` and renamed into place, so a
reader never sees half an index; a crash leaves only a staging folder, removed by the next
build. An existing version is replaced only with ``force``.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lake_contract.errors import TowerlakeError
from lake_contract.lake import Lake, fsync_path, to_local_path

if TYPE_CHECKING:  # faiss and torch load only when an index is built
    from index_builder.faiss_index import IndexConfig

INDEX_ROOT = "index"
ID_MAP_FILE = "id_map.parquet"
MANIFEST_FILE = "manifest.json"
STAGING_PREFIX = ".staging-"
TRASH_PREFIX = ".trash-"
DEFAULT_MAX_QUERIES = 20_000


class IndexNotFoundError(TowerlakeError):
    """No (complete) index version at the given place."""


def index_root(lake_root: str) -> Path:
    """``<lake>/index`` as a local path (index folders need a local or mounted lake)."""
    local = to_local_path(Lake(lake_root).table(INDEX_ROOT))
    if local is None:
        raise ValueError(f"index folders need a local or mounted lake root, got {lake_root!r}")
    return Path(local)


def list_index_versions(lake_root: str) -> list[str]:
    """Complete index versions (folders with a manifest), oldest build first."""
    root = index_root(lake_root)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        if child.is_dir() and not child.name.startswith(".") and (child / MANIFEST_FILE).is_file():
            found.append((json.loads((child / MANIFEST_FILE).read_text()).get("created_at", ""), child.name))
    return [name for _, name in sorted(found)]


def read_index_manifest(lake_root: str, version: str) -> dict[str, Any]:
    """The manifest of ``index/<version>``; IndexNotFoundError naming the available versions."""
    folder = index_root(lake_root) / version
    try:
        return json.loads((folder / MANIFEST_FILE).read_text())
    except (OSError, ValueError) as err:
        available = list_index_versions(lake_root)
        raise IndexNotFoundError(
            f"no complete index {version!r} under {folder.parent} (available: {', '.join(available[-5:]) or 'none'}); "
            "build one with python -m jobs.build_index") from err


def index_for_model(lake_root: str, model_version: str) -> str:
    """The newest index version built from ``model_version``."""
    matching = [v for v in list_index_versions(lake_root)
                if read_index_manifest(lake_root, v).get("model_version") == model_version]
    if not matching:
        raise IndexNotFoundError(f"no index built from model {model_version} under {index_root(lake_root)}: run "
                                 f"python -m jobs.build_index --model {model_version}")
    return matching[-1]


@dataclass
class IndexBuildReport:
    """What ``build_item_index`` read and wrote: ``manifest`` (as written), ``path`` of the
    index folder, ``read`` (table -> Delta version), ``timings`` (stage -> seconds),
    ``replaced`` (an existing version was replaced), ``unknown_items`` (embedded from
    features only)."""

    manifest: dict[str, Any]
    path: Path
    read: dict[str, int]
    timings: dict[str, float] = field(default_factory=dict)
    replaced: bool = False
    unknown_items: int = 0



def write_id_map(folder: Path, item_idx: np.ndarray, item_ids: pa.Array | pa.ChunkedArray) -> None:
    """``id_map.parquet``: item_idx int64, item_id string (temp file + rename)."""
    table = pa.table({"item_idx": pa.array(item_idx, pa.int64()), "item_id": item_ids.cast(pa.string())})
    tmp = folder / f".{ID_MAP_FILE}.tmp"
    pq.write_table(table, tmp)
    os.replace(tmp, folder / ID_MAP_FILE)


def _install(staging: Path, final: Path, force: bool) -> bool:
    """Rename ``staging`` to ``final``; an existing ``final`` is renamed away first (force)."""
    replaced = False
    if final.exists():
        if not force:
            raise ValueError(f"index version {final.name} already exists at {final}; pass --force to replace it "
                             "or --index-version to build another")
        trash = final.parent / f"{TRASH_PREFIX}{final.name}-{uuid.uuid4().hex[:8]}"
        os.rename(final, trash)
        replaced = True
    try:
        os.rename(staging, final)
    except BaseException:
        if replaced:
            os.rename(trash, final)
        raise
    fsync_path(final.parent)
    if replaced:
        shutil.rmtree(trash, ignore_errors=True)
    return replaced


def _cleanup_leftovers(root: Path, min_age_s: float = 3600.0) -> None:
    """Remove staging/trash folders of crashed builds. Builds take no lock, so only folders
    untouched for ``min_age_s`` are removed: a concurrent build's staging folder survives."""
    for child in root.iterdir():
        if child.is_dir() and child.name.startswith((STAGING_PREFIX, TRASH_PREFIX)) \
                and time.time() - child.stat().st_mtime > min_age_s:
            shutil.rmtree(child, ignore_errors=True)


def resolve_torch_device(use_gpu: str):
    """torch device for the towers: "auto" = CUDA when present, "never" = CPU, "always" =
    CUDA or a ValueError."""
    import torch

    if use_gpu == "never":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if use_gpu == "always":
        raise ValueError("--use-gpu always but torch sees no CUDA device; use --use-gpu auto or never")
    return torch.device("cpu")


def build_item_index(lake_root: str, model_version: str, index_version: str, config: IndexConfig, *,
                     force: bool = False, max_queries: int | None = DEFAULT_MAX_QUERIES,
                     batch_rows: int | None = None, say: Callable[[str], None] = print) -> IndexBuildReport:
    """Run every stage for ``model_version`` and write ``index/<index_version>/``.

    ``config``: an ``index_builder.faiss_index.IndexConfig`` (factory, recall_k, recall_target,
    use_gpu, seed, ...); its ``use_gpu`` also places the towers. ``max_queries``: at most this
    many ``pairs/valid`` rows are the tuning queries. ``say`` gets one line per finished stage.
    """
    from index_builder.embeddings import EMBEDDING_BATCH_ROWS, embed_user_queries, write_item_embeddings
    from index_builder.faiss_index import build_index, save_index, tune_nprobe
    from trainer.artifacts import load_model_dir, model_path, model_snapshot

    lake = Lake(lake_root)
    root = index_root(lake.root)
    final = root / index_version
    if final.exists() and not force:
        raise ValueError(f"index version {index_version} already exists at {final}; pass --force to replace it "
                         "or --index-version to build another")
    timings: dict[str, float] = {}

    def stage(name: str, started: float) -> None:
        timings[name] = round(time.monotonic() - started, 3)
        say(f"  [{name}] {timings[name]:.1f}s")

    started = time.monotonic()
    device = resolve_torch_device(config.use_gpu)
    loaded = load_model_dir(model_path(lake.root, model_version), device=device)
    # The model's own data: items and tuning queries at the versions its manifest records
    # (a newer feature build may have moved bucket boundaries the towers never saw).
    items = model_snapshot(lake.root, loaded, "features/items")
    valid = model_snapshot(lake.root, loaded, "pairs/valid")
    read = {"features/items": items.version, "pairs/valid": valid.version}
    say(f"  read: model {model_version} on {device}; features/items@v{items.version}, "
        f"pairs/valid@v{valid.version} ({valid.num_rows if valid.num_rows is not None else '?'} rows)")
    stage("load", started)

    started = time.monotonic()
    embedded = write_item_embeddings(lake.root, model_version, loaded.model, items, loaded.schema, device,
                                     batch_rows or EMBEDDING_BATCH_ROWS)
    say(f"  wrote embeddings/items@v{embedded.table_version}: {embedded.num_items:,} rows "
        f"(partition model_version={model_version}, dim {embedded.dim})"
        + (f"; {embedded.unknown_to_model:,} items unknown to the model embedded from their features only"
           if embedded.unknown_to_model else ""))
    stage("embed_items", started)

    started = time.monotonic()
    queries = embed_user_queries(loaded.model, valid, loaded.schema, device, max_queries)
    say(f"  queries: {queries.shape[0]:,} user-tower vectors from pairs/valid")
    stage("embed_queries", started)

    started = time.monotonic()
    built = build_index(embedded.vectors, embedded.item_idx, config)
    say(f"  index: {built.factory} (nlist {built.nlist}) on {built.device}, {built.ntotal:,} items, "
        f"trained on {built.train_points:,} points")
    stage("build", started)

    started = time.monotonic()
    choice = tune_nprobe(built, embedded.vectors, embedded.item_idx, queries, config)
    stage("tune", started)

    started = time.monotonic()
    root.mkdir(parents=True, exist_ok=True)
    _cleanup_leftovers(root)
    staging = root / f"{STAGING_PREFIX}{index_version}-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        save_index(built, staging)
        write_id_map(staging, embedded.item_idx, embedded.item_id)
        manifest = {
            "index_version": index_version, "model_version": model_version,
            "embeddings_table_version": embedded.table_version, "num_items": built.ntotal, "dim": built.dim,
            "nlist": built.nlist, "factory": built.factory, "nprobe": choice.nprobe, "recall": choice.recall,
            "recall_k": choice.k, "recall_target": choice.target, "reached": choice.reached, "qps": choice.qps,
            "exact_qps": choice.exact_qps, "curve": [list(p) for p in choice.curve],
            "build_seconds": built.build_seconds, "device": built.device, "embed_device": str(device), "num_queries": int(queries.shape[0]),
            "query_source": "pairs/valid", "table_versions": {**read, "embeddings/items": embedded.table_version},
            "unknown_items": embedded.unknown_to_model, "timings": timings,
            "created_at": datetime.now(UTC).isoformat(timespec="microseconds"),
        }
        tmp = staging / f".{MANIFEST_FILE}.tmp"
        tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, staging / MANIFEST_FILE)
        for path in staging.iterdir():
            fsync_path(path)
        fsync_path(staging)
        replaced = _install(staging, final, force)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    stage("write", started)
    return IndexBuildReport(manifest=manifest, path=final, read=read, timings=timings, replaced=replaced,
                            unknown_items=embedded.unknown_to_model)
