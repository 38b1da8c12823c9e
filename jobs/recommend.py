"""Recommend items with the CURRENT release: top-K unseen items for users, with titles and scores.

Reads releases/CURRENT (model + FAISS index + id map), builds each user's query from the
lake as of now (the most recent items of bronze/interactions, the activity bucket) with the
user features of features/users at the version the model was trained on (features/users,
features/items and features/spec are read at the model manifest's versions; refused with
the model and table named when the lake no longer holds them), searches at the release's tuned nprobe and drops items the user already
interacted with. A user not in vocab/user_id gets the most popular items they have not
interacted with (score NaN) and a note saying so. Scores are cosine similarities.

Examples:
  python -m jobs.recommend --user-id 196 --k 10          # prints a table
  python -m jobs.recommend --user-id 196 --user-id 7
  python -m jobs.recommend --users-file users.txt --k 50 # one id per line -> Delta table
  python -m jobs.recommend --all-users --k 100           # every user of vocab/user_id
Batch modes overwrite the Delta table <lake>/recommendations (user_id, item_id, rank,
score, release_version) in one commit.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from typing import Literal

if __package__ in (None, ""):
    import os

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jobs.cli import job_parser, run_job, setup_logging

Device = Literal["auto", "cpu", "cuda"]
DEFAULT_OUTPUT = "recommendations"


@dataclass(frozen=True)
class RecommendConfig:
    """One run. Exactly one of ``user_ids`` (print), ``users_file`` or ``all_users`` (write
    the Delta table ``output`` under the lake)."""

    lake: str
    k: int
    user_ids: tuple[str, ...] = ()
    users_file: str | None = None
    all_users: bool = False
    batch_users: int = 4096
    output: str = DEFAULT_OUTPUT
    device: Device = "auto"

    def __post_init__(self) -> None:
        modes = [bool(self.user_ids), self.users_file is not None, self.all_users]
        if sum(modes) != 1:
            raise ValueError("pick exactly one of --user-id, --users-file, --all-users, got "
                             f"{sum(modes)} ({', '.join(n for n, on in zip(('--user-id', '--users-file', '--all-users'), modes, strict=True) if on) or 'none'})")
        if self.k < 1:
            raise ValueError(f"--k must be >= 1, got {self.k!r}")
        if self.batch_users < 1:
            raise ValueError(f"--batch-users must be >= 1, got {self.batch_users!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"--device must be auto, cpu or cuda, got {self.device!r}")
        if not self.output or self.output.startswith("/") or ".." in self.output.split("/"):
            raise ValueError(f"--output must be a table path relative to the lake, got {self.output!r}")

    @property
    def batch_mode(self) -> bool:
        return not self.user_ids


def build_parser() -> argparse.ArgumentParser:
    p = job_parser("recommend", __doc__)
    p.add_argument("--user-id", action="append", default=[], help="original user id; repeatable (prints)")
    p.add_argument("--users-file", help="file with one user id per line (writes the Delta table)")
    p.add_argument("--all-users", action="store_true", help="every user of vocab/user_id (writes the Delta table)")
    p.add_argument("--k", type=int, default=10, help="items per user (default: %(default)s)")
    p.add_argument("--batch-users", type=int, default=4096, help="users per query batch (default: %(default)s)")
    p.add_argument("--output", default=DEFAULT_OUTPUT, help="Delta table under the lake (default: %(default)s)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="where the user tower runs (default: a GPU when present)")
    return p


def parse_config(argv: list[str] | None = None) -> RecommendConfig:
    a = build_parser().parse_args(argv)
    return RecommendConfig(lake=a.lake, k=a.k, user_ids=tuple(a.user_id), users_file=a.users_file,
                           all_users=a.all_users, batch_users=a.batch_users, output=a.output, device=a.device)


def read_users_file(path: str) -> list[str]:
    """Ids, one per line; blank lines and ``#`` comments skipped; duplicates dropped (first kept)."""
    try:
        with open(path, encoding="utf-8") as fh:
            lines = [line.strip() for line in fh]
    except FileNotFoundError as err:
        raise ValueError(f"--users-file {path!r} does not exist") from err
    return list(dict.fromkeys(line for line in lines if line and not line.startswith("#")))


def format_table(rows: list[dict]) -> str:
    """rank, item_id, score, title as aligned text."""
    header = ("rank", "item_id", "score", "title")
    cells = [(str(r["rank"]), str(r["item_id"]), "-" if r["score"] is None or r["score"] != r["score"]
              else f"{r['score']:.4f}", r["title"] or "") for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.rjust(w) if i < 3 else h for i, (h, w) in enumerate(zip(header, widths, strict=True)))]
    lines += ["  ".join(c.rjust(w) if i < 3 else c for i, (c, w) in enumerate(zip(cell, widths, strict=True)))
              for cell in cells]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    config = parse_config(argv)
    setup_logging("recommend")
    import logging

    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # which SIMD build loaded: noise here
    from index_builder.recommendation_writer import write_recommendations
    from index_builder.retrieval import Retriever
    from lake_contract.lake import Lake

    started = time.monotonic()
    device = config.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    lake = Lake(config.lake)
    retriever = Retriever(lake.root, device=device)
    try:
        print(f"recommend: {retriever.summary_line()} on {device}")
        tables = retriever.describe()["tables"]
        print("  read " + ", ".join(f"{name}@v{version}" for name, version in sorted(tables.items())))
        print(f"  [load release] {time.monotonic() - started:.1f}s")
        if not config.batch_mode:
            result = retriever.recommend(list(config.user_ids), config.k)
            rows = result.table.to_pylist()
            for user_id in config.user_ids:
                mine = [r for r in rows if r["user_id"] == user_id]
                kind = "popular fallback" if user_id in result.unknown_users else "model"
                print(f"\nuser {user_id}: top {len(mine)} ({kind})")
                print(format_table(mine))
            for message in result.messages:
                print(f"note: {message}")
            return 0

        from tqdm import tqdm

        if config.all_users:
            total = retriever.queries.count_users()
            batches = retriever.queries.iter_user_ids(config.batch_users)
        else:
            users = read_users_file(config.users_file)
            total = len(users)
            batches = (users[i:i + config.batch_users] for i in range(0, total, config.batch_users))
        stage = time.monotonic()
        with tqdm(total=total, desc="recommend", unit="user", dynamic_ncols=True, mininterval=1.0,
                  disable=total <= config.batch_users) as bar:
            written = write_recommendations(retriever, batches, config.k, lake.table(config.output),
                                            on_batch=bar.update)
        print(f"  [recommend + write] {time.monotonic() - stage:.1f}s")
        print(f"wrote:\n  {config.output}: {written.rows:,} rows ({written.users:,} users x top {config.k}) "
              f"-> version {written.version}")
        if written.unknown_users:
            print(f"note: {written.unknown_users:,} users are not in vocab/user_id: they got the most popular "
                  "items they have not interacted with (score NaN)")
        return 0
    finally:
        retriever.close()


if __name__ == "__main__":
    run_job("recommend", lambda: main(sys.argv[1:]))
