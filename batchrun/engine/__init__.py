"""The engine: one process's part of a job, from rows to checkpointed answers.

    run.py         `run_part(spec, part, options, limits)`: the checks, then the wiring
                   of one run, and its Summary
    part.py        `Part`: which rows a run answers and where its files go (`WholeJob`)
    limits.py      `Limits`: a rate limiter and control handed in by a backend
    preflight.py   the checks that cost no request: key, where it goes, output folder, space
    opening.py     the state, opened and checked against the input and spec; --restart
    pool.py        the workers: the first request alone, rows set aside for a retry-after
    call.py        one row's call: cache, budget hold, send, re-ask, charge
    holds.py       the budget's holds as the writer records them
    writer.py      the only owner of the state and output: group commit, row groups
    watch.py       beside the workers: status file, upload, stall watch, signals
    bridge.py      the event loop in a thread of its own, for a library caller
    status.py      the status file a run writes for schedulers
    summary.py     what a run did, and its exit code
    cache.py       the response cache jobs share
    progress.py    a bar, a log line or nothing

What the engine knows: one spec, one `Part` of its rows, one store (storage/), one
client (http/), its own rate and concurrency policy (policy/) unless `Limits` replace
them. What it does not know: how a job is spread over processes. Shards, Ray and any
other backend live in backends/ and call `run_part`; the engine imports neither
backends/ nor tools/, and asks no question of the kind "am I a shard, on Ray?": what
differs between parts is a value of the `Part` it is given.
"""
