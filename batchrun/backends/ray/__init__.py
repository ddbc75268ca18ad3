"""One job across a Ray cluster (the `ray` extra, imported only when chosen): `RayBackend`.

    driver.py  the driver: shards as tasks, signals, progress, the merge
    worker.py  on the cluster: the task that runs one shard; its reports to the actor
    actor.py   on the cluster: the job's quota in a named actor
    quota.py   one job-wide rate and in-flight limit, spent in leases (pure bookkeeping)
"""
