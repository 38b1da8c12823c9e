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


def _run(spark, lake_root, spec, batch="b1", only_date=None, max_bad=1.0, only_hour=None, replace_all=False):
    from lake_contract.lake import Lake
    from spark_features.delta_io import DeltaLakeIO
    from spark_features.ingest import IngestOptions, ingest, read_source

    options = IngestOptions(batch=batch, only_date=only_date, only_hour=only_hour, replace_all=replace_all,
                            max_bad_fraction=max_bad, run_id="run-test")
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
def test_only_date_replaces_that_partition_and_quarantines_the_rest(spark, tmp_path, lake_root):
    spec = _spec(tmp_path, ["u1,i1,1767225600,5", "u2,i1,1767312000,3"])
    _run(spark, lake_root, spec)
    newer = tmp_path / "day2"
    newer.mkdir()
    spec2 = _spec(newer, ["u2,i2,1767315600,2", "u1,i2,1767225700,1"])  # one on day 2, one on day 1
    report = _run(spark, lake_root, spec2, batch="day2", only_date=dt.date(2026, 1, 2))
    assert next(t for t in report.tables if t.table == "interactions").outside_window == 1
    rows = sorted((r["user_id"], r["item_id"], r["event_date"]) for r in _table(lake_root, "bronze/interactions"))
    assert rows == [("u1", "i1", dt.date(2026, 1, 1)), ("u2", "i2", dt.date(2026, 1, 2))]
    outside = [(r["reason"], r["detail"]) for r in _table(lake_root, "quarantine/interactions") if r["batch"] == "day2"]
    assert outside == [("outside_window", "2026-01-01 00:01:40 is outside --date 2026-01-02")]


# ------------------------------------------------- appending loads: windows and upserts
# The lake before each of these tests: day 1 at 00:00 and 01:00, day 2 at 00:00.
BASE_EVENTS = ["u1,i1,1767225600,5", "u1,i2,1767229200,4", "u2,i1,1767312000,3"]
T = dt.datetime(2026, 1, 1, tzinfo=UTC)


def _at(hours: float) -> int:
    return int(T.timestamp()) + round(hours * 3600)


def _bronze(lake_root) -> list[tuple]:
    return sorted((r["user_id"], r["item_id"], r["event_ts"], r["rating"], r["event_date"])
                  for r in _table(lake_root, "bronze/interactions"))


def _row(user, item, hours, rating):
    ts = T + dt.timedelta(seconds=round(hours * 3600))
    return (user, item, ts, float(rating), ts.date())


def _versions(lake_root) -> dict:
    from lake_contract.delta_snapshot import table_version

    return {t: table_version(str(lake_root / f"bronze/{t}")) for t in ("interactions", "users", "items")}


def _files_outside(lake_root, day: dt.date) -> list[str]:
    """The data files of every event_date partition but ``day`` (unchanged files = untouched data)."""
    from lake_contract.delta_snapshot import resolve_snapshot

    snap = resolve_snapshot(str(lake_root / "bronze/interactions"))
    return sorted(f for f, pv in zip(snap.files, snap.partition_values, strict=True)
                  if pv["event_date"] != day.isoformat())


def _load(tmp_path, name, events, users=None, items=None):
    folder = tmp_path / name
    folder.mkdir()
    return _spec(folder, events, users, items)


def _report(report, table):
    return next(t for t in report.tables if t.table == table)


@pytest.mark.spark
def test_a_partial_day_file_without_flags_replaces_only_its_date(spark, tmp_path, lake_root):
    _run(spark, lake_root, _load(tmp_path, "base", BASE_EVENTS))
    day2_files = _files_outside(lake_root, dt.date(2026, 1, 1))
    # The case: a small daily file, no --date, into a lake holding other days.
    partial = _load(tmp_path, "partial", [f"u2,i2,{_at(2)},4", f"u1,i1,{_at(3.5)},2"])
    report = _run(spark, lake_root, partial, batch="partial")
    assert _bronze(lake_root) == [_row("u1", "i1", 3.5, 2), _row("u2", "i1", 24, 3), _row("u2", "i2", 2, 4)]
    assert _files_outside(lake_root, dt.date(2026, 1, 1)) == day2_files  # day 2 not even rewritten
    inter = _report(report, "interactions")
    assert inter.removed_rows == 2 and inter.action.startswith("replaced date 2026-01-01: 2 old rows out, 2 in")
    # The same file again, now with --date: the day already holds exactly these rows.
    versions = _versions(lake_root)
    again = _run(spark, lake_root, partial, batch="partial", only_date=dt.date(2026, 1, 1))
    assert _versions(lake_root) == versions  # no new version of any bronze table
    assert all(t.written is None for t in again.tables)
    assert _bronze(lake_root) == [_row("u1", "i1", 3.5, 2), _row("u2", "i1", 24, 3), _row("u2", "i2", 2, 4)]


@pytest.mark.spark
def test_an_hour_file_replaces_exactly_that_hour_and_twice_is_identical(spark, tmp_path, lake_root):
    _run(spark, lake_root, _load(tmp_path, "base", BASE_EVENTS))
    day2_files = _files_outside(lake_root, dt.date(2026, 1, 1))
    hour = _load(tmp_path, "hour", [
        f"u2,i1,{_at(1 + 1 / 60)},2",  # 01:01, new
        f"u1,i2,{_at(1)},4",           # 01:00, already there
        f"u1,i1,{_at(2)},5",           # 02:00: the next hour, not this load's
    ])
    report = _run(spark, lake_root, hour, batch="h01", only_hour=dt.datetime(2026, 1, 1, 1))
    expected = [_row("u1", "i1", 0, 5), _row("u1", "i2", 1, 4), _row("u2", "i1", 1 + 1 / 60, 2), _row("u2", "i1", 24, 3)]
    assert _bronze(lake_root) == expected  # 00:00 of the same day and all of day 2 kept
    assert _files_outside(lake_root, dt.date(2026, 1, 1)) == day2_files
    inter = _report(report, "interactions")
    assert (inter.valid, inter.outside_window, inter.removed_rows) == (2, 1, 1)
    quarantined = [(r["reason"], r["detail"]) for r in _table(lake_root, "quarantine/interactions")
                   if r["batch"] == "h01"]
    assert quarantined == [("outside_window", "2026-01-01 02:00:00 is outside --hour 2026-01-01T01")]

    tables = ("bronze/interactions", "bronze/users", "bronze/items")
    before = {t: sorted(map(repr, _table(lake_root, t))) for t in tables}
    versions = _versions(lake_root)
    again = _run(spark, lake_root, hour, batch="h01", only_hour=dt.datetime(2026, 1, 1, 1, tzinfo=UTC))
    assert {t: sorted(map(repr, _table(lake_root, t))) for t in tables} == before
    assert _versions(lake_root) == versions
    assert _report(again, "interactions").action.startswith("unchanged: --hour 2026-01-01T01 already holds")
    assert [(r["reason"], r["detail"]) for r in _table(lake_root, "quarantine/interactions")
            if r["batch"] == "h01"] == quarantined

    # An empty hour file for that hour empties exactly that hour.
    _run(spark, lake_root, _load(tmp_path, "empty", []), batch="h01", only_hour=dt.datetime(2026, 1, 1, 1))
    assert _bronze(lake_root) == [_row("u1", "i1", 0, 5), _row("u2", "i1", 24, 3)]


@pytest.mark.spark
def test_an_hour_ingest_refuses_to_commit_over_a_write_that_landed_while_it_ran(spark, tmp_path, lake_root):
    from lake_contract.errors import CommitConflictError
    from lake_contract.lake import Lake
    from spark_features.delta_io import DeltaLakeIO
    from spark_features.ingest import INTERACTIONS_SCHEMA, IngestOptions, ingest, read_source

    _run(spark, lake_root, _load(tmp_path, "base", BASE_EVENTS))
    # The read-version guard is delta-rs's (its staged commit checks the version it read); on
    # the native engine Spark commits before the check can run, so hourly ingests of one day
    # are serialised by the scheduler instead (one lake pool slot, docs/lake.md).
    io, lake = DeltaLakeIO(spark, engine="delta-rs"), Lake(str(lake_root))
    hour = _load(tmp_path, "hour", [f"u2,i1,{_at(1.5)},2"])
    late = _row("u2", "i2", 0.5, 1)  # written by "another writer" into the same day while the hour is planned

    def meddle(line: str) -> None:
        if line.startswith("    plan bronze/interactions"):
            day1 = [r for r in _bronze(lake_root) if r[4] == dt.date(2026, 1, 1)]
            rows = [(u, i, r, ts, d) for u, i, ts, r, d in [*day1, late]]  # INTERACTIONS_SCHEMA order
            io.write_table(spark.createDataFrame(rows, INTERACTIONS_SCHEMA), lake.table("bronze/interactions"),
                           partition_by=["event_date"], replace_where={"event_date": [dt.date(2026, 1, 1)]})

    options = IngestOptions(batch="h01", only_hour=dt.datetime(2026, 1, 1, 1), max_bad_fraction=0.0, run_id="r")
    with pytest.raises(CommitConflictError, match=r"^bronze/interactions moved from version 0 to 1 while this "
                       r"ingest ran \(another write to it\): nothing of this load was committed"):
        ingest(spark, io, lake, read_source(spark, hour), hour, options, say=meddle)
    with_late = [_row("u1", "i1", 0, 5), _row("u1", "i2", 1, 4), _row("u2", "i1", 24, 3), late]
    assert _bronze(lake_root) == sorted(with_late)  # the other writer's row survived
    _run(spark, lake_root, hour, batch="h01", only_hour=dt.datetime(2026, 1, 1, 1))  # the re-run goes through
    assert _bronze(lake_root) == sorted([_row("u1", "i1", 0, 5), _row("u2", "i1", 1.5, 2), _row("u2", "i1", 24, 3),
                                         late])


@pytest.mark.spark
def test_a_users_file_of_only_new_users_adds_them_and_keeps_the_rest(spark, tmp_path, lake_root):
    _run(spark, lake_root, _load(tmp_path, "base", BASE_EVENTS))
    load = _load(tmp_path, "new", [f"u3,i3,{_at(48)},5", f"u1,i3,{_at(49)},4"],
                 users=["u3,22,ES"], items=["i3,2001,c,Three"])
    report = _run(spark, lake_root, load, batch="new", max_bad=0.0)
    users = sorted((r["user_id"], r["age"], r["country"]) for r in _table(lake_root, "bronze/users"))
    assert users == [("u1", 31.0, "DE"), ("u2", 45.0, "FR"), ("u3", 22.0, "ES")]
    items = sorted((r["item_id"], r["year"], r["tags"], r["name"]) for r in _table(lake_root, "bronze/items"))
    assert items == [("i1", 1999.0, ["a", "b"], "One"), ("i2", None, ["b"], "Two"), ("i3", 2001.0, ["c"], "Three")]
    # u1 is not in this users file but still known: its event is valid.
    assert _bronze(lake_root) == [_row("u1", "i1", 0, 5), _row("u1", "i2", 1, 4), _row("u1", "i3", 49, 4),
                                  _row("u2", "i1", 24, 3), _row("u3", "i3", 48, 5)]
    assert _report(report, "users").action == (
        "upserted by user_id: 1 new, 0 changed replaced, 0 identical; 2 ids absent from the load kept")

    # A changed user is replaced, an identical one rewrites nothing.
    versions = _versions(lake_root)
    changed = _load(tmp_path, "changed", [], users=["u2,46,FR", "u3,22,ES"], items=["i3,2001,c,Three"])
    report = _run(spark, lake_root, changed, batch="changed", max_bad=0.0)
    users = sorted((r["user_id"], r["age"], r["country"]) for r in _table(lake_root, "bronze/users"))
    assert users == [("u1", 31.0, "DE"), ("u2", 46.0, "FR"), ("u3", 22.0, "ES")]
    assert _report(report, "users").action == (
        "upserted by user_id: 0 new, 1 changed replaced, 1 identical; 1 ids absent from the load kept")
    after = _versions(lake_root)
    assert after["users"] == versions["users"] + 1
    assert after["items"] == versions["items"]  # i3 unchanged: no new version
    assert after["interactions"] == versions["interactions"]  # no events: no date named, nothing replaced


@pytest.mark.spark
def test_replace_all_is_explicit_and_counts_what_it_removes(spark, tmp_path, lake_root):
    from lake_contract.errors import SchemaMismatchError

    _run(spark, lake_root, _load(tmp_path, "base", BASE_EVENTS))
    versions = _versions(lake_root)
    other_columns = _load(tmp_path, "cols", [f"u1,i1,{_at(50)},5"])
    (tmp_path / "cols" / "users.csv").write_text("uid,age,country,plan\nu1,31,DE,gold\n")
    from dataclasses import replace

    other_columns = replace(other_columns, users=replace(other_columns.users, categorical=("country", "plan")))
    with pytest.raises(SchemaMismatchError, match=r"bronze/users cannot be upserted with this load: unexpected "
                       r"columns \['plan'\]\. Map the same columns, or re-run with --replace-all"):
        _run(spark, lake_root, other_columns, batch="cols")
    assert _versions(lake_root) == versions

    report = _run(spark, lake_root, other_columns, batch="cols", replace_all=True)
    assert _bronze(lake_root) == [_row("u1", "i1", 50, 5)]
    assert [r["plan"] for r in _table(lake_root, "bronze/users")] == ["gold"]
    assert (_report(report, "interactions").removed_rows, _report(report, "users").removed_rows) == (3, 1)
    assert _report(report, "interactions").action == (
        "--replace-all: removed all 3 rows of 2 dates (2026-01-01..2026-01-02), wrote this load's")
    assert _report(report, "users").action == (
        "--replace-all: replaced as a whole (2 rows before); removed 1 ids absent from this load")


def test_ingest_window_flags_parse_and_exclude_each_other():
    from jobs.ingest import parse_config
    from spark_features.ingest import IngestOptions

    config = parse_config(["--source", "csv", "--mapping", "m.toml", "--hour", "2026-12-01T10", "--lake", "/abs/lake"])
    assert config.only_hour == dt.datetime(2026, 12, 1, 10, tzinfo=UTC) and config.batch == "csv__2026-12-01T10"
    assert parse_config(["--date", "2026-12-01"]).only_date == dt.date(2026, 12, 1)
    assert parse_config(["--replace-all"]).replace_all
    with pytest.raises(ValueError, match="only_hour must be the start of an hour"):
        IngestOptions(batch="b", only_hour=dt.datetime(2026, 12, 1, 10, 30))
    with pytest.raises(ValueError, match=r"exclude each other, got \['only_date', 'replace_all'\]"):
        IngestOptions(batch="b", only_date=dt.date(2026, 12, 1), replace_all=True)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for args, message in ((["--hour", "2026-12-01T10", "--date", "2026-12-01"],
                           "argument --date: not allowed with argument --hour"),
                          (["--hour", "2026-12-01 10"],
                           "argument --hour: expected a UTC hour YYYY-MM-DDTHH (e.g. 2026-12-01T10), got '2026-12-01 10'")):
        failed = subprocess.run([sys.executable, "-m", "jobs.ingest", *args], capture_output=True, text=True,
                                env=env, cwd=REPO)
        assert failed.returncode == 2 and failed.stderr.strip().splitlines()[-1].endswith(message), failed.stderr


@pytest.mark.slow
def test_the_hourly_dag_command_ingests_an_hour_and_a_rerun_writes_nothing(tmp_path):
    """The command the hourly DAG runs, twice, through the job's own process."""
    from lake_contract.delta_snapshot import table_version

    lake = tmp_path / "lake"
    (tmp_path / "users.csv").write_text("uid,age\nu1,30\n")
    (tmp_path / "hour.csv").write_text(f"uid,sku,ts\nu1,i1,{_at(10)}\nu1,i2,{_at(10.5)}\n")
    (tmp_path / "items.csv").write_text("sku\ni1\ni2\n")
    (tmp_path / "m.toml").write_text(
        '[interactions]\npath = "hour.csv"\nuser_id = "uid"\nitem_id = "sku"\ntimestamp = "ts"\n'
        '[users]\npath = "users.csv"\nid = "uid"\nnumeric = ["age"]\n[items]\npath = "items.csv"\nid = "sku"\n')
    command = [sys.executable, "-m", "jobs.ingest", "--source", "csv", "--mapping", str(tmp_path / "m.toml"),
               "--hour", "2026-01-01T10", "--lake", str(lake), "--master", "local[1]"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    first = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "bronze/interactions: 2 rows -> version 0" in first.stdout, first.stdout
    assert _bronze(lake) == [("u1", "i1", T + dt.timedelta(hours=10), None, T.date()),
                             ("u1", "i2", T + dt.timedelta(hours=10.5), None, T.date())]
    second = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "bronze/interactions: unchanged: --hour 2026-01-01T10 already holds exactly these 2 events" in second.stdout
    assert {t: table_version(str(lake / "bronze" / t)) for t in ("interactions", "users", "items")} == {
        "interactions": 0, "users": 0, "items": 0}


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
