"""What the hourly fine-tune (``jobs.train --mode finetune``) trains on and starts from.

* **Parent**: ``--parent VERSION`` (``models/<v>``), else the model of the release
  ``releases/CURRENT`` serves (its manifest's ``model_version`` under ``models/``, or the
  release's own ``model/`` copy when that version was pruned from ``models/``).
* **Config**: the parent's ``TrainConfig`` with the command's overrides; the towers
  (``model.*``) cannot change, since the weights are the parent's.
* **Feature settings**: the window's pairs come from the incremental build, which uses the
  settings the last full build saved in ``features/config``; the parent was trained on pairs
  of the settings its manifest pins (``table_versions["features/config"]``). When the two
  differ (a full build with other settings ran since), the fine-tune is refused, naming the
  fields (``check_feature_settings``): train a full model on the new settings instead.
* **What trains** (``trainable``): ``embeddings`` (default) updates only the embedding tables
  (ids, DAT vectors, categorical / multi-valued / bucket fields); the MLPs, the history
  attention and the temperature stay the parent's. A fresh Adam's first steps move every
  parameter with a gradient by about ``lr`` whatever the gradient's size, so an hour of a
  few dozen pairs that also trains the shared MLPs costs every user accuracy (test HR@50 of a
  MovieLens parent fell by 0.03-0.05 after ONE such step, tests/test_finetune.py); with the
  MLPs frozen only the rows the hour touches move (Adam leaves zero-gradient rows exactly as
  they were). ``all`` trains everything, as a full run does.
* **Data**: the files of ``pairs/incremental`` whose partition ``window`` is the fine-tune
  window, plus, with ``--replay-windows N``, every row of the N windows present in that
  table just before it (by window key: ``2026-01-05T12``, ``...T11``; daily backfill windows
  sort before the hours of their day). The replay keeps the recent past in the gradient so an
  hour of a few users does not pull the whole model towards them (forgetting); it is all of
  those windows' rows, not a subsample. Row counts come from the Parquet footers of the
  selected files, not from the table's totals.

Nothing here imports pyspark.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import pyarrow.parquet as pq
from torch import nn

from lake_contract.delta_snapshot import DeltaSnapshot, resolve_snapshot, snapshot_file_path, table_exists
from lake_contract.errors import BadInputError
from lake_contract.feature_config import (
    FEATURE_CONFIG_TABLE,
    FeatureConfigMismatchError,
    load_saved_feature_config,
    require_same_feature_config,
    require_saved_feature_config,
)
from lake_contract.lake import Lake
from lake_contract.run_ledger import completed_windows
from trainer.artifacts import (
    LoadedModel,
    ModelNotFoundError,
    list_model_versions,
    load_model_dir,
    model_path,
    models_root,
)
from trainer.config import TrainConfig

INCREMENTAL_PAIRS = "pairs/incremental"  # spark_features.incremental.INCREMENTAL_PAIRS (that module imports pyspark)
WINDOW_COLUMN = "window"
BUILD_LEDGER_JOB = "build_features"
Trainable = Literal["embeddings", "all"]
TRAINABLE: tuple[str, ...] = ("embeddings", "all")


@dataclass(frozen=True)
class Parent:
    """The model a fine-tune starts from and where it was found (for logs and the manifest)."""

    loaded: LoadedModel
    source: str  # "--parent" or "release <version>" (+ " (release copy)" when read from the release folder)

    @property
    def version(self) -> str:
        return self.loaded.version


def resolve_parent(lake_root: str, version: str | None, release=None) -> Parent:
    """``models/<version>``; without a version, the model of ``release`` (the CURRENT
    ``index_builder.release.ReleaseInfo``, passed in so that trainer/ does not import the
    index builder): ``models/<its model_version>``, or the release's ``model/`` copy.
    ``ModelNotFoundError`` saying what to do when there is no parent."""
    if version is not None:
        return Parent(load_model_dir(model_path(lake_root, version)), "--parent")
    if release is None:
        raise ModelNotFoundError(
            "--mode finetune needs a parent model: pass --parent VERSION (models/ has: "
            f"{', '.join(list_model_versions(lake_root)[-5:]) or 'none'}) or publish a release first "
            "(python -m jobs.build_index && python -m jobs.publish)")
    wanted = release.manifest.get("model_version")
    if wanted and (models_root(lake_root) / wanted / "weights.pt").is_file():
        return Parent(load_model_dir(models_root(lake_root) / wanted), f"release {release.version}")
    copy = Path(release.path) / "model"
    if (copy / "weights.pt").is_file():
        return Parent(load_model_dir(copy), f"release {release.version} (its model/ copy)")
    raise ModelNotFoundError(
        f"the current release {release.version} names model {wanted!r}, but neither models/{wanted} nor "
        f"{copy} holds its weights: pass --parent VERSION or publish a complete release")


def finetune_config(parent: TrainConfig, overrides: dict) -> TrainConfig:
    """The parent's config with ``overrides`` (``{"lr": 1e-3, "epochs": 1}``) applied;
    ``ValueError`` when they would change the towers."""
    config = parent.with_overrides(overrides) if overrides else parent
    if config.model != parent.model:
        changed = sorted(k for k, v in config.model.__dict__.items() if parent.model.__dict__[k] != v)
        raise ValueError(f"a fine-tune keeps the parent's towers, but the overrides change model.{', model.'.join(changed)}"
                         "; retrain from scratch with --mode full to change the model")
    return config


def check_feature_settings(lake_root: str, parent_version: str, parent_manifest: dict) -> None:
    """Refuse (``FeatureConfigMismatchError``, fields named) a fine-tune whose pairs were built
    with other feature settings than the parent's training pairs; also when the parent names
    none (trained before settings were saved), since then they cannot be compared."""
    what = f"the fine-tune of {parent_version}"
    current = require_saved_feature_config(lake_root, what)
    pinned = (parent_manifest.get("table_versions") or {}).get(FEATURE_CONFIG_TABLE)
    if pinned is None:
        raise FeatureConfigMismatchError(
            f"parent model {parent_version} records no feature settings ({FEATURE_CONFIG_TABLE} is not in its "
            "manifest's table_versions: it was trained before full builds saved them), so the window's pairs "
            "cannot be checked against its own: train a full model (python -m jobs.train) and fine-tune that")
    if pinned == current.version:
        return
    parents = load_saved_feature_config(lake_root, pinned)
    require_same_feature_config(parents, current.config, what, advice=(
        f"the parent was trained on pairs of {FEATURE_CONFIG_TABLE} v{pinned}, the window's pairs come from "
        f"v{current.version}; train a full model on the new settings (python -m jobs.train) and fine-tune that"))


@dataclass(frozen=True)
class WindowPairs:
    """The selected files of ``pairs/incremental`` (``snapshot``: only those files, with
    ``num_rows`` from their footers) and the windows they belong to."""

    window: str
    replay_windows: tuple[str, ...]  # oldest first
    snapshot: DeltaSnapshot
    rows_by_window: dict[str, int]
    row_group_rows: tuple[int, ...]  # rows of every row group of the selected files (Petastorm deals these)

    @property
    def rows(self) -> int:
        return sum(self.rows_by_window.values())


def select_window_files(snapshot: DeltaSnapshot, window: str, replay: int) -> tuple[DeltaSnapshot, tuple[str, ...]]:
    """``snapshot`` restricted to the files of partition ``window`` and of the ``replay``
    windows just before it (by key), and those replay windows (oldest first). ``num_rows``
    of the result is None (the caller counts rows from the footers)."""
    if replay < 0:
        raise ValueError(f"--replay-windows must be >= 0, got {replay!r}")
    if WINDOW_COLUMN not in snapshot.partition_columns:
        raise BadInputError(f"{snapshot.table_uri} is not partitioned by {WINDOW_COLUMN!r} "
                            f"(partitions: {list(snapshot.partition_columns)}): it is not pairs/incremental")
    present = sorted({pv[WINDOW_COLUMN] for pv in snapshot.partition_values if pv.get(WINDOW_COLUMN)})
    earlier = [w for w in present if w < window]
    replayed = tuple(earlier[len(earlier) - replay:]) if replay else ()
    wanted = {window, *replayed}
    keep = [i for i, pv in enumerate(snapshot.partition_values) if pv.get(WINDOW_COLUMN) in wanted]
    return replace(snapshot, files=tuple(snapshot.files[i] for i in keep),
                   partition_values=tuple(snapshot.partition_values[i] for i in keep), num_rows=None), replayed


def resolve_window_pairs(lake_root: str, window: str, replay: int = 0, version: int | None = None) -> WindowPairs | None:
    """Pin ``pairs/incremental`` (latest unless ``version``) and select ``window`` (+ replay).

    None when the window has no pairs (no partition, or only empty files) although the
    incremental build completed it (``runs/build_features``); ``BadInputError`` when the
    build never ran for that window (run it first: an unbuilt hour is not an empty hour).
    """
    lake = Lake(lake_root)
    uri = lake.table(INCREMENTAL_PAIRS)
    exists = version is not None or table_exists(uri)
    selected, replayed = (select_window_files(resolve_snapshot(uri, version), window, replay)
                          if exists else (None, ()))
    rows_by_window: dict[str, int] = {}
    row_groups: list[int] = []
    if selected is not None:
        for file, pv in zip(selected.files, selected.partition_values, strict=True):
            meta = pq.ParquetFile(snapshot_file_path(file)).metadata
            sizes = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
            row_groups += sizes
            rows_by_window[pv[WINDOW_COLUMN]] = rows_by_window.get(pv[WINDOW_COLUMN], 0) + sum(sizes)
    if not rows_by_window.get(window):
        if window not in completed_windows(lake, BUILD_LEDGER_JOB):
            raise BadInputError(
                f"window {window} has not been built (no rows in {INCREMENTAL_PAIRS} and no record in "
                f"runs/{BUILD_LEDGER_JOB}): run python -m jobs.build_features --mode incremental --hour {window} "
                "(or --date for a daily window) first")
        return None
    assert selected is not None
    return WindowPairs(window=window, replay_windows=replayed, rows_by_window=rows_by_window,
                       row_group_rows=tuple(row_groups),
                       snapshot=replace(selected, num_rows=sum(rows_by_window.values())))


def freeze_all_but_embeddings(model: nn.Module) -> list[str]:
    """Set ``requires_grad=False`` on every parameter outside an ``nn.Embedding`` (the
    optimizer then never sees them); returns their names."""
    tables = {id(p) for module in model.modules() if isinstance(module, nn.Embedding) for p in module.parameters()}
    frozen = []
    for name, param in model.named_parameters():
        if id(param) not in tables:
            param.requires_grad_(False)
            frozen.append(name)
    return frozen


def smallest_shard_rows(row_group_rows: tuple[int, ...], world_size: int) -> int:
    """A lower bound of the rows any one rank gets when Petastorm deals the row groups
    round-robin in any order: every rank gets at least ``n // world_size`` of them, so at
    least the sum of that many smallest ones."""
    if len(row_group_rows) < world_size:
        return 0
    return sum(sorted(row_group_rows)[: len(row_group_rows) // world_size])


def check_shardable(pairs: WindowPairs, world_size: int) -> None:
    """``BadInputError`` when the selected files have fewer row groups than ranks."""
    if len(pairs.row_group_rows) < world_size:
        windows = ", ".join([pairs.window, *pairs.replay_windows])
        raise BadInputError(
            f"{INCREMENTAL_PAIRS} window(s) {windows} hold {len(pairs.row_group_rows)} row group(s) "
            f"({pairs.rows:,} rows) but {world_size} ranks need one each: fine-tune with fewer processes "
            "(one is plenty for an hour) or replay more earlier windows (--replay-windows N)")


def finetune_batch_size(pairs: WindowPairs, world_size: int, batch_size: int) -> int:
    """``batch_size``, lowered (never raised) so that every rank has at least one full batch
    of the selected rows: an hour often holds fewer rows than a nightly batch."""
    return max(1, min(batch_size, smallest_shard_rows(pairs.row_group_rows, world_size)))


@dataclass
class FinetunePlan:
    """Everything a fine-tune run needs, resolved before the first step."""

    parent: Parent
    config: TrainConfig
    pairs: WindowPairs
    inputs: object  # trainer.loop.RunInputs
    model: object  # trainer.towers.TwoTowerModel: the parent grown to the lake's vocabularies
    growth: dict
    batch_lowered_from: int | None  # the parent's batch size when it had to be lowered
    trainable: str
    frozen: list[str]  # parameters kept at the parent's values

    @property
    def split_key(self) -> str:
        """What the run trained on, for the checkpoint run key (a re-run of the same window
        from the same parent resumes; another window or parent starts its own run)."""
        return (f"incremental:{self.pairs.window}+replay[{','.join(self.pairs.replay_windows)}]"
                f":parent={self.parent.version}:trainable={self.trainable}")

    def manifest_fields(self) -> dict:
        return {"kind": "finetune", "parent": self.parent.version, "parent_source": self.parent.source,
                "preset": self.parent.loaded.manifest.get("preset"), "window": self.pairs.window,
                "replay_windows": list(self.pairs.replay_windows), "train_rows": dict(self.pairs.rows_by_window),
                "growth": self.growth, "trainable": self.trainable, "frozen": self.frozen}


def prepare_finetune(lake_root: str, window: str, parent_version: str | None, replay: int, overrides: dict,
                     world_size: int, find_release: Callable[[], Any] | None = None,
                     lower_batch: bool = True, trainable: Trainable = "embeddings") -> FinetunePlan | None:
    """Resolve the window's pairs, the parent, the config and the grown model (see the module
    docstring). None when the window has no pairs (checked first: an empty hour needs no
    parent). ``find_release``: returns the CURRENT release or None (called only without
    ``parent_version``). ``lower_batch``: lower the batch size to what the window holds (off
    when the command set it explicitly). ``trainable``: see the module docstring."""
    if trainable not in TRAINABLE:
        raise ValueError(f"trainable must be one of {', '.join(TRAINABLE)}, got {trainable!r}")
    from trainer.growth import check_bucket_boundaries, describe_growth, grow_model
    from trainer.loop import prepare_run

    pairs = resolve_window_pairs(lake_root, window, replay)
    if pairs is None:
        return None
    check_shardable(pairs, world_size)
    release = find_release() if parent_version is None and find_release is not None else None
    parent = resolve_parent(lake_root, parent_version, release)
    check_feature_settings(lake_root, parent.version, parent.loaded.manifest)
    config = finetune_config(parent.loaded.config, overrides)
    lowered_from = None
    if lower_batch:
        batch = finetune_batch_size(pairs, world_size, config.batch_size)
        if batch < config.batch_size:
            lowered_from, config = config.batch_size, replace(config, batch_size=batch)
    inputs = prepare_run(lake_root, config, "incremental", train=pairs.snapshot)
    check_bucket_boundaries(lake_root, parent.loaded.manifest.get("table_versions") or {},
                            inputs.schema.table_versions, inputs.schema)
    growth = describe_growth(parent.loaded.schema, inputs.schema)
    model = grow_model(parent.loaded.model, inputs.schema, seed=config.seed)  # ValueError unless rows only grew
    frozen = freeze_all_but_embeddings(model) if trainable == "embeddings" else []
    return FinetunePlan(parent=parent, config=config, pairs=pairs, inputs=inputs, model=model, growth=growth,
                        batch_lowered_from=lowered_from, trainable=trainable, frozen=frozen)
