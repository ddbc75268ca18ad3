"""Where a request's CPU goes: batchrun (or the bare aiohttp loop) under py-spy, by stage.

    .venv/bin/pip install py-spy
    python tests/bench/stages.py [--scenario zero|latency] [--client batchrun|bare] [--no-spy]
                                 [--rate 500] [--out DIR] [--summarize DIR/LABEL.json]

The same job as `run.py --scenario zero` (20,000 rows, 256 in flight, zero latency) or
`--scenario latency` (16,000 rows, 400 in flight, 200 +- 50 ms), against a fresh
server.py in its own process. The client runs under `py-spy record` from its first
instruction (start-up is part of the cost) and reports its own CPU (getrusage at exit,
every thread): each stage's µs per request is its share of the sampled stacks times the
measured CPU per request, so the stages add up to it. `--no-spy` runs the same job
without py-spy, for the CPU it costs unobserved (py-spy pauses it 500 times a second).

py-spy samples threads that are running or waiting for a core alike: on a loaded
machine the shares follow the time each stage held a runnable thread, which is its CPU
only while the load stays even. Run each measurement twice; compare within a run.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import subprocess
import sysconfig
import tempfile
from pathlib import Path

from run import HERE, PY, REPO, Server, child_env, compile_checkout, git_describe, job_spec, make_input, \
    source_fingerprint

SCENARIOS = {"zero": (20_000, 256, {}), "latency": (16_000, 400, {"latency_ms": 200, "jitter_ms": 50})}

# Runs the client, then writes its own CPU (all threads) to argv[1] as it exits.
MEASURED = """\
import atexit, json, resource, runpy, sys
out = sys.argv[1]
def dump():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    with open(out, "w") as f:
        json.dump({"cpu_s": usage.ru_utime + usage.ru_stime}, f)
atexit.register(dump)
if sys.argv[2] == "-m":
    sys.argv = [sys.argv[3], *sys.argv[4:]]
    runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
else:
    sys.argv = sys.argv[2:]
    sys.path.insert(0, str(__import__("pathlib").Path(sys.argv[0]).parent))
    runpy.run_path(sys.argv[0], run_name="__main__")
"""

# Stages: each frame is tried from the leaf towards the root, and the first that a rule
# matches decides; a weak rule (the event loop's and anyio's own frames, which sit under
# everything) decides only when no frame matches a strong one. A rule is (stage, path
# part, function names or None for any, weak).
RULES: list[tuple[str, str, frozenset[str] | None, bool]] = []


def rule(stage: str, path: str, *functions: str, weak: bool = False) -> None:
    RULES.append((stage, path, frozenset(functions) or None, weak))


# JSON in and out: encoding is the body's, decoding the answer's parse (reading the
# input is caught before these, by CONTEXT)
rule("body", "json/encoder.py")
rule("body", "json/__init__.py", "dumps")
rule("body", "aiohttp/payload.py", "JsonPayload")
rule("judge+parse", "json/decoder.py")
rule("judge+parse", "json/__init__.py", "loads")
rule("body", "batchrun/http/client.py", "request")
rule("body", "batchrun/endpoints/", "build_body")
rule("body", "batchrun/engine/call.py", "_price", "_cache_key")
rule("judge+parse", "batchrun/http/client.py", "_read")
rule("judge+parse", "batchrun/policy/verdict.py")
rule("judge+parse", "batchrun/endpoints/")
rule("pacing/gate", "batchrun/policy/rate.py")
rule("pacing/gate", "batchrun/policy/concurrency.py")
rule("pacing/gate", "batchrun/engine/holds.py")
rule("output", "batchrun/storage/output.py")
rule("output", "pyarrow/")
rule("hand-off+commit", "batchrun/storage/")
rule("hand-off+commit", "batchrun/engine/writer.py")
rule("hand-off+commit", "batchrun/engine/cache.py")
rule("hand-off+commit", "sqlite3/")
rule("send: httpx objects", "httpx/")
rule("send: transports", "batchrun/http/transport.py")
rule("send: transports", "batchrun/http/wire.py")
rule("send: transports", "batchrun/http/aio.py")
rule("send: transports", "httptools/")
rule("send: aiohttp", "aiohttp/")
rule("send: aiohttp", "multidict/")
rule("send: aiohttp", "yarl/")
rule("send: event loop I/O", "asyncio/selector_events.py")
rule("send: event loop I/O", "selectors.py")
rule("send: event loop I/O", "asyncio/sslproto.py")
rule("send: client.py rest", "batchrun/http/client.py")
rule("other: progress/status", "batchrun/engine/progress.py")
rule("other: progress/status", "batchrun/engine/status.py")
rule("other: progress/status", "batchrun/engine/watch.py")
rule("other: pool/call", "batchrun/engine/pool.py")
rule("other: pool/call", "batchrun/engine/call.py")
rule("other: input", "batchrun/inputs/")
rule("other: anyio", "anyio/", weak=True)
rule("other: asyncio", "asyncio/", weak=True)
rule("other: threads", "threading.py", weak=True)
rule("other: threads", "concurrent/futures/", weak=True)
# the bare loop's own lines (its JSON in and out are caught by the json rules above)
rule("other: pool/call", "bare_aiohttp.py", "worker")

# Checked first, against every frame of a stack: where a frame anywhere below decides
CONTEXT = [
    ("other: start-up", "<frozen importlib._bootstrap>", frozenset({"_find_and_load"})),
    ("other: input", "batchrun/inputs/", None),
    ("output", "batchrun/storage/output.py", None),  # it reads the committed rows back from the state
    ("other: input", "bare_aiohttp.py", frozenset({"<listcomp>"})),
]

FRAME = re.compile(r"^(?P<function>.*) \((?P<path>.*):(?P<line>\d+)\)$")
# The stages as reported: a line of its own, or a total over its parts (indented below it)
SEND = ("send: httpx objects", "send: transports", "send: aiohttp", "send: event loop I/O", "send: client.py rest")
OTHER = ("other: pool/call", "other: asyncio", "other: anyio", "other: threads", "other: input", "other: start-up",
         "other: progress/status", "other: rest")
REPORTED: list[tuple[str, tuple[str, ...]]] = [
    ("body (build + JSON encode)", ("body",)),
    ("pacing/gate (rate.py, concurrency.py, holds.py)", ("pacing/gate",)),
    ("send", SEND),
    ("  httpx Request/Response objects", ("send: httpx objects",)),
    ("  http/ transports (transport.py, wire.py, aio.py, httptools)", ("send: transports",)),
    ("  aiohttp (with multidict, yarl)", ("send: aiohttp",)),
    ("  event loop I/O (selector, socket, epoll)", ("send: event loop I/O",)),
    ("  http/client.py's own lines", ("send: client.py rest",)),
    ("judge + parse (verdict, JSON decode, Result)", ("judge+parse",)),
    ("hand-off + commit (writer, SQLite)", ("hand-off+commit",)),
    ("output (Parquet, the rows read back)", ("output",)),
    ("everything else", OTHER),
    ("  engine/pool.py, engine/call.py (bare: its worker)", ("other: pool/call",)),
    ("  asyncio and anyio scheduling, threads", ("other: asyncio", "other: anyio", "other: threads")),
    ("  input (rows read and checked)", ("other: input",)),
    ("  start-up (imports, before threading names the main thread)", ("other: start-up",)),
    ("  progress, status, the rest", ("other: progress/status", "other: rest")),
]


def stage_of(frames: list[str]) -> str:
    parsed = [(m["path"], m["function"].split(".")[-1]) for m in map(FRAME.match, reversed(frames)) if m]
    for stage, part, functions in CONTEXT:
        if any(part in path and (functions is None or function in functions) for path, function in parsed):
            return stage
    fallback = "other: rest"
    for path, function in parsed:
        for stage, part, functions, weak in RULES:
            if part in path and (functions is None or function in functions):
                if not weak:
                    return stage
                if fallback == "other: rest":
                    fallback = stage
                break
    return fallback


# A thread blocked on a lock that py-spy did not see as idle (anyio's worker thread
# waiting for work): not CPU, so left out.
BLOCKED = ("Condition.wait (", "threading.py:327)")


Stack = tuple[list[str], int, str]  # frames (root first), samples, thread name


def read_raw(path: Path) -> tuple[list[Stack], collections.Counter[str]]:
    """py-spy's raw format: one line per distinct stack, root first, then its count; and
    the samples by thread (its name as py-spy gives it, the blocked ones left out)."""
    stacks = []
    threads: collections.Counter[str] = collections.Counter()
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        if frames and all(part in frames[-1] for part in BLOCKED):
            continue
        thread = frames.pop(0) if frames and frames[0].startswith("thread (") else "?"
        name = thread.split(": ", 1)[-1] if ": " in thread else "unnamed"
        threads[name] += int(count)
        stacks.append((frames, int(count), name))
    return stacks, threads


def stage_of_stack(frames: list[str], thread: str) -> str:
    # A thread py-spy found no name for is the main thread before `threading` named it
    return "other: start-up" if thread == "unnamed" else stage_of(frames)


def split(stacks: list[Stack]) -> collections.Counter[str]:
    counts: collections.Counter[str] = collections.Counter()
    for frames, count, thread in stacks:
        counts[stage_of_stack(frames, thread)] += count
    return counts


def self_time(stacks: list[Stack]) -> tuple[collections.Counter[str], dict[str, str]]:
    """Samples by leaf frame, start-up left out (a cost per run, not per request); and
    the stage most of each leaf's samples belong to."""
    counts: collections.Counter[str] = collections.Counter()
    stages: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for frames, count, thread in stacks:
        stage = stage_of_stack(frames, thread)
        if frames and stage != "other: start-up":
            counts[frames[-1]] += count
            stages[frames[-1]][stage] += count
    return counts, {leaf: by.most_common(1)[0][0] for leaf, by in stages.items()}


def client_cmd(client: str, workdir: Path, data: Path, concurrency: int, server: Server) -> list[str]:
    if client == "batchrun":
        job = job_spec("batchrun", workdir, data, concurrency, server, None)
        return ["-m", "batchrun", "run", str(job), "--no-progress"]
    return [str(HERE / "bare_aiohttp.py"), str(data), server.base_url, str(concurrency)]


def measure(scenario: str, client: str, rate: int, out: Path, label: str, spy: bool = True) -> dict:
    """One run of the scenario's job by `client`, against its own fresh server; py-spy's
    stacks go to OUT/LABEL.txt, the client's output to OUT/LABEL.log."""
    rows, concurrency, opts = SCENARIOS[scenario]
    workdir = Path(tempfile.mkdtemp(prefix="batchrun-stages-"))
    try:
        data = make_input(workdir / "rows.jsonl", rows)
        cpu_path = workdir / "cpu.json"
        raw = out / f"{label}.txt"
        with Server(workdir, label, **opts) as server:
            cmd = client_cmd(client, workdir, data, concurrency, server)
            spying = [shutil.which("py-spy", path=os.path.dirname(PY)) or "py-spy", "record", "--rate", str(rate),
                      "--format", "raw", "--threads", "--full-filenames", "-o", str(raw), "--"] if spy else []
            full = [*spying, PY, "-c", MEASURED, str(cpu_path), *cmd]
            with open(out / f"{label}.log", "wb") as log:
                rc = subprocess.run(full, stdout=log, stderr=subprocess.STDOUT, env=child_env(), cwd=workdir).returncode
        cpu_s = json.loads(cpu_path.read_text())["cpu_s"]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    requests = server.stats.get("requests", rows)
    return {"label": label, "scenario": scenario, "client": client, "rc": rc, "rows": rows, "requests": requests,
            "cpu_s": cpu_s, "span_s": server.stats.get("span_s"), "raw": str(raw), "rate": rate,
            "cmd": full, "server_cmd": server.cmd}


def summarize(result: dict) -> str:
    """The stages' µs per request, then the 15 functions with the most self time."""
    stacks, threads = read_raw(Path(result["raw"]))
    counts = split(stacks)
    samples = sum(counts.values())
    per_request = 1e6 * result["cpu_s"] / result["requests"]
    lines = [f"#### {result['label']}: exit {result['rc']}, {result['requests']:,} requests, "
             f"CPU {result['cpu_s']:.2f} s = {per_request:.0f} µs/request; {samples:,} samples "
             f"= {samples / result['rate']:.2f} s sampled; server span {result['span_s'] or 0:.2f} s",
             "threads (samples): " + ", ".join(f"{name} {count:,}" for name, count in threads.most_common()),
             "", "| stage | samples | share | µs / request |", "| --- | --- | --- | --- |"]
    for name, parts in REPORTED:
        count = sum(counts[part] for part in parts)
        share = count / samples
        name = name if name.startswith("  ") else f"**{name}**"
        lines.append(f"| {name} | {count:,} | {100 * share:.1f} % | {share * per_request:.1f} |")
    lines.append(f"| **total = CPU / request** | {samples:,} | 100 % | {per_request:.1f} |")
    leaves, stage_by_leaf = self_time(stacks)
    lines += ["", "| function (file:line), self time | stage | samples | share | µs / request |",
              "| --- | --- | --- | --- | --- |"]
    for frame, count in leaves.most_common(15):
        share = count / samples
        lines.append(f"| `{short(frame)}` | {stage_by_leaf[frame]} | {count:,} | {100 * share:.1f} % | "
                     f"{share * per_request:.1f} |")
    return "\n".join(lines)


def short(frame: str) -> str:
    """A frame with its path from the package, the standard library or the repository."""
    match = FRAME.match(frame)
    if match is None:
        return frame
    path = match["path"]
    for marker in ("site-packages/", sysconfig.get_paths()["stdlib"] + "/", f"{REPO}/"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{match['function']} ({path}:{match['line']})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenario", choices=SCENARIOS, default="zero")
    parser.add_argument("--client", choices=("batchrun", "bare"), default="batchrun")
    parser.add_argument("--rate", type=int, default=500)
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "batchrun-stages",
                        help="where the stacks, logs and results go")
    parser.add_argument("--label", default=None, help="the run's name in OUT (default: SCENARIO-CLIENT)")
    parser.add_argument("--no-spy", action="store_true", help="the same run without py-spy: its CPU alone")
    parser.add_argument("--summarize", type=Path, help="only summarize this result JSON again")
    args = parser.parse_args()
    if args.summarize:
        print(summarize(json.loads(args.summarize.read_text())))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    label = args.label or f"{args.scenario}-{args.client}"
    print(f"batchrun: {git_describe()}; source fingerprint {source_fingerprint()}; load {os.getloadavg()[0]:.2f}")
    compile_checkout()
    result = measure(args.scenario, args.client, args.rate, args.out, label, spy=not args.no_spy)
    (args.out / f"{label}.json").write_text(json.dumps(result, indent=1))
    if args.no_spy:
        print(f"{label}: exit {result['rc']}, {result['requests']:,} requests, CPU {result['cpu_s']:.2f} s = "
              f"{1e6 * result['cpu_s'] / result['requests']:.0f} µs/request; server span {result['span_s']:.2f} s")
    else:
        print(summarize(result))


if __name__ == "__main__":
    main()
