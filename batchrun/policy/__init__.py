"""Decisions without I/O: pure functions of values, with the clock passed in.

    verdict.py      what one answer means, judged once (`judge` -> `Verdict`): ok, retry,
                    row-fatal or job-fatal; the wait (the server's retry-after, else the
                    backoff); push-back; the limits the server states. Handed on as a value.
    retry.py        what a verdict does to a row: the error that stands for it, and the
                    tenacity controller whose wait and stop read it
    rate.py         when the next request may go: pacing to the spec's and the server's
                    limits, slowing down on push-back (`RateLimiter.observe(verdict, now)`)
    concurrency.py  how many requests may be in flight, found from push-back
    pricing.py      prices, costs and the job's budget

A new decision goes here the same way: a function (or a small class of bookkeeping)
over values — status, headers, attempt numbers, counts — with the time passed in as
`now` and any waiting or randomness injected (`sleep=`, `rand=`), so that its tests
need no server and no sleeping. Whoever acts on it (the client, the engine, a backend)
computes it once and passes the result on. Nothing here reads a socket or a file; only
the gate on requests in flight (`ConcurrencyLimit`) waits (anyio) and looks at the clock.
"""
