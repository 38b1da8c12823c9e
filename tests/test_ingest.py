"""Ingest: literal bad rows in, exact quarantine reasons and bronze rows out; idempotence."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
UTC = dt.UTC

# (raw line, expected reason or None). Users u1,u2 and items i1,i2 exist.
EVENT_LINES = [
    ("u1,i1,1767225600,5", None),                      # 2026-01-01 00:00:00
    ("u1,i2,1767229200,4", None),                      # 2026-01-01 01:00:00
    ("u2,i1,1767312000,3", None),                      # 2026-01-02 00:00:00
    ("u1,i1,1767225600,5", "duplicate_event"),         # exact repeat of the first row
    (",i1,1767225600,5", "missing_user_id"),
    ("u1, ,1767225600,5", "missing_item_id"),
    ("u1,i1,,5", "missing_timestamp"),
    ("u1,i1,yesterday,5", "unparseable_timestamp"),
    ("u1,i1,0,5", "timestamp_out_of_range"),           # epoch 0: a sentinel, not an event
    ("u1,i1,1767225601,", "missing_rating"),
    ("u1,i1,1767225602,five", "unparseable_rating"),
    ("u1,i1,1767225603,9", "rating_out_of_range"),
    ("u9,i1,1767225604,5", "unknown_user"),
    ("u1,i9,1767225605,5", "unknown_item"),
    ("u1,i1,1767225606,5,extra", "malformed_row"),
]


def _write(path: Path, header: str, lines: list[str]) -> Path:
    path.write_text(header + "\n" + "\n".join(lines) + "\n")
    return path


def _spec(tmp_path: Path, event_lines: list[str], user_lines=None, item_lines=None):
    from spark_features.sources import EntitySpec, InteractionsSpec, SourceSpec

    events = _write(tmp_path / "events.csv", "uid,sku,ts,stars", event_lines)
    users = _write(tmp_path / "users.csv", "uid,age,country", user_lines or ["u1,31,DE", "u2,45,FR"])
    items = _write(tmp_path / "items.csv", "sku,year,tags,name", item_lines or ["i1,1999,a|b,One", "i2,,b,Two"])
    return SourceSpec(
        name="test-csv",
        interactions=InteractionsSpec(path=str(events), user_id="uid", item_id="sku", timestamp="ts",
                                      timestamp_unit="s", rating="stars", rating_range=(1.0, 5.0)),
        users=EntitySpec(table="users", path=str(users), id="uid", categorical=("country",), numeric=("age",)),
        items=EntitySpec(table="items", path=str(items), id="sku", numeric=("year",),
                         multi_valued={"tags": "|"}, text=("name",)),
    )


def _run(spark, lake_root, spec, batch="b1", only_date=None, max_bad=1.0):
    from lake_contract.lake import Lake
    from spark_features.delta_io import DeltaLakeIO
    from spark_features.ingest import IngestOptions, ingest, read_source

    options = IngestOptions(batch=batch, only_date=only_date, max_bad_fraction=max_bad, run_id="run-test")
    return ingest(spark, DeltaLakeIO(spark), Lake(str(lake_root)), read_source(spark, spec), spec, options,
                  say=lambda _line: None)


def _table(lake_root, name) -> list[dict]:
    from lake_contract.delta_snapshot import read_table_deltars

    return read_table_deltars(str(Path(lake_root) / name)).to_pylist()


@pytest.mark.spark
def test_every_bad_row_is_quarantined_with_its_exact_reason(spark, tmp_path, lake_root):
    spec = _spec(tmp_path, [line for line, _ in EVENT_LINES])
    report = _run(spark, lake_root, spec)

    inter = next(t for t in report.tables if t.table == "interactions")
    expected_reasons: dict[str, int] = {}
    for _, reason in EVENT_LINES:
        if reason:
            expected_reasons[reason] = expected_reasons.get(reason, 0) + 1
    assert inter.bad_by_reason == expected_reasons
    assert (inter.total, inter.valid) == (len(EVENT_LINES), 3)

    quarantine = _table(lake_root, "quarantine/interactions")
    got = [(json.loads(r["raw"]), r["reason"]) for r in quarantine if r["reason"] != "malformed_row"]
    expected = []
    for line, reason in EVENT_LINES:
        if reason and reason != "malformed_row":
            uid, sku, ts, stars = line.split(",")
            expected.append(({"uid": uid or None, "sku": sku or None, "ts": ts or None,
                              "stars": stars or None}, reason))
    expected = [({k: v for k, v in raw.items() if v is not None}, r) for raw, r in expected]
    got = [({k: v for k, v in raw.items() if v is not None and k != "_corrupt_record"}, r) for raw, r in got]
    assert sorted(got, key=repr) == sorted(expected, key=repr)
    assert {r["run_id"] for r in quarantine} == {"run-test"}
    assert {r["batch"] for r in quarantine} == {"b1"}
    malformed = [r for r in quarantine if r["reason"] == "malformed_row"]
    assert len(malformed) == 1 and "extra" in malformed[0]["raw"]

    bronze = sorted((r["user_id"], r["item_id"], r["event_ts"], r["rating"], r["event_date"])
                    for r in _table(lake_root, "bronze/interactions"))
    assert bronze == [
        ("u1", "i1", dt.datetime(2026, 1, 1, 0, 0, tzinfo=UTC), 5.0, dt.date(2026, 1, 1)),
        ("u1", "i2", dt.datetime(2026, 1, 1, 1, 0, tzinfo=UTC), 4.0, dt.date(2026, 1, 1)),
        ("u2", "i1", dt.datetime(2026, 1, 2, 0, 0, tzinfo=UTC), 3.0, dt.date(2026, 1, 2)),
    ]


@pytest.mark.spark
def test_entity_rows_duplicates_conflicts_and_repaired_attributes(spark, tmp_path, lake_root):
    spec = _spec(
        tmp_path,
        ["u1,i1,1767225600,5"],
        user_lines=["u1,31,DE", "u1,31,DE", "u2,45,FR", "u2,46,FR", ",20,IT", "u3,old,ES", "u4,,PT"],
        item_lines=["i1,1999,a| b |a||c,One", "i2,,b,Two"],
    )
    report = _run(spark, lake_root, spec)
    users = next(t for t in report.tables if t.table == "users")
    assert users.bad_by_reason == {"duplicate_row": 1, "conflicting_duplicate_id": 2, "missing_id": 1}
    assert users.repaired_by_reason == {"unparseable_numeric": 1}
    assert sorted((r["user_id"], r["age"], r["country"]) for r in _table(lake_root, "bronze/users")) == [
        ("u1", 31.0, "DE"), ("u3", None, "ES"), ("u4", None, "PT"),
    ]
    items = sorted((r["item_id"], r["year"], r["tags"], r["name"]) for r in _table(lake_root, "bronze/items"))
    assert items == [("i1", 1999.0, ["a", "b", "c"], "One"), ("i2", None, ["b"], "Two")]
    repaired = [r for r in _table(lake_root, "quarantine/users") if r["reason"] == "unparseable_numeric"]
    assert [r["detail"] for r in repaired] == ['age=["old"] is not a number: row kept, value set to null']
    # u2 had conflicting rows, so it is unknown: an event of u2 would be quarantined as unknown_user.


@pytest.mark.spark
def test_bad_fraction_over_limit_fails_clearly_and_leaves_bronze_untouched(spark, tmp_path, lake_root):
    from lake_contract.delta_snapshot import table_version
    from lake_contract.errors import BadInputError

    good = _spec(tmp_path, ["u1,i1,1767225600,5", "u2,i2,1767312000,4"])
    _run(spark, lake_root, good, max_bad=0.0)
    versions = {t: table_version(str(lake_root / f"bronze/{t}")) for t in ("interactions", "users", "items")}

    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    bad = _spec(bad_dir, ["u1,i1,1767225600,5", "u1,i1,nope,5"])
    with pytest.raises(BadInputError) as err:
        _run(spark, lake_root, bad, batch="b2", max_bad=0.01)
    message = str(err.value)
    assert "interactions: 1 of 2 rows are bad (50.00% > --max-bad-fraction 1.00%): unparseable_timestamp=1" in message
    assert "Nothing was written to bronze" in message
    assert {t: table_version(str(lake_root / f"bronze/{t}")) for t in versions} == versions
    assert [r["reason"] for r in _table(lake_root, "quarantine/interactions") if r["batch"] == "b2"] == [
        "unparseable_timestamp"
    ]


@pytest.mark.spark
def test_rerunning_the_same_batch_replaces_instead_of_duplicating(spark, tmp_path, lake_root):
    spec = _spec(tmp_path, [line for line, _ in EVENT_LINES])
    _run(spark, lake_root, spec)
    first = {t: sorted(map(repr, _table(lake_root, t))) for t in
             ("bronze/interactions", "bronze/users", "bronze/items")}
    first_q = sorted((r["reason"], r["raw"]) for r in _table(lake_root, "quarantine/interactions"))
    _run(spark, lake_root, spec)
    again = {t: sorted(map(repr, _table(lake_root, t))) for t in first}
    assert again == first
    assert sorted((r["reason"], r["raw"]) for r in _table(lake_root, "quarantine/interactions")) == first_q


@pytest.mark.spark
def test_only_date_replaces_that_partition_and_reports_the_rest(spark, tmp_path, lake_root):
    spec = _spec(tmp_path, ["u1,i1,1767225600,5", "u2,i1,1767312000,3"])
    _run(spark, lake_root, spec)
    newer = tmp_path / "day2"
    newer.mkdir()
    spec2 = _spec(newer, ["u2,i2,1767315600,2", "u1,i2,1767225700,1"])  # one on day 2, one on day 1
    report = _run(spark, lake_root, spec2, batch="day2", only_date=dt.date(2026, 1, 2))
    assert next(t for t in report.tables if t.table == "interactions").outside_date == 1
    rows = sorted((r["user_id"], r["item_id"], r["event_date"]) for r in _table(lake_root, "bronze/interactions"))
    assert rows == [("u1", "i1", dt.date(2026, 1, 1)), ("u2", "i2", dt.date(2026, 1, 2))]


@pytest.mark.spark
@pytest.mark.parametrize(
    ("unit", "raw", "expected"),
    [
        ("s", "881250949", dt.datetime(1997, 12, 4, 15, 55, 49, tzinfo=UTC)),
        ("s", "881250949.0", dt.datetime(1997, 12, 4, 15, 55, 49, tzinfo=UTC)),
        ("s", "881250949.25", dt.datetime(1997, 12, 4, 15, 55, 49, 250000, tzinfo=UTC)),
        ("ms", "881250949123", dt.datetime(1997, 12, 4, 15, 55, 49, 123000, tzinfo=UTC)),
        ("us", "881250949123456", dt.datetime(1997, 12, 4, 15, 55, 49, 123456, tzinfo=UTC)),
        ("iso", "1997-12-04T15:55:49", dt.datetime(1997, 12, 4, 15, 55, 49, tzinfo=UTC)),
        ("s", "12abc", None),
    ],
)
def test_timestamps_parse_exactly_in_every_unit(spark, unit, raw, expected):
    from pyspark.sql import types as T

    from spark_features.ingest import parse_timestamp

    frame = spark.createDataFrame([(raw,)], "ts string")
    got = frame.select(parse_timestamp(frame.ts, unit, T.StringType()).alias("t")).collect()[0]["t"]
    assert (got.replace(tzinfo=UTC) if got else None) == expected


def test_mapping_file_parses_and_rejects_unknown_keys(tmp_path):
    from spark_features.sources import load_mapping

    good = tmp_path / "m.toml"
    good.write_text(
        '[interactions]\npath = "ev/*.csv"\nuser_id = "uid"\nitem_id = "sku"\ntimestamp = "ts"\n'
        'timestamp_unit = "ms"\nrating = "stars"\nrating_range = [1, 10]\ntimestamp_min = "2000-01-01"\n'
        '[items]\npath = "items.parquet"\nformat = "parquet"\nid = "sku"\nmulti_valued = { tags = "|" }\n'
        'rename = { "product title" = "title" }\ntext = ["title"]\n'
    )
    spec = load_mapping(good)
    assert spec.interactions.path == str(tmp_path / "ev/*.csv")
    assert (spec.interactions.timestamp_unit, spec.interactions.rating_range) == ("ms", (1.0, 10.0))
    assert spec.interactions.timestamp_min == dt.date(2000, 1, 1)
    assert spec.items.multi_valued == {"tags": "|"} and spec.items.text == ("title",)
    assert spec.users is None

    bad = tmp_path / "bad.toml"
    bad.write_text('[interactions]\npath = "x"\nuser_id = "u"\nitem_id = "i"\ntimestamp = "t"\nuser = "typo"\n')
    with pytest.raises(ValueError, match=r"\[interactions\] has unknown keys \['user'\]"):
        load_mapping(bad)
    unit = tmp_path / "unit.toml"
    unit.write_text('[interactions]\npath = "x"\nuser_id = "u"\nitem_id = "i"\ntimestamp = "t"\ntimestamp_unit = "days"\n')
    with pytest.raises(ValueError, match=r"interactions.timestamp_unit must be one of \['s', 'ms', 'us', 'iso'\], got 'days'"):
        load_mapping(unit)


def test_ingest_help_answers_without_spark_and_bad_args_exit_2_with_a_reason():
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    code = "import sys, jobs.ingest; assert 'pyspark' not in sys.modules and 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=REPO)
    helped = subprocess.run([sys.executable, "-m", "jobs.ingest", "--help"], capture_output=True, text=True,
                            env=env, cwd=REPO)
    assert helped.returncode == 0 and "--max-bad-fraction" in helped.stdout
    failed = subprocess.run([sys.executable, "-m", "jobs.ingest", "--source", "csv"], capture_output=True,
                            text=True, env=env, cwd=REPO)
    assert failed.returncode == 2
    assert failed.stderr.strip().splitlines()[-1] == (
        "error: ingest: --source csv needs --mapping FILE (TOML or JSON column mapping)"
    )


@pytest.mark.slow
def test_spark_submit_ingests_movielens_100k_exactly(tmp_path):
    """The README's data: 100,000 events, 943 users, 1,682 items, through spark-submit."""
    from lake_contract.delta_snapshot import resolve_snapshot

    spark_submit = Path(sys.executable).parent / "spark-submit"
    lake = tmp_path / "lake"
    env = {**os.environ, "PYSPARK_PYTHON": sys.executable, "PYSPARK_DRIVER_PYTHON": sys.executable}
    done = subprocess.run(
        [str(spark_submit), "--master", "local[2]", str(REPO / "jobs" / "ingest.py"),
         "--source", "movielens-100k", "--lake", str(lake)],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "bronze/interactions: 100,000 rows -> version 0" in done.stdout
    counts = {t: resolve_snapshot(str(lake / "bronze" / t)).num_rows for t in ("interactions", "users", "items")}
    assert counts == {"interactions": 100_000, "users": 943, "items": 1_682}
