"""The same 2-process training started three ways (torchrun DDP, horovodrun, Spark's
TorchDistributor in local mode) writes the same model.

DDP and Horovod steps each equal a single-process step (tests/test_ddp.py,
tests/test_horovod.py), all three read the same Petastorm shards in the same order, and with
2 ranks averaging gradients is exact ((a + b) / 2 == a / 2 + b / 2 in floating point), so the
runs are expected to agree BIT-EXACTLY on CPU: weights compared with torch.equal, metrics with
==. Measured on MovieLens-100K (1 epoch x 20 steps x 2 x 256 rows, softmax-logq): valid
hr@50 0.1707 and ndcg@10 0.0302 for all three. TorchDistributor local mode literally runs
torchrun, so any difference there is a launcher bug; a Horovod difference means its optimizer
or broadcast setup departs from DDP's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = [pytest.mark.spark, pytest.mark.slow, pytest.mark.multiprocess, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
TRAIN_ARGS = ["--preset", "softmax-logq", "--epochs", "1", "--batch-size", "256", "--no-progress",
              "--set", "max_steps_per_epoch=20", "--set", "early_stopping_patience=0", "--set", "reader_workers=1"]


@dataclass
class Launch:
    proc: subprocess.CompletedProcess
    seconds: float
    folder: Path

    def check(self) -> None:
        assert self.proc.returncode == 0, self.proc.stdout[-3000:] + self.proc.stderr[-3000:]

    def json(self, name: str) -> dict:
        return json.loads((self.folder / name).read_text())

    def weights(self) -> dict:
        import torch

        return torch.load(self.folder / "weights.pt", weights_only=True)


def _run(args: list[str], lake_root: str, timeout: int = 300, **env: str) -> subprocess.CompletedProcess:
    """Run a launcher; past ``timeout`` (ranks that hang in a collective) SIGTERM it, which
    torchrun, horovodrun and the TorchDistributor driver pass on to the training processes
    (they run in sessions of their own, out of reach of a process-group kill)."""
    env = {**os.environ, "TOWERLAKE_LAKE": lake_root, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
           "TOWERLAKE_FORCE_CPU": "1", **env}
    with subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                          cwd=ROOT) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.terminate()
            try:
                out, err = proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, err = proc.communicate()
            err += f"\n[test] stopped after {timeout}s: the ranks hung (a collective they call differently?)"
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


def _launch(ml_lake, tmp_path_factory, name: str, command: list[str], timeout: int = 300) -> Launch:
    _, lake, _ = ml_lake
    version = f"launch-{name}"
    # Own checkpoint folder: the three runs have the same run key, and a leftover checkpoint
    # of one launcher must not be resumed by another.
    checkpoints = tmp_path_factory.mktemp(f"checkpoints-{name}")
    start = time.monotonic()
    proc = _run([*command, *TRAIN_ARGS, "--version", version, "--checkpoint-dir", str(checkpoints)], lake.root,
                timeout)
    seconds = time.monotonic() - start
    print(f"{name}: {seconds:.1f}s")
    return Launch(proc, seconds, Path(lake.root.removeprefix("file://")) / "models" / version)


@pytest.fixture(scope="module")
def ddp_run(ml_lake, tmp_path_factory) -> Launch:
    return _launch(ml_lake, tmp_path_factory, "ddp",
                   [str(VENV_BIN / "torchrun"), "--standalone", "--nproc-per-node", "2", "-m", "jobs.train"])


@pytest.fixture(scope="module")
def horovod_run(ml_lake, tmp_path_factory) -> Launch:
    pytest.importorskip("horovod.torch", reason="Horovod not built (TOWERLAKE_SKIP_HOROVOD=1 at setup)")
    # ~20s when healthy; a Horovod collective that ranks name differently stalls forever.
    return _launch(ml_lake, tmp_path_factory, "horovod",
                   [str(VENV_BIN / "horovodrun"), "-np", "2", "-H", "localhost:2", "--gloo", sys.executable,
                    "-m", "jobs.train", "--backend", "horovod"], timeout=150)


@pytest.fixture(scope="module")
def torch_distributor_run(ml_lake, tmp_path_factory) -> Launch:
    return _launch(ml_lake, tmp_path_factory, "torchdistributor",
                   [sys.executable, "-m", "jobs.train_on_spark", "--num-processes", "2", "--master", "local[2]",
                    "--use-gpu", "never", "--"])


def _assert_same_model(reference: Launch, other: Launch, hint: str) -> None:
    import torch

    ref_metrics, metrics = reference.json("metrics.json"), other.json("metrics.json")
    for split in ("valid", "test"):
        assert metrics[split]["model"] == ref_metrics[split]["model"], f"{split} metrics differ; {hint}"
    assert [h["loss"] for h in metrics["history"]] == [h["loss"] for h in ref_metrics["history"]], hint
    ref_weights, weights = reference.weights(), other.weights()
    assert ref_weights.keys() == weights.keys()
    for key, value in ref_weights.items():
        assert torch.equal(weights[key], value), f"parameter {key} differs; {hint}"


def test_torch_distributor_local_mode_trains_exactly_like_torchrun(ddp_run, torch_distributor_run):
    ddp_run.check()
    torch_distributor_run.check()
    for launch in (ddp_run, torch_distributor_run):
        manifest = launch.json("manifest.json")
        assert (manifest["backend"], manifest["world_size"], manifest["device"]) == ("gloo", 2, "cpu")
        assert [h["steps"] for h in launch.json("metrics.json")["history"]] == [20]
    _assert_same_model(ddp_run, torch_distributor_run, "TorchDistributor local mode runs torchrun: it must not differ")
    valid = torch_distributor_run.json("metrics.json")["valid"]["model"]
    assert (f"train_on_spark: wrote models/launch-torchdistributor (backend=gloo world_size=2 device=cpu): "
            f"valid hr@50={valid['hr@50']:.4f}") in torch_distributor_run.proc.stdout


def test_horovod_trains_exactly_like_torchrun(ddp_run, horovod_run):
    ddp_run.check()
    horovod_run.check()
    manifest = horovod_run.json("manifest.json")
    assert (manifest["backend"], manifest["world_size"], manifest["device"]) == ("horovod", 2, "cpu")
    _assert_same_model(ddp_run, horovod_run, "Horovod's wrap_optimizer/broadcasts must leave the optimizer exactly "
                       "as DDP's (a zero-gradient Adam step from broadcast_optimizer_state would not)")


def test_a_failing_rank_under_torch_distributor_exits_2_with_its_reason(ml_lake):
    _, lake, _ = ml_lake
    models = Path(lake.root.removeprefix("file://")) / "models"
    before = sorted(p.name for p in models.iterdir()) if models.exists() else []
    proc = _run([sys.executable, "-m", "jobs.train_on_spark", "--master", "local[2]", "--use-gpu", "never", "--",
                 "--batch-size", "1000000", "--no-progress", "--version", "launch-fails"], lake.root)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: train_on_spark: training failed on rank ") and "lower --batch-size" in last
    assert (sorted(p.name for p in models.iterdir()) if models.exists() else []) == before


def test_declared_local_gpus_satisfy_torch_distributor(tmp_path):
    """A CPU machine cannot train on GPUs, but it can prove that the conf this job gives a
    local driver is what TorchDistributor(local_mode=True, use_gpu=True) looks for."""
    script = ("from trainer.launchers import declare_local_gpus\n"
              "declare_local_gpus(2)\n"
              "from jobs.spark_context import build_spark_session\n"
              "spark = build_spark_session('gpu-conf', master='local[1]')\n"
              "from pyspark.ml.torch.distributor import TorchDistributor, _get_gpus_owned\n"
              "d = TorchDistributor(num_processes=2, local_mode=True, use_gpu=True)\n"
              "print('owned', d.num_processes, _get_gpus_owned(spark))\n"
              "spark.stop()\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env={k: v for k, v in os.environ.items() if k != "PYSPARK_SUBMIT_ARGS"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "owned 2 ['0', '1']" in proc.stdout


def test_help_answers_without_starting_spark_or_loading_torch():
    code = ("import sys\nimport jobs.train_on_spark as t\ntry:\n    t.build_parser().parse_args(['--help'])\n"
            "except SystemExit: pass\nprint(sorted(m for m in ('torch', 'pyspark') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.stdout.strip().splitlines()[-1] == "[]"
    assert "python -m jobs.train_on_spark [options] -- [jobs.train args]" in proc.stdout


@pytest.mark.parametrize("argv, message", [
    (["--", "--backend", "horovod"], "Horovod runs under horovodrun"),
    (["--num-processes", "0"], "--num-processes must be >= 1, got 0"),
    (["--", "--set", "lr=-1"], "lr"),
])
def test_bad_arguments_fail_before_spark_starts(argv, message):
    from jobs.train_on_spark import parse_config

    with pytest.raises(ValueError, match=message):
        parse_config(argv)
    assert parse_config(["--", "--version", "v1"]).version == "v1"


def test_missing_torch_distributor_is_an_actionable_error(monkeypatch):
    from trainer.launchers import run_with_torch_distributor

    monkeypatch.setitem(sys.modules, "pyspark.ml.torch.distributor", None)  # import now fails
    with pytest.raises(ValueError, match=r"TorchDistributor is not available.*torchrun --nproc-per-node") as info:
        run_with_torch_distributor("jobs.train:main", [], 2, local_mode=True, use_gpu=False)
    assert isinstance(info.value.__cause__, ImportError)


def test_use_gpu_follows_the_devices_torch_sees():
    from trainer.launchers import resolve_use_gpu

    assert [resolve_use_gpu(mode, n) for mode, n in (("auto", 0), ("auto", 1), ("never", 4), ("always", 1))] == \
        [False, True, False, True]
    with pytest.raises(ValueError, match="--use-gpu always, but torch sees no CUDA device"):
        resolve_use_gpu("always", 0)


def test_the_rank_that_failed_on_input_is_the_reason_given():
    from trainer.launchers import RANK_FAILURE_MARK, _explain_failure

    output = (f"{RANK_FAILURE_MARK} rank=0 kind=unexpected: RuntimeError: Connection closed by peer\n"
              f"noise\n{RANK_FAILURE_MARK} rank=1 kind=input: ValueError: lower --batch-size\n")
    err = _explain_failure(output)
    assert isinstance(err, ValueError) and str(err).startswith("training failed on rank 1: ValueError: lower")
    assert type(_explain_failure(output.splitlines()[0])) is RuntimeError
    assert "without a Python error" in str(_explain_failure("torchrun: exitcode -9"))
