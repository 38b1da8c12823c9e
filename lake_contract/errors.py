"""Errors a person can act on. Jobs print their message as the last line on stderr.

Kept free of pyspark/torch imports so every package can raise and catch them.
"""

from __future__ import annotations


class TowerlakeError(Exception):
    """Base class: the message says what happened and what to do about it."""


class TableNotFoundError(TowerlakeError):
    """A Delta table (or the asked-for version of it) does not exist."""


class SchemaMismatchError(TowerlakeError):
    """A write's columns do not match the table's columns."""


class CommitConflictError(TowerlakeError):
    """Another writer committed a conflicting change first; nothing of this write is visible."""


class UnsupportedTableError(TowerlakeError):
    """A Delta table uses a feature Towerlake's readers cannot honour (e.g. deletion vectors)."""


class BadInputError(TowerlakeError):
    """Input data is unusable as given (too many bad rows, missing columns, unreadable files)."""


class NothingToDo(TowerlakeError):
    """The run has nothing to do (an empty window, a fine-tune CURRENT no longer descends from):
    jobs exit 99 and schedulers mark the task skipped; nothing was written that a re-run would not."""
