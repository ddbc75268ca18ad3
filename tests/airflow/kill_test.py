"""SIGTERM to a task under `airflow tasks test`, as Airflow's supervisor sends it when a
task is marked failed or its pod stopped. The BatchrunOperator's job stops with every
answer received saved and pushes its status; a rerun finishes it with every row exactly
once and no row requested (and paid for) twice.

Run by dags_test.sh with its Airflow environment's Python, after `airflow dags test` has
put the example DAG in the metadata database: kill_test.py WORK AIRFLOW_BIN
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.fakeserver import FakeServer, Faults  # noqa: E402

ROWS = 60
RUN_ID = "kill_test"
TASK = "batchrun_operator"


def main(work: Path, airflow: str) -> None:
    work.mkdir(parents=True)
    (work / "input.jsonl").write_text("".join(json.dumps({"prompt": f"p{i}"}) + "\n" for i in range(ROWS)))
    # About 5 s of work: long enough to stop halfway, every request short enough for the grace
    with FakeServer(Faults(latency_s=0.3, latency_jitter_s=0.1)) as server:
        spec = {"input": "input.jsonl", "output": "out/unused.parquet", "model": "test-model", "concurrency": 4,
                "api": {"base_url": server.base_url, "api_key_env": "KILL_TEST_KEY"}}
        (work / "job.yaml").write_text(json.dumps(spec))  # JSON is YAML
        env = {**os.environ, "BATCHRUN_LIBRARY_JOB": str(work / "job.yaml"), "BATCHRUN_OUT": str(work / "out"),
               "KILL_TEST_KEY": "not-a-real-key"}
        # A run of our own, so that the XCom outlives `airflow tasks test`
        subprocess.run([airflow, "dags", "trigger", "batchrun_example", "--run-id", RUN_ID,
                        "--logical-date", "2026-01-02T00:00:00+00:00"],
                       env=env, check=True, stdout=subprocess.DEVNULL)
        output = work / "out" / "library-2026-01-02.parquet"
        state = output.with_name("library-2026-01-02.batchrun.sqlite")
        command = [airflow, "tasks", "test", "batchrun_example", TASK, RUN_ID]

        with open(work / "killed.log", "w") as log:
            task = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
            server.wait_for_requests(12, timeout=180)  # the pool is open, requests are in flight
            task.send_signal(signal.SIGTERM)
            task.wait(timeout=120)
        killed = (work / "killed.log").read_text()
        check("interrupted by SIGTERM: Airflow stopped the task" in killed, "on_kill did not stop the job", killed)
        stopped = xcom()
        answered = {key for key, bodies in server.answers.items() if bodies}
        saved = attempts(state)
        check((stopped.get("state"), stopped.get("exit_code")) == ("stopped", 3),
              f"the killed task pushed no stopped status: {stopped}", killed)
        check(0 < len(saved) == stopped["ok"] < ROWS, f"not stopped halfway: {len(saved)} of {ROWS} saved", killed)
        check(answered == {f"p{i}" for i in saved},
              f"answers lost: {len(answered)} answered, {len(saved)} saved", killed)

        with open(work / "rerun.log", "w") as log:
            subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=300, check=True)
        rerun = (work / "rerun.log").read_text()
        finished = xcom()
        check((finished.get("state"), finished.get("exit_code"), finished.get("ok")) == ("finished", 0, ROWS),
              f"the rerun did not finish the job: {finished}", rerun)
        rows = pq.read_table(output).to_pylist()
        check([r["row_index"] for r in rows] == list(range(ROWS)) and all(r["status"] == "ok" for r in rows),
              "the output does not hold every row exactly once", rerun)
        twice = [i for i in range(ROWS) if server.count(f"p{i}") != 1]
        check(not twice, f"rows requested twice or never: {twice}", rerun)
        check(set(attempts(state).values()) == {1}, "the state counts a row paid for twice", rerun)
    print(f"airflow tasks test: SIGTERM stopped {TASK} with {len(saved)} of {ROWS} rows saved and every answer "
          f"received among them; its status went to XCom; the rerun finished with every row requested once")


def xcom() -> dict:
    """The task's XCom, as a downstream task reads it."""
    with sqlite3.connect(Path(os.environ["AIRFLOW_HOME"]) / "airflow.db") as db:
        found = db.execute("SELECT value FROM xcom WHERE run_id = ? AND task_id = ? AND key = 'return_value'",
                           (RUN_ID, TASK)).fetchall()
    return json.loads(found[0][0]) if found else {}


def attempts(state: Path) -> dict[int, int]:
    """row_index -> requests paid for it, as the state holds them."""
    with sqlite3.connect(f"file:{state}?mode=ro", uri=True) as db:
        return dict(db.execute("SELECT row_index, attempts FROM results"))


def check(ok: bool, message: str, log: str) -> None:
    if not ok:
        print("\n".join(log.splitlines()[-40:]), file=sys.stderr)
        sys.exit(f"airflow tasks test: {message}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
