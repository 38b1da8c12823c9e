"""What the Towerlake DAGs share: the operator that runs a job in the pipeline env, the
guards, the version templates, the pool and the failure alert (docs/airflow.md).

Airflow-only: nothing here imports pyspark, torch or the pipeline packages. Jobs run as
``<pipeline python> -m jobs.<job> ... --lake <absolute lake>`` in a subprocess, so the
Airflow env never loads the pipeline's libraries, and the exit-code contract of jobs/cli.py
becomes task states:

  0   success
  99  nothing to do                         -> AirflowSkipException (task skipped)
  2   bad input, bad config, a failed gate  -> AirflowFailException (failed, no retries)
  any other code or a signal                -> AirflowException (retried with backoff)

The job's last stderr line (its one-line reason) is the task's error message.

Settings (read when a task runs, never at parse time): an Airflow Variable of that name
(``AIRFLOW_VAR_<NAME>`` works too), else the environment variable, else the default:
  TOWERLAKE_HOME          the repository (default: the folder above airflow_dags/)
  TOWERLAKE_PYTHON        the pipeline env's python (default: $TOWERLAKE_HOME/.venv/bin/python)
  TOWERLAKE_LAKE          lake root, a path (made absolute) or a URI (default: $TOWERLAKE_HOME/lake)
  TOWERLAKE_SOURCE_ARGS   ingest source flags, required: '--source csv --mapping /data/map.toml'
  TOWERLAKE_FEATURE_ARGS, TOWERLAKE_TRAIN_ARGS, TOWERLAKE_FINETUNE_ARGS, TOWERLAKE_INDEX_ARGS,
  TOWERLAKE_PUBLISH_ARGS  extra flags for those jobs (default: none), e.g. '--epochs 3'
"""

from __future__ import annotations

import collections
import logging
import os
import shlex
import signal
import subprocess
import threading
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import pendulum
from airflow.sdk import DAG, BaseHook, BaseOperator, CronDataIntervalTimetable, Param, Variable
from airflow.sdk.exceptions import (
    AirflowException,
    AirflowFailException,
    AirflowNotFoundException,
    AirflowSkipException,
)

LAKE_POOL = "towerlake_lake"  # one slot: lake-writing tasks of every DAG run one at a time
ALERT_CONN_ID = "towerlake_alerts"
EXIT_BAD_INPUT = 2  # jobs/cli.py
EXIT_NOTHING_TO_DO = 99  # jobs/cli.py

# Everything a run names is derived from its data interval (never "now", never "the newest").
# For a scheduled run logical_date == data_interval_start; a manual run covers the last
# complete interval before it, so a re-trigger of the same interval finds its own artifacts.
_START = "data_interval_start.in_timezone('UTC')"
DAY = "{{ " + _START + ".strftime('%Y-%m-%d') }}"
HOUR = "{{ " + _START + ".strftime('%Y-%m-%dT%H') }}"
INTERVAL_END = "{{ data_interval_end.in_timezone('UTC').strftime('%Y-%m-%dT%H:%M:%S') }}"
NIGHTLY_VERSION = "nightly-{{ " + _START + ".strftime('%Y%m%d') }}"
HOURLY_VERSION = "hourly-{{ " + _START + ".strftime('%Y%m%dT%H') }}"

LAUNCHERS = ("python", "torchrun:N", "horovodrun:N", "torch-distributor:N")

log = logging.getLogger("towerlake.alerts")


def towerlake_dag(dag_id: str, *, description: str, doc_md: str | None, retries: int, cron: str | None = None,
                  params: dict[str, Param] | None = None) -> DAG:
    """A Towerlake DAG: UTC interval timetable over ``cron`` (None: manual only; a plain cron
    string would give Airflow 3's zero-length interval), no catchup, one active run at a time,
    the shared task defaults. A scheduled DAG also gets the ``launcher`` param of its training
    task."""
    if cron is not None:
        params = {"launcher": Param("python", type="string", description="python, torchrun:N, horovodrun:N or torch-distributor:N"),
                  **(params or {})}
    return DAG(
        dag_id=dag_id,
        description=description,
        schedule=CronDataIntervalTimetable(cron, timezone="UTC") if cron is not None else None,
        start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
        catchup=False,
        max_active_runs=1,
        default_args=default_args(retries=retries),
        params=params or {},
        tags=["towerlake"],
        doc_md=doc_md,
    )


def lake_task_args(priority: int) -> dict[str, Any]:
    """Pool and priority of a lake-writing task: one slot shared by every DAG; a higher
    ``priority`` (the nightly's) takes the slot first when both wait."""
    return {"pool": LAKE_POOL, "priority_weight": priority, "weight_rule": "absolute"}


def index_and_publish(version: str, priority: int, publish_args: Sequence[str] = ()
                      ) -> tuple[TowerlakeJobOperator, TowerlakeJobOperator]:
    """``build_index --model V`` >> ``publish`` of model and index ``V`` as release ``V``: the
    last two tasks of every training DAG, idempotent by ``--exist-ok``."""
    lake = lake_task_args(priority)
    index = TowerlakeJobOperator(
        task_id="build_index", job="build_index", args=["--model", version, "--exist-ok"],
        extra_args_from="TOWERLAKE_INDEX_ARGS", **lake)
    publish = TowerlakeJobOperator(
        task_id="publish", job="publish",
        args=["--model", version, "--index", version, "--release-version", version, "--exist-ok", *publish_args],
        extra_args_from="TOWERLAKE_PUBLISH_ARGS", **lake)
    index >> publish
    return index, publish


def default_args(retries: int = 2) -> dict[str, Any]:
    """Task defaults of every Towerlake DAG: retries with exponential backoff (for exit codes
    other than 0/2/99), the failure alert, and a generous timeout per task."""
    return {
        "owner": "towerlake",
        "retries": retries,
        "retry_delay": timedelta(minutes=2),
        "retry_exponential_backoff": 2.0,
        "max_retry_delay": timedelta(minutes=30),
        "execution_timeout": timedelta(hours=6),
        "on_failure_callback": alert_on_failure,
    }


def setting(name: str, default: str | None = None) -> str | None:
    """Airflow Variable ``name``, else the environment variable ``name``, else ``default``."""
    return Variable.get(name, default=os.environ.get(name, default))


def pipeline_paths() -> tuple[Path, Path, str]:
    """(repository, pipeline python, lake root) for this task, checked: a clear failure
    instead of a job that cannot start."""
    home = Path(setting("TOWERLAKE_HOME") or Path(__file__).resolve().parents[1]).resolve()
    python = Path(setting("TOWERLAKE_PYTHON") or home / ".venv" / "bin" / "python")
    if not (home / "jobs").is_dir():
        raise AirflowFailException(f"TOWERLAKE_HOME={home} holds no jobs/ folder: set it (Airflow Variable or "
                                   "environment variable) to the Towerlake repository")
    if not os.access(python, os.X_OK):
        raise AirflowFailException(f"TOWERLAKE_PYTHON={python} is not an executable: set it to the pipeline env's "
                                   "python (make setup creates .venv/bin/python)")
    lake = setting("TOWERLAKE_LAKE") or str(home / "lake")
    if "://" not in lake:
        lake = str(Path(lake).expanduser().resolve())
    return home, python, lake


def pipeline_env(home: Path, python: Path) -> dict[str, str]:
    """The job's environment: the pipeline env's bin first on PATH (its spark-submit, not a
    pyspark-client's from the Airflow env, which exits 127), its python for Spark's workers,
    and the repository importable for them."""
    env = dict(os.environ)
    bin_dir = str(python.parent)
    env["PATH"] = os.pathsep.join([bin_dir, *[p for p in env.get("PATH", "").split(os.pathsep) if p and p != bin_dir]])
    env["PYSPARK_PYTHON"] = str(python)
    env["PYSPARK_DRIVER_PYTHON"] = str(python)
    env["PYTHONPATH"] = os.pathsep.join([str(home), *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])])
    env.pop("VIRTUAL_ENV", None)
    return env


def launch_command(launcher: str, python: Path, module: str) -> list[str]:
    """``python -m module``, or jobs.train in N processes under torchrun, horovodrun or Spark's
    TorchDistributor (jobs/train_on_spark.py; the job's flags follow its ``--``)."""
    kind, _, count = launcher.partition(":")
    if kind == "python" and not count:
        return [str(python), "-m", module]
    if module != "jobs.train":
        raise AirflowFailException(f"launcher {launcher!r} only applies to jobs.train, not {module}")
    if kind == "torch-distributor" and count.isdigit() and int(count) >= 1:
        return [str(python), "-m", "jobs.train_on_spark", "--num-processes", count, "--"]
    if kind in ("torchrun", "horovodrun") and count.isdigit() and int(count) >= 1:
        tool = str(python.parent / kind)
        if kind == "torchrun":
            return [tool, "--standalone", f"--nproc-per-node={count}", "-m", module]
        return [tool, "-np", count, "-H", f"localhost:{count}", "--gloo", str(python), "-m", module]
    raise AirflowFailException(f"launcher must be one of {', '.join(LAUNCHERS)} (N processes), got {launcher!r}")


def _last_line(text: str) -> str:
    """The job's one-line reason: the last line that starts with 'error: ' or 'skipped: '
    (jobs/cli.py; spark-submit prints its shutdown chatter after it), else the last
    non-empty line; without progress-bar carriage returns."""
    lines = [line.rsplit("\r", 1)[-1].strip() for line in text.splitlines()]
    lines = [line for line in lines if line]
    reasons = [line for line in lines if line.startswith(("error: ", "skipped: "))]
    return (reasons or lines or [""])[-1]


def raise_for_exit(code: int, reason: str, what: str) -> None:
    """Map a job's exit code to the task state (module docstring)."""
    if code == 0:
        return
    if code == EXIT_NOTHING_TO_DO:
        raise AirflowSkipException(reason or f"{what}: nothing to do")
    if code == EXIT_BAD_INPUT:
        raise AirflowFailException(reason or f"{what} exited {code} (bad input or a failed gate)")
    if code < 0:
        raise AirflowException(f"{what} was killed by signal {-code}" + (f"; last line: {reason}" if reason else ""))
    raise AirflowException(f"{what} exited {code}: {reason or 'no reason on stderr'}")


class TowerlakeJobOperator(BaseOperator):
    """Run ``python -m jobs.<job> <args> <$extra_args_from> --lake <lake>`` in the pipeline env
    and map its exit code (module docstring). ``args`` and ``launcher`` are templated;
    ``launcher``: python (default), or for train torchrun:N, horovodrun:N, torch-distributor:N."""

    template_fields: Sequence[str] = ("args", "launcher")
    ui_color = "#d9ead3"

    def __init__(self, *, job: str, args: Sequence[str] = (), extra_args_from: str | None = None,
                 required_setting: bool = False, launcher: str = "python", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.job = job
        self.args = list(args)
        self.extra_args_from = extra_args_from
        self.required_setting = required_setting
        self.launcher = launcher
        self._process: subprocess.Popen | None = None

    def command(self) -> tuple[list[str], Path, Path]:
        home, python, lake = pipeline_paths()
        extra = setting(self.extra_args_from, "") if self.extra_args_from else ""
        if self.required_setting and not extra:
            raise AirflowFailException(f"{self.extra_args_from} is not set: set it (Airflow Variable or environment "
                                       f"variable) to the flags of python -m jobs.{self.job}, e.g. "
                                       "'--source csv --mapping /data/mapping.toml'")
        cmd = [*launch_command(self.launcher, python, f"jobs.{self.job}"), *map(str, self.args),
               *shlex.split(extra), "--lake", lake]
        return cmd, home, python

    def execute(self, context: Any) -> None:
        cmd, home, python = self.command()
        self.log.info("running: %s", shlex.join(cmd))
        code, reason = self._run(cmd, cwd=home, env=pipeline_env(home, python))
        raise_for_exit(code, reason, f"jobs.{self.job}")

    def _run(self, cmd: list[str], cwd: Path, env: dict[str, str]) -> tuple[int, str]:
        """Run ``cmd`` in its own process group, streaming stdout and stderr into the task log;
        (exit code, last stderr line). The group is ended if the task is."""
        tail: collections.deque[str] = collections.deque(maxlen=20)
        process = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True, errors="replace", start_new_session=True)
        self._process = process

        def pump(stream, keep: bool) -> None:
            for line in stream:
                text = line.rstrip("\n").rsplit("\r", 1)[-1]
                if text.strip():
                    self.log.info("%s", text)
                    if keep:
                        tail.append(text)

        readers = [threading.Thread(target=pump, args=(process.stdout, False), daemon=True),
                   threading.Thread(target=pump, args=(process.stderr, True), daemon=True)]
        for reader in readers:
            reader.start()
        try:
            code = process.wait()
        finally:
            if process.poll() is None:  # the task was killed or timed out: take the job with it
                self._end_group(process)
            for reader in readers:
                reader.join(timeout=10)
            self._process = None
        return code, _last_line("\n".join(tail))

    @staticmethod
    def _end_group(process: subprocess.Popen) -> None:
        for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
            try:
                os.killpg(process.pid, sig)
                process.wait(timeout=wait)
                return
            except ProcessLookupError:
                return
            except subprocess.TimeoutExpired:
                continue

    def on_kill(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._end_group(self._process)


def _spark_submit_base():
    # The Spark provider is part of the Airflow env (requirements/airflow.txt); an ImportError
    # here says to install it rather than running backfills some other way.
    from airflow.providers.apache.spark.operators.spark_submit import SparkSubmitOperator

    return SparkSubmitOperator


class TowerlakeSparkSubmitOperator(_spark_submit_base()):
    """``SparkSubmitOperator`` for a job file under jobs/ (``application`` relative to
    TOWERLAKE_HOME): the pipeline env's absolute ``spark-submit``, its python for the driver
    and workers, ``--lake`` appended, and the job exit-code contract (as TowerlakeJobOperator).
    The master comes from the ``spark_default`` connection (AIRFLOW_CONN_SPARK_DEFAULT)."""

    def execute(self, context: Any):
        home, python, lake = pipeline_paths()
        try:
            BaseHook.get_connection(self._conn_id)
        except AirflowNotFoundException as err:  # the hook would quietly pick yarn
            raise AirflowFailException(
                f"no Airflow connection {self._conn_id!r} (the Spark master): set AIRFLOW_CONN_SPARK_DEFAULT, e.g. "
                "'{\"conn_type\": \"spark\", \"host\": \"local[*]\"}' (scripts/airflow.sh does), or create it "
                f"({err})") from err
        self._spark_binary = str(python.parent / "spark-submit")
        if not Path(self.application).is_absolute():
            self.application = str(home / self.application)
        self.application_args = [*map(str, self.application_args or []), "--lake", lake]
        env = pipeline_env(home, python)
        self.env_vars = {k: env[k] for k in ("PATH", "PYSPARK_PYTHON", "PYSPARK_DRIVER_PYTHON", "PYTHONPATH")}
        self.log.info("spark-submit %s %s", self.application, shlex.join(self.application_args))
        try:
            return super().execute(context)
        except AirflowException:
            process = getattr(self._hook, "_submit_sp", None)
            code = process.returncode if process is not None else None
            if code is None:
                raise
            raise_for_exit(code, _last_line(getattr(self._hook, "_submit_log_tail", "") or ""),
                           f"spark-submit {Path(self.application).name}")
            raise


class SkipWhileDagRunning(BaseOperator):
    """Skip (and so skip everything downstream) while a run of any of ``dag_ids`` is queued or
    running: the hourly fine-tune yields to the nightly retrain, which supersedes it."""

    ui_color = "#fff2cc"

    def __init__(self, *, dag_ids: Sequence[str], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.dag_ids = list(dag_ids)

    def execute(self, context: Any) -> None:
        ti = context["ti"]
        for dag_id in self.dag_ids:
            active = ti.get_dr_count(dag_id=dag_id, states=["queued", "running"])
            if active:
                raise AirflowSkipException(f"{active} run(s) of {dag_id} active: this run yields to it")
        self.log.info("no active run of %s", ", ".join(self.dag_ids))


def alert_on_failure(context: Any) -> None:
    """on_failure_callback of every Towerlake task: one log line, and a JSON POST to the
    webhook of the Airflow connection ``towerlake_alerts`` when it exists (its ``host`` or
    extra ``url``). The URL, which may hold a token, is never logged."""
    ti = context.get("ti") or context.get("task_instance")
    error = context.get("exception")
    reason = " ".join(str(error).split()) if error is not None else "no exception recorded"
    send_alert(f"towerlake alert: {getattr(ti, 'dag_id', '?')}.{getattr(ti, 'task_id', '?')} failed "
               f"(run {getattr(ti, 'run_id', '?')}, try {getattr(ti, 'try_number', '?')}): {reason[:500]}")


def send_alert(line: str) -> None:
    """Log ``line``; POST it to the ``towerlake_alerts`` webhook when that connection exists."""
    log.error("%s", line)
    try:
        conn = BaseHook.get_connection(ALERT_CONN_ID)
    except AirflowNotFoundException:  # no webhook configured: alerts go to the log only
        return
    url = conn.extra_dejson.get("url") or conn.host
    if not url:
        log.error("towerlake alert: connection %s has no host or extra url; logged only", ALERT_CONN_ID)
        return
    if "://" not in url:
        url = f"https://{url}"
    import json
    import urllib.request

    request = urllib.request.Request(url, data=json.dumps({"text": line}).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            log.warning("towerlake alert: posted to connection %s (HTTP %s)", ALERT_CONN_ID, response.status)
    except OSError as err:  # a dead webhook must not hide the task's own failure
        log.error("towerlake alert: posting to connection %s failed (%s)", ALERT_CONN_ID, type(err).__name__)
