"""Seed sweeps recorded in the lake and shown by the release report: exact means and sample
standard deviations, matched to the published model by configuration (seed aside), and
honest about the data they were measured on."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest

from jobs.report import seed_spread_section
from trainer.config import preset
from trainer.seed_spread import find_spread, spread_record, write_spread

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_seeds

VERSIONS = {"pairs/train": 3, "pairs/valid": 3, "pairs/test": 3, "features/items": 2}
# Test HR@50 / NDCG@10 of three seeds (the dat runs of docs/training.md).
TEST = [(0.4867, 0.0976), (0.4634, 0.0937), (0.4740, 0.0993)]


def _config(seed: int, **changes) -> dict:
    return dataclasses.replace(preset("dat"), seed=seed, **changes).to_dict()


def _run(seed: int, hr50: float, ndcg10: float, **config_changes) -> dict:
    model = {"hr@10": 0.18, "hr@50": hr50, "hr@100": 0.65, "ndcg@10": ndcg10, "ndcg@50": 0.16}
    itempop = {"hr@10": 0.0785, "hr@50": 0.2057, "hr@100": 0.3224, "ndcg@10": 0.0389, "ndcg@50": 0.0660}
    return {"version": f"seeds-dat-base-s{seed}", "config": _config(seed, **config_changes),
            "metrics": {"valid": {"model": model, "itempop": itempop}, "test": {"model": model, "itempop": itempop}},
            "manifest": {"table_versions": dict(VERSIONS), "train_seconds": 100.0 + seed}}


def _runs() -> list[dict]:
    return [_run(seed, hr, nd) for seed, (hr, nd) in enumerate(TEST)]


def test_the_record_holds_the_mean_and_sample_std_of_each_metric():
    record = spread_record("dat", [], _runs())
    hr_mean, hr_std = record["splits"]["test"]["model"]["hr@50"]
    nd_mean, nd_std = record["splits"]["test"]["model"]["ndcg@10"]
    assert hr_mean == pytest.approx(0.4747, abs=1e-9)
    assert hr_std == pytest.approx(0.0116658, abs=1e-6)  # sqrt(((.012)^2 + (.0113)^2 + (.0007)^2) / 2)
    assert nd_mean == pytest.approx(0.0968667, abs=1e-6)
    assert nd_std == pytest.approx(0.0028711, abs=1e-6)  # deviations .00073, -.00317, .00243
    assert record["splits"]["test"]["itempop"]["hr@50"] == [0.2057, 0.0]  # deterministic ranking: no spread
    assert record["seeds"] == [0, 1, 2] and record["table_versions"] == VERSIONS
    assert "seed" not in record["config"]
    assert [r["test"]["hr@50"] for r in record["runs"]] == [0.4867, 0.4634, 0.4740]


def test_runs_of_another_configuration_or_other_data_are_refused():
    mixed = [*_runs()[:2], _run(2, 0.47, 0.09, lr=0.5)]
    with pytest.raises(ValueError, match="another configuration"):
        spread_record("dat", [], mixed)
    other_data = _runs()
    other_data[1]["manifest"]["table_versions"] = {**VERSIONS, "pairs/train": 4}
    with pytest.raises(ValueError, match="not on the same pinned data"):
        spread_record("dat", [], other_data)


def _model_folder(tmp_path: Path, seed: int, version: str, versions: dict, **changes) -> Path:
    folder = tmp_path / "models" / version
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(_config(seed, **changes)))
    (folder / "manifest.json").write_text(json.dumps({"version": version, "preset": "dat", "table_versions": versions}))
    return folder


def test_the_report_shows_the_spread_of_the_published_configuration(tmp_path):
    lake = str(tmp_path / "lake")
    path = write_spread(lake, bench_seeds.record_name("dat", []), spread_record("dat", [], _runs()))
    assert path == tmp_path / "lake" / "report" / "seed_spread" / "dat-base.json"

    # A model of the same configuration trained with another seed, on the same data.
    lines = seed_spread_section(lake, _model_folder(tmp_path, 7, "nightly-20261203", VERSIONS))
    text = "\n".join(lines)
    assert "| test | model | 0.1800 ± 0.0000 | 0.4747 ± 0.0117 | 0.6500 ± 0.0000 | 0.0969 ± 0.0029 |" in text
    assert "| test | itempop | 0.0785 | 0.2057 | 0.3224 | 0.0389 | 0.0660 |" in text
    assert "seeds 0, 1, 2 (n=3" in text
    assert "same table versions as this release's model" in text
    assert "is one of these runs" not in text

    # One of the sweep's own runs, published after a rebuild of the pairs: said, not hidden.
    lines = seed_spread_section(lake, _model_folder(tmp_path, 1, "seeds-dat-base-s1", {**VERSIONS, "pairs/test": 4}))
    text = "\n".join(lines)
    assert "other table versions than this release's model" in text and "`pairs/test`@v3" in text
    assert "The published model `seeds-dat-base-s1` is one of these runs." in text


def test_no_spread_is_claimed_for_another_configuration(tmp_path):
    lake = str(tmp_path / "lake")
    write_spread(lake, "dat-base", spread_record("dat", [], _runs()))
    folder = _model_folder(tmp_path, 0, "nightly-20261203", VERSIONS, lr=0.5)
    assert find_spread(lake, json.loads((folder / "config.json").read_text())) is None
    lines = seed_spread_section(lake, folder)
    assert lines[2].startswith("No seed sweep of this model's configuration is recorded")
    assert "--preset dat --seeds 3" in lines[2]
    # A sweep with overrides is recorded under its own name, never over the base sweep.
    assert bench_seeds.record_name("dat", ["lr=0.5"]) != bench_seeds.record_name("dat", [])


def test_the_benchmark_table_is_read_from_the_records():
    text = bench_seeds.table({"dat": spread_record("dat", [], _runs())}, "test")
    assert "| ItemPop | 0.0785 | 0.2057 | 0.3224 | 0.0389 | 0.0660 | |" in text
    assert "| `dat` (n=3) | 0.1800 ± 0.0000 | 0.4747 ± 0.0117 | 0.6500 ± 0.0000 | 0.0969 ± 0.0029 | " \
           "0.1600 ± 0.0000 | 101 ± 1 |" in text
