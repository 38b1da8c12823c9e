"""Read-side Delta helpers that need no Spark: exact snapshots, file lists, history.

``trainer/`` uses this module to pin a table version and hand its Parquet files to
Petastorm, so it must never import pyspark (docs/design.md decision 2).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import unquote, urlparse

import pyarrow as pa

from lake_contract.errors import TableNotFoundError, UnsupportedTableError
from lake_contract.lake import to_local_path, to_uri


@dataclass(frozen=True)
class DeltaSnapshot:
    """One exact version of a Delta table.

    ``files`` are absolute locations (``file://`` + plain path for local tables, as Spark and
    Petastorm take them) of the Parquet data files of that version; partition column values are NOT inside those files (Delta keeps them in the
    log), ``partition_values`` holds them per file, in the same order.
    """

    table_uri: str
    version: int
    files: tuple[str, ...]
    partition_columns: tuple[str, ...]
    partition_values: tuple[dict[str, str | None], ...]
    schema_json: str
    num_rows: int | None

    @property
    def spark_schema_json(self) -> str:
        """The table schema in Spark's StructType JSON form (Delta uses the same format)."""
        return self.schema_json


def deltars_location(table_uri: str) -> str:
    """What delta-rs wants: a plain path for local tables, the URI otherwise."""
    local = to_local_path(table_uri)
    return local if local is not None else table_uri


def table_exists(table_uri: str) -> bool:
    from deltalake import DeltaTable

    return DeltaTable.is_deltatable(deltars_location(to_uri(table_uri)))


def open_table(table_uri: str, version: int | None = None):
    """The delta-rs ``DeltaTable`` at ``version`` (latest when None), with a clear error if absent."""
    from deltalake import DeltaTable
    from deltalake.exceptions import TableNotFoundError as DeltaRsNotFound

    uri = to_uri(table_uri)
    location = deltars_location(uri)
    if not DeltaTable.is_deltatable(location):
        raise TableNotFoundError(
            f"no Delta table at {uri}: run the job that writes it first (see README, data flow)"
        )
    try:
        return DeltaTable(location, version=version)
    except (DeltaRsNotFound, OSError, Exception) as err:  # delta-rs raises several types for a bad version
        if version is None:
            raise
        latest = DeltaTable(location).version()
        raise TableNotFoundError(
            f"table {uri} has no version {version} (latest is {latest}; versions may also have been "
            f"vacuumed): pick a version from its history"
        ) from err


def table_version(table_uri: str) -> int | None:
    """Latest version of the table, or None when there is no table."""
    if not table_exists(table_uri):
        return None
    return open_table(table_uri).version()


def resolve_snapshot(table_uri: str, version: int | None = None) -> DeltaSnapshot:
    """Pin ``version`` (latest when None) and list its data files with their partition values."""
    uri = to_uri(table_uri)
    table = open_table(uri, version)
    refuse_deletion_vectors(table, uri)
    metadata = table.metadata()
    partition_columns = tuple(metadata.partition_columns)
    actions = _add_actions(table)
    files: list[str] = []
    values: list[dict[str, str | None]] = []
    total_rows: int | None = 0
    for row in actions:
        files.append(_absolute_file_uri(uri, row["path"]))
        values.append({col: row.get(f"partition.{col}") for col in partition_columns})
        rows = row.get("num_records")
        total_rows = None if rows is None or total_rows is None else total_rows + int(rows)
    values = [{k: (None if v is None else str(v)) for k, v in pv.items()} for pv in values]
    return DeltaSnapshot(
        table_uri=uri,
        version=table.version(),
        files=tuple(files),
        partition_columns=partition_columns,
        partition_values=tuple(values),
        schema_json=table.schema().to_json(),
        num_rows=total_rows,
    )


def file_max_values(snapshot: DeltaSnapshot, column: str) -> list:
    """The ``column`` maximum the Delta log records for each of ``snapshot.files`` (same
    order; None where a file has no statistics for it): lets a reader skip files without
    opening them. Timestamps come back timezone-aware, at the log's millisecond precision
    (Delta may truncate a maximum: compare with a millisecond of slack)."""
    actions = _add_actions(open_table(snapshot.table_uri, snapshot.version))
    by_file = {_absolute_file_uri(snapshot.table_uri, row["path"]): row.get(f"max.{column}") for row in actions}
    return [by_file.get(f) for f in snapshot.files]


def files_newer_than(snapshot: DeltaSnapshot, column: str, since: datetime) -> list[bool]:
    """For each of ``snapshot.files`` (same order): may it hold a row with ``column >= since``?
    False only where the log records a maximum older than ``since`` (by more than the
    millisecond the log may have truncated); naive datetimes are taken as UTC."""
    bound = as_utc(since) - timedelta(milliseconds=1)
    return [top is None or as_utc(top) >= bound for top in file_max_values(snapshot, column)]


def as_utc(value: datetime) -> datetime:
    """``value`` as a timezone-aware UTC datetime (a naive one is taken as UTC)."""
    return value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)


def refuse_deletion_vectors(table, table_uri: str) -> None:
    """A file list is the table only without deletion vectors (rows a MERGE/DELETE marked
    deleted inside files it kept): refuse such a table rather than hand deleted rows on.

    Towerlake's own writers never make them (the native session turns them off); a table
    written elsewhere may have them.
    """
    features = table.protocol().reader_features or []
    if "deletionVectors" in features:
        raise UnsupportedTableError(
            f"table {table_uri} has the Delta 'deletionVectors' reader feature: its Parquet file list "
            "would include deleted rows, so Towerlake refuses to read it that way. Rewrite it without "
            "them (Spark SQL: ALTER TABLE delta.`<path>` SET TBLPROPERTIES "
            "('delta.enableDeletionVectors'=false); REORG TABLE delta.`<path>` APPLY (PURGE); "
            "ALTER TABLE delta.`<path>` DROP FEATURE deletionVectors) or re-run the job that writes it"
        )


def table_history(table_uri: str, limit: int | None = None) -> list[dict]:
    """Commit history, newest first: version, timestamp (ms), operation, parameters, metrics."""
    return list(open_table(table_uri).history(limit))


def read_snapshot_arrow(snapshot: DeltaSnapshot, columns: list[str] | None = None) -> pa.Table:
    """Read a snapshot's files with plain pyarrow, adding the partition columns from the log.

    For checks and small tables; the trainer streams the same file list with Petastorm.
    """
    import pyarrow.parquet as pq

    schema = _arrow_schema(snapshot)
    wanted = columns or schema.names
    pieces = []
    for file_uri, part_values in zip(snapshot.files, snapshot.partition_values, strict=True):
        data_cols = [c for c in wanted if c not in snapshot.partition_columns]
        piece = pq.read_table(snapshot_file_path(file_uri), columns=data_cols)
        for col in snapshot.partition_columns:
            if col in wanted:
                raw = part_values.get(col)
                array = pa.array([raw] * piece.num_rows, pa.string()).cast(schema.field(col).type)
                piece = piece.append_column(col, array)
        pieces.append(piece.select(wanted).cast(pa.schema([schema.field(c) for c in wanted])))
    if not pieces:
        return pa.schema([schema.field(c) for c in wanted]).empty_table()
    return pa.concat_tables(pieces)


def _arrow_schema(snapshot: DeltaSnapshot) -> pa.Schema:
    from deltalake import Schema

    return arrow_schema_to_pyarrow(Schema.from_json(snapshot.schema_json).to_arrow())


def arrow_schema_to_pyarrow(schema) -> pa.Schema:
    """delta-rs returns arro3 objects; pyarrow 14 imports them through the C data interface."""
    if isinstance(schema, pa.Schema):
        return schema
    return pa.Schema._import_from_c_capsule(schema.__arrow_c_schema__())


def arrow_table_to_pyarrow(table) -> pa.Table:
    """An arro3 (or any Arrow C-stream) table as a pyarrow Table."""
    if isinstance(table, pa.Table):
        return table
    return pa.RecordBatchReader._import_from_c_capsule(table.__arrow_c_stream__()).read_all()


def _add_actions(table) -> list[dict]:
    return arrow_table_to_pyarrow(table.get_add_actions(flatten=True)).to_pylist()


def _absolute_file_uri(table_uri: str, log_path: str) -> str:
    """Location of a data file from its path in the log (URI-encoded there, per the protocol).

    Returned in the form Hadoop, Spark and Petastorm take: ``file://`` + the plain local path,
    NOT percent-encoded (Hadoop would decode ``%3D`` into ``=`` differently from the file name).
    """
    raw = unquote(log_path)
    if urlparse(raw).scheme:
        return raw
    local = to_local_path(table_uri)
    if local is not None:
        return "file://" + str(Path(local, raw))
    return f"{table_uri.rstrip('/')}/{raw}"


def snapshot_file_path(file_uri: str) -> str:
    """Path that pyarrow opens for a snapshot file location (plain path for local files)."""
    if file_uri.startswith("file://"):
        return file_uri[len("file://") :]
    parsed = urlparse(file_uri)
    if parsed.scheme:
        return file_uri
    return str(Path(file_uri))


def stats_json(num_records: int, min_values: dict, max_values: dict, null_count: dict) -> str:
    """Delta ``add.stats`` JSON (numRecords, minValues, maxValues, nullCount)."""
    return json.dumps(
        {"numRecords": num_records, "minValues": min_values, "maxValues": max_values, "nullCount": null_count},
        separators=(",", ":"),
        default=str,
    )


def read_table_deltars(table_uri: str, version: int | None = None) -> pa.Table:
    """Read a whole table with delta-rs' own engine (DataFusion), independent of Spark.

    DataFusion hands strings out as Arrow "view" types, which pyarrow 14 cannot import, so
    string columns (and lists of strings) travel dictionary-encoded and are decoded here.
    """
    import json

    from deltalake import QueryBuilder

    table = open_table(table_uri, version)
    fields = json.loads(table.schema().to_json())["fields"]
    select = []
    for f in fields:
        name = '"' + f["name"].replace('"', '""') + '"'
        kind = f["type"]
        if kind == "string":
            select.append(f"arrow_cast({name}, 'Dictionary(Int32, Utf8)') AS {name}")
        elif isinstance(kind, dict) and kind.get("type") == "array" and kind.get("elementType") == "string":
            select.append(f"arrow_cast({name}, 'List(Dictionary(Int32, Utf8))') AS {name}")
        else:
            select.append(name)
    reader = QueryBuilder().register("t", table).execute(f"SELECT {', '.join(select)} FROM t")
    result = pa.RecordBatchReader._import_from_c_capsule(reader.__arrow_c_stream__()).read_all()
    target = arrow_schema_to_pyarrow(table.schema().to_arrow())
    columns = [_decode_dictionaries(result.column(f.name)) for f in target]
    return pa.Table.from_arrays(columns, names=target.names)


def _decode_dictionaries(column: pa.ChunkedArray) -> pa.ChunkedArray:
    if pa.types.is_dictionary(column.type):
        return column.cast(column.type.value_type)
    if pa.types.is_list(column.type) and pa.types.is_dictionary(column.type.value_type):
        return column.cast(pa.list_(column.type.value_type.value_type))
    return column
