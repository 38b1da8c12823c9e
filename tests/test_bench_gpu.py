"""benchmarks/bench_gpu.py keeps working without a GPU: on the CPU, on a tiny synthetic lake it
writes itself with delta-rs (no Spark), then again on that lake as an existing ``--lake``.
Asserts on its JSON: every figure present and positive, ratio = Petastorm / resident, the
lake it read is the one it wrote, and the item-embedding job embedded the whole catalog."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_gpu.py"
ROWS, USERS, ITEMS, BATCHES = 3000, 40, 70, [64, 128]


def _bench(tmp_path: Path, name: str, *args: str) -> dict:
    out = tmp_path / f"{name}.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--cpu", "--steps", "3", "--warmup", "1",
                           "--resident-batches", "2", "--batch-sizes", *map(str, BATCHES), "--json", str(out), *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=540,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ratio = Petastorm / resident" in proc.stdout
    return json.loads(out.read_text())


def _check_runs(result: dict) -> None:
    assert result["device"] == "cpu" and result["device_name"] == "cpu"
    assert [r["batch_size"] for r in result["runs"]] == BATCHES
    for r in result["runs"]:
        assert r["steps"] == 3 and r["warmup"] == 1 and r["resident_batches"] == 2
        assert r["petastorm_samples_per_s"] > 0 and r["resident_samples_per_s"] > 0
        assert math.isclose(r["ratio"], r["petastorm_samples_per_s"] / r["resident_samples_per_s"])
        assert math.isclose(r["petastorm_samples_per_s"], 3 * r["batch_size"] / r["petastorm_seconds"])
        assert r["peak_gpu_mem_bytes"] is None  # no GPU memory on the CPU
    assert result["item_embedding"]["items"] == ITEMS and result["item_embedding"]["embed_items_per_s"] > 0
    assert result["peak_rss_bytes"] > 0 and result["seconds_total"] > 0


def test_bench_gpu_on_cpu_with_a_synthetic_lake_then_that_lake(tmp_path):
    lake = tmp_path / "lake"
    written = _bench(tmp_path, "synthetic", "--synthetic", str(ROWS), "--users", str(USERS), "--items", str(ITEMS),
                     "--hist", "8", "--rows-per-file", "1000", "--lake", str(lake))
    _check_runs(written)
    assert written["precision"] == "fp32" and written["preset"] == "dat"
    assert written["synthetic"]["rows"]["pairs/train"] == ROWS
    # 3 appends of 1,000 rows: versions 0..2, one file each, every row in the snapshot it read
    assert written["pairs_train"] == {"version": 2, "rows": ROWS, "files": 3}
    assert written["item_embedding"]["job_items"] == ITEMS and written["item_embedding"]["job_items_per_s"] > 0
    assert (lake / "embeddings" / "items" / "_delta_log").is_dir()

    # the same lake as an existing one (what a copied demo lake is), in CPU bf16 autocast
    again = _bench(tmp_path, "existing", "--lake", str(lake), "--precision", "bf16")
    _check_runs(again)
    assert again["precision"] == "bf16" and again["synthetic"] is None
    assert again["pairs_train"] == written["pairs_train"]
    assert again["item_embedding"]["job_items_per_s"] is None  # never writes into a lake it did not create
