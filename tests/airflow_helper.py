"""Runs under the Airflow env (.venv-airflow/bin/python), called by tests/test_airflow_dags.py
(which runs under the pipeline env's pytest): each command prints one JSON document on its
last stdout line for the test to assert on. AIRFLOW_HOME and the DAGs folder come from the
environment the test sets (a fresh folder per test session).

  dagbag                     import errors, warnings and the structure of every DAG
  render DAG START END       every task's rendered template fields for the run of [START, END)
  exit-codes                 TowerlakeJobOperator over real processes exiting 0, 99, 2, 1, -9
  states DAG                 the newest run of DAG: its state, each task's state, tries, times
"""

from __future__ import annotations

import json
import sys
import uuid
from pathlib import Path

DAGS = Path(__file__).resolve().parents[1] / "airflow_dags"
POOLS = {"default_pool", "towerlake_lake"}


def _dagbag():
    from airflow.dag_processing.dagbag import BundleDagBag

    return BundleDagBag(dag_folder=str(DAGS), bundle_path=DAGS, known_pools=POOLS)


def dagbag() -> dict:
    bag = _dagbag()
    dags = {}
    for dag in bag.dags.values():
        timetable = dag.timetable
        dags[dag.dag_id] = {
            "timetable": type(timetable).__name__,
            "cron": getattr(timetable, "expression", None),
            "timezone": str(getattr(timetable, "timezone", "")) or None,
            "max_active_runs": dag.max_active_runs,
            "catchup": dag.catchup,
            "params": sorted(dag.params.keys()),
            "deadline": [type(d).__name__ for d in (dag.deadline or [])],
            "order": [t.task_id for t in dag.topological_sort()],
            "tasks": {
                t.task_id: {
                    "operator": type(t).__name__,
                    "upstream": sorted(t.upstream_task_ids),
                    "pool": t.pool,
                    "retries": t.retries,
                    "trigger_rule": str(t.trigger_rule),
                    "job": getattr(t, "job", None),
                    "on_failure_callback": [f"{c.__module__}.{c.__qualname__}" for c in (
                        t.on_failure_callback if isinstance(t.on_failure_callback, list)
                        else [t.on_failure_callback] if t.on_failure_callback else [])],
                }
                for t in dag.tasks
            },
        }
    return {"import_errors": bag.import_errors, "warnings": {k: list(v) for k, v in bag.captured_warnings.items()},
            "dags": dags}


def render(dag_id: str, start: str, end: str) -> dict:
    """Every task's template fields rendered for the scheduled run of [start, end), with the
    context a running task gets (RuntimeTaskInstance.get_template_context, as ``airflow tasks
    render`` builds it; that command infers a manual run's interval instead)."""
    from airflow.cli.commands.task_command import _get_template_context
    from airflow.models.dagrun import DagRun
    from airflow.models.taskinstance import TaskInstance
    from airflow.sdk import timezone
    from airflow.serialization.serialized_objects import DagSerialization
    from airflow.utils.state import DagRunState
    from airflow.utils.types import DagRunTriggeredByType, DagRunType

    dag = _dagbag().dags[dag_id]
    scheduler_dag = DagSerialization.from_dict(DagSerialization.to_dict(dag))
    begin, finish = timezone.parse(start), timezone.parse(end)
    run = DagRun(dag_id=dag_id, run_id=f"scheduled__{begin.isoformat()}", run_type=DagRunType.SCHEDULED,
                 logical_date=begin, data_interval=(begin, finish), run_after=finish, state=DagRunState.RUNNING,
                 triggered_by=DagRunTriggeredByType.TIMETABLE)
    out = {}
    for task in dag.tasks:
        ti = TaskInstance(scheduler_dag.get_task(task.task_id), run_id=run.run_id, dag_version_id=uuid.uuid4())
        ti.dag_run = run
        context = _get_template_context(ti, task)
        task.render_template_fields(context)
        out[task.task_id] = {name: getattr(context["task"], name) for name in task.template_fields}
    return out


def exit_codes() -> dict:
    """The operator's execute() over real child processes (a job's last stderr line first)."""
    sys.path.insert(0, str(DAGS))
    from towerlake_ops import TowerlakeJobOperator

    class Scripted(TowerlakeJobOperator):
        def __init__(self, *, code: int, **kwargs):
            super().__init__(job="demo", **kwargs)
            self.code = code

        def command(self):
            python = Path(sys.executable)
            script = ("import os, sys; print('working'); print('Traceback: noise', file=sys.stderr); "
                      f"print('error: demo: reason for {self.code}', file=sys.stderr); "
                      "print('INFO ShutdownHookManager: Shutdown hook called', file=sys.stderr); sys.stderr.flush(); "
                      + (f"os.kill(os.getpid(), {-self.code})" if self.code < 0 else f"sys.exit({self.code})"))
            return [str(python), "-c", script], Path.cwd(), python

    results = {}
    for code in (0, 99, 2, 1, -9):
        try:
            Scripted(code=code, task_id=f"exit_{code}".replace("-", "m")).execute({})
            results[str(code)] = ["success", ""]
        except BaseException as err:  # the state the task would end in is the exception's class
            results[str(code)] = [type(err).__name__, str(err)]
    return results


def states(dag_id: str) -> dict:
    """The newest run of ``dag_id``: its state and every task instance's state, tries,
    start/end and duration (seconds)."""
    from airflow.models.dagrun import DagRun
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session

    with create_session() as session:
        run = session.query(DagRun).filter(DagRun.dag_id == dag_id).order_by(DagRun.id.desc()).first()
        if run is None:
            return {"run_id": None, "state": None, "tasks": {}}
        rows = session.query(TaskInstance).filter(TaskInstance.dag_id == dag_id,
                                                  TaskInstance.run_id == run.run_id).all()
        return {
            "run_id": run.run_id, "state": str(run.state), "data_interval_start": run.data_interval_start,
            "tasks": {ti.task_id: {"state": str(ti.state) if ti.state else None, "try_number": ti.try_number,
                                   "start": ti.start_date, "end": ti.end_date, "duration": ti.duration}
                      for ti in rows},
        }


if __name__ == "__main__":
    command, *rest = sys.argv[1:]
    result = {"dagbag": dagbag, "render": render, "exit-codes": exit_codes, "states": states}[command](*rest)
    sys.stdout.flush()
    print(json.dumps(result, default=str))
