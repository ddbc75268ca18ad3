"""One job across a Ray cluster (the `ray` extra, imported only when chosen).

    driver.py  the driver: shards as tasks, signals, progress, the merge
    quota.py   one job-wide rate and in-flight limit, spent in leases
"""
