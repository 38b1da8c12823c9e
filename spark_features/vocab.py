"""Append-only vocabularies, Spark side: count values, assign stable indices, index columns.

A vocabulary ``vocab/<name>`` (``user_id``, ``item_id``, ``users.gender``, ``items.genres``,
...) is a Delta table with one row per value (``VOCAB_SCHEMA``). docs/design.md decision 5, IDs
are stable forever:

* index 0 means unknown/padding and is never assigned;
* a value keeps its index across every later run, nightly or hourly, even when it no longer
  appears or is now below the threshold;
* values seen fewer than ``min_count`` times in the data given to one update are not added
  (they map to 0); the threshold is recorded on the rows it admitted;
* the new values of one update get ``max index + 1, + 2, ...`` in the order count
  descending, then value ascending, so the same input always yields the same vocabulary.

An update that adds nothing writes nothing (no new Delta version), so re-running it is a
no-op. Otherwise it APPENDS only its new rows (one file; the old files are untouched) as ONE
commit planned against the version the old rows were read from: of two concurrent updates
one commits and the other raises ``CommitConflictError`` (re-run it), instead of both
appending colliding indices (``_commit``: a Delta application transaction on both engines,
and no commit retry on delta-rs).

Cost of an update: counting ``values`` (the events, in Spark), ONE pass over the old rows (the
anti-join that keeps the values they lack), then O(new rows): the invariant check of the new
rows (values unique and not blank, indices exactly ``max + 1 .. max + n``) and the write. The
old table's row count and max index come from the Delta log's file statistics, not a job.
Only scalars reach the driver.

A build updates all its vocabularies (ids, every categorical column) with ONE
``update_vocabs`` call: the counting, the anti-joins and the checks of all of them run as one
Spark pass grouped by vocabulary; only the writes stay one pinned commit per vocabulary.

Files: every update that adds values adds one file, so the file count grows with the number
of such updates, not with the data. It is bounded by compaction: an update that finds more
than ``COMPACT_ABOVE_FILES`` small files (beyond one per ``max_records_per_file`` rows)
rewrites old + new rows as one file set in the same kind of pinned commit, after the full
``check_vocab_extends`` of every old row; that O(vocabulary) rewrite happens once every
``COMPACT_ABOVE_FILES`` adding updates (a day and a half of hourly windows that add ids).
Replaced files stay on disk for time travel until a Delta VACUUM removes them (maintenance,
as for every table of the lake).

The pyspark-free readers (``read_vocab_info``, ``read_vocab_sizes``, ``read_vocab_mapping``)
and ``VocabInfo`` live in ``lake_contract.vocab_registry``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from functools import reduce
from typing import Literal

from pyspark import StorageLevel
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T
from pyspark.sql.window import Window

from lake_contract.delta_snapshot import file_max_values, resolve_snapshot, snapshot_file_path, table_version
from lake_contract.errors import CommitConflictError, TowerlakeError
from lake_contract.lake import Lake
from lake_contract.vocab_registry import UNKNOWN_INDEX, VocabInfo, vocab_table
from spark_features.delta_io import DeltaLakeIO, WriteResult

__all__ = [
    "COMPACT_ABOVE_FILES",
    "MAP_LOOKUP_MAX_VALUES",
    "UNKNOWN_INDEX",
    "VOCAB_SCHEMA",
    "VocabInfo",
    "VocabInvariantError",
    "assign_new_indices",
    "check_vocab_extends",
    "count_values",
    "index_array_column",
    "index_column",
    "load_vocab",
    "rank_new_values",
    "update_vocab",
    "update_vocabs",
    "vocab_table",
]

log = logging.getLogger(__name__)

VOCAB_SCHEMA = T.StructType([
    T.StructField("value", T.StringType(), False),
    T.StructField("index", T.LongType(), False),
    T.StructField("count", T.LongType(), True),  # occurrences in the update that added the value
    T.StructField("min_count", T.IntegerType(), True),  # threshold in force when it was added
    T.StructField("added_by", T.StringType(), True),  # run key of that update ("full", "2026-01-05T13")
])

# Spark's maps are array-backed (a lookup scans the keys), so the map lookup only pays off
# for small vocabularies; bigger ones go through explode + join + re-aggregate.
MAP_LOOKUP_MAX_VALUES = 1_000

# An update compacts the vocabulary (rewrites it as one file set) once it holds more small
# files than this; every other update that adds values appends one file.
COMPACT_ABOVE_FILES = 32
# The Delta application-transaction id of every vocabulary commit (see _commit).
_APP_ID = "towerlake.vocab"

_VALUE = "_tl_vocab_value"
_NAME = "_tl_vocab_name"
_MIN = "_tl_vocab_min_count"
_INDEX = "_tl_vocab_index"
_MAP = "_tl_vocab_map"
_ROW = "_tl_row_id"
_POS = "_tl_pos"
_ELEM = "_tl_elem"
_PAIRS = "_tl_pos_index"


class VocabInvariantError(TowerlakeError):
    """A vocabulary write would break stable ids (a value lost or re-indexed, a duplicate)."""


RaceHook = Callable[[str], None]


# ------------------------------------------------------------------ updates
def update_vocab(
    io: DeltaLakeIO,
    lake: Lake,
    name: str,
    values: DataFrame,
    min_count: int = 1,
    run_key: str = "full",
    *,
    compact_above_files: int = COMPACT_ABOVE_FILES,
    _race_hook: RaceHook | None = None,
) -> VocabInfo:
    """Add the new values of ``values`` to ``vocab/<name>`` and return what the table holds.

    ``values``: one string column ``value``, one row per OCCURRENCE (nulls and blank strings
    are ignored). Values seen at least ``min_count`` times and not yet in the vocabulary get
    the next indices. ``run_key`` is recorded as ``added_by`` on the new rows.

    The new rows are appended (the old files are untouched) unless the vocabulary does not
    exist yet or already holds more than ``compact_above_files`` small files: then old and new
    rows are rewritten as one file set (see the module docstring).

    Raises ``ValueError`` (bad name, min_count, run_key or input column),
    ``CommitConflictError`` (another update committed since this one read the table; nothing
    was written, re-run), ``VocabInvariantError`` (the write would break stable ids; never
    expected). ``_race_hook`` is a test seam, called with ``"planned"`` (old rows read, new
    rows assigned and checked) and ``"staged"`` (delta-rs: files written, not committed;
    native: version re-checked, just before Spark's write-and-commit).
    """
    return update_vocabs(io, lake, {name: (values, min_count)}, run_key,
                         compact_above_files=compact_above_files, _race_hook=_race_hook)[name]


def update_vocabs(
    io: DeltaLakeIO,
    lake: Lake,
    updates: Mapping[str, tuple[DataFrame, int]],
    run_key: str = "full",
    *,
    compact_above_files: int = COMPACT_ABOVE_FILES,
    _race_hook: RaceHook | None = None,
) -> dict[str, VocabInfo]:
    """:func:`update_vocab` for several vocabularies at once: ``updates`` maps a vocabulary
    name to ``(values, min_count)``; returns ``{name: VocabInfo}`` in the same order.

    Every vocabulary gets exactly the rows, indices and commit that ``update_vocab`` alone
    would give it, but the counting, the anti-join against the old rows and the check of the
    new rows run as ONE Spark pass for all of them (grouped by vocabulary), so a build with
    seven vocabularies pays for one counting job, not seven; only the writes stay one per
    vocabulary that adds values (each its own pinned commit, see :func:`update_vocab`). A
    commit conflict on one vocabulary leaves those committed before it as they are (a re-run
    adds nothing to them) and writes none after it.
    """
    if not isinstance(run_key, str) or not run_key.strip():
        raise ValueError(f"run_key must be a non-empty string such as 'full' or '2026-01-05T13', got {run_key!r}")
    if isinstance(compact_above_files, bool) or not isinstance(compact_above_files, int) or compact_above_files < 1:
        raise ValueError(f"compact_above_files must be an integer >= 1, got {compact_above_files!r}")
    plans: dict[str, _Plan] = {}
    occurrences = []
    for name, (values, min_count) in updates.items():
        table = vocab_table(name)
        _check_min_count(min_count)
        _check_column_type(values, "value", T.StringType(), "values")
        uri = lake.table(table)
        read_version = table_version(uri)
        if read_version is None:
            old, state = None, _OldState(rows=0, max_index=0, files=0, schema_json=None, newest_file=None)
        else:
            old = io.read_table(uri, read_version)
            state = _old_state(uri, read_version) or _old_state_by_spark(old, uri, read_version)
        plans[name] = _Plan(uri=uri, read_version=read_version, old=old, state=state, min_count=min_count)
        occurrences.append(values.select(F.lit(name).alias(_NAME), F.lit(min_count).alias(_MIN), "value"))
    if not plans:
        return {}
    olds = [p.old.select(F.lit(n).alias(_NAME), "value") for n, p in plans.items() if p.old is not None]
    old_values = _union(olds) if olds else _empty(io.spark, T.StructType(
        [T.StructField(_NAME, T.StringType()), T.StructField("value", T.StringType())]))
    # The only pass over the old rows: the anti-join that keeps the values they lack.
    fresh_all = rank_new_values(_count_occurrences(_union(occurrences), [_NAME]), old_values, by=_NAME
                                ).persist(StorageLevel.MEMORY_AND_DISK)
    infos: dict[str, VocabInfo] = {}
    try:
        added_by_name = _check_new_rows(fresh_all, list(plans))
        for name, plan in plans.items():
            infos[name] = _write_new_rows(io, name, plan, added_by_name.get(name, 0),
                                          fresh_all.where(F.col(_NAME) == name).drop(_NAME), run_key,
                                          compact_above_files, _race_hook)
    finally:
        fresh_all.unpersist()
    return infos


@dataclasses.dataclass(frozen=True)
class _Plan:
    """One vocabulary of an update: where it is, the version read and what that holds."""

    uri: str
    read_version: int | None
    old: DataFrame | None  # the rows at read_version (None: no table yet)
    state: _OldState
    min_count: int


def _write_new_rows(io: DeltaLakeIO, name: str, plan: _Plan, added: int, fresh: DataFrame, run_key: str,
                    compact_above_files: int, race_hook: RaceHook | None) -> VocabInfo:
    """Commit the ``added`` checked new rows ``fresh`` (``rank_new_values`` rows) of one vocabulary."""
    read_version, state, min_count = plan.read_version, plan.state, plan.min_count
    if added == 0:
        old_min_count = _newest_min_count(plan.old, state) if plan.old is not None else min_count
        log.info("vocab %s: no new values (version %s, %d values): nothing written", name, read_version, state.rows)
        return VocabInfo(name=name, size=state.max_index + 1, num_values=state.rows, min_count=old_min_count,
                         version=read_version)
    if race_hook is not None:
        race_hook("planned")
    new_rows = _conform(_with_indices(fresh, state.max_index, min_count, run_key))
    compact = plan.old is not None and state.files > compact_above_files + state.rows // io.max_records_per_file
    if plan.old is None:
        result = _commit(io, new_rows.coalesce(1).sortWithinPartitions("index"), plan.uri, None, "overwrite",
                         None, race_hook)
    elif compact:
        full = _conform(plan.old.unionByName(new_rows))
        rows, max_index = check_vocab_extends(plan.old, full)  # a rewrite re-checks every old row
        if rows != state.rows + added or max_index != state.max_index + added:
            raise VocabInvariantError(
                f"vocab {name}: compacting version {read_version} ({state.rows} values up to index "
                f"{state.max_index}) plus {added} new value(s) gives {rows} values up to index {max_index}; "
                "nothing was written"
            )
        # One file set (split at maxRecordsPerFile), in index order.
        result = _commit(io, full.coalesce(1).sortWithinPartitions("index"), plan.uri, read_version, "overwrite",
                         state.schema_json, race_hook)
    else:
        result = _commit(io, new_rows.coalesce(1).sortWithinPartitions("index"), plan.uri, read_version, "append",
                         state.schema_json, race_hook)
    log.info("vocab %s: added %d values (indices %d..%d, min_count %d, %s) -> %s",
             name, added, state.max_index + 1, state.max_index + added, min_count, run_key, result.describe())
    return VocabInfo(name=name, size=state.max_index + added + 1, num_values=state.rows + added,
                     min_count=min_count, version=result.version, added=added)


def count_values(values: DataFrame, min_count: int = 1) -> DataFrame:
    """Occurrences per value: ``(value string, count long)``, only values seen >= ``min_count`` times.

    Nulls and blank strings (empty or whitespace only) are not values.
    """
    return _count_occurrences(values.select(F.lit(min_count).alias(_MIN), "value"), [])


def _count_occurrences(occurrences: DataFrame, keys: list[str]) -> DataFrame:
    """``(*keys, value, count)`` of ``occurrences`` (``*keys``, ``_MIN``, ``value``; ``_MIN``
    constant per key): one grouped pass, groups seen fewer than their ``_MIN`` times dropped."""
    value = F.col("value")
    return (
        occurrences.where(value.isNotNull() & ~value.rlike(r"(?U)^\s*$"))
        .groupBy(*keys, _MIN, "value")
        .agg(F.count(F.lit(1)).alias("count"))
        .where(F.col("count") >= F.col(_MIN))
        .select(*keys, "value", "count")
    )


def rank_new_values(counts: DataFrame, old: DataFrame, *, by: str | None = None) -> DataFrame:
    """``(value, rank long, count long)`` for the values of ``counts`` that ``old`` lacks, ranked
    ``1, 2, ...`` by count descending, then value ascending (the order new indices follow).
    ``by``: a column of both naming the vocabulary (several at once): the anti-join and the
    numbering are per value of ``by``, which is kept as the first column."""
    keys = [by] if by else []
    fresh = counts.join(old.select(*keys, "value"), [*keys, "value"], "left_anti")
    # One window over all new values of ONE vocabulary (catalog-sized, not event-sized): a
    # single partition per vocabulary is what makes the numbering dense and deterministic.
    order = Window.partitionBy(*keys).orderBy(F.col("count").desc(), F.col("value").asc())
    return fresh.select(
        *keys,
        "value",
        F.row_number().over(order).cast("long").alias("rank"),
        F.col("count").cast("long").alias("count"),
    )


def assign_new_indices(
    counts: DataFrame, old: DataFrame, after_index: int, min_count: int, run_key: str
) -> DataFrame:
    """Rows (``VOCAB_SCHEMA`` columns) for the values of ``counts`` that ``old`` lacks.

    Indices are ``after_index + 1, + 2, ...`` by count descending, then value ascending.
    """
    return _with_indices(rank_new_values(counts, old), after_index, min_count, run_key)


def _with_indices(ranked: DataFrame, after_index: int, min_count: int, run_key: str) -> DataFrame:
    return ranked.select(
        "value",
        (F.lit(after_index) + F.col("rank")).cast("long").alias("index"),
        F.col("count").cast("long").alias("count"),
        F.lit(min_count).cast("int").alias("min_count"),
        F.lit(run_key).alias("added_by"),
    )


def _check_new_rows(ranked: DataFrame, names: list[str]) -> dict[str, int]:
    """Check the new rows of one update (``rank_new_values(..., by=_NAME)``) in one small job,
    O(new rows): per vocabulary, values unique and not blank, ranks exactly ``1..n``. Returns
    ``{name: n}`` (names without new rows absent); raises ``VocabInvariantError`` naming the
    vocabulary and what is wrong otherwise.

    That the values are not in the vocabulary already is the anti-join against the very
    snapshot the commit is planned on; the old rows are never rewritten by an append.
    """
    value, rank = F.col("value"), F.col("rank")
    per_name = ranked.groupBy(_NAME).agg(
        F.count(F.lit(1)).alias("rows"),
        F.count_distinct(value).alias("values"),
        F.count_distinct(rank).alias("ranks"),
        F.min(rank).alias("min_rank"),
        F.max(rank).alias("max_rank"),
        F.count(F.when(value.isNull(), 1)).alias("nulls"),
        F.count(F.when(value.isNull() | value.rlike(r"(?U)^\s*$"), 1)).alias("blank"),
    ).collect()  # one row per vocabulary
    added = {}
    for stats in sorted(per_name, key=lambda row: names.index(row[_NAME])):
        rows = int(stats["rows"])
        problems = []
        if stats["blank"]:
            problems.append(f"{stats['blank']} null or blank value(s)")
        if stats["values"] + stats["nulls"] != rows:  # count_distinct skips nulls
            problems.append(f"duplicate values ({rows} new rows, {stats['values']} distinct values)")
        if rows and (stats["ranks"] != rows or stats["min_rank"] != 1 or stats["max_rank"] != rows):
            problems.append(
                f"{rows} new rows numbered {stats['min_rank']}..{stats['max_rank']} with {stats['ranks']} distinct "
                "numbers (must be exactly 1..n)"
            )
        if problems:
            raise VocabInvariantError(
                f"vocab {stats[_NAME]}: write refused: " + "; ".join(problems) + "; nothing was written")
        added[stats[_NAME]] = rows
    return added


def check_vocab_extends(old: DataFrame, new: DataFrame) -> tuple[int, int]:
    """Check that ``new`` keeps every value of ``old`` at the same index, and is itself sound:
    no null or blank value, values and indices unique, every index >= 1. One Spark job.

    Returns ``(rows, max index)`` of ``new`` (``(0, 0)`` when empty); raises
    ``VocabInvariantError`` naming what is wrong otherwise.
    """
    side_old, index = F.col("_old"), F.col("index")
    per_value = (
        old.select("value", "index", F.lit(True).alias("_old"))
        .unionByName(new.select("value", "index", F.lit(False).alias("_old")))
        .groupBy("value")
        .agg(
            F.count(F.when(side_old, 1)).alias("n_old"),
            F.count(F.when(~side_old, 1)).alias("n_new"),
            F.max(F.when(side_old, index)).alias("old_index"),
            F.min(F.when(~side_old, index)).alias("new_min"),
            F.max(F.when(~side_old, index)).alias("new_index"),
            F.count(F.when(~side_old & (index.isNull() | (index < 1)), 1)).alias("bad_index"),
        )
    )
    n_new, old_index = F.col("n_new"), F.col("old_index")
    lost = (F.col("n_old") > 0) & (
        (n_new == 0) | (F.col("new_min") != old_index) | (F.col("new_index") != old_index)
    )
    blank = (n_new > 0) & (F.col("value").isNull() | F.col("value").rlike(r"(?U)^\s*$"))
    stats = per_value.agg(
        F.sum(n_new).alias("rows"),
        F.count(F.when(lost, 1)).alias("lost"),
        F.min(F.when(lost, F.struct("value", "old_index", "new_index"))).alias("lost_example"),
        F.count(F.when(n_new > 1, 1)).alias("dup_values"),
        F.count(F.when(blank, 1)).alias("blank"),
        F.sum("bad_index").alias("bad_index"),
        F.count_distinct("new_index").alias("indices"),
        F.max("new_index").alias("max_index"),
    ).first()
    rows = int(stats["rows"] or 0)
    problems = []
    if stats["lost"]:
        value, was, now = stats["lost_example"]
        problems.append(
            f"vocab shrinking: {stats['lost']} value(s) of the current vocabulary would be lost or re-indexed, "
            f"e.g. {value!r} ({was} -> {now}); indices are stable forever (docs/design.md decision 5)"
        )
    if stats["blank"]:
        problems.append(f"{stats['blank']} null or blank value(s)")
    if stats["bad_index"]:
        problems.append(f"{stats['bad_index']} index(es) null or < 1 (0 is reserved for unknown)")
    if stats["dup_values"]:
        problems.append(f"{stats['dup_values']} duplicate value(s)")
    elif not stats["bad_index"] and stats["indices"] != rows:
        problems.append(f"duplicate indices ({rows} values, {stats['indices']} distinct indices)")
    if problems:
        raise VocabInvariantError("vocab write refused: " + "; ".join(problems) + "; nothing was written")
    return rows, int(stats["max_index"] or 0)


def _commit(
    io: DeltaLakeIO,
    frame: DataFrame,
    uri: str,
    read_version: int | None,
    mode: Literal["overwrite", "append"],
    schema_json: str | None,
    race_hook: RaceHook | None,
) -> WriteResult:
    """Write ``frame`` (the whole table, or the rows to append) in one commit that only
    succeeds right on top of ``read_version``.

    Every vocabulary commit carries the Delta application transaction ``(_APP_ID, version it
    creates)``: delta-spark skips a write whose transaction version is not above the last one
    recorded and fails one whose read app id a concurrent commit also wrote; delta-rs fails it
    on any commit since ``read_version`` (no retry). An append could otherwise land on top of a
    concurrent one and give two values the same index.
    """
    expected = 0 if read_version is None else read_version + 1
    if io.resolved_engine == "native":
        # Spark commits while writing, against the version it sees then: refuse if that moved.
        now = table_version(uri)
        if now != read_version:
            raise CommitConflictError(
                f"{uri} moved from version {read_version} to {now} while this vocabulary update was planned: "
                "nothing was written; re-run the job"
            )
        if race_hook is not None:
            race_hook("staged")
        result = io.write_table(frame, uri, mode=mode,
                                options={"txnAppId": _APP_ID, "txnVersion": str(expected)})
        if result.files_added == 0 and result.rows_written == 0:
            # Delta skipped the write: a concurrent update already committed this transaction version.
            raise CommitConflictError(
                f"{uri}: another vocabulary update committed version {expected} while this one was being written: "
                "nothing was written; re-run the job"
            )
    else:
        # write_table's two halves, so that the commit is pinned to read_version, the version
        # the new indices were planned from, not the (possibly newer) one stage_write saw.
        staged = io.stage_write(frame, uri, mode=mode)
        if race_hook is not None:
            race_hook("staged")
        pinned = dataclasses.replace(
            staged, table_existed=read_version is not None, read_version=read_version,
            app_transaction=(_APP_ID, expected), exclusive=True,
            # An append keeps the table's schema as it is; an overwrite declares VOCAB_SCHEMA
            # (NOT NULL flags included: Spark's schema of new rows alone says count is never null).
            schema_json=schema_json if mode == "append" and schema_json else VOCAB_SCHEMA.json(),
        )
        result = io.commit_staged(pinned)
    if result.version != expected:
        # Only a writer that bypasses update_vocab can get here (its commit was not a conflict).
        raise VocabInvariantError(
            f"{uri} was committed as version {result.version} although planned against version {read_version}: "
            f"another writer committed in between and its values may be missing; compare versions "
            f"{expected}..{result.version}, restore the right one and re-run"
        )
    return result


@dataclasses.dataclass(frozen=True)
class _OldState:
    """What an update needs to know of the version it read, from the Delta log."""

    rows: int
    max_index: int  # 0 when empty
    files: int
    schema_json: str | None
    newest_file: str | None  # the file holding max_index


def _old_state(uri: str, version: int) -> _OldState | None:
    """Rows, max index and files of ``version`` from the Delta log's per-file statistics (no
    Spark job, no data file opened); None when a file lacks them."""
    snapshot = resolve_snapshot(uri, version)
    maxima = file_max_values(snapshot, "index")
    if snapshot.num_rows is None or (snapshot.num_rows and any(m is None for m in maxima)):
        return None
    max_index, newest = 0, None
    for file, top in zip(snapshot.files, maxima, strict=True):
        if top is not None and int(top) > max_index:
            max_index, newest = int(top), file
    return _OldState(rows=snapshot.num_rows, max_index=max_index, files=len(snapshot.files),
                     schema_json=snapshot.schema_json, newest_file=newest)


def _old_state_by_spark(old: DataFrame, uri: str, version: int) -> _OldState:
    rows, max_index, _ = _summary(old)
    snapshot = resolve_snapshot(uri, version)
    return _OldState(rows=rows, max_index=max_index, files=len(snapshot.files),
                     schema_json=snapshot.schema_json, newest_file=None)


def _newest_min_count(old: DataFrame, state: _OldState) -> int:
    """min_count of the row with the max index (the threshold of the newest update): read from
    the one file that holds it, else by a Spark job."""
    if state.rows == 0:
        return 1
    if state.newest_file is not None:
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        piece = pq.read_table(snapshot_file_path(state.newest_file), columns=["index", "min_count"])
        at = pc.index(piece.column("index"), state.max_index).as_py()
        if at >= 0:
            found = piece.column("min_count")[at].as_py()
            return int(found) if found is not None else 1
    return _summary(old)[2]


def _summary(vocab: DataFrame) -> tuple[int, int, int]:
    """(rows, max index (0 when empty), min_count of the newest row (1 when empty)): one small job."""
    row = vocab.agg(
        F.count(F.lit(1)).alias("rows"),
        F.max("index").alias("max_index"),
        F.max_by("min_count", "index").alias("min_count"),
    ).first()
    return int(row["rows"]), int(row["max_index"] or 0), int(row["min_count"] or 1)


def _conform(full: DataFrame) -> DataFrame:
    """``full`` with exactly ``VOCAB_SCHEMA``, NOT NULL flags included.

    Spark reads Parquet columns back as nullable, and an overwrite with a nullable schema
    would silently relax the table's NOT NULL. ``check_vocab_extends`` has proved there are
    no nulls, so the coalesce changes no value; it only tells the analyser so.
    """
    return full.select(
        F.coalesce(F.col("value"), F.lit("")).alias("value"),
        F.coalesce(F.col("index").cast("long"), F.lit(0).cast("long")).alias("index"),
        F.col("count").cast("long").alias("count"),
        F.col("min_count").cast("int").alias("min_count"),
        F.col("added_by").cast("string").alias("added_by"),
    ).to(VOCAB_SCHEMA)


# -------------------------------------------------------------------- reads
def load_vocab(io: DeltaLakeIO, lake: Lake, name: str, version: int | None = None) -> DataFrame:
    """``(value string, index long)`` of ``vocab/<name>`` (latest when ``version`` is None);
    an empty DataFrame with those columns when the vocabulary does not exist yet."""
    uri = lake.table(vocab_table(name))
    if version is None and table_version(uri) is None:
        return _empty(io.spark, T.StructType(VOCAB_SCHEMA.fields[:2]))
    return io.read_table(uri, version).select("value", "index")


# ----------------------------------------------------------------- indexing
def index_column(df: DataFrame, column: str, vocab: DataFrame, out: str, *, broadcast: bool = True) -> DataFrame:
    """``df`` plus ``out`` (int) = the vocabulary index of string column ``column``; 0 when the
    value is null or unknown. Every row of ``df`` is kept exactly once (left join on the
    vocabulary's unique values); ``out`` replaces a column of that name in place.

    ``vocab``: ``(value, index)`` as from ``load_vocab``. It is broadcast; pass
    ``broadcast=False`` for a vocabulary too big to ship to every executor.
    """
    _check_column_type(df, column, T.StringType(), "df")
    lookup = _lookup(vocab)
    if broadcast:
        lookup = F.broadcast(lookup)
    joined = df.join(lookup, _col(column) == F.col(_VALUE), "left")
    index = F.coalesce(F.col(_INDEX), F.lit(UNKNOWN_INDEX)).cast("int")
    return joined.select(*_with_output(df.columns, out, index))


def index_array_column(
    df: DataFrame,
    column: str,
    vocab: DataFrame,
    out: str,
    *,
    strategy: Literal["auto", "map", "join"] = "auto",
    map_max_values: int = MAP_LOOKUP_MAX_VALUES,
) -> DataFrame:
    """``df`` plus ``out`` (array<int>): the vocabulary index of each element of the
    array<string> column ``column``, same order and length; null or unknown elements -> 0,
    a null array -> ``[]``. Every row of ``df`` is kept exactly once.

    ``strategy``: ``map`` looks elements up in the vocabulary folded into one map, joined to
    every row (no data to the driver); ``join`` explodes the arrays, joins the vocabulary and
    re-assembles each array in position order; ``auto`` takes ``map`` for vocabularies of at
    most ``map_max_values`` values (a Spark map lookup scans its keys).
    """
    _check_column_type(df, column, T.ArrayType(T.StringType()), "df")
    if strategy == "auto":
        strategy = "map" if vocab.count() <= map_max_values else "join"
    if strategy == "map":
        return _index_array_by_map(df, column, vocab, out)
    if strategy == "join":
        return _index_array_by_join(df, column, vocab, out)
    raise ValueError(f"strategy must be one of 'auto', 'map', 'join', got {strategy!r}")


def _index_array_by_map(df: DataFrame, column: str, vocab: DataFrame, out: str) -> DataFrame:
    mapping = vocab.agg(
        F.map_from_entries(F.collect_list(F.struct(F.col("value"), F.col("index").cast("int")))).alias(_MAP)
    )  # exactly one row, so the cross join keeps every row of df once
    joined = df.crossJoin(F.broadcast(mapping))
    looked_up = F.transform(
        _col(column), lambda x: F.coalesce(F.try_element_at(F.col(_MAP), x), F.lit(UNKNOWN_INDEX))
    )
    indices = F.coalesce(looked_up, F.array().cast("array<int>"))
    return joined.select(*_with_output(df.columns, out, indices))


def _index_array_by_join(df: DataFrame, column: str, vocab: DataFrame, out: str) -> DataFrame:
    # The row id is generated once, before the shuffle, and the whole row travels with its
    # elements, so no second evaluation of df has to reproduce the same ids.
    exploded = df.withColumn(_ROW, F.monotonically_increasing_id()).select(
        "*", F.posexplode_outer(_col(column)).alias(_POS, _ELEM)
    )
    joined = exploded.join(_lookup(vocab), F.col(_ELEM) == F.col(_VALUE), "left")
    pair = F.when(
        F.col(_POS).isNotNull(),  # posexplode_outer's row for a null or empty array
        F.struct(F.col(_POS).alias("pos"), F.coalesce(F.col(_INDEX), F.lit(UNKNOWN_INDEX)).cast("int").alias("index")),
    )
    grouped = joined.groupBy(_ROW).agg(
        *[F.first(_col(c)).alias(c) for c in df.columns],
        F.array_sort(F.collect_list(pair)).alias(_PAIRS),  # collect_list skips the nulls
    )
    indices = F.transform(F.col(_PAIRS), lambda p: p["index"])
    return grouped.select(*_with_output(df.columns, out, indices))


# ------------------------------------------------------------------ helpers
def _lookup(vocab: DataFrame) -> DataFrame:
    return vocab.select(F.col("value").alias(_VALUE), F.col("index").alias(_INDEX))


def _with_output(columns: list[str], out: str, expr: Column) -> list[Column]:
    """``columns`` with ``out`` replaced in place by ``expr``, or appended."""
    selected = [expr.alias(out) if c == out else _col(c) for c in columns]
    if out not in columns:
        selected.append(expr.alias(out))
    return selected


def _col(name: str) -> Column:
    """A top-level column by its exact name (dots in a name are not struct access)."""
    return F.col("`" + name.replace("`", "``") + "`")


def _union(frames: list[DataFrame]) -> DataFrame:
    return reduce(DataFrame.unionByName, frames)


def _empty(spark: SparkSession, schema: T.StructType) -> DataFrame:
    return spark.createDataFrame([], schema)


def _check_min_count(min_count: int) -> None:
    if isinstance(min_count, bool) or not isinstance(min_count, int) or min_count < 1:
        raise ValueError(f"min_count must be an integer >= 1 (occurrences needed to get an index), got {min_count!r}")


def _check_column_type(df: DataFrame, column: str, expected: T.DataType, what: str) -> None:
    if column not in df.columns:
        raise ValueError(f"{what} has no column {column!r}; it has {df.columns}")
    actual = df.schema[column].dataType
    if isinstance(expected, T.ArrayType):
        ok = isinstance(actual, T.ArrayType) and actual.elementType == expected.elementType
    else:
        ok = actual == expected
    if not ok:
        raise ValueError(
            f"{what}.{column} must be {expected.simpleString()}, got {actual.simpleString()} "
            "(cast it first: vocabulary values are strings)"
        )
