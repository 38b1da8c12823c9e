"""Versioned, atomic, rollback-able releases under ``<lake_root>/releases/`` (docs/design.md, decision 7).

Layout::

    releases/
      CURRENT                  one line: the version being served (absent before the first publish)
      <version>/               a complete release: the artifacts + manifest.json (sha256 of every file)
      .staging-<version>-<id>/ a publish in progress (or a crashed one; removed by the next publish)
      .publish.lock            held (flock) by the one publish/rollback running

How a publish stays crash-safe: the release is assembled in a staging folder, every file and
folder fsynced, then renamed to ``releases/<version>`` in one step; only then is CURRENT
switched, by writing ``CURRENT.tmp-<id>`` + fsync + ``os.replace`` (atomic on POSIX). A crash at
any point therefore leaves CURRENT at a complete release (or absent if none was published).
Pruned releases are renamed to ``.trash-*`` before they are deleted, so a half-deleted release
is never listed.

Releases need a local or mounted filesystem (rename and fsync semantics); object stores are
not supported here yet. Pure stdlib: no Spark, no torch, no faiss.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import secrets
import shutil
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from lake_contract.errors import TowerlakeError
from lake_contract.lake import fsync_path, to_local_path

RELEASES_DIR = "releases"
CURRENT_FILE = "CURRENT"
MANIFEST_FILE = "manifest.json"
LOCK_FILE = ".publish.lock"
STAGING_PREFIX = ".staging-"
TRASH_PREFIX = ".trash-"
POINTER_TMP_PREFIX = "CURRENT.tmp-"
LOCK_TIMEOUT_SECONDS = 300.0
FAIL_AT_STEPS = ("copy", "manifest", "rename", "pointer", "prune")
_RESERVED_MANIFEST_KEYS = ("version", "created_at", "sequence", "replaces", "artifacts", "files")
_VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_HASH_CHUNK = 1 << 20


class ReleaseError(TowerlakeError):
    """A release is missing, incomplete or does not match its manifest."""


class InjectedFailure(RuntimeError):
    """Raised by ``publish_release(fail_at=...)``: a test's simulated crash at that step."""


@dataclass(frozen=True)
class ReleaseInfo:
    """One published release: ``version``, its local folder ``path``, its ``manifest`` (parsed
    manifest.json) and whether CURRENT points at it."""

    version: str
    path: str
    manifest: dict[str, Any] = field(repr=False)
    is_current: bool = False

    def artifact(self, name: str) -> str:
        """Local path of artifact ``name`` (a file or a folder) inside this release."""
        if name not in self.manifest.get("artifacts", {}):
            raise ReleaseError(
                f"release {self.version} has no artifact {name!r}; it has {sorted(self.manifest.get('artifacts', {}))}"
            )
        return str(Path(self.path) / name)


# ---------------------------------------------------------------------------------------------
# paths, names, fsync


def releases_dir(lake_root: str | os.PathLike[str]) -> Path:
    """``<lake_root>/releases`` as a local path; ValueError for a non-local lake root."""
    text = os.fspath(lake_root)
    if not text:
        raise ValueError("lake_root must be a folder path or file:// URI, got an empty string")
    local = to_local_path(text)
    if local is None:
        raise ValueError(
            f"releases need a local or mounted filesystem (a folder path or file:// URI), got {text!r}: "
            "only local/mounted filesystems are supported for releases now; mount the store "
            "(e.g. /dbfs, s3fs, gcsfuse) and pass the mount path"
        )
    return Path(local) / RELEASES_DIR


def new_release_version() -> str:
    """A fresh version, sortable by creation time: ``YYYYMMDDTHHMMSSZ-<6 hex>`` (UTC)."""
    return f"{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}-{secrets.token_hex(3)}"


def _check_version(version: Any) -> str:
    if not isinstance(version, str) or not _VERSION_RE.match(version) or version.startswith(CURRENT_FILE):
        raise ValueError(
            "release version must be 1-128 characters of letters, digits, '.', '_', '-', starting with a "
            f"letter or digit and not 'CURRENT' (e.g. new_release_version()), got {version!r}"
        )
    return version



def _hash_and_fsync(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_HASH_CHUNK), b""):
            digest.update(chunk)
        os.fsync(handle.fileno())
    return digest.hexdigest()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _release_files(folder: Path) -> list[Path]:
    """Every regular file under ``folder`` except its manifest, as sorted relative paths."""
    files = []
    for path in folder.rglob("*"):
        if path.is_file() and path.relative_to(folder).as_posix() != MANIFEST_FILE:
            files.append(path.relative_to(folder))
    return sorted(files, key=lambda p: p.as_posix())


def _write_text_durably(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


# ---------------------------------------------------------------------------------------------
# lock and failure hooks


@contextlib.contextmanager
def _publish_lock(releases: Path) -> Iterator[None]:
    """Exclusive flock on ``releases/.publish.lock``; the OS drops it if the holder dies, so a
    holder may treat every staging/trash folder it finds as a crashed publisher's leftover."""
    releases.mkdir(parents=True, exist_ok=True)
    fd = os.open(releases / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + LOCK_TIMEOUT_SECONDS
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as err:
                if err.errno not in (errno.EAGAIN, errno.EACCES) or time.monotonic() > deadline:
                    raise ReleaseError(
                        f"another publish or rollback has held {releases / LOCK_FILE} for over "
                        f"{LOCK_TIMEOUT_SECONDS:.0f} s; check for a stuck job, then retry"
                    ) from err
                time.sleep(0.2)
        yield
    finally:
        os.close(fd)  # closing releases the flock


def _reach(step: str, fail_at: str | None) -> None:
    """Failure-injection point: tests pass ``fail_at=step`` (or replace this function in a child
    process to pause there and be SIGKILLed)."""
    if fail_at == step:
        raise InjectedFailure(f"injected failure at publish step {step!r}")


# ---------------------------------------------------------------------------------------------
# reading releases


def _read_manifest(folder: Path) -> dict[str, Any] | None:
    try:
        manifest = json.loads((folder / MANIFEST_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("version") == folder.name else None


def _read_current(releases: Path) -> str | None:
    try:
        text = (releases / CURRENT_FILE).read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    return text or None


def _all_releases(releases: Path) -> list[tuple[str, dict[str, Any]]]:
    """(version, manifest) of every complete release, oldest first (by publish sequence)."""
    found = []
    if not releases.is_dir():
        return found
    for child in releases.iterdir():
        if child.name.startswith(".") or not child.is_dir():
            continue
        manifest = _read_manifest(child)
        if manifest is not None:
            found.append((child.name, manifest))
    found.sort(key=lambda item: (int(item[1].get("sequence", 0)), str(item[1].get("created_at", "")), item[0]))
    return found


def list_releases(lake_root: str | os.PathLike[str]) -> list[ReleaseInfo]:
    """Every complete release, oldest first, with ``is_current`` set on the one being served."""
    releases = releases_dir(lake_root)
    current = _read_current(releases)
    return [
        ReleaseInfo(version, str(releases / version), manifest, version == current)
        for version, manifest in _all_releases(releases)
    ]


def current_release(lake_root: str | os.PathLike[str]) -> ReleaseInfo | None:
    """The release CURRENT points at, or None when nothing was ever published.

    Reads the manifest only; ``load_release`` also verifies every file's sha256.
    """
    releases = releases_dir(lake_root)
    version = _read_current(releases)
    if version is None:
        return None
    manifest = _read_manifest(releases / version)
    if manifest is None:
        raise ReleaseError(
            f"{releases / CURRENT_FILE} points at {version!r} but {releases / version / MANIFEST_FILE} is missing "
            f"or unreadable; roll back to a listed release: {[r.version for r in list_releases(lake_root)]}"
        )
    return ReleaseInfo(version, str(releases / version), manifest, True)


def load_release(lake_root: str | os.PathLike[str], version: str) -> ReleaseInfo:
    """Release ``version`` after checking every file against the sha256 in its manifest.

    Raises ReleaseError naming each missing, changed or unexpected file.
    """
    releases = releases_dir(lake_root)
    _check_version(version)
    folder = releases / version
    manifest = _read_manifest(folder)
    if manifest is None:
        available = [version for version, _ in _all_releases(releases)]
        raise ReleaseError(f"no complete release {version!r} under {releases}; available: {available}")
    expected: dict[str, Any] = manifest.get("files", {})
    problems = []
    for relative, entry in sorted(expected.items()):
        path = folder / relative
        if not path.is_file():
            problems.append(f"{relative}: missing")
        elif _sha256(path) != entry["sha256"]:
            problems.append(f"{relative}: sha256 differs from the manifest")
    problems += [
        f"{relative}: not in the manifest"
        for relative in (p.as_posix() for p in _release_files(folder))
        if relative not in expected
    ]
    if problems:
        raise ReleaseError(f"release {version} at {folder} does not match its manifest: " + "; ".join(problems))
    return ReleaseInfo(version, str(folder), manifest, _read_current(releases) == version)


# ---------------------------------------------------------------------------------------------
# publish


def _check_artifacts(artifacts: Mapping[str, Any]) -> dict[str, Path]:
    if not isinstance(artifacts, Mapping) or not artifacts:
        raise ValueError(f"artifacts must be a non-empty dict of name -> file or folder path, got {artifacts!r}")
    checked = {}
    for name, source in artifacts.items():
        if (
            not isinstance(name, str)
            or not _VERSION_RE.match(name)
            or name in (MANIFEST_FILE, CURRENT_FILE)
        ):
            raise ValueError(
                "artifact names must be plain file names (letters, digits, '.', '_', '-'; not "
                f"{MANIFEST_FILE!r}), got {name!r}"
            )
        local = to_local_path(os.fspath(source))
        if local is None or not Path(local).exists():
            raise ValueError(f"artifact {name!r}: {source!r} is not an existing local file or folder")
        checked[name] = Path(local)
    return checked


def _cleanup_leftovers(releases: Path) -> list[str]:
    """Remove staging/trash folders and pointer temp files of crashed publishers (lock held)."""
    removed = []
    for child in releases.iterdir():
        if child.name.startswith((STAGING_PREFIX, TRASH_PREFIX)) and child.is_dir():
            shutil.rmtree(child)
            removed.append(child.name)
        elif child.name.startswith(POINTER_TMP_PREFIX):
            child.unlink()
            removed.append(child.name)
    return removed


def _remove_release_dir(releases: Path, folder: Path) -> None:
    """Rename away first (atomic), then delete: a crash mid-delete never leaves a listed half release."""
    trash = releases / f"{TRASH_PREFIX}{folder.name}-{uuid.uuid4().hex[:8]}"
    os.rename(folder, trash)
    fsync_path(releases)
    shutil.rmtree(trash)


def _switch_current(releases: Path, version: str, hook: Callable[[], None] | None = None) -> None:
    """Atomically point CURRENT at ``version`` (temp file + fsync + os.replace + dir fsync)."""
    tmp = releases / f"{POINTER_TMP_PREFIX}{uuid.uuid4().hex}"
    _write_text_durably(tmp, version + "\n")
    if hook is not None:
        hook()
    os.replace(tmp, releases / CURRENT_FILE)
    fsync_path(releases)


def publish_release(
    lake_root: str | os.PathLike[str],
    version: str,
    artifacts: Mapping[str, str | os.PathLike[str]],
    manifest: Mapping[str, Any],
    keep: int = 5,
    fail_at: str | None = None,
) -> ReleaseInfo:
    """Publish ``artifacts`` as release ``version`` and make it current, atomically.

    lake_root: local folder or file:// URI; artifacts: name -> local file or folder, copied to
    ``releases/<version>/<name>``; manifest: JSON-serialisable facts about the release (model
    and data versions, metrics, gate results) to which ``version``, ``created_at`` (UTC ISO),
    ``sequence`` (publish order), ``replaces`` (the previous CURRENT), ``artifacts`` and
    ``files`` (sha256 and bytes of every file) are added. Then prunes to the newest ``keep``
    releases, never removing the current one, the one published just before it, or the one it
    replaced. Leftovers of crashed publishes are removed first.

    fail_at: test hook, one of FAIL_AT_STEPS: raises InjectedFailure at that step. Any failure
    before the pointer switch leaves CURRENT where it was and removes this publish's files.
    """
    _check_version(version)
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise ValueError(f"keep must be an int >= 1 (releases to keep), got {keep!r}")
    if fail_at is not None and fail_at not in FAIL_AT_STEPS:
        raise ValueError(f"fail_at must be None or one of {FAIL_AT_STEPS}, got {fail_at!r}")
    if not isinstance(manifest, Mapping):
        raise ValueError(f"manifest must be a dict, got {type(manifest).__name__}")
    clashes = sorted(set(manifest) & set(_RESERVED_MANIFEST_KEYS))
    if clashes:
        raise ValueError(f"manifest keys {clashes} are written by publish_release; rename them in your manifest")
    try:
        json.dumps(dict(manifest), allow_nan=False)
    except (TypeError, ValueError) as err:
        raise ValueError(f"manifest must be JSON-serialisable without NaN/inf: {err}") from err
    sources = _check_artifacts(artifacts)
    releases = releases_dir(lake_root)

    with _publish_lock(releases):
        _cleanup_leftovers(releases)
        target = releases / version
        if target.exists():
            raise ReleaseError(
                f"release {version!r} already exists at {target}; releases are immutable: publish a new "
                "version (new_release_version()) or rollback(lake_root, version) to serve it"
            )
        existing = _all_releases(releases)
        previous = _read_current(releases)
        staging = releases / f"{STAGING_PREFIX}{version}-{uuid.uuid4().hex[:8]}"
        renamed = False
        try:
            staging.mkdir()
            for position, (name, source) in enumerate(sources.items()):
                if source.is_dir():
                    shutil.copytree(source, staging / name)
                else:
                    shutil.copy2(source, staging / name)
                if position == 0:
                    _reach("copy", fail_at)
            files = {}
            for relative in _release_files(staging):
                path = staging / relative
                files[relative.as_posix()] = {"sha256": _hash_and_fsync(path), "bytes": path.stat().st_size}
            for folder in sorted({(staging / p).parent for p in files}, key=lambda p: -len(p.parts)):
                fsync_path(folder)
            full_manifest = {
                **dict(manifest),
                "version": version,
                "created_at": datetime.now(UTC).isoformat(timespec="microseconds"),
                "sequence": 1 + max((int(m.get("sequence", 0)) for _, m in existing), default=0),
                "replaces": previous,
                "artifacts": {name: "folder" if src.is_dir() else "file" for name, src in sources.items()},
                "files": files,
            }
            manifest_tmp = staging / f"{MANIFEST_FILE}.tmp"
            _write_text_durably(manifest_tmp, json.dumps(full_manifest, indent=2, sort_keys=True) + "\n")
            _reach("manifest", fail_at)
            os.replace(manifest_tmp, staging / MANIFEST_FILE)
            fsync_path(staging)
            _reach("rename", fail_at)
            os.rename(staging, target)
            renamed = True
            fsync_path(releases)
            _switch_current(releases, version, hook=lambda: _reach("pointer", fail_at))
        except BaseException:
            # Not current yet: take this publish's files away so the version can be retried.
            for child in releases.iterdir():
                if child.name.startswith(POINTER_TMP_PREFIX):
                    child.unlink()
            if renamed and _read_current(releases) != version:
                _remove_release_dir(releases, target)
            shutil.rmtree(staging, ignore_errors=True)
            raise
        _reach("prune", fail_at)
        _prune(releases, keep, replaced=previous)
    return ReleaseInfo(version, str(target), full_manifest, True)


def _prune(releases: Path, keep: int, replaced: str | None) -> list[str]:
    """Delete the oldest releases beyond ``keep``; never the current one, the one published
    just before it, or the one it replaced (what a rollback goes back to)."""
    ordered = [version for version, _ in _all_releases(releases)]
    current = _read_current(releases)
    protected = {current, replaced}
    if current in ordered and ordered.index(current) > 0:
        protected.add(ordered[ordered.index(current) - 1])
    removed = []
    for version in ordered[: max(0, len(ordered) - keep)]:
        if version not in protected:
            _remove_release_dir(releases, releases / version)
            removed.append(version)
    return removed


def rollback(lake_root: str | os.PathLike[str], version: str | None = None) -> ReleaseInfo:
    """Point CURRENT at an existing release (verified against its manifest first).

    version None means the release the current one replaced (the previous CURRENT, recorded
    in its manifest), or, when that is gone, the one published just before it.
    """
    releases = releases_dir(lake_root)
    with _publish_lock(releases):
        ordered = _all_releases(releases)
        versions = [v for v, _ in ordered]
        current = _read_current(releases)
        if version is None:
            version = _rollback_target(ordered, current)
            if version is None:
                raise ReleaseError(
                    f"no release to roll back to from {current!r}: none was published before it; "
                    f"available versions: {versions}"
                )
        elif version not in versions:
            raise ReleaseError(f"unknown release version {version!r}; available versions: {versions}")
        info = load_release(lake_root, version)
        _switch_current(releases, version)
    return ReleaseInfo(info.version, info.path, info.manifest, True)


def _rollback_target(ordered: list[tuple[str, dict[str, Any]]], current: str | None) -> str | None:
    versions = [v for v, _ in ordered]
    if current not in versions:
        return None
    manifest = dict(ordered)[current]
    replaced = manifest.get("replaces")
    if replaced in versions and replaced != current:
        return replaced
    position = versions.index(current)
    return versions[position - 1] if position > 0 else None
