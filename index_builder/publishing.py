"""Gate and publish a model version with its index as one release (docs/design.md decision 7).

``publish_model_release`` reads ``models/<model>/`` (manifest.json, metrics.json) and
``index/<index>/manifest.json`` (JSON only: no torch, no faiss), runs the quality gates of
``gates.check_gates``:

* ``index_recall``: the index's measured recall@k vs exact search >= its recall target;
* ``model_quality``: the model's VALID ``metric`` (``metrics.json["valid"]["model"]``) is not
  below the CURRENT release's same metric minus ``tolerance`` (no comparison when nothing
  is published yet);

and only when both pass calls ``release.publish_release`` with the artifacts ``model`` (the
model folder) and ``index`` (the index folder) and a manifest of model_version, parent,
index_version, table_versions (the model's), metrics {valid, test} (the model's), index
(nprobe, recall, recall_k, recall_target, qps, exact_qps, nlist, factory, num_items, dim)
and gates. A failing gate raises ``GateFailedError`` and nothing is written.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from index_builder.gates import DEFAULT_METRIC, DEFAULT_TOLERANCE, check_gates
from index_builder.item_index import ID_MAP_FILE, index_for_model, index_root, read_index_manifest
from index_builder.release import (
    ReleaseInfo,
    current_release,
    new_release_version,
    publish_release,
)
from lake_contract.errors import TowerlakeError
from lake_contract.lake import Lake, to_local_path

METRIC_PATTERN = re.compile(r"^(hr|recall|ndcg)@\d+$|^auc$")
INDEX_FILES = ("index.faiss", "index.json", ID_MAP_FILE, "manifest.json")
INDEX_FIELDS = ("nprobe", "recall", "recall_k", "recall_target", "qps", "exact_qps", "nlist", "factory",
                "num_items", "dim")


class ModelVersionError(TowerlakeError):
    """The model version to publish is missing or incomplete."""


@dataclass(frozen=True)
class PublishReport:
    """``release`` (the new CURRENT), ``previous`` (the CURRENT it replaced, or None),
    ``gates`` (as stored in the manifest), the ``model_version`` and ``index_version``."""

    release: ReleaseInfo
    previous: str | None
    gates: dict[str, Any]
    model_version: str
    index_version: str


def _models_dir(lake_root: str) -> Path:
    local = to_local_path(Lake(lake_root).table("models"))
    if local is None:
        raise ValueError(f"releases need a local or mounted lake root, got {lake_root!r}")
    return Path(local)


def newest_model_version(lake_root: str) -> str:
    """The newest complete model version (the same order as ``trainer.artifacts``)."""
    root = _models_dir(lake_root)
    versions = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")
                      and (p / "weights.pt").is_file()) if root.is_dir() else []
    if not versions:
        raise ModelVersionError(f"no model under {root}: run `python -m jobs.train` first")
    return versions[-1]


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as err:
        raise ModelVersionError(f"{what} {path} is missing") from err
    except ValueError as err:
        raise ModelVersionError(f"{what} {path} is not valid JSON ({err})") from err


def resolve_versions(lake_root: str, model: str | None, index: str | None) -> tuple[str, str]:
    """(model version, index version): the model defaults to the index's model (when
    ``index`` is given) or the newest model; the index to the newest one built from the model."""
    if index is not None:
        built_from = read_index_manifest(lake_root, index).get("model_version")
        if model is None:
            model = built_from
        elif built_from != model:
            raise ValueError(f"index {index} was built from model {built_from}, not {model}: pass the matching "
                             f"--model or build an index for {model} (python -m jobs.build_index --model {model})")
        return model, index
    model = model or newest_model_version(lake_root)
    return model, index_for_model(lake_root, model)


def current_metric(current: ReleaseInfo | None, metric: str) -> float | None:
    """The CURRENT release's VALID ``metric`` (None when nothing is published)."""
    if current is None:
        return None
    valid = current.manifest.get("metrics", {}).get("valid", {}).get("model", {})
    if metric not in valid:
        raise ValueError(f"the current release {current.version} records no valid {metric} (it has "
                         f"{sorted(valid) or 'no metrics'}): pass a --metric it records, or roll back")
    return float(valid[metric])


def publish_model_release(lake_root: str, model_version: str, index_version: str, *, metric: str = DEFAULT_METRIC,
                          tolerance: float = DEFAULT_TOLERANCE, keep: int = 5, release_version: str | None = None,
                          fail_at: str | None = None) -> PublishReport:
    """Gate, then publish ``models/<model_version>`` + ``index/<index_version>`` as a new
    release (``release_version``, default a fresh time-sorted name) and make it CURRENT.
    Raises GateFailedError (nothing published) when a gate fails."""
    if not METRIC_PATTERN.match(metric):
        raise ValueError(f"--metric must be hr@K, recall@K, ndcg@K or auc, got {metric!r}")
    model_dir = _models_dir(lake_root) / model_version
    if not (model_dir / "weights.pt").is_file():
        raise ModelVersionError(f"no complete model version {model_version!r} at {model_dir}")
    model_manifest = _read_json(model_dir / "manifest.json", "model manifest")
    metrics = _read_json(model_dir / "metrics.json", "model metrics")
    index_dir = index_root(lake_root) / index_version
    index_manifest = read_index_manifest(lake_root, index_version)
    missing = [name for name in INDEX_FILES if not (index_dir / name).is_file()]
    if missing:
        raise ValueError(f"index {index_version} at {index_dir} is incomplete (missing {missing}); rebuild it "
                         "with python -m jobs.build_index --force")
    if index_manifest.get("model_version") != model_version:
        raise ValueError(f"index {index_version} was built from model {index_manifest.get('model_version')}, "
                         f"not {model_version}")
    valid = metrics.get("valid", {}).get("model", {})
    if metric not in valid:
        raise ValueError(f"model {model_version} has no valid {metric} in metrics.json (it has {sorted(valid)})")

    current = current_release(lake_root)
    gates = check_gates(
        index_recall=float(index_manifest["recall"]), recall_target=float(index_manifest["recall_target"]),
        candidate_metric=float(valid[metric]), current_metric=current_metric(current, metric),
        tolerance=tolerance, metric_name=f"valid {metric}", recall_k=int(index_manifest["recall_k"]),
    )
    gates["model_quality"]["current_release"] = current.version if current else None
    manifest = {
        "model_version": model_version,
        "parent": model_manifest.get("parent"),
        "index_version": index_version,
        "table_versions": model_manifest.get("table_versions", {}),
        "metrics": {split: metrics[split] for split in ("valid", "test") if split in metrics},
        "index": {name: index_manifest.get(name) for name in INDEX_FIELDS},
        "gates": gates,
    }
    info = publish_release(lake_root, release_version or new_release_version(),
                           {"model": model_dir, "index": index_dir}, manifest, keep=keep, fail_at=fail_at)
    return PublishReport(release=info, previous=current.version if current else None, gates=gates,
                         model_version=model_version, index_version=index_version)
