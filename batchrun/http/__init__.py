"""The wire: one client for the API, its transport, the user's network, the mock.

    client.py     one row's call: body out, retries, answer in, errors mapped
    transport.py  httpx over aiohttp's pool, and the bounds every answer keeps
    network.py    proxies and CA bundles from the environment, where a key may go
    secrets.py    keeping the API key out of everything written
    mock.py       `mock://`, an in-process server for trying batchrun out
"""
