#!/usr/bin/env bash
# Runs examples/airflow_dag.py under Airflow 3 with `airflow dags test`, in an environment
# of its own (Airflow is no batchrun dependency: 477 MB, kept out of the README's test
# command). Every task runs a job on batchrun's mock endpoint; the checks below read what
# Airflow logged and stored and what the jobs wrote. Then kill_test.py stops a task under
# `airflow tasks test` with SIGTERM, as Airflow's supervisor does, and reruns it.
# Called by .ci/run.
set -euo pipefail
cd "$(dirname "$0")/../.."
REPO=$PWD
VENV=$REPO/.venv-airflow
[ -x "$VENV/bin/airflow" ] || { python3 -m venv "$VENV" && "$VENV/bin/pip" install -q "apache-airflow==3.3.2"; }
"$VENV/bin/pip" install -q -e "$REPO"

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
export AIRFLOW_HOME=$WORK/airflow AIRFLOW__CORE__DAGS_FOLDER=$REPO/examples AIRFLOW__CORE__LOAD_EXAMPLES=False
export BATCHRUN_HOME=$REPO BATCHRUN_BIN=$VENV/bin/batchrun BATCHRUN_OUT=$WORK/out
export BATCHRUN_CLI_JOB=$REPO/jobs/example.yaml BATCHRUN_LIBRARY_JOB=$REPO/jobs/template-example.yaml
"$VENV/bin/airflow" db migrate >"$WORK/migrate.log" 2>&1 || { cat "$WORK/migrate.log"; exit 1; }
"$VENV/bin/airflow" dags test batchrun_example >"$WORK/test.log" 2>&1 || { tail -50 "$WORK/test.log"; exit 1; }

fail() { echo "airflow dags test: $1" >&2; tail -40 "$WORK/test.log" >&2; exit 1; }
grep -q "DagRun Finished: dag_id=batchrun_example.*state=success" "$WORK/test.log" || fail "the DAG run did not succeed"
[ "$(grep -c 'Pushing xcom' "$WORK/test.log")" -eq 4 ] || fail "expected all four tasks to push their status to XCom"
"$VENV/bin/python" - "$AIRFLOW_HOME/airflow.db" <<'PY' || fail "a task's XCom is not its job's finished status, as a dict"
import json, sqlite3, sys
with sqlite3.connect(sys.argv[1]) as db:
    pushed = {(task, index): json.loads(value) for task, index, value in db.execute(
        "SELECT task_id, map_index, value FROM xcom WHERE dag_id = 'batchrun_example' AND key = 'return_value'")}
assert sorted(pushed) == [("batchrun_cli", -1), ("batchrun_operator", -1), ("batchrun_shard", 0), ("batchrun_shard", 1)]
# the CLI's line too, through output_processor=json.loads: what a downstream task pulls is a dict
assert all(isinstance(s, dict) and (s["state"], s["exit_code"]) == ("finished", 0) for s in pushed.values()), pushed
assert pushed["batchrun_operator", -1]["ok"] == 10 and pushed["batchrun_cli", -1]["ok"] == 20, pushed
assert [pushed["batchrun_shard", i]["shard"] for i in (0, 1)] == ["0/2", "1/2"], pushed
PY
day=$(ls "$WORK/out" | sed -n 's/^library-\(.*\)\.parquet$/\1/p')
[ -n "$day" ] || fail "no per-day output in $WORK/out"
"$VENV/bin/python" - "$WORK/out/library-$day.parquet" <<'PY' || fail "the library task's output is not the job's"
import sys
import pyarrow.parquet as pq
rows = pq.read_table(sys.argv[1]).to_pylist()
assert len(rows) == 10 and all(r["status"] == "ok" for r in rows), rows
PY
"$VENV/bin/python" - "$WORK/out/sharded-$day.parquet" <<'PY' || fail "the two mapped shards did not merge the job's output"
import sys
import pyarrow.parquet as pq
rows = pq.read_table(sys.argv[1]).to_pylist()
assert [r["row_index"] for r in rows] == list(range(10)) and all(r["status"] == "ok" for r in rows), rows
PY
echo "airflow dags test: batchrun_example ran under Airflow 3.3.2; all four tasks (two of them mapped shards) pushed their status to XCom"
"$VENV/bin/python" tests/airflow/kill_test.py "$WORK/kill" "$VENV/bin/airflow"
