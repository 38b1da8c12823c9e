"""Append-only vocabularies: exact indices in, stable indices across updates, conflicts, readers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lake_contract.vocab_registry import VocabInfo, vocab_table

REPO = Path(__file__).resolve().parents[1]
HOUR = "2026-01-05T13"


@pytest.fixture
def io(spark):
    from spark_features.delta_io import DeltaLakeIO

    # delta-rs: these tests pin the stored schema's NOT NULL columns, which delta-rs keeps; the
    # native writer records every column of a DataFrame-created table as nullable (open: make
    # the vocab writer declare them on native too, then run these over both engines).
    return DeltaLakeIO(spark, engine="delta-rs")


@pytest.fixture
def lake(lake_root):
    from lake_contract.lake import Lake

    return Lake(str(lake_root))


def _occurrences(spark, *values):
    """The ``values`` input of update_vocab: one row per occurrence."""
    return spark.createDataFrame([(v,) for v in values], "value string")


def _vocab(spark, *pairs):
    return spark.createDataFrame(list(pairs), "value string, index long")


def _seed_vocab(io, lake, name, rows) -> None:
    """Write vocab/<name> as version 0 directly: the starting state of a test about later updates."""
    from spark_features.vocab import VOCAB_SCHEMA

    io.write_table(io.spark.createDataFrame(rows, VOCAB_SCHEMA), lake.table(vocab_table(name)))


def _table_rows(lake, name) -> list[tuple]:
    """Every stored row of vocab/<name>, read by delta-rs (not Spark), in index order."""
    from lake_contract.delta_snapshot import read_table_deltars

    rows = read_table_deltars(lake.table(vocab_table(name))).to_pylist()
    return sorted(((r["value"], r["index"], r["count"], r["min_count"], r["added_by"]) for r in rows),
                  key=lambda r: r[1])


# (name, Delta type, nullable) of every vocab table, NOT NULL flags included.
STORED_SCHEMA = [
    ("value", "string", False), ("index", "long", False), ("count", "long", True),
    ("min_count", "integer", True), ("added_by", "string", True),
]


def _delta_schema(lake, name) -> list[tuple]:
    from lake_contract.delta_snapshot import open_table

    schema = json.loads(open_table(lake.table(vocab_table(name))).schema().to_json())
    return [(f["name"], f["type"], f["nullable"]) for f in schema["fields"]]


def _version(lake, name):
    from lake_contract.delta_snapshot import table_version

    return table_version(lake.table(vocab_table(name)))


# Day one: b x3, a x2, c x2, d x1, plus a null and two blanks that are not values.
DAY_ONE = ("b", "c", "a", "b", None, "d", "", "a", "  ", "c", "b")
DAY_ONE_ROWS = [("b", 1, 3, 2, "full"), ("a", 2, 2, 2, "full"), ("c", 3, 2, 2, "full")]


@pytest.mark.spark
def test_first_update_assigns_indices_by_count_desc_then_value(spark, io, lake):
    from lake_contract.vocab_registry import read_vocab_info, read_vocab_mapping, read_vocab_sizes
    from spark_features.vocab import index_column, load_vocab, update_vocab

    # Nothing reaches the threshold: no table is created, and the vocabulary is just index 0.
    empty = update_vocab(io, lake, "user_id", _occurrences(spark, "a", "b", None), min_count=2)
    assert empty == VocabInfo("user_id", size=1, num_values=0, min_count=2, version=None, added=0)
    assert _version(lake, "user_id") is None
    assert load_vocab(io, lake, "user_id").collect() == []

    info = update_vocab(io, lake, "user_id", _occurrences(spark, *DAY_ONE), min_count=2)

    assert info == VocabInfo("user_id", size=4, num_values=3, min_count=2, version=0, added=3)
    # b (3) first; a and c tie on 2 and go by value; d (1 < min_count) gets no index.
    assert _table_rows(lake, "user_id") == DAY_ONE_ROWS
    assert _delta_schema(lake, "user_id") == STORED_SCHEMA

    events = spark.createDataFrame(
        [(1, "a"), (2, "d"), (3, None), (4, "zz"), (5, "b"), (5, "b"), (6, "c")], "event long, user_id string"
    )
    indexed = index_column(events, "user_id", load_vocab(io, lake, "user_id"), "user_idx")
    assert indexed.columns == ["event", "user_id", "user_idx"]
    assert dict(indexed.dtypes)["user_idx"] == "int"
    # d (below min_count), null and an unseen id map to 0; the duplicate row stays twice.
    assert sorted(tuple(r) for r in indexed.collect()) == [
        (1, "a", 2), (2, "d", 0), (3, None, 0), (4, "zz", 0), (5, "b", 1), (5, "b", 1), (6, "c", 3),
    ]

    # The pyspark-free readers the trainer uses see the same vocabulary.
    spark_pairs = {r["value"]: r["index"] for r in load_vocab(io, lake, "user_id").collect()}
    assert read_vocab_mapping(lake.root, "user_id") == spark_pairs == {"b": 1, "a": 2, "c": 3}
    assert read_vocab_info(lake.root, "user_id") == VocabInfo("user_id", 4, 3, 2, 0, added=0)
    assert read_vocab_sizes(lake.root) == {"user_id": 4}


@pytest.mark.spark
def test_later_update_keeps_every_old_index_appends_after_max_and_reruns_as_noop(spark, io, lake):
    from lake_contract.vocab_registry import read_vocab_info, read_vocab_mapping, read_vocab_sizes
    from spark_features.vocab import update_vocab

    _seed_vocab(io, lake, "item_id", DAY_ONE_ROWS)  # what the first update wrote (previous test)

    # An hour later, under a stricter threshold: b is gone and a is below it (both keep their
    # indices); f, d, e qualify and go after the max by count then value; g does not.
    hour = _occurrences(spark, "f", "a", "d", "e", "f", "g", "e", "d", "f", "a", "e", "d", "g", "f")
    info = update_vocab(io, lake, "item_id", hour, min_count=3, run_key=HOUR)

    assert info == VocabInfo("item_id", size=7, num_values=6, min_count=3, version=1, added=3)
    assert _table_rows(lake, "item_id") == [
        *DAY_ONE_ROWS,
        ("f", 4, 4, 3, HOUR), ("d", 5, 3, 3, HOUR), ("e", 6, 3, 3, HOUR),
    ]
    # Spark reads the old rows back as nullable; the rewrite must not relax NOT NULL.
    assert _delta_schema(lake, "item_id") == STORED_SCHEMA
    # min_count is recorded per update: the registry reports the threshold of the newest rows.
    assert read_vocab_info(lake.root, "item_id", version=0) == VocabInfo("item_id", 4, 3, 2, 0)
    assert read_vocab_info(lake.root, "item_id") == VocabInfo("item_id", 7, 6, 3, 1)
    assert read_vocab_mapping(lake.root, "item_id", version=0) == {"b": 1, "a": 2, "c": 3}
    assert read_vocab_sizes(lake.root) == {"item_id": 7}

    rerun = update_vocab(io, lake, "item_id", hour, min_count=3, run_key=HOUR)

    assert rerun == VocabInfo("item_id", size=7, num_values=6, min_count=3, version=1, added=0)
    assert _version(lake, "item_id") == 1  # no new Delta version
    assert [r[:2] for r in _table_rows(lake, "item_id")] == [
        ("b", 1), ("a", 2), ("c", 3), ("f", 4), ("d", 5), ("e", 6),
    ]


@pytest.mark.spark
def test_update_vocabs_gives_each_vocabulary_what_update_vocab_alone_gives_it(spark, io, lake, lake_root):
    """One counting pass for several vocabularies, each in its own state (new, extended, nothing
    to add, nothing reaching the threshold): the same rows, indices and versions, value by
    value, as one update_vocab call per vocabulary on a twin lake."""
    from lake_contract.lake import Lake
    from spark_features.vocab import update_vocab, update_vocabs

    hour = ("f", "a", "d", "e", "f", "g", "e", "d", "f", "a", "e", "d", "g", "f")
    twin = Lake(str(lake_root / "one-by-one"))
    for target in (lake, twin):
        _seed_vocab(io, target, "item_id", DAY_ONE_ROWS)
        _seed_vocab(io, target, "users.gender", [("F", 1, 5, 1, "full"), ("M", 2, 4, 1, "full")])
    updates = {
        "user_id": (_occurrences(spark, *DAY_ONE), 2),  # no table yet: created
        "item_id": (_occurrences(spark, *hour), 3),  # extended after its max index
        "users.gender": (_occurrences(spark, "M", "F", None, "F"), 1),  # nothing new: no version
        "items.genres": (_occurrences(spark, "x", "y"), 2),  # nothing reaches 2: no table
    }

    together = update_vocabs(io, lake, updates, run_key=HOUR)
    alone = {name: update_vocab(io, twin, name, values, min_count, run_key=HOUR)
             for name, (values, min_count) in updates.items()}

    assert list(together) == list(updates)
    assert together == alone
    assert together["item_id"] == VocabInfo("item_id", size=7, num_values=6, min_count=3, version=1, added=3)
    assert together["users.gender"] == VocabInfo("users.gender", size=3, num_values=2, min_count=1, version=0)
    assert together["items.genres"] == VocabInfo("items.genres", size=1, num_values=0, min_count=2, version=None)
    assert _table_rows(lake, "user_id") == [(v, i, c, m, HOUR) for v, i, c, m, _ in DAY_ONE_ROWS]
    assert _table_rows(lake, "item_id") == [
        *DAY_ONE_ROWS, ("f", 4, 4, 3, HOUR), ("d", 5, 3, 3, HOUR), ("e", 6, 3, 3, HOUR)]
    for name in ("user_id", "item_id", "users.gender"):
        assert _table_rows(lake, name) == _table_rows(twin, name)
        assert _version(lake, name) == _version(twin, name)
    assert _version(lake, "items.genres") is None
    assert update_vocabs(io, lake, {}, run_key=HOUR) == {}


def test_registry_reads_every_vocab_table_without_spark(lake_root):
    """Tables written by delta-rs alone (no Spark): sizes, mappings, thresholds, missing tables."""
    import pyarrow as pa
    from deltalake import write_deltalake

    from lake_contract.errors import TableNotFoundError
    from lake_contract.lake import Lake
    from lake_contract.vocab_registry import read_vocab_info, read_vocab_mapping, read_vocab_sizes

    lake = Lake(str(lake_root))
    assert read_vocab_sizes(str(lake_root)) == {}

    def write(name, rows):
        columns = list(zip(*rows, strict=True))
        table = pa.table({
            "value": pa.array(columns[0], pa.string()), "index": pa.array(columns[1], pa.int64()),
            "count": pa.array(columns[2], pa.int64()), "min_count": pa.array(columns[3], pa.int32()),
            "added_by": pa.array(columns[4], pa.string()),
        })
        write_deltalake(str(lake_root / "vocab" / name), table, mode="append")

    # Rows out of index order: the newest threshold is the one on the max index, not the last row.
    write("items.genres", [("drama", 3, 1, 5, HOUR), ("comedy", 1, 9, 1, "full"), ("noir", 2, 4, 1, "full")])
    write("user_id", [("u1", 1, 2, 1, "full")])
    write("user_id", [("u2", 2, 1, 1, HOUR)])
    (lake_root / "vocab" / "not_a_table").mkdir()  # a stray folder is not a vocabulary

    assert read_vocab_sizes(str(lake_root)) == {"items.genres": 4, "user_id": 3}
    assert read_vocab_info(str(lake_root), "items.genres") == VocabInfo("items.genres", 4, 3, 5, 0)
    assert read_vocab_info(str(lake_root), "user_id", version=0) == VocabInfo("user_id", 2, 1, 1, 0)
    assert read_vocab_mapping(lake.root, "items.genres") == {"comedy": 1, "noir": 2, "drama": 3}
    with pytest.raises(TableNotFoundError, match="no vocabulary 'item_id'"):
        read_vocab_info(str(lake_root), "item_id")
    with pytest.raises(TableNotFoundError, match="no vocabulary 'item_id'"):
        read_vocab_mapping(str(lake_root), "item_id")


@pytest.mark.spark
@pytest.mark.parametrize("strategy", ["map", "join"])
def test_index_array_column_keeps_order_length_and_rows(spark, strategy):
    from spark_features.vocab import index_array_column

    vocab = _vocab(spark, ("a", 1), ("b", 2), ("c", 3))
    df = spark.createDataFrame(
        [(1, ["b", "zz", "a"]), (2, []), (3, None), (4, ["a", None, "a"]), (4, ["a", None, "a"]), (5, ["c"])],
        "item long, genres array<string>",
    )
    out = index_array_column(df, "genres", vocab, "genres_idx", strategy=strategy)

    assert out.columns == ["item", "genres", "genres_idx"]
    assert dict(out.dtypes)["genres_idx"] == "array<int>"
    assert sorted((r["item"], r["genres"], r["genres_idx"]) for r in out.collect()) == sorted([
        (1, ["b", "zz", "a"], [2, 0, 1]),
        (2, [], []),
        (3, None, []),
        (4, ["a", None, "a"], [1, 0, 1]),
        (4, ["a", None, "a"], [1, 0, 1]),
        (5, ["c"], [3]),
    ], key=lambda r: (r[0], r[1] or []))


@pytest.mark.spark
def test_index_array_column_auto_with_an_empty_vocab_maps_everything_to_unknown(spark):
    from spark_features.vocab import index_array_column

    df = spark.createDataFrame([(1, ["x", "y"]), (2, None)], "item long, tags array<string>")
    out = index_array_column(df, "tags", _vocab(spark), "tags")  # auto strategy; replaces in place
    assert sorted(tuple(r) for r in out.collect()) == [(1, [0, 0]), (2, [])]


@pytest.mark.spark
def test_index_column_keeps_each_row_once_and_replaces_in_place(spark):
    from spark_features.vocab import index_column

    vocab = _vocab(spark, ("m", 1), ("f", 2))
    df = spark.createDataFrame(
        [("u1", "f"), ("u2", None), ("u3", "x"), ("u3", "x"), ("u4", "m")], "user_id string, gender string"
    )
    for broadcast in (True, False):
        out = index_column(df, "gender", vocab, "gender", broadcast=broadcast)
        assert out.columns == ["user_id", "gender"]
        assert sorted(tuple(r) for r in out.collect()) == [("u1", 2), ("u2", 0), ("u3", 0), ("u3", 0), ("u4", 1)]


@pytest.mark.spark
@pytest.mark.parametrize("race_at, existing", [("planned", True), ("staged", False)])
def test_concurrent_updates_one_commits_the_other_conflicts(spark, io, lake, race_at, existing):
    """Two updates planned against the same version (an existing table, or none yet): while the
    loser is between reading and committing, the winner commits; the loser raises and leaves
    nothing behind."""
    from lake_contract.delta_snapshot import resolve_snapshot
    from lake_contract.errors import CommitConflictError
    from spark_features.vocab import update_vocab

    winner_rows = [("y", 1, 1, 1, "winner")]
    if existing:
        _seed_vocab(io, lake, "item_id", [("a", 1, 2, 1, "full"), ("b", 2, 1, 1, "full")])
        winner_rows = [("a", 1, 2, 1, "full"), ("b", 2, 1, 1, "full"), ("y", 3, 1, 1, "winner")]

    def competing_update(stage: str) -> None:
        if stage == race_at:
            update_vocab(io, lake, "item_id", _occurrences(spark, "y"), run_key="winner")

    with pytest.raises(CommitConflictError, match="re-run"):
        update_vocab(io, lake, "item_id", _occurrences(spark, "x"), run_key="loser", _race_hook=competing_update)

    # Committed as planned, the loser would have given x the winner's index for y, or dropped y.
    last = 1 if existing else 0
    assert _version(lake, "item_id") == last
    assert _table_rows(lake, "item_id") == winner_rows
    uri = lake.table("vocab/item_id")
    named = {f.removeprefix("file://") for v in range(last + 1) for f in resolve_snapshot(uri, v).files}
    table_dir = Path(next(iter(named))).parent
    assert {str(p) for p in table_dir.rglob("*.parquet")} == named, "the loser's files must be removed"
    assert not [p.name for p in table_dir.iterdir() if p.name.startswith("w-")]


@pytest.mark.spark
def test_check_vocab_extends_refuses_shrinking_and_duplicates(spark):
    from spark_features.vocab import VocabInvariantError, check_vocab_extends

    old = _vocab(spark, ("a", 1), ("b", 2))
    assert check_vocab_extends(old, _vocab(spark, ("a", 1), ("b", 2), ("c", 3))) == (3, 3)

    bad = {
        "vocab shrinking": _vocab(spark, ("a", 1), ("c", 3)),  # b lost
        r"vocab shrinking.*'b' \(2 -> 3\)": _vocab(spark, ("a", 1), ("b", 3)),  # b re-indexed
        "duplicate indices": _vocab(spark, ("a", 1), ("b", 2), ("c", 2)),
        "1 null or blank value.*1 index.*0 is reserved.*1 duplicate value": _vocab(
            spark, ("a", 1), ("b", 2), ("b", 2), (" ", 3), ("c", 0)
        ),
    }
    for message, new in bad.items():
        with pytest.raises(VocabInvariantError, match=message):
            check_vocab_extends(old, new)


@pytest.mark.spark
def test_update_vocab_rejects_bad_arguments_before_touching_the_lake(spark, io, lake):
    from spark_features.vocab import index_array_column, update_vocab

    values = _occurrences(spark, "a")
    for bad in (0, -1, True, 1.5):
        with pytest.raises(ValueError, match="min_count"):
            update_vocab(io, lake, "user_id", values, min_count=bad)
    with pytest.raises(ValueError, match="vocab name"):
        update_vocab(io, lake, "User-ID", values)
    with pytest.raises(ValueError, match="run_key"):
        update_vocab(io, lake, "user_id", values, run_key=" ")
    with pytest.raises(ValueError, match="no column 'value'"):
        update_vocab(io, lake, "user_id", spark.createDataFrame([("a",)], "user_id string"))
    with pytest.raises(ValueError, match=r"values.value must be string, got bigint"):
        update_vocab(io, lake, "user_id", spark.createDataFrame([(1,)], "value long"))
    with pytest.raises(ValueError, match="strategy"):
        index_array_column(spark.createDataFrame([(["a"],)], "t array<string>"), "t", _vocab(spark), "o",
                           strategy="fast")
    assert not (Path(lake.root.removeprefix("file://")) / "vocab").exists()


@pytest.mark.parametrize("name", ["", "User_ID", "items-genres", "a/b", "..", "_hidden", ".x", "a b"])
def test_vocab_table_rejects_bad_names(name):
    with pytest.raises(ValueError, match="vocab name"):
        vocab_table(name)


def test_vocab_table_paths():
    assert vocab_table("user_id") == "vocab/user_id"
    assert vocab_table("items.genres") == "vocab/items.genres"


def test_vocab_registry_imports_without_pyspark():
    code = (
        "import sys, lake_contract.vocab_registry\n"
        "assert 'pyspark' not in sys.modules, sorted(m for m in sys.modules if m.startswith('pyspark'))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def _commit_actions(lake, name, version) -> list[dict]:
    """The actions of one commit, read from its Delta log file."""
    log_file = Path(lake.table(vocab_table(name)).removeprefix("file://")) / "_delta_log" / f"{version:020d}.json"
    return [json.loads(line) for line in log_file.read_text().splitlines() if line.strip()]


def _file_rows(lake, name, relative) -> list[tuple]:
    from urllib.parse import unquote

    import pyarrow.parquet as pq

    path = Path(lake.table(vocab_table(name)).removeprefix("file://")) / unquote(relative)
    rows = pq.read_table(path).to_pylist()
    return sorted(((r["value"], r["index"], r["count"], r["min_count"], r["added_by"]) for r in rows),
                  key=lambda r: r[1])


@pytest.mark.spark
def test_update_appends_only_its_new_rows_and_leaves_the_old_files(spark, delta_io, lake):
    """An update that adds values commits ONE append of exactly its new rows (no remove, the
    files of the previous version untouched), tagged with the vocabulary's app transaction."""
    from lake_contract.delta_snapshot import resolve_snapshot
    from spark_features.vocab import update_vocab

    first = update_vocab(delta_io, lake, "item_id", _occurrences(spark, *DAY_ONE), min_count=2)
    assert first.version == 0
    uri = lake.table(vocab_table("item_id"))
    old_files = {Path(f.removeprefix("file://")): Path(f.removeprefix("file://")).stat() for f in
                 resolve_snapshot(uri, 0).files}

    hour = _occurrences(spark, "b", "a", "e", "d", "e", "x", None)  # b, a known; e x2, d, x new
    info = update_vocab(delta_io, lake, "item_id", hour, min_count=1, run_key=HOUR)

    assert info == VocabInfo("item_id", size=7, num_values=6, min_count=1, version=1, added=3)
    actions = _commit_actions(lake, "item_id", 1)
    adds = [a["add"] for a in actions if "add" in a]
    assert [a for a in actions if "remove" in a] == []
    assert [(a["txn"]["appId"], a["txn"]["version"]) for a in actions if "txn" in a] == [("towerlake.vocab", 1)]
    new_rows = [("e", 4, 2, 1, HOUR), ("d", 5, 1, 1, HOUR), ("x", 6, 1, 1, HOUR)]
    assert sorted((r for a in adds for r in _file_rows(lake, "item_id", a["path"])), key=lambda r: r[1]) == new_rows
    assert sum(json.loads(a["stats"])["numRecords"] for a in adds) == 3
    # The old files are still in the table, byte for byte as they were.
    now_files = {Path(f.removeprefix("file://")) for f in resolve_snapshot(uri, 1).files}
    assert set(old_files) <= now_files and len(now_files) == len(old_files) + len(adds)
    for path, stat in old_files.items():
        assert (path.stat().st_size, path.stat().st_mtime_ns) == (stat.st_size, stat.st_mtime_ns)
    assert _table_rows(lake, "item_id") == [*DAY_ONE_ROWS, *new_rows]


@pytest.mark.spark
def test_compaction_rewrites_into_one_file_set_with_the_same_rows(spark, delta_io, lake):
    """Past ``compact_above_files`` files, the next adding update rewrites old + new rows as one
    file: same rows and indices as appending would give, one overwrite commit."""
    from lake_contract.delta_snapshot import resolve_snapshot
    from spark_features.vocab import update_vocab

    uri = lake.table(vocab_table("user_id"))
    expected = []
    for step, values in enumerate((("a", "a", "b"), ("c",), ("d", "e", "e"), ("f",))):
        info = update_vocab(delta_io, lake, "user_id", _occurrences(spark, *values), run_key=f"run{step}",
                            compact_above_files=2)
        counts = {v: values.count(v) for v in values}
        for value in sorted(counts, key=lambda v: (-counts[v], v)):
            expected.append((value, len(expected) + 1, counts[value], 1, f"run{step}"))
        assert info.version == step and info.added == len(counts)
        assert _table_rows(lake, "user_id") == expected
        assert len(resolve_snapshot(uri).files) == [1, 2, 3, 1][step]
    # The fourth commit replaced every file of version 2 (and added one).
    actions = _commit_actions(lake, "user_id", 3)
    assert len([a for a in actions if "remove" in a]) == 3 and len([a for a in actions if "add" in a]) == 1


@pytest.mark.spark
@pytest.mark.parametrize("race_at, existing", [("planned", True), ("staged", True), ("staged", False)])
def test_concurrent_updates_conflict_on_both_engines(spark, delta_io, lake, race_at, existing):
    """The append path (and, with no table yet, the create) keeps the one-wins guarantee on
    both engines: the loser raises, the table holds the winner's rows only, no loser file."""
    from lake_contract.delta_snapshot import resolve_snapshot
    from lake_contract.errors import CommitConflictError
    from spark_features.vocab import update_vocab

    winner_rows = [("y", 1, 1, 1, "winner")]
    if existing:
        update_vocab(delta_io, lake, "item_id", _occurrences(spark, "a", "a", "b"))
        winner_rows = [("a", 1, 2, 1, "full"), ("b", 2, 1, 1, "full"), ("y", 3, 1, 1, "winner")]

    def competing_update(stage: str) -> None:
        if stage == race_at:
            update_vocab(delta_io, lake, "item_id", _occurrences(spark, "y"), run_key="winner")

    with pytest.raises(CommitConflictError, match="re-run"):
        update_vocab(delta_io, lake, "item_id", _occurrences(spark, "x"), run_key="loser",
                     _race_hook=competing_update)

    last = 1 if existing else 0
    assert _version(lake, "item_id") == last
    assert _table_rows(lake, "item_id") == winner_rows
    uri = lake.table("vocab/item_id")
    named = {f.removeprefix("file://") for v in range(last + 1) for f in resolve_snapshot(uri, v).files}
    table_dir = Path(next(iter(named))).parent
    assert {str(p) for p in table_dir.rglob("*.parquet")} == named, "the loser's files must be removed"
