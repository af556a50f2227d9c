"""A fault-injecting HTTP proxy in front of one moto service: forwards requests, or, while
`failing` is set, answers 503 ServiceUnavailable like an AWS outage, and while `throttling` is
set, answers 400 Throttling "Maximum sending rate exceeded." as SES does past its sending
rate (neither is forwarded: the service does nothing). Binds 127.0.0.1.

It can also slow the service down: `delay(body)` gives the seconds to wait before a request
is forwarded (a slow downstream, or, for the requests it picks, a hung call). Every request
is recorded (`requests`: when it arrived and when its forwarding ended) with the number in
flight at once (`in_flight`, `most_in_flight`); `on_arrival(proxy, request)` runs in the
request's thread as it arrives, before any delay. A request whose client has gone (killed)
is still forwarded, as the real service would still act on it. Each request keeps the HTTP
status it was answered with (`status`: the upstream's, or the injected 503/400)."""

from __future__ import annotations

import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_OUTAGE = (b'<ErrorResponse><Error><Type>Receiver</Type><Code>ServiceUnavailable</Code>'
           b'<Message>injected outage</Message></Error><RequestId>fault</RequestId></ErrorResponse>')
_THROTTLED = (b'<ErrorResponse><Error><Type>Sender</Type><Code>Throttling</Code>'
              b'<Message>Maximum sending rate exceeded.</Message></Error><RequestId>fault</RequestId></ErrorResponse>')


@dataclass(eq=False)
class Request:
    n: int
    body: bytes
    client_port: int
    arrived: float  # time.monotonic()
    delay: float
    finished: float | None = None  # forwarded and answered by the upstream (or refused)
    action: str = ""  # the API call: X-Amz-Target's operation (JSON protocols) or Action= (query)
    status: int | None = None  # the HTTP status it was answered with (None: not answered yet)

    def in_flight_at(self, t: float) -> bool:
        return self.arrived <= t and (self.finished is None or self.finished > t)

    @property
    def text(self) -> str:
        return self.body.decode(errors="replace")


def ses_subject(body: bytes) -> str | None:
    """The subject of an SES SendEmail (query protocol, form-encoded)."""
    values = urllib.parse.parse_qs(body.decode(errors="replace")).get("Message.Subject.Data")
    return values[0] if values else None


def _query_action(body: bytes) -> str:
    values = urllib.parse.parse_qs(body.decode(errors="replace")).get("Action")
    return values[0] if values else ""


class _Server(ThreadingHTTPServer):
    request_queue_size = 256  # up to ORDERS_CDC_MAX_IN_FLIGHT connections arrive at once
    daemon_threads = True


class FaultProxy:
    def __init__(self, upstream: str, delay: Callable[[bytes], float] | None = None,
                 on_arrival: Callable[[FaultProxy, Request], None] | None = None):
        self.upstream = upstream.rstrip("/")
        self.failing = threading.Event()
        self.refused = 0
        self.throttling = threading.Event()
        self.throttled = 0
        self.delay = delay or (lambda body: 0.0)
        self.on_arrival = on_arrival
        self.lock = threading.Lock()
        self.requests: list[Request] = []
        self.in_flight = 0
        self.most_in_flight = 0
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                target = self.headers.get("X-Amz-Target", "")
                action = target.rsplit(".", 1)[-1] if target else _query_action(body)
                request = proxy._arrive(body, self.client_address[1], action)
                try:
                    self._serve(request, body)
                finally:
                    with proxy.lock:
                        proxy.in_flight -= 1
                        request.finished = request.finished or time.monotonic()

            def _serve(self, request, body):
                if proxy.on_arrival:
                    proxy.on_arrival(proxy, request)
                if proxy.failing.is_set():
                    proxy.refused += 1
                    request.status = 503
                    self._reply(503, _OUTAGE, "text/xml")
                    return
                if proxy.throttling.is_set():
                    proxy.throttled += 1
                    request.status = 400
                    self._reply(400, _THROTTLED, "text/xml")
                    return
                if request.delay > 0:
                    time.sleep(request.delay)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")}
                forward = urllib.request.Request(proxy.upstream + self.path, data=body, headers=headers, method="POST")
                try:
                    # Longer than any call of ours waits (a long soak slows moto to 25 s a reply):
                    # a proxy that gave up first would not see a send the upstream made.
                    with urllib.request.urlopen(forward, timeout=120) as reply:
                        status, payload, kind = reply.status, reply.read(), reply.headers.get("Content-Type", "text/xml")
                except urllib.error.HTTPError as exc:
                    status, payload, kind = exc.code, exc.read(), exc.headers.get("Content-Type", "text/xml")
                request.finished, request.status = time.monotonic(), status  # the upstream has acted on it
                self._reply(status, payload, kind)

            def _reply(self, status, payload, content_type):
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", content_type)
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except OSError:  # the client is gone (killed): nobody to answer
                    pass

            def log_message(self, *args):
                pass

        self.server = _Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    def _arrive(self, body: bytes, client_port: int, action: str) -> Request:
        with self.lock:
            request = Request(len(self.requests), body, client_port, time.monotonic(), max(0.0, float(self.delay(body))),
                              action=action)
            self.requests.append(request)
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
            return request

    def in_flight_at(self, t: float) -> list[Request]:
        with self.lock:
            return [r for r in self.requests if r.in_flight_at(t)]

    def held(self, min_delay: float) -> list[Request]:
        """Requests given at least `min_delay` that are still waiting or being forwarded."""
        with self.lock:
            return [r for r in self.requests if r.delay >= min_delay and r.finished is None]

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
