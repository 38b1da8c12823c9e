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

Hourly fine-tune (--mode finetune): start from a trained model (--parent VERSION, else the
model of releases/CURRENT), grow its embedding tables to the lake's vocabularies (old rows
copied exactly, new rows drawn like a fresh init), train on one window of pairs/incremental
(plus the N windows before it with --replay-windows N), evaluate on pairs/valid and
pairs/test like a full run, and write a model version whose manifest names its parent:
  python -m jobs.train --mode finetune --window 2026-01-05T13
  python -m jobs.train --mode finetune --window 2026-01-05T13 --parent 20260105T020000Z-1a2b3c
  python -m jobs.train --mode finetune --window 2026-01-05T13 --replay-windows 24 --lr 0.0005
The config is the parent's with the given overrides (epochs default to 1; the towers,
model.*, cannot change). The batch size is lowered to what the window holds unless set.
Only the embedding tables train unless --trainable all: the MLPs stay the parent's.
A window the incremental build completed with no pairs exits 0 without a model version.

Re-running the same command after a crash or kill resumes from its last checkpoint
(<lake>/checkpoints/<run key>); --fresh starts over. With --version V --exist-ok, a re-run
that finds models/V complete exits 0 without training (what the DAGs pass).

Presets: dat (default), transformer, softmax-mixed, softmax-logq, dssm-bce, dssm-senet-bce (trainer/config.py).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from dataclasses import dataclass, field

if __package__ in (None, ""):  # python jobs/train.py
    import os

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jobs.cli import job_parser, run_job, setup_logging


@dataclass(frozen=True)
class FinetuneOptions:
    window: str  # a pairs/incremental partition: 2026-01-05T13 (hour) or 2026-01-05 (day)
    parent: str | None  # model version; None = the model of releases/CURRENT
    replay_windows: int
    batch_size_set: bool  # the command set the batch size: do not lower it to the window's rows
    trainable: str = "embeddings"  # embeddings: the MLPs stay the parent's (trainer/finetune.py); all


@dataclass(frozen=True)
class TrainJobConfig:
    lake: str
    train: object  # trainer.config.TrainConfig (imported lazily: --help must not load torch); None for
    #                finetune, whose config is the parent's with ``overrides`` (known once the lake is read)
    preset: str
    backend: str
    version: str | None
    train_split: str
    progress: bool
    checkpoint_dir: str | None
    fresh: bool
    mode: str = "full"
    finetune: FinetuneOptions | None = None
    overrides: dict = field(default_factory=dict)
    exist_ok: bool = False


_WINDOW = re.compile(r"\d{4}-\d{2}-\d{2}(T\d{2})?")


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
    p = job_parser("train", __doc__)
    p.add_argument("--mode", choices=("full", "finetune"), default="full",
                   help="full: train from scratch on pairs/train; finetune: warm-start from a parent model on "
                   "one window of pairs/incremental")
    p.add_argument("--window", help="finetune: the pairs/incremental window, YYYY-MM-DDTHH (hour) or YYYY-MM-DD (day)")
    p.add_argument("--parent", metavar="VERSION", help="finetune: the model version to start from "
                   "(default: the model of releases/CURRENT)")
    p.add_argument("--replay-windows", type=int, default=0, metavar="N",
                   help="finetune: also train on the N windows of pairs/incremental just before --window "
                   "(all their rows; against forgetting). Default 0")
    p.add_argument("--trainable", choices=("embeddings", "all"), default=None,
                   help="finetune: what the hour trains: embeddings (default; the MLPs stay the parent's, so "
                   "one small hour cannot shift every user) or all")
    p.add_argument("--preset", default=None, help="named model variant (default: the best measured one; "
                   "full mode only)")
    p.add_argument("--config", help="JSON file with TrainConfig fields (applied after the preset, or over the "
                   "parent's config in finetune mode)")
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
    p.add_argument("--exist-ok", action="store_true",
                   help="with --version: a complete models/<version> of the same kind (and window) is success: "
                   "exit 0 without training again (a scheduler's retry or re-run of the same run)")
    p.add_argument("--train-split", default=None, help="full mode: pairs/<split> to train on (default: train)")
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

    file_fields = {}
    if a.config:
        try:
            with open(a.config, encoding="utf-8") as fh:
                file_fields = json.load(fh)
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"--config {a.config}: cannot read a JSON object of TrainConfig fields ({err})") from err
        if not isinstance(file_fields, dict):
            raise ValueError(f"--config {a.config}: expected a JSON object of TrainConfig fields, got "
                             f"{type(file_fields).__name__}")
    overrides = dict(a.overrides)
    for key, value in (("epochs", a.epochs), ("batch_size", a.batch_size), ("lr", a.lr), ("seed", a.seed),
                       ("checkpoint_every_steps", a.checkpoint_every)):
        if value is not None:
            overrides[key] = value
    if a.exist_ok and not a.version:
        raise ValueError("--exist-ok needs --version VERSION (the model version a re-run would find)")
    common = dict(lake=a.lake, backend=a.backend, version=a.version, progress=not a.no_progress,
                  checkpoint_dir=a.checkpoint_dir, fresh=a.fresh, exist_ok=a.exist_ok)
    if a.mode == "finetune":
        return _finetune_config(a, file_fields, overrides, common)
    for flag, value in (("--window", a.window), ("--parent", a.parent),
                        ("--replay-windows", a.replay_windows or None), ("--trainable", a.trainable)):
        if value is not None:
            raise ValueError(f"{flag} only applies to --mode finetune, got {flag} {value}")
    name = a.preset or DEFAULT_PRESET
    config = preset(name)
    if file_fields:
        config = TrainConfig.from_dict({**config.to_dict(), **file_fields})
    if overrides:
        config = config.with_overrides(overrides)
    return TrainJobConfig(train=config, preset=name, train_split=a.train_split or "train", **common)


def _finetune_config(a: argparse.Namespace, file_fields: dict, overrides: dict, common: dict) -> TrainJobConfig:
    """--mode finetune: the TrainConfig is the parent's (read in main), so keep the overrides."""
    if not a.window:
        raise ValueError("--mode finetune needs --window YYYY-MM-DDTHH (or YYYY-MM-DD for a daily window)")
    if not _WINDOW.fullmatch(a.window):
        raise ValueError(f"--window must be YYYY-MM-DDTHH or YYYY-MM-DD (a pairs/incremental partition), "
                         f"got {a.window!r}")
    if a.replay_windows < 0:
        raise ValueError(f"--replay-windows must be >= 0, got {a.replay_windows}")
    for flag, value in (("--preset", a.preset), ("--train-split", a.train_split)):
        if value is not None:
            raise ValueError(f"{flag} does not apply to --mode finetune (it trains the parent's model on "
                             f"pairs/incremental), got {flag} {value}")
    merged = {**{f"model.{k}": v for k, v in file_fields.pop("model", {}).items()}, **file_fields, **overrides}
    merged.setdefault("epochs", 1)
    _check_field_names(merged)
    options = FinetuneOptions(window=a.window, parent=a.parent, replay_windows=a.replay_windows,
                              batch_size_set="batch_size" in merged, trainable=a.trainable or "embeddings")
    return TrainJobConfig(train=None, preset="", train_split="incremental", mode="finetune", finetune=options,
                          overrides=merged, **common)


def _check_field_names(overrides: dict) -> None:
    """Fail on a typo before Spark, a process group or the lake is touched."""
    from dataclasses import fields

    from trainer.config import ModelConfig, TrainConfig

    known = {f.name for f in fields(TrainConfig)} - {"model"}
    known |= {f"model.{f.name}" for f in fields(ModelConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown TrainConfig field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")


def _peer_died(err: RuntimeError) -> bool:
    """A collective failed because another rank went away (gloo / NCCL / Horovod wording)."""
    text = str(err)
    return any(mark in text for mark in ("Connection closed by peer", "Connection reset by peer", "Broken pipe",
                                         "NCCL communicator was aborted", "Horovod has been shut down"))


def existing_version(job: TrainJobConfig, lake_root: str) -> dict | None:
    """--exist-ok: the manifest of an already complete ``models/<job.version>`` that this command
    would have written (same kind, same window), else None; ValueError when the version holds
    another kind of model, so a re-run never passes off the wrong model as its own."""
    from pathlib import Path

    from trainer.artifacts import models_root

    folder = Path(models_root(lake_root)) / job.version
    if not job.exist_ok or not (folder / "weights.pt").is_file() or not (folder / "manifest.json").is_file():
        return None
    manifest = json.loads((folder / "manifest.json").read_text())
    want = {"kind": job.mode, **({"window": job.finetune.window} if job.finetune else {})}
    have = {k: manifest.get(k) for k in want}
    if have != want:
        raise ValueError(f"model version {job.version} already exists with {have}, not {want}: pick another "
                         "--version")
    return manifest


def main(argv: list[str] | None = None) -> int:
    job = parse_config(argv)
    setup_logging("train")
    if job.exist_ok:
        from lake_contract.lake import Lake

        done = existing_version(job, Lake(job.lake).root)
        if done is not None:
            print(f"train: model version {job.version} is already complete ({done['kind']}"
                  + (f", parent {done.get('parent')}" if done.get("parent") else "")
                  + "); nothing to do (--exist-ok)")
            return 0
    import warnings

    # Petastorm's reader threads warn about pyarrow's legacy dataset API on every row group.
    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category)
    import torch

    from lake_contract.lake import Lake
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
        if job.mode == "finetune":
            plan = _plan_finetune(job, lake.root, ctx.world_size, say)
            if plan is None:
                return 0
            config, inputs, model, split_key = plan.config, plan.inputs, plan.model, plan.split_key
            manifest_fields = plan.manifest_fields()
            label = f"finetune of {plan.parent.version} on window {job.finetune.window}"
        else:
            config, model, split_key = job.train, None, job.train_split
            inputs = prepare_run(lake.root, config, job.train_split)
            manifest_fields = {"kind": "full", "parent": None, "preset": job.preset}
            label = f"preset={job.preset}"
        say(f"train: {label} backend={ctx.backend} world={ctx.world_size} device={ctx.device} lake={lake.root}")
        say("  read: " + ", ".join(f"{k}@v{v}" for k, v in sorted(inputs.table_versions.items())))
        say(f"  rows: train={inputs.train.num_rows:,} valid={inputs.valid.num_rows:,}"
            + (f" test={inputs.test.num_rows:,}" if inputs.test else "")
            + f"; items={inputs.schema.num_items - 1:,} users={inputs.schema.num_users - 1:,}")
        say(f"  [prepare] {time.monotonic() - start:.1f}s")
        key = run_key(config.to_dict(), inputs.table_versions, split_key, ctx.world_size)
        checkpoints = CheckpointManager(job.checkpoint_dir or f"{models_root(lake.root).parent}/checkpoints/{key}",
                                        keep=config.keep_checkpoints)
        if job.fresh and ctx.is_main:
            checkpoints.remove_all()
        ctx.barrier()
        if checkpoints.latest() is not None:
            say(f"  resuming from {checkpoints.latest()} (--fresh starts over)")
        if ctx.is_main:
            staged = StagedModel.start(lake.root, job.version or new_model_version())
        try:
            result = train(config, inputs, ctx, staged=staged, model=model, progress=job.progress, say=say,
                           checkpoints=checkpoints)
        except RuntimeError as err:
            if not _peer_died(err):
                raise
            from lake_contract.errors import TowerlakeError

            raise TowerlakeError(
                f"another training process died mid-run ({str(err).splitlines()[0][:160]}); no model version "
                f"was written and the latest checkpoint is kept in {checkpoints.folder}: fix what that process's "
                "log shows (out of memory, a killed node) and re-run the same command to resume") from err
        if ctx.is_main:
            results = {"valid": result.valid, **({"test": result.test} if result.test else {})}
            staged.save_weights({k: v.cpu() for k, v in result.model.state_dict().items()})
            staged.write_json("config.json", config.to_dict())
            (staged.folder / "schema.json").write_text(inputs.schema.to_json())
            staged.write_json("metrics.json", {**results, "history": result.history, "best_epoch": result.best_epoch})
            staged.write_json("manifest.json", {
                "version": staged.version, **manifest_fields,
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
        ctx.barrier()  # the other ranks end once rank 0 has committed the model version
    finally:
        if staged is not None:
            staged.abort()
        shutdown(ctx)
    return 0


def _plan_finetune(job: TrainJobConfig, lake_root: str, world_size: int, say):
    """Resolve the fine-tune (trainer.finetune.prepare_finetune) and say what it found; None
    (after saying so) when the window has no pairs."""
    from index_builder.release import current_release
    from trainer.finetune import prepare_finetune

    options = job.finetune
    plan = prepare_finetune(lake_root, options.window, options.parent, options.replay_windows, job.overrides,
                            world_size, find_release=lambda: current_release(lake_root),
                            lower_batch=not options.batch_size_set, trainable=options.trainable)
    if plan is None:
        say(f"window {options.window} has no pairs: nothing to fine-tune; no model version written")
        return None
    growth = plan.growth
    say(f"finetune: parent {plan.parent.version} (from {plan.parent.source}); window {options.window}: "
        f"{plan.pairs.rows_by_window[options.window]:,} pairs"
        + (f"; replaying {len(plan.pairs.replay_windows)} earlier window(s) "
           f"({plan.pairs.rows - plan.pairs.rows_by_window[options.window]:,} pairs)"
           if options.replay_windows else ""))
    if options.replay_windows > len(plan.pairs.replay_windows):
        say(f"  note: --replay-windows {options.replay_windows} but pairs/incremental holds only "
            f"{len(plan.pairs.replay_windows)} earlier window(s)")
    say(f"  growth: users {growth['users'][0]:,} -> {growth['users'][1]:,}, items {growth['items'][0]:,} -> "
        f"{growth['items'][1]:,}; grown tables: {', '.join(growth['grown']) or 'none (no new ids)'}")
    if plan.frozen:
        say(f"  training the embedding tables only; {len(plan.frozen)} other parameters stay the parent's "
            "(--trainable all trains everything)")
    if plan.batch_lowered_from is not None:
        say(f"  batch size {plan.batch_lowered_from} -> {plan.config.batch_size} per rank: the window holds fewer "
            "rows than one batch of the parent's size per rank (--batch-size sets it)")
    return plan


if __name__ == "__main__":
    from trainer.distributed import exit_process

    run_job("train", lambda: main(sys.argv[1:]), leave=exit_process)
