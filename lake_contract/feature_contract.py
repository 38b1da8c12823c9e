"""The feature contract: how every model input is computed, for training AND serving.

Spark (``spark_features/``) applies these definitions to build ``features/*`` and the pairs;
serving (``index_builder/queries.py``) applies the same definitions to build a user's query.
Where a rule is arithmetic it is written ONCE, as SQL text that both engines run (Spark SQL
through ``F.expr``, DuckDB in the serving query), so the two sides cannot drift apart.

Inputs and their rules:

* **Bucketised numerics** (``<col>_bucket``, ``n_events_bucket``, ``recency_bucket``,
  ``popularity_bucket``, ``prior_events_bucket``): ``bucket_sql``: NULL -> 0 (unknown),
  otherwise 1 + the number of boundaries <= x (NaN sorts above every number in both
  engines, so it lands in the last bucket). Quantile boundaries are computed per full build
  and stored in ``features/spec``; activity, recency and popularity use the fixed
  ``ACTIVITY_BOUNDARIES`` / ``RECENCY_DAY_BOUNDARIES``.
* **Prefixes** (``<col>_prefix_idx``): ``prefix_sql``: the first ``length`` characters of the
  value as a string; ``prefix_column`` names the derived column.
* **History** (``hist``, N = ``history_length``): the user's events STRICTLY before the event
  (or the query's ``as_of``), ordered by ``HISTORY_ORDER`` ascending, the last N of them,
  most recent first; same-time events are ordered by ``item_idx`` (the larger index first
  in the history). Right-padded with ``UNKNOWN_INDEX``.
* **Unknown items**: an event whose item is unknown (not in ``vocab/item_id``, or an index
  beyond the model's item table) is DROPPED and the history re-packed (``known_history``):
  a history never has a 0 between two items, on either side.
* **prior_events_bucket**: the bucket of the number of the user's events (with a known
  item) strictly before the event / ``as_of``, boundaries ``ACTIVITY_BOUNDARIES`` (recorded
  in ``features/spec`` as table ``pairs``).
* **Multi-valued fields** (``<col>_idx`` lists): ``MULTI_VALUED_WIDTH`` indices, truncated
  and right-padded with ``UNKNOWN_INDEX``, wherever a tower reads them.
* **User state** (``USER_STATE_TABLE``, one row per user of ``vocab/user_id``): what a "now"
  query needs, as of the row's ``as_of``: ``n_events`` (events with a known item strictly
  before it), ``last_event_ts``, ``recent`` (the last ``state_recent_length(N)`` known items,
  most recent first, by ``HISTORY_ORDER``) and ``seen`` (distinct item indices, ascending).
  Serving adds the user's events at or after ``as_of`` (read from the date partitions from
  the oldest ``as_of`` on), so a served user costs their own state plus the recent events,
  not their whole history in the lake. The incremental build reads it the same way: a
  window's users cost their state plus their events since its ``as_of``.
* **Item state** (``ITEM_STATE_TABLE``, one row per item of ``vocab/item_id``): ``n_events``
  and ``n_positives`` (every positive, all splits) strictly before ``as_of``; the running
  counts the incremental build adds a window's events to instead of recounting the lake.

Kept free of pyspark and torch: every package imports it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from lake_contract.feature_config import ACTIVITY_BOUNDARIES, RECENCY_DAY_BOUNDARIES

__all__ = [
    "ACTIVITY_BOUNDARIES",
    "HISTORY_ORDER",
    "ITEM_STATE_TABLE",
    "MULTI_VALUED_WIDTH",
    "NULL_BUCKET",
    "PRIOR_EVENTS_FIELD",
    "RECENCY_DAY_BOUNDARIES",
    "UNKNOWN_INDEX",
    "USER_STATE_TABLE",
    "bucket_sql",
    "history_order_sql",
    "known_history",
    "prefix_column",
    "prefix_sql",
    "state_recent_length",
]

UNKNOWN_INDEX = 0
"""Index 0 of every vocabulary and bucket space: unknown / null / padding."""
NULL_BUCKET = UNKNOWN_INDEX
MULTI_VALUED_WIDTH = 16
"""Fixed width of a padded multi-valued field (longer index lists are truncated)."""
PRIOR_EVENTS_FIELD = "prior_events_bucket"
HISTORY_ORDER = ("event_ts", "item_idx")
"""Ascending order of a user's events; a history is the last N strictly-earlier ones, reversed."""


USER_STATE_TABLE = "features/user_state"
"""Per-user serving state, written by the full build and MERGEd for touched users by the
incremental build (columns: ``user_idx``, ``user_id``, ``n_events``, ``last_event_ts``,
``recent``, ``seen``, ``as_of``)."""

ITEM_STATE_TABLE = "features/item_state"
"""Per-item running counts, written by the full build and MERGEd for touched items by the
incremental build (columns: ``item_idx``, ``n_events``, ``n_positives``, ``as_of``)."""


def state_recent_length(history_length: int) -> int:
    """How many recent items the user state keeps for a history of ``history_length``: twice
    as many, so a model whose item table is older than the newest items still finds N known
    ones (serving falls back to the user's events when it does not)."""
    return 2 * int(history_length)


def _boundary_literal(value: float) -> str:
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"bucket boundaries must be finite numbers, got {value!r}")
    return repr(value)


def bucket_sql(expr: str, boundaries: Sequence[float]) -> str:
    """SQL (Spark SQL and DuckDB alike) for the bucket of ``expr``: 0 when NULL, else
    1 + the number of ``boundaries`` <= x, as INT. ``expr`` is an already quoted column or
    expression of the engine that runs it."""
    if not boundaries:
        return f"CAST(CASE WHEN {expr} IS NULL THEN {NULL_BUCKET} ELSE 1 END AS INT)"
    x = f"CAST({expr} AS DOUBLE)"
    at_or_above = " + ".join(f"CASE WHEN {x} >= {_boundary_literal(b)} THEN 1 ELSE 0 END" for b in boundaries)
    return f"CAST(CASE WHEN {expr} IS NULL THEN {NULL_BUCKET} ELSE 1 + {at_or_above} END AS INT)"


def prefix_column(column: str) -> str:
    """Name of the derived prefix column of ``column``."""
    return f"{column}_prefix"


def prefix_sql(expr: str, length: int) -> str:
    """SQL for the first ``length`` characters of ``expr`` as a string (NULL stays NULL)."""
    if not isinstance(length, int) or isinstance(length, bool) or length < 1:
        raise ValueError(f"a prefix length must be an int >= 1, got {length!r}")
    return f"substring(CAST({expr} AS STRING), 1, {length})"


def history_order_sql(quote=lambda name: name) -> str:
    """SQL ``ORDER BY`` terms putting the most recent event first (ties: larger item_idx first)."""
    return ", ".join(f"{quote(c)} DESC" for c in HISTORY_ORDER)


def known_history(hist: np.ndarray, num_items: int) -> np.ndarray:
    """Drop items the model does not know (index <= 0 or >= ``num_items``) from each row of
    ``hist`` (B, W) int64 (most recent first) and re-pack what is left to the left, padding
    with ``UNKNOWN_INDEX``: the relative order of the kept items is unchanged. Vectorised."""
    hist = np.asarray(hist, dtype=np.int64)
    keep = (hist > UNKNOWN_INDEX) & (hist < num_items)
    out = np.full_like(hist, UNKNOWN_INDEX)
    rows, cols = np.nonzero(keep)
    slots = np.cumsum(keep, axis=1)[rows, cols] - 1
    out[rows, slots] = hist[rows, cols]
    return out
