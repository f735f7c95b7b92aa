"""What the chaos fault proxy costs: round-trip latency and throughput, direct vs. proxied.

A blocking echo server on loopback; a client sends 64-byte messages and waits for each echo
(round trips), then streams 32 MiB through (throughput). Three paths: direct, through
``ProxyServer`` with no toxic, and with a toxic that does nothing to the data (``limit_data``
with a limit too high to reach, so every chunk goes through the toxic checks).

    python -m benchmarks.bench_proxy [--short] [--write]
"""

from __future__ import annotations

import argparse
import socket
import statistics
import threading
import time

from benchmarks._results import write_section
from veritas_resilience.chaos import ProxyServer, Toxic


def _echo_server() -> tuple[socket.socket, int]:
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=_echo, args=(conn,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    return listener, listener.getsockname()[1]


def _echo(conn: socket.socket) -> None:
    with conn:
        while data := conn.recv(262144):
            conn.sendall(data)


def _round_trips(port: int, n: int) -> list[float]:
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        payload = b"x" * 64
        samples = []
        for _ in range(n):
            started = time.perf_counter()
            sock.sendall(payload)
            got = 0
            while got < len(payload):
                got += len(sock.recv(4096))
            samples.append(time.perf_counter() - started)
    return samples


def _throughput(port: int, total: int) -> float:
    with socket.create_connection(("127.0.0.1", port)) as sock:
        chunk = b"y" * 65536
        received = 0

        def reader() -> None:
            nonlocal received
            while received < total:
                data = sock.recv(262144)
                if not data:
                    return
                received += len(data)

        thread = threading.Thread(target=reader)
        started = time.perf_counter()
        thread.start()
        sent = 0
        while sent < total:
            sock.sendall(chunk)
            sent += len(chunk)
        thread.join()
        return total / (time.perf_counter() - started) / 1e6


def main() -> None:
    """Run the benchmark and print (and with --write, record) the table."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--short", action="store_true", help="a quick run to validate")
    parser.add_argument("--write", action="store_true", help="write the RESULTS.md section")
    args = parser.parse_args()
    trips = 300 if args.short else 5000
    volume = (4 if args.short else 32) * 1024 * 1024

    listener, port = _echo_server()
    with ProxyServer() as server:
        plain = server.create_proxy("plain", f"127.0.0.1:{port}").port
        toxic = server.create_proxy("toxic", f"127.0.0.1:{port}").port
        server.add_toxic("toxic", Toxic(type="limit_data", attributes={"bytes": 10**15}))
        paths: list[tuple[str, int]] = [
            ("direct", port),
            ("ProxyServer, no toxic", plain),
            ("ProxyServer, a pass-through toxic", toxic),
        ]
        rounds = 5
        samples: dict[str, list[float]] = {label: [] for label, _ in paths}
        rates: dict[str, list[float]] = {label: [] for label, _ in paths}
        for target in (t for _, t in paths):
            _round_trips(target, 100)  # warm up
        for _ in range(rounds):  # alternate the paths, so that noise hits them alike
            for label, target in paths:
                samples[label] += _round_trips(target, trips // rounds)
                rates[label].append(_throughput(target, volume))
        rows = []
        direct_median = statistics.median(samples["direct"]) * 1e6
        for label, _ in paths:
            ordered = sorted(samples[label])
            median = statistics.median(ordered) * 1e6
            p99 = ordered[int(len(ordered) * 0.99) - 1] * 1e6
            added = "" if label == "direct" else f"+{median - direct_median:.0f}"
            rate = statistics.median(rates[label])
            rows.append(f"| {label} | {median:.0f} | {p99:.0f} | {added} | {rate:.0f} |")
    listener.close()
    body = (
        f"{trips} round trips of 64 bytes each (one connection, TCP_NODELAY) and "
        f"{volume // 2**20} MiB streamed through an echo server on loopback; 5 alternating "
        "rounds (round trips pooled, throughput: median of the rounds).\n\n"
        "| path | median round trip (µs) | p99 (µs) | added (µs) | throughput (MB/s) |\n"
        "|---|---:|---:|---:|---:|\n" + "\n".join(rows) + "\n"
    )
    print(body)
    if args.write:
        write_section("proxy", "Chaos fault proxy (benchmarks/bench_proxy.py)", body)


if __name__ == "__main__":
    main()
