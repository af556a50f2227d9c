"""B3 (end to end through the real daemon) and B4 (AWS calls per record, counted during B3).

The local stack of `make run-local` (moto + LocalStack Kinesis + the local bridge + the real
KCL MultiLangDaemon through `orders-cdc run`, app.properties as is), in its own state
directory and on free ports. After one warm-up change has gone all the way through (lease
acquisition), N changes from bench.orders are written to the Orders table at a steady rate.

B3 timings, per change, all epoch times on this one machine:
- ``write``: right after our PutItem/DeleteItem returned;
- ``arrival``: Kinesis's ApproximateArrivalTimestamp (read back from LocalStack afterwards);
- ``processed``: the analytics handler's ``processed_at`` in its Firehose record (the
  handler stamps it while building the batch's PutRecordBatch, the call follows at once);
- ``batch done``: the EMF line the processor logs when the whole batch (every handler) is
  settled, matched to the change by shard and time.
The headline delay is write -> processed; write -> batch done is reported beside it.

B4: moto's request recorder (``/moto-api/recorder``) logs every request moto serves. Each
is attributed by what it is: Firehose PutRecordBatch by its records' ``record_type``
(analytics | audit), SES SendEmail by subject, SQS SendMessageBatch by queue, DynamoDB
TransactWriteItems / PutItem by table, the idempotency table by name; the KCL daemon's own
lease-table calls (Java user agent), the bridge's DynamoDB Streams reads and our own table
writes are set apart. Records per route come from applying the real routes to the written
changes. The recording covers exactly the measured window (reset after the warm-up).
"""

from __future__ import annotations

import base64
import json
import os
import queue
import threading
import time
import urllib.parse
import zlib
import urllib.request
from collections import Counter, defaultdict
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from boto3.dynamodb.types import TypeSerializer

from bench.common import ROOT, WORK, median, percentile
from bench.fakes import key_routes
from bench.orders import Change, OrderTraffic
from orders_cdc.settings import Resources

STACK_ROOT = WORK / "stack"
_STREAMS_OPERATIONS = frozenset({"DescribeStream", "GetRecords", "GetShardIterator", "ListStreams"})
RECORDING = STACK_ROOT / "moto-recording.jsonl"


def _iso(value: str) -> float:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def _properties(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            out[key.strip()] = value.strip()
    return out


# ----------------------------------------------------------------------------- the recording


class Recording:
    """moto's request log, read as it grows.

    moto's threads append ``json.dumps(entry)`` and ``"\n"`` in two writes without a lock, so
    two requests' newlines can land out of place: the log is read as a stream of JSON
    objects, not as lines. An object not yet complete waits for the next read; one that two
    writes really interleaved (not seen so far) is skipped and counted in ``corrupt``.
    """

    _START = '{"headers"'

    def __init__(self, endpoint: str, path: Path) -> None:
        self.endpoint, self.path = endpoint, path
        self._offset = 0
        self._pending = ""
        self.corrupt = 0

    def _post(self, action: str) -> None:
        req = urllib.request.Request(f"{self.endpoint}/moto-api/recorder/{action}", data=b"", method="POST")
        with urllib.request.urlopen(req, timeout=10):  # noqa: S310 - loopback only
            pass

    def start(self) -> None:
        self._post("start-recording")

    def reset(self) -> None:
        self._post("reset-recording")
        self._offset = 0
        self._pending = ""

    def stop(self) -> None:
        self._post("stop-recording")

    def new_entries(self) -> list[dict[str, Any]]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return []
        self._offset += len(data)
        text = self._pending + data.decode("utf-8", "replace")
        decoder = json.JSONDecoder()
        out, i, n = [], 0, len(text)
        while True:
            while i < n and text[i].isspace():
                i += 1
            if i >= n:
                break
            try:
                entry, i = decoder.raw_decode(text, i)
            except ValueError:
                later = text.find(self._START, i + 1)
                if later < 0:
                    break  # incomplete: the rest is still being written
                self.corrupt += 1
                i = later
                continue
            out.append(entry)
        self._pending = text[i:]
        return out


def _body(entry: dict[str, Any]) -> bytes:
    body = entry.get("body") or ""
    return base64.b64decode(body) if entry.get("body_encoded") else body.encode()


def classify(entry: dict[str, Any]) -> tuple[str, str, str, dict[str, Any] | None]:
    """(service, operation, user agent family, parsed JSON body or None)."""
    headers = {k.lower(): v for k, v in entry.get("headers", {}).items()}
    auth = headers.get("authorization", "")
    service = "?"
    if "Credential=" in auth:
        scope = auth.split("Credential=", 1)[1].split(",", 1)[0].split("/")
        if len(scope) >= 4:
            service = scope[3]
    agent = "java" if "aws-sdk-java" in headers.get("user-agent", "").lower() else "python"
    body = _body(entry)
    target = headers.get("x-amz-target")
    if target:
        operation = target.rsplit(".", 1)[-1]
        try:
            return service, operation, agent, json.loads(body or b"{}")
        except ValueError:
            return service, operation, agent, None
    form = urllib.parse.parse_qs(body.decode("utf-8", "replace"))
    if "Action" in form:
        return service, form["Action"][0], agent, {k: v[0] for k, v in form.items()}
    return service, f"{entry.get('method')} {urllib.parse.urlparse(entry.get('url', '')).path}", agent, None


def attribute(service: str, operation: str, agent: str, body: dict[str, Any] | None, names: Resources) -> str:
    """Which part of the system made this request."""
    if agent == "java":
        return "kcl-daemon"
    if service == "dynamodbstreams":
        return "bridge"
    body = body or {}
    if service == "firehose" and operation in ("PutRecordBatch", "PutRecord"):
        records = body.get("Records") or [body.get("Record", {})]
        try:
            first = json.loads(base64.b64decode(records[0]["Data"]).splitlines()[0])
            return str(first.get("record_type", "analytics"))
        except (KeyError, IndexError, ValueError):
            return "firehose-other"
    if service in ("ses", "email") and operation.startswith("Send"):
        subject = body.get("Message.Subject.Data", "")
        if "has shipped" in subject:
            return "notification.shipped_email"
        if "has been delivered" in subject:
            return "notification.delivered_email"
        if subject.startswith("How was"):
            return "notification.review_request"
        return "notification"
    if service == "sqs":
        url = str(body.get("QueueUrl", ""))
        if operation == "GetQueueUrl":
            return "processor start-up"
        if url.endswith("/" + names.refund_queue):
            return "refunds"
        if url.endswith("/" + names.dlq_queue):
            return "dead-letters"
        return "sqs-other"
    if service == "dynamodb" and operation in _STREAMS_OPERATIONS:
        return "bridge"  # DynamoDB Streams signs as "dynamodb"
    if service == "dynamodb":
        tables = _tables(body)
        own = tables - {names.idempotency_table}  # ATOMIC routes commit their markers in their own transaction
        if own and own <= {names.order_metrics_table, names.product_metrics_table}:
            return "metrics"
        if own == {names.inventory_table}:
            return "inventory"
        if tables & {names.idempotency_table}:
            return "idempotency"
        if tables == {names.orders_table} or (not tables and operation in ("DescribeTable", "ListTables")):
            return "writer/bridge"
        if tables == {names.product_orders_table}:
            return "views"
        return "dynamodb-other:" + ",".join(sorted(tables))
    if service == "s3":
        return "s3 (bench reads)"
    return f"{service}-other"


def _tables(body: dict[str, Any]) -> set[str]:
    tables = set()
    if "TableName" in body:
        tables.add(body["TableName"])
    for name in body.get("RequestItems", {}) or {}:
        tables.add(name)
    for item in body.get("TransactItems", []) or []:
        for action in item.values():
            if isinstance(action, dict) and "TableName" in action:
                tables.add(action["TableName"])
    return tables


def _entries(operation: str, body: dict[str, Any] | None) -> int:
    body = body or {}
    for key in ("Records", "Entries", "TransactItems"):
        if key in body:
            return len(body[key])
    if "RequestItems" in body:
        return sum(len(v) if isinstance(v, list) else len(v.get("Keys", [])) for v in body["RequestItems"].values())
    return 1


# ----------------------------------------------------------------------------- the run


def _route_counts(changes: list[Change], resources) -> Counter[str]:
    """How many of the written changes each real route matches (the B4 denominators)."""
    from orders_cdc.change import decode_kinesis_data
    from orders_cdc.routing import Router
    from processors import all_routes
    from tests.factories import kds_record
    import orjson

    router = Router(all_routes(resources))
    counts: Counter[str] = Counter()
    for n, c in enumerate(changes):
        doc = kds_record(c.event, new=c.new, old=c.old, keys=c.key, created_us=1_800_000_000_000_000 + n,
                         table=resources.orders_table)
        for route in router.match(decode_kinesis_data(orjson.dumps(doc))):
            counts[route.name] += 1
    return counts


def _arrivals(kinesis, stream: str) -> dict[tuple[str, str], float]:
    """(shard, sequence number) -> ApproximateArrivalTimestamp (epoch s), read back from Kinesis."""
    out = {}
    for shard in kinesis.list_shards(StreamName=stream)["Shards"]:
        it = kinesis.get_shard_iterator(StreamName=stream, ShardId=shard["ShardId"],
                                        ShardIteratorType="TRIM_HORIZON")["ShardIterator"]
        for _ in range(1000):
            resp = kinesis.get_records(ShardIterator=it, Limit=10000)
            for r in resp["Records"]:
                out[(shard["ShardId"], r["SequenceNumber"])] = r["ApproximateArrivalTimestamp"].timestamp()
            it = resp.get("NextShardIterator")
            if not it or (not resp["Records"] and resp.get("MillisBehindLatest", 0) == 0):
                break
    return out


def _emf_batches(log_path: Path, since_ms: int) -> list[dict[str, Any]]:
    out = []
    for line in log_path.read_text(errors="replace").splitlines():
        if line.startswith('{"_aws"'):
            try:
                doc = json.loads(line)
            except ValueError:
                continue
            if doc["_aws"]["Timestamp"] >= since_ms and doc.get("Records"):
                out.append({"shard": doc.get("Shard"), "records": doc["Records"], "done_at": doc["_aws"]["Timestamp"] / 1000,
                            "seconds": doc.get("BatchSeconds")})
    return out


def _stats(values: list[float]) -> dict[str, float]:
    return {"p50_s": round(median(values), 3), "p95_s": round(percentile(values, 95), 3),
            "max_s": round(max(values), 3), "mean_s": round(sum(values) / len(values), 3)}


class Writer:
    """Writes changes at a steady rate from a few threads; one order always goes to the same
    thread, so each item's changes reach the table in order. Records when each write returned."""

    def __init__(self, put: Callable[[Change], None], threads: int = 4) -> None:
        self._put = put
        self._queues: list[queue.Queue] = [queue.Queue() for _ in range(threads)]
        self.written: dict[tuple[str, str, str], float] = {}
        self.errors: list[BaseException] = []
        self._threads = [threading.Thread(target=self._work, args=(q,), daemon=True) for q in self._queues]
        for t in self._threads:
            t.start()

    def _work(self, q: queue.Queue) -> None:
        while (change := q.get()) is not None:
            try:
                self._put(change)
            except BaseException as exc:  # noqa: BLE001 - reported after the run
                self.errors.append(exc)
                continue
            self.written[change_key(change)] = time.time()

    def submit(self, change: Change) -> None:
        self._queues[zlib.crc32(change.key["order_id"].encode()) % len(self._queues)].put(change)

    def close(self) -> None:
        for q in self._queues:
            q.put(None)
        for t in self._threads:
            t.join(120)


def change_key(change: Change) -> tuple[str, str, str]:
    image = change.new if change.event != "REMOVE" else change.old
    return change.key["order_id"], change.event, str(image["version"])


def event_key(event: dict[str, Any]) -> tuple[str, str, str]:
    return event["keys"].get("order_id"), event["event_name"], str(event["item"].get("version"))


def run(n: int = 1000, rate: float = 50.0, low_n: int = 100, low_rate: float = 5.0,
        progress: Callable[[str], None] = print, lease_timeout: float = 300.0,
        drain_timeout: float = 240.0) -> tuple[dict[str, Any], dict[str, Any]]:
    """Two phases on one stack: ``low_n`` changes at ``low_rate``/s (the processor keeps up),
    then ``n`` at ``rate``/s (the headline, and B4). Returns (B3, B4)."""
    from orders_cdc.local.runner import LocalRun, LocalRunConfig
    from orders_cdc.local.stack import LocalStackConfig, free_port, stop_stale

    stop_stale(STACK_ROOT)  # a bench stack left by a crashed run (ours only: this root's marker)
    STACK_ROOT.mkdir(parents=True, exist_ok=True)
    RECORDING.unlink(missing_ok=True)
    os.environ["MOTO_RECORDER_FILEPATH"] = str(RECORDING)  # moto server inherits it
    cfg = LocalRunConfig(stack=LocalStackConfig(root=STACK_ROOT, moto_port=free_port(), localstack_port=free_port()))
    props = _properties(cfg.properties)
    idle_ms = int(props.get("idleTimeBetweenReadsInMillis", "1000"))
    names = cfg.names
    resources = Resources()  # the children run with the default names, which the local stack uses
    started = time.monotonic()
    serializer = TypeSerializer()
    phases: dict[str, dict[str, Any]] = {}
    with LocalRun(cfg) as run_:
        progress(f"  B3 local stack + daemon started in {time.monotonic() - started:.0f}s; waiting for the leases")
        recording = Recording(run_.stack.moto.endpoint, RECORDING)
        recording.start()
        daemon = run_.daemons[0]
        local = threading.local()

        def put(change: Change) -> None:
            if not hasattr(local, "ddb"):
                local.ddb = run_.client("dynamodb")
            if change.event == "REMOVE":
                local.ddb.delete_item(TableName=names.orders_table,
                                      Key={k: serializer.serialize(v) for k, v in change.key.items()})
            else:
                local.ddb.put_item(TableName=names.orders_table,
                                   Item={k: serializer.serialize(v) for k, v in change.new.items()})

        # Warm-up: one change all the way through = leases held, children started.
        put(OrderTraffic(seed=1, prefix="warm").step())
        deadline = time.monotonic() + lease_timeout
        warmed = False
        while not warmed:
            if not daemon.alive():
                raise RuntimeError(f"the KCL daemon exited; see {daemon.log_path}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"no change reached the processor in {lease_timeout:.0f}s; see {daemon.log_path}")
            for entry in recording.new_entries():
                if attribute(*classify(entry), names) == "analytics":
                    warmed = True
            time.sleep(0.5)
        lease_s = time.monotonic() - started
        progress(f"  B3 first change processed {lease_s:.0f}s after start")
        time.sleep(2.0)  # the warm-up batch's other handlers finish before anything is counted

        traffic = OrderTraffic(seed=11, prefix="b3")

        def phase(label: str, count: int, per_s: float) -> dict[str, Any]:
            progress(f"  B3 {label}: writing {count} changes at {per_s:g}/s")
            recording.reset()
            writer = Writer(put)
            changes: list[Change] = []
            since_ms = int(time.time() * 1000)
            begin = time.monotonic()
            for i in range(count):
                delay = begin + i / per_s - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                change = traffic.step()
                changes.append(change)
                writer.submit(change)
            writer.close()
            write_span = time.monotonic() - begin
            if writer.errors:
                raise RuntimeError(f"{len(writer.errors)} table writes failed: {writer.errors[0]!r}")
            events: dict[tuple[str, str, str], dict[str, Any]] = {}
            entries: list[dict[str, Any]] = []
            deadline = time.monotonic() + drain_timeout
            while True:
                for entry in recording.new_entries():
                    entries.append(entry)
                    service, op, agent, body = classify(entry)
                    if attribute(service, op, agent, body, names) != "analytics":
                        continue
                    for record in body["Records"]:
                        for line in base64.b64decode(record["Data"]).splitlines():
                            event = json.loads(line)
                            if event_key(event) in writer.written:
                                events[event_key(event)] = event
                settled = sum(b["records"] for b in _emf_batches(daemon.log_path, since_ms))
                if len(events) >= count and settled >= count:
                    break
                if time.monotonic() > deadline:
                    progress(f"  B3 {label}: drain timed out, {len(events)}/{count} seen by analytics, {settled} settled")
                    break
                time.sleep(0.5)
            time.sleep(1.0)
            entries += recording.new_entries()
            progress(f"  B3 {label}: {len(events)} changes processed in {time.monotonic() - begin:.0f}s")
            return {"changes": changes, "written": writer.written, "write_span": write_span, "events": events,
                    "entries": entries, "batches": _emf_batches(daemon.log_path, since_ms)}

        if low_n:
            phases["low"] = phase(f"low rate", low_n, low_rate)
        phases["main"] = phase("steady rate", n, rate)
        recording.stop()
        arrivals = _arrivals(run_.client("kinesis"), names.stream)
        progress("  B3 stopping the stack")

    def figures(p: dict[str, Any], count: int, per_s: float) -> dict[str, Any]:
        total, to_batch_end, bridge_leg, kcl_leg = [], [], [], []
        by_shard: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for b in p["batches"]:
            by_shard[b["shard"]].append(b)
        for key, event in p["events"].items():
            written_at = p["written"][key]
            processed = _iso(event["processed_at"])
            total.append(processed - written_at)
            arrival = arrivals.get((event["shard_id"], event["sequence_number"]))
            if arrival is not None:
                bridge_leg.append(arrival - written_at)
                kcl_leg.append(processed - arrival)
            ends = [b["done_at"] for b in by_shard.get(event["shard_id"], []) if b["done_at"] >= processed - 0.002]
            if ends:
                to_batch_end.append(min(ends) - written_at)
        times = sorted(_iso(e["processed_at"]) for e in p["events"].values())
        span = times[-1] - times[0] if len(times) > 1 else 0.0
        mean_total = sum(total) / len(total) if total else 0.0
        batches = p["batches"]
        return {
            "records": len(p["events"]),
            "written": count,
            "target_rate_per_s": per_s,
            "write_rate_per_s": round(count / p["write_span"], 1),
            "sustained_rate_per_s": round((len(times) - 1) / span, 1) if span > 0 else None,
            **(_stats(total) if total else {"p50_s": None, "p95_s": None, "max_s": None}),
            "to_batch_done": _stats(to_batch_end) if to_batch_end else None,
            "write_to_kinesis_arrival": _stats(bridge_leg) if bridge_leg else None,
            "kinesis_arrival_to_handler": _stats(kcl_leg) if kcl_leg else None,
            "polling_share_of_mean_delay": round(idle_ms / 2000 / mean_total, 2) if mean_total else None,
            "batches": {
                "count": len(batches),
                "records_mean": round(sum(b["records"] for b in batches) / len(batches), 1) if batches else None,
                "records_max": max((b["records"] for b in batches), default=None),
                "batch_seconds_p50": round(median([b["seconds"] for b in batches]), 3) if batches else None,
                "batch_seconds_max": round(max(b["seconds"] for b in batches), 3) if batches else None,
            },
        }

    main = figures(phases["main"], n, rate)
    b3: dict[str, Any] = {
        **main,
        "idle_time_between_reads_ms": idle_ms,
        "expected_poll_wait_s": idle_ms / 2000,
        "lease_wait_s": round(lease_s, 1),
        "shards": names.shards,
        "low_rate": figures(phases["low"], low_n, low_rate) if "low" in phases else None,
    }

    # ------------------------------------------------------------------ B4 (main phase)
    routed = _route_counts(phases["main"]["changes"], resources)
    group_of = {route: group for group, routes in HANDLERS.items() for route in routes}
    by_part: dict[str, Counter[str]] = defaultdict(Counter)
    idempotency: dict[str, Counter[str]] = defaultdict(Counter)  # group -> operation -> calls (shared by key count)
    sent: Counter[str] = Counter()
    for entry in phases["main"]["entries"]:
        service, op, agent, body = classify(entry)
        part = attribute(service, op, agent, body, names)
        by_part[part][f"{service}.{op}"] += 1
        sent[part] += _entries(op, body)
        if part == "idempotency":
            owners = key_routes(body or {})
            total_keys = sum(owners.values())
            for route, k in owners.items():
                idempotency[group_of.get(route, route)][f"{service}.{op}"] += k / total_keys
    per_handler = {}
    for part, routes in HANDLERS.items():
        calls = sum(by_part.get(part, Counter()).values())
        guard = sum(idempotency.get(part, Counter()).values())
        records = sum(routed.get(r, 0) for r in routes)
        per_handler[part] = {
            "records": records,
            "calls": calls,
            "calls_per_record": round(calls / records, 3) if records else None,
            "idempotency_calls": round(guard, 1),
            "total_calls_per_record": round((calls + guard) / records, 3) if records else None,
            "entries_sent": sent.get(part, 0),
            "operations": dict(by_part.get(part, {})),
            "idempotency_operations": {k: round(v, 1) for k, v in idempotency.get(part, {}).items()},
        }
    b4 = {
        "calls_per_record": {h: v["calls_per_record"] for h, v in per_handler.items()},
        "total_calls_per_record": {h: v["total_calls_per_record"] for h, v in per_handler.items()},
        "handlers": per_handler,
        "other_requests": {part: dict(ops) for part, ops in by_part.items() if part not in HANDLERS},
        "records": main["records"],
        "batches": main["batches"],
        "recorder_entries_unreadable": recording.corrupt,
        "method": "moto's request recorder over B3's steady-rate window; each request attributed by "
                  "operation, table or queue, Firehose record_type and email subject; idempotency-table "
                  "requests by the route names in their keys (shared by key count). calls_per_record = "
                  "the handler's own calls; total_calls_per_record adds the idempotency calls made for it",
    }
    return b3, b4


HANDLERS = {
    "analytics": ["analytics.firehose_copy"],
    "audit": ["audit.firehose_audit"],
    "views": ["views.product_orders"],
    "metrics": ["metrics.aggregates"],
    "inventory": ["inventory.shipped", "inventory.cancelled"],
    "refunds": ["refunds.request"],
    "notification.shipped_email": ["notification.shipped_email"],
    "notification.delivered_email": ["notification.delivered_email"],
    "notification.review_request": ["notification.review_request"],
}
