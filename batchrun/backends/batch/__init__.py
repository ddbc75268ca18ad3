"""The providers' batch APIs (about half the live price, answered within a day).

    lines.py    rows -> the lines of a batch's input file, split within the provider's
                limits; a request's `custom_id` names its job and its row
    results.py  the lines of a batch's output and error files -> each row's `Result`, or
                the word that it is still to be answered (expired, cancelled)

Each provider (`openai`: Files + Batches, also served by vLLM, LiteLLM, Together and
Groq; `fireworks`: datasets + batch inference jobs) writes and reads its own shape of
line; the spec's `batch_api.kind` says which (see `spec.model.BatchApiSpec`).
"""
