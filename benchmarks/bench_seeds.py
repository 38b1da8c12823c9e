"""Quality over seeds: train presets with N seeds on the same pinned lake data and report the
mean and standard deviation of every metric, next to ItemPop.

One run of ``jobs.train`` moves by about one standard error of HR@50 (~0.016 on the 943
MovieLens-100K test users), so two presets are ranked only on the mean of several seeds.
For every ``--preset`` and seed this runs

  python -m jobs.train --lake LAKE --preset P --seed S --version seeds-<P>-<tag>-s<S> --exist-ok

(``--exist-ok``: a re-run of the benchmark reuses the versions it already trained, so an
interrupted benchmark resumes), reads each version's ``metrics.json`` and ``manifest.json``,
checks that every run read the SAME table versions (the pinned data; it stops otherwise), and
prints one table per split: mean ± sample std (n-1) over the seeds of HR@10/50/100 and
NDCG@10/50, the ItemPop row, and the training seconds per run. ``--set`` overrides apply to
every preset (and are part of the version name's tag, so tuned runs never reuse untuned ones).
It also records each preset's spread in ``<lake>/report/seed_spread/<preset>-<tag>.json``
(``trainer.seed_spread``), which ``jobs.report`` shows for a release of that configuration.

  .venv/bin/python benchmarks/bench_seeds.py --lake lake --preset dat --preset transformer --seeds 3
  .venv/bin/python benchmarks/bench_seeds.py --lake lake --preset transformer --set model.seq_layers=1 --json out.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from trainer.seed_spread import SPREAD_METRICS, mean_std, spread_record, write_spread  # noqa: E402


def record_name(preset: str, overrides: list[str]) -> str:
    """``<preset>-<tag>``: tag ``base`` without overrides, else a hash of them."""
    tag = hashlib.sha1("\n".join(sorted(overrides)).encode()).hexdigest()[:6] if overrides else "base"
    return f"{preset}-{tag}"


def version_name(preset: str, overrides: list[str], seed: int) -> str:
    return f"seeds-{record_name(preset, overrides)}-s{seed}"


def train_one(lake: str, preset: str, seed: int, overrides: list[str], say) -> Path:
    from trainer.artifacts import models_root

    version = version_name(preset, overrides, seed)
    folder = models_root(lake) / version
    if (folder / "metrics.json").is_file():
        say(f"  {version}: already trained, reusing it")
        return folder
    cmd = [sys.executable, "-m", "jobs.train", "--lake", lake, "--preset", preset, "--seed", str(seed),
           "--version", version, "--exist-ok", "--no-progress", "--backend", "single"]
    for item in overrides:
        cmd += ["--set", item]
    say("  $ " + " ".join(cmd[1:]))
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})  # its log goes to ours
    if proc.returncode != 0:
        raise SystemExit(f"jobs.train failed for {version} (exit {proc.returncode}); its output is above")
    say(f"  {version}: {time.monotonic() - start:.0f}s wall")
    return folder


def collect(folders: list[Path]) -> list[dict]:
    runs = []
    for folder in folders:
        metrics = json.loads((folder / "metrics.json").read_text())
        manifest = json.loads((folder / "manifest.json").read_text())
        config = json.loads((folder / "config.json").read_text())
        runs.append({"version": folder.name, "seed": config["seed"], "metrics": metrics, "manifest": manifest,
                     "config": config})
    return runs


def check_same_data(runs: list[dict]) -> dict:
    versions = {json.dumps(r["manifest"]["table_versions"], sort_keys=True) for r in runs}
    if len(versions) != 1:
        detail = "\n".join(f"  {r['version']}: {r['manifest']['table_versions']}" for r in runs)
        raise SystemExit(f"the runs read different table versions, so their metrics are not comparable:\n{detail}")
    return runs[0]["manifest"]["table_versions"]


def table(records: dict[str, dict], split: str) -> str:
    """One markdown table of ``split`` from the presets' spread records (trainer.seed_spread)."""
    head = "| preset | " + " | ".join(m.upper() for m in SPREAD_METRICS) + " | train s / run |"
    lines = [head, "|---" * (len(SPREAD_METRICS) + 2) + "|"]
    pop = next(iter(records.values()))["splits"][split]["itempop"]
    lines.append("| ItemPop | " + " | ".join(f"{pop[m][0]:.4f}" for m in SPREAD_METRICS) + " | |")
    for name, record in records.items():
        model = record["splits"][split]["model"]
        secs = mean_std([run["train_seconds"] for run in record["runs"]])
        lines.append(f"| `{name}` (n={len(record['runs'])}) | "
                     + " | ".join(f"{model[m][0]:.4f} ± {model[m][1]:.4f}" for m in SPREAD_METRICS)
                     + f" | {secs[0]:.0f} ± {secs[1]:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lake", required=True)
    p.add_argument("--preset", action="append", required=True, help="repeatable")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (default 3)")
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="jobs.train --set, applied to every preset (repeatable)")
    p.add_argument("--json", help="also write every run's metrics and the summaries here")
    p.add_argument("--no-record", action="store_true",
                   help="do not write <lake>/report/seed_spread/<preset>-<tag>.json (read by jobs.report)")
    a = p.parse_args(argv)
    from lake_contract.lake import Lake

    lake = Lake(a.lake).root
    seeds = list(range(a.first_seed, a.first_seed + a.seeds))
    results: dict[str, list[dict]] = {}
    for name in a.preset:
        print(f"preset {name}, seeds {seeds}" + (f", --set {' '.join(a.overrides)}" if a.overrides else ""), flush=True)
        folders = [train_one(lake, name, s, a.overrides, lambda s: print(s, flush=True)) for s in seeds]
        results[name] = collect(folders)
    pinned = check_same_data([r for runs in results.values() for r in runs])
    records = {name: spread_record(name, a.overrides, runs) for name, runs in results.items()}
    if not a.no_record:
        for name, record in records.items():
            path = write_spread(lake, record_name(name, a.overrides), record)
            print(f"recorded the spread of {name} in {path} (jobs.report shows it for a release of this preset)")
    print("\nevery run read: " + ", ".join(f"{k}@v{v}" for k, v in sorted(pinned.items())))
    for split in ("valid", "test"):
        print(f"\n{split} split, mean ± std over seeds {seeds} (ItemPop: one deterministic ranking)\n")
        print(table(records, split))
    print("\nper run (test HR@50 / NDCG@10, best epoch, train s):")
    for runs in results.values():
        for r in runs:
            t = r["metrics"]["test"]["model"]
            print(f"  {r['version']}: {t['hr@50']:.4f} / {t['ndcg@10']:.4f}, epoch {r['metrics']['best_epoch']}, "
                  f"{r['manifest']['train_seconds']:.0f}s")
    if a.json:
        summary = {name: record["splits"] for name, record in records.items()}
        Path(a.json).write_text(json.dumps({"overrides": a.overrides, "seeds": seeds, "table_versions": pinned,
                                            "summary": summary, "runs": results}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
