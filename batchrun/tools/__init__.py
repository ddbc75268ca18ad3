"""Commands beside `run`: what a run would cost, its status, its answers as datasets.

    plan.py    `batchrun plan`
    status.py  the status file and `batchrun status`
    export.py  `batchrun export`
"""
