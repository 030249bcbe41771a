"""How the HTTP client (``_http.py``) and the websocket reach a server: which proxy, if any,
carries the connection (the environment's ``HTTP_PROXY``, ``HTTPS_PROXY``, ``ALL_PROXY`` and
``NO_PROXY``, or one given), the ``CONNECT`` tunnel through it, and TLS.

- Proxies are read from the environment as httpx reads them (lower-case names too, through
  ``urllib.request.getproxies()``): an ``http://`` request goes to the proxy in absolute form
  (RFC 9112 3.2.2, ``Route.forward``); an ``https://`` server, and every websocket, is
  reached through a ``CONNECT`` tunnel (RFC 9110 9.3.6). Credentials in the proxy's URL
  become ``Proxy-Authorization: Basic`` (RFC 7617).
- ``open_stream`` gives the websocket its byte stream, through the same proxy and TLS as the
  requests.
- Every failure to connect is a ``ConnectError`` (``ConnectTimeout`` when out of time).
"""

from __future__ import annotations

import base64
import enum
import functools
import ipaddress
import ssl
import urllib.request
from collections.abc import Mapping, Sequence
from typing import Any, Final, cast
from urllib.parse import unquote, urlsplit

import attrs
import h11
import trio

from ._http_types import GONE, MAX_HEAD, MAX_INFORMATIONAL, RECEIVE, ConnectError, ConnectTimeout

__all__ = [
    "FROM_ENVIRONMENT",
    "Origin",
    "Proxy",
    "ProxyRules",
    "ProxySetting",
    "Route",
    "connect",
    "default_ssl_context",
    "open_stream",
    "split_url",
]

_SCHEMES = {"http": "http", "https": "https", "ws": "http", "wss": "https"}
_DEFAULT_PORTS = {"http": 80, "https": 443}

Origin = tuple[str, str, int]
"""Scheme (``http`` or ``https``), host and port of a server."""


class _FromEnvironment(enum.Enum):
    FROM_ENVIRONMENT = "from the environment"


FROM_ENVIRONMENT: Final = _FromEnvironment.FROM_ENVIRONMENT
"""The default ``proxy``: ``HTTP_PROXY``, ``HTTPS_PROXY``, ``ALL_PROXY`` and ``NO_PROXY`` (or
their lower-case names), read as httpx reads them."""

ProxySetting = str | None | _FromEnvironment
"""A proxy URL (``http://user:password@host:port``, for every server), None (no proxy), or
``FROM_ENVIRONMENT``."""


@attrs.frozen
class Proxy:
    """A proxy to go through."""

    url: str
    """Its URL without credentials (for messages)."""
    origin: Origin
    authorization: bytes | None
    """The ``Proxy-Authorization`` value, when its URL has credentials."""


@attrs.frozen
class Route:
    """How connections to one server are made."""

    proxy: Proxy | None
    forward: bool
    """http through a proxy: requests go to the proxy whole (no tunnel)."""


def split_url(url: str) -> tuple[Origin, str, str]:
    """The origin of ``url`` (http, https, ws or wss), its ``Host`` header, and its path
    with its query."""
    parts = urlsplit(url)
    scheme = _SCHEMES.get(parts.scheme.lower())
    if scheme is None or not parts.hostname:
        raise ValueError(f"not an http(s):// or ws(s):// URL: {url!r}")
    port = parts.port or _DEFAULT_PORTS[scheme]
    host = parts.netloc.rpartition("@")[2]
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return (scheme, parts.hostname, port), host, path


# ---------------------------------------------------------------------------- connections


@functools.cache
def default_ssl_context() -> ssl.SSLContext:
    """The TLS context of requests and websockets that were given none: the system's CAs
    (``SSL_CERT_FILE`` and ``SSL_CERT_DIR`` honoured), and certifi's when it is installed.
    Built once: loading CA bundles costs milliseconds."""
    context = ssl.create_default_context()
    try:
        import certifi
    except ImportError:
        return context
    context.load_verify_locations(certifi.where())
    return context


async def open_stream(
    url: str,
    *,
    ssl_context: ssl.SSLContext | None = None,
    connect_timeout: float = 10.0,
    proxy: ProxySetting = FROM_ENVIRONMENT,
) -> trio.abc.Stream:
    """A byte stream to the server of ``url`` (``http``, ``https``, ``ws`` or ``wss``): TCP,
    through a ``CONNECT`` tunnel when a proxy applies (``proxy`` as for ``HttpClient``), with
    TLS for https and wss. The caller closes it. Raises ``ConnectError`` (``ConnectTimeout``
    after ``connect_timeout`` seconds)."""
    origin, _, _ = split_url(url)
    proxy_url = ProxyRules.from_setting(proxy).select(origin)
    route = Route(None if proxy_url is None else parse_proxy(proxy_url, "", url), forward=False)
    return await connect(origin, route, "", url, ssl_context=ssl_context, timeout=connect_timeout)


async def connect(
    origin: Origin,
    route: Route,
    method: str,
    url: str,
    *,
    ssl_context: ssl.SSLContext | None,
    timeout: float,
) -> trio.abc.Stream:
    """A stream to ``origin`` by ``route``: to the server, or to the proxy (a tunnel
    through it unless ``route.forward``), with TLS for an https origin, in ``timeout``
    seconds. ``method`` and ``url`` name the request in errors. Raises ``ConnectError``
    only."""
    scheme, host, port = origin
    proxy = route.proxy
    via = "" if proxy is None else f" through the proxy {proxy.url}"
    context = ssl_context or default_ssl_context()
    try:
        with trio.fail_after(timeout):
            if proxy is None:
                return await _tcp(host, port, context if scheme == "https" else None)
            proxy_scheme, proxy_host, proxy_port = proxy.origin
            tls = context if proxy_scheme == "https" else None
            stream = await _tcp(proxy_host, proxy_port, tls)
            if route.forward:
                return stream
            try:
                await _tunnel(stream, proxy, host, port, method, url)
                if scheme == "https":
                    stream = await _tls(stream, host, context)
            except BaseException:
                await trio.aclose_forcefully(stream)
                raise
            return stream
    except trio.TooSlowError:
        raise ConnectTimeout(
            f"no connection to {host}:{port}{via} in {timeout:g} s", method=method, url=url
        ) from None
    except (*GONE, h11.ProtocolError) as exc:
        reason = str(exc) or str(exc.__cause__ or "") or repr(exc)  # TLS: the SSLError
        raise ConnectError(
            f"cannot connect to {host}:{port}{via}: {reason}", method=method, url=url
        ) from exc


async def _tcp(host: str, port: int, tls: ssl.SSLContext | None) -> trio.abc.Stream:
    """TCP to ``host``, with TLS when given a context."""
    stream: trio.abc.Stream = await trio.open_tcp_stream(host, port)
    if tls is not None:
        try:
            stream = await _tls(stream, host, tls)
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
    return stream


async def _tls(stream: trio.abc.Stream, host: str, context: ssl.SSLContext) -> trio.SSLStream[Any]:
    tls = trio.SSLStream(stream, context, server_hostname=host, https_compatible=True)
    await tls.do_handshake()
    return tls


async def _tunnel(
    stream: trio.abc.Stream, proxy: Proxy, host: str, port: int, method: str, url: str
) -> None:
    """Ask the proxy for a tunnel to ``host:port`` (``CONNECT``); ``ConnectError`` when it
    refuses."""
    authority = (f"[{host}]:{port}" if ":" in host else f"{host}:{port}").encode("ascii")
    headers = [(b"Host", authority)]
    if proxy.authorization is not None:
        headers.append((b"Proxy-Authorization", proxy.authorization))
    state = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD)
    request = h11.Request(method=b"CONNECT", target=authority, headers=headers)
    await stream.send_all(state.send(request) + state.send(h11.EndOfMessage()))
    informational = 0
    while True:
        event = state.next_event()
        if event is h11.NEED_DATA:
            data = await stream.receive_some(RECEIVE)
            if not data:
                raise ConnectError(
                    f"the proxy {proxy.url} closed the connection before opening a tunnel",
                    method=method,
                    url=url,
                )
            state.receive_data(cast("bytes", data))
            continue
        assert isinstance(event, h11.InformationalResponse | h11.Response)  # an answer's head
        if event.status_code < 200 and informational < MAX_INFORMATIONAL:
            informational += 1
        elif 200 <= event.status_code < 300 and not state.trailing_data[0]:
            return
        else:  # refused (or bytes of the proxy's own after its 2xx, or endless 1xx)
            reason = event.reason.decode("latin-1")
            raise ConnectError(
                f"the proxy {proxy.url} refused a tunnel to {authority.decode()}: "
                f"HTTP {event.status_code} {reason}".rstrip(),
                method=method,
                url=url,
            )


# ---------------------------------------------------------------------------- proxies


def parse_proxy(proxy_url: str, method: str, url: str) -> Proxy:
    """A proxy's URL made ready to use; ``ConnectError`` for one we cannot use."""
    parts = urlsplit(proxy_url)
    display = f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"
    try:
        origin, _, _ = split_url(proxy_url)
    except ValueError:
        origin = None
    if origin is None or parts.scheme.lower() not in ("http", "https"):
        raise ConnectError(
            f"cannot use the proxy {display}: only http:// and https:// proxies are supported",
            method=method,
            url=url,
        )
    authorization = None
    if parts.username is not None:
        credentials = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
        authorization = b"Basic " + base64.b64encode(credentials.encode())
    return Proxy(display, origin, authorization)


@attrs.frozen
class _Bypass:
    """One ``NO_PROXY`` entry, read as httpx reads it: ``example.com`` (that host and its
    subdomains), ``.example.com`` (its subdomains only), ``localhost`` and addresses (that
    host only; an address range as ``10.0.0.0/8``), ``host:port``, ``http://host``."""

    scheme: str | None
    host: str
    port: int | None
    network: ipaddress.IPv4Network | ipaddress.IPv6Network | None
    exact: bool
    subdomains_only: bool

    @classmethod
    def parse(cls, entry: str) -> _Bypass:
        """The rule of one entry."""
        scheme = None
        if "://" in entry:
            scheme, _, entry = entry.partition("://")
            scheme = None if scheme.lower() == "all" else scheme.lower()
        host, port = entry, None
        head, colon, tail = entry.rpartition(":")
        if colon and tail.isdigit() and (head.endswith("]") or ":" not in head):
            host, port = head, int(tail)
        host = host.strip("[]").lower()
        try:
            network = ipaddress.ip_network(host, strict=False)
        except ValueError:
            network = None
        subdomains_only = host.startswith((".", "*."))
        return cls(
            scheme=scheme,
            host=host.lstrip("*."),
            port=port,
            network=network,
            exact=scheme is not None or host == "localhost",
            subdomains_only=subdomains_only,
        )

    def matches(self, origin: Origin) -> bool:
        """Whether requests to ``origin`` skip the proxy."""
        scheme, host, port = origin
        if self.scheme is not None and self.scheme != scheme:
            return False
        if self.port is not None and self.port != port:
            return False
        if self.network is not None:
            try:
                return ipaddress.ip_address(host) in self.network
            except ValueError:
                return False
        if host == self.host:
            return not self.subdomains_only
        return not self.exact and host.endswith("." + self.host)


class ProxyRules:
    """Which proxy, if any, carries the requests to a server."""

    def __init__(self, proxies: Mapping[str, str], bypass: Sequence[_Bypass]) -> None:
        self._proxies = proxies  # "http", "https", "all" -> proxy URL
        self._bypass = bypass
        self._routes: dict[Origin, Route] = {}

    @classmethod
    def from_setting(cls, proxy: ProxySetting) -> ProxyRules:
        """The rules of a ``proxy`` argument."""
        if isinstance(proxy, _FromEnvironment):
            return cls.from_environment()
        return cls({"all": proxy} if proxy else {}, ())

    @classmethod
    def from_environment(cls) -> ProxyRules:
        """``HTTP_PROXY``, ``HTTPS_PROXY``, ``ALL_PROXY`` and ``NO_PROXY``, as httpx reads
        them (``urllib.request.getproxies()``, which also asks the system on macOS and
        Windows; a proxy without a scheme is ``http://``)."""
        found = urllib.request.getproxies()
        proxies = {}
        for scheme in ("http", "https", "all"):
            value = found.get(scheme)
            if value:
                proxies[scheme] = value if "://" in value else f"http://{value}"
        bypass = []
        for raw in found.get("no", "").split(","):
            entry = raw.strip()
            if entry == "*":
                return cls({}, ())
            if entry:
                bypass.append(_Bypass.parse(entry))
        return cls(proxies, bypass)

    def select(self, origin: Origin) -> str | None:
        """The proxy URL for requests to ``origin``, or None to go directly."""
        if not self._proxies or any(rule.matches(origin) for rule in self._bypass):
            return None
        return self._proxies.get(origin[0]) or self._proxies.get("all")

    def route(self, origin: Origin, method: str, url: str) -> Route:
        """How connections to ``origin`` are made (computed once per server); ``method`` and
        ``url`` name the request in a ``ConnectError`` for a proxy we cannot use."""
        route = self._routes.get(origin)
        if route is None:
            proxy_url = self.select(origin)
            proxy = None if proxy_url is None else parse_proxy(proxy_url, method, url)
            route = Route(proxy, forward=proxy is not None and origin[0] == "http")
            self._routes[origin] = route
        return route
