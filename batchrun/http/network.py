"""The user's network: proxies and CA bundles from the environment, and where a key may go.

Pure functions of the URL and the environment, so that they are tested without a
network. They follow what httpx and the openai SDK do with the same variables:

- `HTTPS_PROXY` for https:// URLs, `HTTP_PROXY` for http://, `ALL_PROXY` for either when
  the scheme's own is unset; lower-case names too (they win, as in urllib). `NO_PROXY`
  lists hosts, domains (`.example.com` or `example.com`: its subdomains too) and `*`.
- `SSL_CERT_FILE` / `SSL_CERT_DIR`: the CA bundle that verifies the API's certificate.
"""

from __future__ import annotations

import ipaddress
import ssl
from collections.abc import Mapping
from urllib.parse import urlsplit

from .._exceptions import ConfigError

__all__ = ["check_key_route", "proxy_for", "ssl_context"]

_PROXY_SCHEMES = ("http", "https")  # what the aiohttp transport can speak to a proxy


def _proxies(environ: Mapping[str, str]) -> dict[str, str]:
    found: dict[str, str] = {}
    for name, value in environ.items():
        lower = name.lower()
        if value and lower.endswith("_proxy") and (name == lower or lower[:-6] not in found):
            found[lower[:-6]] = value
    return found


def proxy_for(url: str, environ: Mapping[str, str]) -> str | None:
    """The proxy requests to `url` go through, or None. Raises ConfigError for a proxy
    the transport cannot use (socks5://), naming the variable."""
    parts = urlsplit(url)
    proxies = _proxies(environ)
    scheme = parts.scheme.lower()
    chosen = proxies.get(scheme) or proxies.get("all")
    if not chosen:
        return None
    no_proxy = proxies.get("no", "")
    host = parts.hostname or ""
    if no_proxy.strip() == "*":
        return None
    if no_proxy:
        import urllib.request  # (http.client and email with it: 12 ms of a start, paid only here)

        if urllib.request.proxy_bypass_environment(host if parts.port is None else f"{host}:{parts.port}",
                                                   {"no": no_proxy}):
            return None
    if "://" not in chosen:
        chosen = f"http://{chosen}"
    proxy_scheme = urlsplit(chosen).scheme.lower()
    if proxy_scheme not in _PROXY_SCHEMES:
        variable = f"{scheme.upper()}_PROXY" if proxies.get(scheme) else "ALL_PROXY"
        raise ConfigError(f"{variable}: a {proxy_scheme}:// proxy is not supported; batchrun speaks to http:// and "
                          "https:// proxies (set NO_PROXY to bypass it for this host)")
    return chosen


def ssl_context(environ: Mapping[str, str]) -> ssl.SSLContext:
    """The system's CAs, or the bundle SSL_CERT_FILE / SSL_CERT_DIR names."""
    cafile, capath = environ.get("SSL_CERT_FILE") or None, environ.get("SSL_CERT_DIR") or None
    try:
        return ssl.create_default_context(cafile=cafile, capath=capath)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"SSL_CERT_FILE / SSL_CERT_DIR: cannot load the CA bundle ({exc})") from exc


def is_loopback(host: str) -> bool:
    if host.lower() in ("localhost", "localhost.localdomain") or host.lower().endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_key_route(base_url: str, *, has_key: bool, allowed: bool, spec_name: str) -> None:
    """A key never crosses a network in the clear: plain http:// is for this machine."""
    parts = urlsplit(base_url)
    if has_key and parts.scheme == "http" and not allowed and not is_loopback(parts.hostname or ""):
        raise ConfigError(
            f"api.base_url {base_url!r} is plain http:// to another machine: the API key would cross the network "
            f"unencrypted. Use https://, or set api.allow_insecure_http: true in {spec_name} if that network is "
            "trusted; no request was sent")
