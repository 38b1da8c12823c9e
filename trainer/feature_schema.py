"""Which model inputs the towers have and how big each embedding table is, read from the lake.

The feature build records every model input column in ``features/spec`` (kind, vocabulary,
bucket boundaries) and every vocabulary in ``vocab/<name>``; this module turns those into a
``FeatureSchema`` the towers are built from. It pins the Delta version of every table it
reads, so a model can name the exact data it was sized from (docs/design.md decision 2).

Sizes: a categorical or multi-valued field has ``vocab size`` rows (index 0 = unknown /
padding); a bucketised numeric has ``len(boundaries) + 2`` rows (0 = null, 1.. = buckets).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Literal

import pyarrow.compute as pc

from lake_contract.delta_snapshot import read_snapshot_arrow, resolve_snapshot, table_exists, table_version
from lake_contract.feature_config import FEATURE_CONFIG_TABLE
from lake_contract.feature_contract import MULTI_VALUED_WIDTH
from lake_contract.lake import Lake
from lake_contract.vocab_registry import read_vocab_info

__all__ = ["MULTI_VALUED_WIDTH", "FeatureSchema", "FieldSpec", "load_feature_schema"]

FieldKind = Literal["categorical", "multi_valued", "bucket"]

# Fixed width of a padded multi-valued field: the feature contract's (lake_contract.feature_contract).


@dataclass(frozen=True)
class FieldSpec:
    """One embedded input: ``column`` of the pairs (user side) or features/items (item side)."""

    name: str
    kind: FieldKind
    size: int


@dataclass(frozen=True)
class FeatureSchema:
    """Everything the towers need to know about the inputs.

    ``user_fields`` are read from ``pairs/*`` rows (static user features and the
    point-in-time ``prior_events_bucket``); ``item_fields`` from ``features/items`` (the item
    feature store). ``num_users`` / ``num_items`` are the id vocabulary sizes (index 0
    included); ``num_categories`` is the size of the primary-category index space.
    ``history_length`` is N of ``pairs.hist``. ``table_versions`` pins what was read.
    """

    num_users: int
    num_items: int
    num_categories: int
    history_length: int
    user_fields: tuple[FieldSpec, ...]
    item_fields: tuple[FieldSpec, ...]
    table_versions: dict[str, int]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> FeatureSchema:
        data = json.loads(text)
        return cls(
            num_users=data["num_users"], num_items=data["num_items"], num_categories=data["num_categories"],
            history_length=data["history_length"],
            user_fields=tuple(FieldSpec(**f) for f in data["user_fields"]),
            item_fields=tuple(FieldSpec(**f) for f in data["item_fields"]),
            table_versions=dict(data["table_versions"]),
        )

    def grown_to(self, other: FeatureSchema) -> FeatureSchema:
        """Check ``other`` only grows this schema (same fields, sizes >= ours) and return it."""
        mine = {f.name: f for f in (*self.user_fields, *self.item_fields)}
        theirs = {f.name: f for f in (*other.user_fields, *other.item_fields)}
        if set(mine) != set(theirs):
            raise ValueError(f"feature fields changed: model has {sorted(mine)}, lake has {sorted(theirs)}; "
                             "retrain from scratch (--mode full) after a feature change")
        shrunk = [n for n in mine if theirs[n].size < mine[n].size]
        if other.num_users < self.num_users or other.num_items < self.num_items or shrunk:
            raise ValueError(f"vocabularies shrank (fields {shrunk}, users {self.num_users}->{other.num_users}, "
                             f"items {self.num_items}->{other.num_items}): vocabularies are append-only, so the "
                             "lake was rebuilt or rolled back; retrain from scratch")
        return other


def load_feature_schema(lake_root: str, pairs_columns: list[str], item_exclude: tuple[str, ...] = (),
                        history_length: int | None = None, versions: dict[str, int] | None = None) -> FeatureSchema:
    """Build the schema from ``features/spec``, ``features/items`` and the vocabularies.

    ``pairs_columns``: the columns of the training pairs table (user-side fields are the
    spec's user features that the pairs carry). ``item_exclude``: item feature columns the
    item tower must not read (see ``ModelConfig.item_exclude``). ``versions``: pinned Delta
    versions by table (``{"features/spec": 3, "vocab/user_id": 1, ...}``); unnamed tables are
    read at their latest version, which the returned ``table_versions`` records.
    """
    lake = Lake(lake_root)
    versions_in = dict(versions or {})
    spec_snap = resolve_snapshot(lake.table("features/spec"), versions_in.get("features/spec"))
    spec = read_snapshot_arrow(spec_snap).to_pylist()
    items_snap = resolve_snapshot(lake.table("features/items"), versions_in.get("features/items"))
    item_columns = set(_schema_names(items_snap.schema_json))
    versions = {"features/spec": spec_snap.version, "features/items": items_snap.version}
    # features/users is not read here (the pairs carry the user features), but serving builds
    # queries from it: the version recorded now is the one serving reads for this model.
    users_uri = lake.table("features/users")
    if "features/users" in versions_in or table_exists(users_uri):
        versions["features/users"] = resolve_snapshot(users_uri, versions_in.get("features/users")).version

    def size_of(row: dict) -> int:
        if row["kind"] == "bucket":
            return len(row["boundaries"] or ()) + 2
        info = read_vocab_info(lake.root, row["vocab"], versions_in.get(f"vocab/{row['vocab']}"))
        versions[f"vocab/{row['vocab']}"] = info.version
        return info.size

    user_fields, item_fields = [], []
    for row in sorted(spec, key=lambda r: (r["table"], r["feature"])):
        fs = FieldSpec(name=row["feature"], kind=row["kind"], size=0)
        if row["table"] in ("users", "pairs") and row["feature"] in pairs_columns:
            user_fields.append(FieldSpec(fs.name, fs.kind, size_of(row)))
        elif row["table"] == "items" and row["feature"] in item_columns and row["feature"] not in item_exclude:
            item_fields.append(FieldSpec(fs.name, fs.kind, size_of(row)))
    users = read_vocab_info(lake.root, "user_id", versions_in.get("vocab/user_id"))
    items = read_vocab_info(lake.root, "item_id", versions_in.get("vocab/item_id"))
    versions["vocab/user_id"], versions["vocab/item_id"] = users.version, items.version
    # The feature settings the pairs were built with (lake_contract.feature_config): pinned so
    # that a fine-tune can refuse pairs built with other settings than its parent's.
    settings = versions_in.get(FEATURE_CONFIG_TABLE, table_version(lake.table(FEATURE_CONFIG_TABLE)))
    if settings is not None:
        versions[FEATURE_CONFIG_TABLE] = settings
    # The primary category (for the category alignment loss) needs no embedding table, only
    # the size of its index space: max index + 1 over the catalog (catalog-sized column).
    num_categories = 1
    if "primary_category_idx" in item_columns:
        column = read_snapshot_arrow(items_snap, ["primary_category_idx"]).column(0)
        num_categories = int(pc.max(column).as_py() or 0) + 1
    return FeatureSchema(
        num_users=users.size, num_items=items.size, num_categories=max(num_categories, 1),
        history_length=history_length or 0, user_fields=tuple(user_fields), item_fields=tuple(item_fields),
        table_versions=versions,
    )


def _schema_names(schema_json: str) -> list[str]:
    return [f["name"] for f in json.loads(schema_json)["fields"]]
