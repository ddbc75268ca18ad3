"""The wire: one client for the API, its transport, the user's network, the mock.

    client.py     one request with its retries: body out, the answer's verdict, backoff,
                  answer in; httpx errors mapped to batchrun's (the one place)
    transport.py  httpx over aiohttp's pool, and the bounds every answer keeps
    network.py    proxies and CA bundles from the environment, where a key may go
    secrets.py    keeping the API key out of everything written
    mock.py       `mock://`, an in-process server for trying batchrun out

A row's call around the request (cache, budget, re-ask) is the engine's: `engine/call.py`.
"""
