"""Raw logs -> validated bronze Delta tables, with bad rows quarantined (never dropped).

Pure DataFrame -> DataFrame transforms (``parse_*``, ``validate_*``) with their schemas
declared once below, and one edge function (``ingest``) that writes. Every bad row lands in
``quarantine/<table>`` with a ``reason`` from a fixed vocabulary, a ``detail``, the raw row
as JSON, the batch it came from and the run id; valid rows land in ``bronze/<table>``.

Reasons (checked in this order; a row gets the first that applies):

interactions: malformed_row, missing_user_id, missing_item_id, missing_timestamp,
unparseable_timestamp, timestamp_out_of_range, outside_window, missing_rating,
unparseable_rating, rating_out_of_range, unknown_user, unknown_item, duplicate_event
users / items: malformed_row, missing_id, duplicate_row, conflicting_duplicate_id

An unparseable attribute (``unparseable_numeric``: a users/items numeric column that is not a
number) does not make the user or item unknown: the row is kept with that value set to null,
and the bad value is recorded in quarantine all the same (``TableReport.repaired_by_reason``).
Only quarantined rows count toward ``--max-bad-fraction``.

``duplicate_event`` is an exact repeat of (user_id, item_id, event_ts, rating): the first
copy is kept, the repeats are quarantined. ``conflicting_duplicate_id`` is an id that appears
with different attributes: no copy can be trusted, so all of them are quarantined (and
interactions that reference the id then become ``unknown_*``).

What a load replaces (never more than it was asked to):

* ``bronze/interactions`` (partitioned by ``event_date``, the UTC date of ``event_ts``): only
  the window of the load. ``only_hour`` H: exactly the events with ``event_ts`` in
  [H, H+1h); the rest of that day's partition is carried over unchanged. ``only_date`` D:
  exactly UTC day D. Neither: every UTC date that has an event with a usable timestamp in
  the load. Rows of the file outside an ``only_hour``/``only_date`` window are quarantined
  as ``outside_window`` (they do not count toward ``--max-bad-fraction``: a scheduler's hourly run may read a
  source that holds other hours too) and are ingested by the run of their own window; the
  job's note says how many.
* ``bronze/users`` / ``bronze/items``: upserted by id: new ids added, ids whose attributes
  changed replaced, ids absent from the load kept. The load must have the table's columns.
* ``replace_all``: each table present in the load is replaced as a whole (the only mode
  that removes rows outside the load's window/ids); the report counts what it removed.

A re-run of the same load is idempotent: when the window's rows (or the upserted rows)
equal what the table already holds, nothing is written and no new version is made.

Atomicity across tables: every table's files are staged first and committed last, so a
failure while reading, validating or writing leaves every table as it was; the commits are
per table (Delta has no multi-table transaction) and re-running the same batch converges.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta

from pyspark import StorageLevel
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T
from pyspark.sql.window import Window

from lake_contract.delta_snapshot import table_exists, table_version
from lake_contract.errors import BadInputError, CommitConflictError, SchemaMismatchError
from lake_contract.lake import BRONZE_TABLES, Lake, quarantine_table
from spark_features.delta_io import DeltaLakeIO, WriteResult, check_schema_compatible
from spark_features.sources import EntitySpec, InteractionsSpec, SourceSpec

log = logging.getLogger(__name__)

CORRUPT_COLUMN = "_corrupt_record"
REASON = "_tl_reason"
DETAIL = "_tl_detail"
REPAIR = "_tl_repair"  # attribute-level problem: row kept, value nulled, still recorded
REPAIR_DETAIL = "_tl_repair_detail"

INTERACTIONS_SCHEMA = T.StructType([
    T.StructField("user_id", T.StringType(), False),
    T.StructField("item_id", T.StringType(), False),
    T.StructField("rating", T.DoubleType(), True),
    T.StructField("event_ts", T.TimestampType(), False),
    T.StructField("event_date", T.DateType(), False),
])
INTERACTIONS_PARTITION = ["event_date"]

QUARANTINE_SCHEMA = T.StructType([
    T.StructField("reason", T.StringType(), False),
    T.StructField("detail", T.StringType(), True),
    T.StructField("raw", T.StringType(), True),
    T.StructField("source", T.StringType(), False),
    T.StructField("run_id", T.StringType(), False),
    T.StructField("quarantined_at", T.TimestampType(), False),
    T.StructField("batch", T.StringType(), False),
])
QUARANTINE_PARTITION = ["batch"]

INTERACTION_REASONS = (
    "malformed_row", "missing_user_id", "missing_item_id", "missing_timestamp", "unparseable_timestamp",
    "timestamp_out_of_range", "outside_window", "missing_rating", "unparseable_rating", "rating_out_of_range",
    "unknown_user", "unknown_item", "duplicate_event",
)
# A row with one of these has no usable event time, so it names no date of the load.
NO_EVENT_TIME = ("malformed_row", "missing_timestamp", "unparseable_timestamp", "timestamp_out_of_range")
ENTITY_REASONS = ("malformed_row", "missing_id", "duplicate_row", "conflicting_duplicate_id")
ENTITY_REPAIRS = ("unparseable_numeric",)


@dataclass(frozen=True)
class RawTables:
    """Source DataFrames as read (all-string for CSV, typed for Parquet), before validation."""

    interactions: DataFrame
    users: DataFrame | None = None
    items: DataFrame | None = None


@dataclass(frozen=True)
class IngestOptions:
    """Knobs of one ingest run (the job parses them; see ``jobs/ingest.py --help``)."""

    batch: str  # names this load; quarantine rows of a re-run of the same batch replace the old ones
    only_date: date | None = None  # the load is exactly this UTC day: it replaces that day's events
    only_hour: datetime | None = None  # the load is exactly this UTC hour (naive = UTC): replaces that hour
    replace_all: bool = False  # replace every table of the load as a whole (removes what the load lacks)
    max_bad_fraction: float = 0.01
    run_id: str = field(default_factory=lambda: datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ-") + uuid.uuid4().hex[:8])

    def __post_init__(self) -> None:
        chosen = [name for name, on in (("only_date", self.only_date is not None),
                                        ("only_hour", self.only_hour is not None),
                                        ("replace_all", self.replace_all)) if on]
        if len(chosen) > 1:
            raise ValueError(f"only_date, only_hour and replace_all exclude each other, got {chosen}")
        if self.only_hour is not None:
            hour = self.only_hour if self.only_hour.tzinfo else self.only_hour.replace(tzinfo=UTC)
            hour = hour.astimezone(UTC)
            if (hour.minute, hour.second, hour.microsecond) != (0, 0, 0):
                raise ValueError(f"only_hour must be the start of an hour (YYYY-MM-DDTHH), got {self.only_hour!r}")
            object.__setattr__(self, "only_hour", hour)
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ValueError(f"max_bad_fraction must be within [0, 1], got {self.max_bad_fraction!r}")
        if not self.batch or any(ch in self.batch for ch in "/:%#?\\"):
            raise ValueError(f"batch must be a non-empty name without / : % # ? \\, got {self.batch!r}")

    @property
    def window(self) -> tuple[datetime, datetime, str] | None:
        """[start, end) in UTC and its name (``--hour 2026-12-01T10``), or None (no fixed window)."""
        if self.only_hour is not None:
            return self.only_hour, self.only_hour + timedelta(hours=1), f"--hour {self.only_hour:%Y-%m-%dT%H}"
        if self.only_date is not None:
            start = datetime(self.only_date.year, self.only_date.month, self.only_date.day, tzinfo=UTC)
            return start, start + timedelta(days=1), f"--date {self.only_date.isoformat()}"
        return None


@dataclass
class TableReport:
    table: str
    total: int
    valid: int
    bad_by_reason: dict[str, int]
    repaired_by_reason: dict[str, int] = field(default_factory=dict)
    outside_window: int = 0  # rows quarantined as outside_window
    written: WriteResult | None = None  # None: nothing written (unchanged, or not in this load)
    action: str = ""  # what the write did to the table, for people: "upserted 1 new id, ...", "unchanged"
    removed_rows: int = 0  # rows of the table this load removed or replaced

    @property
    def bad(self) -> int:
        return sum(self.bad_by_reason.values())

    @property
    def bad_fraction(self) -> float:
        return self.bad / self.total if self.total else 0.0


@dataclass
class IngestReport:
    run_id: str
    batch: str
    tables: list[TableReport]
    quarantine_writes: list[WriteResult]
    stage_seconds: dict[str, float]


# ------------------------------------------------------------------- reading
def read_source(spark: SparkSession, spec: SourceSpec) -> RawTables:
    """Read every table of ``spec`` (lazily: nothing is scanned until validation)."""
    return RawTables(
        interactions=_read_file(spark, spec.interactions.path, spec.interactions.format,
                                spec.interactions.delimiter, spec.interactions.header, spec.interactions.rename),
        users=_read_entity(spark, spec.users),
        items=_read_entity(spark, spec.items),
    )


def _read_entity(spark: SparkSession, spec: EntitySpec | None) -> DataFrame | None:
    if spec is None:
        return None
    return _read_file(spark, spec.path, spec.format, spec.delimiter, spec.header, spec.rename)


def _read_file(spark: SparkSession, path: str, fmt: str, delimiter: str, header: bool, rename) -> DataFrame:
    """CSV is read as all-string columns (types are checked row by row in validation, so a bad
    value is quarantined rather than failing the job), with malformed lines captured in
    ``_corrupt_record``. Parquet keeps its own types."""
    try:
        if fmt == "parquet":
            frame = spark.read.parquet(path)
        else:
            head = spark.read.option("header", header).option("sep", delimiter).csv(path)
            schema = T.StructType(
                [T.StructField(c, T.StringType(), True) for c in head.columns]
                + [T.StructField(CORRUPT_COLUMN, T.StringType(), True)]
            )
            frame = (
                spark.read.schema(schema)
                .option("header", header)
                .option("sep", delimiter)
                .option("mode", "PERMISSIVE")
                .option("columnNameOfCorruptRecord", CORRUPT_COLUMN)
                .csv(path)
            )
    except Exception as err:
        if "PATH_NOT_FOUND" in str(err) or "Path does not exist" in str(err):
            raise BadInputError(f"input {path} does not exist: check the mapping's path") from err
        raise
    for old, new in dict(rename).items():
        if old in frame.columns:
            frame = frame.withColumnRenamed(old, new)
    return frame


# ------------------------------------------------------------------ parsing
def _blank_to_null(col: Column) -> Column:
    trimmed = F.trim(col.cast("string"))
    return F.when(trimmed == "", None).otherwise(trimmed)


def _require_columns(frame: DataFrame, needed: list[str], what: str) -> None:
    missing = [c for c in needed if c not in frame.columns]
    if missing:
        raise BadInputError(
            f"{what} has no column(s) {missing}; it has {[c for c in frame.columns if c != CORRUPT_COLUMN]}. "
            "Fix the mapping (column names, rename) or the input header"
        )


def parse_timestamp(col: Column, unit: str, source_type: T.DataType) -> Column:
    """Event time as a Spark timestamp (microsecond precision, UTC); null when unparseable.

    Numbers are scaled exactly (decimal arithmetic, no float rounding): ``unit`` s/ms/us.
    """
    if isinstance(source_type, T.TimestampType):
        return col
    if isinstance(source_type, T.DateType):
        return col.cast("timestamp")
    if unit == "iso":
        return F.try_to_timestamp(F.trim(col.cast("string")))
    scale = {"s": 1_000_000, "ms": 1_000, "us": 1}[unit]
    number = F.trim(col.cast("string")).try_cast("decimal(38,6)")
    micros = (number * F.lit(scale)).try_cast("long")
    return F.when(micros.isNotNull(), F.timestamp_micros(micros))


def parse_interactions(raw: DataFrame, spec: InteractionsSpec) -> DataFrame:
    """Add typed candidate columns (``_p_user_id``, ``_p_item_id``, ``_p_event_ts``,
    ``_p_rating``) next to the raw ones; raw columns stay for the quarantine record."""
    needed = [spec.user_id, spec.item_id, spec.timestamp] + ([spec.rating] if spec.rating else [])
    _require_columns(raw, needed, f"interactions source {spec.path}")
    ts_type = raw.schema[spec.timestamp].dataType
    rating_raw = _blank_to_null(F.col(spec.rating)) if spec.rating else F.lit(None).cast("string")
    return raw.select(
        "*",
        _blank_to_null(F.col(spec.user_id)).alias("_p_user_id"),
        _blank_to_null(F.col(spec.item_id)).alias("_p_item_id"),
        _blank_to_null(F.col(spec.timestamp)).alias("_p_ts_raw"),
        parse_timestamp(F.col(spec.timestamp), spec.timestamp_unit, ts_type).alias("_p_event_ts"),
        rating_raw.alias("_p_rating_raw"),
        rating_raw.try_cast("double").alias("_p_rating"),
    )


def validate_interactions(
    parsed: DataFrame,
    spec: InteractionsSpec,
    known_user_ids: DataFrame | None = None,
    known_item_ids: DataFrame | None = None,
    window: tuple[datetime, datetime, str] | None = None,
) -> DataFrame:
    """Add ``_tl_reason`` (null when the row is valid) and ``_tl_detail``.

    ``known_*_ids`` are one-column DataFrames (``id``) of valid ids; when given, interactions
    referencing other ids are quarantined as unknown. ``window`` ([start, end) UTC, name):
    events outside it are quarantined as ``outside_window``.
    """
    ts_min = datetime.combine(spec.timestamp_min, datetime.min.time())
    ts_max = datetime.combine(spec.timestamp_max, datetime.min.time())
    corrupt = F.col(CORRUPT_COLUMN).isNotNull() if CORRUPT_COLUMN in parsed.columns else F.lit(False)
    checks: list[tuple[Column, str, Column | None]] = [
        (corrupt, "malformed_row", F.lit("wrong number of fields")),
        (F.col("_p_user_id").isNull(), "missing_user_id", None),
        (F.col("_p_item_id").isNull(), "missing_item_id", None),
        (F.col("_p_ts_raw").isNull(), "missing_timestamp", None),
        (F.col("_p_event_ts").isNull(), "unparseable_timestamp", F.col("_p_ts_raw")),
        ((F.col("_p_event_ts") < F.lit(ts_min)) | (F.col("_p_event_ts") >= F.lit(ts_max)),
         "timestamp_out_of_range", F.col("_p_event_ts").cast("string")),
    ]
    if window is not None:
        start, end, name = window
        checks.append(((F.col("_p_event_ts") < F.lit(start)) | (F.col("_p_event_ts") >= F.lit(end)),
                       "outside_window", F.concat(F.col("_p_event_ts").cast("string"), F.lit(f" is outside {name}"))))
    if spec.rating:
        checks += [
            (F.col("_p_rating_raw").isNull(), "missing_rating", None),
            (F.col("_p_rating").isNull() | F.isnan("_p_rating"), "unparseable_rating", F.col("_p_rating_raw")),
        ]
        if spec.rating_range is not None:
            lo, hi = spec.rating_range
            checks.append(
                ((F.col("_p_rating") < lo) | (F.col("_p_rating") > hi), "rating_out_of_range",
                 F.col("_p_rating_raw"))
            )
    frame = _apply_checks(parsed, checks)
    if known_user_ids is not None:
        frame = _flag_unknown(frame, "_p_user_id", known_user_ids, "unknown_user")
    if known_item_ids is not None:
        frame = _flag_unknown(frame, "_p_item_id", known_item_ids, "unknown_item")

    # Exact repeats of an otherwise valid event: keep the first copy (ordered by a hash of the
    # raw row: copies that differ elsewhere are told apart deterministically, identical copies
    # are interchangeable), quarantine the rest.
    key = ["_p_user_id", "_p_item_id", "_p_event_ts", "_p_rating"]
    order = F.xxhash64(*[F.col(f"`{c}`") for c in parsed.columns if not c.startswith("_p_")])
    window = Window.partitionBy(F.col(REASON).isNull(), *key).orderBy(order)
    copy_number = F.row_number().over(window)
    return frame.withColumn(
        REASON, F.when(F.col(REASON).isNull() & (copy_number > 1), "duplicate_event").otherwise(F.col(REASON))
    ).withColumn(
        DETAIL, F.when(F.col(REASON) == "duplicate_event", F.lit("repeat of an identical event")).otherwise(F.col(DETAIL))
    )


def to_bronze_interactions(validated: DataFrame) -> DataFrame:
    """Valid rows in ``INTERACTIONS_SCHEMA`` (event_date is the UTC date of event_ts)."""
    return validated.filter(F.col(REASON).isNull()).select(
        F.col("_p_user_id").alias("user_id"),
        F.col("_p_item_id").alias("item_id"),
        F.col("_p_rating").alias("rating"),
        F.col("_p_event_ts").alias("event_ts"),
        F.to_date(F.col("_p_event_ts")).alias("event_date"),
    )


def parse_entity(raw: DataFrame, spec: EntitySpec) -> DataFrame:
    """Typed candidate columns for a users/items table: ``_p_id`` plus ``_p_<attr>`` per attribute."""
    _require_columns(raw, [spec.id, *spec.attribute_columns], f"{spec.table} source {spec.path}")
    cols = [_blank_to_null(F.col(spec.id)).alias("_p_id")]
    for c in spec.categorical:
        cols.append(_blank_to_null(F.col(c)).alias(f"_p_{c}"))
    for c in spec.numeric:
        number = _blank_to_null(F.col(c)).try_cast("double")
        cols.append(_blank_to_null(F.col(c)).alias(f"_p_raw_{c}"))
        cols.append(F.when(~F.isnan(number), number).alias(f"_p_{c}"))  # NaN counts as unparseable
    for c, sep in spec.multi_valued.items():
        cols.append(_split_multi(F.col(c), sep, raw.schema[c].dataType).alias(f"_p_{c}"))
    for c in spec.text:
        cols.append(F.trim(F.col(c).cast("string")).alias(f"_p_{c}"))
    return raw.select("*", *cols)


def _split_multi(col: Column, sep: str, source_type: T.DataType) -> Column:
    """Multi-valued attribute as array<string>: split on the literal separator, trimmed, no
    empty tokens, first occurrence order, duplicates removed."""
    if isinstance(source_type, T.ArrayType):
        tokens = F.transform(col, lambda x: F.trim(x.cast("string")))
    else:
        import re

        tokens = F.transform(F.split(F.coalesce(col.cast("string"), F.lit("")), re.escape(sep)), lambda x: F.trim(x))
    return F.array_distinct(F.filter(tokens, lambda x: x.isNotNull() & (x != "")))


def validate_entity(parsed: DataFrame, spec: EntitySpec) -> DataFrame:
    corrupt = F.col(CORRUPT_COLUMN).isNotNull() if CORRUPT_COLUMN in parsed.columns else F.lit(False)
    checks: list[tuple[Column, str, Column | None]] = [
        (corrupt, "malformed_row", F.lit("wrong number of fields")),
        (F.col("_p_id").isNull(), "missing_id", None),
    ]
    frame = _apply_checks(parsed, checks)
    repairs = [
        (F.col(f"_p_raw_{c}").isNotNull() & F.col(f"_p_{c}").isNull(), "unparseable_numeric",
         F.concat(F.lit(f"{c}="), F.to_json(F.array(F.col(f"_p_raw_{c}"))), F.lit(" is not a number: row kept, value set to null")))
        for c in spec.numeric
    ]
    frame = _apply_checks(frame, repairs, REPAIR, REPAIR_DETAIL) if repairs else frame.withColumn(
        REPAIR, F.lit(None).cast("string")).withColumn(REPAIR_DETAIL, F.lit(None).cast("string"))

    attrs = [F.col(f"_p_{c}") for c in spec.attribute_columns]
    content = F.to_json(F.struct(*attrs)) if attrs else F.lit("")
    per_id = Window.partitionBy(F.col(REASON).isNull(), "_p_id")
    per_content = Window.partitionBy(F.col(REASON).isNull(), "_p_id", "_tl_content").orderBy(F.lit(1))
    frame = frame.withColumn("_tl_content", content)
    frame = frame.withColumn("_tl_versions", F.size(F.collect_set("_tl_content").over(per_id)))
    frame = frame.withColumn("_tl_copy", F.row_number().over(per_content))
    reason = (
        F.when(F.col(REASON).isNotNull(), F.col(REASON))
        .when(F.col("_tl_versions") > 1, "conflicting_duplicate_id")
        .when(F.col("_tl_copy") > 1, "duplicate_row")
    )
    detail = (
        F.when(F.col(REASON).isNotNull(), F.col(DETAIL))
        .when(F.col("_tl_versions") > 1, F.concat(F.lit("id appears with "), F.col("_tl_versions").cast("string"),
                                                  F.lit(" different attribute sets")))
    )
    return frame.withColumn(DETAIL, detail).withColumn(REASON, reason).drop("_tl_content", "_tl_versions", "_tl_copy")


ROLE_KEY = "towerlake_role"  # Spark/Delta column metadata: what a bronze column means


def to_bronze_entity(validated: DataFrame, spec: EntitySpec) -> DataFrame:
    """Valid rows: the id plus every mapped attribute, each tagged with its role
    (categorical, numeric, multi_valued, text) in the column metadata, so the features job
    knows what to do with a column without a second mapping."""
    roles = {**{c: "categorical" for c in spec.categorical}, **{c: "numeric" for c in spec.numeric},
             **{c: "multi_valued" for c in spec.multi_valued}, **{c: "text" for c in spec.text}}
    return validated.filter(F.col(REASON).isNull()).select(
        F.col("_p_id").alias(spec.id_column, metadata={ROLE_KEY: "id"}),
        *[F.col(f"_p_{c}").alias(c, metadata={ROLE_KEY: roles[c]}) for c in spec.attribute_columns],
    )


def column_roles(schema: T.StructType) -> dict[str, str]:
    """{column: role} of a bronze users/items schema (columns without a role are skipped)."""
    return {f.name: f.metadata[ROLE_KEY] for f in schema.fields if ROLE_KEY in (f.metadata or {})}


def _apply_checks(
    frame: DataFrame, checks: list[tuple[Column, str, Column | None]], reason_col: str = REASON,
    detail_col: str = DETAIL,
) -> DataFrame:
    reason: Column | None = None
    detail: Column | None = None
    for condition, name, info in checks:
        info_col = info if info is not None else F.lit(None).cast("string")
        cond = F.coalesce(condition, F.lit(False))
        reason = F.when(cond, F.lit(name)) if reason is None else reason.when(cond, F.lit(name))
        detail = F.when(cond, info_col) if detail is None else detail.when(cond, info_col)
    return frame.withColumn(reason_col, reason).withColumn(detail_col, detail)


def _flag_unknown(frame: DataFrame, column: str, known: DataFrame, name: str) -> DataFrame:
    ids = known.select(F.col(known.columns[0]).alias("_tl_known_id")).distinct().withColumn("_tl_hit", F.lit(True))
    joined = frame.join(ids, frame[column] == ids["_tl_known_id"], "left")
    unknown = F.col(REASON).isNull() & F.col(column).isNotNull() & F.col("_tl_hit").isNull()
    return (
        joined.withColumn(DETAIL, F.when(unknown, F.col(column)).otherwise(F.col(DETAIL)))
        .withColumn(REASON, F.when(unknown, F.lit(name)).otherwise(F.col(REASON)))
        .drop("_tl_known_id", "_tl_hit")
    )


def to_quarantine(validated: DataFrame, raw_columns: list[str], source: str, options: IngestOptions) -> DataFrame:
    """Bad rows in ``QUARANTINE_SCHEMA``: the raw row as JSON (strings as read), reason, detail."""
    raw = F.to_json(F.struct(*[F.col(f"`{c}`") for c in raw_columns])) if raw_columns else F.lit(None)
    now = datetime.now(UTC).replace(tzinfo=None)
    has_repair = REPAIR in validated.columns
    reason = F.coalesce(F.col(REASON), F.col(REPAIR)) if has_repair else F.col(REASON)
    detail = F.when(F.col(REASON).isNotNull(), F.col(DETAIL)).otherwise(F.col(REPAIR_DETAIL)) if has_repair \
        else F.col(DETAIL)
    return validated.filter(reason.isNotNull()).select(
        reason.alias("reason"),
        detail.alias("detail"),
        raw.alias("raw"),
        F.lit(source).alias("source"),
        F.lit(options.run_id).alias("run_id"),
        F.lit(now).cast("timestamp").alias("quarantined_at"),
        F.lit(options.batch).alias("batch"),
    )


# ------------------------------------------------------------------- the job
@dataclass
class _Write:
    """One bronze table's planned write: ``staged`` (overwrite / window replace, committed
    last), ``upsert`` (changed rows MERGEd by id), or neither (unchanged)."""

    table: str
    frame: DataFrame | None = None
    replace_where: dict | None = None
    upsert_key: str | None = None
    read_version: int | None = None  # the version ``frame`` was planned from (carried-over rows)


def ingest(
    spark: SparkSession,
    io: DeltaLakeIO,
    lake: Lake,
    raw: RawTables,
    spec: SourceSpec,
    options: IngestOptions,
    say: Callable[[str], None] = print,
) -> IngestReport:
    """Validate ``raw`` against ``spec`` and write bronze + quarantine tables (what each
    table's write replaces: the module docstring).

    Fails with ``BadInputError`` (after writing the quarantine rows, so they can be
    inspected, and before touching any bronze table) when a table's bad fraction exceeds
    ``options.max_bad_fraction``; with ``SchemaMismatchError`` (before writing anything) when
    a users/items load lacks or adds columns of the bronze table it would be upserted into.
    """
    timings: dict[str, float] = {}
    reports: list[TableReport] = []
    writes: list[_Write] = []
    quarantined: list[tuple[str, DataFrame]] = []
    cached: list[DataFrame] = []

    def stage(name: str):
        class _Timer:
            def __enter__(self_inner):
                self_inner.start = time.monotonic()

            def __exit__(self_inner, *exc):
                timings[name] = timings.get(name, 0.0) + time.monotonic() - self_inner.start
                if exc[0] is None:
                    say(f"  [{name}] {timings[name]:.1f}s")

        return _Timer()

    def keep(frame: DataFrame) -> DataFrame:
        cached.append(frame.persist(StorageLevel.MEMORY_AND_DISK))
        return cached[-1]

    try:
        known_users = known_items = None
        for entity_spec, frame in ((spec.users, raw.users), (spec.items, raw.items)):
            if entity_spec is None or frame is None:
                continue
            with stage(f"validate {entity_spec.table}"):
                validated = keep(validate_entity(parse_entity(frame, entity_spec), entity_spec))
                report = _count(validated, entity_spec.table)
                reports.append(report)
                say(_describe(report))
            bronze = to_bronze_entity(validated, entity_spec)
            existing = None if options.replace_all else _existing(io, lake, entity_spec.table)
            ids = bronze.select(entity_spec.id_column)
            if existing is not None:  # an upsert keeps the ids the load lacks: they stay known
                ids = ids.unionByName(existing.select(entity_spec.id_column))
            if entity_spec.table == "users":
                known_users = ids
            else:
                known_items = ids
            quarantined.append((entity_spec.table, to_quarantine(validated, frame.columns, spec.name, options)))
            with stage(f"plan {entity_spec.table}"):
                writes.append(_plan_entity(io, lake, entity_spec, bronze, report, options, keep))
                say(f"    plan bronze/{entity_spec.table}: {report.action}")

        # With no users/items in this load, the lake's current bronze tables are the reference.
        if known_users is None:
            known_users = _existing_ids(io, lake, "users", "user_id")
        if known_items is None:
            known_items = _existing_ids(io, lake, "items", "item_id")

        with stage("validate interactions"):
            parsed = parse_interactions(raw.interactions, spec.interactions)
            validated = keep(validate_interactions(parsed, spec.interactions, known_users, known_items,
                                                   options.window))
            report = _count(validated, "interactions")
            report.outside_window = report.bad_by_reason.get("outside_window", 0)
            reports.append(report)
            say(_describe(report))
            if report.outside_window:
                say(f"    note: {report.outside_window:,} events fall outside {options.window[2]}: quarantined as "
                    "outside_window (ingest them with the run of their own hour/date)")
        raw_cols = [c for c in raw.interactions.columns]
        quarantined.append(("interactions", to_quarantine(validated, raw_cols, spec.name, options)))
        with stage("plan interactions"):
            writes.append(_plan_interactions(io, lake, validated, report, options, keep))
            say(f"    plan bronze/interactions: {report.action}")

        # Quarantine rows are written even when the job then fails, so a person can inspect them.
        quarantine_results = []
        with stage("write quarantine"):
            for table, bad in quarantined:
                result = io.write_table(
                    bad.select(*QUARANTINE_SCHEMA.names).coalesce(1), lake.table(quarantine_table(table)), mode="overwrite",
                    partition_by=QUARANTINE_PARTITION, replace_where={"batch": [options.batch]},
                )
                quarantine_results.append(result)
        for report in reports:
            # Rows outside --hour/--date are not malformed: they belong to another window's run
            # (a scheduler reading one growing source), so they never count toward the limit.
            malformed = report.bad - report.outside_window
            in_window = report.total - report.outside_window
            fraction = malformed / in_window if in_window else 0.0
            if fraction > options.max_bad_fraction:
                reasons = ", ".join(f"{k}={v:,}" for k, v in sorted(report.bad_by_reason.items(), key=lambda kv: -kv[1])
                                    if k != "outside_window")
                raise BadInputError(
                    f"{report.table}: {malformed:,} of {in_window:,} rows are bad "
                    f"({fraction:.2%} > --max-bad-fraction {options.max_bad_fraction:.2%}): {reasons}. "
                    f"Nothing was written to bronze; inspect {lake.table(quarantine_table(report.table))} "
                    f"(batch={options.batch}, run_id={options.run_id}), fix the source or mapping, and re-run"
                )

        with stage("write bronze"):
            pending = []
            for write in writes:
                if write.frame is None or write.upsert_key is not None:
                    continue
                partition_by = INTERACTIONS_PARTITION if write.table == "interactions" else None
                pending.append((write.table, io.stage_write(
                    write.frame, lake.table(BRONZE_TABLES[write.table]), mode="overwrite", partition_by=partition_by,
                    replace_where=write.replace_where, overwrite_schema=write.replace_where is None,
                )))
                _check_not_moved(write, pending[-1][1], lake)
            for write in writes:  # an upsert commits as it writes: after every staged file is written
                if write.frame is not None and write.upsert_key is not None:
                    result = io.upsert(write.frame, lake.table(BRONZE_TABLES[write.table]), [write.upsert_key])
                    next(r for r in reports if r.table == write.table).written = result
            for table, handle in pending:
                result = handle if isinstance(handle, WriteResult) else io.commit_staged(handle)
                next(r for r in reports if r.table == table).written = result
        return IngestReport(options.run_id, options.batch, reports, quarantine_results, timings)
    finally:
        for frame in cached:
            frame.unpersist()


def _plan_entity(io: DeltaLakeIO, lake: Lake, spec: EntitySpec, bronze: DataFrame, report: TableReport,
                 options: IngestOptions, keep: Callable[[DataFrame], DataFrame]) -> _Write:
    """Upsert by id (only new or changed rows are written; none: nothing), or with
    ``replace_all`` (or no table yet) the whole table; fills ``report.action``/``removed_rows``."""
    id_col = spec.id_column
    # Dimension tables are small: one file per million rows keeps readers quick.
    whole = bronze.coalesce(max(1, report.valid // 1_000_000))
    existing = _existing(io, lake, spec.table)
    if existing is None:
        report.action = f"created with {report.valid:,} ids"
        return _Write(spec.table, whole)
    if options.replace_all:
        report.removed_rows = existing.join(bronze.select(id_col), id_col, "left_anti").count()
        report.action = (f"--replace-all: replaced as a whole ({existing.count():,} rows before); removed "
                         f"{report.removed_rows:,} ids absent from this load")
        return _Write(spec.table, whole)
    uri = lake.table(BRONZE_TABLES[spec.table])
    try:
        check_schema_compatible(existing.schema, bronze.schema, uri)
    except SchemaMismatchError as err:
        raise SchemaMismatchError(
            f"bronze/{spec.table} cannot be upserted with this load: {str(err).split(': ', 1)[1].split('. Fix')[0]}. "
            f"Map the same columns, or re-run with --replace-all to replace bronze/{spec.table} as a whole "
            f"(that removes every id absent from this load)") from err
    # Rows new or different from the table's (ids are unique on both sides after validation).
    changed = keep(bronze.select(*existing.columns).exceptAll(existing))
    n_changed = changed.count()
    added = changed.join(existing.select(id_col), id_col, "left_anti").count() if n_changed else 0
    replaced = n_changed - added
    report.removed_rows = replaced
    unchanged = report.valid - n_changed
    kept = existing.count() - replaced
    if n_changed == 0:
        report.action = f"unchanged: all {report.valid:,} ids of the load are already there as loaded; nothing written"
        return _Write(spec.table)
    report.action = (f"upserted by {id_col}: {added:,} new, {replaced:,} changed replaced, {unchanged:,} identical; "
                     f"{kept - unchanged:,} ids absent from the load kept")
    return _Write(spec.table, changed.coalesce(1), upsert_key=id_col)


def _plan_interactions(io: DeltaLakeIO, lake: Lake, validated: DataFrame, report: TableReport,
                       options: IngestOptions, keep: Callable[[DataFrame], DataFrame]) -> _Write:
    """Replace the load's window of ``bronze/interactions`` (module docstring), or nothing when
    the window already holds exactly these rows; fills ``report.action``/``removed_rows``."""
    uri = lake.table(BRONZE_TABLES["interactions"])
    events = to_bronze_interactions(validated)
    version = table_version(uri)
    existing = io.read_table(uri, version) if version is not None else None
    if options.replace_all:
        if existing is not None:
            report.removed_rows = existing.count()
            dates = existing.agg(F.min("event_date"), F.max("event_date"), F.countDistinct("event_date")).first()
            report.action = (f"--replace-all: removed all {report.removed_rows:,} rows of {dates[2]:,} dates "
                             f"({dates[0]}..{dates[1]}), wrote this load's")
        else:
            report.action = "created"
        return _Write("interactions", events.repartition("event_date"))
    if options.window is not None:
        dates = [options.window[0].date()]
    else:
        has_time = F.col("_p_event_ts").isNotNull() & (F.col(REASON).isNull() | ~F.col(REASON).isin(*NO_EVENT_TIME))
        dates = sorted(r[0] for r in validated.where(has_time).select(F.to_date("_p_event_ts")).distinct().collect())
        if not dates:
            report.action = "unchanged: the load has no event with a usable time, so it names no date"
            return _Write("interactions")
    scope = options.window[2] if options.window is not None else _describe_dates(dates)
    if existing is None:
        report.action = f"created ({scope})"
        return _Write("interactions", events.repartition("event_date"), {"event_date": dates})
    before = keep(existing.where(F.col("event_date").isin(*dates)))
    content, carried_from = events, None
    if options.only_hour is not None:
        start, end, _ = options.window
        in_hour = (F.col("event_ts") >= F.lit(start)) & (F.col("event_ts") < F.lit(end))
        report.removed_rows = before.where(in_hour).count()
        content = before.where(~in_hour).unionByName(events)  # the rest of the day, carried over as it is
        carried_from = version
    else:
        report.removed_rows = before.count()
    content = keep(content.repartition("event_date"))
    if _same_rows(before, content):
        report.action = f"unchanged: {scope} already holds exactly these {report.valid:,} events; nothing written"
        return _Write("interactions")
    report.action = f"replaced {scope}: {report.removed_rows:,} old rows out, {report.valid:,} in; nothing else changed"
    return _Write("interactions", content, {"event_date": dates}, read_version=carried_from)


def _check_not_moved(write: _Write, handle, lake: Lake) -> None:
    """A write that carries rows over from version v must commit on top of v: when another
    writer committed in between, refuse (before any commit of this load) instead of dropping
    that writer's rows. The delta-rs commit itself is planned against the staged version."""
    staged_on = getattr(handle, "read_version", None)
    if write.read_version is None or staged_on is None or staged_on == write.read_version:
        return
    raise CommitConflictError(
        f"bronze/{write.table} moved from version {write.read_version} to {staged_on} while this ingest ran "
        f"(another write to it): nothing of this load was committed to bronze; re-run it (ingests of hours of "
        f"one day must run one at a time). Table: {lake.table(BRONZE_TABLES[write.table])}")


def _same_rows(before: DataFrame, after: DataFrame) -> bool:
    """True when both hold the same rows with the same multiplicities (after ⊆ before and
    equal counts means equal multisets)."""
    if before.count() != after.count():
        return False
    return after.exceptAll(before.select(*after.columns)).limit(1).count() == 0


def _describe_dates(dates: list[date]) -> str:
    if len(dates) == 1:
        return f"date {dates[0].isoformat()}"
    return f"{len(dates)} dates {dates[0].isoformat()}..{dates[-1].isoformat()}"


def _existing(io: DeltaLakeIO, lake: Lake, table: str) -> DataFrame | None:
    uri = lake.table(BRONZE_TABLES[table])
    return io.read_table(uri) if table_exists(uri) else None


def _existing_ids(io: DeltaLakeIO, lake: Lake, table: str, column: str) -> DataFrame | None:
    existing = _existing(io, lake, table)
    return None if existing is None else existing.select(column)

def _count(validated: DataFrame, table: str) -> TableReport:
    repair = F.col(REPAIR) if REPAIR in validated.columns else F.lit(None).cast("string")
    rows = validated.groupBy(F.col(REASON).alias("r"), repair.alias("f")).count().collect()  # tiny
    by_reason: dict[str, int] = {}
    repaired: dict[str, int] = {}
    valid = 0
    for row in rows:
        if row["r"] is not None:
            by_reason[row["r"]] = by_reason.get(row["r"], 0) + int(row["count"])
            continue
        valid += int(row["count"])
        if row["f"] is not None:
            repaired[row["f"]] = repaired.get(row["f"], 0) + int(row["count"])
    return TableReport(table=table, total=valid + sum(by_reason.values()), valid=valid,
                       bad_by_reason=by_reason, repaired_by_reason=repaired)


def _describe(report: TableReport) -> str:
    line = f"    {report.table}: {report.total:,} rows read, {report.valid:,} valid, {report.bad:,} quarantined"
    if report.bad_by_reason:
        line += " (" + ", ".join(f"{k}={v:,}" for k, v in sorted(report.bad_by_reason.items())) + ")"
    if report.repaired_by_reason:
        line += "; kept with a bad attribute set to null: " + ", ".join(
            f"{k}={v:,}" for k, v in sorted(report.repaired_by_reason.items()))
    return line
