"""Write a human-readable report of the CURRENT release: <lake>/report/report.md (+ PNG).

What it holds: the release and model versions and the exact table versions they came from,
the metrics of the model and ItemPop on the valid/test splits, the seed spread of the
model's configuration when ``benchmarks/bench_seeds.py`` recorded one, the index (nlist, tuned
nprobe, recall vs exact search, QPS), the training curve, and sample recommendations.

Examples:
  python -m jobs.report                          # users 196, 1 and 13
  python -m jobs.report --user-id 7 --k 5
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

if __package__ in (None, ""):
    import os

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jobs.cli import job_parser, run_job, setup_logging

DEFAULT_USERS = ("196", "1", "13")


@dataclass(frozen=True)
class ReportConfig:
    lake: str
    user_ids: tuple[str, ...]
    k: int

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"--k must be >= 1, got {self.k!r}")


def parse_config(argv: list[str] | None = None) -> ReportConfig:
    p = job_parser("report", __doc__)
    p.add_argument("--user-id", action="append", help=f"sample users (repeatable; default {', '.join(DEFAULT_USERS)})")
    p.add_argument("--k", type=int, default=10, help="recommendations per sample user (default 10)")
    a = p.parse_args(argv)
    return ReportConfig(lake=a.lake, user_ids=tuple(a.user_id or DEFAULT_USERS), k=a.k)


def _fmt(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 10 else f"{value:,.1f}"
    return str(value)


def metrics_markdown(metrics: dict) -> list[str]:
    names = ("hr@10", "hr@20", "hr@50", "hr@100", "ndcg@10", "ndcg@50", "mean_rank", "auc")
    lines = ["| split | ranker | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for split in ("valid", "test"):
        for ranker, values in (metrics.get(split) or {}).items():
            lines.append(f"| {split} | {ranker} | " + " | ".join(_fmt(values.get(n)) for n in names) + " |")
    return lines


def seed_spread_section(lake_root: str, model_folder: Path) -> list[str]:
    """The report's "Seed spread" lines: the recorded sweep of the published model's
    configuration (trainer.seed_spread), or one line saying none is known and how to get it."""
    from trainer.seed_spread import find_spread, spread_markdown

    def read(name: str) -> dict:
        path = model_folder / name
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}

    config, model = read("config.json"), read("manifest.json")
    record = find_spread(lake_root, config) if config else None
    if record is None:
        return ["## Seed spread", "",
                "No seed sweep of this model's configuration is recorded: one run moves by about one standard error, "
                "so compare presets with `benchmarks/bench_seeds.py --lake LAKE --preset "
                f"{model.get('preset') or 'NAME'} --seeds 3`.", ""]
    return ["## Seed spread", "", *spread_markdown(record, model.get("table_versions"), model.get("version")), ""]


def main(argv: list[str] | None = None) -> int:
    config = parse_config(argv)
    setup_logging("report")
    from index_builder.release import current_release
    from index_builder.retrieval import NO_RELEASE_MESSAGE, NoReleaseError, Retriever
    from lake_contract.lake import Lake, to_local_path

    lake = Lake(config.lake)
    release = current_release(lake.root)
    if release is None:
        raise NoReleaseError(NO_RELEASE_MESSAGE)
    manifest = release.manifest
    folder = Path(to_local_path(lake.table("report")))
    folder.mkdir(parents=True, exist_ok=True)
    lines = [f"# Towerlake release {release.version}", "",
             f"Generated {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')} from `{lake.root}`.", "",
             f"* model version: `{manifest.get('model_version')}` (parent: `{manifest.get('parent')}`)",
             f"* index version: `{manifest.get('index_version')}`",
             "* data: " + ", ".join(f"`{t}`@v{v}" for t, v in sorted((manifest.get("table_versions") or {}).items())),
             "", "## Retrieval quality (full catalog, items seen before each event excluded)", "",
             *metrics_markdown(manifest.get("metrics") or {}), ""]
    lines += seed_spread_section(lake.root, Path(release.artifact("model")))
    index = manifest.get("index") or {}
    if index:
        lines += ["## Index", "",
                  f"FAISS `{index.get('factory')}`, nlist {index.get('nlist')}, nprobe {index.get('nprobe')} "
                  f"(tuned on validation users' query vectors): recall@{index.get('recall_k', 100)} vs exact "
                  f"search {_fmt(index.get('recall'))}, {_fmt(index.get('qps'))} queries/s vs exact "
                  f"{_fmt(index.get('exact_qps'))}.", ""]
    plot = Path(release.artifact("model")) / "training.png"
    if plot.is_file():
        shutil.copyfile(plot, folder / "training.png")
        lines += ["## Training", "", "![loss and validation recall per epoch](training.png)", ""]
    retriever = Retriever(lake.root)
    try:
        recs = retriever.recommend(list(config.user_ids), config.k)
    finally:
        retriever.close()
    lines += ["## Sample recommendations", ""]
    table = recs.table.to_pylist()
    for user in config.user_ids:
        lines += [f"### user {user}", "", "| rank | item | title | score |", "|---|---|---|---|"]
        lines += [f"| {r['rank']} | {r['item_id']} | {r['title'] or ''} | {_fmt(r['score'])} |"
                  for r in table if r["user_id"] == user]
        lines.append("")
    lines += [f"*{m}*" for m in recs.messages]
    path = folder / "report.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"report: wrote {path}" + (" and training.png" if plot.is_file() else ""))
    return 0


if __name__ == "__main__":
    run_job("report", lambda: main(sys.argv[1:]))
