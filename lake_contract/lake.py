"""Where every table and artifact lives under one lake root (docs/design.md, data flow).

The root is a local folder or any URI; table paths are fixed relative names so that jobs,
DAGs and people agree on them without configuration.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

BRONZE_INTERACTIONS = "bronze/interactions"
BRONZE_USERS = "bronze/users"
BRONZE_ITEMS = "bronze/items"
BRONZE_TABLES = {"interactions": BRONZE_INTERACTIONS, "users": BRONZE_USERS, "items": BRONZE_ITEMS}


def quarantine_table(table: str) -> str:
    """Relative path of the quarantine table that holds bad rows of ``table``."""
    return f"quarantine/{table}"


def to_uri(path: str | os.PathLike[str]) -> str:
    """A local path becomes an absolute ``file://`` URI; a URI with a scheme stays as it is."""
    text = os.fspath(path)
    if urlparse(text).scheme and not _is_windows_drive(text):
        return text.rstrip("/")
    return Path(text).expanduser().resolve().as_uri()


def to_local_path(uri: str) -> str | None:
    """The local filesystem path of a ``file://`` URI or plain path; None for remote URIs."""
    parsed = urlparse(uri)
    if parsed.scheme in ("", "file"):
        from urllib.parse import unquote

        return unquote(parsed.path) if parsed.scheme else str(Path(uri).resolve())
    return None


def _is_windows_drive(text: str) -> bool:
    return len(text) > 1 and text[1] == ":"


@dataclass(frozen=True)
class Lake:
    """One lake root; ``lake.table("bronze/interactions")`` is that table's URI."""

    root: str

    def __post_init__(self) -> None:
        if not self.root:
            raise ValueError("Lake.root must be a folder path or URI, got an empty string")
        uri = to_uri(self.root)
        if uri.startswith("file://"):
            from urllib.parse import unquote

            if unquote(uri) != uri:
                # Spark writes such a path literally while URIs (delta-rs, pyarrow) encode it:
                # the two would disagree on where the files are.
                raise ValueError(f"lake root {self.root!r} has characters that need URI encoding (a space, a comma, "
                                 "'%', ...): pick a folder whose path has only letters, digits and - _ . /")
        object.__setattr__(self, "root", uri)

    def table(self, relative: str) -> str:
        relative = relative.strip("/")
        if not relative or ".." in relative.split("/"):
            raise ValueError(f"table path must be a relative path inside the lake, got {relative!r}")
        return f"{self.root}/{relative}"


def fsync_path(path: str | os.PathLike[str]) -> None:
    """Flush a local file or folder entry to disk (folders: so a rename inside it is durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
