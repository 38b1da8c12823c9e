"""Model versions under ``<lake>/models/<version>/``: written whole or not at all.

A run writes into ``models/.staging-<version>-<random>/`` and renames it to
``models/<version>`` only when everything is in it, so a crash never leaves a half-written
version that a later job could load. A version holds:

``weights.pt`` (state_dict), ``config.json`` (the TrainConfig), ``schema.json`` (fields and
vocab sizes the towers were built with), ``manifest.json`` (version, parent, data table
versions, backend, world size, timings), ``metrics.json`` (valid/test metrics of the model and
ItemPop, and per-epoch history), ``history.jsonl`` (per-step log) and ``training.png``.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from lake_contract.errors import TowerlakeError
from lake_contract.lake import Lake, fsync_path, to_local_path
from trainer.config import TrainConfig
from trainer.feature_schema import FeatureSchema
from trainer.towers import TwoTowerModel

MODELS = "models"


class ModelNotFoundError(TowerlakeError):
    """No model version at the given place."""


class ModelDataError(TowerlakeError):
    """A model's manifest does not name, or the lake no longer holds, a table version it needs."""


def new_model_version() -> str:
    """Sortable, unique: ``20261123T101500Z-1a2b3c``."""
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


def models_root(lake_root: str) -> Path:
    local = to_local_path(Lake(lake_root).table(MODELS))
    if local is None:
        raise ValueError(f"model versions need a local or mounted lake root, got {lake_root!r}")
    return Path(local)


@dataclass
class StagedModel:
    """A model version being written; ``commit()`` makes it visible atomically."""

    root: Path
    version: str
    folder: Path

    @classmethod
    def start(cls, lake_root: str, version: str) -> StagedModel:
        root = models_root(lake_root)
        root.mkdir(parents=True, exist_ok=True)
        if (root / version).exists():
            raise ValueError(f"model version {version} already exists under {root}; pick a new --version")
        _remove_abandoned_staging(root, version)
        folder = root / f".staging-{version}-{uuid.uuid4().hex[:8]}"
        folder.mkdir()
        (folder / ".owner").write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))
        return cls(root=root, version=version, folder=folder)

    def write_json(self, name: str, data: Any) -> None:
        _write_atomic(self.folder / name, json.dumps(data, indent=2, sort_keys=True, default=str).encode())

    def append_jsonl(self, name: str, record: dict) -> None:
        with open(self.folder / name, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record, default=str) + "\n")

    def save_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        tmp = self.folder / "weights.pt.tmp"
        torch.save(state_dict, tmp)
        os.replace(tmp, self.folder / "weights.pt")

    def commit(self) -> Path:
        final = self.root / self.version
        (self.folder / ".owner").unlink(missing_ok=True)
        for path in self.folder.iterdir():
            fsync_path(path)
        os.rename(self.folder, final)
        fsync_path(self.root)
        return final

    def abort(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)



def _remove_abandoned_staging(root: Path, version: str) -> None:
    """Staging folders a killed run left behind: the same version's (a re-run of the same
    command; two live runs cannot both commit one version anyway), and any whose owner
    process on this host is gone."""
    host = socket.gethostname()
    for folder in root.glob(".staging-*"):
        abandoned = folder.name.startswith(f".staging-{version}-")
        try:
            owner = json.loads((folder / ".owner").read_text())
            abandoned = abandoned or (owner.get("host") == host and not _pid_alive(int(owner["pid"])))
        except (OSError, ValueError, KeyError):
            pass
        if abandoned:
            shutil.rmtree(folder, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


@dataclass
class LoadedModel:
    version: str
    path: Path
    model: TwoTowerModel
    config: TrainConfig
    schema: FeatureSchema
    manifest: dict
    metrics: dict


def model_snapshot(lake_root: str, loaded: LoadedModel, table: str):
    """The exact ``DeltaSnapshot`` of ``table`` that ``loaded`` was trained on (its manifest's
    ``table_versions``), for serving and indexing. Raises ``ModelDataError`` naming the model
    and the table when the manifest has no version of it (a model trained before serving was
    pinned) or the lake no longer holds that version or its files (vacuumed, rebuilt)."""
    from lake_contract.delta_snapshot import resolve_snapshot, snapshot_file_path
    from lake_contract.errors import TableNotFoundError

    versions = loaded.manifest.get("table_versions") or {}
    version = versions.get(table)
    if version is None:
        raise ModelDataError(
            f"model {loaded.version} records no version of {table} in its manifest (table_versions has "
            f"{sorted(versions) or 'nothing'}): serving it would mix its towers with newer feature indices; "
            "retrain it (python -m jobs.train) so its manifest names the data it was trained on")
    uri = Lake(lake_root).table(table)
    try:
        snapshot = resolve_snapshot(uri, int(version))
    except TableNotFoundError as err:
        raise ModelDataError(f"model {loaded.version} was trained on {table}@v{version}, which the lake does not "
                             f"hold any more ({err}): serve a model trained on the current data (jobs.train, "
                             "jobs.build_index, jobs.publish) or restore that version") from err
    local = [snapshot_file_path(f) for f in snapshot.files if f.startswith("file://")]
    missing = [f for f in local if not os.path.exists(f)]
    if missing:
        raise ModelDataError(f"model {loaded.version} was trained on {table}@v{version}, whose data files were "
                             f"removed ({len(missing)} of {len(snapshot.files)} missing, e.g. {missing[0]}; vacuumed?): "
                             "serve a model trained on the current data (jobs.train, jobs.build_index, jobs.publish)")
    return snapshot


def model_path(lake_root: str, version: str) -> Path:
    path = models_root(lake_root) / version
    if not (path / "weights.pt").is_file():
        available = list_model_versions(lake_root)
        raise ModelNotFoundError(f"no model version {version!r} under {models_root(lake_root)} "
                                 f"(available: {', '.join(available[-5:]) or 'none; run jobs.train first'})")
    return path


def list_model_versions(lake_root: str) -> list[str]:
    root = models_root(lake_root)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")
                  and (p / "weights.pt").is_file())


def resolve_model_version(lake_root: str, version: str | None) -> str:
    """``version`` itself, or the newest model version under ``models/`` when None."""
    if version is not None:
        return version
    versions = list_model_versions(lake_root)
    if not versions:
        raise ModelNotFoundError(f"no model under {Lake(lake_root).root}/models: run `python -m jobs.train` first")
    return versions[-1]


def load_model_dir(path: str | os.PathLike[str], device: torch.device | str = "cpu") -> LoadedModel:
    """Rebuild the towers from a model folder (``models/<version>`` or a release's copy)."""
    path = Path(path)
    try:
        config = TrainConfig.from_dict(json.loads((path / "config.json").read_text()))
        schema = FeatureSchema.from_json((path / "schema.json").read_text())
        manifest = json.loads((path / "manifest.json").read_text())
        metrics = json.loads((path / "metrics.json").read_text()) if (path / "metrics.json").exists() else {}
        state = torch.load(path / "weights.pt", map_location=device, weights_only=True)
    except FileNotFoundError as err:
        raise ModelNotFoundError(f"model folder {path} is incomplete ({err.filename} missing)") from err
    model = TwoTowerModel(config.model, schema).to(device)
    model.load_state_dict(state)
    model.eval()
    return LoadedModel(version=manifest.get("version", path.name), path=path, model=model, config=config,
                       schema=schema, manifest=manifest, metrics=metrics)
