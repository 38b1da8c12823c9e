"""The typed configuration of the features + pairs job (parsed once in ``jobs/build_features.py``)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

SplitKind = Literal["leave-last-out", "time"]

# Fixed log-scale boundaries (documented, stored in features/spec with every build) so that
# serving computes exactly the same buckets as training did.
ACTIVITY_BOUNDARIES: tuple[float, ...] = tuple(float(2**k) for k in range(0, 21))  # 1, 2, 4, ... events
RECENCY_DAY_BOUNDARIES: tuple[float, ...] = (1, 2, 4, 7, 14, 30, 60, 90, 180, 365, 730)


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
