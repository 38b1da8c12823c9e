"""A small Delta table of completed runs, ``runs/<job>``: what backfills resume from.

One row per completed window (``window`` key, e.g. '2026-01-05' or '2026-01-05T13'), written
with delta-rs directly (no Spark) as the LAST step of a run, so a window is marked complete
only after everything it writes has committed. pyspark-free.
"""

from __future__ import annotations

from datetime import UTC, datetime

import pyarrow as pa

from lake_contract.delta_snapshot import (
    deltars_location,
    read_snapshot_arrow,
    resolve_snapshot,
    table_exists,
)
from lake_contract.lake import Lake

LEDGER_SCHEMA = pa.schema([
    pa.field("window", pa.string(), nullable=False),
    pa.field("completed_at", pa.timestamp("us", tz="UTC"), nullable=False),
    pa.field("events", pa.int64(), nullable=False),
    pa.field("pairs", pa.int64(), nullable=False),
])


def ledger_table(job: str) -> str:
    return f"runs/{job}"


def mark_complete(lake: Lake, job: str, window: str, events: int, pairs: int) -> None:
    from deltalake import write_deltalake

    row = pa.table({"window": [window], "completed_at": [datetime.now(UTC)],
                    "events": [events], "pairs": [pairs]}, schema=LEDGER_SCHEMA)
    write_deltalake(deltars_location(lake.table(ledger_table(job))), row, mode="append")


def completed_windows(lake: Lake, job: str) -> set[str]:
    uri = lake.table(ledger_table(job))
    if not table_exists(uri):
        return set()
    return set(read_snapshot_arrow(resolve_snapshot(uri), ["window"]).column("window").to_pylist())
