"""The Delta storage layer, once per engine (the ``delta_io`` fixture: native delta-spark and
delta-rs): exact rows through every read path, atomic commits, conflicts, time travel."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.spark

SCHEMA = "user_id string, n long, ts timestamp, event_date date, tags array<string>, x double"


def _rows(n: int, offset: int = 0) -> list[tuple]:
    """Literal rows over three event dates; ts whole seconds, tags of length 0..2."""
    out = []
    for i in range(offset, offset + n):
        day = dt.date(2026, 1, 1 + i % 3)
        ts = dt.datetime(2026, 1, 1 + i % 3, 12, 0, i % 60, tzinfo=dt.UTC)
        out.append((f"u{i % 5}", i, ts, day, ["a", "b"][: i % 3], 1.5 * i))
    return out


def _key(row) -> tuple:
    """Comparable form of a row from any reader (Spark Row, dict, tuple)."""
    if hasattr(row, "asDict"):
        row = row.asDict()
    if isinstance(row, dict):
        row = (row["user_id"], row["n"], row["ts"], row["event_date"], row["tags"], row["x"])
    user, n, ts, day, tags, x = row
    if hasattr(ts, "to_pydatetime"):
        ts = ts.to_pydatetime()
    if ts.tzinfo is None:  # Spark returns naive datetimes in the session time zone (UTC here)
        ts = ts.replace(tzinfo=dt.UTC)
    if hasattr(day, "date") and not isinstance(day, dt.date):
        day = day.date()
    return (user, int(n), ts, day, tuple(tags) if tags is not None else None, float(x))


def _expected(rows) -> list[tuple]:
    return sorted(_key(r) for r in rows)


def _df(spark, rows):
    return spark.createDataFrame(rows, SCHEMA)


def _read_all_paths(spark, io, uri, version=None) -> dict[str, list[tuple]]:
    """The same snapshot through Spark, delta-rs, pyarrow on the file list, and DuckDB."""
    import duckdb

    from lake_contract.delta_snapshot import read_snapshot_arrow, read_table_deltars, resolve_snapshot

    snapshot = resolve_snapshot(uri, version)
    spark_rows = io.read_table(uri, version).collect()
    deltars_rows = read_table_deltars(uri, version).to_pylist()
    arrow_rows = read_snapshot_arrow(snapshot).to_pylist()
    files = [f.removeprefix("file://") for f in snapshot.files]
    duck = duckdb.sql(
        f"SELECT user_id, n, ts, event_date, tags, x FROM read_parquet({files!r}, hive_partitioning = true)"
    ).fetchall() if files else []
    duck = [(u, n, ts.astimezone(dt.UTC) if ts.tzinfo else ts, day if isinstance(day, dt.date) else
             dt.date.fromisoformat(str(day)), tags, x) for u, n, ts, day, tags, x in duck]
    return {
        "spark": sorted(_key(r) for r in spark_rows),
        "delta-rs": sorted(_key(r) for r in deltars_rows),
        "pyarrow": sorted(_key(r) for r in arrow_rows),
        "duckdb": sorted(_key(r) for r in duck),
    }


def _rendezvous_udf(marker_dir: Path, me: str, other: str):
    """A UDF that returns its input once writer ``other``'s Spark job is running too: both
    writes have then planned against the same table version before either commits."""
    from pyspark.sql import functions as F
    from pyspark.sql.types import LongType

    def wait_for_other(n):
        (marker_dir / me).touch()
        deadline = time.monotonic() + 120
        while not (marker_dir / other).exists():
            if time.monotonic() > deadline:
                raise RuntimeError(f"writer {other} never started: the race could not be staged")
            time.sleep(0.05)
        return n

    return F.udf(wait_for_other, LongType())


def _race(spark, io, uri, mode, tmp_path) -> dict:
    """Two writers of 3 rows each (offsets 10 and 20) started together; their outcomes."""
    from pyspark.sql import functions as F

    markers = tmp_path / "markers"
    markers.mkdir()
    outcome: dict = {}

    def write(name, other, offset):
        frame = _df(spark, _rows(3, offset=offset)).coalesce(1)
        frame = frame.withColumn("n", _rendezvous_udf(markers, name, other)(F.col("n")))
        try:
            outcome[name] = io.write_table(frame, uri, mode=mode, partition_by=["event_date"])
        except Exception as err:  # the loser's error is the assertion's subject
            outcome[name] = err

    threads = [threading.Thread(target=write, args=("a", "b", 10)), threading.Thread(target=write, args=("b", "a", 20))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert set(outcome) == {"a", "b"}, "a writer thread did not finish"
    return outcome


def test_engine_resolution_and_session_conf(spark, tmp_path, monkeypatch):
    from jobs.spark_context import delta_session_conf
    from lake_contract.errors import TowerlakeError
    from spark_features.delta_io import DeltaLakeIO, native_delta_available

    with pytest.raises(ValueError, match="engine must be one of"):
        DeltaLakeIO(spark, engine="parquet")
    assert DeltaLakeIO(spark, engine="delta-rs").resolved_engine == "delta-rs"
    if native_delta_available(spark):
        assert DeltaLakeIO(spark).resolved_engine == "native"
    else:
        assert DeltaLakeIO(spark).resolved_engine == "delta-rs"
        with pytest.raises(TowerlakeError, match="delta-spark jars are not on Spark's classpath"):
            DeltaLakeIO(spark, engine="native")

    jars = tmp_path / "jars"
    jars.mkdir()
    monkeypatch.setenv("TOWERLAKE_JARS", str(jars))
    monkeypatch.setenv("TOWERLAKE_DELTA_ENGINE", "auto")
    assert delta_session_conf({}) == {}  # no jars: plain Spark, delta-rs
    (jars / "delta-spark_2.13-4.0.1.jar").touch()
    assert delta_session_conf({}) == {}  # half the jars is no jars
    (jars / "delta-storage-4.0.1.jar").touch()
    conf = delta_session_conf({"spark.jars": "/x/other.jar"})
    assert conf["spark.jars"] == f"/x/other.jar,{jars}/delta-spark_2.13-4.0.1.jar,{jars}/delta-storage-4.0.1.jar"
    assert conf["spark.sql.extensions"] == "io.delta.sql.DeltaSparkSessionExtension"
    assert conf["spark.sql.catalog.spark_catalog"] == "org.apache.spark.sql.delta.catalog.DeltaCatalog"
    assert conf["spark.databricks.delta.properties.defaults.enableDeletionVectors"] == "false"
    monkeypatch.setenv("TOWERLAKE_DELTA_ENGINE", "delta-rs")
    assert delta_session_conf({}) == {}  # the old behaviour: no Delta classes at all
    monkeypatch.setenv("TOWERLAKE_DELTA_ENGINE", "fast")
    with pytest.raises(ValueError, match="TOWERLAKE_DELTA_ENGINE must be"):
        delta_session_conf({})


def test_write_reads_back_identically_through_every_reader(spark, delta_io, tmp_path):
    uri = str(tmp_path / "t")
    result = delta_io.write_table(_df(spark, _rows(30)), uri, partition_by=["event_date"])
    assert (result.version, result.rows_written, result.engine) == (0, 30, delta_io.resolved_engine)
    for name, got in _read_all_paths(spark, delta_io, uri).items():
        assert got == _expected(_rows(30)), f"{name} read differs"


def test_add_actions_carry_exact_row_counts_and_min_max_stats(spark, delta_io, tmp_path):
    uri = str(tmp_path / "t")
    result = delta_io.write_table(_df(spark, _rows(30)).coalesce(1), uri, partition_by=["event_date"])
    log_lines = (Path(uri) / "_delta_log" / f"{0:020d}.json").read_text().splitlines()
    adds = [json.loads(line)["add"] for line in log_lines if '"add"' in line]
    assert result.files_added == len(adds) == 3
    by_date: dict[str, list[tuple]] = {}
    for r in _rows(30):
        by_date.setdefault(r[3].isoformat(), []).append(r)
    assert sorted(a["partitionValues"]["event_date"] for a in adds) == sorted(by_date)
    for add in adds:
        part = by_date[add["partitionValues"]["event_date"]]
        stats = json.loads(add["stats"])
        assert add["size"] == (Path(uri) / add["path"]).stat().st_size
        assert stats["numRecords"] == len(part)
        assert stats["minValues"]["n"] == min(r[1] for r in part)
        assert stats["maxValues"]["n"] == max(r[1] for r in part)
        assert stats["minValues"]["user_id"] == min(r[0] for r in part)
        assert stats["maxValues"]["ts"].startswith(max(r[2] for r in part).strftime("%Y-%m-%dT%H:%M:%S.000"))
        assert {k: stats["nullCount"][k] for k in ("user_id", "n", "ts", "x")} == {"user_id": 0, "n": 0, "ts": 0, "x": 0}


def test_time_travel_overwrite_and_history(spark, delta_io, tmp_path):
    from lake_contract.delta_snapshot import table_history

    uri = str(tmp_path / "t")
    delta_io.write_table(_df(spark, _rows(30)), uri, partition_by=["event_date"])
    second = delta_io.write_table(_df(spark, _rows(4, offset=100)), uri, partition_by=["event_date"])
    assert (second.version, second.rows_written) == (1, 4)
    assert _read_all_paths(spark, delta_io, uri)["spark"] == _expected(_rows(4, offset=100))
    for name, got in _read_all_paths(spark, delta_io, uri, version=0).items():
        assert got == _expected(_rows(30)), name
    history = table_history(uri)
    assert [h["version"] for h in history] == [1, 0]


def test_full_overwrite_of_a_partitioned_table_drops_partitions_the_data_lacks(spark, delta_io, tmp_path):
    # The session's partitionOverwriteMode is dynamic (Parquet writes); a full overwrite must
    # still replace the whole table on both engines.
    uri = str(tmp_path / "t")
    delta_io.write_table(_df(spark, _rows(30)), uri, partition_by=["event_date"])
    day1 = [r for r in _rows(6, offset=40) if r[3] == dt.date(2026, 1, 1)]
    delta_io.write_table(_df(spark, day1), uri, partition_by=["event_date"])
    assert _read_all_paths(spark, delta_io, uri)["delta-rs"] == _expected(day1)


def test_replace_where_replaces_exactly_the_named_partition(spark, delta_io, tmp_path):
    uri = str(tmp_path / "t")
    delta_io.write_table(_df(spark, _rows(30)), uri, partition_by=["event_date"])
    new_day2 = [r for r in _rows(5, offset=200) if r[3] == dt.date(2026, 1, 2)]
    result = delta_io.write_table(
        _df(spark, new_day2), uri, partition_by=["event_date"],
        replace_where={"event_date": [dt.date(2026, 1, 2)]},
    )
    assert result.replaced_partitions == {"event_date": ["2026-01-02"]}
    assert (result.version, result.rows_written) == (1, len(new_day2))
    kept = [r for r in _rows(30) if r[3] != dt.date(2026, 1, 2)]
    for name, got in _read_all_paths(spark, delta_io, uri).items():
        assert got == _expected(kept + new_day2), name


def test_dynamic_replace_touches_only_partitions_present_in_the_data(spark, delta_io, tmp_path):
    uri = str(tmp_path / "t")
    delta_io.write_table(_df(spark, _rows(30)), uri, partition_by=["event_date"])
    new_rows = [r for r in _rows(9, offset=300) if r[3] == dt.date(2026, 1, 3)]
    result = delta_io.write_table(_df(spark, new_rows), uri, partition_by=["event_date"], replace_where="dynamic")
    assert result.replaced_partitions == {"event_date": ["2026-01-03"]}
    kept = [r for r in _rows(30) if r[3] != dt.date(2026, 1, 3)]
    assert _read_all_paths(spark, delta_io, uri)["spark"] == _expected(kept + new_rows)


def test_append_adds_rows_and_mismatched_schema_names_the_columns(spark, delta_io, tmp_path):
    from lake_contract.errors import SchemaMismatchError

    uri = str(tmp_path / "t")
    delta_io.write_table(_df(spark, _rows(6)), uri, partition_by=["event_date"])
    appended = delta_io.write_table(_df(spark, _rows(6, offset=50)), uri, mode="append", partition_by=["event_date"])
    assert (appended.version, appended.rows_written) == (1, 6)
    for name, got in _read_all_paths(spark, delta_io, uri).items():
        assert got == _expected(_rows(6) + _rows(6, offset=50)), name

    bad = _df(spark, _rows(3)).selectExpr("n AS user_id", "n AS count", "ts", "event_date", "tags")
    with pytest.raises(SchemaMismatchError) as err:
        delta_io.write_table(bad, uri, mode="append", partition_by=["event_date"])
    message = str(err.value)
    assert "missing columns ['n', 'x']" in message
    assert "unexpected columns ['count']" in message
    assert "user_id (string in table, bigint in write)" in message
    assert delta_io.read_table(uri).count() == 12  # nothing was written


def test_empty_append_is_a_no_op(spark, delta_io, tmp_path):
    from lake_contract.delta_snapshot import table_version

    uri = str(tmp_path / "t")
    delta_io.write_table(_df(spark, _rows(6)), uri, partition_by=["event_date"])
    result = delta_io.write_table(_df(spark, []), uri, mode="append", partition_by=["event_date"])
    assert (result.version, result.rows_written, result.files_added) == (0, 0, 0)
    assert table_version(uri) == 0
    assert _read_all_paths(spark, delta_io, uri)["delta-rs"] == _expected(_rows(6))


def test_failure_inside_the_write_leaves_previous_version(spark, delta_io, tmp_path):
    from pyspark.sql import functions as F
    from pyspark.sql.types import LongType

    from lake_contract.delta_snapshot import table_version

    uri = str(tmp_path / "t")
    delta_io.write_table(_df(spark, _rows(30)), uri, partition_by=["event_date"])
    files_before = sorted(str(p) for p in Path(uri).rglob("*.parquet"))

    def crash_on_last(n):
        if n == 509:
            raise RuntimeError("injected: task died while writing")
        return n

    # Three tasks: the other two write their files before the job fails.
    frame = _df(spark, _rows(10, offset=500)).repartition(3)
    frame = frame.withColumn("n", F.udf(crash_on_last, LongType())(F.col("n")))
    with pytest.raises(Exception, match="injected"):
        delta_io.write_table(frame, uri, mode="append", partition_by=["event_date"])

    assert table_version(uri) == 0
    for name, got in _read_all_paths(spark, delta_io, uri).items():
        assert got == _expected(_rows(30)), name
    if delta_io.resolved_engine == "delta-rs":
        # The uncommitted files were cleaned up; the committed ones are untouched. (Delta
        # leaves a failed job's files unreferenced, for VACUUM; no reader sees them.)
        assert sorted(str(p) for p in Path(uri).rglob("*.parquet")) == files_before


def test_deltars_failure_between_files_and_commit_leaves_previous_version(spark, tmp_path, monkeypatch):
    import deltalake

    from lake_contract.delta_snapshot import table_version
    from spark_features.delta_io import DeltaLakeIO

    io = DeltaLakeIO(spark, engine="delta-rs")
    uri = str(tmp_path / "t")
    io.write_table(_df(spark, _rows(30)), uri, partition_by=["event_date"])
    files_before = sorted(str(p) for p in Path(uri).rglob("*.parquet"))

    def crash(*args, **kwargs):
        raise RuntimeError("injected: driver died before the commit")

    monkeypatch.setattr(deltalake.DeltaTable, "create_write_transaction", crash)
    with pytest.raises(RuntimeError, match="injected"):
        io.write_table(_df(spark, _rows(5, offset=500)), uri, mode="append", partition_by=["event_date"])
    monkeypatch.undo()

    assert table_version(uri) == 0
    for name, got in _read_all_paths(spark, io, uri).items():
        assert got == _expected(_rows(30)), name
    assert sorted(str(p) for p in Path(uri).rglob("*.parquet")) == files_before


def test_concurrent_appends_both_commit(spark, delta_io, tmp_path):
    uri = str(tmp_path / "t")
    delta_io.write_table(_df(spark, _rows(6)), uri, partition_by=["event_date"])
    outcome = _race(spark, delta_io, uri, "append", tmp_path)
    assert sorted(r.version for r in outcome.values()) == [1, 2], outcome
    for name, got in _read_all_paths(spark, delta_io, uri).items():
        assert got == _expected(_rows(6) + _rows(3, offset=10) + _rows(3, offset=20)), name


def test_concurrent_overwrites_loser_fails_with_conflict_and_leaves_no_trace(spark, delta_io, tmp_path):
    from lake_contract.delta_snapshot import resolve_snapshot
    from lake_contract.errors import CommitConflictError
    from spark_features.delta_io import WriteResult

    uri = str(tmp_path / "t")
    delta_io.write_table(_df(spark, _rows(6)), uri, partition_by=["event_date"])
    before = {os.path.basename(f) for f in resolve_snapshot(uri).files}
    outcome = _race(spark, delta_io, uri, "overwrite", tmp_path)
    winners = [name for name, r in outcome.items() if isinstance(r, WriteResult)]
    assert len(winners) == 1, outcome
    loser = outcome["b" if winners == ["a"] else "a"]
    assert isinstance(loser, CommitConflictError), repr(loser)
    assert "concurrent write to" in str(loser) and "nothing of this write was committed" in str(loser)
    assert outcome[winners[0]].version == 1
    winner_rows = _rows(3, offset=10 if winners == ["a"] else 20)
    for name, got in _read_all_paths(spark, delta_io, uri).items():
        assert got == _expected(winner_rows), name
    committed = {os.path.basename(f) for f in resolve_snapshot(uri).files}
    assert committed.isdisjoint(before)
    if delta_io.resolved_engine == "delta-rs":  # the loser's files were removed
        on_disk = {p.name for p in Path(uri).rglob("*.parquet")}
        assert on_disk == committed | before  # version 0's files stay for time travel


def test_partition_values_with_spaces_and_nulls_roundtrip(spark, delta_io, tmp_path):
    from lake_contract.delta_snapshot import read_snapshot_arrow, read_table_deltars, resolve_snapshot

    uri = str(tmp_path / "t")
    rows = [("a b-c.d", 1), ("plain", 2), (None, 3)]
    delta_io.write_table(spark.createDataFrame(rows, "k string, v long"), uri, partition_by=["k"])
    assert sorted((tuple(r) for r in delta_io.read_table(uri).collect()), key=lambda r: r[1]) == rows
    assert sorted(((r["k"], r["v"]) for r in read_table_deltars(uri).to_pylist()), key=lambda r: r[1]) == rows
    arrow = read_snapshot_arrow(resolve_snapshot(uri)).to_pylist()
    assert sorted(((r["k"], r["v"]) for r in arrow), key=lambda r: r[1]) == rows


def test_partition_values_that_spark_escapes(spark, delta_io, tmp_path):
    from lake_contract.delta_snapshot import read_table_deltars, table_exists

    uri = str(tmp_path / "t")
    frame = spark.createDataFrame([("a/b:c", 1)], "k string, v long")
    if delta_io.resolved_engine == "delta-rs":
        # Hadoop paths cannot carry Spark's escaped folder names through a file list unchanged.
        with pytest.raises(ValueError, match="partition values may not contain characters"):
            delta_io.write_table(frame, uri, partition_by=["k"])
        assert not table_exists(uri)
    else:  # Delta keeps the value in its log: it round-trips
        delta_io.write_table(frame, uri, partition_by=["k"])
        assert [tuple(r) for r in delta_io.read_table(uri).collect()] == [("a/b:c", 1)]
        assert [(r["k"], r["v"]) for r in read_table_deltars(uri).to_pylist()] == [("a/b:c", 1)]


def test_empty_write_creates_a_readable_empty_table(spark, delta_io, tmp_path):
    uri = str(tmp_path / "t")
    delta_io.write_table(_df(spark, []), uri, partition_by=["event_date"])
    assert delta_io.read_table(uri).count() == 0
    assert delta_io.read_table(uri).schema.simpleString() == _df(spark, []).schema.simpleString()


def test_missing_table_and_version_give_clear_errors(spark, delta_io, tmp_path):
    from lake_contract.errors import TableNotFoundError

    with pytest.raises(TableNotFoundError, match="no Delta table at"):
        delta_io.read_table(str(tmp_path / "nope"))
    uri = str(tmp_path / "t")
    delta_io.write_table(_df(spark, _rows(3)), uri)
    with pytest.raises(TableNotFoundError, match="has no version 7 \\(latest is 0"):
        delta_io.read_table(uri, version=7)


def test_snapshot_module_imports_without_pyspark():
    code = (
        "import sys; import lake_contract.delta_snapshot, lake_contract.lake, lake_contract.errors; "
        "assert 'pyspark' not in sys.modules, 'pyspark imported'; print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ok"


def test_snapshot_file_list_is_what_deltars_lists_and_petastorm_reads_it(spark, delta_io, tmp_path):
    from deltalake import DeltaTable
    from petastorm import make_batch_reader

    from lake_contract.delta_snapshot import resolve_snapshot

    uri = str(tmp_path / "t")
    delta_io.write_table(_df(spark, _rows(30)).repartition(2), uri)
    delta_io.write_table(_df(spark, _rows(6, offset=90)), uri, mode="append")
    snapshot = resolve_snapshot(uri)
    listed = sorted(f.removeprefix("file://") for f in snapshot.files)
    assert listed == sorted(str(Path(f.removeprefix("file://"))) for f in DeltaTable(uri).file_uris())
    assert snapshot.num_rows == 36
    got = []
    with make_batch_reader(list(snapshot.files), schema_fields=["user_id", "n", "x"], num_epochs=1,
                           reader_pool_type="dummy") as reader:
        for batch in reader:
            got += list(zip(batch.user_id.tolist(), batch.n.tolist(), batch.x.tolist(), strict=True))
    expected = sorted((r[0], r[1], r[5]) for r in _rows(30) + _rows(6, offset=90))
    assert sorted(got) == expected


def test_upsert_replaces_matching_keys_inserts_new_ones_and_rewrites_only_touched_files(spark, delta_io, tmp_path):
    from lake_contract.delta_snapshot import resolve_snapshot

    uri = str(tmp_path / "t")
    base = spark.createDataFrame([(i, f"v{i}") for i in range(1, 7)], "id long, v string")
    delta_io.write_table(base.repartition(3, "id"), uri)
    before = resolve_snapshot(uri)
    updates = spark.createDataFrame([(2, "changed"), (7, "new")], "id long, v string")
    result = delta_io.upsert(updates, uri, key=["id"])
    assert (result.version, result.mode, result.engine) == (1, "merge", delta_io.resolved_engine)
    rows = sorted(tuple(r) for r in delta_io.read_table(uri).collect())
    assert rows == [(1, "v1"), (2, "changed"), (3, "v3"), (4, "v4"), (5, "v5"), (6, "v6"), (7, "new")]
    after = resolve_snapshot(uri)
    holder_of_2 = next(
        f for f in before.files if 2 in [r.id for r in spark.read.parquet(f).collect()]
    )
    # Every file that did not hold key 2 is still part of the table, untouched.
    assert set(before.files) - {holder_of_2} <= set(after.files)
    assert holder_of_2 not in after.files
    assert sorted(tuple(r) for r in delta_io.read_table(uri, version=0).collect()) == [(i, f"v{i}") for i in range(1, 7)]

    with pytest.raises(ValueError, match="updates repeat key"):
        delta_io.upsert(spark.createDataFrame([(1, "a"), (1, "b")], "id long, v string"), uri, key=["id"])


@pytest.mark.parametrize("delta_io", ["native"], indirect=True)  # only Spark's Delta writes them
def test_tables_with_deletion_vectors_are_refused_not_misread(spark, delta_io, tmp_path):
    from lake_contract.delta_snapshot import read_table_deltars, resolve_snapshot
    from lake_contract.errors import UnsupportedTableError
    from spark_features.delta_io import DeltaLakeIO

    uri = str(tmp_path / "t")
    spark.createDataFrame([(i,) for i in range(6)], "id long").coalesce(1).write.format("delta") \
        .option("delta.enableDeletionVectors", "true").save(uri)
    spark.sql(f"DELETE FROM delta.`{uri}` WHERE id = 3")
    with pytest.raises(UnsupportedTableError, match="deletionVectors"):
        resolve_snapshot(uri)
    with pytest.raises(UnsupportedTableError, match="deletionVectors"):
        DeltaLakeIO(spark, engine="delta-rs").read_table(uri)
    # Readers that apply them see the right rows.
    assert sorted(r["id"] for r in read_table_deltars(uri).to_pylist()) == [0, 1, 2, 4, 5]
    assert sorted(r["id"] for r in delta_io.read_table(uri).collect()) == [0, 1, 2, 4, 5]
    # Our own writes never make them: a MERGE on a native table stays copy-on-write.
    own = str(tmp_path / "own")
    delta_io.write_table(spark.createDataFrame([(i, "a") for i in range(4)], "id long, v string"), own)
    delta_io.upsert(spark.createDataFrame([(1, "b")], "id long, v string"), own, key=["id"])
    assert sorted((r["id"], r["v"]) for r in read_table_deltars(own).to_pylist()) == [(0, "a"), (1, "b"), (2, "a"), (3, "a")]
    assert len(resolve_snapshot(own).files) >= 1
