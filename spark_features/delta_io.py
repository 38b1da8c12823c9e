"""Spark DataFrames in and out of Delta tables, with two engines behind one interface.

docs/design.md decision 1:

* ``native``: the delta-spark jars are on Spark's classpath (``.jars/`` from setup, or a
  cluster's) and Spark reads and writes ``format("delta")`` itself; upserts are Delta MERGEs.
* ``delta-rs``: no jars (``TOWERLAKE_DELTA_ENGINE=delta-rs``, or a machine without them).
  Spark writes plain Parquet files into a fresh
  folder inside the table, then the driver commits all of them to the Delta log in ONE
  delta-rs transaction, with each file's size and column statistics read from its Parquet
  footer. Readers see all of a write or none of it; a failure before the commit leaves the
  table at its previous version (the orphaned folder is removed, or ignored by every reader
  because the log never names it).

Both engines produce ordinary Delta tables that Spark, delta-rs, DuckDB and Petastorm read.

Write modes (``write_table``):

* ``overwrite``: replace the whole table;
* ``overwrite`` with ``replace_where={"event_date": [...]}``: replace exactly those partitions;
* ``overwrite`` with ``replace_where="dynamic"``: replace the partitions present in the data;
* ``append``: add rows; both of two concurrent appends succeed.

A write's columns must match the table's (names and types); a mismatch raises
``SchemaMismatchError`` naming the columns, before any file is written.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime
from typing import Literal
from urllib.parse import quote, unquote

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import StructType

from lake_contract.delta_snapshot import (
    deltars_location,
    files_newer_than,
    open_table,
    resolve_snapshot,
    stats_json,
    table_exists,
)
from lake_contract.errors import CommitConflictError, SchemaMismatchError, TableNotFoundError
from lake_contract.lake import to_local_path, to_uri

log = logging.getLogger(__name__)

Engine = Literal["auto", "native", "delta-rs"]
WriteMode = Literal["overwrite", "append"]
ReplaceWhere = dict[str, list] | Literal["dynamic"] | None

_NATIVE_CLASS = "org.apache.spark.sql.delta.DeltaLog"
_STAGING_PREFIX = "w-"


@dataclass(frozen=True)
class WriteResult:
    """What one write produced: the table, its new version, and how much was written."""

    table_uri: str
    version: int
    engine: str
    mode: str
    files_added: int
    rows_written: int
    replaced_partitions: dict[str, list[str]] | None = None
    seconds: float = 0.0

    def describe(self) -> str:
        scope = ""
        if self.replaced_partitions:
            scope = " replacing " + ", ".join(
                f"{col} in {len(vals)} value(s)" for col, vals in self.replaced_partitions.items()
            )
        return (
            f"{self.table_uri} -> version {self.version}: {self.rows_written:,} rows in "
            f"{self.files_added} file(s), {self.mode}{scope} [{self.engine}, {self.seconds:.1f}s]"
        )


@dataclass
class DeltaLakeIO:
    """Reads and writes Delta tables for one SparkSession, through the engine it detects.

    ``engine="auto"`` uses ``native`` when the delta-spark jars and session extension are
    present, else ``delta-rs``. The engine in use is logged once, at construction.
    """

    spark: SparkSession
    engine: Engine = "auto"
    max_records_per_file: int = 2_000_000  # Petastorm/row-group friendly files of ~10-100 MB
    resolved_engine: str = field(init=False)

    def __post_init__(self) -> None:
        if self.engine not in ("auto", "native", "delta-rs"):
            raise ValueError(f"engine must be one of 'auto', 'native', 'delta-rs', got {self.engine!r}")
        native = native_delta_available(self.spark)
        if self.engine == "native" and not native:
            raise TableNotFoundError(
                "engine 'native' asked for, but the delta-spark jars are not on Spark's classpath "
                "(or spark.sql.extensions lacks io.delta.sql.DeltaSparkSessionExtension): run "
                "scripts/fetch_jars.sh (setup does), add --packages io.delta:delta-spark_2.13:4.0.1 on a "
                "cluster, or use engine 'auto'"
            )
        self.resolved_engine = "native" if (native and self.engine != "delta-rs") else "delta-rs"
        log.info("Delta engine: %s (%s)", self.resolved_engine,
                 "Spark's format('delta'), delta-spark jars" if self.resolved_engine == "native"
                 else "Spark writes Parquet, delta-rs commits")

    # ------------------------------------------------------------------ reads
    def read_table(self, table_uri: str, version: int | None = None,
                   newer_than: tuple[str, datetime] | None = None) -> DataFrame:
        """The table at ``version`` (latest when None) as a Spark DataFrame.

        ``newer_than=(column, ts)``: only rows with ``column >= ts`` are wanted; the read skips
        the files whose logged maximum of ``column`` is older, so it costs the recent files,
        not the table (native: Delta's data skipping on the filter; delta-rs: the file list
        is cut by the log's statistics, with a millisecond of slack for their precision).
        The filter itself is applied too."""
        uri = to_uri(table_uri)
        if newer_than is not None:
            column, since = newer_than
            if self.resolved_engine == "native":
                return self.read_table(uri, version).where(F.col(column) >= F.lit(since))
            snapshot = resolve_snapshot(uri, version)
            keep = [f for f, newer in zip(snapshot.files, files_newer_than(snapshot, column, since), strict=True)
                    if newer]
            return self._read_files(uri, snapshot, keep).where(F.col(column) >= F.lit(since))
        if self.resolved_engine == "native":
            if not table_exists(uri):
                raise TableNotFoundError(f"no Delta table at {uri}: run the job that writes it first")
            reader = self.spark.read.format("delta")
            if version is not None:
                open_table(uri, version)  # a missing version: the same clear error as delta-rs
                reader = reader.option("versionAsOf", version)
            return reader.load(uri)
        snapshot = resolve_snapshot(uri, version)
        return self._read_files(uri, snapshot, snapshot.files)

    def _read_files(self, uri: str, snapshot, files: list[str]) -> DataFrame:
        schema = StructType.fromJson(_json(snapshot.schema_json))
        if not files:
            return self.spark.createDataFrame([], schema)
        # basePath = table root lets Spark parse the hive-style `col=value` folders into the
        # partition columns; the declared schema fixes their types.
        frame = (
            self.spark.read.schema(schema)
            .option("basePath", uri)
            .parquet(*[_spark_path(f) for f in files])
        )
        return frame.select(*schema.names)

    # ----------------------------------------------------------------- writes
    def write_table(
        self,
        df: DataFrame,
        table_uri: str,
        mode: WriteMode = "overwrite",
        partition_by: list[str] | None = None,
        replace_where: ReplaceWhere = None,
        overwrite_schema: bool = False,
        options: dict[str, str] | None = None,
    ) -> WriteResult:
        """Write ``df`` to the Delta table at ``table_uri`` as one atomic commit.

        ``options`` are passed to Spark's Parquet writer (e.g. ``{"parquet.block.size":
        str(8 << 20)}`` for 8 MiB row groups).

        Raises ``SchemaMismatchError`` (columns differ from the table's), ``CommitConflictError``
        (a concurrent writer won), ``ValueError`` (bad arguments).
        """
        started = time.monotonic()
        staged = self.stage_write(df, table_uri, mode, partition_by, replace_where, overwrite_schema, options)
        # The native engine committed while writing; delta-rs commits the staged files now.
        result = staged if self.resolved_engine == "native" else self.commit_staged(staged)
        return _with_seconds(result, time.monotonic() - started)

    def upsert(self, updates: DataFrame, table_uri: str, key: list[str]) -> WriteResult:
        """MERGE ``updates`` into the table by ``key``: matching rows are replaced, new keys
        inserted, every other row kept, in ONE commit. A missing table is created.

        native engine: a Delta MERGE (copy-on-write: deletion vectors stay off, see
        ``refuse_deletion_vectors``); a concurrent conflicting commit: ``CommitConflictError``.

        delta-rs engine: copy-on-write at file granularity. Only the files that hold a key
        of ``updates`` are rewritten (their other rows carried over); the commit removes them
        and adds the new files, planned against the version that was read, so a concurrent
        writer touching the same table makes this fail with ``CommitConflictError``.
        ``updates`` must not repeat a key (that would be ambiguous): ``ValueError``.
        """
        started = time.monotonic()
        uri = to_uri(table_uri)
        missing = [c for c in key if c not in updates.columns]
        if missing:
            raise ValueError(f"upsert key {missing} not in the updates' columns {updates.columns}")
        dupes = updates.groupBy(*key).count().where("count > 1").limit(1).collect()
        if dupes:
            raise ValueError(f"upsert into {uri}: updates repeat key {dict(dupes[0].asDict())}; "
                             "deduplicate them first")
        if not table_exists(uri):
            return self.write_table(updates, uri, mode="overwrite")
        if self.resolved_engine == "native":
            existing = StructType.fromJson(_json(open_table(uri).schema().to_json()))
            check_schema_compatible(existing, updates.schema, uri)
            result = self._merge_native(updates.select(*existing.names), uri, key)
            return replace(result, seconds=time.monotonic() - started)

        snapshot = resolve_snapshot(uri)
        if snapshot.partition_columns:
            raise ValueError(f"upsert supports unpartitioned tables; {uri} is partitioned by "
                             f"{list(snapshot.partition_columns)}")
        existing = StructType.fromJson(_json(snapshot.schema_json))
        check_schema_compatible(existing, updates.schema, uri)
        updates = updates.select(*existing.names)
        current = self.read_table(uri, snapshot.version).withColumn("_tl_file", F.input_file_name())
        keys = updates.select(*key).distinct()
        touched_names = {
            r["_tl_file"].rsplit("/", 1)[-1]
            for r in current.join(keys, key, "left_semi").select("_tl_file").distinct().collect()  # file names only
        }
        touched = [f for f in snapshot.files if f.rsplit("/", 1)[-1] in touched_names]
        kept_rows = self.spark.createDataFrame([], existing)
        if touched:
            kept_rows = (self.spark.read.schema(existing).parquet(*touched)
                         .join(keys, key, "left_anti").select(*existing.names))
        rewritten = kept_rows.unionByName(updates).coalesce(max(1, len(touched)))
        staged = self._stage_files(rewritten, uri, "append", [], None, True, snapshot.version)
        removes = [_remove_action(uri, f) for f in touched]
        staged = replace(staged, removes=removes)
        result = self.commit_staged(staged)
        return replace(result, mode="merge", seconds=time.monotonic() - started)

    def stage_write(
        self,
        df: DataFrame,
        table_uri: str,
        mode: WriteMode = "overwrite",
        partition_by: list[str] | None = None,
        replace_where: ReplaceWhere = None,
        overwrite_schema: bool = False,
        options: dict[str, str] | None = None,
    ):
        """First half of a write: check the schema and write the data files, commit nothing.

        With the delta-rs engine this returns a ``StagedWrite`` for ``commit_staged``; the table
        is unchanged until then (tests use the split to inject failures and race commits).
        With the native engine Spark writes and commits at once, and this returns the result.
        """
        uri = to_uri(table_uri)
        if mode not in ("overwrite", "append"):
            raise ValueError(f"mode must be 'overwrite' or 'append', got {mode!r}")
        partition_by = list(partition_by or [])
        missing = [c for c in partition_by if c not in df.columns]
        if missing:
            raise ValueError(f"partition_by names columns the DataFrame lacks: {missing}; it has {df.columns}")
        if replace_where is not None:
            if mode != "overwrite":
                raise ValueError("replace_where only applies to mode='overwrite'")
            if not partition_by:
                raise ValueError("replace_where needs a partitioned table (partition_by)")
            if replace_where != "dynamic":
                unknown = [c for c in replace_where if c not in partition_by]
                if unknown:
                    raise ValueError(f"replace_where may only name partition columns {partition_by}, got {unknown}")

        exists = table_exists(uri)
        read_version = None
        if exists:
            table = open_table(uri)
            read_version = table.version()
            existing = StructType.fromJson(_json(table.schema().to_json()))
            existing_parts = list(table.metadata().partition_columns)
            full_overwrite = mode == "overwrite" and replace_where is None
            if not (full_overwrite and overwrite_schema):
                check_schema_compatible(existing, df.schema, uri)
                if existing_parts != partition_by:
                    raise SchemaMismatchError(
                        f"table {uri} is partitioned by {existing_parts}, this write by {partition_by}: "
                        "use the table's partitioning (or overwrite with overwrite_schema=True)"
                    )
            df = df.select(*existing.names) if not (full_overwrite and overwrite_schema) else df

        if self.resolved_engine == "native":
            return self._write_native(df, uri, mode, partition_by, replace_where, overwrite_schema, options)
        return self._stage_files(df, uri, mode, partition_by, replace_where, exists, read_version, options)

    # native engine -------------------------------------------------------
    def _write_native(self, df, uri, mode, partition_by, replace_where, overwrite_schema, options=None) -> WriteResult:
        write_id = uuid.uuid4().hex
        writer = (df.write.format("delta").mode(mode).option("maxRecordsPerFile", self.max_records_per_file)
                  .option("userMetadata", _user_metadata(write_id)))
        writer = writer.options(**(options or {}))
        if partition_by:
            writer = writer.partitionBy(*partition_by)
        replaced = None
        # The session sets partitionOverwriteMode=dynamic (for plain Parquet writes). Delta would
        # apply it to EVERY overwrite (a full overwrite would keep the partitions the data lacks)
        # and refuses it next to replaceWhere: only replace_where="dynamic" asks for it.
        writer = writer.option("partitionOverwriteMode", "dynamic" if replace_where == "dynamic" else "static")
        if replace_where and replace_where != "dynamic":
            replaced = {c: [_partition_string(v) for v in vals] for c, vals in replace_where.items()}
            writer = writer.option("replaceWhere", _sql_predicate(replace_where))
        if overwrite_schema:
            writer = writer.option("overwriteSchema", "true")
        try:
            writer.save(uri)
        except Exception as err:
            conflict = _native_conflict(err, uri, mode)
            if conflict is None:
                raise
            raise conflict from err
        result = self._native_result(uri, write_id, mode)
        if replace_where == "dynamic":
            replaced = _commit_partitions(uri, result.version, partition_by) if result.files_added else \
                {c: [] for c in partition_by}
        return replace(result, replaced_partitions=replaced)

    def _merge_native(self, updates: DataFrame, uri: str, key: list[str]) -> WriteResult:
        from delta.tables import DeltaTable as SparkDeltaTable

        write_id = uuid.uuid4().hex
        condition = " AND ".join(f"t.`{c}` = s.`{c}`" for c in key)
        merge = (SparkDeltaTable.forPath(self.spark, uri).alias("t").merge(updates.alias("s"), condition)
                 .whenMatchedUpdateAll().whenNotMatchedInsertAll())
        # MERGE takes its commit's userMetadata only from the session conf: set for this call.
        conf_key = "spark.databricks.delta.commitInfo.userMetadata"
        previous = self.spark.conf.get(conf_key, None)
        self.spark.conf.set(conf_key, _user_metadata(write_id))
        try:
            merge.execute()
        except Exception as err:
            conflict = _native_conflict(err, uri, "merge")
            if conflict is None:
                raise
            raise conflict from err
        finally:
            if previous is None:
                self.spark.conf.unset(conf_key)
            else:
                self.spark.conf.set(conf_key, previous)
        return self._native_result(uri, write_id, "merge")

    @staticmethod
    def _native_result(uri: str, write_id: str, mode: str) -> WriteResult:
        """The commit this write made, found by its write id (not "the latest": a concurrent
        writer may have committed after it), with Delta's own file and row counts."""
        table = open_table(uri)
        commit = _find_commit(uri, write_id)
        if commit is None:
            # Delta committed nothing (an append of no rows to an existing table): a no-op,
            # as with delta-rs; the table keeps its version.
            return WriteResult(uri, table.version(), "native", mode, 0, 0)
        metrics = commit.get("operationMetrics") or {}
        files = metrics.get("numFiles", metrics.get("numTargetFilesAdded", 0))
        return WriteResult(uri, int(commit["version"]), "native", mode, int(files or 0),
                           int(metrics.get("numOutputRows", 0) or 0))

    # delta-rs engine -----------------------------------------------------
    def _stage_files(self, df, uri, mode, partition_by, replace_where, exists, read_version,
                     options=None) -> StagedWrite:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
        folder = f"{_STAGING_PREFIX}{stamp}-{uuid.uuid4().hex[:12]}"
        staging_uri = f"{uri}/{folder}"
        writer = df.write.mode("errorifexists").option("maxRecordsPerFile", self.max_records_per_file)
        writer = writer.options(**(options or {}))
        if partition_by:
            writer = writer.partitionBy(*partition_by)
        try:
            writer.parquet(_spark_path(staging_uri))
            adds = _add_actions_for_folder(uri, folder, partition_by)
        except BaseException:
            _remove_folder(staging_uri)  # files already moved out are unreferenced: harmless
            raise
        return StagedWrite(
            table_uri=uri,
            folder=folder,
            schema_json=df.schema.json(),
            mode=mode,
            partition_by=partition_by,
            replace_where=replace_where,
            adds=adds,
            table_existed=exists,
            read_version=read_version,
        )

    def commit_staged(self, staged: StagedWrite) -> WriteResult:
        """Second half of a delta-rs write: ONE transaction that adds every staged file.

        On any failure the staged folder is removed and the table stays at its old version.
        """
        from deltalake import DeltaTable, Schema
        from deltalake.exceptions import CommitFailedError
        from deltalake.transaction import CommitProperties, create_table_with_add_actions

        uri = staged.table_uri
        location = deltars_location(uri)
        if staged.table_existed and staged.mode == "append" and not staged.adds and not staged.removes:
            # Nothing to add: no commit (Delta's own writer makes none either), same version.
            return WriteResult(uri, DeltaTable(location).version(), "delta-rs", "append", 0, 0)
        schema = Schema.from_json(staged.schema_json)
        replaced = _replaced_partitions(staged)
        filters = None
        if replaced:
            filters = [(col, "in", vals) for col, vals in replaced.items()]
        write_id = uuid.uuid4().hex  # finds this write's own commit afterwards (another may land right after)
        app_transactions = None
        if staged.app_transaction is not None:
            from deltalake.transaction import Transaction

            app_transactions = [Transaction(*staged.app_transaction)]
        props = CommitProperties(custom_metadata={"towerlake.writer": "spark+delta-rs", "towerlake.write_id": write_id},
                                 max_commit_retries=0 if staged.exclusive else 3, app_transactions=app_transactions)
        try:
            if not staged.table_existed:
                try:
                    create_table_with_add_actions(
                        location, schema, staged.adds, mode="error",
                        partition_by=staged.partition_by or None, commit_properties=props,
                    )
                except Exception as err:
                    if not table_exists(uri) or "exist" not in str(err).lower():
                        raise
                    # Another writer created the table first: append may go on top of it;
                    # an overwrite planned against "no table" has lost the race.
                    if staged.mode != "append":
                        raise CommitConflictError(
                            f"{uri} was created by a concurrent writer while this overwrite was being "
                            "written: nothing of this write was committed; re-run the job"
                        ) from err
                    self._commit_existing(DeltaTable(location), staged, schema, None, props)
            else:
                table = DeltaTable(location, version=staged.read_version)
                self._commit_existing(table, staged, schema, filters, props)
        except CommitFailedError as err:
            _remove_uncommitted(uri, staged.folder, staged.adds)
            raise CommitConflictError(
                f"concurrent write to {uri} conflicts with this {staged.mode} (planned against version "
                f"{staged.read_version}): nothing of this write was committed; re-run the job. "
                f"delta-rs said: {err}"
            ) from err
        except BaseException:
            _remove_uncommitted(uri, staged.folder, staged.adds)
            raise
        version = _own_commit_version(uri, write_id)
        return WriteResult(
            table_uri=uri,
            version=version,
            engine="delta-rs",
            mode=staged.mode,
            files_added=len(staged.adds),
            rows_written=sum(_rows_of(a) for a in staged.adds),
            replaced_partitions=replaced,
        )

    @staticmethod
    def _commit_existing(table, staged, schema, filters, props) -> None:
        table.create_write_transaction(
            [*staged.adds, *staged.removes],
            staged.mode,
            schema,
            partition_by=staged.partition_by or None,
            partition_filters=filters,
            commit_properties=props,
        )


@dataclass(frozen=True)
class StagedWrite:
    """Data files written into the table folder (``adds``), not yet named by the Delta log."""

    table_uri: str
    folder: str
    schema_json: str
    mode: str
    partition_by: list[str]
    replace_where: ReplaceWhere
    adds: list
    table_existed: bool
    read_version: int | None
    removes: tuple = ()  # RemoveActions committed with the adds (upsert)
    # (app id, version): a Delta application transaction (``txn`` action) the commit carries;
    # a concurrent commit carrying the same app id makes this one fail (both engines check it).
    app_transaction: tuple[str, int] | None = None
    # True: commit exactly on top of read_version or fail with CommitConflictError (no retry
    # over a concurrent commit, even a compatible one such as another append).
    exclusive: bool = False


def native_delta_available(spark: SparkSession) -> bool:
    """True when Spark can read/write ``format("delta")`` itself (jars + session extension)."""
    extensions = spark.conf.get("spark.sql.extensions", "") or ""
    if "DeltaSparkSessionExtension" not in extensions:
        return False
    jvm = spark.sparkContext._jvm
    try:
        # spark.jars load into Spark's own class loader, which Class.forName does not search.
        jvm.java.lang.Thread.currentThread().getContextClassLoader().loadClass(_NATIVE_CLASS)
    except Exception:
        return False
    return True


def check_schema_compatible(existing: StructType, incoming: StructType, uri: str) -> None:
    """Raise ``SchemaMismatchError`` naming every missing, extra or retyped column."""
    have = {f.name: f.dataType.simpleString() for f in existing.fields}
    got = {f.name: f.dataType.simpleString() for f in incoming.fields}
    missing = [c for c in have if c not in got]
    extra = [c for c in got if c not in have]
    retyped = [f"{c} ({have[c]} in table, {got[c]} in write)" for c in have if c in got and have[c] != got[c]]
    if missing or extra or retyped:
        parts = []
        if missing:
            parts.append(f"missing columns {missing}")
        if extra:
            parts.append(f"unexpected columns {extra}")
        if retyped:
            parts.append("type changes " + ", ".join(retyped))
        raise SchemaMismatchError(
            f"write does not match the schema of {uri}: " + "; ".join(parts)
            + ". Fix the input (or overwrite the whole table with overwrite_schema=True)"
        )


# --------------------------------------------------------------------- helpers
# Delta's optimistic-concurrency failures (io.delta.exceptions.*, all DeltaConcurrentModification-
# Exception) by class and error-class name: the commit did not happen, a re-run is safe.
_NATIVE_CONFLICTS = (
    "ConcurrentAppendException", "ConcurrentDeleteReadException", "ConcurrentDeleteDeleteException",
    "ConcurrentWriteException", "ConcurrentTransactionException", "MetadataChangedException",
    "ProtocolChangedException", "DELTA_CONCURRENT_", "DELTA_METADATA_CHANGED", "DELTA_PROTOCOL_CHANGED",
)
_COMMIT_SCAN = 100  # newest commits searched for a write's own commit


def _native_conflict(err: Exception, uri: str, mode: str) -> CommitConflictError | None:
    """The same ``CommitConflictError`` delta-rs conflicts give, for a Delta (JVM) conflict."""
    text = str(err)
    marker = next((m for m in _NATIVE_CONFLICTS if m in text), None)
    if marker is None:
        return None
    said = next((line.strip() for line in text.splitlines() if marker in line), marker)
    return CommitConflictError(
        f"concurrent write to {uri} conflicts with this {mode}: nothing of this write was committed; "
        f"re-run the job. Delta said: {said[:400]}"
    )


def _user_metadata(write_id: str) -> str:
    import json

    return json.dumps({"towerlake.writer": "spark-native", "towerlake.write_id": write_id})


def _find_commit(uri: str, write_id: str) -> dict | None:
    """The commit whose commitInfo carries ``write_id`` (in ``userMetadata`` for Delta's own
    writer, as ``towerlake.write_id`` for delta-rs), with its ``version``; None when absent.

    Read from the log files themselves, newest first: a commit's version is its file name.
    (delta-rs' ``history()`` numbers its entries by counting back from a latest version it
    reads separately, so under a concurrent commit every number can be off by one:
    delta-io/delta-rs#4488.)
    """
    import json

    import pyarrow.fs as pafs

    fs, log_dir = pafs.FileSystem.from_uri(f"{uri}/_delta_log")
    versions = sorted(
        (int(info.base_name[:-5]) for info in fs.get_file_info(pafs.FileSelector(log_dir))
         if info.base_name.endswith(".json") and info.base_name[:-5].isdigit()),
        reverse=True,
    )
    for version in versions[:_COMMIT_SCAN]:
        with fs.open_input_stream(f"{log_dir}/{version:020d}.json") as handle:
            lines = handle.read().decode("utf-8").splitlines()
        for line in lines:
            info = json.loads(line).get("commitInfo") if line.strip() else None
            if info is None:
                continue
            if info.get("towerlake.write_id") == write_id or write_id in (info.get("userMetadata") or ""):
                return {**info, "version": version}
    return None


def _commit_partitions(uri: str, version: int, partition_by: list[str]) -> dict[str, list[str]]:
    """Partition values of the files one commit added (read from its log entry)."""
    import json

    import pyarrow.fs as pafs

    fs, path = pafs.FileSystem.from_uri(f"{uri}/_delta_log/{version:020d}.json")
    with fs.open_input_stream(path) as handle:
        lines = handle.read().decode("utf-8").splitlines()
    values: dict[str, set] = {c: set() for c in partition_by}
    for line in lines:
        add = json.loads(line).get("add") if line.strip() else None
        if add:
            for col in partition_by:
                values[col].add(add["partitionValues"].get(col))
    return {c: sorted(v for v in vals if v is not None) for c, vals in values.items()}


def _json(text: str) -> dict:
    import json

    return json.loads(text)


def _spark_path(uri: str) -> str:
    """Spark takes ``file:///x`` as well as ``file:/x``; keep the URI, it is unambiguous."""
    return uri


def _with_seconds(result: WriteResult, seconds: float) -> WriteResult:
    return replace(result, seconds=seconds)


def _remove_action(table_uri: str, file_location: str):
    """RemoveAction for a snapshot file (given as resolve_snapshot lists it)."""
    import os

    from deltalake.transaction import RemoveAction

    local = to_local_path(table_uri)
    path = file_location.removeprefix("file://")
    relative = os.path.relpath(path, local) if local is not None else file_location[len(table_uri) + 1:]
    size = os.path.getsize(path) if local is not None else None
    return RemoveAction(path=relative, data_change=True, deletion_timestamp=int(time.time() * 1000), size=size)


def _rows_of(add) -> int:
    import json

    return int(json.loads(add.stats).get("numRecords", 0))


def _partition_string(value) -> str | None:
    """Delta stores partition values as strings: dates ISO, timestamps 'YYYY-MM-DD HH:MM:SS'."""
    if value is None:
        return None
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S.%f")
    if isinstance(value, date):
        return value.isoformat()
    return str(value)


def _sql_predicate(replace_where: dict[str, list]) -> str:
    clauses = []
    for col, vals in replace_where.items():
        rendered = ", ".join("NULL" if v is None else "'" + str(_partition_string(v)).replace("'", "''") + "'"
                             for v in vals)
        clauses.append(f"`{col}` IN ({rendered})")
    return " AND ".join(clauses)


def _replaced_partitions(staged: StagedWrite) -> dict[str, list[str]] | None:
    if staged.replace_where is None or not staged.table_existed:
        return None
    if staged.replace_where == "dynamic":
        # The partitions present in the staged files; a dynamic overwrite of nothing replaces nothing.
        values: dict[str, set] = {c: set() for c in staged.partition_by}
        for add in staged.adds:
            for col in staged.partition_by:
                values[col].add(add.partition_values[col])
        if not staged.adds:
            return {c: [] for c in staged.partition_by}
        if len(staged.partition_by) > 1:
            raise ValueError("replace_where='dynamic' supports tables with one partition column")
        return {c: sorted(v for v in vals if v is not None) for c, vals in values.items()}
    return {c: [_partition_string(v) for v in vals] for c, vals in staged.replace_where.items()}


def _add_actions_for_folder(table_uri: str, folder: str, partition_by: list[str]) -> list:
    """Move the Parquet files Spark wrote under ``folder`` into the table's own layout and
    return one AddAction per file, with stats read from its footer.

    Files land at ``<table>/<col=value>/part-....parquet`` (Spark's file names are unique per
    write), the standard hive-style Delta layout, so any reader that parses partition folders
    from a file list (Spark with ``basePath``, DuckDB, pyarrow) gets the partition columns.
    The log does not name them until the commit, so until then no reader sees them.
    """
    import pyarrow.fs as pafs
    from deltalake.transaction import AddAction

    fs, folder_path = pafs.FileSystem.from_uri(f"{table_uri}/{folder}")
    table_root = folder_path[: -len(folder)].rstrip("/")
    infos = fs.get_file_info(pafs.FileSelector(folder_path, recursive=True))
    adds = []
    for info in infos:
        name = info.path.rsplit("/", 1)[-1]
        if info.type != pafs.FileType.File or not name.endswith(".parquet") or name.startswith((".", "_")):
            continue
        inside = info.path[len(folder_path) + 1 :]
        partition_values = _partition_values_from_path(inside, partition_by)
        target = f"{table_root}/{inside}"
        parent = target.rsplit("/", 1)[0]
        if parent != table_root:
            fs.create_dir(parent, recursive=True)
        fs.move(info.path, target)
        stats = _parquet_stats(fs, target)
        adds.append(
            AddAction(
                path=inside,  # delta-rs takes the raw relative path and URI-encodes it in the log
                size=int(info.size),
                partition_values=partition_values,
                modification_time=int(info.mtime_ns // 1_000_000) if info.mtime_ns else int(time.time() * 1000),
                data_change=True,
                stats=stats,
            )
        )
    fs.delete_dir(folder_path)
    return adds


def _remove_uncommitted(table_uri: str, staged_folder: str, adds: list) -> None:
    """Best-effort removal of files written for a write that did not commit."""
    _remove_folder(f"{table_uri}/{staged_folder}")
    local = to_local_path(table_uri)
    for add in adds:
        try:
            if local is not None:
                import os

                os.remove(f"{local}/{add.path}")
            else:
                import pyarrow.fs as pafs

                fs, path = pafs.FileSystem.from_uri(f"{table_uri}/{quote(add.path)}")
                fs.delete_file(path)
        except Exception as err:  # cleanup must never hide the original failure
            log.warning("could not remove uncommitted file %s: %s", add.path, err)


def _partition_values_from_path(relative: str, partition_by: list[str]) -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    for segment in relative.split("/")[:-1]:
        if "=" in segment:
            if "%" in segment:
                # Spark escaped a character (/ : % # ...) that Hadoop paths cannot carry through
                # a file list unchanged; refuse before anything is committed.
                raise ValueError(
                    f"partition folder {segment!r}: partition values may not contain characters that "
                    "Spark escapes in paths (/ : % # ? and control characters); partition by a date, "
                    "a number or a plain string"
                )
            key, _, raw = segment.partition("=")
            value = unquote(raw)
            found[unquote(key)] = None if value == "__HIVE_DEFAULT_PARTITION__" else value
    missing = [c for c in partition_by if c not in found]
    if missing:
        raise RuntimeError(f"Spark wrote {relative} without partition folder(s) for {missing}")
    return {c: found[c] for c in partition_by}


def _parquet_stats(fs, path: str) -> str:
    """numRecords plus min/max/nullCount of every top-level primitive column, from the footer."""
    import pyarrow.parquet as pq

    with fs.open_input_file(path) as handle:
        meta = pq.ParquetFile(handle).metadata
    schema = meta.schema.to_arrow_schema()
    mins: dict = {}
    maxs: dict = {}
    nulls: dict = {}
    top_level = {name: i for i, name in enumerate(schema.names)}
    for name, _index in top_level.items():
        arrow_type = schema.field(name).type
        if not _stats_supported(arrow_type):
            continue
        col_positions = [
            c for c in range(meta.num_columns) if meta.row_group(0).column(c).path_in_schema == name
        ] if meta.num_row_groups else []
        if not col_positions:
            continue
        pos = col_positions[0]
        lo = hi = None
        null_total = 0
        complete = True
        for rg in range(meta.num_row_groups):
            stat = meta.row_group(rg).column(pos).statistics
            if stat is None:
                complete = False
                break
            null_total += stat.null_count or 0
            if stat.has_min_max:
                lo = stat.min if lo is None else min(lo, stat.min)
                hi = stat.max if hi is None else max(hi, stat.max)
        if not complete:
            continue
        nulls[name] = null_total
        if lo is not None:
            mins[name] = _stat_value(lo, arrow_type)
            maxs[name] = _stat_value(hi, arrow_type, round_up=True)
            if mins[name] is None or maxs[name] is None:
                del mins[name], maxs[name]
    return stats_json(meta.num_rows, mins, maxs, nulls)


def _stats_supported(arrow_type) -> bool:
    import pyarrow as pa

    t = pa.types
    return (
        t.is_integer(arrow_type) or t.is_floating(arrow_type) or t.is_string(arrow_type)
        or t.is_large_string(arrow_type) or t.is_date(arrow_type) or t.is_timestamp(arrow_type)
        or t.is_boolean(arrow_type)
    )


def _stat_value(value, arrow_type, round_up: bool = False):
    import pyarrow as pa

    if pa.types.is_timestamp(arrow_type):
        if isinstance(value, datetime):
            if value.tzinfo is None:
                value = value.replace(tzinfo=UTC)
            # Delta's stats format for timestamps is UTC at millisecond precision; a max is
            # rounded UP so that data skipping never skips a file holding the true maximum.
            if round_up and value.microsecond % 1000:
                from datetime import timedelta

                value = value + timedelta(microseconds=1000 - value.microsecond % 1000)
            return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
        return None
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, float) and value != value:  # NaN is not valid JSON
        return None
    return value


def _remove_folder(uri: str) -> None:
    """Best-effort removal of an uncommitted staging folder (readers never see it anyway)."""
    import shutil

    local = to_local_path(uri)
    try:
        if local is not None:
            shutil.rmtree(local, ignore_errors=True)
        else:
            import pyarrow.fs as pafs

            fs, path = pafs.FileSystem.from_uri(uri)
            fs.delete_dir(path)
    except Exception as err:  # cleanup must never hide the original failure
        log.warning("could not remove uncommitted files at %s: %s", uri, err)


def _own_commit_version(uri: str, write_id: str) -> int:
    """The version of the commit tagged ``write_id``: a concurrent writer may commit right
    after ours, so the table's latest version is not necessarily this write's."""
    commit = _find_commit(uri, write_id)
    if commit is None:
        raise CommitConflictError(
            f"{uri}: the commit of this write (write id {write_id}) is not among the newest "
            f"{_COMMIT_SCAN} log entries; check the table's history before re-running"
        )
    return int(commit["version"])
