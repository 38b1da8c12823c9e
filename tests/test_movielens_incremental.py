"""The hourly incremental build on MovieLens-100K: yesterday's vocabulary indices never move,
new users and items get the next free indices, and the same hour run twice leaves identical
tables (issue: incremental invariants at real scale, not only on a literal lake).

The suite's default engine is native delta-spark (``ml_lake`` is built with it); this hour runs
on delta-rs explicitly, so the delta-rs chain (ingest, vocab commits, copy-on-write MERGE,
partition replace) keeps running at real scale, on tables the other engine wrote."""

from __future__ import annotations

import dataclasses
import datetime as dt
import shutil
from pathlib import Path

import pytest

pytestmark = [pytest.mark.spark, pytest.mark.slow]

HOUR = dt.datetime(1998, 4, 23, 10, tzinfo=dt.UTC)  # the hour after ML-100K's last event (1998-04-22 23:10)
VOCABS = ("user_id", "item_id", "users.gender", "users.occupation", "users.zip_code", "users.zip_code_prefix",
          "items.genres")
NEW_USERS = ["2001\t30\tF\tastronaut\t12345", "2002\t40\tM\twriter\t54321"]  # "astronaut" is a new occupation
NEW_ITEMS = ["9001\tNew Movie A\t1998\tDrama", "9002\tNew Movie B\t1998\tComedy Drama"]
# (user, item, seconds into the hour): an old user on a new and an old item, two new users
EVENTS = [("196", "9001", 60), ("196", "1", 120), ("2001", "242", 30), ("2001", "9001", 900),
          ("2002", "9002", 1200), ("2002", "50", 1800), ("2002", "9001", 2400)]


def _hour_source(folder: Path):
    """The ML-100K mapping over copies of its files plus this hour's rows (same TSV layout)."""
    from spark_features.sources import movielens_100k_dir, movielens_100k_spec

    ml = movielens_100k_dir()
    folder.mkdir(parents=True)
    header = (ml / "ml-100k.inter").read_text().splitlines()[0]
    start = int(HOUR.timestamp())
    (folder / "hour.inter").write_text(header + "\n" + "".join(f"{u}\t{i}\t5\t{start + s}\n" for u, i, s in EVENTS))
    for name, extra in (("ml-100k.user", NEW_USERS), ("ml-100k.item", NEW_ITEMS)):
        text = (ml / name).read_text()
        (folder / name).write_text(text + ("" if text.endswith("\n") else "\n") + "\n".join(extra) + "\n")
    spec = movielens_100k_spec()
    return dataclasses.replace(
        spec,
        interactions=dataclasses.replace(spec.interactions, path=str(folder / "hour.inter")),
        users=dataclasses.replace(spec.users, path=str(folder / "ml-100k.user")),
        items=dataclasses.replace(spec.items, path=str(folder / "ml-100k.item")),
    )


def _rows(root: Path, table: str) -> list:
    from lake_contract.delta_snapshot import read_table_deltars

    return sorted(read_table_deltars(str(root / table)).to_pylist(), key=lambda r: repr(sorted(r.items())))


def _recent_in_full_build(root: Path, user_idx: int) -> list:
    """The user's ``recent`` items in features/user_state version 0 (the full build's)."""
    from lake_contract.delta_snapshot import read_table_deltars

    rows = read_table_deltars(str(root / "features/user_state"), 0).to_pylist()
    recent = next(r["recent"] for r in rows if r["user_idx"] == user_idx)
    assert len(recent) == 39
    return recent


def test_an_hour_with_new_users_and_items_keeps_old_indices_and_reruns_identically(spark, ml_lake, tmp_path):
    from lake_contract.delta_snapshot import table_version
    from lake_contract.feature_config import FeatureConfig
    from lake_contract.lake import Lake, to_local_path
    from lake_contract.vocab_registry import read_vocab_mapping
    from spark_features.delta_io import DeltaLakeIO
    from spark_features.incremental import build_incremental
    from spark_features.ingest import IngestOptions, ingest, read_source

    root = tmp_path / "lake"
    shutil.copytree(to_local_path(ml_lake[1].root), root)
    before = {name: read_vocab_mapping(str(root), name) for name in VOCABS}
    io, lake = DeltaLakeIO(spark, engine="delta-rs"), Lake(str(root))
    spec = _hour_source(tmp_path / "hour")
    ingest(spark, io, lake, read_source(spark, spec), spec,
           IngestOptions(batch="hour", only_date=HOUR.date(), max_bad_fraction=0.0), say=lambda _s: None)
    config = FeatureConfig(prefix_columns={"users.zip_code": 3})
    # Ingested, not yet built: serving's state path adds the hour's events to the nightly state.
    from tests.test_user_state import _schema, every_user_both_ways

    assert every_user_both_ways(str(root), _schema(str(root)), extra_ids=["2001"]) == (944, 1)

    def run():
        return build_incremental(spark, io, lake, config, HOUR, HOUR + dt.timedelta(hours=1),
                                 HOUR.strftime("%Y-%m-%dT%H"), say=lambda _s: None)

    report = run()
    assert (report.events, report.new_users, report.new_items, report.pairs) == (7, 2, 2, 7)
    after = {name: read_vocab_mapping(str(root), name) for name in VOCABS}
    for name in VOCABS:  # every value known yesterday keeps its index, in every vocabulary
        assert {value: after[name][value] for value in before[name]} == before[name], name
    # new ids take the next free indices (count desc, then value): 2002 has 3 events, 2001 has 2;
    # item 9001 has 3, 9002 has 1
    assert {u: after["user_id"][u] for u in ("2002", "2001")} == {"2002": 944, "2001": 945}
    assert {i: after["item_id"][i] for i in ("9001", "9002")} == {"9001": 1683, "9002": 1684}
    assert after["users.occupation"]["astronaut"] == max(before["users.occupation"].values()) + 1
    assert len(after["user_id"]) == len(before["user_id"]) + 2

    pairs = _rows(root, "pairs/incremental")
    by_event = {(r["user_idx"], r["item_idx"]): r for r in pairs}
    user, item = after["user_id"], after["item_id"]
    # history is strictly earlier events only: 2002's third event sees its first two, newest first
    assert by_event[(user["2002"], item["9001"])]["hist"][:3] == [item["50"], item["9002"], 0]
    assert by_event[(user["2001"], item["242"])]["hist"][0] == 0  # a new user's first event: no history
    ml_196 = sum(1 for r in _rows(root, "bronze/interactions") if r["user_id"] == "196" and r["event_ts"] < HOUR)
    assert ml_196 == 39  # user 196's MovieLens ratings, all before this hour
    assert by_event[(user["196"], item["9001"])]["hist_len"] == ml_196  # the whole past, nothing of this hour
    assert by_event[(user["196"], item["1"])]["hist"][0] == item["9001"]  # ... and the next event sees the first
    features = {r["user_idx"]: r for r in _rows(root, "features/users")}
    assert features[user["2001"]]["occupation_idx"] == after["users.occupation"]["astronaut"]
    assert features[user["2002"]]["n_events"] == 3
    state = {r["user_idx"]: r for r in _rows(root, "features/user_state")}
    assert len(state) == len(after["user_id"])  # every user, the two new ones included
    # 196: the hour's two events in front of the 39 of the full build (newest first)
    assert state[user["196"]]["n_events"] == 41
    assert state[user["196"]]["recent"] == [item["1"], item["9001"], *_recent_in_full_build(root, user["196"])]
    assert (state[user["2002"]]["recent"], state[user["2002"]]["seen"]) == (
        [item["9001"], item["50"], item["9002"]], sorted([item["9001"], item["50"], item["9002"]]))
    assert state[user["2002"]]["as_of"] == state[user["196"]]["as_of"] != state[user["1"]]["as_of"]
    # after the MERGE the state path is again the events path, new users included
    assert every_user_both_ways(str(root), _schema(str(root))) == (945, 0)

    tables = [*(f"vocab/{name}" for name in VOCABS), "features/users", "features/items", "features/user_state",
              "pairs/incremental"]
    first = {t: _rows(root, t) for t in tables}
    vocab_versions = {name: table_version(str(root / "vocab" / name)) for name in VOCABS}
    again = run()
    assert (again.events, again.new_users, again.new_items, again.pairs) == (7, 0, 0, 7)
    assert {t: _rows(root, t) for t in tables} == first
    assert {name: table_version(str(root / "vocab" / name)) for name in VOCABS} == vocab_versions  # no commit
