"""The job spec: YAML parsed into frozen dataclasses, every unknown key refused.

    model.py  the dataclasses (`JobSpec` and its sections), with their defaults
    parse.py  `load_spec` / `parse_spec`: a mapping checked and built into a `JobSpec`
    schema.py the answers' JSON schema: found in the spec, validated against, typed for Arrow
    urls.py   which texts are URLs; the local folder mirroring an output URL

What depends on a kind is asked of the kind: the parser takes the endpoint names, the
schema's place in a request and what a budget needs from `endpoints`.
"""
