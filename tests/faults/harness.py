"""Fault-injection harness: a scripted order history, its oracle (what every reaction must
add up to), and a verifier that reads the effects back from the local stack itself."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

from boto3.dynamodb.types import TypeDeserializer, TypeSerializer

from orders_cdc.local.orders import new_order
from orders_cdc.local.runner import LocalRun, wait_until

PATHS = (
    ("pending", "processing", "shipped", "delivered"),
    ("pending", "processing", "cancelled"),
    ("pending", "cancelled"),
    ("pending", "processing", "shipped"),
)
_ser, _de = TypeSerializer(), TypeDeserializer()

# A send's done-marker is written when its round of calls ends: a send answered this long
# before a kill -9 may still have had none.
MARKER_WINDOW = 10.0

COUNTS_FILE = Path(__file__).resolve().parents[2] / ".local" / "faults" / "counts.jsonl"


@dataclass
class History:
    orders: int = 40
    prefix: str = "f"
    versions: list[dict] = field(default_factory=list)  # every item written, in write order

    def __post_init__(self) -> None:
        import random

        rng = random.Random(self.prefix)
        self.paths = {f"{self.prefix}-{i:04d}": PATHS[i % len(PATHS)] for i in range(self.orders)}
        self.first = {oid: new_order(oid, rng) for oid in self.paths}

    def steps(self):
        """Round-robin over the orders, so changes of different orders interleave."""
        depth = max(len(p) for p in self.paths.values())
        for level in range(depth):
            for oid, path in self.paths.items():
                if level < len(path):
                    item = dict(self.first[oid], status=path[level])
                    if path[level] == "shipped":
                        item["tracking_number"] = f"1Z{oid}"
                    if path[level] == "cancelled":
                        item["cancel_reason"] = "customer request"
                    yield item

    def absorb(self, other: History) -> None:
        """Take `other`'s orders and versions into this history's oracle (a soak writes many
        histories; their orders' ids must not collide)."""
        assert not set(other.paths) & set(self.paths), "order ids collide"
        self.paths.update(other.paths)
        self.first.update(other.first)
        self.versions += other.versions

    def kds_changes(self, table: str, created_us: int) -> list[tuple[str, dict]]:
        """Each order's changes as Kinesis-Data-Streams-for-DynamoDB documents (not written to
        the table), in path order, one millisecond apart from `created_us`."""
        from tests.factories import kds_record

        docs: list[tuple[str, dict]] = []
        for oid, path in self.paths.items():
            previous = None
            for step, status in enumerate(path):
                item = dict(self.first[oid], status=status)
                if status == "shipped":
                    item["tracking_number"] = f"1Z{oid}"
                doc = kds_record("MODIFY" if previous else "INSERT", new=item, old=previous, keys={"order_id": oid},
                                 created_us=created_us + step * 1000, table=table)
                docs.append((oid, doc))
                previous = item
        return docs

    def write(self, run: LocalRun, rate: float = 40.0, on_step: Callable[[int], None] | None = None) -> None:
        ddb = run.client("dynamodb")
        for n, item in enumerate(self.steps()):
            if on_step:
                on_step(n)
            ddb.put_item(TableName=run.cfg.names.orders_table, Item={k: _ser.serialize(v) for k, v in item.items()})
            self.versions.append(item)
            time.sleep(1.0 / rate)

    # ---- the oracle
    def expected_emails(self) -> Counter:
        out = Counter()
        for oid, path in self.paths.items():
            if "shipped" in path:
                out[f"Your order {oid} has shipped"] += 1
            if "delivered" in path:
                out[f"Your order {oid} has been delivered"] += 1
                out[f"How was your order {oid}?"] += 1
        return out

    def expected_refunds(self) -> Counter:
        return Counter(oid for oid, path in self.paths.items() if path[-1] == "cancelled")

    def expected_revenue(self) -> tuple[int, Decimal]:
        live = [self.first[oid] for oid, path in self.paths.items() if path[-1] != "cancelled"]
        return len(live), sum((o["total"] for o in live), Decimal("0"))

    def expected_shipped_units(self) -> Counter:
        out = Counter()
        for oid, path in self.paths.items():
            if "shipped" in path and path[-1] != "cancelled":
                for line in self.first[oid]["items"]:
                    out[line["product_id"]] += int(line["quantity"])
        return out

    def expected_changes(self) -> set[tuple[str, str]]:
        return {(oid, status) for oid, path in self.paths.items() for status in path}


@dataclass
class Observed:
    changes: Counter  # (order_id, status) -> analytics events seen
    emails: Counter
    refunds: Counter
    order_count: int
    revenue: Decimal
    shipped_units: Counter
    dead_letters: list[dict]


_objects: dict[tuple[str, str, str], bytes] = {}  # Firehose's S3 objects are written once: read each once


def observe(run: LocalRun, prefix: str, ses_proxy=None) -> Observed:
    """What the stack holds for the orders of `prefix`. With `ses_proxy` (a FaultProxy every
    SES call went through), the emails are the SendEmails SES answered 200, read from the
    proxy: moto's only list of sent emails is its whole state (/moto-api/data.json), which
    grows with every item it ever held and blocks every other request while it is built."""
    s3, bucket = run.client("s3"), run.cfg.names.analytics_bucket
    changes = Counter()
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for obj in page.get("Contents", []):
            cached = (run.stack.endpoints["s3"], bucket, obj["Key"])
            if cached not in _objects:
                _objects[cached] = s3.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
            for line in _objects[cached].splitlines():
                event = json.loads(line, parse_float=Decimal) if line.strip() else {}
                if event.get("record_type") == "analytics" and event["keys"].get("order_id", "").startswith(prefix):
                    changes[(event["keys"]["order_id"], event["item"].get("status"))] += 1
    if ses_proxy is not None:
        from tests.faults.proxy import ses_subject

        with ses_proxy.lock:
            sent = [ses_subject(r.body) for r in ses_proxy.requests if r.action == "SendEmail" and r.status == 200]
        emails = Counter(s for s in sent if s and f" {prefix}-" in s)
    else:
        data = _moto_state(run.stack.endpoints["ses"])
        emails = Counter(m["subject"] for m in data.get("ses", {}).get("Message", []) if f" {prefix}-" in m["subject"])
    sqs = run.client("sqs")
    url = sqs.get_queue_url(QueueName=run.cfg.names.refund_queue)["QueueUrl"]
    refunds = _all_messages(sqs, url, lambda body: body.get("order_id"))
    dlq_url = sqs.get_queue_url(QueueName=run.cfg.names.dlq_queue)["QueueUrl"]
    dead = list(_all_messages(sqs, dlq_url, lambda body: json.dumps(body)).keys())
    ddb = run.client("dynamodb")
    count, revenue = 0, Decimal("0")
    for item in _scan(ddb, run.cfg.names.order_metrics_table):
        count += int(item.get("order_count", 0))
        revenue += item.get("revenue", Decimal("0"))
    shipped = Counter()
    for item in _scan(ddb, run.cfg.names.inventory_table):
        shipped[item["product_id"]] = int(item.get("shipped", 0))
    return Observed(changes, emails, refunds, count, revenue, shipped, [json.loads(d) for d in dead])


def _moto_state(endpoint: str) -> dict:
    """moto's whole state; it can fail with a 500 while another request mutates it."""
    for attempt in range(10):
        try:
            with urllib.request.urlopen(f"{endpoint}/moto-api/data.json", timeout=30) as reply:
                return json.load(reply)
        except urllib.error.HTTPError:
            if attempt == 9:
                raise
            time.sleep(0.5)
    raise AssertionError("unreachable")


def _all_messages(sqs, url: str, key: Callable[[dict], str]) -> Counter:
    """Every message of the queue once: receive until empty (each receive hides what it
    returned), then make them all visible again for the next look."""
    seen: dict[str, str] = {}
    handles: list[str] = []
    while batch := sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, VisibilityTimeout=60).get("Messages", []):
        for m in batch:
            seen[m["MessageId"]] = key(json.loads(m["Body"]))
            handles.append(m["ReceiptHandle"])
    for start in range(0, len(handles), 10):
        sqs.change_message_visibility_batch(QueueUrl=url, Entries=[
            {"Id": str(i), "ReceiptHandle": h, "VisibilityTimeout": 0} for i, h in enumerate(handles[start:start + 10])])
    return Counter(seen.values())


def _scan(ddb, table: str) -> list[dict]:
    items, kwargs = [], {"TableName": table, "ConsistentRead": True}
    while True:
        page = ddb.scan(**kwargs)
        items += [{k: _de.deserialize(v) for k, v in it.items()} for it in page["Items"]]
        if "LastEvaluatedKey" not in page:
            return items
        kwargs["ExclusiveStartKey"] = page["LastEvaluatedKey"]


def caught_up(run: LocalRun, history: History, timeout: float = 240, ses_proxy=None) -> Observed:
    """Wait until every change's reactions are visible, then a little longer for stragglers.
    `ses_proxy`: see `observe`."""
    def done():
        seen = observe(run, history.prefix, ses_proxy)
        complete = (set(seen.changes) >= history.expected_changes()
                    and all(seen.emails[s] >= n for s, n in history.expected_emails().items())
                    and all(seen.refunds[o] >= n for o, n in history.expected_refunds().items()))
        return seen if complete else None

    wait_until(done, timeout, 2.0, "every reaction of the history")
    time.sleep(5)  # duplicates, if any, arrive after the first copy
    return observe(run, history.prefix, ses_proxy)


def duplicated_and_reordered(docs: list[tuple[str, dict]]) -> list[tuple[str, dict]]:
    """What KDS-for-DDB may deliver: every change twice, each order's last two changes swapped
    (the newer one first)."""
    stream: list[tuple[str, dict]] = []
    for oid in dict.fromkeys(o for o, _ in docs):
        mine = [d for o, d in docs if o == oid]
        mine[-2], mine[-1] = mine[-1], mine[-2]
        stream += [(oid, d) for d in mine for _ in (0, 1)]
    return stream


def put_changes(run: LocalRun, stream: list[tuple[str, dict]]) -> None:
    """Put change documents straight onto the Kinesis stream, each under its order's partition
    key (as the KDS-for-DDB bridge does), 100 a call, in order."""
    import orjson

    from orders_cdc.local.bridge import partition_key

    put_records(run, [(orjson.dumps(d), partition_key({"order_id": {"S": oid}})) for oid, d in stream])


def put_records(run: LocalRun, records: list[tuple[bytes, str]]) -> list[str]:
    """Put (data, partition key) records onto the stream, 100 a call, in order; a record the
    stream refused (throttled) is put again. Returns each record's sequence number."""
    kinesis, out = run.client("kinesis"), []
    for start in range(0, len(records), 100):
        chunk = records[start:start + 100]
        for attempt in range(20):
            reply = kinesis.put_records(StreamName=run.cfg.names.stream, Records=[
                {"Data": data, "PartitionKey": key} for data, key in chunk])
            if not reply.get("FailedRecordCount"):
                break
            # Put the rest again from the first refused one, so the order holds.
            first = next(i for i, r in enumerate(reply["Records"]) if "ErrorCode" in r)
            out += [r["SequenceNumber"] for r in reply["Records"][:first]]
            chunk = chunk[first:]
            time.sleep(0.2 * (attempt + 1))
        else:
            raise AssertionError(f"the stream kept refusing records: {reply}")
        out += [r["SequenceNumber"] for r in reply["Records"]]
    return out


def counts_of(name: str, history: History, seen: Observed, **extra) -> dict:
    expected_emails, expected_refunds = history.expected_emails(), history.expected_refunds()
    counts = {
        "scenario": name,
        "changes_written": len(history.versions),
        "changes_lost": len(history.expected_changes() - set(seen.changes)),
        "changes_redelivered": sum(n - 1 for n in seen.changes.values() if n > 1),
        "emails": sum(seen.emails.values()),
        "emails_duplicated": sum(max(0, seen.emails[s] - n) for s, n in expected_emails.items()),
        "emails_missing": sum(max(0, n - seen.emails[s]) for s, n in expected_emails.items()),
        "refunds_duplicated": sum(max(0, seen.refunds[o] - n) for o, n in expected_refunds.items()),
        "refunds_missing": sum(max(0, n - seen.refunds[o]) for o, n in expected_refunds.items()),
        "dead_letters": len(seen.dead_letters),
        **extra,
    }
    return counts


def emit(tag: str, counts: dict) -> None:
    """Print `TAG {json}` and append the counts to COUNTS_FILE."""
    line = json.dumps(counts, default=str)
    print(f"\n{tag} {line}")
    # Also kept on disk (pytest shows a passing test's output only with -rP): the last
    # runs' counts and recovery times, for the README and the closing notes.
    COUNTS_FILE.parent.mkdir(parents=True, exist_ok=True)
    with COUNTS_FILE.open("a") as out:
        out.write(json.dumps({"at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **counts}, default=str) + "\n")


def report(name: str, history: History, seen: Observed, **extra) -> dict:
    counts = counts_of(name, history, seen, **extra)
    emit("FAULT", counts)
    return counts


def assert_exact(history: History, seen: Observed, counts: dict) -> None:
    assert counts["changes_lost"] == 0, counts
    assert seen.emails == history.expected_emails(), "every email exactly once"
    assert seen.refunds == history.expected_refunds(), "every refund exactly once"
    assert (seen.order_count, seen.revenue) == history.expected_revenue(), "metric totals exact"
    assert +seen.shipped_units == history.expected_shipped_units(), "inventory exact"


# ---- processes of a run
def _ppid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    import os

    for entry in os.listdir("/proc"):
        if entry.isdigit():
            parent = _ppid(int(entry))
            if parent is not None:
                children.setdefault(parent, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def jvm_pid(supervisor_pid: int) -> int | None:
    return next((p for p in descendants(supervisor_pid) if "MultiLangDaemon" in _cmdline(p)), None)


def ecs_stop(jvm: int) -> None:
    """ECS's stop as `orders-cdc run` passes it on: SIGTERM to the JVM's process group, which
    holds its Python children. (The supervisor here restarts the JVM, as a new task would.)"""
    import os
    import signal

    os.killpg(jvm, signal.SIGTERM)


def child_pids(supervisor_pid: int) -> list[int]:
    return [p for p in descendants(supervisor_pid) if "record_processor.py" in _cmdline(p)]


def connections_to(pid: int, port: int) -> set[int]:
    """The local ports of pid's open TCP connections to 127.0.0.1:`port` (e.g. a FaultProxy):
    which of a proxy's requests came from pid."""
    import os

    inodes = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return set()
    for fd in fds:
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    ports = set()
    for table in ("tcp", "tcp6"):
        try:
            with open(f"/proc/{pid}/net/{table}") as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if fields[9] in inodes and int(fields[2].rsplit(":", 1)[1], 16) == port:
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


@dataclass
class Kill:
    """A kill -9 with its victims' calls in flight: which local ports each frozen process had
    open to each proxy just before the kill (`ports`), and when (`at`, time.monotonic())."""
    at: float
    pid: int
    ports: dict[str, set[int]]

    def calls_in_flight(self, proxies: dict, since: float | None = None) -> dict[str, list]:
        """Each proxy's requests that came from the frozen processes' open connections: their
        calls in flight at the kill. The proxies answer HTTP/1.0 (one request a connection), so
        an open connection is a call not yet answered, or answered and not yet read; a request
        that arrives up to 1 s after the kill was already sent. `since` (seconds before the
        kill) bounds how far back a port may match, for runs long enough to reuse ports."""
        return {name: [r for r in proxy.requests if r.client_port in self.ports[name]
                       and r.arrived <= self.at + 1 and (since is None or r.arrived >= self.at - since)]
                for name, proxy in proxies.items()}


def freeze_and_kill(victim: int, proxies: dict, frozen: list[int] | None = None) -> Kill:
    """SIGSTOP `frozen` (default: the victim alone; e.g. a JVM's Python children when the
    victim is the JVM), note their open connections to each proxy (their calls in flight
    now), kill -9 the victim, and let the others go on (SIGCONT)."""
    import os
    import signal

    frozen = [victim] if frozen is None else frozen
    for pid in frozen:
        try:
            os.kill(pid, signal.SIGSTOP)  # frozen: its connections now are its calls in flight
        except ProcessLookupError:  # it has just exited: no calls of its own in flight
            pass
    try:
        ports = {name: set().union(*(connections_to(pid, p.port) for pid in frozen)) for name, p in proxies.items()}
        os.kill(victim, signal.SIGKILL)
        return Kill(time.monotonic(), victim, ports)
    finally:
        for pid in frozen:
            if pid != victim:
                try:
                    os.kill(pid, signal.SIGCONT)
                except ProcessLookupError:
                    pass


def answered_before(kill: Kill, proxies: dict) -> dict[str, list]:
    """Each proxy's calls answered 200 in the MARKER_WINDOW before the kill: their done-markers
    may not have been written yet."""
    return {name: [r for r in proxy.requests if r.status == 200 and r.finished
                   and kill.at - MARKER_WINDOW <= r.finished <= kill.at] for name, proxy in proxies.items()}


def emails_in(requests: list) -> Counter:
    """The emails (by subject) these SES requests sent."""
    from tests.faults.proxy import ses_subject

    return Counter(ses_subject(r.body) for r in requests if r.action == "SendEmail")


def refunds_in(requests: list, orders) -> Counter:
    """The refunds of `orders` these SQS requests sent to the refunds queue."""
    return Counter(o for r in requests if r.action == "SendMessageBatch" and "refunds" in r.text
                   for o in orders if f'{o}\\"' in r.text or f'{o}"' in r.text)


def sent_twice(history: History, seen: Observed) -> tuple[Counter, Counter]:
    """The emails and the refunds seen more often than the history asks for, by how many."""
    expected = history.expected_emails()
    return (Counter({s: n - expected[s] for s, n in seen.emails.items() if n > expected[s]}),
            Counter({o: n - 1 for o, n in seen.refunds.items() if n > 1}))


def lease_owners(run: LocalRun) -> dict[str, str]:
    items = run.client("dynamodb").scan(TableName=run.cfg.application, ConsistentRead=True)["Items"]
    return {i["leaseKey"]["S"]: i.get("leaseOwner", {}).get("S", "") for i in items
            if i.get("entityType", {}).get("S", "LEASE") == "LEASE" and i["leaseKey"]["S"].startswith("shardId")}
