"""The engine: one process's share of a job, from rows to checkpointed answers.

    run.py         wiring: spec -> input -> pool -> writer -> output
    cache.py       the response cache jobs share
    structured.py  answers validated against the job's JSON schema
    progress.py    a bar, a log line or nothing
"""
