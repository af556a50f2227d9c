"""moto's server, one request at a time (local only): `python -m orders_cdc.local.moto_server -H HOST -p PORT`.

moto's in-memory backends are not safe under concurrent requests, and the consumer makes
many at once: moto's TransactWriteItems snapshots each table it touches and, when the
transaction is cancelled (a lock already taken, a stale view row), puts the snapshot back,
erasing what other requests wrote to that table meanwhile (idempotency markers: a change
then counted twice); concurrent scans fail with "dictionary changed size during iteration".
DynamoDB has none of this. Locally, requests keep their own connections (threads) but run
through moto one at a time.
"""

from __future__ import annotations

import argparse
import threading
from collections.abc import Callable, Iterable
from typing import Any

from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
from werkzeug.serving import run_simple


def serialized(app: Callable[..., Iterable[bytes]]) -> Callable[..., list[bytes]]:
    lock = threading.Lock()

    def one_at_a_time(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        with lock:
            return [b"".join(app(environ, start_response))]

    return one_at_a_time


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="orders_cdc.local.moto_server")
    parser.add_argument("-H", "--host", default="127.0.0.1")
    parser.add_argument("-p", "--port", type=int, required=True)
    args = parser.parse_args(argv)
    import os

    os.environ.setdefault("MOTO_PORT", str(args.port))  # moto builds queue URLs with it
    app = DomainDispatcherApplication(create_backend_app)
    run_simple(args.host, args.port, serialized(app), threaded=True, request_handler=MotoRequestHandler)


if __name__ == "__main__":
    main()
