"""Running batchrun jobs from Airflow 3, two ways, each task its own job.

`batchrun_cli` runs the CLI. Its exit code fails the task when rows failed (1, unless
within the spec's `max_failed_share`) or the run stopped early (3): Airflow retries the
task, and the retry resumes the job where it stopped, requesting only rows not yet
answered. On a task timeout or a manual stop Airflow sends SIGTERM: batchrun saves every
answer received and exits 3. Its last line of output is the job's status as one line of
JSON (`batchrun status --json`), which the BashOperator pushes to XCom.

`batchrun_python` calls the library: `run_batch` runs the job and returns its status
(the same JSON as the status file beside the output), which the PythonOperator pushes to
XCom; a stopped run raises, so Airflow retries it.

`batchrun_shard` runs one job as two mapped tasks (`expand`), each a shard of its rows
with its own state; the one that finishes last merges their parts into the output. The
same works with Kubernetes indexed jobs or any N processes: `batchrun run JOB --shard I/N`.

For a `@daily` job whose input changes every day, give each run its own output (and so
its own state), as `batchrun_python` does with `{{ ds }}`: a retry of the same day
resumes, the next day starts afresh. Without that, the new day's input would be refused as a
change of input (exit 2) rather than mixed with yesterday's answers.
"""

from __future__ import annotations

import os
from datetime import datetime, timedelta

# Where batchrun and the jobs live (CI points these at a checkout and its mock jobs)
HOME = os.environ.get("BATCHRUN_HOME", "/srv/batchrun")
CLI_JOB = os.environ.get("BATCHRUN_CLI_JOB", f"{HOME}/jobs/example.yaml")
LIBRARY_JOB = os.environ.get("BATCHRUN_LIBRARY_JOB", f"{HOME}/jobs/fireworks-chat.yaml")
BATCHRUN = os.environ.get("BATCHRUN_BIN", f"{HOME}/.venv/bin/batchrun")
OUT = os.environ.get("BATCHRUN_OUT", f"{HOME}/out")


def run_batch(job: str = LIBRARY_JOB, output: str | None = None, shard: str | None = None) -> dict:
    """The PythonOperator's callable: run (or resume) the job, or its shard `I/N`; its
    status (every shard's, for a sharded job) goes to XCom."""
    import batchrun

    spec = batchrun.load_spec(job)
    if output is not None:  # a per-run output path (and with it, a per-run state)
        import dataclasses
        from pathlib import Path

        spec = dataclasses.replace(spec, output=Path(output))
    try:
        batchrun.run_job(spec, shard=batchrun.Shard.parse(shard) if shard else None)
    except batchrun.JobAborted:
        raise  # every answer is saved; Airflow's retry resumes the job
    status = batchrun.job_status(spec)
    if shard:  # this task's own shard decides its outcome
        status = next(s for s in status["shards"] if s["shard"] == str(batchrun.Shard.parse(shard)))
    if status["exit_code"] not in (0, None):
        raise RuntimeError(f"{status['failed']} rows failed: see {status['output']}")
    return status


try:  # the callables above stay importable (and tested) without Airflow
    from airflow.providers.standard.operators.bash import BashOperator
    from airflow.providers.standard.operators.python import PythonOperator
    from airflow.sdk import DAG
except ImportError:  # pragma: no cover - Airflow is not a batchrun dependency
    DAG = None

if DAG is not None:
    with DAG(
        dag_id="batchrun_example",
        start_date=datetime(2026, 1, 1),
        schedule="@daily",
        catchup=False,
        default_args={"retries": 3, "retry_delay": timedelta(minutes=5)},
    ) as dag:
        batchrun_cli = BashOperator(
            task_id="batchrun_cli",
            # the run's own lines go to the log; the status JSON is the last line, for XCom
            bash_command=(f"{BATCHRUN} run {CLI_JOB} --no-progress >&2; code=$?; "
                          f"{BATCHRUN} status {CLI_JOB} --json; exit $code"),
            do_xcom_push=True,
            execution_timeout=timedelta(hours=12),
        )
        batchrun_python = PythonOperator(
            task_id="batchrun_python",
            python_callable=run_batch,
            # one output (and state) per day: a retry of the day resumes, the next day starts afresh
            op_kwargs={"job": LIBRARY_JOB, "output": f"{OUT}/library-{{{{ ds }}}}.parquet"},
        )
        batchrun_shard = PythonOperator.partial(task_id="batchrun_shard", python_callable=run_batch).expand(
            op_kwargs=[{"job": LIBRARY_JOB, "output": f"{OUT}/sharded-{{{{ ds }}}}.parquet", "shard": f"{i}/2"}
                       for i in range(2)],
        )
