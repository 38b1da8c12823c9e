"""The typed configuration of the features + pairs job (parsed once in ``jobs/build_features.py``),
and the copy of it that every full build saves in the lake.

Saved settings: the full build writes its ``FeatureConfig`` as canonical JSON to the Delta
table ``features/config`` (one row: ``config_json``, ``as_of``), in the same batch of commits
as ``features/spec`` and the pairs, so each build's settings are one table version next to
the tables they shaped: Delta time travel keeps every earlier build's settings, and a model
pins the version it was trained with in its manifest (``table_versions``), as it pins
``features/spec``. A Delta table rather than a JSON file: a file would be overwritten in
place (no history, no atomic replace on object stores); the table is read without Spark.

Incremental builds, backfills and fine-tunes load it (``load_saved_feature_config``) and
refuse settings that differ (``require_same_feature_config``), naming the fields: pairs
of one model must all come from one set of settings. pyspark-free.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from lake_contract.errors import TableNotFoundError, TowerlakeError

SplitKind = Literal["leave-last-out", "time"]

# Fixed log-scale boundaries (documented, stored in features/spec with every build) so that
# serving computes exactly the same buckets as training did.
ACTIVITY_BOUNDARIES: tuple[float, ...] = tuple(float(2**k) for k in range(0, 21))  # 1, 2, 4, ... events
RECENCY_DAY_BOUNDARIES: tuple[float, ...] = (1, 2, 4, 7, 14, 30, 60, 90, 180, 365, 730)

FEATURE_CONFIG_TABLE = "features/config"
_DATETIME_FIELDS = ("time_cut", "valid_cut")


@dataclass(frozen=True)
class FeatureConfig:
    """How bronze tables become vocabularies, feature tables and training pairs.

    ``label_min_rating``: None = every interaction is a positive; otherwise rating >= it.
    ``history_length``: N item indices of point-in-time history per pair (most recent first,
    0-padded). ``min_positives_for_holdout``: leave-last-out holds out the last positive
    (test) and the one before (valid) only for users with at least this many positives.
    ``prefix_columns``: derived categoricals, e.g. {"users.zip_code": 3} adds
    ``zip_code_prefix`` (the first 3 characters). ``primary_category``: the items column whose
    (first) value is an item's primary category (for the category alignment loss); None picks
    ``category`` if present, else the first multi-valued column. ``hard_ranked_share``: when
    the build is given release-ranked lists (``negatives/release_ranked``), the probability
    that a hard draw of a user with preferred categories takes an item of their list instead.
    """

    id_min_count: int = 1
    categorical_min_count: int = 1
    numeric_buckets: int = 10
    history_length: int = 50
    label_min_rating: float | None = None
    split: SplitKind = "leave-last-out"
    min_positives_for_holdout: int = 3
    time_cut: datetime | None = None
    valid_cut: datetime | None = None
    negatives: str = "random:4,popularity:2,hard:2"
    seed: int = 0
    prefix_columns: Mapping[str, int] = field(default_factory=dict)
    primary_category: str | None = None
    rows_per_file: int = 500_000
    hard_ranked_share: float = 0.5

    def __post_init__(self) -> None:
        for name in ("id_min_count", "categorical_min_count", "history_length", "numeric_buckets",
                     "min_positives_for_holdout", "rows_per_file"):
            if getattr(self, name) < 1:
                raise ValueError(f"FeatureConfig.{name} must be >= 1, got {getattr(self, name)!r}")
        if self.split not in ("leave-last-out", "time"):
            raise ValueError(f"FeatureConfig.split must be 'leave-last-out' or 'time', got {self.split!r}")
        if self.split == "time":
            if self.time_cut is None:
                raise ValueError("split 'time' needs time_cut (--cut): events at or after it are the test split")
            if self.valid_cut is not None and self.valid_cut >= self.time_cut:
                raise ValueError(f"valid_cut ({self.valid_cut}) must be before time_cut ({self.time_cut})")
        elif self.time_cut is not None or self.valid_cut is not None:
            raise ValueError("--cut/--valid-cut only apply to --split time")
        if self.min_positives_for_holdout < 3 and self.split == "leave-last-out":
            raise ValueError("FeatureConfig.min_positives_for_holdout must be >= 3 (one train, one valid, one test)")
        if not 0.0 <= self.hard_ranked_share <= 1.0:
            raise ValueError(f"FeatureConfig.hard_ranked_share must be in [0, 1], got {self.hard_ranked_share!r}")
        for key, length in self.prefix_columns.items():
            if "." not in key or key.split(".")[0] not in ("users", "items") or length < 1:
                raise ValueError(f"prefix_columns keys are 'users.<col>' or 'items.<col>' with length >= 1, got {key!r}: {length!r}")

    def to_dict(self) -> dict[str, Any]:
        """Every field as JSON-ready values (datetimes ISO 8601, prefixes a sorted dict)."""
        out = dataclasses.asdict(self)
        out["prefix_columns"] = dict(sorted(dict(self.prefix_columns).items()))
        for name in _DATETIME_FIELDS:
            out[name] = None if out[name] is None else out[name].isoformat()
        return out

    def to_json(self) -> str:
        """Canonical JSON (sorted keys): equal configs give equal text."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> FeatureConfig:
        """Inverse of ``to_json``; fields missing from ``text`` take their defaults (settings
        saved before the field existed), unknown fields are an error."""
        data = json.loads(text)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"saved feature settings have fields this code does not know: {unknown}; "
                             "update the code or re-run the full build")
        for name in _DATETIME_FIELDS:
            if data.get(name) is not None:
                data[name] = datetime.fromisoformat(data[name])
        return cls(**data)

    def differences(self, other: FeatureConfig) -> dict[str, tuple[Any, Any]]:
        """{field: (this value, other value)} for every field that differs (JSON forms)."""
        mine, theirs = self.to_dict(), other.to_dict()
        return {k: (mine[k], theirs[k]) for k in mine if mine[k] != theirs[k]}


class FeatureConfigMismatchError(TowerlakeError):
    """A run's feature settings differ from the ones the full build saved."""


@dataclass(frozen=True)
class SavedFeatureConfig:
    """The settings of one full build, read from ``features/config`` at ``version``."""

    config: FeatureConfig
    version: int
    as_of: datetime | None


def load_saved_feature_config(lake_root: str, version: int | None = None) -> SavedFeatureConfig | None:
    """The full build's saved settings (latest, or at ``version``); None when no full build
    has saved any yet."""
    from lake_contract.delta_snapshot import read_snapshot_arrow, resolve_snapshot, table_exists
    from lake_contract.lake import Lake

    uri = Lake(lake_root).table(FEATURE_CONFIG_TABLE)
    if not table_exists(uri):
        return None
    snapshot = resolve_snapshot(uri, version)
    rows = read_snapshot_arrow(snapshot).to_pylist()
    if len(rows) != 1:
        raise TableNotFoundError(f"{uri} v{snapshot.version} holds {len(rows)} rows, not one build's settings: "
                                 "re-run the full build (python -m jobs.build_features)")
    return SavedFeatureConfig(FeatureConfig.from_json(rows[0]["config_json"]), snapshot.version, rows[0]["as_of"])


def require_saved_feature_config(lake_root: str, what: str) -> SavedFeatureConfig:
    """``load_saved_feature_config`` or a ``TableNotFoundError`` telling ``what`` to run first."""
    saved = load_saved_feature_config(lake_root)
    if saved is None:
        raise TableNotFoundError(
            f"{what} needs the feature settings of a full build, and {lake_root}/{FEATURE_CONFIG_TABLE} does not "
            "exist: run the full build first (python -m jobs.build_features); it saves them")
    return saved


def require_same_feature_config(saved: SavedFeatureConfig, given: FeatureConfig, what: str,
                                advice: str = "") -> None:
    """Raise ``FeatureConfigMismatchError`` naming every field where ``given`` differs from
    the saved settings (with both values)."""
    diff = saved.config.differences(given)
    if not diff:
        return
    fields_text = ", ".join(f"{name} (saved {old!r}, {what} {new!r})" for name, (old, new) in diff.items())
    raise FeatureConfigMismatchError(
        f"{what} uses feature settings that differ from the full build's ({FEATURE_CONFIG_TABLE} v{saved.version}) "
        f"in {len(diff)} field(s): {fields_text}. Pairs of one model must come from one set of settings: "
        + (advice or "run a full build with the new settings first"))
