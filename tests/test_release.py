"""Versioned releases: atomic publish, crash safety (injected and SIGKILL), rollback, pruning, gates."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from index_builder import release
from index_builder.gates import GateFailedError, check_gates
from index_builder.release import (
    InjectedFailure,
    ReleaseError,
    current_release,
    list_releases,
    load_release,
    new_release_version,
    publish_release,
    rollback,
)
from lake_contract.errors import TowerlakeError

REPO_ROOT = Path(__file__).resolve().parents[1]


def _artifacts(tmp_path: Path, tag: str, model_bytes: int = 64) -> dict[str, str]:
    """A model file and an index folder (with a subfolder) whose contents depend on ``tag``."""
    source = tmp_path / f"src-{tag}"
    (source / "index" / "shards").mkdir(parents=True, exist_ok=True)
    (source / "model.pt").write_bytes((tag.encode() * model_bytes)[:model_bytes])
    (source / "index" / "index.faiss").write_bytes(b"faiss-" + tag.encode())
    (source / "index" / "shards" / "ids.npy").write_bytes(b"ids-" + tag.encode())
    return {"model.pt": str(source / "model.pt"), "index": str(source / "index")}


def _publish(lake: Path, tmp_path: Path, version: str, keep: int = 5, **kwargs) -> release.ReleaseInfo:
    return publish_release(lake, version, _artifacts(tmp_path, version), {"model_version": f"m-{version}"}, keep=keep, **kwargs)


def _entries(lake: Path) -> list[str]:
    return sorted(p.name for p in (lake / "releases").iterdir())


def _versions(lake: Path) -> list[str]:
    return [info.version for info in list_releases(lake)]


# ---------------------------------------------------------------------------------------------
# publish / read


def test_publish_then_current_then_load_verifies(lake_root, tmp_path):
    info = _publish(lake_root, tmp_path, "v1")
    folder = lake_root / "releases" / "v1"
    assert (info.version, info.path, info.is_current) == ("v1", str(folder), True)
    assert (lake_root / "releases" / "CURRENT").read_text() == "v1\n"
    assert (folder / "model.pt").read_bytes() == b"v1" * 32
    assert (folder / "index" / "shards" / "ids.npy").read_bytes() == b"ids-v1"

    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["files"] == {
        rel: {"sha256": hashlib.sha256((folder / rel).read_bytes()).hexdigest(), "bytes": (folder / rel).stat().st_size}
        for rel in ("index/index.faiss", "index/shards/ids.npy", "model.pt")
    }
    assert {k: manifest[k] for k in ("version", "sequence", "replaces", "artifacts", "model_version")} == {
        "version": "v1", "sequence": 1, "replaces": None,
        "artifacts": {"model.pt": "file", "index": "folder"}, "model_version": "m-v1",
    }
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}\+00:00", manifest["created_at"])

    current = current_release(lake_root)
    assert (current.version, current.path, current.manifest, current.is_current) == ("v1", str(folder), manifest, True)
    loaded = load_release(lake_root, "v1")
    assert (loaded.version, loaded.is_current, loaded.artifact("index")) == ("v1", True, str(folder / "index"))
    assert _entries(lake_root) == [".publish.lock", "CURRENT", "v1"]


def test_nothing_published_yet(lake_root):
    assert current_release(lake_root) is None
    assert list_releases(lake_root) == []


def test_file_uri_root_works_and_remote_root_is_refused(lake_root, tmp_path):
    _publish(lake_root.as_uri(), tmp_path, "v1")
    assert current_release(str(lake_root)).version == "v1"
    with pytest.raises(ValueError, match=r"only local/mounted filesystems are supported for releases now"):
        current_release("s3://bucket/lake")


def test_load_release_detects_changed_missing_and_extra_files(lake_root, tmp_path):
    _publish(lake_root, tmp_path, "v1")
    folder = lake_root / "releases" / "v1"
    (folder / "model.pt").write_bytes(b"tampered")
    (folder / "index" / "shards" / "ids.npy").unlink()
    (folder / "index" / "stray.bin").write_bytes(b"x")
    with pytest.raises(ReleaseError) as err:
        load_release(lake_root, "v1")
    assert str(err.value) == (
        f"release v1 at {folder} does not match its manifest: index/shards/ids.npy: missing; "
        "model.pt: sha256 differs from the manifest; index/stray.bin: not in the manifest"
    )


def test_existing_version_is_refused_and_current_kept(lake_root, tmp_path):
    _publish(lake_root, tmp_path, "v1")
    with pytest.raises(ReleaseError, match=r"release 'v1' already exists .* releases are immutable"):
        publish_release(lake_root, "v1", _artifacts(tmp_path, "other"), {})
    assert load_release(lake_root, "v1").manifest["model_version"] == "m-v1"
    assert _entries(lake_root) == [".publish.lock", "CURRENT", "v1"]


@pytest.mark.parametrize(
    ("version", "artifacts", "manifest", "keep", "fail_at", "message"),
    [
        ("../x", None, {}, 5, None, r"release version must be .* got '\.\./x'"),
        ("CURRENT", None, {}, 5, None, r"release version must be .* got 'CURRENT'"),
        ("v1", None, {}, 0, None, r"keep must be an int >= 1 \(releases to keep\), got 0"),
        ("v1", None, {}, 5, "commit", r"fail_at must be None or one of \('copy', 'manifest', 'rename', 'pointer', 'prune'\), got 'commit'"),
        ("v1", None, {"files": 1}, 5, None, r"manifest keys \['files'\] are written by publish_release"),
        ("v1", None, {"x": {1, 2}}, 5, None, r"manifest must be JSON-serialisable"),
        ("v1", None, {"x": float("nan")}, 5, None, r"manifest must be JSON-serialisable without NaN/inf"),
        ("v1", {"model": "/nonexistent/model.pt"}, {}, 5, None, r"artifact 'model': '/nonexistent/model.pt' is not an existing"),
        ("v1", {"manifest.json": "."}, {}, 5, None, r"artifact names must be plain file names"),
        ("v1", {}, {}, 5, None, r"artifacts must be a non-empty dict"),
    ],
)
def test_publish_rejects_bad_arguments_before_writing(lake_root, tmp_path, version, artifacts, manifest, keep, fail_at, message):
    artifacts = _artifacts(tmp_path, "a") if artifacts is None else artifacts
    with pytest.raises(ValueError, match=message):
        publish_release(lake_root, version, artifacts, manifest, keep=keep, fail_at=fail_at)
    assert not (lake_root / "releases").exists()


# ---------------------------------------------------------------------------------------------
# crash safety


@pytest.mark.parametrize("step", ["copy", "manifest", "rename", "pointer"])
def test_injected_failure_before_switch_keeps_current(lake_root, tmp_path, step):
    _publish(lake_root, tmp_path, "v1")
    with pytest.raises(InjectedFailure, match=f"injected failure at publish step '{step}'"):
        _publish(lake_root, tmp_path, "v2", fail_at=step)
    assert current_release(lake_root).version == "v1"
    assert load_release(lake_root, "v1").is_current
    assert _versions(lake_root) == ["v1"]
    assert _entries(lake_root) == [".publish.lock", "CURRENT", "v1"]  # nothing of v2 left behind
    assert _publish(lake_root, tmp_path, "v2").version == "v2"  # the same version can be retried
    assert _versions(lake_root) == ["v1", "v2"]


@pytest.mark.parametrize("step", ["copy", "manifest", "rename", "pointer"])
def test_injected_failure_on_first_publish_leaves_no_current(lake_root, tmp_path, step):
    with pytest.raises(InjectedFailure):
        _publish(lake_root, tmp_path, "v1", fail_at=step)
    assert current_release(lake_root) is None
    assert _entries(lake_root) == [".publish.lock"]


def test_injected_failure_at_prune_leaves_new_release_current(lake_root, tmp_path):
    for version in ("v1", "v2", "v3"):
        _publish(lake_root, tmp_path, version)
    with pytest.raises(InjectedFailure, match="'prune'"):
        _publish(lake_root, tmp_path, "v4", keep=1, fail_at="prune")
    assert load_release(lake_root, "v4").is_current
    assert _versions(lake_root) == ["v1", "v2", "v3", "v4"]  # pruning simply did not happen


_CHILD = """
import sys, time
from pathlib import Path
sys.path.insert(0, {repo!r})
from index_builder import release
lake, version, pause_step, ready = sys.argv[1:5]
original = release._reach
def pause(step, fail_at):
    if step == pause_step:
        Path(ready).write_text(step)
        time.sleep(120)
    original(step, fail_at)
release._reach = pause
release.publish_release(lake, version, {{"model.pt": sys.argv[5], "index": sys.argv[6]}}, {{"model_version": version}})
"""


@pytest.mark.multiprocess
@pytest.mark.parametrize("pause_step", ["copy", "pointer"])
def test_sigkill_mid_publish_keeps_current_and_next_publish_cleans_up(lake_root, tmp_path, pause_step):
    _publish(lake_root, tmp_path, "v1")
    artifacts = _artifacts(tmp_path, "v2", model_bytes=8 << 20)  # 8 MiB model
    ready = tmp_path / "ready"
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD.format(repo=str(REPO_ROOT)), str(lake_root), "v2", pause_step, str(ready),
         artifacts["model.pt"], artifacts["index"]],
    )
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert child.poll() is None, f"publisher exited early with {child.returncode}"
            assert time.monotonic() < deadline, "publisher never reached the pause point"
            time.sleep(0.05)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL

    assert current_release(lake_root).version == "v1"
    assert load_release(lake_root, "v1").is_current
    leftovers = [name for name in _entries(lake_root) if name.startswith((".staging-", "CURRENT.tmp-"))]
    if pause_step == "copy":
        assert len(leftovers) == 1 and leftovers[0].startswith(".staging-v2-")
        assert _versions(lake_root) == ["v1"]
    else:
        # Renamed into place but never made current: complete, listed, not served.
        assert len(leftovers) == 1 and leftovers[0].startswith("CURRENT.tmp-")
        assert [(r.version, r.is_current) for r in list_releases(lake_root)] == [("v1", True), ("v2", False)]
        assert load_release(lake_root, "v2").manifest["model_version"] == "v2"

    _publish(lake_root, tmp_path, "v3")
    assert current_release(lake_root).version == "v3"
    assert not [name for name in _entries(lake_root) if name.startswith((".staging-", ".trash-", "CURRENT.tmp-"))]


# ---------------------------------------------------------------------------------------------
# rollback and pruning


def test_rollback_restores_previous_and_unknown_version_lists_versions(lake_root, tmp_path):
    for version in ("v1", "v2", "v3"):
        _publish(lake_root, tmp_path, version)
    info = rollback(lake_root)
    assert (info.version, info.is_current, current_release(lake_root).version) == ("v2", True, "v2")
    assert rollback(lake_root).version == "v1"
    with pytest.raises(ReleaseError, match=r"no release to roll back to from 'v1'.* available versions: \['v1', 'v2', 'v3'\]"):
        rollback(lake_root)
    with pytest.raises(ReleaseError, match=r"unknown release version 'v9'; available versions: \['v1', 'v2', 'v3'\]"):
        rollback(lake_root, "v9")
    assert rollback(lake_root, "v3").version == "v3"
    assert [(r.version, r.is_current) for r in list_releases(lake_root)] == [("v1", False), ("v2", False), ("v3", True)]


def test_rollback_goes_back_to_what_was_served_not_a_rolled_back_release(lake_root, tmp_path):
    for version in ("v1", "v2", "v3"):
        _publish(lake_root, tmp_path, version)
    rollback(lake_root, "v1")  # v2 and v3 were bad
    assert _publish(lake_root, tmp_path, "v4").manifest["replaces"] == "v1"
    assert rollback(lake_root).version == "v1"


def test_rollback_refuses_a_corrupted_release(lake_root, tmp_path):
    _publish(lake_root, tmp_path, "v1")
    _publish(lake_root, tmp_path, "v2")
    (lake_root / "releases" / "v1" / "model.pt").write_bytes(b"bit rot")
    with pytest.raises(ReleaseError, match=r"model\.pt: sha256 differs"):
        rollback(lake_root)
    assert current_release(lake_root).version == "v2"


def test_prune_keeps_last_k(lake_root, tmp_path):
    for version in ("v1", "v2", "v3", "v4", "v5"):
        _publish(lake_root, tmp_path, version, keep=2)
    assert _versions(lake_root) == ["v4", "v5"]
    assert _entries(lake_root) == [".publish.lock", "CURRENT", "v4", "v5"]


def test_prune_never_removes_current_or_the_one_before_it(lake_root, tmp_path):
    for version in ("v1", "v2", "v3"):
        _publish(lake_root, tmp_path, version, keep=1)
    assert _versions(lake_root) == ["v2", "v3"]  # keep=1 still keeps the rollback target
    rollback(lake_root, "v2")
    _publish(lake_root, tmp_path, "v4", keep=2)
    # v2 is older than the last 2 but is what v4 replaced (the rollback target): kept.
    assert _versions(lake_root) == ["v2", "v3", "v4"]
    _publish(lake_root, tmp_path, "v5", keep=2)
    assert _versions(lake_root) == ["v4", "v5"]
    assert current_release(lake_root).version == "v5"


def test_new_release_version_is_sortable_and_unique():
    first = new_release_version()
    second = new_release_version()
    assert re.fullmatch(r"\d{8}T\d{6}Z-[0-9a-f]{6}", first)
    assert first != second and first[:16] <= second[:16]


# ---------------------------------------------------------------------------------------------
# gates


def test_gates_pass_and_return_results():
    assert check_gates(0.96, 0.95, 0.41, 0.40, 0.01, "HR@50") == {
        "index_recall": {"passed": True, "k": 100, "value": 0.96, "target": 0.95},
        "model_quality": {"passed": True, "metric": "HR@50", "value": 0.41, "current": 0.40, "tolerance": 0.01},
    }
    assert check_gates(0.95, 0.95, 0.39, 0.40, 0.01, "HR@50")["model_quality"]["passed"]  # exactly at tolerance
    assert check_gates(0.95, 0.95, 0.01, None, 0.01, "HR@50")["model_quality"]["current"] is None


def test_gate_index_recall_fails_with_named_gate():
    with pytest.raises(GateFailedError) as err:
        check_gates(0.91, 0.95, 0.41, 0.40, 0.01, "HR@50")
    assert str(err.value) == "gate index_recall: recall@100=0.91 < target 0.95"
    assert isinstance(err.value, TowerlakeError)


def test_gate_model_quality_fails_with_named_gate():
    with pytest.raises(GateFailedError) as err:
        check_gates(0.96, 0.95, 0.31, 0.40, 0.01, "HR@50")
    assert str(err.value) == (
        "gate model_quality: HR@50=0.31 is worse than the current release's 0.40 by more than the tolerance 0.01"
    )


def test_both_gates_failing_are_both_named():
    with pytest.raises(GateFailedError) as err:
        check_gates(0.9, 0.95, 0.2, 0.4, 0.05, "NDCG@10", recall_k=10)
    assert str(err.value) == (
        "gate index_recall: recall@10=0.90 < target 0.95; gate model_quality: NDCG@10=0.20 is worse than "
        "the current release's 0.40 by more than the tolerance 0.05"
    )


def test_gate_nan_metric_fails():
    with pytest.raises(GateFailedError, match=r"gate model_quality: HR@50=nan"):
        check_gates(0.96, 0.95, float("nan"), 0.40, 0.01, "HR@50")
