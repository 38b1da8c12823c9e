"""Retrieval over the CURRENT release: user queries from the lake as of now, FAISS top-K.

Feature tables (features/users, features/items, features/spec) are read at the versions
the release's model recorded in its manifest (``trainer.artifacts.model_snapshot``), so a
newer feature build (moved bucket boundaries, a gate-blocked nightly) never changes what
the served towers see; events and vocabularies are the newest (histories as of now).

The serving wrapper imports the towers and a checkpoint loader, never the optimiser or the
loss; user queries come from ``index_builder.queries``.

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
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from index_builder.queries import PRIOR_EVENTS_FIELD, UserQueries, UserQueryBuilder, snapshot_column_names
from lake_contract.delta_snapshot import read_snapshot_arrow, resolve_snapshot, table_exists
from lake_contract.errors import BadInputError, TowerlakeError
from lake_contract.lake import BRONZE_ITEMS, Lake

log = logging.getLogger(__name__)

MAX_EXTRA_CANDIDATES = 2048
"""First-pass cap on candidates fetched beyond ``k`` to make room for dropping seen items."""
NO_RELEASE_MESSAGE = "no published release: run jobs.train, jobs.build_index, jobs.publish first"

RECOMMENDATION_SCHEMA = pa.schema([
    pa.field("user_id", pa.string(), nullable=False),
    pa.field("rank", pa.int32(), nullable=False),
    pa.field("item_id", pa.string(), nullable=False),
    pa.field("title", pa.string()),
    pa.field("score", pa.float32()),
])
"""``Retriever.recommend``: one row per (user, rank), rank 1-based, users in the asked order."""


class NoReleaseError(TowerlakeError):
    """Nothing was ever published under ``releases/``."""


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


def held_out_hit_ranks(recs, user_ids: list[str], targets: np.ndarray, item_index: dict[str, int]) -> np.ndarray:
    """Per row of ``user_ids``: the rank (1-based) of ``targets[row]`` in ``recs`` (the
    recommendations table: user_id, item_id, rank), or a huge number when absent. One row per
    user (leave-last-out)."""
    position = {u: n for n, u in enumerate(user_ids)}
    if len(position) != len(user_ids):
        raise ValueError("held_out_hit_ranks needs one held-out row per user")
    rows = np.asarray([position[u] for u in recs.column("user_id").to_pylist()], dtype=np.int64)
    items = np.asarray([item_index[i] for i in recs.column("item_id").to_pylist()], dtype=np.int64)
    ranks = np.asarray(recs.column("rank").to_numpy(), dtype=np.int64)
    best = np.full(len(user_ids), np.iinfo(np.int64).max, dtype=np.int64)
    hit = items == targets[rows]
    np.minimum.at(best, rows[hit], ranks[hit])
    return best


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
        from trainer.artifacts import load_model_dir, model_snapshot

        self.lake = Lake(str(lake_root))
        info = current_release(self.lake.root)
        if info is None:
            raise NoReleaseError(NO_RELEASE_MESSAGE)
        self.release = load_release(self.lake.root, info.version) if verify else info
        self.device = device
        self.max_extra = max_extra
        self.loaded = load_model_dir(self.release.artifact("model"), device=device)
        # The feature tables at the versions the model was trained on (bucket boundaries and
        # indices as its towers saw them), not the newest build's: refused when unavailable.
        pinned = ["features/users", "features/items"]
        if any(f.name == PRIOR_EVENTS_FIELD for f in self.loaded.schema.user_fields):
            pinned.append("features/spec")
        self.model_tables = {t: model_snapshot(self.lake.root, self.loaded, t) for t in pinned}
        index_dir = Path(self.release.artifact("index"))
        self.index = load_index(index_dir)
        index_manifest_path = index_dir / "manifest.json"
        self.index_manifest = json.loads(index_manifest_path.read_text()) if index_manifest_path.is_file() else {}
        nprobe = self.index_manifest.get("nprobe") or self.index.nprobe
        self.nprobe = int(min(max(int(nprobe), 1), self.index.nlist))
        self._load_catalog(index_dir / "id_map.parquet")
        self.queries = UserQueryBuilder(self.lake.root, self.loaded.schema, pinned=self.model_tables)

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
            if "title" in snapshot_column_names(snapshot):
                bronze = read_snapshot_arrow(snapshot, ["item_id", "title"])
                where = pc.index_in(self.item_ids, value_set=bronze.column("item_id").combine_chunks())
                self.titles = pc.take(bronze.column("title").combine_chunks(), where)
                self.title_source = f"{BRONZE_ITEMS}@v{snapshot.version}"
        # Popularity: features/items.n_positives over the served catalog, most popular first.
        items = self.model_tables["features/items"]
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
            "tables": {**self.queries.table_versions, **{t: s.version for t, s in self.model_tables.items()}},
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

    def recommend(self, user_ids: Sequence[str], k: int, as_of=None) -> Recommendations:
        """Top-``k`` unseen items for each of ``user_ids`` (one batch: the caller batches).
        ``as_of``: see ``UserQueryBuilder.build`` (None: every event, i.e. now)."""
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or not 1 <= k <= self.index.ntotal:
            raise ValueError(f"k must be an int in [1, {self.index.ntotal}] (items in the release), got {k!r}")
        k = int(k)
        queries = self.queries.build(user_ids, as_of=as_of)
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
