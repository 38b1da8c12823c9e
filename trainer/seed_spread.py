"""How much a preset's metrics move with the seed, recorded in the lake so a release report
can show it.

``benchmarks/bench_seeds.py`` trains one configuration with seeds 0..N-1 on the same pinned
table versions and writes one record per configuration to
``<lake>/report/seed_spread/<name>.json`` (plain JSON, nothing that runs code when loaded):

    {"preset": "dat", "overrides": [], "config": {...TrainConfig without "seed"...},
     "seeds": [0, 1, 2], "table_versions": {...}, "generated": "2026-12-04T15:40:00Z",
     "splits": {"test": {"model": {"hr@50": [mean, std], ...}, "itempop": {...}}, ...},
     "runs": [{"version": ..., "seed": 0, "test": {"hr@50": ..., "ndcg@10": ...}, "train_seconds": ...}]}

``std`` is the sample standard deviation (n-1). A published model "has a known spread" when a
record's ``config`` equals the model's own ``config.json`` with the seed left out: the same
preset and overrides, whatever seed the published run used. Whether the record was measured
on the same table versions as the model is reported next to it, never assumed.
"""

from __future__ import annotations

import json
import statistics
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from lake_contract.lake import Lake, to_local_path

SPREAD_FOLDER = "report/seed_spread"
SPREAD_METRICS = ("hr@10", "hr@50", "hr@100", "ndcg@10", "ndcg@50")
SPLITS = ("valid", "test")


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def config_without_seed(config: dict[str, Any]) -> dict[str, Any]:
    """A TrainConfig dict (``config.json``) minus ``seed``: what a seed sweep holds fixed."""
    return {k: v for k, v in config.items() if k != "seed"}


def spread_record(preset: str, overrides: list[str], runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The record of one configuration's seed sweep. ``runs``: one dict per seed with
    ``version``, ``config`` (its config.json), ``metrics`` (its metrics.json: {split: {ranker:
    {metric: value}}}) and ``manifest`` (its manifest.json). Every run must share the config
    (seed aside) and the table versions; a ValueError names the run that does not."""
    if not runs:
        raise ValueError(f"no runs to summarise for preset {preset!r}")
    first = runs[0]
    config = config_without_seed(first["config"])
    versions = first["manifest"]["table_versions"]
    for run in runs[1:]:
        if config_without_seed(run["config"]) != config:
            raise ValueError(f"{run['version']} was trained with another configuration than {first['version']} "
                             "(seed aside): a spread is only meaningful over seeds of one configuration")
        if run["manifest"]["table_versions"] != versions:
            raise ValueError(f"{run['version']} read {run['manifest']['table_versions']}, {first['version']} read "
                             f"{versions}: the runs are not on the same pinned data")
    splits = {}
    for split in SPLITS:
        if not all(split in run["metrics"] for run in runs):
            continue
        splits[split] = {who: {m: list(mean_std([run["metrics"][split][who][m] for run in runs]))
                               for m in SPREAD_METRICS}
                         for who in ("model", "itempop")}
    return {
        "preset": preset, "overrides": list(overrides), "config": config,
        "seeds": [run["config"]["seed"] for run in runs], "table_versions": versions,
        "generated": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"), "splits": splits,
        "runs": [{"version": run["version"], "seed": run["config"]["seed"],
                  "test": {m: run["metrics"].get("test", {}).get("model", {}).get(m) for m in ("hr@50", "ndcg@10")},
                  "train_seconds": run["manifest"].get("train_seconds")} for run in runs],
    }


def spread_folder(lake_root: str) -> Path:
    local = to_local_path(Lake(lake_root).table(SPREAD_FOLDER))
    if local is None:
        raise ValueError(f"seed-spread records live beside the models, on a local lake path; got {lake_root!r}")
    return Path(local)


def write_spread(lake_root: str, name: str, record: dict[str, Any]) -> Path:
    """Writes ``record`` as ``<lake>/report/seed_spread/<name>.json`` (atomically: a reader
    sees the old file or the new one)."""
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"a seed-spread record name must be a plain file name, got {name!r}")
    folder = spread_folder(lake_root)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2, sort_keys=True), encoding="utf-8")
    tmp.replace(path)
    return path


def find_spread(lake_root: str, model_config: dict[str, Any]) -> dict[str, Any] | None:
    """The newest record whose configuration equals ``model_config`` (a model's config.json)
    with the seed left out; None when no sweep of that configuration was recorded."""
    folder = spread_folder(lake_root)
    wanted = config_without_seed(model_config)
    found = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # a half-written or foreign file is not a record
        if isinstance(record, dict) and record.get("config") == wanted:
            found.append(record)
    return max(found, key=lambda r: r.get("generated", "")) if found else None


def spread_markdown(record: dict[str, Any], model_versions: dict[str, int] | None = None,
                    model_version: str | None = None) -> list[str]:
    """Markdown lines: mean ± std per split for the model and ItemPop, how many seeds, and
    whether the sweep read the same table versions as the published model."""
    seeds = record["seeds"]
    label = f"`{record['preset']}`" + (f" with `--set {' '.join(record['overrides'])}`" if record["overrides"] else "")
    lines = [f"Preset {label} trained with seeds {', '.join(map(str, seeds))} "
             f"(n={len(seeds)}, sample std), recorded {record.get('generated', '?')}:", "",
             "| split | ranker | " + " | ".join(SPREAD_METRICS) + " |", "|---|---|" + "---|" * len(SPREAD_METRICS)]
    for split, by_ranker in record["splits"].items():
        for who, values in by_ranker.items():
            cells = [f"{values[m][0]:.4f} ± {values[m][1]:.4f}" if who == "model" else f"{values[m][0]:.4f}"
                     for m in SPREAD_METRICS]
            lines.append(f"| {split} | {who} | " + " | ".join(cells) + " |")
    lines.append("")
    if model_versions is not None:
        if model_versions == record["table_versions"]:
            lines.append("The sweep read the same table versions as this release's model.")
        else:
            lines.append("The sweep read other table versions than this release's model ("
                         + ", ".join(f"`{t}`@v{v}" for t, v in sorted(record["table_versions"].items()))
                         + "): a guide to the noise, not a measurement of this model.")
    if model_version is not None and any(run["version"] == model_version for run in record["runs"]):
        lines.append(f"The published model `{model_version}` is one of these runs.")
    return lines


__all__ = ["SPREAD_FOLDER", "config_without_seed", "find_spread", "mean_std", "spread_markdown", "spread_record",
           "write_spread"]
