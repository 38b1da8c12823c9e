"""Retrieval over the CURRENT release: user queries from the lake as of now, FAISS top-K.

Two pieces (STYLE.md item 1: the serving wrapper imports the towers and a checkpoint loader,
never the optimiser or the loss):

``UserQueryBuilder`` turns original ``user_id`` strings into the user tower's inputs exactly
as the pairs tables fed them in training, but as of NOW (the latest table versions, pinned
when the builder is made):

* ``user_idx`` from ``vocab/user_id`` (0 when the id is not there);
* static user features from ``features/users`` (the ``schema.user_fields`` it has);
* ``prior_events_bucket`` (when the model has it) = the bucket of the user's total number of
  events, with the boundaries recorded in ``features/spec`` (training buckets the events
  strictly before each pair; at serving time every event is "before");
* ``hist`` (B, N): the N most recent items of ``bronze/interactions`` (ties: later
  ``event_ts`` first, then the larger ``item_idx``), mapped through ``vocab/item_id``,
  0-padded, N = ``schema.history_length``;
* ``seen``: every item index the user interacted with (excluded from recommendations).

Events whose item is not in ``vocab/item_id`` are ignored (the feature build drops them
too). Indices beyond the model's embedding tables (ids added to a vocabulary after the model
was trained) become 0 = unknown, so a new item in a history or a user added since training
never breaks the tower; such a user is still served from their history and features.

All of that is ONE DuckDB query per batch of users over the snapshots' Parquet file lists,
filtered to the batch's users inside the query (a window-free ordered list aggregation): no
per-event Python, no full table in pandas.

``Retriever`` loads CURRENT (model, index, id map, titles), embeds the users, searches the
index at the release's tuned ``nprobe`` for ``k`` plus the largest seen-set in the batch
(capped at ``MAX_EXTRA_CANDIDATES``; rows still short of ``k`` after dropping seen items are
searched again with twice as many, up to the whole catalog), drops seen items and keeps the
top ``k``. Scores are the inner product of the L2-normalised user and item vectors (cosine,
in [-1, 1]); the model's temperature is not applied.

Unknown user (not in ``vocab/user_id``, e.g. new since the last feature build): the ``k``
most popular items (``features/items.n_positives``, ties by the smaller ``item_idx``) the user
has not interacted with in ``bronze/interactions``, with score NaN and a message naming the
user. Fewer than ``k`` rows come back only when fewer unseen items exist (or the probed IVF
lists hold fewer).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from spark_features.delta_snapshot import DeltaSnapshot, read_snapshot_arrow, resolve_snapshot, table_exists
from spark_features.errors import BadInputError, TowerlakeError
from spark_features.feature_config import ACTIVITY_BOUNDARIES
from spark_features.lake import BRONZE_INTERACTIONS, BRONZE_ITEMS, Lake, to_local_path
from spark_features.vocab_registry import vocab_table
from trainer.feature_schema import MULTI_VALUED_WIDTH, FeatureSchema
from trainer.item_store import pad_list_array

log = logging.getLogger(__name__)

PRIOR_EVENTS_FIELD = "prior_events_bucket"
MAX_EXTRA_CANDIDATES = 2048
"""First-pass cap on candidates fetched beyond ``k`` to make room for dropping seen items."""
DEFAULT_BATCH_USERS = 4096
NO_RELEASE_MESSAGE = "no published release: run jobs.train, jobs.build_index, jobs.publish first"

RECOMMENDATION_SCHEMA = pa.schema([
    pa.field("user_id", pa.string(), nullable=False),
    pa.field("rank", pa.int32(), nullable=False),
    pa.field("item_id", pa.string(), nullable=False),
    pa.field("title", pa.string()),
    pa.field("score", pa.float32()),
])
"""``Retriever.recommend``: one row per (user, rank), rank 1-based, users in the asked order."""

DELTA_SCHEMA = pa.schema([
    pa.field("user_id", pa.string(), nullable=False),
    pa.field("item_id", pa.string(), nullable=False),
    pa.field("rank", pa.int32(), nullable=False),
    pa.field("score", pa.float32()),
    pa.field("release_version", pa.string(), nullable=False),
])
"""The ``recommendations`` Delta table (DESIGN.md: user_id, item_id, rank, score + release)."""


class NoReleaseError(TowerlakeError):
    """Nothing was ever published under ``releases/``."""


# ---------------------------------------------------------------------------------------------
# user queries


def bucketize_counts(counts: np.ndarray, boundaries: Sequence[float]) -> np.ndarray:
    """``spark_features.features.bucketize`` for non-null counts: 1 + number of boundaries <= x.

    counts: (B,) int64 -> (B,) int64."""
    return np.searchsorted(np.asarray(sorted(boundaries), dtype=np.float64), counts.astype(np.float64),
                           side="right").astype(np.int64) + 1


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


def _column_names(snapshot: DeltaSnapshot) -> list[str]:
    return [f["name"] for f in json.loads(snapshot.schema_json)["fields"]]


def _arrow(result: Any) -> pa.Table:
    """DuckDB's ``.arrow()`` answers a RecordBatchReader in 1.4 (a Table before)."""
    return result.read_all() if isinstance(result, pa.RecordBatchReader) else result


class UserQueryBuilder:
    """Builds ``UserQueries`` for batches of user ids from one pinned set of table versions.

    lake_root: the lake; schema: the served model's ``FeatureSchema`` (which user fields, N,
    embedding table sizes). The latest versions of vocab/user_id, vocab/item_id,
    features/users, features/spec and bronze/interactions are pinned at construction
    (``table_versions``); make a new builder to see newer data."""

    def __init__(self, lake_root: str, schema: FeatureSchema, threads: int = 2) -> None:
        import duckdb

        self.lake = Lake(str(lake_root))
        self.schema = schema
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

    def _columns(self, relative: str) -> set[str]:
        uri = self.lake.table(relative)
        return set(_column_names(resolve_snapshot(uri))) if table_exists(uri) else set()

    def _create_view(self, view: str, relative: str, columns: dict[str, str], optional: bool = False) -> None:
        """``view`` over the latest snapshot of ``relative``: ``{alias: source column}``."""
        uri = self.lake.table(relative)
        if not table_exists(uri):
            if not optional:
                raise BadInputError(f"no Delta table at {uri}: serving reads it; run jobs.ingest and "
                                    "jobs.build_features on this lake first")
            select = ", ".join(f"CAST(NULL AS BIGINT) AS {_ident(a)}" for a in columns)
            self._con.execute(f"CREATE VIEW {view} AS SELECT {select} WHERE false")
            return
        snapshot = resolve_snapshot(uri)
        self.table_versions[relative] = snapshot.version
        absent = [c for c in columns.values() if c not in _column_names(snapshot)]
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
        uri = self.lake.table("features/spec")
        if table_exists(uri):
            snapshot = resolve_snapshot(uri)
            self.table_versions["features/spec"] = snapshot.version
            rows = read_snapshot_arrow(snapshot, ["table", "feature", "boundaries"]).to_pylist()
            for row in rows:
                if row["table"] == "pairs" and row["feature"] == PRIOR_EVENTS_FIELD and row["boundaries"]:
                    return tuple(float(b) for b in row["boundaries"])
        return ACTIVITY_BOUNDARIES

    # -- queries

    def build(self, user_ids: Sequence[str]) -> UserQueries:
        """Inputs for ``user_ids`` (any number; one query). Duplicates are answered twice."""
        import torch

        ids = [str(u) for u in user_ids]
        n_hist = int(self.schema.history_length)
        asked = pa.table({"pos": pa.array(np.arange(len(ids)), pa.int64()), "user_id": pa.array(ids, pa.string())})
        feature_cols = "".join(f", uf.{_ident(f.name)}" for f in self.static_fields)
        self._con.register("asked", asked)
        try:
            table = _arrow(self._con.execute(f"""
                WITH ev AS (
                    SELECT e.user_id, iv.idx AS item_idx, e.event_ts
                    FROM events e JOIN item_vocab iv ON e.item_id = iv.value
                    WHERE e.user_id IN (SELECT user_id FROM asked)
                ),
                per_user AS (
                    SELECT user_id, count(*) AS n_events,
                           list(item_idx ORDER BY event_ts DESC, item_idx DESC)[1:{n_hist}] AS hist,
                           list_sort(list_distinct(list(item_idx))) AS seen
                    FROM ev GROUP BY user_id
                )
                SELECT a.pos, coalesce(uv.idx, 0)::BIGINT AS user_idx,
                       coalesce(p.n_events, 0)::BIGINT AS n_events, p.hist, p.seen{feature_cols}
                FROM asked a
                LEFT JOIN user_vocab uv ON a.user_id = uv.value
                LEFT JOIN per_user p ON a.user_id = p.user_id
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
        hist[hist >= self.schema.num_items] = 0  # items newer than the model: unknown
        tower_idx = np.where(user_idx < self.schema.num_users, user_idx, 0)
        inputs = {"user_idx": tower_idx, "hist": hist}
        for spec in self.schema.user_fields:
            if spec.name == PRIOR_EVENTS_FIELD:
                values = bucketize_counts(n_events, self.activity_boundaries)
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


# ---------------------------------------------------------------------------------------------
# candidate filtering (vectorised over a batch)


def csr_rows(offsets: np.ndarray, values: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The CSR ``(offsets, values)`` restricted to ``rows`` (int array, in that order)."""
    lengths = np.diff(offsets)[rows]
    sub_offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    gather = np.repeat(offsets[rows] - sub_offsets[:-1], lengths) + np.arange(sub_offsets[-1])
    return sub_offsets, values[gather]


def drop_seen_top_k(ids: np.ndarray, seen_offsets: np.ndarray, seen_values: np.ndarray, k: int
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Which candidates to keep: the first ``k`` per row that are found (id >= 0) and not seen.

    ids: (B, F) int64 candidates, best first; seen CSR as in ``UserQueries``.
    Returns ``(keep (B, F) bool, kept_per_row (B,) int64)``. One ``np.isin`` over
    row-tagged keys (row * base + id), no per-row Python."""
    rows = ids.shape[0]
    base = int(max(ids.max(initial=0), seen_values.max(initial=0))) + 1
    seen_rows = np.repeat(np.arange(rows, dtype=np.int64), np.diff(seen_offsets))
    seen_keys = seen_rows * base + seen_values
    found_keys = np.arange(rows, dtype=np.int64)[:, None] * base + ids
    keep = (ids >= 0) & ~np.isin(found_keys, seen_keys)
    keep &= np.cumsum(keep, axis=1) <= k
    return keep, keep.sum(axis=1)


# ---------------------------------------------------------------------------------------------
# the retriever


@dataclass
class Recommendations:
    """``table``: RECOMMENDATION_SCHEMA rows; ``unknown_users``: asked ids not in
    vocab/user_id (served the popular fallback); ``messages``: one line each for a person."""

    table: pa.Table
    unknown_users: list[str] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)


class Retriever:
    """The CURRENT release, loaded once, answering ``recommend(user_ids, k)``.

    lake_root: the lake (local or mounted: releases need a filesystem); device: where the
    user tower runs ("cpu", "cuda"); verify: check every release file against its manifest's
    sha256 first (``load_release``)."""

    def __init__(self, lake_root: str, device: str = "cpu", verify: bool = True,
                 max_extra: int = MAX_EXTRA_CANDIDATES) -> None:
        from index_builder.faiss_index import load_index
        from index_builder.release import current_release, load_release
        from trainer.artifacts import load_model_dir

        self.lake = Lake(str(lake_root))
        info = current_release(self.lake.root)
        if info is None:
            raise NoReleaseError(NO_RELEASE_MESSAGE)
        self.release = load_release(self.lake.root, info.version) if verify else info
        self.device = device
        self.max_extra = max_extra
        self.loaded = load_model_dir(self.release.artifact("model"), device=device)
        index_dir = Path(self.release.artifact("index"))
        self.index = load_index(index_dir)
        index_manifest_path = index_dir / "manifest.json"
        self.index_manifest = json.loads(index_manifest_path.read_text()) if index_manifest_path.is_file() else {}
        nprobe = self.index_manifest.get("nprobe") or self.index.nprobe
        self.nprobe = int(min(max(int(nprobe), 1), self.index.nlist))
        self._load_catalog(index_dir / "id_map.parquet")
        self.queries = UserQueryBuilder(self.lake.root, self.loaded.schema)

    def _load_catalog(self, id_map_path: Path) -> None:
        """Id map (item_idx -> row), titles, and the popularity order for the fallback."""
        if not id_map_path.is_file():
            raise BadInputError(f"release {self.release.version} has no {id_map_path.name} in its index folder")
        id_map = pq.read_table(id_map_path, columns=["item_idx", "item_id"])
        item_idx = np.asarray(id_map.column("item_idx").to_numpy(), dtype=np.int64)
        self.item_ids = id_map.column("item_id").combine_chunks()
        self._row_of = np.full(int(item_idx.max(initial=0)) + 1, -1, dtype=np.int64)
        self._row_of[item_idx] = np.arange(len(item_idx))
        self.titles = pa.nulls(len(item_idx), pa.string())
        self.title_source = None
        items_uri = self.lake.table(BRONZE_ITEMS)
        if table_exists(items_uri):
            snapshot = resolve_snapshot(items_uri)
            if "title" in _column_names(snapshot):
                bronze = read_snapshot_arrow(snapshot, ["item_id", "title"])
                where = pc.index_in(self.item_ids, value_set=bronze.column("item_id").combine_chunks())
                self.titles = pc.take(bronze.column("title").combine_chunks(), where)
                self.title_source = f"{BRONZE_ITEMS}@v{snapshot.version}"
        # Popularity: features/items.n_positives over the served catalog, most popular first.
        items = resolve_snapshot(self.lake.table("features/items"))
        pop = read_snapshot_arrow(items, ["item_idx", "n_positives"])
        pop_idx = np.asarray(pop.column("item_idx").to_numpy(), dtype=np.int64)
        pop_n = np.asarray(pop.column("n_positives").fill_null(0).to_numpy(zero_copy_only=False), dtype=np.int64)
        served = (pop_idx < len(self._row_of)) & (self._row_of[np.minimum(pop_idx, len(self._row_of) - 1)] >= 0)
        pop_idx, pop_n = pop_idx[served], pop_n[served]
        order = np.lexsort((pop_idx, -pop_n))
        self.popular = pop_idx[order]
        self.popular_counts = pop_n[order]

    # -- facts for people

    def describe(self) -> dict[str, Any]:
        manifest = self.release.manifest
        return {
            "release": self.release.version,
            "model_version": manifest.get("model_version", self.loaded.version),
            "index_version": manifest.get("index_version"),
            "nprobe": self.nprobe,
            "nlist": self.index.nlist,
            "recall": self.index_manifest.get("recall"),
            "recall_k": self.index_manifest.get("recall_k") or self.index_manifest.get("k"),
            "items": self.index.ntotal,
            "tables": dict(self.queries.table_versions),
        }

    def summary_line(self) -> str:
        d = self.describe()
        recall = f", recall@{d['recall_k'] or '?'}={d['recall']:.3f}" if isinstance(d["recall"], int | float) else ""
        return (f"release {d['release']} (model {d['model_version']}, index {d['index_version'] or '-'}, "
                f"{d['items']:,} items, nprobe {d['nprobe']}/{d['nlist']}{recall})")

    # -- recommend

    def user_vectors(self, queries: UserQueries) -> np.ndarray:
        """(B, d) float32 L2-normalised user-tower outputs for every row of ``queries``."""
        import torch

        with torch.no_grad():
            inputs = {k: v.to(self.device) for k, v in queries.inputs.items()}
            return self.loaded.model.embed_users(inputs).float().cpu().numpy()

    def search(self, vectors: np.ndarray, seen_offsets: np.ndarray, seen_values: np.ndarray, k: int
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Top-``k`` unseen item indices per row: ``(ids (B, k) int64, scores (B, k) float32,
        kept (B,))``; slots past ``kept[row]`` are -1 / NaN."""
        from index_builder.faiss_index import search_index

        rows = vectors.shape[0]
        out_ids = np.full((rows, k), -1, dtype=np.int64)
        out_scores = np.full((rows, k), np.nan, dtype=np.float32)
        kept = np.zeros(rows, dtype=np.int64)
        ntotal = self.index.ntotal
        todo = np.arange(rows)
        fetch = min(ntotal, k + min(int(np.diff(seen_offsets).max(initial=0)), self.max_extra))
        while todo.size:
            sub_offsets, sub_values = csr_rows(seen_offsets, seen_values, todo)
            scores, ids = search_index(self.index, np.ascontiguousarray(vectors[todo]), fetch, nprobe=self.nprobe)
            keep, count = drop_seen_top_k(ids, sub_offsets, sub_values, k)
            # Write each row's kept candidates, in order, into its first ``count`` slots.
            r_sub, c_sub = np.nonzero(keep)
            slot = np.cumsum(keep, axis=1)[r_sub, c_sub] - 1
            out_ids[todo[r_sub], slot] = ids[r_sub, c_sub]
            out_scores[todo[r_sub], slot] = scores[r_sub, c_sub]
            kept[todo] = count
            # Short rows whose probed lists were not exhausted (no -1) may find more further down.
            more = (count < k) & (ids[:, -1] >= 0)
            if fetch >= ntotal or not more.any():
                break
            todo, fetch = todo[more], min(ntotal, fetch * 2)
        return out_ids, out_scores, kept

    def search_known(self, queries: UserQueries, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``search`` for the known users of ``queries`` (rows where ``queries.known``), in order."""
        known = np.flatnonzero(queries.known)
        offsets, values = csr_rows(queries.seen_offsets, queries.seen_values, known)
        return self.search(self.user_vectors(queries)[known], offsets, values, k)

    def popular_for(self, seen_offsets: np.ndarray, seen_values: np.ndarray, k: int
                    ) -> tuple[np.ndarray, np.ndarray]:
        """The fallback: top-``k`` popular unseen items per row ``(ids (B, k), kept (B,))``."""
        rows = len(seen_offsets) - 1
        width = min(len(self.popular), k + int(np.diff(seen_offsets).max(initial=0)))
        candidates = np.broadcast_to(self.popular[:width], (rows, width))
        keep, count = drop_seen_top_k(candidates, seen_offsets, seen_values, k)
        out = np.full((rows, k), -1, dtype=np.int64)
        r, c = np.nonzero(keep)
        out[r, np.cumsum(keep, axis=1)[r, c] - 1] = candidates[r, c]
        return out, count

    def recommend(self, user_ids: Sequence[str], k: int) -> Recommendations:
        """Top-``k`` unseen items for each of ``user_ids`` (one batch: the caller batches)."""
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or not 1 <= k <= self.index.ntotal:
            raise ValueError(f"k must be an int in [1, {self.index.ntotal}] (items in the release), got {k!r}")
        k = int(k)
        queries = self.queries.build(user_ids)
        rows = len(queries.user_ids)
        ids = np.full((rows, k), -1, dtype=np.int64)
        scores = np.full((rows, k), np.nan, dtype=np.float32)
        kept = np.zeros(rows, dtype=np.int64)
        known = np.flatnonzero(queries.known)
        unknown = np.flatnonzero(~queries.known)
        if known.size:
            ids[known], scores[known], kept[known] = self.search_known(queries, k)
        if unknown.size:
            offsets, values = csr_rows(queries.seen_offsets, queries.seen_values, unknown)
            ids[unknown], kept[unknown] = self.popular_for(offsets, values, k)
        unknown_ids = [queries.user_ids[r] for r in unknown]
        messages = [
            f"user {u!r} is not in vocab/user_id (new since the last feature build?): serving the {k} most "
            "popular items they have not interacted with (score NaN)"
            for u in unknown_ids
        ]
        return Recommendations(self._table(queries.user_ids, ids, scores, kept), unknown_ids, messages)

    def _table(self, user_ids: list[str], ids: np.ndarray, scores: np.ndarray, kept: np.ndarray) -> pa.Table:
        k = ids.shape[1]
        mask = np.arange(k)[None, :] < kept[:, None]
        r, c = np.nonzero(mask)
        catalog_rows = pa.array(self._row_of[ids[r, c]], pa.int64())
        return pa.table({
            "user_id": pc.take(pa.array(user_ids, pa.string()), pa.array(r, pa.int64())),
            "rank": pa.array((c + 1).astype(np.int32), pa.int32()),
            "item_id": pc.take(self.item_ids, catalog_rows),
            "title": pc.take(self.titles, catalog_rows),
            "score": pa.array(scores[r, c], pa.float32()),
        }, schema=RECOMMENDATION_SCHEMA)

    def close(self) -> None:
        self.queries.close()


# ---------------------------------------------------------------------------------------------
# batch mode


@dataclass(frozen=True)
class BatchWriteResult:
    table_uri: str
    version: int
    users: int
    rows: int
    unknown_users: int


def overwrite_delta(table_uri: str, schema: pa.Schema, batches: Iterable[pa.RecordBatch]) -> int:
    """Overwrite the Delta table at ``table_uri`` with the streamed ``batches`` in ONE commit
    (readers see the old rows until it lands); returns the new version."""
    from deltalake import write_deltalake

    from spark_features.delta_snapshot import deltars_location, open_table

    local = to_local_path(table_uri)
    if local is not None:
        Path(local).parent.mkdir(parents=True, exist_ok=True)
    reader = pa.RecordBatchReader.from_batches(schema, batches)
    write_deltalake(deltars_location(table_uri), reader, mode="overwrite", schema_mode="overwrite")
    return open_table(table_uri).version()


def write_recommendations(retriever: Retriever, user_batches: Iterable[list[str]], k: int, table_uri: str,
                          on_batch: Callable[[int], None] | None = None) -> BatchWriteResult:
    """Recommend for every batch of ``user_batches`` and overwrite the Delta table at
    ``table_uri`` with all of them in ONE commit (DELTA_SCHEMA rows; readers see the previous
    recommendations until the commit). Batches are streamed into the writer, so memory holds
    one batch of results, not the whole table. ``on_batch(users_in_batch)`` reports progress."""
    counts = {"users": 0, "rows": 0, "unknown": 0}
    release = retriever.release.version

    def batches() -> Iterator[pa.RecordBatch]:
        for user_ids in user_batches:
            if not user_ids:
                continue
            result = retriever.recommend(user_ids, k)
            table = result.table
            counts["users"] += len(user_ids)
            counts["rows"] += table.num_rows
            counts["unknown"] += len(result.unknown_users)
            out = pa.table({
                "user_id": table.column("user_id"), "item_id": table.column("item_id"),
                "rank": table.column("rank"), "score": table.column("score"),
                "release_version": pa.array([release] * table.num_rows, pa.string()),
            }, schema=DELTA_SCHEMA)
            if on_batch is not None:
                on_batch(len(user_ids))
            yield from out.to_batches()

    version = overwrite_delta(table_uri, DELTA_SCHEMA, batches())
    return BatchWriteResult(table_uri=table_uri, version=version, users=counts["users"], rows=counts["rows"],
                            unknown_users=counts["unknown"])
