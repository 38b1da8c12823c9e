"""Grow a trained two-tower model to a newer, larger schema for the hourly fine-tune.

Vocabularies are append-only (docs/design.md decision 5): between two runs an id keeps its index
and new ids get the next indices, so every embedding table of the parent model is a prefix
of the table the new vocabulary needs. ``grow_model`` builds a new ``TwoTowerModel`` for the
new schema whose old rows are the parent's rows bit for bit and whose new rows are drawn like
a fresh model draws them (``normal(0, EMBEDDING_INIT_STD)``, see ``trainer.towers._embedding``),
so the grown model scores old users/items exactly like the parent before the first step.

Growable tables are found generically: every ``nn.Embedding`` of the new model (user id, the
item id table the user tower's history pooling shares, the DAT augmented vectors, one table
per categorical / multi-valued / bucket field). Any other difference between the parent and
the new model (a field added, removed, moved between towers, reordered or of another kind, a
table that shrank, an attention position table sized by another history length) is a
``ValueError`` that says what differs and to retrain from scratch with ``--mode full``.

There is deliberately no optimizer-state growth: a fine-tune starts a fresh optimizer on the
grown model (the parent's Adam moments describe a different run, and the new rows have none).
"""

from __future__ import annotations

import zlib

import torch
from torch import nn

from trainer.feature_schema import FeatureSchema
from trainer.towers import EMBEDDING_INIT_STD, TwoTowerModel

_FULL = "retrain from scratch with --mode full"


def grow_model(parent: TwoTowerModel, new_schema: FeatureSchema, seed: int = 0) -> TwoTowerModel:
    """A NEW ``TwoTowerModel(parent.config, new_schema)`` warm-started from ``parent``.

    Every parameter/buffer whose shape is unchanged is copied; every embedding table that
    gained rows keeps its old rows exactly and gets new rows from ``normal(0,
    EMBEDDING_INIT_STD)`` drawn from a generator seeded by ``seed`` and the table's name (same
    seed -> same new rows; one table's growth never changes another's draws). The parent is
    not modified, the global RNG is not consumed, and the result lives on the parent's device
    and dtype. Raises ``ValueError`` for anything but row growth (see the module docstring).
    """
    _check_schemas(parent.schema, new_schema)
    # Build on the meta device: no memory for tables we are about to replace, no global RNG use.
    with torch.device("meta"):
        child = TwoTowerModel(parent.config, new_schema)
    growable = {f"{name}.weight" for name, module in child.named_modules() if isinstance(module, nn.Embedding)}
    old_state = parent.state_dict()
    new_shapes = {k: v.shape for k, v in child.state_dict().items()}
    if set(old_state) != set(new_shapes):
        missing, extra = sorted(set(old_state) - set(new_shapes)), sorted(set(new_shapes) - set(old_state))
        raise ValueError(f"cannot grow the model: the new schema builds different tensors (only in the parent: "
                         f"{missing}, only in the new model: {extra}); {_FULL}")
    state: dict[str, torch.Tensor] = {}
    for key, old in old_state.items():
        shape = new_shapes[key]
        if old.shape == shape:
            state[key] = old.detach().clone()
        elif key in growable and old.dim() == 2 and shape[1] == old.shape[1] and shape[0] > old.shape[0]:
            state[key] = _grow_rows(old.detach(), shape[0], _table_seed(seed, key))
        else:
            raise ValueError(f"cannot grow the model: {key} is {tuple(old.shape)} in the parent but "
                             f"{tuple(shape)} for the new schema{_hint(key, parent.schema, new_schema)}; {_FULL}")
    child.load_state_dict(state, strict=True, assign=True)
    leftover = [n for n, t in (*child.named_parameters(), *child.named_buffers()) if t.is_meta]
    if leftover:  # a non-persistent buffer would not be in the state_dict
        raise RuntimeError(f"grow_model left tensors uninitialised: {leftover}")
    return child


def describe_growth(parent_schema: FeatureSchema, new_schema: FeatureSchema) -> dict:
    """``{"users": (old, new), "items": (old, new), "categories": (old, new), "fields": {name:
    (old, new)}, "grown": [names of grown vocabularies]}`` for logs and manifests. Describes
    only (no validation); a field present on one side only has ``None`` on the other."""
    old_fields = {f.name: f.size for f in (*parent_schema.user_fields, *parent_schema.item_fields)}
    new_fields = {f.name: f.size for f in (*new_schema.user_fields, *new_schema.item_fields)}
    fields = {n: (old_fields.get(n), new_fields.get(n)) for n in sorted(old_fields.keys() | new_fields.keys())}
    sizes = {"users": (parent_schema.num_users, new_schema.num_users),
             "items": (parent_schema.num_items, new_schema.num_items),
             "categories": (parent_schema.num_categories, new_schema.num_categories)}
    grown = [n for n, (a, b) in (*sizes.items(), *fields.items()) if a is not None and b is not None and b > a]
    return {**sizes, "fields": fields, "grown": grown}


def _check_schemas(old: FeatureSchema, new: FeatureSchema) -> None:
    try:
        old.grown_to(new)
    except ValueError as err:
        text = str(err)
        if text.endswith("retrain from scratch"):  # grown_to's shrink message
            text += " with --mode full"
        elif "--mode full" not in text:
            text += f"; {_FULL}"
        raise ValueError(f"cannot grow the model: {text}") from err
    for side in ("user_fields", "item_fields"):
        mine = [(f.name, f.kind) for f in getattr(old, side)]
        theirs = [(f.name, f.kind) for f in getattr(new, side)]
        if mine != theirs:  # the MLP reads fields in this order, so order and kind must match too
            changed = sorted({n for n, _ in set(mine) ^ set(theirs)}) or [n for n, _ in theirs]
            raise ValueError(f"cannot grow the model: {side} differ in order, kind or tower (fields {changed}: "
                             f"model has {mine}, new schema has {theirs}); {_FULL}")


def check_bucket_boundaries(lake_root: str, parent_versions: dict, new_versions: dict, schema: FeatureSchema) -> None:
    """Equal sizes do not make equal buckets: refuse to grow a parent trained on other bucket
    boundaries (``features/spec`` at the parent's recorded version vs the new run's) for any
    bucket field of ``schema``, since the same index would then mean other values."""
    from lake_contract.delta_snapshot import read_snapshot_arrow, resolve_snapshot
    from lake_contract.errors import TableNotFoundError
    from lake_contract.lake import Lake

    old_version, new_version = parent_versions.get("features/spec"), new_versions.get("features/spec")
    if old_version is None or new_version is None or old_version == new_version:
        return
    uri = Lake(lake_root).table("features/spec")

    def boundaries(version: int) -> dict[str, tuple[float, ...]]:
        rows = read_snapshot_arrow(resolve_snapshot(uri, version), ["feature", "kind", "boundaries"]).to_pylist()
        return {r["feature"]: tuple(r["boundaries"] or ()) for r in rows if r["kind"] == "bucket"}

    try:
        old, new = boundaries(int(old_version)), boundaries(int(new_version))
    except TableNotFoundError as err:
        raise ValueError(f"cannot grow the model: its features/spec@v{old_version} is gone, so the bucket "
                         f"boundaries it was trained on cannot be compared ({err}); {_FULL}") from err
    buckets = [f.name for f in (*schema.user_fields, *schema.item_fields) if f.kind == "bucket"]
    moved = [n for n in buckets if n in old and n in new and old[n] != new[n]]
    if moved:
        raise ValueError(f"cannot grow the model: bucket boundaries of {moved} moved between features/spec@v"
                         f"{old_version} (the parent's) and @v{new_version} (e.g. {moved[0]}: {list(old[moved[0]])} -> "
                         f"{list(new[moved[0]])}), so the same bucket index now means other values; {_FULL}")


def _grow_rows(old: torch.Tensor, rows: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    fresh = torch.empty(rows - old.shape[0], old.shape[1]).normal_(0.0, EMBEDDING_INIT_STD, generator=generator)
    grown = torch.cat([old, fresh.to(device=old.device, dtype=old.dtype)])
    if old.shape[0] == 0:
        grown[0].zero_()  # padding row
    return grown


def _table_seed(seed: int, key: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(key.encode())) % (2**63)


def _hint(key: str, old: FeatureSchema, new: FeatureSchema) -> str:
    if key.endswith("history.positions") and old.history_length != new.history_length:
        return (f" (history_length {old.history_length} -> {new.history_length}; attention position embeddings "
                f"are sized by it: fine-tune with the parent's history length)")
    return ""
