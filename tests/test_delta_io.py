"""The Delta storage layer: exact rows through every read path, atomic commits, conflicts."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
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


@pytest.fixture
def io(spark):
    from spark_features.delta_io import DeltaLakeIO

    return DeltaLakeIO(spark)


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


def test_engine_is_delta_rs_without_jars_and_native_request_fails_clearly(spark):
    from lake_contract.errors import TowerlakeError
    from spark_features.delta_io import DeltaLakeIO, native_delta_available

    if native_delta_available(spark):
        pytest.skip("delta-spark jars are on this classpath; the no-jar fallback is not exercised")
    assert DeltaLakeIO(spark).resolved_engine == "delta-rs"
    with pytest.raises(TowerlakeError, match="delta-spark jars are not on Spark's classpath"):
        DeltaLakeIO(spark, engine="native")
    with pytest.raises(ValueError, match="engine must be one of"):
        DeltaLakeIO(spark, engine="parquet")


def test_native_engine_roundtrip(spark, tmp_path):
    from spark_features.delta_io import DeltaLakeIO, native_delta_available

    if not native_delta_available(spark):
        pytest.skip(
            "native Delta engine not testable here: the delta-spark jars are not on Spark's classpath "
            "and cannot be downloaded (no Maven access); on a cluster with the jars this test runs"
        )
    io = DeltaLakeIO(spark, engine="native")
    uri = str(tmp_path / "native")
    io.write_table(_df(spark, _rows(12)), uri, partition_by=["event_date"])
    paths = _read_all_paths(spark, io, uri)
    for name, got in paths.items():
        assert got == _expected(_rows(12)), name


def test_write_reads_back_identically_through_every_reader(spark, io, tmp_path):
    uri = str(tmp_path / "t")
    result = io.write_table(_df(spark, _rows(30)), uri, partition_by=["event_date"])
    assert (result.version, result.rows_written, result.engine) == (0, 30, "delta-rs")
    for name, got in _read_all_paths(spark, io, uri).items():
        assert got == _expected(_rows(30)), f"{name} read differs"


def test_add_actions_carry_exact_row_counts_and_min_max_stats(spark, io, tmp_path):
    uri = str(tmp_path / "t")
    io.write_table(_df(spark, _rows(30)).coalesce(1), uri, partition_by=["event_date"])
    log_lines = (Path(uri) / "_delta_log" / f"{0:020d}.json").read_text().splitlines()
    adds = [json.loads(line)["add"] for line in log_lines if '"add"' in line]
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
        assert stats["maxValues"]["ts"] == max(r[2] for r in part).strftime("%Y-%m-%dT%H:%M:%S.000Z")
        assert stats["nullCount"] == {"user_id": 0, "n": 0, "ts": 0, "x": 0}


def test_time_travel_overwrite_and_history(spark, io, tmp_path):
    from lake_contract.delta_snapshot import table_history

    uri = str(tmp_path / "t")
    io.write_table(_df(spark, _rows(30)), uri, partition_by=["event_date"])
    io.write_table(_df(spark, _rows(4, offset=100)), uri, partition_by=["event_date"])
    assert _read_all_paths(spark, io, uri)["spark"] == _expected(_rows(4, offset=100))
    assert _read_all_paths(spark, io, uri, version=0)["spark"] == _expected(_rows(30))
    history = table_history(uri)
    assert [h["version"] for h in history] == [1, 0]


def test_replace_where_replaces_exactly_the_named_partition(spark, io, tmp_path):
    uri = str(tmp_path / "t")
    io.write_table(_df(spark, _rows(30)), uri, partition_by=["event_date"])
    new_day2 = [r for r in _rows(5, offset=200) if r[3] == dt.date(2026, 1, 2)]
    result = io.write_table(
        _df(spark, new_day2), uri, partition_by=["event_date"],
        replace_where={"event_date": [dt.date(2026, 1, 2)]},
    )
    assert result.replaced_partitions == {"event_date": ["2026-01-02"]}
    kept = [r for r in _rows(30) if r[3] != dt.date(2026, 1, 2)]
    for name, got in _read_all_paths(spark, io, uri).items():
        assert got == _expected(kept + new_day2), name


def test_dynamic_replace_touches_only_partitions_present_in_the_data(spark, io, tmp_path):
    uri = str(tmp_path / "t")
    io.write_table(_df(spark, _rows(30)), uri, partition_by=["event_date"])
    new_rows = [r for r in _rows(9, offset=300) if r[3] == dt.date(2026, 1, 3)]
    io.write_table(_df(spark, new_rows), uri, partition_by=["event_date"], replace_where="dynamic")
    kept = [r for r in _rows(30) if r[3] != dt.date(2026, 1, 3)]
    assert _read_all_paths(spark, io, uri)["spark"] == _expected(kept + new_rows)


def test_append_adds_rows_and_mismatched_schema_names_the_columns(spark, io, tmp_path):
    from lake_contract.errors import SchemaMismatchError

    uri = str(tmp_path / "t")
    io.write_table(_df(spark, _rows(6)), uri, partition_by=["event_date"])
    io.write_table(_df(spark, _rows(6, offset=50)), uri, mode="append", partition_by=["event_date"])
    assert _read_all_paths(spark, io, uri)["delta-rs"] == _expected(_rows(6) + _rows(6, offset=50))

    bad = _df(spark, _rows(3)).selectExpr("n AS user_id", "n AS count", "ts", "event_date", "tags")
    with pytest.raises(SchemaMismatchError) as err:
        io.write_table(bad, uri, mode="append", partition_by=["event_date"])
    message = str(err.value)
    assert "missing columns ['n', 'x']" in message
    assert "unexpected columns ['count']" in message
    assert "user_id (string in table, bigint in write)" in message
    assert io.read_table(uri).count() == 12  # nothing was written


def test_failure_between_files_and_commit_leaves_previous_version(spark, io, tmp_path, monkeypatch):
    import deltalake

    from lake_contract.delta_snapshot import table_version

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
    # The uncommitted files were cleaned up; the committed ones are untouched.
    assert sorted(str(p) for p in Path(uri).rglob("*.parquet")) == files_before


def test_concurrent_appends_both_commit(spark, io, tmp_path):
    uri = str(tmp_path / "t")
    io.write_table(_df(spark, _rows(6)), uri, partition_by=["event_date"])
    first = io.stage_write(_df(spark, _rows(4, offset=10)), uri, "append", ["event_date"])
    second = io.stage_write(_df(spark, _rows(4, offset=20)), uri, "append", ["event_date"])
    assert first.read_version == second.read_version == 0
    assert io.commit_staged(first).version == 1
    assert io.commit_staged(second).version == 2
    assert _read_all_paths(spark, io, uri)["spark"] == _expected(_rows(6) + _rows(4, offset=10) + _rows(4, offset=20))


def test_concurrent_overwrites_loser_fails_with_conflict_and_leaves_no_trace(spark, io, tmp_path):
    from lake_contract.errors import CommitConflictError

    uri = str(tmp_path / "t")
    io.write_table(_df(spark, _rows(6)), uri, partition_by=["event_date"])
    winner = io.stage_write(_df(spark, _rows(3, offset=10)), uri, "overwrite", ["event_date"])
    loser = io.stage_write(_df(spark, _rows(3, offset=20)), uri, "overwrite", ["event_date"])
    io.commit_staged(winner)
    with pytest.raises(CommitConflictError, match="concurrent write"):
        io.commit_staged(loser)
    assert _read_all_paths(spark, io, uri)["delta-rs"] == _expected(_rows(3, offset=10))
    committed = {os.path.basename(f) for f in __import__("lake_contract.delta_snapshot", fromlist=["x"])
                 .resolve_snapshot(uri).files}
    on_disk_new = {p.name for p in Path(uri).rglob("*.parquet")} - {
        os.path.basename(a.path) for a in winner.adds} - {os.path.basename(a.path) for a in loser.adds}
    assert {os.path.basename(a.path) for a in loser.adds}.isdisjoint({p.name for p in Path(uri).rglob("*.parquet")})
    assert committed == {os.path.basename(a.path) for a in winner.adds}
    assert on_disk_new  # the version-0 files stay on disk for time travel


def test_partition_values_with_spaces_and_nulls_roundtrip(spark, io, tmp_path):
    from lake_contract.delta_snapshot import read_table_deltars

    uri = str(tmp_path / "t")
    rows = [("a b-c.d", 1), ("plain", 2), (None, 3)]
    io.write_table(spark.createDataFrame(rows, "k string, v long"), uri, partition_by=["k"])
    assert sorted((tuple(r) for r in io.read_table(uri).collect()), key=lambda r: r[1]) == rows
    assert sorted(((r["k"], r["v"]) for r in read_table_deltars(uri).to_pylist()), key=lambda r: r[1]) == rows


def test_partition_values_that_spark_escapes_are_refused_before_commit(spark, io, tmp_path):
    from lake_contract.delta_snapshot import table_exists

    uri = str(tmp_path / "t")
    with pytest.raises(ValueError, match="partition values may not contain characters"):
        io.write_table(spark.createDataFrame([("a/b:c", 1)], "k string, v long"), uri, partition_by=["k"])
    assert not table_exists(uri)


def test_empty_write_creates_a_readable_empty_table(spark, io, tmp_path):
    uri = str(tmp_path / "t")
    io.write_table(_df(spark, []), uri, partition_by=["event_date"])
    assert io.read_table(uri).count() == 0
    assert io.read_table(uri).schema.simpleString() == _df(spark, []).schema.simpleString()


def test_missing_table_and_version_give_clear_errors(spark, io, tmp_path):
    from lake_contract.errors import TableNotFoundError

    with pytest.raises(TableNotFoundError, match="no Delta table at"):
        io.read_table(str(tmp_path / "nope"))
    uri = str(tmp_path / "t")
    io.write_table(_df(spark, _rows(3)), uri)
    with pytest.raises(TableNotFoundError, match="has no version 7 \\(latest is 0"):
        io.read_table(uri, version=7)


def test_snapshot_module_imports_without_pyspark():
    code = (
        "import sys; import lake_contract.delta_snapshot, lake_contract.lake, lake_contract.errors; "
        "assert 'pyspark' not in sys.modules, 'pyspark imported'; print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ok"


def test_upsert_replaces_matching_keys_inserts_new_ones_and_rewrites_only_touched_files(spark, io, tmp_path):
    from lake_contract.delta_snapshot import resolve_snapshot

    uri = str(tmp_path / "t")
    base = spark.createDataFrame([(i, f"v{i}") for i in range(1, 7)], "id long, v string")
    io.write_table(base.repartition(3, "id"), uri)
    before = resolve_snapshot(uri)
    updates = spark.createDataFrame([(2, "changed"), (7, "new")], "id long, v string")
    result = io.upsert(updates, uri, key=["id"])
    assert result.version == 1 and result.mode == "merge"
    rows = sorted(tuple(r) for r in io.read_table(uri).collect())
    assert rows == [(1, "v1"), (2, "changed"), (3, "v3"), (4, "v4"), (5, "v5"), (6, "v6"), (7, "new")]
    after = resolve_snapshot(uri)
    holder_of_2 = next(
        f for f in before.files if 2 in [r.id for r in spark.read.parquet(f).collect()]
    )
    # Every file that did not hold key 2 is still part of the table, untouched.
    assert set(before.files) - {holder_of_2} <= set(after.files)
    assert holder_of_2 not in after.files
    assert sorted(tuple(r) for r in io.read_table(uri, version=0).collect()) == [(i, f"v{i}") for i in range(1, 7)]

    with pytest.raises(ValueError, match="updates repeat key"):
        io.upsert(spark.createDataFrame([(1, "a"), (1, "b")], "id long, v string"), uri, key=["id"])
