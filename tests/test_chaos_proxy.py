"""The fault proxy server: each toxic on real sockets, and Toxiproxy's HTTP API driven by
toxiproxy-python."""

from __future__ import annotations

import base64
import json
import random
import socket
import socketserver
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from toxiproxy.exceptions import NotFound, ProxyExists
from toxiproxy.server import Toxiproxy

from veritas_resilience.chaos import ProxyError, ProxyServer, Toxic
from veritas_resilience.testing import FaultProxy


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        try:
            while data := self.request.recv(65536):
                if data.startswith(b"BYE"):
                    self.request.sendall(b"bye")
                    return  # the server closes
                self.request.sendall(data)
        except OSError:  # reset by a toxic
            return


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


@pytest.fixture(scope="module")
def echo() -> Iterator[str]:
    """An echo server on loopback ("BYE" makes it answer and close); its "host:port"."""
    server = _Server(("127.0.0.1", 0), _Echo)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def server() -> Iterator[ProxyServer]:
    """A proxy server without HTTP API, seeded."""
    with ProxyServer(random=random.Random(5)) as s:
        yield s


def connect(server: ProxyServer, name: str = "p", timeout: float = 5.0) -> socket.socket:
    info = server.get_proxy(name)
    return socket.create_connection((info.host, info.port), timeout=timeout)


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return data


def recv_all(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def test_latency_with_jitter_delays_every_chunk(server: ProxyServer, echo: str) -> None:
    """A downstream latency of 200 ± 50 ms makes a round trip take at least 150 ms."""
    server.create_proxy("p", echo)
    with connect(server) as sock:
        sock.sendall(b"warm")
        assert recv_exactly(sock, 4) == b"warm"
        server.add_toxic("p", Toxic(type="latency", attributes={"latency": 200, "jitter": 50}))
        started = time.monotonic()
        sock.sendall(b"ping")
        assert recv_exactly(sock, 4) == b"ping"
        assert time.monotonic() - started >= 0.15


def test_bandwidth_caps_throughput(server: ProxyServer, echo: str) -> None:
    """At 10 KB/s downstream, 5,000 bytes take at least 0.4 s, and arrive intact."""
    server.create_proxy("p", echo)
    server.add_toxic("p", Toxic(type="bandwidth", attributes={"rate": 10}))
    payload = bytes(range(250)) * 20
    with connect(server) as sock:
        started = time.monotonic()
        sock.sendall(payload)
        assert recv_exactly(sock, len(payload)) == payload
        assert time.monotonic() - started >= 0.4


def test_slow_close_delays_the_close(server: ProxyServer, echo: str) -> None:
    """The server's close reaches the client at least `delay` ms late; the data first."""
    server.create_proxy("p", echo)
    server.add_toxic("p", Toxic(type="slow_close", attributes={"delay": 300}))
    with connect(server) as sock:
        sock.sendall(b"BYE")
        assert recv_exactly(sock, 3) == b"bye"
        started = time.monotonic()
        assert sock.recv(10) == b""
        assert time.monotonic() - started >= 0.25


def test_timeout_zero_drops_data_and_keeps_the_connection(server: ProxyServer, echo: str) -> None:
    """timeout=0: nothing flows and nothing closes, until the toxic is removed."""
    server.create_proxy("p", echo)
    server.add_toxic("p", Toxic(type="timeout", attributes={"timeout": 0}))
    with connect(server, timeout=0.5) as sock:
        sock.sendall(b"lost")
        with pytest.raises(TimeoutError):
            sock.recv(10)
        server.remove_toxic("p", "timeout_downstream")
        sock.settimeout(5)
        sock.sendall(b"back")
        assert recv_exactly(sock, 4) == b"back"  # the dropped reply stays dropped


def test_timeout_closes_after_its_time(server: ProxyServer, echo: str) -> None:
    """timeout=200: no data, then the connection is closed."""
    server.create_proxy("p", echo)
    server.add_toxic("p", Toxic(type="timeout", attributes={"timeout": 200}))
    with connect(server) as sock:
        sock.sendall(b"lost")
        assert recv_all(sock) == b""


def test_reset_peer_resets_the_connection(server: ProxyServer, echo: str) -> None:
    """reset_peer aborts open connections with a TCP RST."""
    server.create_proxy("p", echo)
    with connect(server) as sock:
        sock.sendall(b"hi")
        assert recv_exactly(sock, 2) == b"hi"
        server.add_toxic("p", Toxic(type="reset_peer", attributes={"timeout": 0}))
        with pytest.raises(ConnectionResetError):
            read_until_reset(sock)


def test_slicer_fragments_but_keeps_the_bytes(server: ProxyServer, echo: str) -> None:
    """10-byte slices 20 ms apart: 100 bytes come back whole, in at least ~180 ms."""
    server.create_proxy("p", echo)
    server.add_toxic(
        "p",
        Toxic(type="slicer", attributes={"average_size": 10, "size_variation": 3, "delay": 20_000}),
    )
    payload = bytes(range(100))
    with connect(server) as sock:
        started = time.monotonic()
        sock.sendall(payload)
        assert recv_exactly(sock, 100) == payload
        assert time.monotonic() - started >= 0.1


@pytest.mark.parametrize("stream", ["downstream", "upstream"])
def test_limit_data_closes_after_n_bytes(server: ProxyServer, echo: str, stream: str) -> None:
    """limit_data lets exactly `bytes` through in its direction, then closes."""
    server.create_proxy("p", echo)
    server.add_toxic("p", Toxic(type="limit_data", stream=stream, attributes={"bytes": 10}))  # type: ignore[arg-type]
    with connect(server) as sock:
        sock.sendall(b"0123456789abcdefghij")
        got = recv_all(sock)
    if stream == "downstream":
        assert got == b"0123456789"
    else:  # the server got 10 bytes; the close may beat their echo
        assert b"0123456789".startswith(got)


def test_toxicity_picks_connections_from_the_seeded_source(echo: str) -> None:
    """toxicity=0.5 applies a toxic to exactly the connections the seeded source picks."""
    with ProxyServer(random=random.Random(11)) as server:
        server.create_proxy("p", echo)
        server.add_toxic("p", Toxic(type="limit_data", toxicity=0.5, attributes={"bytes": 1}))
        limited = []
        for i in range(30):
            with connect(server) as sock:
                sock.sendall(b"abc")
                if recv_all_or_three(sock) == b"a":
                    limited.append(i)
    rng = random.Random(11)
    assert limited == [i for i in range(30) if rng.random() < 0.5]
    assert 0 < len(limited) < 30


def recv_all_or_three(sock: socket.socket) -> bytes:
    return recv_exactly(sock, 3)


def read_until_reset(sock: socket.socket) -> None:
    for _ in range(50):
        sock.sendall(b"x")
        if not sock.recv(10):
            return
        time.sleep(0.01)


def test_disable_refuses_and_closes_enable_listens_again(server: ProxyServer, echo: str) -> None:
    """A disabled proxy closes its connections and refuses new ones on the same port."""
    info = server.create_proxy("p", echo)
    with connect(server) as sock:
        sock.sendall(b"up")
        assert recv_exactly(sock, 2) == b"up"
        server.update_proxy("p", enabled=False)
        assert recv_all(sock) == b""
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((info.host, info.port), timeout=2)
    server.update_proxy("p", enabled=True)
    with connect(server) as sock:
        sock.sendall(b"ok")
        assert recv_exactly(sock, 2) == b"ok"


def test_fault_proxy_takes_toxics_too(echo: str) -> None:
    """The kit's FaultProxy runs on the same engine: a toxic added to it acts."""
    host, port = echo.split(":")
    with FaultProxy(host, int(port)) as proxy:
        proxy.add_toxic(Toxic(type="limit_data", attributes={"bytes": 3}))
        with socket.create_connection(proxy.address, timeout=5) as sock:
            sock.sendall(b"abcdef")
            assert recv_all(sock) == b"abc"
        proxy.remove_toxic("limit_data_downstream")
        with pytest.raises(ProxyError) as info:
            proxy.remove_toxic("limit_data_downstream")
        assert info.value.status == 404


# -- the HTTP API ------------------------------------------------------------------------------


@pytest.fixture
def api(echo: str) -> Iterator[tuple[ProxyServer, Toxiproxy]]:
    """A proxy server with its API on a free port, and a toxiproxy-python client for it."""
    with ProxyServer(port=0) as server:
        client = Toxiproxy()
        host, port = server.api_address  # type: ignore[misc]
        client.update_api_consumer(host, port)
        yield server, client


def test_toxiproxy_python_drives_proxies_and_toxics(
    api: tuple[ProxyServer, Toxiproxy], echo: str
) -> None:
    """toxiproxy-python creates, lists, toxics, disables, resets and deletes proxies."""
    server, client = api
    assert client.running()
    assert client.version()
    proxy = client.create(upstream=echo, name="echo")
    host, port = proxy.listen.rsplit(":", 1)
    assert int(port) > 0 and proxy.enabled is True
    assert set(client.proxies()) == {"echo"}
    with pytest.raises(ProxyExists):
        client.create(upstream=echo, name="echo")

    proxy.add_toxic(type="limit_data", attributes={"bytes": 2})
    assert proxy.get_toxic("limit_data_downstream").attributes == {"bytes": 2}
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(b"hello")
        assert recv_all(sock) == b"he"
    proxy.destroy_toxic("limit_data_downstream")
    assert proxy.toxics() == {}
    with pytest.raises(NotFound):
        proxy.destroy_toxic("limit_data_downstream")

    with proxy.down():
        assert server.get_proxy("echo").enabled is False
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((host, int(port)), timeout=2)
    assert server.get_proxy("echo").enabled is True

    proxy.add_toxic(type="latency", stream="upstream", attributes={"latency": 100})
    client.reset()
    assert proxy.toxics() == {}
    assert client.destroy(proxy)
    assert client.proxies() == {}


def test_populate_is_idempotent(api: tuple[ProxyServer, Toxiproxy], echo: str) -> None:
    """POST /populate twice with the same proxies keeps them (and their toxics)."""
    server, _ = api
    url = f"{server.api_url}/populate"
    body = json.dumps([{"name": "a", "upstream": echo, "listen": "127.0.0.1:0"}]).encode()
    first = json.load(urllib.request.urlopen(urllib.request.Request(url, body, method="POST")))
    server.add_toxic("a", Toxic(type="latency"))
    second = json.load(urllib.request.urlopen(urllib.request.Request(url, body, method="POST")))
    assert first["proxies"][0]["listen"] == second["proxies"][0]["listen"]
    assert [t["name"] for t in second["proxies"][0]["toxics"]] == ["latency_downstream"]


def test_bad_toxic_is_a_400_naming_the_problem(
    api: tuple[ProxyServer, Toxiproxy], echo: str
) -> None:
    """An unknown toxic type or attribute is refused with 400 and says why."""
    server, _ = api
    server.create_proxy("p", echo)
    url = f"{server.api_url}/proxies/p/toxics"
    for toxic, words in (
        ({"type": "gremlins"}, "toxic type"),
        ({"type": "latency", "attributes": {"latency": -1}}, "latency.latency"),
    ):
        request = urllib.request.Request(url, json.dumps(toxic).encode(), method="POST")
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(request)
        assert info.value.code == 400
        assert words in json.load(info.value)["error"]


def test_token_protects_the_api(echo: str) -> None:
    """With a token, requests without it get 401; bearer and basic auth both work."""
    with ProxyServer(port=0, token="s3cret") as server:
        url = f"{server.api_url}/proxies"
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(url)
        assert info.value.code == 401
        for header in ("Bearer s3cret", "Basic " + base64.b64encode(b"x:s3cret").decode()):
            request = urllib.request.Request(url, headers={"Authorization": header})
            assert json.load(urllib.request.urlopen(request)) == {}
    with pytest.raises(ValueError, match="token"):
        ProxyServer(host="0.0.0.0", port=0)


def test_proxy_command_serves_the_api(echo: str) -> None:
    """`veritas-resilience proxy` serves Toxiproxy's API and creates the --config proxies."""
    import subprocess
    import sys
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as config:
        json.dump([{"name": "echo", "upstream": echo, "listen": "127.0.0.1:0"}], config)
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "veritas_resilience",
            "proxy",
            "--port",
            "0",
            "--config",
            config.name,
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        lines = [process.stdout.readline() for _ in range(2)]
        assert lines[0].startswith("proxy echo: 127.0.0.1:")
        url = lines[1].split(" on ", 1)[1].split()[0]
        assert urllib.request.urlopen(f"{url}/version").read().decode()
        assert set(json.load(urllib.request.urlopen(f"{url}/proxies"))) == {"echo"}
    finally:
        process.terminate()
        process.wait(timeout=10)


def _request(url: str, method: str, body: object) -> Any:
    data = json.dumps(body).encode()
    with urllib.request.urlopen(urllib.request.Request(url, data, method=method)) as response:
        return json.load(response)


def test_api_updates_toxics_and_upstreams(api: tuple[ProxyServer, Toxiproxy], echo: str) -> None:
    """POST/PATCH on a toxic changes its attributes; POST on a proxy moves its upstream."""
    server, _ = api
    info = server.create_proxy("p", "127.0.0.1:9")  # nothing listens there
    base = f"{server.api_url}/proxies/p"
    _request(f"{base}/toxics", "POST", {"type": "limit_data", "attributes": {"bytes": 1}})
    updated = _request(
        f"{base}/toxics/limit_data_downstream", "PATCH", {"attributes": {"bytes": 3}}
    )
    assert updated == {
        "name": "limit_data_downstream",
        "type": "limit_data",
        "stream": "downstream",
        "toxicity": 1.0,
        "attributes": {"bytes": 3},
    }
    assert _request(base, "POST", {"upstream": echo})["upstream"] == echo
    with socket.create_connection((info.host, info.port), timeout=5) as sock:
        sock.sendall(b"abcdef")
        assert recv_all(sock) == b"abc"
