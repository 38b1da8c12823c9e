"""Read append-only vocabularies (``vocab/<name>`` Delta tables) without Spark.

The trainer sizes its embedding tables from here and serving maps small lookups, so this
module must never import pyspark (docs/design.md layout; ``spark_features.vocab`` is the Spark
side that writes the tables).

A vocabulary maps a string value to a stable index (docs/design.md decision 5): index 0 is
reserved for unknown/padding and never assigned, a value keeps its index forever, and new
values get indices after the current maximum. ``size`` (max index + 1) is therefore the
number of embedding rows, index 0 included, and only grows.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from lake_contract.delta_snapshot import read_snapshot_arrow, resolve_snapshot, table_exists
from lake_contract.errors import TableNotFoundError
from lake_contract.lake import Lake

VOCAB_ROOT = "vocab"
UNKNOWN_INDEX = 0
_NAME = re.compile(r"[a-z0-9][a-z0-9_.]*")


@dataclass(frozen=True)
class VocabInfo:
    """What one vocabulary holds at one Delta version.

    ``size`` = max index + 1 (embedding rows, index 0 included; 1 when empty);
    ``num_values`` = assigned values (``size - 1`` while indices are dense);
    ``min_count`` = the occurrence threshold in force when the newest values were added;
    ``version`` = Delta version of ``vocab/<name>``, None when the table does not exist yet;
    ``added`` = values the update that returned this added (0 from readers and no-op updates).
    """

    name: str
    size: int
    num_values: int
    min_count: int
    version: int | None
    added: int = 0


def vocab_table(name: str) -> str:
    """Relative lake path of a vocabulary: ``vocab/<name>``.

    ``name`` is lowercase letters, digits, ``_`` and ``.``, starting with a letter or digit
    (e.g. ``user_id``, ``items.genres``); anything else raises ``ValueError``.
    """
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(
            "vocab name must be lowercase letters, digits, '_' and '.', starting with a letter or digit "
            f"(e.g. 'user_id', 'items.genres'), got {name!r}"
        )
    return f"{VOCAB_ROOT}/{name}"


def read_vocab_info(lake_root: str, name: str, version: int | None = None) -> VocabInfo:
    """Size, value count, latest threshold and version of ``vocab/<name>`` (latest when None).

    Raises ``TableNotFoundError`` when the vocabulary was never written.
    """
    snapshot = resolve_snapshot(_existing_vocab_uri(lake_root, name), version)
    table = read_snapshot_arrow(snapshot, ["index", "min_count"])
    return _info_from_arrow(name, table, snapshot.version)


def read_vocab_sizes(lake_root: str) -> dict[str, int]:
    """``{name: size}`` for every vocabulary table under the lake (empty when there are none).

    Sizes are max index + 1: the number of rows each embedding table needs.
    """
    import pyarrow.fs as pafs

    lake = Lake(str(lake_root))
    fs, folder = pafs.FileSystem.from_uri(lake.table(VOCAB_ROOT))
    info = fs.get_file_info(folder)
    if info.type != pafs.FileType.Directory:
        return {}
    sizes: dict[str, int] = {}
    for entry in fs.get_file_info(pafs.FileSelector(folder, recursive=False)):
        if entry.type != pafs.FileType.Directory or not _NAME.fullmatch(entry.base_name):
            continue
        if table_exists(lake.table(vocab_table(entry.base_name))):
            sizes[entry.base_name] = read_vocab_info(lake.root, entry.base_name).size
    return dict(sorted(sizes.items()))


def read_vocab_mapping(lake_root: str, name: str, version: int | None = None) -> dict[str, int]:
    """``{value: index}`` of ``vocab/<name>``: for tests and small serving-side lookups.

    Holds the whole vocabulary in memory; Spark jobs index columns with
    ``spark_features.vocab.index_column`` instead. Unknown values map to ``UNKNOWN_INDEX``.
    """
    snapshot = resolve_snapshot(_existing_vocab_uri(lake_root, name), version)
    table = read_snapshot_arrow(snapshot, ["value", "index"])
    return dict(zip(table.column("value").to_pylist(), table.column("index").to_pylist(), strict=True))


def _existing_vocab_uri(lake_root: str, name: str) -> str:
    uri = Lake(str(lake_root)).table(vocab_table(name))
    if not table_exists(uri):
        raise TableNotFoundError(
            f"no vocabulary {name!r} at {uri}: run the job that builds vocabularies "
            "(jobs/build_features) on this lake first"
        )
    return uri


def _info_from_arrow(name: str, table: pa.Table, version: int) -> VocabInfo:
    """VocabInfo from a vocabulary's ``index`` and ``min_count`` columns."""
    if table.num_rows == 0:
        return VocabInfo(name=name, size=1, num_values=0, min_count=1, version=version)
    indices = table.column("index")
    newest = pc.index(indices, pc.max(indices)).as_py()  # the row added last holds the max index
    max_index = int(indices[newest].as_py())
    min_count = table.column("min_count")[newest].as_py()
    return VocabInfo(
        name=name,
        size=max_index + 1,
        num_values=table.num_rows,
        min_count=int(min_count) if min_count is not None else 1,
        version=version,
    )
