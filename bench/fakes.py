"""In-memory stand-ins for the handlers' boto3 clients, so B1 measures only our code.

``FakeClient`` accepts any operation (``__getattr__``), counts it under the route that is
running, and answers with a plausible success response: the handlers (and whatever wraps
them later, e.g. an idempotency layer) take their normal success paths. Nothing is stored
but counters. ``FakeClients`` is ``orders_cdc.app.Clients`` with every service swapped.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import replace
from typing import Any

import orjson
from botocore.exceptions import ClientError

from orders_cdc.app import Clients
from orders_cdc.routing import Route

NO_ROUTE = "(pipeline, outside handlers)"
_OK = {"HTTPStatusCode": 200, "RetryAttempts": 0}


class CallLog:
    """(route, service, operation) -> calls, and -> entries (records/messages/items sent)."""

    def __init__(self) -> None:
        # The pipeline runs each handler call on a worker thread, and a handler may fan out to
        # threads of its own (views): the route is kept per thread, and also as "the route
        # running now" for threads that a handler started (handler calls run one at a time).
        self._local = threading.local()
        self._active = NO_ROUTE
        self._lock = threading.Lock()
        self.calls: Counter[tuple[str, str, str]] = Counter()
        self.entries: Counter[tuple[str, str, str]] = Counter()
        self.records: Counter[str] = Counter()  # changes handed to each route
        self.seconds: Counter[str] = Counter()  # wall time inside each route's handler

    def attributed(self, routes: Iterable[Route]) -> list[Route]:
        """The same routes, each handler wrapped so that calls made inside it count for it."""
        out = []
        for route in routes:
            out.append(replace(route, handler=self._wrap(route.name, route.handler, route.per_change)))
        return out

    def _wrap(self, name: str, handler, per_change: bool = False):
        log = self

        def attributed(changes, ctx):
            previous = getattr(log._local, "route", None)
            log._local.route = log._active = name
            started = time.perf_counter()
            try:
                return handler(changes, ctx)
            finally:
                elapsed = time.perf_counter() - started
                log._local.route = previous
                log._active = NO_ROUTE
                with log._lock:
                    log.records[name] += 1 if per_change else len(changes)
                    log.seconds[name] += elapsed

        attributed.__name__ = getattr(handler, "__name__", name)
        return attributed

    @property
    def route(self) -> str:
        return getattr(self._local, "route", None) or self._active

    def count(self, service: str, operation: str, kwargs: dict[str, Any]) -> None:
        entries = _entries(kwargs)
        with self._lock:
            route = self.route
            if route == NO_ROUTE and service == "dynamodb":
                # The pipeline's idempotency calls, made around the handlers:
                # attributed to the routes named in their keys, shared by key count.
                owners = key_routes(kwargs)
                total = sum(owners.values())
                if total:
                    for owner, n in owners.items():
                        key = (f"{owner} [idempotency]", service, operation)
                        self.calls[key] += n / total
                        self.entries[key] += n
                    return
            key = (route, service, operation)
            self.calls[key] += 1
            self.entries[key] += entries

    def save(self, path: str | None) -> None:
        """Write to_json() to ``path`` (the children's --calls-out); nothing without one."""
        if path:
            with open(path, "wb") as out:
                out.write(orjson.dumps(self.to_json()))

    def to_json(self) -> dict[str, Any]:
        return {
            "calls": [[r, s, o, n, self.entries[(r, s, o)]] for (r, s, o), n in sorted(self.calls.items())],
            "records": dict(self.records),
            "seconds": dict(self.seconds),
        }


def key_routes(request: dict[str, Any]) -> Counter[str]:
    """Route names in the ``id`` keys of an idempotency-table request, counted.

    The pipeline's idempotency store names its items ``<route>#<hash>`` (reactions) and
    ``hwm#<route>#<hash>`` (high-water marks): the request itself says which route it is for.
    """
    ids: list[str] = []

    def take(item: Any) -> None:
        if isinstance(item, dict) and isinstance(item.get("id"), dict) and isinstance(item["id"].get("S"), str):
            ids.append(item["id"]["S"])

    take(request.get("Item"))
    take(request.get("Key"))
    for value in (request.get("RequestItems") or {}).values():
        if isinstance(value, dict):
            for key in value.get("Keys", []):
                take(key)
        elif isinstance(value, list):
            for req in value:
                take(req.get("PutRequest", {}).get("Item"))
                take(req.get("DeleteRequest", {}).get("Key"))
    for action in request.get("TransactItems", []) or []:
        for op in action.values():
            if isinstance(op, dict):
                take(op.get("Item"))
                take(op.get("Key"))
    routes: Counter[str] = Counter()
    for i in ids:
        parts = i.split("#")
        if len(parts) >= 3 and parts[0] == "hwm":
            routes[parts[1]] += 1
        elif len(parts) >= 2:
            routes[parts[0]] += 1
    return routes


def _entries(kwargs: dict[str, Any]) -> int:
    for name in ("Records", "Entries", "TransactItems"):
        if name in kwargs:
            return len(kwargs[name])
    if "RequestItems" in kwargs:
        return sum(len(v) if isinstance(v, list) else len(v.get("Keys", ())) for v in kwargs["RequestItems"].values())
    return 1


def _reply(operation: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """A success response shaped like the real one, for the operations the handlers use."""
    if operation == "put_record_batch":
        reply = {"FailedPutCount": 0, "Encrypted": False,
                 "RequestResponses": [{"RecordId": str(i)} for i in range(len(kwargs.get("Records", ())))]}
    elif operation == "put_records":
        reply = {"FailedRecordCount": 0,
                 "Records": [{"SequenceNumber": str(i), "ShardId": "shardId-000000000000"} for i in range(len(kwargs.get("Records", ())))]}
    elif operation == "send_message_batch":
        reply = {"Successful": [{"Id": e["Id"], "MessageId": e["Id"], "MD5OfMessageBody": ""} for e in kwargs.get("Entries", ())],
                 "Failed": []}
    elif operation in ("send_email", "send_raw_email", "send_message"):
        reply = {"MessageId": "fake"}
    elif operation == "get_queue_url":
        reply = {"QueueUrl": f"https://sqs.us-east-1.amazonaws.com/000000000000/{kwargs.get('QueueName', 'queue')}"}
    elif operation == "batch_get_item":
        reply = {"Responses": {table: [] for table in kwargs.get("RequestItems", {})}, "UnprocessedKeys": {}}
    elif operation == "batch_write_item":
        reply = {"UnprocessedItems": {}}
    elif operation == "transact_get_items":
        reply = {"Responses": [{} for _ in kwargs.get("TransactItems", ())]}
    elif operation in ("query", "scan"):
        reply = {"Items": [], "Count": 0, "ScannedCount": 0}
    elif operation == "update_item":
        reply = {"Attributes": {}}
    else:  # put_item, delete_item, get_item (no Item: not found), transact_write_items, ...
        reply = {}
    reply["ResponseMetadata"] = _OK
    return reply


class _Exceptions:
    """``client.exceptions.X``: a ClientError subclass per name, as botocore builds them."""

    def __init__(self) -> None:
        self._made: dict[str, type] = {}

    def __getattr__(self, name: str) -> type:
        if name.startswith("_"):
            raise AttributeError(name)
        if name not in self._made:
            self._made[name] = type(name, (ClientError,), {})
        return self._made[name]


class _Events:
    def register(self, *args: Any, **kwargs: Any) -> None:
        pass

    register_first = register_last = unregister = register


class _Meta:
    def __init__(self, service: str) -> None:
        self.service_model = type("ServiceModel", (), {"service_name": service})()
        self.region_name = "us-east-1"
        self.endpoint_url = "https://fake.invalid"
        self.events = _Events()


class FakeClient:
    def __init__(self, service: str, log: CallLog) -> None:
        self._service = service
        self._log = log
        self.meta = _Meta(service)
        self.exceptions = _Exceptions()

    def __getattr__(self, operation: str):
        if operation.startswith("_"):
            raise AttributeError(operation)
        service, log = self._service, self._log

        def call(**kwargs: Any) -> dict[str, Any]:
            log.count(service, operation, kwargs)
            return _reply(operation, kwargs)

        call.__name__ = operation
        setattr(self, operation, call)  # later calls skip __getattr__
        return call


class FakeClients(Clients):
    """The production Clients with every boto3 client replaced by a FakeClient."""

    def __init__(self, settings, log: CallLog | None = None) -> None:
        # A placeholder session: no boto3 client is ever made from it (see _client).
        super().__init__(settings, session=object())  # type: ignore[arg-type]
        self.log = log or CallLog()

    def _client(self, service: str, region: str | None = None, endpoint_url: str | None = None):
        return FakeClient(service, self.log)


def _noop(changes, ctx) -> None:
    return None


def _noop_change(change, ctx) -> list:
    return []  # an ATOMIC route's "nothing to count"; ignored by the others


def bench_routes(routes, mode: str, calls: CallLog) -> list:
    """The routes both children run: the real ones, or (route-only) with no-op handlers;
    wrapped so each AWS call is attributed to its route."""
    from dataclasses import replace

    if mode == "route-only":
        routes = [replace(r, handler=_noop_change if r.per_change else _noop) for r in routes]
    return calls.attributed(routes)
