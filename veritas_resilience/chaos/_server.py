"""A TCP fault proxy server that speaks Toxiproxy's HTTP API.

:class:`ProxyServer` holds named proxies and their toxics on an event loop of its own (in a
daemon thread), so it works from synchronous code, under asyncio or trio, and keeps forwarding
while the caller's loop is busy. It is driven from Python (its methods are thread-safe and have
taken effect when they return) or over HTTP with Toxiproxy's API, so Toxiproxy's clients
(``toxiproxy-python``, ``chaostoolkit-toxiproxy``, the Go and Ruby clients) work against it::

    with ProxyServer(port=8474) as server:            # port=None: no HTTP API
        server.create_proxy("pg", upstream="127.0.0.1:5432", listen="127.0.0.1:25432")
        server.add_toxic("pg", Toxic(type="latency", attributes={"latency": 300}))
        ...
        server.reset()                                # every proxy enabled, no toxic left

The HTTP API is the one of Toxiproxy 2: ``GET/POST /proxies``, ``POST /populate``,
``GET/POST/PATCH/DELETE /proxies/{name}``, ``GET/POST /proxies/{name}/toxics``,
``GET/POST/PATCH/DELETE /proxies/{name}/toxics/{toxic}``, ``POST /reset``, ``GET /version``.
It is served by the standard library's threading HTTP server. Anyone who can reach it can cut
your traffic: it listens on loopback by default, and binding it elsewhere requires a ``token``
(then every request needs ``Authorization: Bearer <token>``).
"""

from __future__ import annotations

import base64
import hmac
import ipaddress
import json
import random as _random
import re
import socket
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

from ._errors import ProxyError
from ._proxy import Toxic, _LoopThread, _Proxy, format_address, parse_address

__all__ = ["ProxyInfo", "ProxyServer"]

VERSION = "2.9.0"  # the Toxiproxy API version this server implements
_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")
_MAX_BODY = 1 << 20  # API bodies are a few hundred bytes; refuse to buffer more


@dataclass(frozen=True, slots=True)
class ProxyInfo:
    """A snapshot of one proxy.

    Attributes:
        name: The proxy's name.
        listen: ``"host:port"`` it listens on (the port picked, if ``0`` was asked for).
        upstream: ``"host:port"`` it forwards to.
        enabled: Whether it listens (a disabled proxy refuses connections).
        toxics: Its toxics, in the order they were added.
        connections: Client connections open now.
    """

    name: str
    listen: str
    upstream: str
    enabled: bool
    toxics: tuple[Toxic, ...]
    connections: int

    @property
    def host(self) -> str:
        """The listening address."""
        return parse_address(self.listen, "listen")[0]

    @property
    def port(self) -> int:
        """The listening port."""
        return parse_address(self.listen, "listen")[1]

    def to_json(self) -> dict[str, Any]:
        """The proxy as Toxiproxy's API shows it."""
        return {
            "name": self.name,
            "listen": self.listen,
            "upstream": self.upstream,
            "enabled": self.enabled,
            "toxics": [t.to_json() for t in self.toxics],
        }


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ProxyServer:
    """Named TCP fault proxies with Toxiproxy's toxics, and optionally Toxiproxy's HTTP API.

    Args:
        host: Address of the HTTP API.
        port: Port of the HTTP API (Toxiproxy's default is 8474; ``0`` picks a free one);
            ``None`` serves no API (drive it from Python only).
        token: A secret every API request must present (``Authorization: Bearer <token>``, or
            as the password of HTTP basic auth). Required when ``host`` is not a loopback
            address. It never appears in logs or errors.
        random: Random source for toxicity and jitter (seed it for reproducible runs).
        connect_timeout: Seconds a proxy waits for its upstream when a client connects; on
            failure the client connection is reset, as a refused connection would be.

    Raises:
        ValueError: If ``host`` is not loopback and no ``token`` is given.
        OSError: If the API port is taken.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int | None = None,
        *,
        token: str | None = None,
        random: _random.Random | None = None,
        connect_timeout: float = 5.0,
    ) -> None:
        if port is not None and not _is_loopback(host) and not token:
            raise ValueError(
                f"host {host!r} is not a loopback address: pass token= so that only those who "
                "know it can drive the proxy"
            )
        if connect_timeout <= 0:
            raise ValueError(f"connect_timeout must be > 0 seconds, got {connect_timeout!r}")
        self._token = token
        self._rng = random if random is not None else _random.Random()
        self._connect_timeout = connect_timeout
        self._proxies: dict[str, _Proxy] = {}
        self._lock = threading.Lock()
        self._http: ThreadingHTTPServer | None = None
        self._http_thread: threading.Thread | None = None
        self._loop_thread = _LoopThread(name="ProxyServer")
        if port is not None:
            self._http = _make_http_server(self, host, port)
            self._http_thread = threading.Thread(
                target=self._http.serve_forever, name="ProxyServer-api", daemon=True
            )
            self._http_thread.start()

    # -- life cycle -----------------------------------------------------------------------------

    @property
    def api_url(self) -> str | None:
        """``http://host:port`` of the HTTP API, or None when there is none."""
        if self._http is None:
            return None
        host, port = self._http.server_address[:2]
        return f"http://{format_address(str(host), int(port))}"

    @property
    def api_address(self) -> tuple[str, int] | None:
        """``(host, port)`` of the HTTP API, or None when there is none."""
        if self._http is None:
            return None
        host, port = self._http.server_address[:2]
        return str(host), int(port)

    def close(self) -> None:
        """Stop the API, close every proxy and connection, and stop the thread. Idempotent."""
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None

        async def shutdown() -> None:
            for proxy in list(self._proxies.values()):
                await proxy.shutdown()

        self._loop_thread.close(shutdown, "ProxyServer")

    def serve_forever(self) -> None:
        """Block until interrupted (Ctrl-C), then close. For the command line."""
        try:
            threading.Event().wait()
        finally:
            self.close()

    def __enter__(self) -> ProxyServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<ProxyServer api={self.api_url} proxies={sorted(self._proxies)}>"

    # -- proxies --------------------------------------------------------------------------------

    def create_proxy(
        self, name: str, upstream: str, listen: str = "127.0.0.1:0", *, enabled: bool = True
    ) -> ProxyInfo:
        """Create a proxy listening on ``listen`` and forwarding to ``upstream``.

        Args:
            name: A unique name (letters, digits, ``_.-``).
            upstream: ``"host:port"`` to forward to.
            listen: ``"host:port"`` to listen on; port ``0`` picks a free one.
            enabled: Listen at once (else it is created disabled).

        Raises:
            ProxyError: 409 if the name exists or the address is taken; 400 if malformed.
        """
        if not isinstance(name, str) or not _NAME.match(name):
            raise ProxyError(f"proxy name must be letters, digits, '_.-', got {name!r}", 400)
        target = parse_address(upstream, "upstream")
        host, port = parse_address(listen, "listen")
        with self._lock:
            if name in self._proxies:
                raise ProxyError(f"proxy {name!r} already exists", 409)
            try:
                listener = socket.create_server((host, port), backlog=128)
            except OSError as exc:
                raise ProxyError(f"proxy {name!r} cannot listen on {listen}: {exc}", 409) from exc
            proxy = _Proxy(
                name,
                listener,
                target,
                self._loop_thread.loop,
                rng=self._rng,
                connect_timeout=self._connect_timeout,
            )
            self._proxies[name] = proxy

        async def start() -> None:
            proxy.start_listening()
            if not enabled:
                await proxy.set_enabled(False)

        self._call(start)
        return self.get_proxy(name)

    def populate(self, proxies: Iterable[Mapping[str, Any]]) -> list[ProxyInfo]:
        """Create proxies in bulk, as Toxiproxy's ``POST /populate``: idempotent.

        A proxy that exists with the same ``listen`` and ``upstream`` is kept (its toxics too);
        one that differs is replaced.

        Raises:
            ProxyError: As :meth:`create_proxy`, for the first proxy that fails.
        """
        result = []
        for spec in proxies:
            if not isinstance(spec, Mapping) or "name" not in spec or "upstream" not in spec:
                raise ProxyError("each proxy needs a 'name' and an 'upstream'", 400)
            name = str(spec["name"])
            listen = str(spec.get("listen") or "127.0.0.1:0")
            enabled = bool(spec.get("enabled", True))
            existing = self._proxies.get(name)
            if existing is not None:
                info = self.get_proxy(name)
                same_listen = parse_address(listen, "listen")[1] in (0, info.port)
                if same_listen and parse_address(spec["upstream"], "upstream") == existing.target:
                    result.append(self.update_proxy(name, enabled=enabled))
                    continue
                self.delete_proxy(name)
            result.append(self.create_proxy(name, str(spec["upstream"]), listen, enabled=enabled))
        return result

    def get_proxy(self, name: str) -> ProxyInfo:
        """A snapshot of one proxy.

        Raises:
            ProxyError: (404) If there is no such proxy.
        """
        proxy = self._proxy(name)

        async def snapshot() -> ProxyInfo:
            return ProxyInfo(
                name=proxy.name,
                listen=format_address(proxy.host, proxy.port),
                upstream=format_address(*proxy.target),
                enabled=proxy.enabled,
                toxics=tuple(proxy.toxics.values()),
                connections=len(proxy.conns),
            )

        info: ProxyInfo = self._call(snapshot)
        return info

    def proxies(self) -> dict[str, ProxyInfo]:
        """Snapshots of every proxy, by name."""
        return {name: self.get_proxy(name) for name in sorted(self._proxies)}

    def update_proxy(
        self,
        name: str,
        *,
        enabled: bool | None = None,
        listen: str | None = None,
        upstream: str | None = None,
    ) -> ProxyInfo:
        """Enable or disable a proxy, move its listener, or point it at another upstream.

        Disabling closes every open connection and refuses new ones (Toxiproxy's "down").
        A new upstream applies to new connections.

        Raises:
            ProxyError: 404 if there is no such proxy, 400 if an address is malformed.
        """
        proxy = self._proxy(name)
        target = parse_address(upstream, "upstream") if upstream is not None else None
        address = parse_address(listen, "listen") if listen is not None else None

        async def apply() -> None:
            if target is not None:
                proxy.target = target
            if address is not None and address != (proxy.host, proxy.port):
                try:
                    await proxy.relisten(*address)
                except OSError as exc:
                    raise ProxyError(
                        f"proxy {name!r} cannot listen on {listen}: {exc}", 409
                    ) from exc
            if enabled is not None:
                await proxy.set_enabled(enabled)

        self._call(apply)
        return self.get_proxy(name)

    def delete_proxy(self, name: str) -> None:
        """Close a proxy and its connections and forget it.

        Raises:
            ProxyError: (404) If there is no such proxy.
        """
        with self._lock:
            proxy = self._proxies.pop(name, None)
        if proxy is None:
            raise ProxyError(f"proxy {name!r} not found", 404)
        self._call(proxy.shutdown)

    def reset(self) -> None:
        """Enable every proxy and remove every toxic (Toxiproxy's ``POST /reset``)."""

        async def apply() -> None:
            for proxy in self._proxies.values():
                proxy.clear_toxics()
                await proxy.set_enabled(True)

        self._call(apply)

    # -- toxics ---------------------------------------------------------------------------------

    def add_toxic(self, proxy: str, toxic: Toxic) -> Toxic:
        """Add a toxic to a proxy; it applies to open connections and new ones at once.

        Raises:
            ProxyError: 404 if there is no such proxy, 409 if the toxic's name is taken.
        """
        target = self._proxy(proxy)

        async def apply() -> None:
            target.add_toxic(toxic)

        self._call(apply)
        return toxic

    def update_toxic(
        self,
        proxy: str,
        name: str,
        *,
        toxicity: float | None = None,
        attributes: Mapping[str, int] | None = None,
    ) -> Toxic:
        """Change a toxic's toxicity or attributes (the others are kept).

        Raises:
            ProxyError: 404 if there is no such proxy or toxic, 400 if a value is invalid.
        """
        target = self._proxy(proxy)
        old = self.toxics(proxy).get(name)
        if old is None:
            raise ProxyError(f"toxic {name!r} not found on proxy {proxy!r}", 404)
        new = Toxic(
            type=old.type,
            name=old.name,
            stream=old.stream,
            toxicity=old.toxicity if toxicity is None else toxicity,
            attributes={**old.attributes, **(attributes or {})},
        )

        async def apply() -> None:
            target.add_toxic(new, replace=True)

        self._call(apply)
        return new

    def remove_toxic(self, proxy: str, name: str) -> None:
        """Remove a toxic; what it held back flows again.

        Raises:
            ProxyError: (404) If there is no such proxy or toxic.
        """
        target = self._proxy(proxy)

        async def apply() -> None:
            target.remove_toxic(name)

        self._call(apply)

    def toxics(self, proxy: str) -> dict[str, Toxic]:
        """A proxy's toxics, by name.

        Raises:
            ProxyError: (404) If there is no such proxy.
        """
        return {t.name: t for t in self.get_proxy(proxy).toxics}

    # -- internals ------------------------------------------------------------------------------

    def _proxy(self, name: str) -> _Proxy:
        proxy = self._proxies.get(name)
        if proxy is None:
            raise ProxyError(f"proxy {name!r} not found", 404)
        return proxy

    def _call(self, op: Any) -> Any:
        return self._loop_thread.call(op, "ProxyServer")

    def _authorized(self, header: str | None) -> bool:
        token = self._token
        if not token:
            return True
        if not header:
            return False
        scheme, _, credentials = header.partition(" ")
        if scheme.lower() == "bearer":
            return hmac.compare_digest(credentials.strip().encode(), token.encode())
        if scheme.lower() == "basic":
            try:
                decoded = base64.b64decode(credentials.strip()).decode()
            except (ValueError, UnicodeDecodeError):
                return False
            return hmac.compare_digest(decoded.partition(":")[2].encode(), token.encode())
        return False


def _make_http_server(server: ProxyServer, host: str, port: int) -> ThreadingHTTPServer:
    class Handler(_ApiHandler):
        proxy_server = server

    family = socket.AF_INET6 if ":" in host else socket.AF_INET

    class Server(ThreadingHTTPServer):
        address_family = family
        daemon_threads = True

    return Server((host, port), Handler)


_ROUTES: Sequence[tuple[str, re.Pattern[str]]] = [
    ("proxies", re.compile(r"^/proxies/?$")),
    ("populate", re.compile(r"^/populate/?$")),
    ("reset", re.compile(r"^/reset/?$")),
    ("version", re.compile(r"^/version/?$")),
    ("toxics", re.compile(r"^/proxies/(?P<proxy>[^/]+)/toxics/?$")),
    ("toxic", re.compile(r"^/proxies/(?P<proxy>[^/]+)/toxics/(?P<toxic>[^/]+)/?$")),
    ("proxy", re.compile(r"^/proxies/(?P<proxy>[^/]+)/?$")),
]


class _ApiHandler(BaseHTTPRequestHandler):
    """Toxiproxy's HTTP API over :class:`ProxyServer`'s methods."""

    proxy_server: ProxyServer
    protocol_version = "HTTP/1.1"
    server_version = f"toxiproxy-compatible/{VERSION}"

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the proxy logs nothing per request."""

    def do_GET(self) -> None:
        """Serve GET."""
        self._dispatch("GET")

    def do_POST(self) -> None:
        """Serve POST."""
        self._dispatch("POST")

    def do_PATCH(self) -> None:
        """Serve PATCH (as POST: newer Toxiproxy clients update with it)."""
        self._dispatch("POST")

    def do_DELETE(self) -> None:
        """Serve DELETE."""
        self._dispatch("DELETE")

    def _dispatch(self, method: str) -> None:
        try:
            if not self.proxy_server._authorized(self.headers.get("Authorization")):
                self.close_connection = True  # its body, if any, is never read
                self._send(401, {"error": "unauthorized", "status": 401})
                return
            body = self._body()
            path = self.path.split("?", 1)[0]
            for route, pattern in _ROUTES:
                match = pattern.match(path)
                if match is not None:
                    status, payload = self._route(route, method, match.groupdict(), body)
                    self._send(status, payload)
                    return
            self._send(404, {"error": f"no such endpoint: {path}", "status": 404})
        except ProxyError as exc:
            self._send(exc.status, {"error": str(exc), "status": exc.status})
        except (ValueError, TypeError, KeyError) as exc:
            self._send(400, {"error": f"bad request: {exc}", "status": 400})

    def _body(self) -> Any:
        length = int(self.headers.get("Content-Length") or 0)
        if length > _MAX_BODY:
            self.close_connection = True
            raise ProxyError(f"the body is over {_MAX_BODY} bytes", 413)
        raw = self.rfile.read(length) if length else b""
        if not raw.strip():
            return None
        try:
            return json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ProxyError(f"the body is not JSON: {exc}", 400) from exc

    def _route(self, route: str, method: str, params: dict[str, str], body: Any) -> tuple[int, Any]:
        server = self.proxy_server
        if route == "version" and method == "GET":
            return 200, VERSION
        if route == "reset" and method == "POST":
            server.reset()
            return 204, None
        if route == "populate" and method == "POST":
            specs = body.get("proxies") if isinstance(body, dict) else body
            if not isinstance(specs, list):
                raise ProxyError("populate takes a list of proxies", 400)
            return 201, {"proxies": [p.to_json() for p in server.populate(specs)]}
        if route == "proxies":
            if method == "GET":
                return 200, {name: p.to_json() for name, p in server.proxies().items()}
            if method == "POST":
                spec = _object(body)
                info = server.create_proxy(
                    str(spec.get("name", "")),
                    str(spec.get("upstream", "")),
                    str(spec.get("listen") or "127.0.0.1:0"),
                    enabled=bool(spec.get("enabled", True)),
                )
                return 201, info.to_json()
        name = params.get("proxy", "")
        if route == "proxy":
            if method == "GET":
                return 200, server.get_proxy(name).to_json()
            if method == "POST":
                spec = _object(body)
                return 200, server.update_proxy(
                    name,
                    enabled=bool(spec["enabled"]) if "enabled" in spec else None,
                    listen=spec.get("listen"),
                    upstream=spec.get("upstream"),
                ).to_json()
            if method == "DELETE":
                server.delete_proxy(name)
                return 204, None
        if route == "toxics":
            if method == "GET":
                return 200, [t.to_json() for t in server.toxics(name).values()]
            if method == "POST":
                return 200, server.add_toxic(name, Toxic.from_json(body)).to_json()
        if route == "toxic":
            toxic = params["toxic"]
            if method == "GET":
                found = server.toxics(name).get(toxic)
                if found is None:
                    raise ProxyError(f"toxic {toxic!r} not found on proxy {name!r}", 404)
                return 200, found.to_json()
            if method == "POST":
                spec = _object(body)
                return 200, server.update_toxic(
                    name, toxic, toxicity=spec.get("toxicity"), attributes=spec.get("attributes")
                ).to_json()
            if method == "DELETE":
                server.remove_toxic(name, toxic)
                return 204, None
        raise ProxyError(f"{method} is not allowed on {self.path}", 405)

    def _send(self, status: int, payload: Any) -> None:
        if status == 204:
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if isinstance(payload, str):
            data, kind = payload.encode(), "text/plain"
        else:
            data, kind = json.dumps(payload).encode(), "application/json"
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def _object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise ProxyError("the body must be a JSON object", 400)
    return body
