"""GPU training throughput: the Petastorm path against GPU-resident batches, in ONE run.

For each ``--batch-sizes`` (default 4,096 and 16,384) with ``--preset`` (default: the default
preset) in bf16 autocast on CUDA, this prints:

* samples/s of the real training step (``trainer.loop.train_step``: ``TwoTowerTrainTask`` +
  Adam, the function ``trainer.loop.train`` runs per batch) fed by the real loader
  (``train_batches`` over the pinned ``pairs/train`` Delta snapshot + ``synchronized``,
  pinned memory on CUDA, epochs restarting as needed);
* samples/s of the same step on ``--resident-batches`` batches read by that loader once and
  kept on the device (the ceiling: no loading at all);
* their ratio (Petastorm / resident: 1.0 means the loader keeps up with the GPU);
* peak GPU memory (``torch.cuda.max_memory_allocated``) per batch size;
* items/s of the item-embedding job: ``index_builder.embeddings.embed_item_batches`` (read
  features/items, item tower, vectors back to the host) and, on a lake this script wrote,
  ``write_item_embeddings`` (the same plus the Delta commit of ``embeddings/items``), as
  ``jobs.build_index`` runs them.

Every figure skips ``--warmup`` steps and times ``--steps`` steps (CUDA synchronised at both
ends). ``--json PATH`` also writes every figure as JSON. No assertions: it measures.

Data: ``--lake PATH`` (a lake with features/spec, vocab/*, features/items, pairs/train and
pairs/valid, e.g. a copy of the demo lake) or ``--synthetic ROWS``, which first writes a
lake of that many training pairs with delta-rs only (no Spark, no JVM: ``--users``,
``--items``, ``--hist`` shape it like ML-100K's pairs; into ``--lake`` when given, else a
temporary folder). The synthetic lake has no offline negatives, so BCE presets need
``--lake``.

On the CPU (no CUDA, or ``--cpu``) it runs the same code in fp32 (or ``--precision bf16``:
CPU bf16 autocast) and reports no GPU memory; tests/test_bench_gpu.py runs it that way on a
tiny synthetic lake so it keeps working:

  .venv/bin/python benchmarks/bench_gpu.py --synthetic 4000 --users 60 --items 90 --hist 8 \\
      --batch-sizes 64 128 --steps 3 --warmup 1 --cpu

On one H100/H200 (under 4 minutes, most of it writing the 2M-row lake and starting CUDA):

  python benchmarks/bench_gpu.py --synthetic 2000000 --json bench-out/gpu.json

A GPU machine whose Python 3.12 has its own torch (and a newer pyarrow) needs the pipeline's
pins of the rest, as cp312 wheels: petastorm 0.12.1 needs pyarrow < 15 (pyarrow 14.0.2),
which needs numpy 1.x (numpy 1.26.4; torch runs with either), plus pandas 2.2.3, deltalake
1.6.6 and petastorm's pure-Python dependencies (dill, diskcache, fsspec, future, packaging,
psutil, six, python-dateutil, pytz, tzdata). ``scripts/gpu_wheels.sh`` downloads them here
into ``.whl/gpu/{1,2,3}`` (ignored by git), three folders of under 64 MiB each (deltalake
alone is 52 MB), because a machine may accept only so much per transfer. There, in the
repository root, carry one folder per call and install it into one venv that reuses the
machine's torch, then run the benchmark (calls close together, while the machine is warm):

  python3.12 -m venv --system-site-packages .venv-gpu && .venv-gpu/bin/pip install -q --no-index --no-deps .whl/gpu/1/*.whl
  .venv-gpu/bin/pip install -q --no-index --no-deps .whl/gpu/2/*.whl
  .venv-gpu/bin/pip install -q --no-index --no-deps .whl/gpu/3/*.whl && \\
      PYTHONPATH=$PWD .venv-gpu/bin/python benchmarks/bench_gpu.py --synthetic 2000000 --json $OUT/gpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
warnings.simplefilter("ignore")  # Petastorm's reader threads warn about legacy pyarrow APIs

# ---------------------------------------------------------------- synthetic lake (delta-rs only)

# Bucket boundaries of the synthetic numeric features (sizes = len + 2, as feature_schema says).
_AGE_BOUNDARIES = [20.0, 23.0, 26.0, 28.0, 31.0, 35.0, 40.0, 46.0, 51.0]
_YEAR_BOUNDARIES = [1967.0, 1989.0, 1993.0, 1994.0, 1995.0, 1996.0, 1997.0]
_SMALL_VOCABS = {"users.gender": 3, "users.occupation": 21, "items.genres": 19}


def write_synthetic_lake(root: str, rows: int, users: int, items: int, hist: int, rows_per_file: int,
                         seed: int = 0) -> dict[str, int]:
    """A lake the trainer reads, written with delta-rs: ``vocab/{user_id,item_id,users.gender,
    users.occupation,items.genres}``, ``features/spec``, ``features/items`` (``items`` items),
    ``pairs/train`` (``rows`` pairs in files of ``rows_per_file``; ``hist`` padded to ``hist``
    with 0, 1..hist real events) and a small ``pairs/valid`` (with ``seen_items``). Uniformly
    random indices: for speed, not for model quality. Returns each table's row count."""
    import numpy as np
    import pyarrow as pa
    from deltalake import write_deltalake

    rng = np.random.default_rng(seed)
    lake = Path(root)

    def write(name: str, table: pa.Table, mode: str = "error") -> None:
        (lake / name).parent.mkdir(parents=True, exist_ok=True)
        write_deltalake(str(lake / name), table, mode=mode)

    def vocab(size: int) -> pa.Table:
        index = np.arange(1, size + 1, dtype=np.int64)
        return pa.table({"value": pa.array(index).cast(pa.string()), "index": index,
                         "count": np.ones(size, dtype=np.int64), "min_count": np.ones(size, dtype=np.int32),
                         "added_by": pa.array(["synthetic"] * size, pa.string())})

    write("vocab/user_id", vocab(users))
    write("vocab/item_id", vocab(items))
    for name, size in _SMALL_VOCABS.items():
        write(f"vocab/{name}", vocab(size))
    spec = [("users", "gender", "gender_idx", "categorical", "users.gender", None),
            ("users", "occupation", "occupation_idx", "categorical", "users.occupation", None),
            ("users", "age", "age_bucket", "bucket", None, _AGE_BOUNDARIES),
            ("items", "genres", "genres_idx", "multi_valued", "items.genres", None),
            ("items", "release_year", "release_year_bucket", "bucket", None, _YEAR_BOUNDARIES)]
    write("features/spec", pa.table({
        "table": [s[0] for s in spec], "column": [s[1] for s in spec], "feature": [s[2] for s in spec],
        "kind": [s[3] for s in spec], "vocab": pa.array([s[4] for s in spec], pa.string()),
        "boundaries": pa.array([s[5] for s in spec], pa.list_(pa.float64()))}))

    genres = _SMALL_VOCABS["items.genres"]
    lengths = rng.integers(1, 4, size=items)
    genre_values = rng.integers(1, genres + 1, size=int(lengths.sum())).astype(np.int32)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    positives = rng.integers(1, 1000, size=items).astype(np.int64)
    write("features/items", pa.table({
        "item_idx": np.arange(1, items + 1, dtype=np.int32),
        "item_id": pa.array(np.arange(1, items + 1)).cast(pa.string()),
        "release_year_bucket": rng.integers(0, len(_YEAR_BOUNDARIES) + 2, size=items).astype(np.int32),
        "genres_idx": pa.ListArray.from_arrays(pa.array(offsets), pa.array(genre_values)),
        "n_positives": positives,
        "primary_category_idx": genre_values[offsets[:-1]],
        "log_q": np.log(positives / positives.sum()),
    }))

    def pairs(count: int, with_seen: bool) -> pa.Table:
        history = rng.integers(1, items + 1, size=(count, hist), dtype=np.int32)
        history[np.arange(hist)[None, :] >= rng.integers(1, hist + 1, size=count)[:, None]] = 0
        hist_offsets = pa.array(np.arange(0, (count + 1) * hist, hist, dtype=np.int32))
        columns = {
            "user_idx": rng.integers(1, users + 1, size=count, dtype=np.int32),
            "item_idx": rng.integers(1, items + 1, size=count, dtype=np.int32),
            "hist": pa.ListArray.from_arrays(hist_offsets, pa.array(history.reshape(-1))),
            "gender_idx": rng.integers(0, _SMALL_VOCABS["users.gender"] + 1, size=count, dtype=np.int32),
            "occupation_idx": rng.integers(0, _SMALL_VOCABS["users.occupation"] + 1, size=count, dtype=np.int32),
            "age_bucket": rng.integers(0, len(_AGE_BOUNDARIES) + 2, size=count, dtype=np.int32),
        }
        if with_seen:
            columns["seen_items"] = pa.array([row[row > 0].tolist() for row in history], pa.list_(pa.int32()))
        return pa.table(columns)

    for start in range(0, rows, rows_per_file):  # one file (one row group) per append
        write("pairs/train", pairs(min(rows_per_file, rows - start), with_seen=False), mode="append")
    valid_rows = min(1000, max(1, rows // 10))
    write("pairs/valid", pairs(valid_rows, with_seen=True))
    return {"pairs/train": rows, "pairs/valid": valid_rows, "features/items": items, "vocab/user_id": users}


# ---------------------------------------------------------------- measurements


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Run:
    """A fresh model, Adam and ``TwoTowerTrainTask`` as ``trainer.loop.train`` builds them."""

    def __init__(self, config, inputs, store, ctx, precision: str) -> None:
        import torch

        from trainer.distributed import wrap_model
        from trainer.loop import build_optimizer
        from trainer.task import TwoTowerTrainTask
        from trainer.towers import TwoTowerModel

        torch.manual_seed(config.seed)
        self.model = TwoTowerModel(config.model, inputs.schema).to(ctx.device)
        self.model.train()
        self.task = TwoTowerTrainTask(wrap_model(self.model, ctx), store, config, ctx)
        self.optimizer = build_optimizer(self.model, config)
        self.device, self.precision = ctx.device, precision

    def timed(self, batches, warmup: int, steps: int) -> float:
        """Seconds of ``steps`` training steps after ``warmup`` untimed ones (loading included)."""
        from trainer.loop import train_step

        start = 0.0
        for index, batch in enumerate(batches):
            if index == warmup:
                _sync(self.device)
                start = time.perf_counter()
            train_step(self.task, self.optimizer, batch, index, self.device, self.precision)
            if index + 1 == warmup + steps:
                _sync(self.device)
                return time.perf_counter() - start
        raise SystemExit(f"the loader ran out of batches before {warmup + steps} steps")


def _petastorm_batches(config, inputs, ctx):
    """The training loop's batches, epoch after epoch, until the caller stops."""
    from trainer.data import synchronized, train_batches
    from trainer.loop import loader_settings

    epoch = 0
    while True:
        with train_batches(inputs.train, inputs.schema, ctx, loader_settings(config, ctx.device), epoch) as batches:
            yield from synchronized(batches, ctx, config.max_steps_per_epoch)
        epoch += 1


def measure_batch_size(base_config, inputs, ctx, batch_size: int, args) -> dict:
    import itertools

    import torch

    config = base_config.with_overrides({"batch_size": batch_size})
    store = inputs.store.to(ctx.device)
    if ctx.device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(ctx.device)
    total = args.warmup + args.steps

    batches = _petastorm_batches(config, inputs, ctx)
    try:
        peta_s = _Run(config, inputs, store, ctx, args.precision).timed(batches, args.warmup, args.steps)
        resident = [{k: v.to(ctx.device) for k, v in b.items()}
                    for b in itertools.islice(batches, args.resident_batches)]
    finally:
        batches.close()  # stops the Petastorm reader
    peak_peta = torch.cuda.max_memory_allocated(ctx.device) if ctx.device.type == "cuda" else None
    resident_s = _Run(config, inputs, store, ctx, args.precision).timed(
        itertools.islice(itertools.cycle(resident), total), args.warmup, args.steps)
    peak = torch.cuda.max_memory_allocated(ctx.device) if ctx.device.type == "cuda" else None
    peta, res = args.steps * batch_size / peta_s, args.steps * batch_size / resident_s
    return {"batch_size": batch_size, "warmup": args.warmup, "steps": args.steps,
            "petastorm_seconds": peta_s, "resident_seconds": resident_s,
            "petastorm_samples_per_s": peta, "resident_samples_per_s": res, "ratio": peta / res,
            "resident_batches": len(resident), "peak_gpu_mem_bytes": peak,
            "peak_gpu_mem_bytes_petastorm": peak_peta}


def measure_item_embedding(config, inputs, ctx, args, write_job: bool) -> dict:
    """items/s of the item-embedding job's steps with a freshly initialised model (the speed
    does not depend on the weights): ``embed_item_batches`` (best of two passes; the first
    warms CUDA) and, when ``write_job``, ``write_item_embeddings`` into this lake."""
    import torch

    from index_builder.embeddings import embed_item_batches, write_item_embeddings
    from trainer.towers import TwoTowerModel

    torch.manual_seed(config.seed)
    model = TwoTowerModel(config.model, inputs.schema).to(ctx.device)
    best, items = float("inf"), 0
    for _ in range(2):
        start = time.perf_counter()
        items = sum(len(idx) for _, idx, _, _ in embed_item_batches(model, inputs.items, inputs.schema, ctx.device,
                                                                   args.embed_batch_rows))
        best = min(best, time.perf_counter() - start)
    out = {"items": items, "batch_rows": args.embed_batch_rows, "embed_seconds": best,
           "embed_items_per_s": items / best, "job_seconds": None, "job_items_per_s": None}
    if write_job:
        start = time.perf_counter()
        written = write_item_embeddings(inputs.lake_root, "bench-gpu", model, inputs.items, inputs.schema, ctx.device,
                                        args.embed_batch_rows)
        seconds = time.perf_counter() - start
        out.update(job_seconds=seconds, job_items_per_s=written.num_items / seconds, job_items=written.num_items)
    return out


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    from trainer.config import DEFAULT_PRESET, PRESETS

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lake", default=None, help="lake to read; with --synthetic, where to write it "
                        "(must not exist; default: a temporary folder, removed at the end)")
    parser.add_argument("--synthetic", type=int, default=0, metavar="ROWS",
                        help="first write a synthetic lake of ROWS training pairs (delta-rs, no Spark)")
    parser.add_argument("--users", type=int, default=100_000, help="synthetic: user vocabulary size")
    parser.add_argument("--items", type=int, default=200_000, help="synthetic: item catalog size")
    parser.add_argument("--hist", type=int, default=50, help="synthetic: history length N of pairs.hist")
    parser.add_argument("--rows-per-file", type=int, default=131_072, help="synthetic: pairs/train rows per file")
    parser.add_argument("--preset", default=DEFAULT_PRESET, choices=sorted(PRESETS),
                        help=f"model/loss preset (default: {DEFAULT_PRESET})")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--steps", type=int, default=40, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=8, help="untimed steps before each measurement")
    parser.add_argument("--resident-batches", type=int, default=8,
                        help="batches kept on the device for the ceiling (cycled)")
    parser.add_argument("--reader-workers", type=int, default=None,
                        help="Petastorm reader threads (default: the preset's, what training uses)")
    parser.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                        help="auto (what training uses): bf16 autocast on CUDA, fp32 on CPU")
    parser.add_argument("--embed-batch-rows", type=int, default=65_536, help="item-embedding batch rows")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even where CUDA is available")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    if args.steps <= 0 or args.warmup < 0 or args.resident_batches <= 0 or min(args.batch_sizes) <= 0:
        parser.error("--steps, --resident-batches and --batch-sizes must be > 0, --warmup >= 0")
    if args.cpu:
        os.environ["TOWERLAKE_FORCE_CPU"] = "1"

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="towerlake-bench-gpu-") as tmp:
        lake = args.lake
        written = None
        if args.synthetic:
            lake = lake or str(Path(tmp) / "lake")
            if Path(lake).exists():
                parser.error(f"--synthetic writes a new lake, but {lake} exists")
            start = time.perf_counter()
            counts = write_synthetic_lake(lake, args.synthetic, args.users, args.items, args.hist,
                                          args.rows_per_file)
            written = {"seconds": time.perf_counter() - start, "rows": counts}
            print(f"wrote synthetic lake {lake} in {written['seconds']:.1f}s: {counts}", flush=True)
        elif lake is None:
            parser.error("give --lake (an existing lake) or --synthetic ROWS")
        result = run(lake, args, written)
    result["seconds_total"] = time.perf_counter() - t0
    _print(result)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


def run(lake: str, args, written: dict | None) -> dict:
    import pyarrow
    import torch

    from trainer.config import preset
    from trainer.distributed import init_distributed
    from trainer.loop import prepare_run

    ctx = init_distributed("single")
    config = preset(args.preset)
    if args.reader_workers:
        config = config.with_overrides({"reader_workers": args.reader_workers})
    if written is not None and config.loss == "bce":
        raise SystemExit(f"preset {args.preset} trains on offline negatives, which the synthetic lake has not: "
                         "use --lake")
    precision = {"auto": "bf16" if ctx.device.type == "cuda" else "fp32"}.get(args.precision, args.precision)
    name = torch.cuda.get_device_name(ctx.device) if ctx.device.type == "cuda" else "cpu"
    print(f"device {ctx.device} ({name}), torch {torch.__version__}, pyarrow {pyarrow.__version__}, "
          f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; preset {args.preset}, {precision}, "
          f"{config.reader_workers} reader threads", flush=True)
    inputs = prepare_run(lake, config)
    train = inputs.train
    print(f"pairs/train v{train.version}: {train.num_rows:,} rows in {len(train.files)} files; "
          f"{inputs.schema.num_items - 1:,} items, {inputs.schema.num_users - 1:,} users", flush=True)
    result = {
        "device": ctx.device.type, "device_name": name, "torch": torch.__version__,
        "pyarrow": pyarrow.__version__, "cores": os.cpu_count(), "load_average_start": list(os.getloadavg()),
        "preset": args.preset, "precision": precision, "reader_workers": config.reader_workers,
        "lake": lake, "synthetic": written,
        "pairs_train": {"version": train.version, "rows": train.num_rows, "files": len(train.files)},
        "runs": [],
    }
    for batch_size in args.batch_sizes:
        if (train.num_rows or 0) < batch_size:
            raise SystemExit(f"pairs/train has {train.num_rows} rows, fewer than one batch of {batch_size}")
        print(f"batch {batch_size:,}: {args.warmup} warm-up + {args.steps} timed steps, Petastorm then resident ...",
              flush=True)
        result["runs"].append(measure_batch_size(config, inputs, ctx, batch_size, args))
    print("item embedding ...", flush=True)
    result["item_embedding"] = measure_item_embedding(config, inputs, ctx, args, write_job=written is not None)
    result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result["load_average_end"] = list(os.getloadavg())
    return result


def _print(result: dict) -> None:
    def mem(value) -> str:
        return f"{value / 2**30:.2f} GiB" if value is not None else "n/a (cpu)"

    print()
    print(f"{'batch':>7} {'Petastorm samples/s':>20} {'resident samples/s':>19} {'ratio':>6}  peak GPU memory")
    for r in result["runs"]:
        print(f"{r['batch_size']:>7,} {r['petastorm_samples_per_s']:>20,.0f} {r['resident_samples_per_s']:>19,.0f} "
              f"{r['ratio']:>6.2f}  {mem(r['peak_gpu_mem_bytes'])}")
    e = result["item_embedding"]
    job = f"; write_item_embeddings {e['job_items_per_s']:,.0f} items/s" if e["job_items_per_s"] else ""
    print(f"item embedding: {e['items']:,} items, embed_item_batches {e['embed_items_per_s']:,.0f} items/s{job}")
    print(f"device {result['device_name']}, {result['precision']}, preset {result['preset']}, "
          f"{result['reader_workers']} reader threads; ratio = Petastorm / resident; total "
          f"{result['seconds_total']:.0f}s, load average {result['load_average_start'][0]:.1f} -> "
          f"{result['load_average_end'][0]:.1f}")


if __name__ == "__main__":
    sys.exit(main())
