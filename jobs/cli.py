"""What every job shares: logging, timing lines, and the exit-code contract (docs/design.md).

Exit 0 only on success; otherwise non-zero with a one-line reason a person can act on as
the LAST line on stderr (the traceback, for unexpected failures, before it). Exit codes:
2 = bad input or configuration, or a failed gate (fix and re-run; retrying as is cannot help),
99 = nothing to do (an empty window, a superseded fine-tune; a scheduler marks the task
skipped), 1 = unexpected failure (a retry may help), 130 = interrupted.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import NoReturn

EXIT_BAD_INPUT = 2
EXIT_NOTHING_TO_DO = 99


def default_lake() -> str:
    """``--lake`` default: ``$TOWERLAKE_LAKE`` when set, else ``./lake``."""
    return os.environ.get("TOWERLAKE_LAKE", "lake")


def job_parser(job: str, doc: str):
    """The argument parser every job starts from: ``python -m jobs.<job>``, the first paragraph
    of the job's docstring as description, the rest (examples) as epilog, and ``--lake``."""
    import argparse

    parser = argparse.ArgumentParser(prog=f"python -m jobs.{job}", description=doc.split("\n\n")[0],
                                     epilog=doc.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lake", default=default_lake(), help="lake root (default: $TOWERLAKE_LAKE or ./lake)")
    return parser


def setup_logging(job: str) -> None:
    logging.basicConfig(
        level=os.environ.get("TOWERLAKE_LOG_LEVEL", "INFO"),
        format=f"[{job} %(asctime)s] %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stdout,
    )
    # Library chatter that says nothing a person can act on: petastorm's "not created with
    # Petastorm" notes for plain Parquet (expected: pairs are Delta tables) and faiss' search
    # for CPU-specific builds.
    for noisy in ("py4j", "pyspark", "petastorm", "faiss.loader"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    import warnings

    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")


@contextmanager
def timed(label: str, say: Callable[[str], None] = print) -> Iterator[None]:
    """Print how long a stage took when it finishes."""
    start = time.monotonic()
    yield
    say(f"  [{label}] {time.monotonic() - start:.1f}s")


def run_job(job: str, main: Callable[[], int | None], leave: Callable[[int], NoReturn] = sys.exit) -> None:
    """Run ``main`` and leave through ``leave`` with the contract above (jobs that join a gloo
    group pass ``trainer.distributed.exit_process``)."""
    from lake_contract.errors import NothingToDo, TowerlakeError

    try:
        code = main() or 0
    except KeyboardInterrupt:
        print(f"error: {job} interrupted; tables keep their last committed version", file=sys.stderr)
        leave(130)
    except NothingToDo as err:
        print(f"skipped: {job}: {_one_line(err)}", file=sys.stderr)
        leave(EXIT_NOTHING_TO_DO)
    except (TowerlakeError, ValueError) as err:
        if os.environ.get("TOWERLAKE_DEBUG"):
            traceback.print_exc()
        print(f"error: {job}: {_one_line(err)}", file=sys.stderr)
        leave(EXIT_BAD_INPUT)
    except Exception as err:
        traceback.print_exc()
        print(
            f"error: {job} failed unexpectedly ({type(err).__name__}: {_one_line(err)[:300]}); "
            "tables keep their last committed version; see the traceback above",
            file=sys.stderr,
        )
        leave(1)
    leave(code)


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())
