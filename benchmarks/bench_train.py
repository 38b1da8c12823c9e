"""Training throughput on CPU: the real Petastorm + DDP path against naive references, in ONE run.

Three measurements, each against a baseline timed in the same run (ratios, no assertions):

1. Single-process training samples/s of ``--preset`` through the real path (Petastorm
   ``train_batches`` + ``synchronized`` + ``TwoTowerTrainTask`` + Adam) against a PyTorch-primer
   reference: a ``torch.utils.data.Dataset`` over the pairs/train snapshot read into pandas,
   ``__getitem__`` returning one row as a dict of tensors, default ``DataLoader`` collation,
   batch 32, with the same model, loss and optimiser. Two more rows separate the causes: the
   same naive loader at the real batch size, and the model step alone on pre-loaded batches
   (the ceiling any loader can reach).
2. Petastorm loader rows/s over the whole pairs/train snapshot (no training) against a raw
   ``pq.read_table`` of the same files and columns converted to numpy.
3. Global training samples/s with 2 DDP processes (gloo, ``torch.multiprocessing.spawn``)
   against 1, each rank running the real loop on its Petastorm shard, at ``--threads`` torch
   threads per process; plus 1 process using every core, for reference.

Every training figure skips ``--warmup`` steps (reader start, shuffle-buffer fill) and times
exactly ``--steps`` (epochs follow each other, reader restarts included, when one is not
enough). Next to each figure, the rate from the median step time shows how much other work
on the machine disturbed it. Run on an otherwise idle machine:

  .venv/bin/python benchmarks/bench_train.py                       # 2-4 minutes on 2 cores
  .venv/bin/python benchmarks/bench_train.py --steps 30 --warmup 5 --batch-size 256 --skip-ddp
  .venv/bin/python benchmarks/bench_train.py --only loader   # measurement 2 alone (well under a minute)
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TOWERLAKE_FORCE_CPU", "1")  # CPU figures even where a GPU exists
# Petastorm's reader threads warn about legacy pyarrow APIs on every row group (spawned ranks
# import this module too, so the filter holds there as well).
warnings.simplefilter("ignore")

NAIVE_BATCH = 32


# ---------------------------------------------------------------- shared pieces


def _retry(what: str, fn, attempts: int = 3, wait_s: float = 60.0):
    """The lake may be rebuilt while we read it: retry a failed read after a pause."""
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as err:
            if attempt == attempts:
                raise
            print(f"  {what} failed ({type(err).__name__}: {err}); retrying in {wait_s:.0f}s", flush=True)
            time.sleep(wait_s)
    raise AssertionError("unreachable")


def _config(preset_name: str, batch_size: int | None):
    from trainer.config import preset

    config = preset(preset_name)
    return config if batch_size is None else config.with_overrides({"batch_size": batch_size})


def _prepare(lake: str, config, versions: dict[str, int] | None = None):
    from trainer.loop import prepare_run

    return _retry("reading the lake", lambda: prepare_run(lake, config, versions=versions))


def _settings(config):
    import torch

    from trainer.loop import loader_settings

    return loader_settings(config, torch.device("cpu"))


class _Trainer:
    """Model, Adam and ``TwoTowerTrainTask`` exactly as ``trainer.loop.train`` builds them."""

    def __init__(self, config, inputs, ctx) -> None:
        import torch

        from trainer.distributed import wrap_model
        from trainer.loop import build_optimizer
        from trainer.task import TwoTowerTrainTask
        from trainer.towers import TwoTowerModel

        torch.manual_seed(config.seed)
        self.ctx = ctx
        self.model = TwoTowerModel(config.model, inputs.schema).to(ctx.device)
        self.task = TwoTowerTrainTask(wrap_model(self.model, ctx), inputs.store.to(ctx.device), config, ctx)
        self.optimizer = build_optimizer(self.model, config)
        self.model.train()

    def step(self, batch, step: int) -> float:
        from trainer.loop import train_step

        return float(train_step(self.task, self.optimizer, batch, step, self.ctx.device).total.detach())


@dataclass
class Timing:
    """``steps`` timed steps of ``batch`` rows per rank on ``world`` ranks in ``seconds``
    (slowest rank); ``p50_s``: the median step time (robust to bursts of load from other work)."""

    steps: int
    seconds: float
    p50_s: float
    batch: int
    world: int = 1

    @property
    def per_s(self) -> float:
        return self.steps * self.batch * self.world / self.seconds

    @property
    def p50_per_s(self) -> float:
        return self.batch * self.world / self.p50_s


def _timed_steps(trainer: _Trainer, batches, warmup: int, steps: int, batch: int, ctx) -> Timing:
    """Run ``warmup`` untimed, then exactly ``steps`` timed training steps (loading included)."""
    times: list[float] = []
    start = last = 0.0
    for index, rows in enumerate(batches):
        if index == warmup:
            ctx.barrier()
            start = last = time.perf_counter()
        trainer.step(rows, index)
        if index >= warmup:
            now = time.perf_counter()
            times.append(now - last)
            last = now
            if len(times) == steps:
                break
    if len(times) < steps:
        raise SystemExit(f"ran out of batches after {len(times)} timed steps (wanted {steps})")
    return Timing(steps=steps, seconds=last - start, p50_s=statistics.median(times), batch=batch,
                  world=ctx.world_size)


def _real_batches(config, inputs, ctx):
    """The real loop's batches: per epoch, ``train_batches`` of this rank's shard through
    ``synchronized``; epochs follow each other (reader restart included) until the caller stops."""
    from trainer.data import synchronized, train_batches

    epoch = 0
    while True:
        with train_batches(inputs.train, inputs.schema, ctx, _settings(config), epoch) as batches:
            yield from synchronized(batches, ctx)
        epoch += 1


def _run_real(config, inputs, ctx, warmup: int, steps: int) -> Timing:
    trainer = _Trainer(config, inputs, ctx)
    batches = _real_batches(config, inputs, ctx)
    try:
        return _timed_steps(trainer, batches, warmup, steps, config.batch_size, ctx)
    finally:
        batches.close()  # stops the Petastorm reader


# ---------------------------------------------------------------- 1. single-process training


def real_loop(config, inputs, warmup: int, steps: int) -> Timing:
    from trainer.distributed import DistContext

    return _run_real(config, inputs, DistContext(), warmup, steps)


def preloaded_step(config, inputs, warmup: int, steps: int) -> Timing:
    """The model step alone: batches read by Petastorm first, then trained on from memory."""
    from trainer.distributed import DistContext

    ctx = DistContext()
    batches = _real_batches(config, inputs, ctx)
    loaded = [b for _, b in zip(range(warmup + steps), batches, strict=False)]
    batches.close()
    return _timed_steps(_Trainer(config, inputs, ctx), iter(loaded), warmup, steps, config.batch_size, ctx)


def naive_frame(config, inputs):
    """pairs/train read whole into pandas (what a primer's Dataset would hold)."""
    from lake_contract.delta_snapshot import read_snapshot_arrow
    from trainer.data import user_columns

    columns = [*user_columns(inputs.schema), "item_idx"]
    if config.loss == "bce":
        columns.append("neg_item_idx")
    return read_snapshot_arrow(inputs.train, columns).to_pandas(), columns


def naive_loop(config, inputs, frame, columns, batch_size: int, warmup: int, steps: int) -> Timing:
    import torch
    from torch.utils.data import DataLoader, Dataset

    from trainer.distributed import DistContext

    class PairsDataset(Dataset):
        def __init__(self, df) -> None:
            self.df = df

        def __len__(self) -> int:
            return len(self.df)

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            row = self.df.iloc[i]
            out = {name: torch.tensor(row[name], dtype=torch.long) for name in columns if name != "neg_item_idx"}
            if "neg_item_idx" in columns:  # pointwise loss: offline negatives padded to a fixed width
                negs = list(row["neg_item_idx"])[:width]
                out["neg_item_idx"] = torch.tensor(negs + [0] * (width - len(negs)), dtype=torch.long)
            return out

    width = config.max_offline_negatives
    ctx = DistContext()
    torch.manual_seed(config.seed)
    loader = DataLoader(PairsDataset(frame), batch_size=batch_size, shuffle=True, drop_last=True)
    return _timed_steps(_Trainer(config, inputs, ctx), _forever(loader), warmup, steps, batch_size, ctx)


def _forever(loader):
    while True:
        yield from loader


# ---------------------------------------------------------------- 2. loader only


def petastorm_pass(config, inputs) -> tuple[int, float]:
    from trainer.data import train_batches
    from trainer.distributed import DistContext

    start = time.perf_counter()
    rows = 0
    with train_batches(inputs.train, inputs.schema, DistContext(), _settings(config), epoch=0) as batches:
        for batch in batches:
            rows += int(batch["item_idx"].shape[0])
    return rows, time.perf_counter() - start


def pyarrow_pass(config, inputs) -> tuple[int, float]:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from lake_contract.delta_snapshot import snapshot_file_path
    from trainer.data import user_columns
    from trainer.item_store import pad_list_array

    columns = [*user_columns(inputs.schema), "item_idx"]
    if config.loss == "bce":  # what train_batches reads and pads for the pointwise loss
        columns.append("neg_item_idx")
    start = time.perf_counter()
    rows = 0
    for file in inputs.train.files:
        table = pq.read_table(snapshot_file_path(file), columns=columns)
        arrays = {}
        for name in columns:
            column = table.column(name).combine_chunks()
            if name == "neg_item_idx":
                arrays[name] = pad_list_array(column, config.max_offline_negatives)
            elif pa.types.is_list(column.type):  # hist: every row padded to N, so flat values reshape
                arrays[name] = np.asarray(column.flatten()).reshape(len(column), -1)
            else:
                arrays[name] = column.to_numpy(zero_copy_only=False)
        rows += table.num_rows
    return rows, time.perf_counter() - start


# ---------------------------------------------------------------- 3. DDP


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, threads: int, port: int, lake: str, preset_name: str, batch_size: int,
                versions: dict[str, int], warmup: int, steps: int, out: str) -> None:
    import torch

    from trainer.distributed import exit_process, init_distributed, shutdown

    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(world),
                       "RANK": str(rank), "LOCAL_RANK": str(rank), "TOWERLAKE_FORCE_CPU": "1"})
    torch.set_num_threads(threads)
    ctx = init_distributed("ddp", timeout_s=300)
    try:
        config = _config(preset_name, batch_size)
        inputs = _prepare(lake, config, versions)
        timing = _run_real(config, inputs, ctx, warmup, steps)
        slowest = ctx.all_reduce(torch.tensor([timing.seconds, timing.p50_s], dtype=torch.float64), "max")
        if ctx.is_main:
            timing.seconds, timing.p50_s = float(slowest[0]), float(slowest[1])
            torch.save({"timing": vars(timing)}, out)
        ctx.barrier()
    finally:
        shutdown(ctx)
    exit_process(0)  # no interpreter finalisation under gloo: see exit_process


def ddp_run(world: int, threads: int, args, versions: dict[str, int]) -> Timing:
    import torch
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="towerlake-bench-train-") as tmp:
        out = str(Path(tmp) / "result.pt")
        mp.spawn(_ddp_worker, args=(world, threads, _free_port(), args.lake, args.preset, args.batch_size, versions,
                                    args.warmup, args.steps, out), nprocs=world, join=True)
        result = torch.load(out, weights_only=True)
    return Timing(**result["timing"])


def _ratio(a: Timing, b: Timing) -> str:
    return f"{a.per_s / b.per_s:.2f}x; {a.p50_per_s / b.p50_per_s:.2f}x"


def _best_of(rounds: int, *passes):
    """Alternate the passes ``rounds`` times; each pass's best (rows, seconds)."""
    best: list[tuple[int, float] | None] = [None] * len(passes)
    for _ in range(rounds):
        for i, run in enumerate(passes):
            rows, seconds = run()
            if best[i] is None or seconds < best[i][1]:  # type: ignore[index]
                best[i] = (rows, seconds)
    return best


# ---------------------------------------------------------------- main


def main() -> int:
    from trainer.config import DEFAULT_PRESET, PRESETS

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lake", default=os.environ.get("TOWERLAKE_LAKE", "/tmp/tl_lake"),
                        help="lake root with features and pairs (default: $TOWERLAKE_LAKE or /tmp/tl_lake)")
    parser.add_argument("--preset", default=DEFAULT_PRESET, choices=sorted(PRESETS),
                        help=f"model/loss preset (default: {DEFAULT_PRESET})")
    parser.add_argument("--steps", type=int, default=100,
                        help="timed training steps per measurement (the naive batch-32 row times the same "
                             "number of samples)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps before each training measurement")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="batch size per rank of the real path (default: the preset's)")
    parser.add_argument("--loader-rounds", type=int, default=3,
                        help="alternating full passes of Petastorm and pyarrow; the best of each is shown")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per process (default 1, as torchrun sets for several ranks: with "
                             "2 threads on a loaded 2-core machine every op waits for a descheduled thread "
                             "and steps get 10x slower; 0 = torch's default, one per core)")
    parser.add_argument("--skip-ddp", action="store_true", help="skip measurement 3 (spawns processes)")
    parser.add_argument("--only", choices=("train", "loader", "ddp"), default=None,
                        help="run one measurement alone: 1 (train), 2 (loader) or 3 (ddp)")
    args = parser.parse_args()
    if args.steps <= 0 or args.warmup < 0 or args.loader_rounds <= 0 or args.threads < 0:
        parser.error("--steps and --loader-rounds must be > 0, --warmup and --threads >= 0")

    import torch

    cores = os.cpu_count() or 1
    args.threads = args.threads or cores
    torch.set_num_threads(args.threads)

    config = _config(args.preset, args.batch_size)
    args.batch_size = b = config.batch_size
    print(f"machine: os.cpu_count()={cores}, torch {torch.__version__}, device cpu "
          f"(cuda available: {torch.cuda.is_available()}, not used), torch threads {torch.get_num_threads()} "
          f"per process, load average {os.getloadavg()[0]:.1f}")
    t0 = time.perf_counter()
    inputs = _prepare(args.lake, config)
    train = inputs.train
    print(f"lake {args.lake}: pairs/train v{train.version}, {train.num_rows:,} rows in {len(train.files)} files; "
          f"preset {args.preset} (loss {config.loss}), batch {b}, {args.warmup} warm-up + {args.steps} timed steps")
    rows: list[tuple[str, str, float, float | None, str, str]] = []  # section, what, value, p50, unit, ratio

    run = {section: args.only in (None, section) for section in ("train", "loader", "ddp")}
    run["ddp"] = run["ddp"] and not args.skip_ddp
    if run["train"]:
        rows += single_process_rows(config, inputs, args)
    if run["loader"]:
        rows += loader_rows(config, inputs, args)
    if run["ddp"]:
        rows += ddp_rows(inputs, args, cores)
    _print_table(rows, cores, args, t0)
    return 0


def single_process_rows(config, inputs, args) -> list[tuple]:
    b = config.batch_size
    print("1. training, single process ...", flush=True)
    real = real_loop(config, inputs, args.warmup, args.steps)
    pre = preloaded_step(config, inputs, args.warmup, args.steps)
    frame, columns = naive_frame(config, inputs)
    naive_steps = max(1, args.steps * b // NAIVE_BATCH)  # the same number of timed samples as the real path
    naive32 = naive_loop(_config(args.preset, NAIVE_BATCH), inputs, frame, columns, NAIVE_BATCH,
                         args.warmup, naive_steps)
    naive_big = naive_loop(config, inputs, frame, columns, b, args.warmup, args.steps)
    del frame
    return [
        ("1 train", f"real: Petastorm+synchronized+task+Adam, batch {b}", real.per_s, real.p50_per_s,
         "samples/s", "1.00"),
        ("1 train", f"naive primer Dataset+DataLoader, batch {NAIVE_BATCH}", naive32.per_s, naive32.p50_per_s,
         "samples/s", f"real/naive = {_ratio(real, naive32)}"),
        ("1 train", f"  same naive loader, batch {b}", naive_big.per_s,
         naive_big.p50_per_s, "samples/s", f"real/this = {_ratio(real, naive_big)}"),
        ("1 train", f"  model step alone, pre-loaded batches, batch {b}", pre.per_s, pre.p50_per_s,
         "samples/s", f"real/this = {_ratio(real, pre)}"),
    ]


def loader_rows(config, inputs, args) -> list[tuple]:
    # 2. Both passes read from the page cache (an untimed pyarrow pass first).
    print("2. loader only ...", flush=True)
    pyarrow_pass(config, inputs)
    (peta_rows, peta_s), (raw_rows, raw_s) = _best_of(args.loader_rounds, lambda: petastorm_pass(config, inputs),
                                                      lambda: pyarrow_pass(config, inputs))
    peta, raw = peta_rows / peta_s, raw_rows / raw_s
    return [
        ("2 loader", f"Petastorm train_batches, whole snapshot ({peta_rows:,} rows)", peta, None, "rows/s", "1.00"),
        ("2 loader", f"pyarrow read_table + to numpy ({raw_rows:,} rows)", raw, None, "rows/s",
         f"petastorm/pyarrow = {peta / raw:.3f}x"),
    ]


def ddp_rows(inputs, args, cores: int) -> list[tuple]:
    # 3. On a 2-core machine both ranks share the same two cores (one torch thread each, plus their
    # Petastorm reader threads and gloo), so expect little or no speedup over one process using both
    # cores: the ratio means something only with a core budget (or a GPU) per rank. Against one process
    # at the same threads per process (the baseline row) world=2 simply gets the second core.
    b = args.batch_size
    print("3. DDP, 1 then 2 processes ...", flush=True)
    versions = {k: v for k, v in inputs.table_versions.items()
                if k in ("pairs/train", "pairs/valid", "pairs/test", "features/items")}
    one = ddp_run(1, args.threads, args, versions)
    two = ddp_run(2, args.threads, args, versions)
    full = ddp_run(1, cores, args, versions) if cores != args.threads else None
    rows = [("3 ddp", f"world=1, {args.threads} torch thread(s), batch {b}", one.per_s, one.p50_per_s,
             "samples/s", "1.00"),
            ("3 ddp", f"world=2 gloo, {args.threads} thread(s)/rank, global batch {2 * b}", two.per_s,
             two.p50_per_s, "samples/s", f"2proc/1proc = {_ratio(two, one)} on {cores} cores")]
    if full is not None:
        rows.append(("3 ddp", f"  world=1, {cores} torch threads (all cores), batch {b}", full.per_s,
                     full.p50_per_s, "samples/s", f"2proc/this = {_ratio(two, full)}"))
    return rows


def _print_table(rows: list[tuple], cores: int, args, t0: float) -> None:
    print()
    width = max(len(r[1]) for r in rows)
    print(f"{'section':<9} {'measurement':<{width}} {'value':>10} {'p50 step':>10} {'unit':<10} ratio (by value; by p50)")
    for section, what, value, p50, unit, ratio in rows:
        p50_text = f"{p50:>10,.0f}" if p50 is not None else f"{'':>10}"
        print(f"{section:<9} {what:<{width}} {value:>10,.0f} {p50_text} {unit:<10} {ratio}")
    print("value = timed steps x batch / wall time of those steps; p50 step = batch / median step time "
          "(less sensitive to other work on a shared machine)")
    if cores <= 2 and any(r[0] == "3 ddp" for r in rows):
        print(f"note: os.cpu_count()={cores}: world=2 x {args.threads} thread(s) uses all the cores that world=1 "
              f"x {args.threads} leaves idle; against world=1 on all {cores} cores expect little or no speedup")
    print(f"total {time.perf_counter() - t0:.0f}s, load average now {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    sys.exit(main())
