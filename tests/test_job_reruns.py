"""The contract the DAGs rely on, job by job, without Spark: exit 99 for "nothing to do",
re-runs with explicit versions that find their artifact complete (``--exist-ok``), and the
hourly publish that refuses a fine-tune whose parent CURRENT no longer serves.

The lakes here hold real artifact folders (the files the jobs write and read: manifests,
CURRENT); the Airflow real runs (tests/test_airflow_dags.py) build them with the real jobs.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from jobs import build_index as build_index_job
from jobs import publish as publish_job
from jobs import train as train_job
from jobs.cli import EXIT_BAD_INPUT, EXIT_NOTHING_TO_DO, run_job
from lake_contract.errors import NothingToDo, TowerlakeError

ROOT = Path(__file__).resolve().parents[1]


def _leave_with(err: BaseException):
    def main():
        raise err
    return main


@pytest.mark.parametrize(("err", "code", "last_line"), [
    (NothingToDo("window 2026-12-01T10 has no new pairs"), EXIT_NOTHING_TO_DO,
     "skipped: demo: window 2026-12-01T10 has no new pairs"),
    (TowerlakeError("gate index_recall: recall@5=0.80 < target 0.999"), EXIT_BAD_INPUT,
     "error: demo: gate index_recall: recall@5=0.80 < target 0.999"),
])
def test_run_job_maps_nothing_to_do_to_99_and_bad_input_to_2(err, code, last_line, capsys):
    with pytest.raises(SystemExit) as leaving:
        run_job("demo", _leave_with(err))
    assert leaving.value.code == code
    assert capsys.readouterr().err.strip().splitlines()[-1] == last_line


def test_a_real_job_process_exits_99_with_its_reason_last(tmp_path):
    """The whole path a DAG sees: a job process, its exit code and its last stderr line."""
    lake = _lake_with_release(tmp_path, parent_of_candidate="m-old", serving="m-new")
    done = subprocess.run([sys.executable, "-m", "jobs.publish", "--lake", str(lake), "--model", "ft", "--index", "ft",
                           "--require-parent-current"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 99, done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        "skipped: publish: model ft fine-tunes m-old, but CURRENT is r1 (model m-new): not publishing a "
        "fine-tune of a model that is no longer served; CURRENT unchanged")
    assert (lake / "releases" / "CURRENT").read_text().strip() == "r1"


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def _model(lake: Path, version: str, **manifest) -> None:
    _write_json(lake / "models" / version / "manifest.json", {"version": version, **manifest})
    (lake / "models" / version / "weights.pt").write_bytes(b"weights")


def _lake_with_release(tmp_path: Path, parent_of_candidate: str, serving: str) -> Path:
    """CURRENT = release r1 serving model ``serving``; candidate model ``ft`` (a fine-tune of
    ``parent_of_candidate``) with its index ``ft``."""
    lake = tmp_path / "lake"
    _model(lake, serving, kind="full", parent=None)
    _model(lake, "ft", kind="finetune", parent=parent_of_candidate, window="2026-12-01T10")
    _write_json(lake / "index" / "ft" / "manifest.json", {"model_version": "ft"})
    _write_json(lake / "releases" / "r1" / "manifest.json",
                {"version": "r1", "model_version": serving, "index_version": serving, "sequence": 1})
    (lake / "releases" / "CURRENT").write_text("r1\n")
    return lake


def test_publish_require_parent_current_skips_a_superseded_fine_tune(tmp_path):
    lake = _lake_with_release(tmp_path, parent_of_candidate="m-old", serving="m-new")
    with pytest.raises(NothingToDo, match=r"model ft fine-tunes m-old, but CURRENT is r1 \(model m-new\)"):
        publish_job.main(["--lake", str(lake), "--model", "ft", "--index", "ft", "--require-parent-current"])
    assert (lake / "releases" / "CURRENT").read_text().strip() == "r1"
    assert sorted(p.name for p in (lake / "releases").iterdir()) == ["CURRENT", "r1"]


def test_publish_require_parent_current_refuses_a_full_model(tmp_path):
    lake = _lake_with_release(tmp_path, parent_of_candidate="m-old", serving="m-new")
    _write_json(lake / "index" / "m-new" / "manifest.json", {"model_version": "m-new"})
    with pytest.raises(ValueError, match="model m-new has no parent"):
        publish_job.main(["--lake", str(lake), "--model", "m-new", "--index", "m-new", "--require-parent-current"])


def test_publish_exist_ok_finds_its_release_and_leaves_current_alone(tmp_path, capsys):
    lake = _lake_with_release(tmp_path, parent_of_candidate="m-new", serving="m-new")
    _write_json(lake / "releases" / "r2" / "manifest.json",
                {"version": "r2", "model_version": "ft", "index_version": "ft", "sequence": 2})
    # A person rolled back to r1 after r2 was published: a re-run must not undo that.
    assert publish_job.main(["--lake", str(lake), "--model", "ft", "--index", "ft", "--release-version", "r2",
                             "--exist-ok", "--require-parent-current"]) == 0
    assert "release r2 (model ft) is already published; CURRENT is r1; nothing to do" in capsys.readouterr().out
    assert (lake / "releases" / "CURRENT").read_text().strip() == "r1"
    with pytest.raises(ValueError, match="release r1 already exists with model m-new"):
        publish_job.main(["--lake", str(lake), "--model", "ft", "--index", "ft", "--release-version", "r1",
                          "--exist-ok"])
    with pytest.raises(ValueError, match="--exist-ok needs --release-version"):
        publish_job.main(["--lake", str(lake), "--exist-ok"])


def test_train_exist_ok_returns_without_a_second_model(tmp_path, capsys):
    lake = tmp_path / "lake"
    _model(lake, "hourly-20261201T10", kind="finetune", parent="nightly-20261130", window="2026-12-01T10")
    before = sorted(p.name for p in (lake / "models").iterdir())
    assert train_job.main(["--lake", str(lake), "--mode", "finetune", "--window", "2026-12-01T10",
                           "--version", "hourly-20261201T10", "--exist-ok"]) == 0
    assert ("model version hourly-20261201T10 is already complete (finetune, parent nightly-20261130); "
            "nothing to do") in capsys.readouterr().out
    assert sorted(p.name for p in (lake / "models").iterdir()) == before
    with pytest.raises(ValueError, match=r"already exists with \{'kind': 'finetune', 'window': '2026-12-01T10'\}, "
                                         r"not \{'kind': 'finetune', 'window': '2026-12-01T11'\}"):
        train_job.main(["--lake", str(lake), "--mode", "finetune", "--window", "2026-12-01T11",
                        "--version", "hourly-20261201T10", "--exist-ok"])
    with pytest.raises(ValueError, match="--exist-ok needs --version"):
        train_job.parse_config(["--exist-ok"])


def test_build_index_exist_ok_accepts_only_the_same_models_index(tmp_path, capsys):
    lake = tmp_path / "lake"
    _write_json(lake / "index" / "nightly-20261201" / "manifest.json", {"model_version": "nightly-20261201"})
    assert build_index_job.main(["--lake", str(lake), "--model", "nightly-20261201", "--exist-ok"]) == 0
    assert "index/nightly-20261201 of model nightly-20261201 is already complete" in capsys.readouterr().out
    with pytest.raises(ValueError, match="built from model nightly-20261201, not other"):
        build_index_job.main(["--lake", str(lake), "--model", "other", "--index-version", "nightly-20261201",
                              "--exist-ok"])


def test_publish_skip_if_published_is_99_only_for_a_published_release(tmp_path, capsys):
    lake = _lake_with_release(tmp_path, parent_of_candidate="m-new", serving="m-new")
    with pytest.raises(NothingToDo, match=r"release r1 \(model m-new\) is already published"):
        publish_job.main(["--lake", str(lake), "--skip-if-published", "r1"])
    assert publish_job.main(["--lake", str(lake), "--skip-if-published", "nightly-20261201"]) == 0
    assert "release nightly-20261201 is not published yet" in capsys.readouterr().out
    assert (lake / "releases" / "CURRENT").read_text().strip() == "r1"
