"""Gate a model version and its index, then publish them as one release and switch CURRENT.

Gates (a failure exits 2 naming the gate, the value and the threshold; nothing is published):
  index_recall    the index's recall@K vs exact search (its manifest) >= its recall target
  model_quality   the model's valid --metric >= the current release's - --tolerance
                  (skipped when nothing is published yet)
With --require-parent-current, a fine-tuned model is published only while CURRENT still
serves its parent (otherwise exit 99: nothing to do, CURRENT unchanged).
The release (releases/<version>/) holds copies of models/<model> and index/<index> and a
manifest (model version and parent, data table versions, valid/test metrics, index
parameters and recall, gate results); it is complete before CURRENT moves. The newest --keep
releases are kept (never the current one or the one it replaced).

Examples:
  python -m jobs.publish                              # newest model + its newest index
  python -m jobs.publish --model 20261123T101500Z-1a2b3c --tolerance 0.02 --metric ndcg@10
  python -m jobs.publish --model hourly-20261201T10 --index hourly-20261201T10 --release-version
      hourly-20261201T10 --exist-ok --require-parent-current   # what the hourly DAG runs
  python -m jobs.publish --list                       # releases, current marked with *
  python -m jobs.publish --rollback                   # back to the release CURRENT replaced
  python -m jobs.publish --rollback 20261122T020000Z-9f8e7d
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from typing import Literal

if __package__ in (None, ""):  # python jobs/publish.py
    import os

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from index_builder.gates import DEFAULT_METRIC, DEFAULT_TOLERANCE
from jobs.cli import job_parser, run_job, setup_logging

Action = Literal["publish", "rollback", "list", "skip-if-published"]
_PREVIOUS = ""  # --rollback without a version


@dataclass(frozen=True)
class PublishJobConfig:
    lake: str
    action: Action
    model: str | None
    index: str | None
    tolerance: float
    metric: str
    keep: int
    rollback_to: str | None  # None: the release CURRENT replaced
    release_version: str | None
    exist_ok: bool = False
    require_parent_current: bool = False

    def __post_init__(self) -> None:
        import math
        import re

        if self.action not in ("publish", "rollback", "list", "skip-if-published"):
            raise ValueError(f"action must be publish, rollback, list or skip-if-published, got {self.action!r}")
        if not math.isfinite(self.tolerance) or self.tolerance < 0:
            raise ValueError(f"--tolerance must be a number >= 0, got {self.tolerance!r}")
        if not re.fullmatch(r"(hr|recall|ndcg)@\d+|auc", self.metric):
            raise ValueError(f"--metric must be hr@K, recall@K, ndcg@K or auc (e.g. hr@50), got {self.metric!r}")
        if self.keep < 1:
            raise ValueError(f"--keep must be >= 1, got {self.keep!r}")
        if self.exist_ok and not self.release_version:
            raise ValueError("--exist-ok needs --release-version VERSION (the release a re-run would find)")
        if self.action != "publish" and (self.exist_ok or self.require_parent_current):
            raise ValueError("--exist-ok and --require-parent-current only apply to publishing, not to "
                             f"--{self.action}")


def build_parser() -> argparse.ArgumentParser:
    p = job_parser("publish", __doc__)
    p.add_argument("--model", help="model version (default: the index's model, else the newest)")
    p.add_argument("--index", help="index version (default: the newest index built from the model)")
    p.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                   help=f"how much worse than the current release the metric may be (default: {DEFAULT_TOLERANCE})")
    p.add_argument("--metric", default=DEFAULT_METRIC,
                   help=f"valid metric of the model_quality gate (default: {DEFAULT_METRIC})")
    p.add_argument("--keep", type=int, default=5, help="releases to keep (default: 5)")
    p.add_argument("--release-version", help="name of the new release (default: UTC time + random suffix)")
    p.add_argument("--exist-ok", action="store_true",
                   help="with --release-version: that release already published with the same model and index is "
                   "success: exit 0 without a second release and without moving CURRENT (a scheduler's re-run)")
    p.add_argument("--require-parent-current", action="store_true",
                   help="for a fine-tuned model: publish only if CURRENT still serves the model's parent; "
                   "otherwise exit 99 (nothing to do) and leave CURRENT as it is")
    actions = p.add_mutually_exclusive_group()
    actions.add_argument("--rollback", nargs="?", const=_PREVIOUS, metavar="VERSION",
                         help="point CURRENT at VERSION (default: the release the current one replaced)")
    actions.add_argument("--list", action="store_true", help="list releases (current marked with *)")
    actions.add_argument("--skip-if-published", metavar="RELEASE",
                         help="publish nothing: exit 99 (nothing to do) when RELEASE is already published, else 0; "
                         "the first task of a DAG run, so a re-run of a published run changes nothing")
    return p


def parse_config(argv: list[str] | None = None) -> PublishJobConfig:
    a = build_parser().parse_args(argv)
    action: Action = ("list" if a.list else "rollback" if a.rollback is not None
                      else "skip-if-published" if a.skip_if_published else "publish")
    return PublishJobConfig(lake=a.lake, action=action, model=a.model, index=a.index, tolerance=a.tolerance,
                            metric=a.metric, keep=a.keep, rollback_to=a.rollback or None,
                            release_version=a.skip_if_published or a.release_version, exist_ok=a.exist_ok,
                            require_parent_current=a.require_parent_current)


def _list(lake_root: str) -> None:
    from index_builder.release import list_releases

    releases = list_releases(lake_root)
    if not releases:
        print(f"no releases under {lake_root}/releases: publish one with python -m jobs.publish")
        return
    print(f"{'':2}{'release':<26}{'model':<26}{'index':<26}{'created (UTC)':<21}recall  valid metrics")
    for info in releases:
        m = info.manifest
        valid = m.get("metrics", {}).get("valid", {}).get("model", {})
        recall = m.get("index", {}).get("recall")
        print(f"{'* ' if info.is_current else '  '}{info.version:<26}{m.get('model_version', '?'):<26}"
              f"{m.get('index_version', '?'):<26}{str(m.get('created_at', ''))[:19]:<21}"
              f"{'' if recall is None else f'{recall:.4f}':<8}"
              + " ".join(f"{k}={valid[k]:.4f}" for k in ("hr@10", "hr@50", "ndcg@10") if k in valid))


def main(argv: list[str] | None = None) -> int:
    job = parse_config(argv)
    setup_logging("publish")
    from index_builder.release import current_release, rollback
    from lake_contract.lake import Lake

    lake = Lake(job.lake)
    if job.action == "list":
        _list(lake.root)
        return 0
    if job.action == "skip-if-published":
        from index_builder.release import list_releases
        from lake_contract.errors import NothingToDo

        found = next((r for r in list_releases(lake.root) if r.version == job.release_version), None)
        if found is not None:
            raise NothingToDo(f"release {found.version} (model {found.manifest.get('model_version')}) is already "
                              "published: this run has nothing left to do")
        print(f"publish: release {job.release_version} is not published yet")
        return 0
    if job.action == "rollback":
        before = current_release(lake.root)
        info = rollback(lake.root, job.rollback_to)
        print(f"rollback: CURRENT {before.version if before else None} -> {info.version} "
              f"(model {info.manifest.get('model_version')}, index {info.manifest.get('index_version')})")
        return 0

    from index_builder.publishing import publish_model_release, resolve_versions

    started = time.monotonic()
    model, index = resolve_versions(lake.root, job.model, job.index)
    print(f"publish: model {model} + index/{index} (lake {lake.root})")
    if job.exist_ok and _already_published(lake.root, job.release_version, model, index):
        return 0
    if job.require_parent_current:
        _check_parent_is_current(lake.root, model)
    report = publish_model_release(lake.root, model, index, metric=job.metric, tolerance=job.tolerance,
                                   keep=job.keep, release_version=job.release_version)
    recall, quality = report.gates["index_recall"], report.gates["model_quality"]
    print(f"  gate index_recall: recall@{recall['k']}={recall['value']:.4f} >= target {recall['target']:.4f}: passed")
    against = ("no current release" if quality["current"] is None else
               f"current {quality['current_release']} has {quality['current']:.4f}, tolerance {quality['tolerance']}")
    print(f"  gate model_quality: {quality['metric']}={quality['value']:.4f} ({against}): passed")
    files = report.release.manifest["files"]
    print(f"wrote releases/{report.release.version} ({len(files)} files, "
          f"{sum(f['bytes'] for f in files.values()) / 1e6:.1f} MB) -> {report.release.path}")
    print(f"CURRENT {report.previous} -> {report.release.version}; [publish] {time.monotonic() - started:.1f}s")
    return 0


def _already_published(lake_root: str, release_version: str, model: str, index: str) -> bool:
    """--exist-ok: True (after saying so) when ``release_version`` is published with this model
    and index; ValueError when it holds another model or index."""
    from index_builder.release import list_releases

    found = next((r for r in list_releases(lake_root) if r.version == release_version), None)
    if found is None:
        return False
    have = (found.manifest.get("model_version"), found.manifest.get("index_version"))
    if have != (model, index):
        raise ValueError(f"release {release_version} already exists with model {have[0]} + index {have[1]}, not "
                         f"{model} + {index}: pick another --release-version")
    current = next((r.version for r in list_releases(lake_root) if r.is_current), None)
    print(f"publish: release {release_version} (model {model}) is already published; CURRENT is {current}; "
          "nothing to do (--exist-ok)")
    return True


def _check_parent_is_current(lake_root: str, model: str) -> None:
    """--require-parent-current: NothingToDo (exit 99) unless CURRENT serves ``model``'s parent."""
    import json
    from pathlib import Path

    from index_builder.release import current_release
    from lake_contract.errors import NothingToDo
    from lake_contract.lake import Lake, to_local_path

    manifest = Path(to_local_path(Lake(lake_root).table("models")) or "") / model / "manifest.json"
    parent = json.loads(manifest.read_text()).get("parent")
    if parent is None:
        raise ValueError(f"--require-parent-current applies to fine-tuned models, but model {model} has no parent "
                         "(a full retrain): publish it without the flag")
    current = current_release(lake_root)
    serving = None if current is None else current.manifest.get("model_version")
    if serving != parent:
        where = "nothing is published" if current is None else f"CURRENT is {current.version} (model {serving})"
        raise NothingToDo(f"model {model} fine-tunes {parent}, but {where}: not publishing a fine-tune of a "
                          "model that is no longer served; CURRENT unchanged")
    print(f"  parent check: CURRENT {current.version} serves {parent}, the parent of {model}: passed")


if __name__ == "__main__":
    run_job("publish", lambda: main(sys.argv[1:]))
