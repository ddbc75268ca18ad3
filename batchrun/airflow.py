"""Airflow 3: a job as one task, which Airflow's SIGTERM stops as it stops the CLI.

    execute ──▶ run_job (its event loop in a thread of its own) ──▶ the job's status ──▶ XCom
    SIGTERM ──▶ Airflow's handler calls on_kill ──▶ Interrupted, raised into run_job's wait:
                no new row starts, requests in flight get their grace, every answer is saved

Airflow's task runner answers SIGTERM (a task marked failed or cleared, a pod stopped)
only by calling the operator's `on_kill` from its signal handler, in the thread that runs
`execute`. A PythonOperator calling `run_job` has nothing there: the job goes on sending
requests until the supervisor's SIGKILL, and the answers then in flight are paid for and
lost. Raised from the handler, an exception interrupts `run_job` the way any exception
raised into its caller's thread does (`engine.bridge.run_beside`).

Importing this module imports Airflow; `import batchrun` never does.
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path
from typing import Any

import yaml
from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowException

from ._exceptions import BatchrunError, ConfigError, Interrupted, UsageError
from .backends import run_job
from .backends.layout import Shard
from .engine.progress import LogProgress
from .engine.summary import Summary
from .spec.parse import JobSpec, load_spec, parse_spec
from .tools.status import job_status

__all__ = ["BatchrunOperator"]

XCOM_KEY = "return_value"  # where Airflow puts what execute returns: one key, run ok or not
AIRFLOW_GRACE_S = 4.0  # Airflow's supervisor sends SIGKILL 5 s after SIGTERM


class BatchrunOperator(BaseOperator):
    """Run (or resume) a batchrun job, or its shard `I/N`; the job's status goes to XCom.

        BatchrunOperator(task_id="answers", job="/srv/batchrun/jobs/x.yaml",
                         output_path="/srv/batchrun/out/x-{{ ds }}.parquet")

    `output_path` replaces the spec's `output` (and is resolved as it is), and with it the
    state: a retry of the same day resumes, the next day starts afresh. (`output` is
    Airflow's name for a task's XCom.) `job`, `output_path` and `shard` are templated;
    `.partial(...).expand(shard=["0/2", "1/2"])` runs a job as mapped shards.

    `submit=True`, for a spec with `batch_api:`: send the rows to the provider's batch API
    and return at once (state "submitted"), as `batchrun submit` does, so that no worker is
    held for the day the provider may take; a sensor then waits for the batches and a
    task without it collects them (examples/airflow_batch_dag.py).

    The status is the JSON of `batchrun status JOB --json` (a shard's own, for a shard).
    The task fails when rows failed beyond the spec's `max_failed_share` or the job
    stopped early (SIGTERM, execution_timeout, budget, bad key...), and then pushes the
    status first, for a downstream task with `trigger_rule="all_done"`. A job refused
    before any request (a bad spec, key, input or state, or already running: exit 2 in
    the CLI) fails with batchrun's message and pushes nothing: no run, no status of its own.
    """

    template_fields = ("job", "output_path", "shard")

    def __init__(self, *, job: str, output_path: str | None = None, shard: str | None = None, submit: bool = False,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.job = job
        self.output_path = output_path
        self.shard = shard
        self.submit = submit
        self._running_in: int | None = None  # the thread inside run_job, which on_kill stops

    def execute(self, context: Any) -> dict[str, Any]:
        spec = self._spec()
        shard = self._shard()
        try:
            summary = self._run(spec, shard)
        except UsageError:  # refused before any request: no run, so no status of its own
            raise
        except BaseException:  # stopped early; Airflow's AirflowTaskTimeout is a BaseException too
            self._push_status(context, spec, shard)
            raise
        self.log.info("%s", summary.line())
        if summary.exit_code != 0:
            self._push_status(context, spec, shard)
            raise AirflowException(f"{summary.line()}; the output's error column says why rows failed")
        return _status(spec, shard)

    def on_kill(self) -> None:
        """Stop the job as SIGTERM stops the CLI; exit 3, a retry resumes.

        Airflow calls this from its SIGTERM handler, in the thread running `execute`: the
        exception goes from there into `run_job`'s wait. Called at any other time (after
        an execution_timeout, the job already stopped) there is nothing to stop.
        """
        if self._running_in == threading.get_ident():
            raise Interrupted("interrupted by SIGTERM: Airflow stopped the task")

    def _run(self, spec: JobSpec, shard: Shard | None) -> Summary:
        self._running_in = threading.get_ident()
        try:
            # a line every 5 s in the task's log, as the CLI writes when not on a terminal
            # Airflow kills a task 5 s after its SIGTERM: answers in flight get 4 s to come home
            if self.submit and spec.batch_api is None:
                raise ConfigError(f"{self.task_id}: submit=True sends a job's rows to the provider's batch API, and "
                                  f"{spec.name} has no batch_api: section; add one, or drop submit")
            return run_job(spec, shard=shard, progress=LogProgress(sys.stderr), grace_s=AIRFLOW_GRACE_S,
                           submit=self.submit)
        finally:
            self._running_in = None

    def _spec(self) -> JobSpec:
        spec = load_spec(self.job)  # the spec's own errors, as the CLI says them
        if self.output_path is None:
            return spec
        source = Path(self.job)
        raw = yaml.safe_load(source.read_text(encoding="utf-8"))
        return parse_spec({**raw, "output": self.output_path}, base_dir=source.parent, source=source)

    def _shard(self) -> Shard | None:
        if not self.shard:
            return None
        try:
            return Shard.parse(self.shard)
        except ValueError as exc:
            raise ConfigError(f"{self.task_id}: shard {exc}") from None

    def _push_status(self, context: Any, spec: JobSpec, shard: Shard | None) -> None:
        """On a failed run's way out: its status to XCom, never in place of its failure."""
        if not self.do_xcom_push:
            return
        try:
            status = _status(spec, shard)
        except (BatchrunError, OSError) as exc:
            self.log.warning("the job's status could not be read for XCom: %s", exc)
            return
        context["ti"].xcom_push(key=XCOM_KEY, value=status)


def _status(spec: JobSpec, shard: Shard | None) -> dict[str, Any]:
    """The job's status, or for a shard its own: that task's outcome is its shard's."""
    status = job_status(spec)
    if shard is None:
        return status
    for part in status["shards"]:
        if part["shard"] == str(shard):
            return part
    raise ConfigError(f"{spec.name}: shard {shard} has no state yet")
