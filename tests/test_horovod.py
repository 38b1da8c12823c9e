"""Horovod (gloo, 2 processes via horovodrun) runs the same task and matches the
single-process step exactly like DDP does (tests/test_ddp.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.test_ddp import CONFIGS, _global_batch, _one_step
from tests.trainer_fixtures import tiny_schema
from trainer.distributed import DistContext
from trainer.towers import TwoTowerModel

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parents[1]
HOROVODRUN = Path(sys.executable).parent / "horovodrun"


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_horovod_step_equals_a_single_process_step_on_the_concatenated_batch(tmp_path, name):
    pytest.importorskip("horovod.torch", reason="Horovod not built (TOWERLAKE_SKIP_HOROVOD=1 at setup)")
    out = tmp_path / "rank0.pt"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TOWERLAKE_FORCE_CPU": "1"}
    proc = subprocess.run([str(HOROVODRUN), "-np", "2", "-H", "localhost:2", "--gloo", sys.executable,
                           "-m", "tests.horovod_worker", name, str(out)],
                          capture_output=True, text=True, timeout=240, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    got = torch.load(out, weights_only=True)
    assert got["world"] == 2
    config = CONFIGS[name]
    torch.manual_seed(0)
    reference = TwoTowerModel(config.model, tiny_schema())
    ref_loss = _one_step(reference, config, DistContext(), _global_batch(config))
    torch.testing.assert_close(got["loss"], ref_loss, rtol=1e-5, atol=1e-6)
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(got["state"][key], value, rtol=1e-5, atol=1e-6, msg=f"parameter {key}")
