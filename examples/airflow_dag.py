"""Running batchrun jobs from Airflow 3, each task its own job.

`batchrun_operator` runs a job with `batchrun.airflow.BatchrunOperator` and pushes its
status to XCom: the JSON of `batchrun status JOB --json`, as a dict
(`ti.xcom_pull(task_ids="batchrun_operator")["ok"]`). The task fails when rows failed
(beyond the spec's `max_failed_share`) or the run stopped early, and pushes its status
all the same, for a downstream task with `trigger_rule="all_done"`. Airflow retries the
task and the retry resumes the job, requesting only rows not yet answered. When Airflow
stops the task (marked failed or cleared, its pod stopped) it sends SIGTERM and calls
the operator's `on_kill`, which stops the job as SIGTERM stops the CLI: no new row
starts, requests in flight get their grace, every answer received is saved. An
`execution_timeout` stops it the same way.

`batchrun_shard` runs one job as two mapped tasks (`expand(shard=...)`), each a shard of
its rows with its own state; the one that finishes last merges their parts into the
output. The same works with Kubernetes indexed jobs or any N processes:
`batchrun run JOB --shard I/N`.

`batchrun_cli` runs the CLI in a BashOperator, for a batchrun installed apart from
Airflow (a virtualenv of its own). Exit 1 or 3 fails the task. On SIGTERM the
BashOperator sends SIGTERM to the command's process group, and batchrun stops as above
(exit 3). The command's last line is the job's status; `output_processor=json.loads`
makes it the dict XCom holds. A BashOperator whose command fails pushes nothing: there,
read the status file beside the output (or `batchrun status JOB --json`).

For a `@daily` job whose input changes every day, give each run its own output (and so
its own state), as `batchrun_operator` does with `{{ ds }}`: a retry of the same day
resumes, the next day starts afresh. Without that, the new day's input would be refused
as a change of input (exit 2) rather than mixed with yesterday's answers.
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timedelta

from airflow.providers.standard.operators.bash import BashOperator
from airflow.sdk import DAG

from batchrun.airflow import BatchrunOperator

# Where batchrun and the jobs live (CI points these at a checkout and its mock jobs)
HOME = os.environ.get("BATCHRUN_HOME", "/srv/batchrun")
CLI_JOB = os.environ.get("BATCHRUN_CLI_JOB", f"{HOME}/jobs/example.yaml")
LIBRARY_JOB = os.environ.get("BATCHRUN_LIBRARY_JOB", f"{HOME}/jobs/fireworks-chat.yaml")
BATCHRUN = os.environ.get("BATCHRUN_BIN", f"{HOME}/.venv/bin/batchrun")
OUT = os.environ.get("BATCHRUN_OUT", f"{HOME}/out")

with DAG(
    dag_id="batchrun_example",
    start_date=datetime(2026, 1, 1),
    schedule="@daily",
    catchup=False,
    default_args={"retries": 3, "retry_delay": timedelta(minutes=5)},
) as dag:
    batchrun_operator = BatchrunOperator(
        task_id="batchrun_operator",
        job=LIBRARY_JOB,
        # one output (and state) per day: a retry of the day resumes, the next day starts afresh
        output_path=f"{OUT}/library-{{{{ ds }}}}.parquet",
        execution_timeout=timedelta(hours=12),
    )
    batchrun_shard = BatchrunOperator.partial(
        task_id="batchrun_shard", job=LIBRARY_JOB, output_path=f"{OUT}/sharded-{{{{ ds }}}}.parquet",
    ).expand(shard=["0/2", "1/2"])
    batchrun_cli = BashOperator(
        task_id="batchrun_cli",
        # the run's own lines go to the log; the status JSON is the last line, for XCom
        bash_command=(f"{BATCHRUN} run {CLI_JOB} --no-progress >&2; code=$?; "
                      f"{BATCHRUN} status {CLI_JOB} --json; exit $code"),
        output_processor=json.loads,
        execution_timeout=timedelta(hours=12),
    )
