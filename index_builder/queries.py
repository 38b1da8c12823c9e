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

Queries as of now read ``features/user_state`` (written by the full build, MERGEd for the
touched users by each incremental build) and add only the users' events at or after their
state row's ``as_of``, from the bronze date partitions since the oldest ``as_of``: the cost of
a served user is their state plus the recent events, not every file of the lake. The result
is the same as from all events (``tests/test_user_state.py`` checks every user); rows the
state cannot answer exactly (no state row; fewer than N known items among the kept recent
ones) take the events path. ``as_of`` queries (evaluation, the parity test) always read the
events.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from lake_contract.delta_snapshot import (
    DeltaSnapshot,
    as_utc,
    files_newer_than,
    read_snapshot_arrow,
    resolve_snapshot,
    table_exists,
)
from lake_contract.errors import BadInputError
from lake_contract.feature_contract import (
    ACTIVITY_BOUNDARIES,
    MULTI_VALUED_WIDTH,
    PRIOR_EVENTS_FIELD,
    UNKNOWN_INDEX,
    USER_STATE_TABLE,
    bucket_sql,
    history_order_sql,
    known_history,
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
                 pinned: Mapping[str, DeltaSnapshot] | None = None, use_state: bool = True) -> None:
        import duckdb

        self.lake = Lake(str(lake_root))
        self.schema = schema
        self.pinned = dict(pinned or {})
        self.table_versions: dict[str, int] = {}
        self._latest: dict[str, DeltaSnapshot | None] = {}
        self.fresh_files: int | None = None
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
        self.last_fallbacks = 0
        self.uses_state = use_state and self._state_views()

    # -- setup

    def _snapshot(self, relative: str) -> DeltaSnapshot | None:
        """The pinned snapshot of ``relative``, else its latest; None when there is no table."""
        if relative in self.pinned:
            return self.pinned[relative]
        if relative not in self._latest:  # resolved once: every view of a table reads one version
            uri = self.lake.table(relative)
            self._latest[relative] = resolve_snapshot(uri) if table_exists(uri) else None
        return self._latest[relative]

    def _columns(self, relative: str) -> set[str]:
        snapshot = self._snapshot(relative)
        return set(snapshot_column_names(snapshot)) if snapshot is not None else set()

    def _state_views(self) -> bool:
        """Views ``user_state`` and ``fresh_events`` (the bronze files that may hold an event at
        or after the oldest state row's ``as_of``); False when there is no usable state table."""
        snapshot = self._snapshot(USER_STATE_TABLE)
        if snapshot is None or not snapshot.files:
            return False
        columns = ["user_idx", "n_events", "recent", "seen", "as_of"]
        absent = [c for c in columns if c not in snapshot_column_names(snapshot)]
        if absent:
            log.warning("%s has no column(s) %s: serving reads the users' events; run a full build",
                        USER_STATE_TABLE, absent)
            return False
        oldest = pc.min(read_snapshot_arrow(snapshot, ["as_of"]).column("as_of")).as_py()
        if oldest is None:
            return False
        oldest = as_utc(oldest)
        since = oldest.date()
        self._create_view("user_state", USER_STATE_TABLE, {c: c for c in columns})
        # Only files that may hold an event at or after the oldest as_of: their date partition
        # and their logged max event_ts (+1 ms: the log may truncate it) say so.
        events = self._snapshot(BRONZE_INTERACTIONS)
        newer = dict(zip(events.files, files_newer_than(events, "event_ts", oldest), strict=True)) if events else {}

        def recent(path: str, part: dict) -> bool:
            if str(part.get("event_date") or "9999") < since.isoformat():
                return False
            return newer.get(path, True)

        self.fresh_files = self._create_view("fresh_events", BRONZE_INTERACTIONS,
                                             {"user_id": "user_id", "item_id": "item_id", "event_ts": "event_ts"},
                                             keep=recent)
        return True

    def _create_view(self, view: str, relative: str, columns: dict[str, str], optional: bool = False,
                     keep: Callable[[str, dict], bool] | None = None) -> int:
        """``view`` over the latest snapshot of ``relative``: ``{alias: source column}``;
        ``keep(file, partition_values)``: only the files it accepts. Returns how many files
        the view reads."""
        uri = self.lake.table(relative)
        snapshot = self._snapshot(relative)
        if snapshot is None:
            if not optional:
                raise BadInputError(f"no Delta table at {uri}: serving reads it; run jobs.ingest and "
                                    "jobs.build_features on this lake first")
            select = ", ".join(f"CAST(NULL AS BIGINT) AS {_ident(a)}" for a in columns)
            self._con.execute(f"CREATE VIEW {view} AS SELECT {select} WHERE false")
            return 0
        self.table_versions[relative] = snapshot.version
        absent = [c for c in columns.values() if c not in snapshot_column_names(snapshot)]
        if absent:
            raise BadInputError(f"{uri} (version {snapshot.version}) has no column(s) {absent}; "
                                "rebuild it with the current jobs")
        in_partition = [c for c in columns.values() if c in snapshot.partition_columns]
        if in_partition:
            raise BadInputError(f"{uri} is partitioned by {in_partition}, which serving reads as data columns")
        files = [f for f, part in zip(snapshot.files, snapshot.partition_values, strict=True)
                 if keep is None or keep(f, part)]
        if not files:
            types = {"idx": pa.int64(), "user_idx": pa.int64(), "event_ts": pa.timestamp("us", tz="UTC")}
            schema = pa.schema([(a, types.get(a, pa.string())) for a in columns])
            self._con.register(f"_empty_{view}", schema.empty_table())
            self._con.execute(f"CREATE VIEW {view} AS SELECT * FROM _empty_{view}")
            return 0
        listed = "[" + ", ".join(_sql_string(_duckdb_path(f)) for f in files) + "]"
        select = ", ".join(f"{_ident(src)} AS {_ident(alias)}" for alias, src in columns.items())
        self._con.execute(f"CREATE VIEW {view} AS SELECT {select} FROM read_parquet({listed}, union_by_name=true)")
        return len(files)

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
        (``lake_contract.feature_contract``). Times must be timezone-aware.

        "Now" queries read ``features/user_state`` plus the users' events since its rows'
        ``as_of`` when the state table exists (``uses_state``): the same inputs as from the
        events (the state is exact as of each row's ``as_of``), at a cost that does not grow
        with the lake. Users without a state row, and users whose kept recent items hold
        fewer than N the model knows, are answered from their events."""
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
        if self.uses_state and all(t is None for t in as_of):
            table = self._from_state(asked, n_hist)
        else:
            table = self._query(self._events_sql(n_hist), asked)
        if table.num_rows != len(ids):
            raise BadInputError(f"vocab/user_id or features/users maps some of {len(ids)} users to several rows "
                                f"({table.num_rows} rows came back): the tables are inconsistent; rebuild features")
        user_idx = np.asarray(table.column("user_idx").to_numpy(), dtype=np.int64)
        n_events = np.asarray(table.column("n_events").to_numpy(), dtype=np.int64)
        known = user_idx > 0
        hist = self._history(table.column("hist"), n_hist)
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

    def _history(self, column: pa.ChunkedArray | pa.Array, n_hist: int) -> np.ndarray:
        """(B, N) history: the known items (``known_history``) of each list, first N."""
        if isinstance(column, pa.ChunkedArray):
            column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
        lengths = np.asarray(pc.list_value_length(column).fill_null(0), dtype=np.int64)
        width = max(n_hist, int(lengths.max(initial=0)))
        return known_history(pad_list_array(column, width), int(self.schema.num_items))[:, :n_hist]

    def _query(self, sql: str, asked: pa.Table) -> pa.Table:
        self._con.register("asked", asked)
        try:
            return _arrow(self._con.execute(sql).arrow())
        finally:
            self._con.unregister("asked")

    def _static_columns(self) -> str:
        return "".join(f", uf.{_ident(f.name)}" for f in self.static_fields)

    def _events_sql(self, n_hist: int) -> str:
        """Every event of the asked users (before their ``as_of``): the reference path."""
        prior_bucket = bucket_sql("coalesce(p.n_events, 0)", self.activity_boundaries)
        # Items the model's tables do not hold are dropped from the history BEFORE the
        # last N are taken (re-packed, never a 0 between items), as the contract says.
        return f"""
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
                   p.hist::BIGINT[] AS hist, p.seen::BIGINT[] AS seen{self._static_columns()}
            FROM asked a
            LEFT JOIN user_vocab uv ON a.user_id = uv.value
            LEFT JOIN per_pos p ON a.pos = p.pos
            LEFT JOIN user_features uf ON uf.user_idx = uv.idx
            ORDER BY a.pos
        """

    def _from_state(self, asked: pa.Table, n_hist: int) -> pa.Table:
        """The state path of ``build`` (as of now), with the events path for the rows it
        cannot answer exactly; same columns and row order as the events path."""
        total = "(st.n_events + coalesce(fp.n_fresh, 0))"
        table = self._query(f"""
            WITH a2 AS (
                SELECT a.pos, a.user_id, uv.idx AS user_idx
                FROM asked a LEFT JOIN user_vocab uv ON a.user_id = uv.value
            ),
            st AS (
                SELECT a2.pos, a2.user_id, s.n_events, s.recent::BIGINT[] AS recent, s.seen::BIGINT[] AS seen, s.as_of
                FROM a2 JOIN user_state s ON s.user_idx = a2.user_idx
            ),
            fresh AS (
                SELECT st.pos, iv.idx AS item_idx, e.event_ts
                FROM st
                JOIN fresh_events e ON e.user_id = st.user_id
                JOIN item_vocab iv ON e.item_id = iv.value
                WHERE iv.idx > {UNKNOWN_INDEX} AND e.event_ts >= st.as_of
            ),
            fp AS (
                SELECT pos, count(*) AS n_fresh, list(item_idx ORDER BY {history_order_sql()}) AS items,
                       list(item_idx) AS seen
                FROM fresh GROUP BY pos
            )
            SELECT a2.pos, coalesce(a2.user_idx, 0)::BIGINT AS user_idx, {total}::BIGINT AS n_events,
                   {bucket_sql(total, self.activity_boundaries)} AS prior_events_bucket,
                   list_concat(coalesce(fp.items, []::BIGINT[]), st.recent)::BIGINT[] AS hist,
                   list_sort(list_distinct(list_concat(st.seen, coalesce(fp.seen, []::BIGINT[]))))::BIGINT[] AS seen
                   {self._static_columns()},
                   st.pos IS NOT NULL AS _in_state,
                   coalesce(len(st.recent) < st.n_events, false) AS _truncated
            FROM a2
            LEFT JOIN st ON a2.pos = st.pos
            LEFT JOIN fp ON a2.pos = fp.pos
            LEFT JOIN user_features uf ON uf.user_idx = a2.user_idx
            ORDER BY a2.pos
        """, asked)
        if table.num_rows != asked.num_rows:
            return table  # build() reports the inconsistency
        short = (self._history(table.column("hist"), n_hist) > UNKNOWN_INDEX).sum(axis=1) < n_hist
        redo = ~np.asarray(table.column("_in_state").to_numpy(zero_copy_only=False), dtype=bool) | (
            short & np.asarray(table.column("_truncated").to_numpy(zero_copy_only=False), dtype=bool))
        table = table.drop_columns(["_in_state", "_truncated"])
        self.last_fallbacks = int(redo.sum())
        if not redo.any():
            return table
        events = self._query(self._events_sql(n_hist), asked.take(np.flatnonzero(redo)))
        kept = table.filter(pa.array(~redo)).cast(events.schema)
        return pa.concat_tables([kept, events]).sort_by("pos")

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
