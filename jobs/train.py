"""Train the two-tower model on the lake's pairs and write models/<version>/.

Reads pairs/{train,valid,test}, features/items, features/spec and vocab/* at pinned Delta
versions (recorded in the model's manifest), streams pairs/train with Petastorm sharded
over the processes, evaluates on the full catalog each epoch, keeps the best epoch, and
prints the metrics of the model and of ItemPop side by side.

Examples:
  python -m jobs.train                                    # default preset, one process
  python -m jobs.train --preset dat --epochs 20
  python -m jobs.train --set model.history_pooling=attention --set lr=0.001
  torchrun --nproc-per-node 2 -m jobs.train --preset softmax-logq      # DDP (gloo on CPU)
  horovodrun -np 2 -H localhost:2 --gloo python -m jobs.train --backend horovod

Re-running the same command after a crash or kill resumes from its last checkpoint
(<lake>/checkpoints/<run key>); --fresh starts over.

Presets: dat (default), softmax-mixed, softmax-logq, dssm-bce, dssm-senet-bce (trainer/config.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass

if __package__ in (None, ""):  # python jobs/train.py
    import os

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jobs.cli import default_lake, run_job, setup_logging


@dataclass(frozen=True)
class TrainJobConfig:
    lake: str
    train: object  # trainer.config.TrainConfig (imported lazily: --help must not load torch)
    preset: str
    backend: str
    version: str | None
    train_split: str
    progress: bool
    checkpoint_dir: str | None
    fresh: bool


def _override(text: str) -> tuple[str, object]:
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE like lr=0.001 or model.dropout=0.1, got {text!r}")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.strip(), value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jobs.train", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lake", default=default_lake(), help="lake root (default: $TOWERLAKE_LAKE or ./lake)")
    p.add_argument("--preset", default=None, help="named model variant (default: the best measured one)")
    p.add_argument("--config", help="JSON file with TrainConfig fields (applied after the preset)")
    p.add_argument("--set", dest="overrides", type=_override, action="append", default=[],
                   metavar="KEY=VALUE", help="override one field, JSON value (repeatable): lr=0.001, "
                   "model.hidden=[256,128], loss=bce")
    p.add_argument("--epochs", type=int, help="shortcut for --set epochs=N")
    p.add_argument("--batch-size", type=int, help="rows per process per step (shortcut for --set batch_size=N)")
    p.add_argument("--lr", type=float, help="shortcut for --set lr=X")
    p.add_argument("--seed", type=int, help="shortcut for --set seed=N")
    p.add_argument("--backend", choices=("auto", "ddp", "horovod", "single"), default="auto",
                   help="auto: horovod under horovodrun, ddp under torchrun, else one process")
    p.add_argument("--version", help="model version name (default: UTC time + random suffix)")
    p.add_argument("--train-split", default="train", help="pairs/<split> to train on (default: train)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (logs only)")
    p.add_argument("--checkpoint-every", type=int, metavar="STEPS",
                   help="checkpoint every STEPS steps and at every epoch end (shortcut for --set checkpoint_every_steps=N)")
    p.add_argument("--checkpoint-dir", help="where this run's checkpoints go (default: <lake>/checkpoints/<run key>, "
                   "the same for a re-run of the same command, which then resumes)")
    p.add_argument("--fresh", action="store_true", help="ignore and delete this run's checkpoints; start over")
    return p


def parse_config(argv: list[str] | None = None) -> TrainJobConfig:
    a = build_parser().parse_args(argv)
    from trainer.config import DEFAULT_PRESET, TrainConfig, preset

    name = a.preset or DEFAULT_PRESET
    config = preset(name)
    if a.config:
        try:
            with open(a.config, encoding="utf-8") as fh:
                config = TrainConfig.from_dict({**config.to_dict(), **json.load(fh)})
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"--config {a.config}: cannot read a JSON object of TrainConfig fields ({err})") from err
    overrides = dict(a.overrides)
    for key, value in (("epochs", a.epochs), ("batch_size", a.batch_size), ("lr", a.lr), ("seed", a.seed),
                       ("checkpoint_every_steps", a.checkpoint_every)):
        if value is not None:
            overrides[key] = value
    if overrides:
        config = config.with_overrides(overrides)
    return TrainJobConfig(lake=a.lake, train=config, preset=name, backend=a.backend, version=a.version,
                          train_split=a.train_split, progress=not a.no_progress, checkpoint_dir=a.checkpoint_dir,
                          fresh=a.fresh)


def main(argv: list[str] | None = None) -> int:
    job = parse_config(argv)
    setup_logging("train")
    import warnings

    # Petastorm's reader threads warn about pyarrow's legacy dataset API on every row group.
    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category)
    import torch

    from spark_features.lake import Lake
    from trainer.artifacts import StagedModel, models_root, new_model_version
    from trainer.checkpoints import CheckpointManager, run_key
    from trainer.distributed import init_distributed, shutdown
    from trainer.loop import prepare_run, train
    from trainer.report import metrics_table, plot_training

    ctx = init_distributed(job.backend)
    say = print if ctx.is_main else (lambda _s: None)
    staged = None
    try:
        lake = Lake(job.lake)
        start = time.monotonic()
        inputs = prepare_run(lake.root, job.train, job.train_split)
        say(f"train: preset={job.preset} backend={ctx.backend} world={ctx.world_size} device={ctx.device} "
            f"lake={lake.root}")
        say("  read: " + ", ".join(f"{k}@v{v}" for k, v in sorted(inputs.table_versions.items())))
        say(f"  rows: train={inputs.train.num_rows:,} valid={inputs.valid.num_rows:,}"
            + (f" test={inputs.test.num_rows:,}" if inputs.test else "")
            + f"; items={inputs.schema.num_items - 1:,} users={inputs.schema.num_users - 1:,}")
        say(f"  [prepare] {time.monotonic() - start:.1f}s")
        key = run_key(job.train.to_dict(), inputs.table_versions, job.train_split, ctx.world_size)
        checkpoints = CheckpointManager(job.checkpoint_dir or f"{models_root(lake.root).parent}/checkpoints/{key}",
                                        keep=job.train.keep_checkpoints)
        if job.fresh and ctx.is_main:
            checkpoints.remove_all()
        ctx.barrier()
        if checkpoints.latest() is not None:
            say(f"  resuming from {checkpoints.latest()} (--fresh starts over)")
        if ctx.is_main:
            staged = StagedModel.start(lake.root, job.version or new_model_version())
        result = train(job.train, inputs, ctx, staged=staged, progress=job.progress, say=say,
                       checkpoints=checkpoints)
        if ctx.is_main:
            results = {"valid": result.valid, **({"test": result.test} if result.test else {})}
            staged.save_weights({k: v.cpu() for k, v in result.model.state_dict().items()})
            staged.write_json("config.json", job.train.to_dict())
            (staged.folder / "schema.json").write_text(inputs.schema.to_json())
            staged.write_json("metrics.json", {**results, "history": result.history, "best_epoch": result.best_epoch})
            staged.write_json("manifest.json", {
                "version": staged.version, "parent": None, "preset": job.preset, "kind": "full",
                "table_versions": inputs.table_versions, "backend": ctx.backend, "world_size": ctx.world_size,
                "device": str(ctx.device), "torch": torch.__version__, "train_seconds": round(result.seconds, 1),
                "samples_per_s": round(result.samples_per_s, 1), "best_epoch": result.best_epoch,
            })
            plot_training(result.history, staged.folder / "training.png")
            path = staged.commit()
            staged = None
            checkpoints.remove_all()  # the model version is complete: nothing left to resume
            say(metrics_table(results))
            test = result.test or result.valid
            ratio = test["model"]["hr@50"] / max(test["itempop"]["hr@50"], 1e-9)
            say(f"model / ItemPop HR@50: {ratio:.2f}x; best epoch {result.best_epoch}; "
                f"{result.samples_per_s:,.0f} samples/s; {result.seconds:.0f}s")
            say(f"wrote models/{path.name} -> {path}")
    finally:
        if staged is not None:
            staged.abort()
        shutdown(ctx)
    return 0


if __name__ == "__main__":
    run_job("train", lambda: main(sys.argv[1:]))
