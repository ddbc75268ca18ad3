"""Input rows: the files a spec names, read streamed, validated and templated.

    files.py        which files `input:` names; records from JSONL, CSV, Parquet
    csv_lines.py    where a CSV record stands in its file (lines, quotes, UTF-8)
    pinned.py       one version of an input file for the whole job
    reader.py       the input as one table, streamed: validation, ids, passthrough columns
    rows.py         one record -> a `Row`: its id, its endpoint (asked of `endpoints`), its fields
    passthrough.py  the Arrow types the other columns keep on their way out
    template.py     Jinja2 templates over a row's columns
    checks.py       what a request may carry (UTF-8, finite numbers, depth)
"""
