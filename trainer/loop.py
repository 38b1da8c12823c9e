"""The one training loop (docs/style.md item 6): full retrain and fine-tune alike, 1 or N processes.

``prepare_run`` pins every table version the run reads and loads the item feature store;
``train`` runs epochs of synchronized Petastorm batches, evaluates on the validation split
after each epoch (rank 0; the decision is broadcast), keeps the best epoch's weights, stops
early when the validation metric stops improving, then evaluates the best weights on valid
and test and writes ``models/<version>/`` atomically (rank 0).
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pyarrow.parquet as pq
import torch

from lake_contract.delta_snapshot import DeltaSnapshot, resolve_snapshot, snapshot_file_path
from lake_contract.errors import TowerlakeError
from lake_contract.lake import Lake
from trainer.artifacts import StagedModel
from trainer.checkpoints import CheckpointManager, check_compatible, isolated_rng
from trainer.config import TrainConfig
from trainer.data import LoaderSettings, resolve_pairs, snapshot_columns, synchronized, train_batches
from trainer.distributed import DistContext, wrap_model, wrap_optimizer
from trainer.evaluation import evaluate_split
from trainer.feature_schema import FeatureSchema, load_feature_schema
from trainer.item_store import ItemFeatureStore, load_item_store
from trainer.task import StepLosses, TwoTowerTrainTask
from trainer.towers import TwoTowerModel

log = logging.getLogger(__name__)


@dataclass
class RunInputs:
    """The exact data one run reads. ``train`` may be a subset of a table's files (the
    fine-tune's windows of ``pairs/incremental``); ``train_table`` names that table."""

    lake_root: str
    train: DeltaSnapshot
    valid: DeltaSnapshot
    test: DeltaSnapshot | None
    items: DeltaSnapshot
    schema: FeatureSchema
    store: ItemFeatureStore
    train_table: str = "pairs/train"

    @property
    def table_versions(self) -> dict[str, int]:
        versions = dict(self.schema.table_versions)
        versions.update({self.train_table: self.train.version, "pairs/valid": self.valid.version,
                         "features/items": self.items.version})
        if self.test is not None:
            versions["pairs/test"] = self.test.version
        return versions


def history_length_of(snapshot: DeltaSnapshot) -> int:
    """N of ``pairs.hist`` (every row is padded to N): read from the first row of the first
    non-empty row group (a small window's files can be empty)."""
    for file in snapshot.files:
        parquet = pq.ParquetFile(snapshot_file_path(file))
        for group in range(parquet.metadata.num_row_groups):
            if parquet.metadata.row_group(group).num_rows:
                column = parquet.read_row_group(group, columns=["hist"]).column(0)
                return len(column[0].as_py())
    return 0


def prepare_run(lake_root: str, config: TrainConfig, train_split: str = "train",
                versions: dict[str, int] | None = None, train: DeltaSnapshot | None = None) -> RunInputs:
    """Pin pairs/{train,valid,test} and features/items (latest unless ``versions`` names one)
    and load the schema and item store. ``train_split`` may be e.g. ``incremental``; ``train``,
    when given, is the already pinned (possibly file-filtered) snapshot of
    ``pairs/<train_split>`` to train on."""
    versions = versions or {}
    lake = Lake(lake_root)
    if train is None:
        train = resolve_pairs(lake.root, train_split, versions.get(f"pairs/{train_split}"))
    valid = resolve_pairs(lake.root, "valid", versions.get("pairs/valid"))
    try:
        test = resolve_pairs(lake.root, "test", versions.get("pairs/test"))
    except TowerlakeError:  # a time split without a test window
        test = None
    items = resolve_snapshot(lake.table("features/items"), versions.get("features/items"))
    schema = load_feature_schema(lake.root, snapshot_columns(train), config.model.item_exclude,
                                 history_length=history_length_of(train),
                                 versions={**versions, "features/items": items.version})
    store = load_item_store(items, schema)
    return RunInputs(lake_root=lake.root, train=train, valid=valid, test=test, items=items, schema=schema,
                     store=store, train_table=f"pairs/{train_split}")


def build_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    if config.optimizer == "adagrad":
        return torch.optim.Adagrad(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(params, lr=config.lr, weight_decay=config.weight_decay, momentum=0.9)


def loader_settings(config: TrainConfig, device: torch.device) -> LoaderSettings:
    """How ``train`` reads its batches (benchmarks read them the same way)."""
    return LoaderSettings(batch_size=config.batch_size, workers=config.reader_workers,
                          shuffle_buffer=config.shuffle_buffer, seed=config.seed,
                          negatives_width=config.max_offline_negatives if config.loss == "bce" else 0,
                          negative_kinds=config.offline_negative_kinds, pin_memory=device.type == "cuda")


@dataclass
class TrainResult:
    model: TwoTowerModel
    history: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    valid: dict = field(default_factory=dict)
    test: dict = field(default_factory=dict)
    samples_per_s: float = 0.0
    seconds: float = 0.0
    version: str | None = None
    path: str | None = None


def train(config: TrainConfig, inputs: RunInputs, ctx: DistContext, staged: StagedModel | None = None,
          model: TwoTowerModel | None = None, progress: bool = True, say: Callable[[str], None] = print,
          checkpoints: CheckpointManager | None = None) -> TrainResult:
    """Train ``model`` (a fresh one when None); rank 0 logs into ``staged`` (the model version
    being written). With ``checkpoints``, resumes from the newest checkpoint there (if any) and
    writes one every ``config.checkpoint_every_steps`` steps and at every epoch end. Every
    rank returns the trained model (identical on all ranks)."""
    torch.manual_seed(config.seed)
    model = (model or TwoTowerModel(config.model, inputs.schema)).to(ctx.device)
    store = inputs.store.to(ctx.device)
    config_dict = config.to_dict()
    schema_json = inputs.schema.to_json()
    resume = _load_resume_state(checkpoints, config_dict, schema_json, ctx)
    if resume is not None:
        model.load_state_dict(resume["model"])
    wrapped = wrap_model(model, ctx)
    optimizer = wrap_optimizer(build_optimizer(model, config), model, ctx)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=config.lr_decay)
    task = TwoTowerTrainTask(wrapped, store, config, ctx)
    settings = loader_settings(config, ctx.device)
    rows = inputs.train.num_rows or 0
    steps_hint = rows // (config.batch_size * ctx.world_size)
    if config.max_steps_per_epoch:
        steps_hint = min(steps_hint, config.max_steps_per_epoch)
    if steps_hint == 0:
        raise ValueError(f"{inputs.train_table} has {rows} training rows, fewer than one global batch "
                         f"({config.batch_size} x {ctx.world_size} ranks): lower --batch-size")
    result = TrainResult(model=model)
    best_value, best_state, stale = -math.inf, None, 0
    global_step, first_epoch, skip_batches, stopped = 0, 0, 0, False
    epoch_losses: list[float] = []
    if resume is not None:
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        best_value, best_state, stale = resume["best_value"], resume["best_state"], resume["stale"]
        result.best_epoch, result.history = resume["best_epoch"], resume["history"]
        global_step, first_epoch, skip_batches = resume["global_step"], resume["epoch"], resume["step_in_epoch"]
        epoch_losses, stopped = list(resume["epoch_losses"]), resume["stopped"]
        torch.set_rng_state(resume["rng"][ctx.rank])

    def save_checkpoint(epoch: int, step_in_epoch: int, losses: list[float], stop: bool) -> None:
        rng = ctx.gather_object(torch.get_rng_state())
        if ctx.is_main and checkpoints is not None:
            checkpoints.save({
                "config": config_dict, "schema": schema_json, "world_size": ctx.world_size,
                "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "epoch": epoch, "step_in_epoch": step_in_epoch, "global_step": global_step,
                "epoch_losses": list(losses), "stopped": stop, "best_value": best_value, "best_state": best_state,
                "stale": stale, "best_epoch": result.best_epoch, "history": result.history, "rng": rng,
            }, global_step)

    samples, train_seconds = 0, 0.0
    started = time.monotonic()
    for epoch in range(first_epoch, config.epochs):
        if stopped:
            break
        model.train()
        epoch_start = time.monotonic()
        losses = epoch_losses if epoch == first_epoch else []
        bar = _progress(progress and ctx.is_main, steps_hint, f"epoch {epoch + 1}/{config.epochs}")
        with train_batches(inputs.train, inputs.schema, ctx, settings, epoch) as raw_batches:
            batches = synchronized(isolated_rng(raw_batches, config.seed * 1_000_003 + epoch),
                                   ctx, config.max_steps_per_epoch)
            if epoch == first_epoch and skip_batches:
                replay_start = time.monotonic()
                for _ in range(skip_batches):
                    next(batches)  # the killed run already trained on these
                if bar is not None:
                    bar.update(skip_batches)
                say(f"resumed at epoch {epoch + 1}, batch {skip_batches} (global step {global_step}): "
                    f"replayed the data position in {time.monotonic() - replay_start:.1f}s")
            for batch in batches:
                step = train_step(task, optimizer, batch, global_step, ctx.device)
                global_step += 1
                samples += config.batch_size * ctx.world_size
                losses.append(float(step.total.detach()))
                if bar is not None:
                    elapsed = time.monotonic() - epoch_start
                    bar.update(1)
                    bar.set_postfix(loss=f"{losses[-1]:.4f}", sps=f"{len(losses) * config.batch_size * ctx.world_size / max(elapsed, 1e-9):,.0f}")
                if staged is not None and ctx.is_main and global_step % config.log_every == 0:
                    staged.append_jsonl("history.jsonl", {"step": global_step, "epoch": epoch + 1,
                                                          "loss": losses[-1], **step.parts})
                if checkpoints is not None and config.checkpoint_every_steps and \
                        global_step % config.checkpoint_every_steps == 0:
                    save_checkpoint(epoch, len(losses), losses, False)
        if bar is not None:
            bar.close()
        scheduler.step()
        epoch_seconds = time.monotonic() - epoch_start
        train_seconds += epoch_seconds
        record = {"epoch": epoch + 1, "steps": len(losses), "loss": sum(losses) / max(len(losses), 1),
                  "seconds": round(epoch_seconds, 2),
                  "samples_per_s": len(losses) * config.batch_size * ctx.world_size / max(epoch_seconds, 1e-9)}
        decision = None
        if ctx.is_main:
            metrics = evaluate_split(model, store, inputs.valid, inputs.schema,
                                     config.eval_ks, ctx.device, with_itempop=False)["model"]
            record["valid"] = metrics
            value = metrics[config.early_stopping_metric]
            if value > best_value:
                best_value, best_state, stale = value, copy.deepcopy(model.state_dict()), 0
                result.best_epoch = epoch + 1
            else:
                stale += 1
            stop = config.early_stopping_patience and stale >= config.early_stopping_patience
            decision = {"stop": bool(stop), "record": record, "best_epoch": result.best_epoch}
            say(f"epoch {epoch + 1}: loss {record['loss']:.4f}, {record['samples_per_s']:,.0f} samples/s, "
                f"valid {config.early_stopping_metric}={value:.4f}" + (" (best)" if stale == 0 else ""))
            if staged is not None:
                staged.append_jsonl("history.jsonl", {"epoch_end": epoch + 1, **{k: v for k, v in record.items()
                                                                                  if k != "valid"},
                                                      **{f"valid_{k}": v for k, v in metrics.items()}})
        decision = ctx.broadcast_object(decision)
        result.history.append(decision["record"])
        result.best_epoch = decision["best_epoch"]
        stopped = decision["stop"]
        if checkpoints is not None:
            save_checkpoint(epoch + 1, 0, [], stopped)
        if stopped and ctx.is_main:
            say(f"early stop: no better valid {config.early_stopping_metric} for "
                f"{config.early_stopping_patience} epochs; best epoch {result.best_epoch}")
    # Every rank takes rank 0's best weights, so all ranks return the same model.
    best_state = ctx.broadcast_object({k: v.cpu() for k, v in best_state.items()} if ctx.is_main else None)
    model.load_state_dict(best_state)
    result.seconds = time.monotonic() - started
    result.samples_per_s = samples / max(train_seconds, 1e-9)
    if ctx.is_main:
        result.valid = evaluate_split(model, store, inputs.valid, inputs.schema, config.eval_ks, ctx.device)
        if inputs.test is not None:
            result.test = evaluate_split(model, store, inputs.test, inputs.schema, config.eval_ks, ctx.device)
    ctx.barrier()
    return result


def _load_resume_state(checkpoints: CheckpointManager | None, config_dict: dict, schema_json: str,
                       ctx: DistContext) -> dict | None:
    """The newest checkpoint (every rank reads the same file; the folder is on the lake's
    shared storage), validated against this run; None when there is none."""
    if checkpoints is None:
        return None
    path = checkpoints.latest()
    path = ctx.broadcast_object(path)  # all ranks resume from the same one
    if path is None:
        return None
    payload = checkpoints.load(path)
    check_compatible(payload, config_dict, schema_json, ctx.world_size, path)
    return payload


def _progress(enabled: bool, total: int, desc: str):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="step", leave=False, dynamic_ncols=True, mininterval=1.0)


def train_step(task: TwoTowerTrainTask, optimizer: torch.optim.Optimizer, batch: dict[str, torch.Tensor],
               global_step: int, device: torch.device, precision: str = "auto") -> StepLosses:
    """One optimiser step on one batch (host or device tensors), exactly what ``train`` runs
    per batch; benchmarks time this same function. ``precision``: see ``autocast``."""
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    with autocast(device, precision):
        step = task.loss(batch, global_step)
    optimizer.zero_grad()  # Horovod's DistributedOptimizer takes no argument; None grads are the default
    step.total.backward()
    optimizer.step()
    return step


def autocast(device: torch.device, precision: str = "auto"):
    """``auto`` (what training uses): bf16 autocast on CUDA, none on CPU (fp32 stays exact
    there). ``bf16`` / ``fp32`` force autocast on / off on either device (benchmarks)."""
    import contextlib

    if precision not in ("auto", "bf16", "fp32"):
        raise ValueError(f"precision must be auto, bf16 or fp32, got {precision!r}")
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
