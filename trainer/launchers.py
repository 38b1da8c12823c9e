"""Run a job's ``main(argv)`` in N processes through Spark's TorchDistributor.

``torchrun`` and ``horovodrun`` start the training processes themselves; on a Spark cluster
``pyspark.ml.torch.distributor.TorchDistributor`` does it instead: in local mode it runs
``torchrun --standalone --nproc_per_node=N`` under the driver, on a cluster one barrier task
per process. Either way every process gets RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT, so
``trainer.distributed.init_distributed("auto")`` joins it as DDP (gloo on CPU, nccl on CUDA)
and the training loop is the same one torchrun runs.

What TorchDistributor's function mode needs, and how this module meets it:

* the function is cloudpickled; :func:`call_in_each_process` lives in an importable module,
  so it is pickled by reference, and the processes import it (and ``jobs.train``) through
  ``PYTHONPATH``, which :func:`run_with_torch_distributor` points at this checkout (local
  mode). On a cluster the executors need the package (``spark-submit --py-files`` or an
  installed wheel).
* in local mode EVERY process writes its return value to the same file and the driver
  reads whichever landed last, so the function returns the same value on every rank.
* a failing process does not surface as such: pyspark's torchrun wrapper exits 0 whatever
  torchrun returned, so the driver only gets ``RuntimeError("TorchDistributor failed during
  training. View stdout logs ...")``. Each failing process therefore prints one marked line
  with its reason and, in local mode, also writes it to a folder the driver reads; the
  driver turns it back into a one-line error (``ValueError`` for bad input, exactly as the
  job itself would have raised it).

No pyspark or torch import happens at module import time.
"""

from __future__ import annotations

import importlib
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

UseGpu = Literal["auto", "never", "always"]

PROJECT_ROOT = str(Path(__file__).resolve().parents[1])
RANK_FAILURE_MARK = "towerlake-rank-failure"
FAILURE_FOLDER_ENV = "TOWERLAKE_RANK_FAILURES"
_FAILURE_LINE = re.compile(rf"{RANK_FAILURE_MARK} rank=(\S+) kind=(input|unexpected): (.*)")


def resolve_use_gpu(mode: UseGpu, cuda_devices: int) -> bool:
    """``auto``: use GPUs when this machine has any; ``never``; ``always``: refuse to run
    without one (rather than silently training on CPU)."""
    if mode not in ("auto", "never", "always"):
        raise ValueError(f"use_gpu must be auto, never or always, got {mode!r}")
    if mode == "always" and cuda_devices == 0:
        raise ValueError("--use-gpu always, but torch sees no CUDA device here: use --use-gpu auto or never")
    return mode != "never" and cuda_devices > 0


def call_in_each_process(target: str, argv: list[str]) -> dict:
    """Run ``module:function`` with ``argv`` in this TorchDistributor process.

    Returns ``{"target", "exit_code", "world_size"}``, the same on every rank (see the
    module docstring). A failure prints one ``towerlake-rank-failure`` line (also written to
    ``$TOWERLAKE_RANK_FAILURES/rank-<rank>.txt`` when set), then re-raises so torchrun fails
    the run.
    """
    module_name, _, function_name = target.partition(":")
    function = getattr(importlib.import_module(module_name), function_name)
    rank = os.environ.get("RANK", "0")
    try:
        code = function(argv) or 0
    except Exception as err:
        from lake_contract.errors import TowerlakeError

        kind = "input" if isinstance(err, (ValueError, TowerlakeError)) else "unexpected"
        reason = " ".join(f"{type(err).__name__}: {err}".split())
        line = f"{RANK_FAILURE_MARK} rank={rank} kind={kind}: {reason}"
        print(line, file=sys.stderr, flush=True)
        folder = os.environ.get(FAILURE_FOLDER_ENV)
        if folder and os.path.isdir(folder):
            Path(folder, f"rank-{rank}.txt").write_text(line + "\n", encoding="utf-8")
        raise
    from trainer.distributed import exit_without_finalising_at_interpreter_exit

    exit_without_finalising_at_interpreter_exit()  # see trainer.distributed.exit_process
    return {"target": target, "exit_code": int(code), "world_size": int(os.environ.get("WORLD_SIZE", "1"))}


def run_with_torch_distributor(target: str, argv: list[str], num_processes: int, local_mode: bool,
                               use_gpu: bool) -> dict:
    """Run ``target`` (``module:function`` taking ``argv``) in ``num_processes`` processes
    under TorchDistributor, using the active SparkSession. Returns the processes' result
    (:func:`call_in_each_process`). Raises ``ValueError`` when a process failed on bad input,
    ``RuntimeError`` for anything else; the processes' own output is streamed to stdout."""
    if num_processes < 1:
        raise ValueError(f"num_processes must be >= 1, got {num_processes!r}")
    try:
        from pyspark.ml.torch.distributor import TorchDistributor
    except ImportError as err:
        raise ValueError("TorchDistributor is not available: it needs pyspark >= 3.4 with pyspark.ml.torch "
                         f"and its dependencies in this environment ({err}); or launch with torchrun instead: "
                         "torchrun --nproc-per-node N -m jobs.train") from err
    failures = tempfile.mkdtemp(prefix="towerlake-rank-failures-")
    env = {"PYTHONPATH": os.pathsep.join(p for p in (PROJECT_ROOT, os.environ.get("PYTHONPATH")) if p),
           "PYTHONUNBUFFERED": "1", FAILURE_FOLDER_ENV: failures}
    if not use_gpu:
        env["TOWERLAKE_FORCE_CPU"] = "1"  # local mode leaves CUDA_VISIBLE_DEVICES alone
    try:
        distributor = TorchDistributor(num_processes=num_processes, local_mode=local_mode, use_gpu=use_gpu)
    except RuntimeError as err:  # GPU resources not declared to Spark
        raise ValueError(f"TorchDistributor cannot use GPUs: {err} Declare them to Spark "
                         "(local mode: spark.driver.resource.gpu.amount and ...gpu.discoveryScript; "
                         "cluster: spark.task.resource.gpu.amount) or pass --use-gpu never") from err
    with _environment(env):
        try:
            result = distributor.run(call_in_each_process, target, list(argv))
        except RuntimeError as err:
            reports = [p.read_text(encoding="utf-8") for p in sorted(Path(failures).glob("rank-*.txt"))]
            raise _explain_failure("\n".join([*reports, str(err)])) from err
        finally:
            shutil.rmtree(failures, ignore_errors=True)
    if not isinstance(result, dict):
        raise RuntimeError(f"TorchDistributor returned {result!r} instead of the processes' result")
    return result


def gpu_discovery_conf(cuda_devices: int, folder: str | None = None) -> dict[str, str]:
    """Spark conf that declares this machine's ``cuda_devices`` GPUs to a LOCAL driver, as
    TorchDistributor(local_mode=True, use_gpu=True) requires. Writes the discovery script
    (it prints ``{"name": "gpu", "addresses": ["0", ...]}``) into ``folder``."""
    if cuda_devices < 1:
        raise ValueError(f"cuda_devices must be >= 1, got {cuda_devices!r}")
    addresses = ", ".join(f'"{i}"' for i in range(cuda_devices))
    script = Path(tempfile.mkdtemp(prefix="towerlake-gpus-", dir=folder)) / "discover_gpus.sh"
    script.write_text(f"#!/bin/sh\necho '{{\"name\": \"gpu\", \"addresses\": [{addresses}]}}'\n")
    script.chmod(0o755)
    return {"spark.driver.resource.gpu.amount": str(cuda_devices),
            "spark.driver.resource.gpu.discoveryScript": str(script)}


def declare_local_gpus(cuda_devices: int) -> None:
    """Make a local Spark driver that is NOT started yet own this machine's ``cuda_devices``
    GPUs (TorchDistributor(local_mode=True, use_gpu=True) refuses to run otherwise), through
    ``PYSPARK_SUBMIT_ARGS``, which pyspark reads when it starts the JVM. Under spark-submit the
    JVM already runs: pass the same ``--conf`` to spark-submit instead."""
    conf = " ".join(f"--conf {key}={value}" for key, value in gpu_discovery_conf(cuda_devices).items())
    os.environ["PYSPARK_SUBMIT_ARGS"] = f"{conf} {os.environ.get('PYSPARK_SUBMIT_ARGS', 'pyspark-shell')}"


@contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """TorchDistributor hands ``os.environ`` to its processes: set ``values`` for the run only."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _explain_failure(output: str) -> Exception:
    """The error to raise for a failed run, from the processes' failure lines in ``output``."""
    failures = [m.groups() for m in map(_FAILURE_LINE.search, output.splitlines()) if m]
    # A rank that fails on bad input makes the others fail in their next collective: the
    # input failure is the cause.
    failures.sort(key=lambda f: f[1] != "input")
    if not failures:
        return RuntimeError("the TorchDistributor processes failed without a Python error (killed? out of "
                            "memory? see torchrun's report in the output above); model versions are "
                            "written whole or not at all, so nothing half-written was left")
    rank, kind, reason = failures[0]
    message = f"training failed on rank {rank}: {reason} (every rank's output is above)"
    return ValueError(message) if kind == "input" else RuntimeError(message)
