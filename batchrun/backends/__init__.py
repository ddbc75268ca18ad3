"""How a job's rows are spread over processes: shards on one machine, or a Ray cluster.

    shards.py     N runners, each answering a contiguous slice; the merge
    ray/          one job across a Ray cluster with one shared quota
"""
