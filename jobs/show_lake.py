"""Show what the lake holds: every Delta table's version, row count, files and a few rows.

Reads the Delta logs with delta-rs (no Spark), so it answers in about a second.

Examples:
  python -m jobs.show_lake
  python -m jobs.show_lake --lake s3://bucket/lake --rows 5
"""

from __future__ import annotations

import argparse
import sys

from jobs.cli import default_lake, run_job


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m jobs.show_lake", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 2)[2])
    parser.add_argument("--lake", default=default_lake(), help="lake root (default: $TOWERLAKE_LAKE or ./lake)")
    parser.add_argument("--rows", type=int, default=3, help="sample rows per bronze table (default: %(default)s)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from pathlib import Path

    from lake_contract.delta_snapshot import read_snapshot_arrow, resolve_snapshot, table_exists
    from lake_contract.errors import TableNotFoundError
    from lake_contract.lake import Lake, to_local_path

    lake = Lake(args.lake)
    local = to_local_path(lake.root)
    if local is None:
        raise ValueError("show_lake lists local lakes only; pass a folder")
    tables = sorted(str(p.parent.relative_to(local)) for p in Path(local).rglob("_delta_log"))
    if not tables:
        raise TableNotFoundError(f"no Delta tables under {lake.root}: run `python -m jobs.ingest` first")
    print(f"lake {lake.root}")
    for name in tables:
        uri = lake.table(name)
        if not table_exists(uri):
            continue
        snap = resolve_snapshot(uri)
        parts = f", partitioned by {list(snap.partition_columns)}" if snap.partition_columns else ""
        print(f"  {name:28s} version {snap.version:3d}  {snap.num_rows or 0:>10,} rows  {len(snap.files):5d} files{parts}")
        if name.startswith("quarantine/") and snap.files:
            table = read_snapshot_arrow(snap, ["reason"])
            counts = table.group_by("reason").aggregate([("reason", "count")]).to_pylist()
            print("      " + ", ".join(f"{c['reason']}={c['reason_count']:,}" for c in counts))
        elif name.startswith("bronze/") and args.rows and snap.files:
            import pyarrow.parquet as pq

            from lake_contract.delta_snapshot import snapshot_file_path

            first = pq.read_table(snapshot_file_path(snap.files[0])).slice(0, args.rows).to_pylist()
            for row in first:
                for col, value in snap.partition_values[0].items():
                    row[col] = value
                print("      " + ", ".join(f"{k}={v!r}" for k, v in row.items()))
    return 0


if __name__ == "__main__":
    run_job("show_lake", lambda: main(sys.argv[1:]))
