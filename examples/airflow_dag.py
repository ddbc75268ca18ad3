"""Running a batchrun job from Airflow, two ways.

`batchrun_cli` runs the CLI: its exit code fails the task when rows failed (1) or the
run stopped early (3), Airflow retries the task, and the retry resumes the job where it
stopped, requesting only rows not yet answered. On a task timeout or a manual stop
Airflow sends SIGTERM: batchrun saves every answer received and exits 3.

`batchrun_python` calls the library: `run_job` returns a Summary (raising on a bad
spec or an aborted run), so the task can push numbers to XCom.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow import DAG
from airflow.operators.bash import BashOperator
from airflow.operators.python import PythonOperator

CLI_JOB = "/srv/batchrun/jobs/example.yaml"
LIBRARY_JOB = "/srv/batchrun/jobs/fireworks-chat.yaml"


def run_batch() -> dict:
    import batchrun

    summary = batchrun.run_job(LIBRARY_JOB)
    if summary.failed:
        raise RuntimeError(f"{summary.failed} rows failed: {summary.line()}")
    return {"rows": summary.rows, "total_tokens": summary.total_tokens, "output": str(summary.output)}


with DAG(
    dag_id="batchrun_example",
    start_date=datetime(2026, 1, 1),
    schedule="@daily",
    catchup=False,
    default_args={"retries": 3, "retry_delay": timedelta(minutes=5)},
) as dag:
    batchrun_cli = BashOperator(
        task_id="batchrun_cli",
        bash_command=f"/srv/batchrun/.venv/bin/batchrun run {CLI_JOB} --no-progress",
        execution_timeout=timedelta(hours=12),
    )
    batchrun_python = PythonOperator(task_id="batchrun_python", python_callable=run_batch)
