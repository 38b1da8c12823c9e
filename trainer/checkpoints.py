"""Checkpoints that a killed run resumes from, bit-exactly on CPU.

A checkpoint holds everything the rest of the run depends on: model, optimizer and LR
scheduler state; epoch, batches done in that epoch and the global step; the early-stopping
state (best value, best weights, epochs without improvement, history); and the torch RNG
state of EVERY rank. The data position needs no state of its own: each epoch's batch order
is a pure function of (seed, epoch, rank) — Petastorm deals row groups to ranks in a seeded
order, the loader puts them back in that order whichever reader thread finishes first, and
its shuffle draws from a numpy stream of (seed, epoch, rank) (trainer/data.py), so replaying
an epoch's first ``b`` batches lands exactly where the killed run was, with any number of
reader threads (tests/test_loader.py, tests/test_resume.py).

Files: ``<folder>/step-<global step, 10 digits>.pt``, written by rank 0 to a temp file and
renamed (a kill mid-write leaves the previous checkpoint intact); the newest ``keep`` stay.
The folder is keyed by ``run_key`` (config + exact table versions + world size), so re-running
the same command finds it; a finished run's model version is committed first, then its
checkpoints are removed.

Safe loading: a checkpoint holds only tensors, plain containers (dict, list, tuple) and
primitives (str, int, float, bool, None). ``save`` refuses anything else, and ``load`` reads
with ``torch.load(weights_only=True)``, so a file planted in the checkpoint folder whose
pickle would construct an arbitrary object (and run code while doing so) is refused with
``UnsafeCheckpointError`` before any of it runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from lake_contract.errors import TowerlakeError

_NAME = re.compile(r"step-(\d{10})\.pt")


class IncompatibleCheckpointError(TowerlakeError):
    """A checkpoint was written by a different model config, schema or world size."""


class UnsafeCheckpointError(TowerlakeError):
    """A checkpoint file holds objects other than tensors and plain containers: refused unread."""


_PRIMITIVES = (str, int, float, bool, type(None))
_MAPPINGS = (dict, OrderedDict)  # state_dict() returns OrderedDicts
_SEQUENCES = (list, tuple, torch.Size)


def check_plain(value: Any, where: str = "payload") -> None:
    """Raise TypeError naming the first field of ``value`` that is not plain data: tensors,
    dict/list/tuple and str/int/float/bool/None, by exact type (a numpy float is a float
    subclass, and a subclass is a class that ``torch.load(weights_only=True)`` refuses)."""
    kind = type(value)
    if isinstance(value, torch.Tensor) or kind in _PRIMITIVES:
        return
    if kind in _MAPPINGS:
        for key, item in value.items():
            if type(key) not in _PRIMITIVES:
                raise TypeError(f"checkpoint {where} has a key of type {type(key).__qualname__}: keys must be "
                                "str/int/float/bool/None")
            check_plain(item, f"{where}[{key!r}]")
        return
    if kind in _SEQUENCES:
        for i, item in enumerate(value):
            check_plain(item, f"{where}[{i}]")
        return
    raise TypeError(f"checkpoint {where} is a {kind.__module__}.{kind.__qualname__}: a checkpoint holds only "
                    "tensors, dict/list/tuple and str/int/float/bool/None (convert it first)")


def run_key(config: dict, table_versions: dict[str, int], train_split: str, world_size: int) -> str:
    """Stable id of "the same training run": 16 hex chars of a hash of its inputs."""
    text = json.dumps({"config": config, "tables": table_versions, "split": train_split, "world": world_size},
                      sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class CheckpointManager:
    """Writes, finds, loads and prunes the checkpoints of one run (``folder``)."""

    def __init__(self, folder: str | os.PathLike[str], keep: int = 2) -> None:
        if keep < 1:
            raise ValueError(f"keep must be >= 1 checkpoint, got {keep!r}")
        self.folder = Path(folder)
        self.keep = keep

    def checkpoints(self) -> list[Path]:
        if not self.folder.is_dir():
            return []
        return sorted(p for p in self.folder.iterdir() if _NAME.fullmatch(p.name))

    def latest(self) -> Path | None:
        found = self.checkpoints()
        return found[-1] if found else None

    def save(self, payload: dict[str, Any], global_step: int) -> Path:
        self.folder.mkdir(parents=True, exist_ok=True)
        check_plain(payload)  # what could not be loaded safely is refused now, not at resume
        final = self.folder / f"step-{global_step:010d}.pt"
        tmp = self.folder / f".{final.name}.tmp-{os.getpid()}"
        torch.save(payload, tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, final)
        for old in self.checkpoints()[: -self.keep]:
            old.unlink(missing_ok=True)
        return final

    def load(self, path: Path) -> dict[str, Any]:
        """The payload of ``path``, read without unpickling anything but tensors and plain data.

        Raises ``UnsafeCheckpointError`` when the file asks to construct any other object (a
        planted or foreign file: its code is never run)."""
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
            what = f"it asks for {found.group(1)}" if found else "it holds objects other than tensors and plain data"
            raise UnsafeCheckpointError(
                f"checkpoint {path} was refused: {what}, and a checkpoint holds only tensors and plain data "
                f"(unpickling anything else could run code; none of it was run). Delete {path.parent} (or re-run "
                "with --fresh) and check who can write there") from err
        if not isinstance(payload, dict):
            raise UnsafeCheckpointError(f"checkpoint {path} holds a {type(payload).__name__}, not a training "
                                        f"checkpoint: delete {path.parent} or re-run with --fresh")
        return payload

    def remove_all(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def check_compatible(payload: dict[str, Any], config: dict, schema_json: str, world_size: int, path: Path) -> None:
    """Raise IncompatibleCheckpointError naming what differs."""
    problems = []
    if payload["config"] != config:
        keys = sorted(k for k in set(payload["config"]) | set(config) if payload["config"].get(k) != config.get(k))
        problems.append(f"config fields {', '.join(keys)} differ")
    if payload["schema"] != schema_json:
        problems.append("feature schema (fields or vocabulary sizes) differs")
    if payload["world_size"] != world_size:
        problems.append(f"it was written by {payload['world_size']} processes, this run has {world_size}")
    if problems:
        raise IncompatibleCheckpointError(
            f"checkpoint {path} does not belong to this run ({'; '.join(problems)}): delete {path.parent} "
            "or re-run with --fresh to start over")


class isolated_rng:
    """Iterate ``iterator`` with the global torch RNG swapped for a stream of its own (seeded
    by ``seed``), so whatever the iterator draws neither disturbs nor depends on the training's
    own draws (the loader now shuffles with numpy and draws none; this keeps it that way for
    any iterator that does)."""

    def __init__(self, iterator: Iterator, seed: int) -> None:
        self.iterator = iterator
        outer = torch.get_rng_state()
        torch.manual_seed(seed)
        self.state = torch.get_rng_state()
        torch.set_rng_state(outer)

    def __iter__(self) -> isolated_rng:
        return self

    def __next__(self):
        outer = torch.get_rng_state()
        torch.set_rng_state(self.state)
        try:
            return next(self.iterator)
        finally:
            self.state = torch.get_rng_state()
            torch.set_rng_state(outer)
