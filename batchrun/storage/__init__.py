"""Where a job's files live: the SQLite checkpoint, the Parquet output, object storage.

    state.py    the checkpoint store (SQLite)
    output.py   the Parquet writer, in input order, atomic
    columns.py  the output columns only some jobs have
    objects.py  a job's files on object storage
    lock.py     one runner per job
"""
