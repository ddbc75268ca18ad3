"""The user's network: proxies from the environment, and a key never sent in the clear."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from batchrun import ConfigError
from batchrun.http.network import check_key_route, proxy_for
from tests.conftest import TEST_KEY, cli_env, read_output, run_cli, write_jsonl, write_spec
from tests.fakeserver import FakeServer


@pytest.mark.parametrize(("url", "env", "proxy"), [
    ("https://api.fireworks.ai/v1", {"HTTPS_PROXY": "http://proxy:3128"}, "http://proxy:3128"),
    ("https://api.fireworks.ai/v1", {"HTTP_PROXY": "http://proxy:3128"}, None),  # http_proxy is for http://
    ("http://10.0.0.5/v1", {"HTTP_PROXY": "proxy:3128"}, "http://proxy:3128"),
    ("https://api.fireworks.ai/v1", {"ALL_PROXY": "http://all:1"}, "http://all:1"),
    ("https://api.fireworks.ai/v1", {"ALL_PROXY": "http://all:1", "HTTPS_PROXY": "http://s:2"}, "http://s:2"),
    ("https://api.fireworks.ai/v1", {"HTTPS_PROXY": "http://A:1", "https_proxy": "http://a:2"}, "http://a:2"),
    ("https://api.fireworks.ai/v1", {"HTTPS_PROXY": "http://p:1", "NO_PROXY": "fireworks.ai"}, None),
    ("https://api.fireworks.ai/v1", {"HTTPS_PROXY": "http://p:1", "NO_PROXY": ".fireworks.ai"}, None),
    ("https://api.fireworks.ai/v1", {"HTTPS_PROXY": "http://p:1", "no_proxy": "*"}, None),
    ("https://api.fireworks.ai/v1", {"HTTPS_PROXY": "http://p:1", "NO_PROXY": "openai.com"}, "http://p:1"),
    ("http://127.0.0.1:8000/v1", {"HTTP_PROXY": "http://p:1", "NO_PROXY": "localhost,127.0.0.1"}, None),
])
def test_the_proxy_is_the_one_httpx_would_use(url: str, env: dict, proxy: str | None) -> None:
    assert proxy_for(url, env) == proxy


def test_a_socks_proxy_is_named_rather_than_ignored() -> None:
    with pytest.raises(ConfigError, match="ALL_PROXY: a socks5:// proxy is not supported"):
        proxy_for("https://api.fireworks.ai/v1", {"ALL_PROXY": "socks5://p:1080"})


@pytest.mark.parametrize("url", ["http://10.1.2.3/v1", "http://api.example.com/v1", "http://[2001:db8::1]/v1"])
def test_a_key_over_plain_http_to_another_machine_is_refused(url: str) -> None:
    with pytest.raises(ConfigError, match="plain http:// to another machine"):
        check_key_route(url, has_key=True, allowed=False, spec_name="job.yaml")
    check_key_route(url, has_key=True, allowed=True, spec_name="job.yaml")  # said explicitly
    check_key_route(url, has_key=False, allowed=False, spec_name="job.yaml")  # no key to leak


@pytest.mark.parametrize("url", ["http://127.0.0.1:8000/v1", "http://localhost/v1", "http://[::1]:9/v1",
                                 "https://api.example.com/v1"])
def test_this_machine_or_https_is_fine(url: str) -> None:
    check_key_route(url, has_key=True, allowed=False, spec_name="job.yaml")


class ForwardProxy:
    """A plain HTTP forwarding proxy on 127.0.0.1 that counts what goes through it."""

    def __init__(self) -> None:
        self.forwarded: list[str] = []
        self._ready = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> ForwardProxy:
        self._thread.start()
        self._ready.wait()
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        self._ready.set()
        self._loop.run_forever()
        server.close()
        self._loop.run_until_complete(server.wait_closed())
        self._loop.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            method, target, version = head.split(b"\r\n", 1)[0].decode().split(" ")
            length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), 0)
            body = await reader.readexactly(length)
            self.forwarded.append(target)
            rest = target.split("://", 1)[1]
            hostport, _, path = rest.partition("/")
            host, port = hostport.rsplit(":", 1)
            up_reader, up_writer = await asyncio.open_connection(host, int(port))
            lines = [f"{method} /{path} {version}".encode()] + [
                line for line in head.split(b"\r\n")[1:] if line and not line.lower().startswith(
                    (b"connection:", b"proxy-connection:", b"keep-alive:"))] + [b"Connection: close"]
            up_writer.write(b"\r\n".join(lines) + b"\r\n\r\n" + body)
            await up_writer.drain()
            while chunk := await up_reader.read(65536):
                writer.write(chunk)
                await writer.drain()
            up_writer.close()
        except (OSError, asyncio.IncompleteReadError, ValueError):
            pass
        finally:
            writer.close()


@pytest.fixture
def proxy() -> Iterator[ForwardProxy]:
    with ForwardProxy() as p:
        yield p


def test_requests_go_through_http_proxy_unless_no_proxy_says_not(tmp_path: Path, server: FakeServer,
                                                                  proxy: ForwardProxy) -> None:
    write_jsonl(tmp_path / "input.jsonl", [{"prompt": f"p{i}", "stream": i % 2 == 0} for i in range(40)])
    spec = write_spec(tmp_path, concurrency=4, api={"base_url": server.base_url})

    result = run_cli("run", str(spec), "--no-progress", env=cli_env(OPENAI_API_KEY=TEST_KEY, HTTP_PROXY=proxy.url))

    assert result.code == 0, result.stderr
    assert len(proxy.forwarded) == len(server.requests) == 40
    assert all(target.startswith(server.base_url) for target in proxy.forwarded)
    assert len(read_output(tmp_path / "out/result.parquet")) == 40

    spec = write_spec(tmp_path, output="out2/result.parquet", api={"base_url": server.base_url})
    result = run_cli("run", str(spec), "--no-progress",
                     env=cli_env(OPENAI_API_KEY=TEST_KEY, HTTP_PROXY=proxy.url, NO_PROXY="127.0.0.1"))
    assert result.code == 0, result.stderr
    assert len(proxy.forwarded) == 40 and len(server.requests) == 80  # none through the proxy


@pytest.mark.slow
def test_a_key_for_a_remote_plain_http_url_exits_2_naming_https(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "input.jsonl", [{"prompt": "p"}])
    spec = write_spec(tmp_path, api={"base_url": "http://192.0.2.10/v1"})  # TEST-NET: never reached
    result = run_cli("run", str(spec), "--no-progress")
    assert result.code == 2
    assert "Use https://" in result.stderr and "no request was sent" in result.stderr
    assert not (tmp_path / "out" / "result.batchrun.sqlite").exists()


@pytest.mark.slow
@pytest.mark.parametrize("key", ["input", "output"])
def test_a_store_no_library_opens_exits_2(tmp_path: Path, key: str) -> None:
    write_jsonl(tmp_path / "input.jsonl", [{"prompt": "p"}])
    spec = write_spec(tmp_path, **{key: f"nosuch://bucket/x.{'parquet' if key == 'output' else 'jsonl'}"},
                      api={"base_url": "mock://"})
    result = run_cli("run", str(spec), "--no-progress", env=cli_env(BATCHRUN_WORK_DIR=str(tmp_path / "w")))
    assert result.code == 2
    assert "nosuch://bucket/x." in result.stderr and "nosuch://" in result.stderr.split(":", 3)[-1]
    assert not (tmp_path / "nosuch:").exists()


@pytest.mark.slow
def test_a_url_for_the_response_cache_exits_2(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "input.jsonl", [{"prompt": "p"}])
    spec = write_spec(tmp_path, cache="s3://bucket/cache.sqlite")
    result = run_cli("run", str(spec), "--no-progress")
    assert result.code == 2
    assert "cache: 's3://bucket/cache.sqlite' is a URL" in result.stderr


@pytest.mark.slow
def test_a_store_whose_library_cannot_start_exits_2(tmp_path: Path) -> None:
    """hdfs:// needs a JVM this machine lacks: said before any request, never a crash."""
    write_jsonl(tmp_path / "input.jsonl", [{"prompt": "p"}])
    spec = write_spec(tmp_path, output="hdfs://127.0.0.1:1/out/x.parquet", api={"base_url": "mock://"})
    result = run_cli("run", str(spec), "--no-progress", env=cli_env(BATCHRUN_WORK_DIR=str(tmp_path / "w")))
    assert result.code == 2, result.stderr
    assert "hdfs://127.0.0.1:1/out/x.parquet: cannot open the store: " in result.stderr
