"""The job spec: YAML parsed into frozen dataclasses, every unknown key refused.

`parse.py` builds a `JobSpec` from a mapping; each section with kinds (endpoints,
storage) asks the kind to check its own keys.
"""
