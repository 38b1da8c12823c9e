"""Where raw logs come from, and how their columns map onto Towerlake's bronze tables.

A team brings its own logs without writing code: a mapping file (TOML or JSON) names, per
table, the file(s), the format, and which column is the user id, item id, timestamp (and its
unit), rating, and which columns are categorical, numeric, multi-valued (with a separator) or
free text. ``movielens_100k_spec()`` is the same mapping for the MovieLens-100K files that
ship inside the ``recbole`` wheel. Example (TOML)::

    [interactions]
    path = "logs/events/*.csv"
    format = "csv"            # csv | parquet
    delimiter = ","
    user_id = "uid"
    item_id = "sku"
    timestamp = "ts"
    timestamp_unit = "ms"     # s | ms | us | iso (ISO-8601 text)
    rating = "stars"          # optional
    rating_range = [1, 5]     # inclusive; rows outside are quarantined

    [users]
    path = "logs/users.csv"
    id = "uid"
    categorical = ["country", "plan"]
    numeric = ["age"]

    [items]
    path = "logs/items.parquet"
    format = "parquet"
    id = "sku"
    categorical = ["brand"]
    multi_valued = { tags = "|" }
    text = ["title"]
    rename = { "product title" = "title" }   # applied first, to source column names
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any, Literal

FileFormat = Literal["csv", "parquet"]
TimestampUnit = Literal["s", "ms", "us", "iso"]
_FORMATS = ("csv", "parquet")
_UNITS = ("s", "ms", "us", "iso")


def _check_choice(owner: str, name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{owner}.{name} must be one of {list(allowed)}, got {value!r}")


@dataclass(frozen=True)
class InteractionsSpec:
    """How to read interaction events and which source column means what."""

    path: str
    user_id: str
    item_id: str
    timestamp: str
    timestamp_unit: TimestampUnit = "s"
    rating: str | None = None
    rating_range: tuple[float, float] | None = None
    format: FileFormat = "csv"
    delimiter: str = ","
    header: bool = True
    # Events outside [min, max) are quarantined as timestamp_out_of_range. The default floor
    # rejects epoch-0 style sentinels; widen it for genuinely old logs.
    timestamp_min: date = date(1971, 1, 1)
    timestamp_max: date = date(2100, 1, 1)
    rename: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_choice("interactions", "format", self.format, _FORMATS)
        _check_choice("interactions", "timestamp_unit", self.timestamp_unit, _UNITS)
        for name in ("path", "user_id", "item_id", "timestamp"):
            if not getattr(self, name):
                raise ValueError(f"interactions.{name} is required (the source column/path), got {getattr(self, name)!r}")
        if self.rating_range is not None:
            lo, hi = self.rating_range
            if lo > hi:
                raise ValueError(f"interactions.rating_range must be [low, high] with low <= high, got {self.rating_range!r}")
        if self.timestamp_min >= self.timestamp_max:
            raise ValueError(
                f"interactions.timestamp_min must be before timestamp_max, got {self.timestamp_min} >= {self.timestamp_max}"
            )


@dataclass(frozen=True)
class EntitySpec:
    """How to read a users or items table: its id column and typed attribute columns."""

    table: Literal["users", "items"]
    path: str
    id: str
    categorical: tuple[str, ...] = ()
    numeric: tuple[str, ...] = ()
    multi_valued: Mapping[str, str] = field(default_factory=dict)  # column -> separator
    text: tuple[str, ...] = ()
    format: FileFormat = "csv"
    delimiter: str = ","
    header: bool = True
    rename: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_choice(self.table, "format", self.format, _FORMATS)
        if not self.path or not self.id:
            raise ValueError(f"{self.table}.path and {self.table}.id are required, got path={self.path!r} id={self.id!r}")
        seen: dict[str, str] = {}
        for kind, cols in (("categorical", self.categorical), ("numeric", self.numeric),
                           ("multi_valued", tuple(self.multi_valued)), ("text", self.text)):
            for col in cols:
                if col == self.id or col in seen:
                    raise ValueError(
                        f"{self.table}: column {col!r} is declared twice ({seen.get(col, 'id')} and {kind})"
                    )
                seen[col] = kind
        for col, sep in self.multi_valued.items():
            if not sep:
                raise ValueError(f"{self.table}.multi_valued[{col!r}] needs a non-empty separator")

    @property
    def id_column(self) -> str:
        """Name of the id column in the bronze table (``user_id`` or ``item_id``)."""
        return "user_id" if self.table == "users" else "item_id"

    @property
    def attribute_columns(self) -> tuple[str, ...]:
        return (*self.categorical, *self.numeric, *self.multi_valued, *self.text)


@dataclass(frozen=True)
class SourceSpec:
    """Everything one ingest reads: interactions (required), users and items (optional)."""

    name: str
    interactions: InteractionsSpec
    users: EntitySpec | None = None
    items: EntitySpec | None = None


def load_mapping(path: str | Path, default_format: FileFormat | None = None) -> SourceSpec:
    """Parse a TOML or JSON mapping file into a ``SourceSpec`` (relative paths are resolved
    against the mapping file's folder)."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"mapping file {path} does not exist")
    text = path.read_text()
    try:
        raw = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as err:
        raise ValueError(f"mapping file {path} is not valid {'JSON' if path.suffix == '.json' else 'TOML'}: {err}") from err
    return spec_from_dict(raw, base_dir=path.parent, name=path.stem, default_format=default_format)


def spec_from_dict(raw: Mapping[str, Any], base_dir: Path | None = None, name: str = "files",
                   default_format: FileFormat | None = None) -> SourceSpec:
    unknown = set(raw) - {"interactions", "users", "items"}
    if unknown:
        raise ValueError(f"mapping has unknown sections {sorted(unknown)}; allowed: interactions, users, items")
    if "interactions" not in raw:
        raise ValueError("mapping needs an [interactions] section")

    def resolve(p: str) -> str:
        if base_dir is None or "://" in p or Path(p).is_absolute():
            return p
        return str((base_dir / p).resolve())

    def section(key: str) -> dict[str, Any]:
        values = dict(raw[key])
        if "path" in values:
            values["path"] = resolve(str(values["path"]))
        if default_format and "format" not in values:
            values["format"] = default_format
        return values

    inter = section("interactions")
    for key in ("timestamp_min", "timestamp_max"):
        if key in inter and isinstance(inter[key], str):
            inter[key] = date.fromisoformat(inter[key])
    if "rating_range" in inter and inter["rating_range"] is not None:
        inter["rating_range"] = tuple(float(v) for v in inter["rating_range"])
    interactions = _construct(InteractionsSpec, inter, "interactions")
    users = _entity("users", section("users")) if "users" in raw else None
    items = _entity("items", section("items")) if "items" in raw else None
    return SourceSpec(name=name, interactions=interactions, users=users, items=items)


def _entity(table: str, values: dict[str, Any]) -> EntitySpec:
    for key in ("categorical", "numeric", "text"):
        if key in values:
            values[key] = tuple(values[key])
    return _construct(EntitySpec, {"table": table, **values}, table)


def _construct(cls, values: dict[str, Any], section: str):
    import dataclasses

    allowed = {f.name for f in dataclasses.fields(cls)} - {"table"}
    unknown = set(values) - allowed - {"table"}
    if unknown:
        raise ValueError(f"[{section}] has unknown keys {sorted(unknown)}; allowed: {sorted(allowed)}")
    try:
        return cls(**values)
    except TypeError as err:
        raise ValueError(f"[{section}] is incomplete or malformed: {err}") from err


def movielens_100k_dir() -> Path:
    """Folder of the MovieLens-100K files inside the installed recbole wheel (not imported)."""
    import importlib.metadata

    try:
        dist = importlib.metadata.distribution("recbole")
    except importlib.metadata.PackageNotFoundError as err:
        raise ValueError(
            "MovieLens-100K ships inside the recbole wheel, which is not installed: run "
            "scripts/setup.sh (it installs recbole==1.2.1 --no-deps)"
        ) from err
    folder = Path(str(dist.locate_file("recbole/dataset_example/ml-100k")))
    if not (folder / "ml-100k.inter").exists():
        raise ValueError(f"recbole is installed but {folder}/ml-100k.inter is missing: reinstall recbole==1.2.1")
    return folder


def movielens_100k_spec() -> SourceSpec:
    """The MovieLens-100K mapping: RecBole "atomic" TSV files with typed headers.

    Timestamps are integer seconds (written as floats); ratings 1..5; users carry age,
    gender, occupation, zip code; items carry title, release year and genres (space-separated
    in RecBole's ``class`` column).
    """
    folder = movielens_100k_dir()
    return SourceSpec(
        name="movielens-100k",
        interactions=InteractionsSpec(
            path=str(folder / "ml-100k.inter"),
            delimiter="\t",
            user_id="user_id",
            item_id="item_id",
            timestamp="timestamp",
            timestamp_unit="s",
            rating="rating",
            rating_range=(1.0, 5.0),
            rename={"user_id:token": "user_id", "item_id:token": "item_id",
                    "rating:float": "rating", "timestamp:float": "timestamp"},
        ),
        users=EntitySpec(
            table="users",
            path=str(folder / "ml-100k.user"),
            delimiter="\t",
            id="user_id",
            categorical=("gender", "occupation", "zip_code"),
            numeric=("age",),
            rename={"user_id:token": "user_id", "age:token": "age", "gender:token": "gender",
                    "occupation:token": "occupation", "zip_code:token": "zip_code"},
        ),
        items=EntitySpec(
            table="items",
            path=str(folder / "ml-100k.item"),
            delimiter="\t",
            id="item_id",
            numeric=("release_year",),
            multi_valued={"genres": " "},
            text=("title",),
            rename={"item_id:token": "item_id", "movie_title:token_seq": "title",
                    "release_year:token": "release_year", "class:token_seq": "genres"},
        ),
    )


def synthetic_source_spec(name: str = "synthetic") -> SourceSpec:
    """Mapping of the DataFrames ``spark_features.synthetic.generate_synthetic`` returns.

    They already carry bronze column names and types; they go through the same validation as
    any other source (a generator bug would be quarantined, not silently kept).
    """
    where = "synthetic://generated"
    return SourceSpec(
        name=name,
        interactions=InteractionsSpec(path=where, user_id="user_id", item_id="item_id", timestamp="event_ts",
                                      rating="rating", rating_range=(1.0, 5.0), format="parquet"),
        users=EntitySpec(table="users", path=where, id="user_id", categorical=("gender", "region"),
                         numeric=("age",), format="parquet"),
        items=EntitySpec(table="items", path=where, id="item_id", categorical=("category",),
                         numeric=("release_year", "price"), multi_valued={"genres": "|"}, text=("title",),
                         format="parquet"),
    )
