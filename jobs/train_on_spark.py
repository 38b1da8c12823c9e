"""Run jobs.train in N processes through Spark's TorchDistributor (DDP, no separate GPU scheduler).

Everything after `--` goes to jobs.train unchanged; each process runs jobs.train.main with
it and joins the process group TorchDistributor sets up (RANK, WORLD_SIZE, MASTER_ADDR), so
it is the same DDP training as torchrun's. A local master (local[...]) runs TorchDistributor
in local mode (torchrun under the driver); any other master runs one barrier task per process.

Examples:
  python -m jobs.train_on_spark -- --epochs 5                       # 2 processes, local[*]
  python -m jobs.train_on_spark --num-processes 2 --master 'local[2]' -- --preset dat
  spark-submit --master 'local[2]' jobs/train_on_spark.py --use-gpu never -- --epochs 5
  spark-submit --master spark://host:7077 --py-files towerlake.zip \\
      --conf spark.task.resource.gpu.amount=1 jobs/train_on_spark.py --num-processes 4 -- --epochs 5

--use-gpu auto (default) uses GPUs when torch sees any: in local mode this job declares them
to Spark itself; on a cluster, spark.task.resource.gpu.amount must be set. The model version
is named up front (unless --version is given) so the driver can report it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass

if __package__ in (None, ""):  # spark-submit jobs/train_on_spark.py
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jobs.cli import run_job, setup_logging


@dataclass(frozen=True)
class TrainOnSparkConfig:
    num_processes: int
    master: str | None
    use_gpu: str
    train_argv: tuple[str, ...]  # for jobs.train, with --version pinned by main()
    lake: str
    version: str | None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jobs.train_on_spark", usage="%(prog)s [options] -- [jobs.train args]",
                                description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-processes", type=int, default=2, help="training processes (default: 2)")
    p.add_argument("--master", help="Spark master (default: spark-submit's, else $TOWERLAKE_SPARK_MASTER or "
                   "local[*]); local[...] means TorchDistributor local mode")
    p.add_argument("--use-gpu", choices=("auto", "never", "always"), default="auto",
                   help="auto: when torch sees a CUDA device; always: fail without one (default: auto)")
    return p


def parse_config(argv: list[str]) -> TrainOnSparkConfig:
    own, train_argv = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    a = build_parser().parse_args(own)
    if a.num_processes < 1:
        raise ValueError(f"--num-processes must be >= 1, got {a.num_processes}")
    from jobs import train

    job = train.parse_config(train_argv)  # bad training arguments fail here, before Spark starts
    if job.backend not in ("auto", "ddp"):
        raise ValueError(f"TorchDistributor starts DDP processes: jobs.train --backend must be auto or ddp, "
                         f"got {job.backend!r} (Horovod runs under horovodrun)")
    return TrainOnSparkConfig(num_processes=a.num_processes, master=a.master, use_gpu=a.use_gpu,
                              train_argv=tuple(train_argv), lake=job.lake, version=job.version)


def main(argv: list[str]) -> int:
    job = parse_config(argv)
    setup_logging("train_on_spark")
    import torch

    from jobs.spark_context import build_spark_session
    from trainer.artifacts import models_root, new_model_version
    from trainer.launchers import declare_local_gpus, resolve_use_gpu, run_with_torch_distributor

    use_gpu = resolve_use_gpu(job.use_gpu, torch.cuda.device_count())
    master = job.master or os.environ.get("TOWERLAKE_SPARK_MASTER", "local[*]")
    if use_gpu and master.startswith("local") and "PYSPARK_GATEWAY_PORT" not in os.environ:
        declare_local_gpus(torch.cuda.device_count())  # not under spark-submit: the JVM starts below
    version = job.version or new_model_version()
    train_argv = list(job.train_argv) + ([] if job.version else ["--version", version])
    spark = build_spark_session("towerlake-train-on-spark", master=job.master)
    try:
        master = spark.sparkContext.master
        local_mode = master.startswith("local")
        print(f"train_on_spark: TorchDistributor num_processes={job.num_processes} local_mode={local_mode} "
              f"use_gpu={use_gpu} master={master} -> jobs.train {' '.join(train_argv)}", flush=True)
        result = run_with_torch_distributor("jobs.train:main", train_argv, job.num_processes, local_mode, use_gpu)
    finally:
        spark.stop()
    folder = models_root(job.lake) / version
    if not (folder / "manifest.json").exists():
        print(f"train_on_spark: done, no model version written (exit code {result['exit_code']})")
        return result["exit_code"]
    manifest = json.loads((folder / "manifest.json").read_text())
    valid = json.loads((folder / "metrics.json").read_text())["valid"]["model"]
    print(f"train_on_spark: wrote models/{version} (backend={manifest['backend']} world_size={manifest['world_size']}"
          f" device={manifest['device']}): valid hr@50={valid['hr@50']:.4f} ndcg@10={valid['ndcg@10']:.4f}")
    return result["exit_code"]


if __name__ == "__main__":
    run_job("train_on_spark", lambda: main(sys.argv[1:]))
