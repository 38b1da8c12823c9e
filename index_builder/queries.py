"""User queries: the user tower's inputs for a batch of user ids, built from the lake.

``UserQueryBuilder`` turns original ``user_id`` strings into the user tower's inputs exactly
as the pairs tables fed them in training, by the rules of ``lake_contract.feature_contract``
(the same definitions Spark applies to build the pairs), as of now or as of a given time:

* ``user_idx`` from ``vocab/user_id`` (0 when the id is not there);
* static user features from ``features/users`` (the ``schema.user_fields`` it has), at the
  version the served model was trained on when the caller pins it (``Retriever`` does);
* ``prior_events_bucket`` (when the model has it) = ``bucket_sql`` of the user's number of
  events strictly before ``as_of`` (every event when serving now), with the boundaries
  recorded in ``features/spec``;
* ``hist`` (B, N): the N most recent items of ``bronze/interactions`` strictly before
  ``as_of`` (ties: later ``event_ts`` first, then the larger ``item_idx``), mapped through
  ``vocab/item_id``, 0-padded, N = ``schema.history_length``;
* ``seen``: every item index the user interacted with (excluded from recommendations).

Events whose item is not in ``vocab/item_id`` are dropped (the feature build drops them
too), and so are items beyond the model's embedding table (ids added after the model was
trained): the history is re-packed from the remaining items, never left with a 0 gap. A
user index beyond the model's table becomes 0 = unknown; such a user is still served from
their history and features.

All of that is ONE DuckDB query per batch of users over the snapshots' Parquet file lists,
filtered to the batch's users inside the query (a window-free ordered list aggregation): no
per-event Python, no full table in pandas.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
import pyarrow as pa

from lake_contract.delta_snapshot import DeltaSnapshot, read_snapshot_arrow, resolve_snapshot, table_exists
from lake_contract.errors import BadInputError
from lake_contract.feature_contract import (
    ACTIVITY_BOUNDARIES,
    MULTI_VALUED_WIDTH,
    PRIOR_EVENTS_FIELD,
    UNKNOWN_INDEX,
    bucket_sql,
    history_order_sql,
)
from lake_contract.lake import BRONZE_INTERACTIONS, Lake
from lake_contract.vocab_registry import vocab_table
from trainer.feature_schema import FeatureSchema
from trainer.item_store import pad_list_array

log = logging.getLogger(__name__)

DEFAULT_BATCH_USERS = 4096


# ---------------------------------------------------------------------------------------------
# user queries


@dataclass
class UserQueries:
    """User-tower inputs and seen items for B asked user ids, in the asked order.

    ``user_ids``: the B ids; ``user_idx`` (B,) int64 from ``vocab/user_id`` (0 = unknown);
    ``known`` (B,) bool, user_idx > 0; ``inputs``: the tower's dict of int64 tensors (B rows;
    unknown users' rows are all 0); ``n_events`` (B,) int64 events with a known item;
    ``seen_offsets`` (B+1,) / ``seen_values`` int64: CSR of the distinct item indices each
    user interacted with (sorted within a row)."""

    user_ids: list[str]
    user_idx: np.ndarray
    known: np.ndarray
    inputs: dict[str, Any]
    n_events: np.ndarray
    seen_offsets: np.ndarray
    seen_values: np.ndarray

    def seen(self, row: int) -> np.ndarray:
        return self.seen_values[self.seen_offsets[row]:self.seen_offsets[row + 1]]


def _sql_string(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _duckdb_path(file_uri: str) -> str:
    return file_uri[len("file://"):] if file_uri.startswith("file://") else file_uri


def snapshot_column_names(snapshot: DeltaSnapshot) -> list[str]:
    return [f["name"] for f in json.loads(snapshot.schema_json)["fields"]]


def _arrow(result: Any) -> pa.Table:
    """DuckDB's ``.arrow()`` answers a RecordBatchReader in 1.4 (a Table before)."""
    return result.read_all() if isinstance(result, pa.RecordBatchReader) else result


class UserQueryBuilder:
    """Builds ``UserQueries`` for batches of user ids from one pinned set of table versions.

    lake_root: the lake; schema: the served model's ``FeatureSchema`` (which user fields, N,
    embedding table sizes). ``pinned``: exact snapshots to read instead of the newest version,
    by table (the served model's ``features/users`` and ``features/spec``:
    ``trainer.artifacts.model_snapshot``), so the towers see the feature indices and bucket
    boundaries they were trained on. Every other table (vocab/user_id, vocab/item_id,
    bronze/interactions) is pinned at its latest version at construction
    (``table_versions``); make a new builder to see newer data."""

    def __init__(self, lake_root: str, schema: FeatureSchema, threads: int = 2,
                 pinned: Mapping[str, DeltaSnapshot] | None = None) -> None:
        import duckdb

        self.lake = Lake(str(lake_root))
        self.schema = schema
        self.pinned = dict(pinned or {})
        self.table_versions: dict[str, int] = {}
        self._con = duckdb.connect(config={"threads": threads})
        self._create_view("user_vocab", vocab_table("user_id"), {"value": "value", "idx": "index"})
        self._create_view("item_vocab", vocab_table("item_id"), {"value": "value", "idx": "index"})
        self._create_view("events", BRONZE_INTERACTIONS,
                          {"user_id": "user_id", "item_id": "item_id", "event_ts": "event_ts"})
        user_columns = self._columns("features/users")
        self.static_fields = [f for f in schema.user_fields if f.name in user_columns and f.name != PRIOR_EVENTS_FIELD]
        missing = [f.name for f in schema.user_fields
                   if f.name != PRIOR_EVENTS_FIELD and f not in self.static_fields]
        if missing:
            log.warning("features/users has no column(s) %s the model reads: they are served as 0 (unknown)",
                        missing)
        self.missing_fields = missing
        self._create_view("user_features", "features/users",
                          {"user_idx": "user_idx", **{f.name: f.name for f in self.static_fields}},
                          optional=True)
        self.activity_boundaries = self._activity_boundaries()

    # -- setup

    def _snapshot(self, relative: str) -> DeltaSnapshot | None:
        """The pinned snapshot of ``relative``, else its latest; None when there is no table."""
        if relative in self.pinned:
            return self.pinned[relative]
        uri = self.lake.table(relative)
        return resolve_snapshot(uri) if table_exists(uri) else None

    def _columns(self, relative: str) -> set[str]:
        snapshot = self._snapshot(relative)
        return set(snapshot_column_names(snapshot)) if snapshot is not None else set()

    def _create_view(self, view: str, relative: str, columns: dict[str, str], optional: bool = False) -> None:
        """``view`` over the latest snapshot of ``relative``: ``{alias: source column}``."""
        uri = self.lake.table(relative)
        snapshot = self._snapshot(relative)
        if snapshot is None:
            if not optional:
                raise BadInputError(f"no Delta table at {uri}: serving reads it; run jobs.ingest and "
                                    "jobs.build_features on this lake first")
            select = ", ".join(f"CAST(NULL AS BIGINT) AS {_ident(a)}" for a in columns)
            self._con.execute(f"CREATE VIEW {view} AS SELECT {select} WHERE false")
            return
        self.table_versions[relative] = snapshot.version
        absent = [c for c in columns.values() if c not in snapshot_column_names(snapshot)]
        if absent:
            raise BadInputError(f"{uri} (version {snapshot.version}) has no column(s) {absent}; "
                                "rebuild it with the current jobs")
        in_partition = [c for c in columns.values() if c in snapshot.partition_columns]
        if in_partition:
            raise BadInputError(f"{uri} is partitioned by {in_partition}, which serving reads as data columns")
        if not snapshot.files:
            schema = pa.schema([(a, pa.int64() if a in ("idx", "user_idx") else pa.string()) for a in columns])
            self._con.register(f"_empty_{view}", schema.empty_table())
            self._con.execute(f"CREATE VIEW {view} AS SELECT * FROM _empty_{view}")
            return
        files = "[" + ", ".join(_sql_string(_duckdb_path(f)) for f in snapshot.files) + "]"
        select = ", ".join(f"{_ident(src)} AS {_ident(alias)}" for alias, src in columns.items())
        self._con.execute(f"CREATE VIEW {view} AS SELECT {select} FROM read_parquet({files}, union_by_name=true)")

    def _activity_boundaries(self) -> tuple[float, ...]:
        snapshot = self._snapshot("features/spec")
        if snapshot is not None:
            self.table_versions["features/spec"] = snapshot.version
            rows = read_snapshot_arrow(snapshot, ["table", "feature", "boundaries"]).to_pylist()
            for row in rows:
                if row["table"] == "pairs" and row["feature"] == PRIOR_EVENTS_FIELD and row["boundaries"]:
                    return tuple(float(b) for b in row["boundaries"])
        return ACTIVITY_BOUNDARIES

    # -- queries

    def build(self, user_ids: Sequence[str], as_of: datetime | Sequence[datetime | None] | None = None
              ) -> UserQueries:
        """Inputs for ``user_ids`` (any number; one query). Duplicates are answered twice.

        ``as_of``: None (every event: serving now), one time for all users, or one per user
        (None = every event): only events STRICTLY before it count (history, prior events,
        seen items), as a training pair built at that event time saw them
        (``lake_contract.feature_contract``). Times must be timezone-aware."""
        import torch

        ids = [str(u) for u in user_ids]
        n_hist = int(self.schema.history_length)
        if as_of is None or isinstance(as_of, datetime):
            as_of = [as_of] * len(ids)
        as_of = list(as_of)
        if len(as_of) != len(ids):
            raise ValueError(f"as_of must be one time or one per user ({len(ids)}), got {len(as_of)}")
        naive = [t for t in as_of if t is not None and t.tzinfo is None]
        if naive:
            raise ValueError(f"as_of times must be timezone-aware (UTC), got {naive[0]!r}")
        asked = pa.table({"pos": pa.array(np.arange(len(ids)), pa.int64()), "user_id": pa.array(ids, pa.string()),
                          "as_of": pa.array(as_of, pa.timestamp("us", tz="UTC"))})
        feature_cols = "".join(f", uf.{_ident(f.name)}" for f in self.static_fields)
        prior_bucket = bucket_sql("coalesce(p.n_events, 0)", self.activity_boundaries)
        self._con.register("asked", asked)
        try:
            # Items the model's tables do not hold are dropped from the history BEFORE the
            # last N are taken (re-packed, never a 0 between items), as the contract says.
            table = _arrow(self._con.execute(f"""
                WITH ev AS (
                    SELECT a.pos, iv.idx AS item_idx, e.event_ts
                    FROM asked a
                    JOIN events e ON e.user_id = a.user_id
                    JOIN item_vocab iv ON e.item_id = iv.value
                    WHERE iv.idx > {UNKNOWN_INDEX} AND (a.as_of IS NULL OR e.event_ts < a.as_of)
                ),
                per_pos AS (
                    SELECT pos, count(*) AS n_events,
                           (list(item_idx ORDER BY {history_order_sql()})
                              FILTER (WHERE item_idx < {int(self.schema.num_items)}))[1:{n_hist}] AS hist,
                           list_sort(list_distinct(list(item_idx))) AS seen
                    FROM ev GROUP BY pos
                )
                SELECT a.pos, coalesce(uv.idx, 0)::BIGINT AS user_idx,
                       coalesce(p.n_events, 0)::BIGINT AS n_events, {prior_bucket} AS prior_events_bucket,
                       p.hist, p.seen{feature_cols}
                FROM asked a
                LEFT JOIN user_vocab uv ON a.user_id = uv.value
                LEFT JOIN per_pos p ON a.pos = p.pos
                LEFT JOIN user_features uf ON uf.user_idx = uv.idx
                ORDER BY a.pos
            """).arrow())
        finally:
            self._con.unregister("asked")
        if table.num_rows != len(ids):
            raise BadInputError(f"vocab/user_id or features/users maps some of {len(ids)} users to several rows "
                                f"({table.num_rows} rows came back): the tables are inconsistent; rebuild features")
        user_idx = np.asarray(table.column("user_idx").to_numpy(), dtype=np.int64)
        n_events = np.asarray(table.column("n_events").to_numpy(), dtype=np.int64)
        known = user_idx > 0
        hist = pad_list_array(table.column("hist"), n_hist)
        tower_idx = np.where(user_idx < self.schema.num_users, user_idx, 0)
        inputs = {"user_idx": tower_idx, "hist": hist}
        for spec in self.schema.user_fields:
            if spec.name == PRIOR_EVENTS_FIELD:
                values = np.asarray(table.column("prior_events_bucket").to_numpy(), dtype=np.int64)
            elif spec in self.static_fields:
                column = table.column(spec.name)
                if spec.kind == "multi_valued":
                    values = pad_list_array(column, MULTI_VALUED_WIDTH)
                else:
                    values = np.asarray(column.fill_null(0).to_numpy(zero_copy_only=False), dtype=np.int64)
            else:
                values = np.zeros((len(ids), MULTI_VALUED_WIDTH) if spec.kind == "multi_valued" else len(ids),
                                  dtype=np.int64)
            values = np.where((values >= 0) & (values < spec.size), values, 0)
            inputs[spec.name] = values
        for name in inputs:
            inputs[name] = np.where(known if inputs[name].ndim == 1 else known[:, None], inputs[name], 0)
        seen = table.column("seen").combine_chunks()
        offsets = np.asarray(seen.offsets, dtype=np.int64)
        seen_values = np.asarray(seen.flatten().fill_null(0).to_numpy(zero_copy_only=False), dtype=np.int64)
        seen_values = seen_values[offsets[0]:offsets[-1]]
        return UserQueries(
            user_ids=ids, user_idx=user_idx, known=known,
            inputs={k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.int64)) for k, v in inputs.items()},
            n_events=n_events, seen_offsets=offsets - offsets[0], seen_values=seen_values,
        )

    def iter_user_ids(self, batch_users: int = DEFAULT_BATCH_USERS) -> Iterator[list[str]]:
        """Every user id of ``vocab/user_id`` in index order, ``batch_users`` at a time (streamed)."""
        cursor = self._con.cursor()
        try:
            reader = cursor.execute("SELECT value FROM user_vocab ORDER BY idx").fetch_record_batch(batch_users)
            for batch in reader:
                if batch.num_rows:
                    yield batch.column(0).to_pylist()
        finally:
            cursor.close()

    def count_users(self) -> int:
        return int(self._con.execute("SELECT count(*) FROM user_vocab").fetchone()[0])

    def close(self) -> None:
        self._con.close()
