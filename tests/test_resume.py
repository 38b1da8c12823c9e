"""Exact resume: SIGKILL a 2-process DDP training mid-epoch after a checkpoint, re-run the same
command, and end with the same weights as a run that was never killed (bit-exact on CPU), with
2 reader threads per rank (their row groups finish in a racy order; the loader restores it)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

pytestmark = [pytest.mark.spark, pytest.mark.slow, pytest.mark.multiprocess, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).parent / "torchrun"


def _command(version: str, checkpoint_dir: Path) -> list[str]:
    return [str(TORCHRUN), "--standalone", "--nproc-per-node", "2", "-m", "jobs.train", "--epochs", "2",
            "--batch-size", "256", "--checkpoint-every", "5", "--checkpoint-dir", str(checkpoint_dir),
            "--version", version, "--no-progress", "--set", "max_steps_per_epoch=20",
            "--set", "early_stopping_patience=0", "--set", "model.dropout=0.1",  # dropout: RNG state matters
            "--set", "reader_workers=2"]


def _errors(proc: subprocess.CompletedProcess) -> str:
    """The jobs' own one-line reasons (torchrun's summary hides them at the end of stderr)."""
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:") or "Error" in line]
    return "\n".join(lines[-10:]) or proc.stderr[-3000:]


def _env(lake_root: str) -> dict[str, str]:
    return {**os.environ, "TOWERLAKE_LAKE": lake_root, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def test_sigkill_mid_epoch_then_rerun_ends_with_identical_weights(ml_lake, tmp_path):
    _, lake, _ = ml_lake
    models = Path(lake.root.removeprefix("file://")) / "models"
    reference = subprocess.run(_command("resume-ref", tmp_path / "ck-ref"), capture_output=True, text=True,
                               env=_env(lake.root), cwd=ROOT, timeout=600)
    assert reference.returncode == 0, _errors(reference)
    assert not (tmp_path / "ck-ref").exists()  # a finished run removes its checkpoints

    checkpoints = tmp_path / "ck-killed"
    killed = subprocess.Popen(_command("resume-killed", checkpoints), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, env=_env(lake.root), cwd=ROOT, start_new_session=True)
    target = checkpoints / "step-0000000025.pt"  # epoch 2, batch 5 of 20
    deadline = time.monotonic() + 500
    while not target.exists() and killed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    # torchrun starts its workers in sessions of their own: kill every descendant, at once.
    victims = [killed.pid] + [p.pid for p in psutil.Process(killed.pid).children(recursive=True)]
    for pid in victims:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    killed.wait(timeout=60)
    for pid in victims:
        with contextlib.suppress(psutil.NoSuchProcess):
            psutil.Process(pid).wait(timeout=30)
    assert target.exists(), "the run never reached the checkpoint it should be killed after"
    assert not (models / "resume-killed").exists(), "killed too late: the run had already finished"
    latest = max(int(p.stem.split("-")[1]) for p in checkpoints.glob("step-*.pt"))
    assert 25 <= latest < 40  # mid-epoch 2 (20 steps per epoch)

    started = time.monotonic()
    resumed = subprocess.run(_command("resume-killed", checkpoints), capture_output=True, text=True,
                             env=_env(lake.root), cwd=ROOT, timeout=600)
    assert resumed.returncode == 0, _errors(resumed)
    assert f"resumed at epoch 2, batch {latest - 20} " in resumed.stdout, resumed.stdout[-2000:]
    print(f"resumed run took {time.monotonic() - started:.1f}s in all")

    assert not list(models.glob(".staging-resume-killed-*"))  # the killed run's leftovers are gone
    want = torch.load(models / "resume-ref" / "weights.pt", weights_only=True)
    got = torch.load(models / "resume-killed" / "weights.pt", weights_only=True)
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(want[name], got[name]), f"{name} differs after resume"
    ref_metrics = json.loads((models / "resume-ref" / "metrics.json").read_text())
    got_metrics = json.loads((models / "resume-killed" / "metrics.json").read_text())
    assert got_metrics["test"] == ref_metrics["test"]
    assert [h["loss"] for h in got_metrics["history"]] == [h["loss"] for h in ref_metrics["history"]]


def test_a_checkpoint_of_another_config_is_refused_with_a_clear_message(ml_lake, tmp_path):
    from trainer.checkpoints import CheckpointManager

    _, lake, _ = ml_lake
    folder = tmp_path / "ck"
    CheckpointManager(folder).save({"config": {"lr": 1.0}, "schema": "{}", "world_size": 1}, 7)
    proc = subprocess.run([sys.executable, "-m", "jobs.train", "--epochs", "1", "--checkpoint-dir", str(folder),
                           "--no-progress"], capture_output=True, text=True, env=_env(lake.root), cwd=ROOT,
                          timeout=300)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert "does not belong to this run" in last and "--fresh" in last and "config fields" in last


class _WritesMarker:
    """Unpickling this runs ``Path.touch(marker)``: what a planted checkpoint could do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _plant_malicious_checkpoint(folder: Path, marker: Path, step: int = 7) -> Path:
    """A file named like a real checkpoint whose pickle would create ``marker`` when loaded
    with weights_only=False (written with torch.save, bypassing CheckpointManager's check)."""
    import pickle

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step-{step:010d}.pt"
    torch.save({"config": {}, "schema": "{}", "world_size": 1, "model": _WritesMarker(marker)}, path)
    # Prove the plant is live: an unsafe load would run it.
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)
    return path


def test_a_planted_checkpoint_that_would_run_code_is_refused_without_running_it(tmp_path):
    from lake_contract.errors import TowerlakeError
    from trainer.checkpoints import CheckpointManager, UnsafeCheckpointError

    marker = tmp_path / "pwned"
    manager = CheckpointManager(tmp_path / "ck")
    path = _plant_malicious_checkpoint(manager.folder, marker)
    assert manager.latest() == path
    with pytest.raises(UnsafeCheckpointError) as err:
        manager.load(path)
    assert isinstance(err.value, TowerlakeError)
    assert str(err.value).startswith(f"checkpoint {path} was refused: it asks for getattr, and a checkpoint "
                                     "holds only tensors and plain data")
    assert "--fresh" in str(err.value)
    assert not marker.exists(), "loading the checkpoint ran the code in its pickle"

    # The control: the same file unpickled without the guard does run it.
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_save_refuses_what_could_not_be_loaded_back_safely(tmp_path):
    import numpy as np

    from trainer.checkpoints import CheckpointManager

    manager = CheckpointManager(tmp_path / "ck")
    with pytest.raises(TypeError, match=r"checkpoint payload\['history'\]\[0\]\['loss'\] is a numpy.float64"):
        manager.save({"history": [{"loss": np.float64(0.5)}]}, 1)
    assert manager.checkpoints() == []
    plain = {"model": {"w": torch.arange(3.0)}, "history": [{"loss": 0.5, "valid": {"recall@10": 0.1}}],
             "best_value": float("-inf"), "best_state": None, "betas": (0.9, 0.999), "rng": [torch.get_rng_state()]}
    loaded = manager.load(manager.save(plain, 2))
    assert loaded["history"] == plain["history"] and loaded["betas"] == (0.9, 0.999)
    assert loaded["best_value"] == float("-inf") and loaded["best_state"] is None
    assert torch.equal(loaded["model"]["w"], plain["model"]["w"]) and torch.equal(loaded["rng"][0], plain["rng"][0])


def test_training_refuses_a_planted_checkpoint_with_exit_2_and_runs_none_of_it(ml_lake, tmp_path):
    _, lake, _ = ml_lake
    folder, marker = tmp_path / "ck", tmp_path / "pwned"
    _plant_malicious_checkpoint(folder, marker)
    proc = subprocess.run([sys.executable, "-m", "jobs.train", "--epochs", "1", "--checkpoint-dir", str(folder),
                           "--no-progress"], capture_output=True, text=True, env=_env(lake.root), cwd=ROOT,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert "was refused: it asks for getattr, and a checkpoint holds only tensors" in last and "--fresh" in last
    assert not marker.exists(), "the training job ran the code in the planted checkpoint"
