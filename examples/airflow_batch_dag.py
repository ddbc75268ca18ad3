"""A batchrun job through the provider's batch API from Airflow 3, holding no worker while
the batches are out (up to 24 h):

    submit ──▶ wait_for_batches (a sensor in reschedule mode) ──▶ collect

`submit` runs `batchrun submit JOB`, which uploads the rows, creates the batches and exits
at once; it pushes the job's status (`state: "submitted"`, the batch ids) to XCom.
`wait_for_batches` pokes every 10 minutes and between pokes gives its worker slot back
(`mode="reschedule"`); it is done when no batch is out, and pushes the status then.
`collect` runs `batchrun run JOB`: every batch is in by then, so it sends live only what
the batches did not answer (expired, cancelled, failed whole), writes the output and
pushes the finished status, as `batchrun_cli` does in airflow_dag.py.

Every task runs the CLI, for a batchrun installed apart from Airflow. Each is safe to
retry: a rerun of `submit` (or of the sensor's poke) picks up the batches already out and
never sends a row twice. The job's spec reads `${BATCHRUN_OUT}` for its output, and every
task sets it per day, so each day's run has its own output and state.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
from datetime import datetime, timedelta

from airflow.providers.standard.operators.bash import BashOperator
from airflow.sdk import DAG, PokeReturnValue, task

# Where batchrun and the job live (CI points these at a checkout and fakes of the APIs)
HOME = os.environ.get("BATCHRUN_HOME", "/srv/batchrun")
JOB = os.environ.get("BATCHRUN_BATCH_JOB", f"{HOME}/jobs/batch-example.yaml")
BATCHRUN = os.environ.get("BATCHRUN_BIN", f"{HOME}/.venv/bin/batchrun")
OUT = os.environ.get("BATCHRUN_OUT", f"{HOME}/out")
# Batches take hours; a poke a minute would only cost API calls. CI sets a few seconds.
POKE_S = float(os.environ.get("BATCHRUN_POKE_S", 600))
DAY_OUT = f"{OUT}/batch-{{{{ ds }}}}"  # the spec's ${BATCHRUN_OUT}: one output (and state) per day

log = logging.getLogger(__name__)


def _batchrun(*args: str, out: str) -> str:
    """Run the CLI with the day's output; its stdout, after its lines went to the task's log."""
    done = subprocess.run([BATCHRUN, *args], env={**os.environ, "BATCHRUN_OUT": out},
                          capture_output=True, text=True, check=False)
    for line in (done.stderr + done.stdout).splitlines():
        log.info("%s", line)
    if done.returncode != 0:  # the task fails; Airflow's retry pokes again, nothing is sent twice
        raise RuntimeError(f"batchrun {args[0]} exited {done.returncode}; its lines above say why")
    return done.stdout


with DAG(
    dag_id="batchrun_batch_example",
    start_date=datetime(2026, 1, 1),
    schedule="@daily",
    catchup=False,
    default_args={"retries": 3, "retry_delay": timedelta(minutes=5)},
) as dag:
    submit = BashOperator(
        task_id="submit",
        # the command's own line goes to the log; the status JSON is the last line, for XCom
        bash_command=f"{BATCHRUN} submit {JOB} >&2; code=$?; {BATCHRUN} status {JOB} --json; exit $code",
        env={"BATCHRUN_OUT": DAY_OUT},
        append_env=True,
        output_processor=json.loads,
    )

    # Past max_wait_h (24 h in the spec) a poke cancels what is still out, and a cancelled
    # batch ends soon after: the sensor gives up only a little later than that.
    @task.sensor(poke_interval=POKE_S, timeout=timedelta(hours=26).total_seconds(), mode="reschedule")
    def wait_for_batches(ds: str | None = None) -> PokeReturnValue:
        out = f"{OUT}/batch-{ds}"
        # `submit` again, not `status` alone: status only reads the job's state, and the state
        # learns that a batch ended only when a command asks the provider. `submit` asks after
        # every batch out, stores the answers of those that ended (and cancels any past
        # max_wait_h), and sends no row that is already in a batch.
        _batchrun("submit", JOB, out=out)
        status = json.loads(_batchrun("status", JOB, "--json", out=out))
        for batch in status.get("batches", []):
            log.info("batch %s: %s, %s", batch["id"], batch["state"], batch["counts"])
        return PokeReturnValue(is_done=status["state"] != "submitted", xcom_value=status)

    collect = BashOperator(
        task_id="collect",
        bash_command=(f"{BATCHRUN} run {JOB} --no-progress >&2; code=$?; "
                      f"{BATCHRUN} status {JOB} --json; exit $code"),
        env={"BATCHRUN_OUT": DAY_OUT},
        append_env=True,
        output_processor=json.loads,
        execution_timeout=timedelta(hours=12),  # what goes live: rows the batches did not answer
    )

    submit >> wait_for_batches() >> collect
