"""The wire: one client for the API, its transport, the user's network, the mock.

    client.py     one request with its retries: body out, the answer's verdict, backoff,
                  answer in; the transport's errors mapped to batchrun's (the one place)
    transport.py  the seam: bytes out, an answer in, its errors, the bounds every answer keeps
    wire.py       the default transport: HTTP/1.1 on asyncio's connections, httptools' parser
    aio.py        aiohttp's pool, for requests through a proxy
    bounded.py    any httpx transport (MockTransport, mock://) behind the seam
    network.py    proxies and CA bundles from the environment, where a key may go
    secrets.py    keeping the API key out of everything written
    mock.py       `mock://`, an in-process server for trying batchrun out

A row's call around the request (cache, budget, re-ask) is the engine's: `engine/call.py`.
"""
