"""jobs.train end to end on MovieLens-100K: torchrun with 2 gloo processes, the model version
it writes, jobs.evaluate agreeing with it, and failures that leave nothing behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.spark, pytest.mark.slow, pytest.mark.multiprocess, pytest.mark.timeout(900)]

VENV_BIN = Path(sys.executable).parent


def _run(args: list[str], lake_root: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "TOWERLAKE_LAKE": lake_root, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=Path(__file__).resolve().parents[1])


@pytest.fixture(scope="module")
def trained(ml_lake):
    _, lake, _ = ml_lake
    proc = _run([str(VENV_BIN / "torchrun"), "--standalone", "--nproc-per-node", "2", "-m", "jobs.train",
                 "--epochs", "2", "--no-progress", "--version", "ddp-e2e",
                 "--set", "max_steps_per_epoch=40", "--set", "early_stopping_patience=0"], lake.root)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return lake, proc.stdout


def test_torchrun_training_writes_a_complete_model_version(trained):
    from lake_contract.delta_snapshot import table_version

    lake, stdout = trained
    folder = Path(lake.root.removeprefix("file://")) / "models" / "ddp-e2e"
    assert sorted(p.name for p in folder.iterdir()) == [
        "config.json", "history.jsonl", "manifest.json", "metrics.json", "schema.json", "training.png", "weights.pt"]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["backend"] == "gloo"
    for table in ("pairs/train", "pairs/valid", "pairs/test", "features/items", "vocab/item_id"):
        assert manifest["table_versions"][table] == table_version(lake.table(table)), table
    metrics = json.loads((folder / "metrics.json").read_text())
    assert [h["steps"] for h in metrics["history"]] == [40, 40]  # every rank ran the same capped steps
    test = metrics["test"]
    assert test["model"]["rows"] == 943 and test["itempop"]["rows"] == 943
    # even 2 x 40 steps of 2 x 512 rows learn more than popularity
    assert test["model"]["hr@50"] > test["itempop"]["hr@50"]
    assert 0.5 < test["model"]["auc"] <= 1.0
    assert "model / ItemPop HR@50" in stdout and "wrote models/ddp-e2e" in stdout
    assert not list(folder.parent.glob(".staging-ddp-e2e-*"))


def test_evaluate_job_reproduces_the_training_metrics(trained, tmp_path):
    lake, _ = trained
    out = tmp_path / "eval.json"
    proc = _run([sys.executable, "-m", "jobs.evaluate", "--model", "ddp-e2e", "--json", str(out)], lake.root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(out.read_text())
    folder = Path(lake.root.removeprefix("file://")) / "models" / "ddp-e2e"
    expected = json.loads((folder / "metrics.json").read_text())
    for split in ("valid", "test"):
        for ranker in ("model", "itempop"):
            for metric in ("hr@10", "hr@50", "ndcg@10", "mean_rank"):
                assert got[split][ranker][metric] == pytest.approx(expected[split][ranker][metric], rel=1e-6)


def test_a_failed_training_run_leaves_no_model_version(trained):
    lake, _ = trained
    models = Path(lake.root.removeprefix("file://")) / "models"
    before = sorted(p.name for p in models.iterdir())
    proc = _run([sys.executable, "-m", "jobs.train", "--batch-size", "1000000", "--no-progress"], lake.root)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: train:") and "lower --batch-size" in last
    assert sorted(p.name for p in models.iterdir()) == before


def test_help_answers_without_loading_torch():
    proc = subprocess.run([sys.executable, "-c", "import sys, runpy; sys.argv=['x', '--help'];"
                           "import jobs.train as t;\ntry:\n    t.build_parser().parse_args(['--help'])\n"
                           "except SystemExit: pass\nprint('torch' in sys.modules)"],
                          capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    assert proc.stdout.strip().splitlines()[-1] == "False"
    assert "torchrun --nproc-per-node 2 -m jobs.train" in proc.stdout
