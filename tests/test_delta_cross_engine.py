"""A table written by one Delta engine is appended to, partition-replaced, MERGEd into and
read by the other, in both directions: both write ordinary Delta tables (docs/lake.md)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from tests.test_delta_io import _df, _expected, _read_all_paths, _rows

pytestmark = pytest.mark.spark


@pytest.fixture(params=["native-then-delta-rs", "delta-rs-then-native"])
def engines(request, native_io, deltars_io):
    """(first writer, second writer)."""
    return (native_io, deltars_io) if request.param == "native-then-delta-rs" else (deltars_io, native_io)


def test_partitioned_table_changes_hands_between_engines(spark, engines, tmp_path):
    from lake_contract.delta_snapshot import table_history

    first, second = engines
    uri = str(tmp_path / "t")
    first.write_table(_df(spark, _rows(12)), uri, partition_by=["event_date"])
    if first.resolved_engine == "native":
        # A checkpoint every 2 commits, so the other engine also reads a Delta-written checkpoint.
        spark.sql(f"ALTER TABLE delta.`{uri}` SET TBLPROPERTIES ('delta.checkpointInterval' = '2')")
    appended = second.write_table(_df(spark, _rows(6, offset=40)), uri, mode="append", partition_by=["event_date"])
    day2 = [r for r in _rows(6, offset=80) if r[3] == dt.date(2026, 1, 2)]
    replaced = second.write_table(_df(spark, day2), uri, partition_by=["event_date"],
                                  replace_where={"event_date": [dt.date(2026, 1, 2)]})
    assert replaced.version == appended.version + 1
    expected = [r for r in _rows(12) + _rows(6, offset=40) if r[3] != dt.date(2026, 1, 2)] + day2
    for name, got in _read_all_paths(spark, second, uri).items():
        assert got == _expected(expected), f"{name} after {second.resolved_engine} wrote"
    # The first engine reads the second's commits, and writes on top of them again.
    assert sorted(_read_all_paths(spark, first, uri)["spark"]) == _expected(expected)
    last = first.write_table(_df(spark, _rows(3, offset=120)), uri, mode="append", partition_by=["event_date"])
    assert last.version == replaced.version + 1
    assert _read_all_paths(spark, second, uri)["spark"] == _expected(expected + _rows(3, offset=120))
    assert _read_all_paths(spark, second, uri, version=0)["spark"] == _expected(_rows(12))
    assert table_history(uri, 1)[0]["version"] == last.version
    if first.resolved_engine == "native":
        assert list(Path(uri, "_delta_log").glob("*.checkpoint.parquet")), "no checkpoint was exercised"


def test_merge_into_a_table_the_other_engine_wrote(spark, engines, tmp_path):
    first, second = engines
    uri = str(tmp_path / "features")
    first.write_table(spark.createDataFrame([(i, f"v{i}", i * 0.5) for i in range(1, 9)],
                                            "id long, v string, w double").repartition(2, "id"), uri)
    merged = second.upsert(spark.createDataFrame([(3, "three", 9.0), (9, "nine", 4.5)], "id long, v string, w double"),
                           uri, key=["id"])
    assert (merged.version, merged.engine) == (1, second.resolved_engine)
    want = {i: (f"v{i}", i * 0.5) for i in range(1, 9)} | {3: ("three", 9.0), 9: ("nine", 4.5)}
    for reader in (first, second):
        assert {r.id: (r.v, r.w) for r in reader.read_table(uri).collect()} == want, reader.resolved_engine
    # And back: the first engine MERGEs into what the second committed.
    again = first.upsert(spark.createDataFrame([(9, "NINE", 0.0)], "id long, v string, w double"), uri, key=["id"])
    assert again.version == 2
    from lake_contract.delta_snapshot import read_snapshot_arrow, read_table_deltars, resolve_snapshot

    want[9] = ("NINE", 0.0)
    assert {r["id"]: (r["v"], r["w"]) for r in read_table_deltars(uri).to_pylist()} == want
    assert {r["id"]: (r["v"], r["w"]) for r in read_snapshot_arrow(resolve_snapshot(uri)).to_pylist()} == want
    assert {r.id: (r.v, r.w) for r in second.read_table(uri, version=1).collect()}[9] == ("nine", 4.5)
