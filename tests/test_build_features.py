"""Full and incremental feature/pair builds on a literal lake: exact rows and invariants."""

from __future__ import annotations

import datetime as dt
import math
from pathlib import Path

import pytest

pytestmark = pytest.mark.spark

DAY1 = 1767225600  # 2026-01-01T00:00:00Z
HOUR10 = DAY1 + 86400 + 10 * 3600  # 2026-01-02T10:00:00Z


def _ingest(spark, lake_root: Path, folder: Path, events, users, items, only_date=None, batch="b"):
    from lake_contract.lake import Lake
    from spark_features.delta_io import DeltaLakeIO
    from spark_features.ingest import IngestOptions, ingest, read_source
    from spark_features.sources import EntitySpec, InteractionsSpec, SourceSpec

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "e.csv").write_text("uid,sku,ts,stars\n" + "\n".join(f"{u},{i},{t},{r}" for u, i, t, r in events) + "\n")
    (folder / "u.csv").write_text("uid,gender,age\n" + "\n".join(f"{u},{g},{a}" for u, g, a in users) + "\n")
    (folder / "i.csv").write_text("sku,genres\n" + "\n".join(f"{i},{g}" for i, g in items) + "\n")
    spec = SourceSpec(
        name="t",
        interactions=InteractionsSpec(path=str(folder / "e.csv"), user_id="uid", item_id="sku", timestamp="ts",
                                      rating="stars", rating_range=(1.0, 5.0)),
        users=EntitySpec(table="users", path=str(folder / "u.csv"), id="uid", categorical=("gender",), numeric=("age",)),
        items=EntitySpec(table="items", path=str(folder / "i.csv"), id="sku", multi_valued={"genres": "|"}),
    )
    ingest(spark, DeltaLakeIO(spark), Lake(str(lake_root)), read_source(spark, spec), spec,
           IngestOptions(batch=batch, only_date=only_date, max_bad_fraction=0.0, run_id="r"), say=lambda _s: None)


DAY1_EVENTS = [
    ("u1", "i1", DAY1 + 100, 5), ("u1", "i2", DAY1 + 200, 5), ("u1", "i3", DAY1 + 300, 5), ("u1", "i4", DAY1 + 400, 5),
    ("u2", "i1", DAY1 + 150, 5), ("u2", "i2", DAY1 + 250, 5), ("u2", "i5", DAY1 + 250, 5),
    ("u3", "i2", DAY1 + 500, 5),
]
USERS = [("u1", "F", 30), ("u2", "M", 40), ("u3", "F", 50)]
ITEMS = [("i1", "a|b"), ("i2", "b"), ("i3", "a"), ("i4", "c"), ("i5", "b|c")]


def _config(**kw):
    from lake_contract.feature_config import FeatureConfig

    return FeatureConfig(history_length=3, negatives=kw.pop("negatives", "random:2"), numeric_buckets=2, **kw)


def _rows(lake_root, table, key=None):
    from lake_contract.delta_snapshot import read_table_deltars

    rows = read_table_deltars(str(Path(lake_root) / table)).to_pylist()
    return sorted(rows, key=key or (lambda r: repr(sorted(r.items()))))


@pytest.fixture(scope="module")
def built_lake(spark, tmp_path_factory):
    """One full build shared by the read-only tests (the incremental test works on a copy)."""
    from lake_contract.lake import Lake
    from spark_features.delta_io import DeltaLakeIO
    from spark_features.training_data import build_training_data

    tmp_path = tmp_path_factory.mktemp("built")
    lake_root = tmp_path / "lake"
    _ingest(spark, lake_root, tmp_path / "day1", DAY1_EVENTS, USERS, ITEMS)
    report = build_training_data(spark, DeltaLakeIO(spark), Lake(str(lake_root)), _config(), say=lambda _s: None)
    return lake_root, report


def test_full_build_vocab_splits_history_and_seen_items_are_exact(built_lake):
    from lake_contract.vocab_registry import read_vocab_mapping

    lake_root, report = built_lake
    # Index order: occurrences (events + the users/items table row) desc, then value.
    assert read_vocab_mapping(str(lake_root), "user_id") == {"u1": 1, "u2": 2, "u3": 3}
    assert read_vocab_mapping(str(lake_root), "item_id") == {"i2": 1, "i1": 2, "i3": 3, "i4": 4, "i5": 5}
    assert report.pair_counts == {"train": 4, "valid": 2, "test": 2}
    assert report.holdout_users == 2  # u3 has one positive: nothing held out

    def view(split):
        return {(r["user_idx"], r["item_idx"]): (r["hist"], r.get("seen_items")) for r in _rows(lake_root, f"pairs/{split}")}

    assert view("test") == {(1, 4): ([3, 1, 2], [1, 2, 3]), (2, 5): ([2, 0, 0], [2])}
    assert view("valid") == {(1, 3): ([1, 2, 0], [1, 2]), (2, 1): ([2, 0, 0], [2])}  # u2's i2 is index 1
    assert view("train") == {(1, 2): ([0, 0, 0], None), (1, 1): ([2, 0, 0], None), (2, 2): ([0, 0, 0], None),
                             (3, 1): ([0, 0, 0], None)}


def test_full_build_item_features_and_log_q(built_lake):
    lake_root, _ = built_lake
    items = {r["item_id"]: r for r in _rows(lake_root, "features/items")}
    # training positives: i1 twice (u1, u2), i2 twice (u1, u3): 4 in all
    assert (items["i1"]["n_positives"], items["i2"]["n_positives"], items["i3"]["n_positives"]) == (2, 2, 0)
    assert math.isclose(items["i1"]["log_q"], math.log(2 / 4))
    assert math.isclose(items["i3"]["log_q"], math.log(0.5 / 4))  # no training positive: half a positive
    assert items["i1"]["n_events"] == 2 and items["i2"]["n_events"] == 3
    genres = {r["value"]: r["index"] for r in _rows(lake_root, "vocab/items.genres")}
    assert items["i1"]["genres_idx"] == [genres["a"], genres["b"]]
    assert items["i1"]["primary_category_idx"] == genres["a"]  # first genre


def test_negatives_are_never_positives_of_their_user(built_lake):
    lake_root, report = built_lake
    positives: dict[int, set[int]] = {}
    for split in ("train", "valid", "test"):
        for r in _rows(lake_root, f"pairs/{split}"):
            positives.setdefault(r["user_idx"], set()).add(r["item_idx"])
    produced = 0
    for split in ("train", "valid", "test"):
        for r in _rows(lake_root, f"pairs/{split}"):
            assert not set(r["neg_item_idx"]) & positives[r["user_idx"]]
            assert r["neg_kind"] == ["random"] * len(r["neg_item_idx"])
            produced += len(r["neg_item_idx"])
    # u1 touched 4 of 5 items: only item 5 is left, so its pairs get 1 negative, not 2.
    assert all(r["neg_item_idx"] == [5] for r in _rows(lake_root, "pairs/train") if r["user_idx"] == 1)
    assert produced == sum(sum(m.values()) for m in report.negative_mix.values())


def test_pair_files_are_cut_by_pair_id_hash_so_users_are_mixed_in_every_file(spark, built_lake):
    """Each pairs file holds the rows of one Spark hash partition of ``pair_id`` (16 of them:
    MIN_PAIR_FILES), i.e. the rows are spread by a hash unrelated to the user, not clustered
    by the user-partitioned history window that produced them."""
    from pyspark.sql import functions as F

    from lake_contract.delta_snapshot import resolve_snapshot, snapshot_file_path
    from spark_features.training_data import MIN_PAIR_FILES

    lake_root, report = built_lake
    for split in ("train", "valid", "test"):
        files = [snapshot_file_path(f) for f in resolve_snapshot(str(lake_root / f"pairs/{split}")).files]
        rows = spark.read.parquet(*files).select(
            F.input_file_name().alias("file"), F.pmod(F.hash("pair_id"), F.lit(MIN_PAIR_FILES)).alias("part")).collect()
        assert len(rows) == report.pair_counts[split]
        part_of_file: dict[str, set[int]] = {}
        for r in rows:
            part_of_file.setdefault(r["file"], set()).add(r["part"])
        assert all(len(parts) == 1 for parts in part_of_file.values()), part_of_file
        assert len(part_of_file) == len({r["part"] for r in rows})  # one file per non-empty partition


DAY2_EVENTS = [("u4", "i6", HOUR10 + 10, 5), ("u4", "i1", HOUR10 + 20, 4), ("u1", "i6", HOUR10 + 30, 5),
               ("u3", "i6", HOUR10 + 3600, 5)]  # the last one is in the next hour


def _snapshot_all(lake_root):
    tables = ["vocab/user_id", "vocab/item_id", "vocab/users.gender", "vocab/items.genres",
              "features/users", "features/items", "features/user_state", "features/item_state", "pairs/incremental"]
    return {t: _rows(lake_root, t) for t in tables}


def test_incremental_hour_appends_ids_merges_features_and_is_idempotent(spark, built_lake, tmp_path):
    import shutil

    from lake_contract.delta_snapshot import table_version
    from lake_contract.lake import Lake
    from lake_contract.vocab_registry import read_vocab_mapping
    from spark_features.delta_io import DeltaLakeIO
    from spark_features.incremental import build_incremental

    lake_root = tmp_path / "lake"
    shutil.copytree(built_lake[0], lake_root)
    users_before = {r["user_id"]: r for r in _rows(lake_root, "features/users")}
    old_items = read_vocab_mapping(str(lake_root), "item_id")
    _ingest(spark, lake_root, tmp_path / "day2", DAY2_EVENTS, [*USERS, ("u4", "M", 20)], [*ITEMS, ("i6", "d")],
            only_date=dt.date(2026, 1, 2), batch="day2")
    io, lake = DeltaLakeIO(spark), Lake(str(lake_root))
    start = dt.datetime(2026, 1, 2, 10, tzinfo=dt.UTC)

    def run():
        return build_incremental(spark, io, lake, _config(), start, start + dt.timedelta(hours=1),
                                 "2026-01-02T10", say=lambda _s: None)

    report = run()
    assert (report.events, report.new_users, report.new_items, report.pairs) == (3, 1, 1, 3)
    # The fast path: every touched user and item starts from its state row (or, new, from the
    # full build's as_of: one microsecond after day 1's last event), none reads its whole past.
    full_as_of = dt.datetime(2026, 1, 1, 0, 8, 20, 1, tzinfo=dt.UTC)
    assert (report.past_since, report.fallback_users, report.fallback_items) == (full_as_of, 0, 0)
    end = start + dt.timedelta(hours=1)
    # features/item_state: i1 (index 2) and i6 (6) gained the hour's events, the rest unchanged.
    assert [tuple(r.values()) for r in _rows(lake_root, "features/item_state", key=lambda r: r["item_idx"])] == [
        (1, 3, 3, full_as_of), (2, 3, 3, end), (3, 1, 1, full_as_of), (4, 1, 1, full_as_of),
        (5, 1, 1, full_as_of), (6, 2, 2, end)]
    state = {r["user_id"]: (r["n_events"], r["last_event_ts"], r["recent"], r["seen"], r["as_of"])
             for r in _rows(lake_root, "features/user_state")}
    at = lambda seconds: dt.datetime.fromtimestamp(seconds, dt.UTC)  # noqa: E731
    assert state["u1"] == (5, at(HOUR10 + 30), [6, 4, 3, 1, 2], [1, 2, 3, 4, 6], end)  # newest first
    assert state["u4"] == (2, at(HOUR10 + 20), [2, 6], [2, 6], end)
    assert state["u3"] == (1, at(DAY1 + 500), [1], [1], full_as_of)
    items_after = read_vocab_mapping(str(lake_root), "item_id")
    assert {k: items_after[k] for k in old_items} == old_items  # yesterday's ids keep their index
    assert items_after["i6"] == 6
    assert read_vocab_mapping(str(lake_root), "user_id")["u4"] == 4

    pairs = {(r["user_idx"], r["item_idx"]): r["hist"] for r in _rows(lake_root, "pairs/incremental")}
    assert pairs == {(4, 6): [0, 0, 0], (4, 2): [6, 0, 0], (1, 6): [4, 3, 1]}
    users_after = {r["user_id"]: r for r in _rows(lake_root, "features/users")}
    assert users_after["u4"]["n_events"] == 2 and users_after["u1"]["n_events"] == 5
    assert users_after["u2"] == users_before["u2"] and users_after["u3"] == users_before["u3"]

    first = _snapshot_all(lake_root)
    vocab_version = table_version(str(lake_root / "vocab/user_id"))
    # Again, given no settings: the full build's saved ones (history 3, random:2) are used, so
    # the tables are the same as with _config() (the defaults, history 50, would change them).
    again = build_incremental(spark, io, lake, None, start, start + dt.timedelta(hours=1), "2026-01-02T10",
                              say=lambda _s: None)
    # Their state rows now hold this window, so the re-run reads their whole history instead:
    # the slow path, with the same tables.
    assert (again.fallback_users, again.fallback_items) == (2, 2)
    assert _snapshot_all(lake_root) == first
    assert table_version(str(lake_root / "vocab/user_id")) == vocab_version  # nothing new: no commit

    empty = build_incremental(spark, io, lake, _config(), start - dt.timedelta(hours=5),
                              start - dt.timedelta(hours=4), "2026-01-02T05", say=lambda _s: None)
    assert empty.events == 0 and not empty.written

    # Backfill of day 2 builds it once; a re-run skips it (resumable); --force rebuilds it.
    from spark_features.incremental import backfill_days

    days = [dt.date(2026, 1, 1), dt.date(2026, 1, 2)]
    ran = backfill_days(spark, io, lake, _config(), days, say=lambda _s: None)
    assert sorted(ran) == ["2026-01-01", "2026-01-02"]
    assert ran["2026-01-02"].events == 4  # the whole day, the 11:00 event included
    assert backfill_days(spark, io, lake, None, days, say=lambda _s: None) == {}
    assert sorted(backfill_days(spark, io, lake, _config(), days[1:], force=True, say=lambda _s: None)) == ["2026-01-02"]


def test_the_full_build_saves_its_feature_settings_in_the_lake(built_lake):
    from lake_contract.delta_snapshot import read_table_deltars
    from lake_contract.feature_config import load_saved_feature_config

    lake_root, report = built_lake
    saved = load_saved_feature_config(str(lake_root))
    assert saved.config == _config() and saved.version == report.written["features/config"].version
    assert saved.as_of.replace(tzinfo=dt.UTC) == report.as_of.replace(tzinfo=dt.UTC)
    rows = read_table_deltars(str(lake_root / "features/config")).to_pylist()
    assert [r["config_json"] for r in rows] == [_config().to_json()]


def test_an_incremental_run_with_other_settings_is_refused_naming_the_fields(spark, built_lake, tmp_path):
    import dataclasses
    import shutil

    from lake_contract.delta_snapshot import table_version
    from lake_contract.errors import TowerlakeError
    from lake_contract.feature_config import FeatureConfigMismatchError
    from lake_contract.lake import Lake
    from spark_features.delta_io import DeltaLakeIO
    from spark_features.incremental import backfill_days, build_incremental

    lake_root = tmp_path / "lake"
    shutil.copytree(built_lake[0], lake_root)
    io, lake = DeltaLakeIO(spark), Lake(str(lake_root))
    vocab_version = table_version(str(lake_root / "vocab/user_id"))
    start = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    other = _config(negatives="random:3", prefix_columns={"users.gender": 1})
    with pytest.raises(FeatureConfigMismatchError) as err:
        build_incremental(spark, io, lake, other, start, start + dt.timedelta(hours=1), "2026-01-01T00",
                          say=lambda _s: None)
    assert isinstance(err.value, TowerlakeError)
    assert str(err.value).startswith(
        "the incremental build uses feature settings that differ from the full build's (features/config v0) in "
        "2 field(s): negatives (saved 'random:2', the incremental build 'random:3'), prefix_columns (saved {}, "
        "the incremental build {'users.gender': 1}). Pairs of one model must come from one set of settings")
    with pytest.raises(FeatureConfigMismatchError, match=r"^the backfill uses feature settings .* history_length "
                       r"\(saved 3, the backfill 4\)"):
        backfill_days(spark, io, lake, dataclasses.replace(_config(), history_length=4), [start.date()],
                      say=lambda _s: None)
    assert not (lake_root / "pairs/incremental").exists()
    assert table_version(str(lake_root / "vocab/user_id")) == vocab_version  # refused before writing anything


def test_build_features_and_backfill_jobs_take_the_saved_settings_and_refuse_others(built_lake, tmp_path):
    """Job level, before Spark starts: exit 2 with the fields named; backfill has no feature flags."""
    import os
    import shutil
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo)}

    def job(*args):
        proc = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, env=env, cwd=repo,
                              timeout=120)
        return proc.returncode, proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ""

    code, last = job("jobs.build_features", "--mode", "incremental", "--hour", "2026-01-02T10", "--lake",
                     str(built_lake[0]), "--history-length", "3", "--buckets", "7")
    assert code == 2
    assert last.startswith("error: build_features: the incremental build uses feature settings that differ from "
                           "the full build's (features/config v0) in 1 field(s): numeric_buckets (saved 2, the "
                           "incremental build 7)"), last
    helped = subprocess.run([sys.executable, "-m", "jobs.backfill", "--help"], capture_output=True, text=True,
                            env=env, cwd=repo)
    assert helped.returncode == 0 and "features/config" in helped.stdout
    for flag in ("--history-length", "--label-min-rating", "--negatives", "--prefix", "--seed"):
        assert flag not in helped.stdout
    code, last = job("jobs.backfill", "--start", "2026-01-01", "--end", "2026-01-02", "--history-length", "3")
    assert code == 2 and "unrecognized arguments: --history-length 3" in last
    bare = tmp_path / "lake"
    shutil.copytree(built_lake[0] / "bronze", bare / "bronze")
    code, last = job("jobs.backfill", "--start", "2026-01-01", "--end", "2026-01-02", "--lake", str(bare))
    assert code == 2 and last.endswith("does not exist: run the full build first (python -m jobs.build_features); "
                                       "it saves them"), last
