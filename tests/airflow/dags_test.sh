#!/usr/bin/env bash
# Runs examples/airflow_dag.py under Airflow 3 with `airflow dags test`, in an environment
# of its own (Airflow is no batchrun dependency: 477 MB, kept out of the README's test
# command). Every task runs a job on batchrun's mock endpoint; the checks below read what
# Airflow logged and stored and what the jobs wrote. Then examples/airflow_batch_dag.py,
# its job sent to fakes of OpenAI's Batch API and live API (fake_batch_api.py). Then
# kill_test.py stops a task under `airflow tasks test` with SIGTERM, as Airflow's
# supervisor does, and reruns it.
# Called by .ci/run.
set -euo pipefail
cd "$(dirname "$0")/../.."
REPO=$PWD
VENV=$REPO/.venv-airflow
[ -x "$VENV/bin/airflow" ] || { python3 -m venv "$VENV" && "$VENV/bin/pip" install -q "apache-airflow==3.3.2"; }
"$VENV/bin/pip" install -q -e "$REPO"

WORK=$(mktemp -d)
FAKES=
cleanup() {
    [ -z "$FAKES" ] || kill "$FAKES" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT
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

# The batch DAG. Its tasks are processes of their own, so the fakes are one too; a batch
# ends at its third poll: `submit` polls the batch it made, the sensor's first poke finds
# it still out, its second collects it.
"$VENV/bin/python" tests/airflow/fake_batch_api.py "$WORK/fakes.json" "$WORK/fakes-report.json" 3 \
    >"$WORK/fakes.log" 2>&1 &
FAKES=$!
for _ in $(seq 100); do [ -f "$WORK/fakes.json" ] && break; sleep 0.1; done
[ -f "$WORK/fakes.json" ] \
    || { cat "$WORK/fakes.log" >&2; echo "airflow dags test: the fake APIs did not start" >&2; exit 1; }
read -r batch_url live_url key < <("$VENV/bin/python" -c \
    'import json, sys; f = json.load(open(sys.argv[1])); print(f["batch_url"], f["live_url"], f["api_key"])' \
    "$WORK/fakes.json")
BATCHRUN_BATCH_JOB=$REPO/jobs/batch-example.yaml BATCHRUN_POKE_S=2 OPENAI_API_KEY=$key \
    BATCHRUN_BATCH_API_URL=$batch_url BATCHRUN_API_URL=$live_url \
    "$VENV/bin/airflow" dags test batchrun_batch_example >"$WORK/batch.log" 2>&1 \
    || { tail -50 "$WORK/batch.log"; exit 1; }
kill "$FAKES" && wait "$FAKES" && FAKES=  # it writes its report on the way out

batch_fail() { echo "airflow dags test: $1" >&2; tail -40 "$WORK/batch.log" >&2; exit 1; }
grep -q "DagRun Finished: dag_id=batchrun_batch_example.*state=success" "$WORK/batch.log" \
    || batch_fail "the batch DAG run did not succeed"
"$VENV/bin/python" - "$AIRFLOW_HOME/airflow.db" "$WORK/out" "$WORK/fakes-report.json" <<'PY' \
    || batch_fail "submit, poke, collect did not go as they should"
import json, sqlite3, sys
from pathlib import Path
import pyarrow.parquet as pq
db_path, out, report = sys.argv[1], Path(sys.argv[2]), json.loads(Path(sys.argv[3]).read_text())
with sqlite3.connect(db_path) as db:
    pushed = {task: json.loads(value) for task, value in db.execute(
        "SELECT task_id, value FROM xcom WHERE dag_id = 'batchrun_batch_example' AND key = 'return_value'")}
    # every poke but the last leaves a reschedule behind: at least two pokes, the first too early
    tries = dict(db.execute("SELECT task_id, try_number FROM task_instance WHERE dag_id = 'batchrun_batch_example'"))
    (rescheduled,) = db.execute(
        "SELECT count(*) FROM task_reschedule r JOIN task_instance t ON r.ti_id = t.id "
        "WHERE t.dag_id = 'batchrun_batch_example' AND t.task_id = 'wait_for_batches'").fetchone()
assert sorted(pushed) == ["collect", "submit", "wait_for_batches"], pushed
assert set(tries.values()) == {1}, f"a task needed a retry: {tries}"  # pokes are one try
submitted, waited, collected = pushed["submit"], pushed["wait_for_batches"], pushed["collect"]
assert submitted["state"] == "submitted" and [b["state"] for b in submitted["batches"]] == ["validating"], submitted
assert rescheduled >= 1, f"the sensor was done at its first poke ({rescheduled} reschedules)"
assert waited["state"] != "submitted" and "batches" not in waited and waited["ok"] == 20, waited
finished = (collected["state"], collected["exit_code"], collected["ok"], collected["failed"])
assert finished == ("finished", 0, 20, 0), collected
(day,) = [p for p in out.iterdir() if p.name.startswith("batch-")]  # one output a day
rows = pq.read_table(day / "batch-answers.parquet").to_pylist()
assert [r["row_index"] for r in rows] == list(range(20)), rows
assert all((r["status"], r["backend"]) == ("ok", "batch") for r in rows), rows
# one batch of every row, polled by submit and the two pokes; nothing went live, no row sent twice
assert [(b["rows"], b["polls"], b["state"]) for b in report["batches"]] == [(20, 3, "completed")], report
assert report["live_requests"] == 0 and report["in_two_batches"] == [], report
print(f"airflow dags test: batchrun_batch_example: submit, {rescheduled + 1} pokes (rescheduled between them), "
      f"collect; 20 rows answered by one batch, none live; the finished status in collect's XCom")
PY
"$VENV/bin/python" tests/airflow/kill_test.py "$WORK/kill" "$VENV/bin/airflow"
