"""features/user_state: the per-user serving state (last items, event count, seen items).

The state is written by the full build and MERGEd by the incremental build
(tests/test_movielens_incremental.py checks that part); serving's "now" queries read it plus
the events since each row's ``as_of``. These tests pin the rows on literal events and require
the state path to give exactly the inputs of the reference path (every event of the user) for
every MovieLens-100K user, also for a model whose item table is older than the vocabulary
(the rows the kept recent items cannot answer fall back to the events)."""

from __future__ import annotations

import dataclasses
import datetime as dt

import numpy as np
import pytest

pytestmark = [pytest.mark.spark]

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def _at(minutes: int) -> dt.datetime:
    return T0 + dt.timedelta(minutes=minutes)


def test_state_rows_on_literal_events(spark):
    from spark_features.training_data import user_state_rows

    users = spark.createDataFrame([("a", 1), ("b", 2), ("c", 3)], "user_id string, user_idx int")
    events = spark.createDataFrame(
        # user 1: a tie at minute 5 (larger item first), a repeat of item 7, one event at as_of (excluded)
        [(1, 7, _at(1)), (1, 4, _at(5)), (1, 9, _at(5)), (1, 7, _at(8)), (1, 3, _at(10)),
         (2, 5, _at(2))],
        "user_idx int, item_idx int, event_ts timestamp")
    rows = {r["user_id"]: r.asDict() for r in user_state_rows(users, events, _at(10), 3).collect()}
    naive = {k: v.replace(tzinfo=None) for k, v in {"at8": _at(8), "at2": _at(2), "as_of": _at(10)}.items()}
    local = {k: dt.datetime.fromtimestamp(v.replace(tzinfo=dt.UTC).timestamp()) for k, v in naive.items()}
    assert rows == {
        "a": {"user_idx": 1, "user_id": "a", "n_events": 4, "last_event_ts": local["at8"], "recent": [7, 9, 4],
              "seen": [4, 7, 9], "as_of": local["as_of"]},
        "b": {"user_idx": 2, "user_id": "b", "n_events": 1, "last_event_ts": local["at2"], "recent": [5],
              "seen": [5], "as_of": local["as_of"]},
        "c": {"user_idx": 3, "user_id": "c", "n_events": 0, "last_event_ts": None, "recent": [], "seen": [],
              "as_of": local["as_of"]},
    }


def _schema(lake_root: str, **changes):
    from index_builder.queries import snapshot_column_names
    from lake_contract.delta_snapshot import resolve_snapshot
    from lake_contract.lake import Lake
    from trainer.feature_schema import load_feature_schema

    columns = snapshot_column_names(resolve_snapshot(Lake(lake_root).table("pairs/train")))
    return dataclasses.replace(load_feature_schema(lake_root, columns, history_length=50), **changes)


def assert_same_queries(state, events) -> None:
    assert state.user_ids == events.user_ids
    for name in ("user_idx", "known", "n_events", "seen_offsets", "seen_values"):
        np.testing.assert_array_equal(getattr(state, name), getattr(events, name), err_msg=name)
    assert state.inputs.keys() == events.inputs.keys()
    for name in state.inputs:
        np.testing.assert_array_equal(state.inputs[name].numpy(), events.inputs[name].numpy(), err_msg=name)


def every_user_both_ways(lake_root: str, schema, extra_ids=()) -> tuple[int, int]:
    """Builds every user's "now" query from the state and from the events; asserts they are
    equal; returns (users, rows the state path answered from the events)."""
    from index_builder.queries import UserQueryBuilder

    with_state = UserQueryBuilder(lake_root, schema)
    reference = UserQueryBuilder(lake_root, schema, use_state=False)
    assert with_state.uses_state and not reference.uses_state
    ids = [u for batch in reference.iter_user_ids() for u in batch] + list(extra_ids)
    got = with_state.build(ids)
    assert_same_queries(got, reference.build(ids))
    return len(ids), with_state.last_fallbacks


def test_state_queries_equal_the_event_queries_for_every_movielens_user(ml_lake):
    from lake_contract.delta_snapshot import read_table_deltars
    from lake_contract.feature_contract import USER_STATE_TABLE

    _io, lake, report = ml_lake
    state = read_table_deltars(lake.table(USER_STATE_TABLE)).to_pylist()
    assert len(state) == report.vocabs["user_id"].size - 1 == 943
    by_id = {r["user_id"]: r for r in state}
    assert by_id["196"]["n_events"] == 39 and len(by_id["196"]["seen"]) == 39
    assert len(by_id["196"]["recent"]) == 39  # fewer events than the 100 kept
    assert max(len(r["recent"]) for r in state) == 100

    users, fallbacks = every_user_both_ways(lake.root, _schema(lake.root), extra_ids=["no-such-user"])
    assert (users, fallbacks) == (944, 1)  # only the unknown id reads the events
    # The state is as of just after the last event: of the lake's files only those that may
    # hold it are read (date partition and logged max event_ts), not one file per day.
    from index_builder.queries import UserQueryBuilder
    from lake_contract.delta_snapshot import resolve_snapshot
    from lake_contract.lake import BRONZE_INTERACTIONS

    bronze = resolve_snapshot(lake.table(BRONZE_INTERACTIONS))
    builder = UserQueryBuilder(lake.root, _schema(lake.root))
    last_day = max(p["event_date"] for p in bronze.partition_values)
    assert 1 <= builder.fresh_files <= sum(p["event_date"] == last_day for p in bronze.partition_values)
    assert len(bronze.files) > 100 * builder.fresh_files
    # A model trained when the catalog had 600 items: histories drop the newer items, and the
    # users whose 100 kept items hold fewer than 50 old ones are answered from their events.
    users, fallbacks = every_user_both_ways(lake.root, _schema(lake.root, num_items=600))
    assert users == 943 and 0 < fallbacks < 943
