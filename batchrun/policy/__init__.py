"""Decisions without I/O: pure functions of values, with the clock passed in.

    retry.py        what an HTTP answer means (retry, fail the row, stop the job); waits
    rate.py         when the next request may go: pacing to spec and server limits
    concurrency.py  how many requests may be in flight, found from push-back
    pricing.py      prices, costs and the job's budget
"""
