"""``veritas-resilience proxy``: the fault proxy server with Toxiproxy's HTTP API."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from ._errors import ProxyError
from ._server import ProxyServer

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the proxy's options to its subcommand parser."""
    parser.add_argument("--host", default="127.0.0.1", help="address of the HTTP API")
    parser.add_argument("--port", type=int, default=8474, help="port of the HTTP API (8474)")
    parser.add_argument(
        "--token-env",
        metavar="VAR",
        help="environment variable holding the API token (required off loopback)",
    )
    parser.add_argument(
        "--config",
        type=Path,
        help="a JSON list of proxies to create at start, as Toxiproxy's -config",
    )


def run(args: argparse.Namespace) -> int:
    """Serve until interrupted; return the exit status."""
    token = os.environ.get(args.token_env) if args.token_env else None
    if args.token_env and not token:
        print(f"veritas-resilience proxy: ${args.token_env} is empty or unset")
        return 2
    try:
        server = ProxyServer(args.host, args.port, token=token)
    except (ValueError, OSError) as exc:
        print(f"veritas-resilience proxy: {exc}")
        return 2
    try:
        if args.config is not None:
            for info in server.populate(json.loads(args.config.read_text())):
                print(f"proxy {info.name}: {info.listen} -> {info.upstream}")
    except (ProxyError, OSError, ValueError) as exc:
        server.close()
        print(f"veritas-resilience proxy: --config: {exc}")
        return 2
    print(f"fault proxy with Toxiproxy's API on {server.api_url} (Ctrl-C to stop)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0
