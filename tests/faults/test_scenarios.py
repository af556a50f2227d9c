"""Fault injection on the real daemon and the local stack. Each scenario writes a known
order history, injects its fault, waits until the processor has caught up, and asserts
0 lost changes and 0 duplicated side effects; it prints its counts (`FAULT {...}`)."""

from __future__ import annotations

import os
import signal
import threading
import time
from datetime import datetime

import orjson
import pytest

from orders_cdc.local.bridge import partition_key
from orders_cdc.local.runner import wait_until
from tests.factories import kds_record
from tests.faults.harness import (
    History, assert_exact, caught_up, child_pids, jvm_pid, lease_owners, observe, report,
)

pytestmark = pytest.mark.faults


def _first_change_processed(run, history, timeout=240):
    wait_until(lambda: observe(run, history.prefix).changes, timeout, 2.0, "the first change to be processed")


def _run_with_fault(run, history, fault, name, at_step=60):
    """Write the history; once the consumer is live, inject `fault` at `at_step`; wait until
    caught up, report, and assert every reaction exactly once. Returns what fault returned."""
    injected = {}

    def on_step(n):
        if n == 20:
            _first_change_processed(run, history)
        if n == at_step:
            injected.update(result=fault(), at=time.monotonic())

    history.write(run, on_step=on_step)
    seen = caught_up(run, history, timeout=300)
    counts = report(name, history, seen, recovery_s=round(time.monotonic() - injected["at"], 1))
    assert_exact(history, seen, counts)
    assert counts["dead_letters"] == 0
    return injected["result"]


def test_kill_9_of_a_python_child_mid_batch(fault_run):
    run = fault_run()
    supervisor = run.daemons[0].pid
    _run_with_fault(run, History(orders=40, prefix="k9c"),
                    lambda: os.kill(child_pids(supervisor)[0], signal.SIGKILL), "kill -9 python child")


def test_kill_9_of_the_daemon_then_restart(fault_run):
    run = fault_run()
    supervisor = run.daemons[0].pid

    def kill_jvm():
        jvm = jvm_pid(supervisor)
        os.kill(jvm, signal.SIGKILL)  # `orders-cdc run --restart` brings it back
        return jvm

    killed = _run_with_fault(run, History(orders=40, prefix="k9d"), kill_jvm, "kill -9 daemon")
    assert jvm_pid(supervisor) not in (None, killed), "a new JVM runs"


def test_sigterm_of_the_daemon_then_restart(fault_run):
    run = fault_run()
    supervisor = run.daemons[0].pid
    # What ECS sends: the children checkpoint first, then the supervisor restarts the JVM.
    _run_with_fault(run, History(orders=40, prefix="term"),
                    lambda: os.kill(jvm_pid(supervisor), signal.SIGTERM), "SIGTERM daemon")


def test_two_workers_one_killed_the_other_takes_over(fault_run):
    run = fault_run()
    second = run.start_daemon(worker_id="local-worker-2")
    first = run.daemons[0]
    def kill_task():
        # The whole first task, as when a container dies: the supervisor, and the JVM with
        # its Python children (the JVM runs in a process group of its own).
        jvm = jvm_pid(first.pid)
        os.killpg(first.pid, signal.SIGKILL)
        os.killpg(jvm, signal.SIGKILL)

    _run_with_fault(run, History(orders=40, prefix="two"), kill_task, "two workers, one killed")
    # The dead worker may have been the leader: its lock lease (120 s) runs out before the
    # survivor's assignment manager hands out the orphaned leases.
    try:
        wait_until(lambda: set(lease_owners(run).values()) == {"local-worker-2"}, 240, 2.0, "worker 2 to own every lease")
    except TimeoutError:
        raise AssertionError(f"lease owners: {lease_owners(run)}") from None
    assert second.alive()


def test_duplicated_and_reordered_changes(fault_run):
    """KDS-for-DDB may deliver a change twice and out of order: effects stay exact."""
    run = fault_run()
    history = History(orders=12, prefix="dup")
    kinesis = run.client("kinesis")
    docs: list[tuple[str, dict]] = []
    created = 1_795_000_000_000_000
    for oid, path in history.paths.items():
        previous = None
        for step, status in enumerate(path):
            item = dict(history.first[oid], status=status)
            if status == "shipped":
                item["tracking_number"] = f"1Z{oid}"
            doc = kds_record("MODIFY" if previous else "INSERT", new=item, old=previous, keys={"order_id": oid},
                             created_us=created + step * 1000, table=run.cfg.names.orders_table)
            docs.append((oid, doc))
            previous = item
    # Every change twice; each order's last two changes swapped (the newer one first).
    stream: list[tuple[str, dict]] = []
    for oid in history.paths:
        mine = [d for o, d in docs if o == oid]
        mine[-2], mine[-1] = mine[-1], mine[-2]
        stream += [(oid, d) for d in mine for _ in (0, 1)]
    for start in range(0, len(stream), 100):
        kinesis.put_records(StreamName=run.cfg.names.stream, Records=[
            {"Data": orjson.dumps(d), "PartitionKey": partition_key({"order_id": {"S": oid}})} for oid, d in stream[start:start + 100]])
    history.versions = [d for _, d in docs]
    seen = caught_up(run, history, timeout=300)
    counts = report("duplicated and reordered", history, seen, delivered=len(stream))
    assert_exact(history, seen, counts)
    # The view holds each order's newest state, whatever the arrival order.
    rows = run.client("dynamodb").scan(TableName=run.cfg.names.product_orders_table)["Items"]
    final = {oid: path[-1] for oid, path in history.paths.items()}
    for row in rows:
        assert row["status"]["S"] == final[row["order_id"]["S"]], row


POISON = [
    (b"\xff\xfe\x00 not json", "JSON"),
    (b'{"hello": "world"}', ""),
    (orjson.dumps(kds_record("UPSERT", new={"order_id": "p-1", "status": "x"}, keys={"order_id": "p-1"})), "UPSERT"),
    (orjson.dumps(kds_record("INSERT", new_av={"order_id": {"S": "p-2"}, "status": {"SZ": "x"}}, keys={"order_id": "p-2"})), "SZ"),
    (orjson.dumps(kds_record("INSERT", new_av={"order_id": {"S": "p-3"}, "total": {"N": "1E+200"}}, keys={"order_id": "p-3"})), "1E+200"),
    (orjson.dumps(kds_record("INSERT", new=None, old=None, keys={"order_id": "p-4"})), "NewImage"),
]


def test_poison_records_are_dead_lettered_and_good_ones_handled(fault_run):
    run = fault_run()
    history = History(orders=20, prefix="psn")
    kinesis = run.client("kinesis")

    def inject(n):
        if n in (5, 25, 45):
            kinesis.put_records(StreamName=run.cfg.names.stream, Records=[
                {"Data": data, "PartitionKey": f"poison-{i}"} for i, (data, _) in enumerate(POISON)])

    history.write(run, on_step=inject)
    seen = caught_up(run, history, timeout=300)
    wait_until(lambda: len(observe(run, history.prefix).dead_letters) >= 3 * len(POISON), 60, 2.0, "dead letters")
    seen = observe(run, history.prefix)
    counts = report("poison corpus", history, seen)
    assert_exact(history, seen, counts)
    assert len(seen.dead_letters) == 3 * len(POISON)
    import base64

    by_data = {}
    for letter in seen.dead_letters:
        by_data.setdefault(base64.b64decode(letter["record"]["data"]), []).append(letter)
    for data, needle in POISON:
        letters = by_data[data]
        assert len(letters) == 3, "each poison record once per injection, with the original bytes"
        assert all(needle in l["reason"] and l["shard_id"] and l["sequence_number"] for l in letters), letters


def test_email_service_down_for_30_seconds(fault_run):
    """An outage is not a bad record: nothing is dead-lettered, every email goes out once
    the service is back."""
    from tests.faults.proxy import FaultProxy

    run = fault_run(daemon=False)
    with FaultProxy(run.stack.endpoints["ses"]) as proxy:
        run.start_daemon(AWS_ENDPOINT_URL_SES=proxy.url)
        history = History(orders=40, prefix="out")
        outage = {}

        def inject(n):
            if n == 20:
                _first_change_processed(run, history)
            if n == 40:
                proxy.failing.set()
                outage["start"] = time.monotonic()
                timer = threading.Timer(30, proxy.failing.clear)
                timer.daemon = True
                timer.start()

        history.write(run, rate=10, on_step=inject)
        seen = caught_up(run, history, timeout=300)
        counts = report("email service down 30 s", history, seen, refused_calls=proxy.refused,
                        recovered_s_after_outage_end=round(time.monotonic() - outage["start"] - 30, 1))
    assert proxy.refused > 0, "the outage was felt"
    assert counts["dead_letters"] == 0
    assert_exact(history, seen, counts)


def test_shard_split_while_traffic_flows(fault_run):
    """The parent is finished before its children; each order's changes keep their order."""
    run = fault_run()
    history = History(orders=40, prefix="spl")
    kinesis = run.client("kinesis")

    def inject(n):
        if n == 20:
            _first_change_processed(run, history)
        if n == 60:
            kinesis.split_shard(StreamName=run.cfg.names.stream, ShardToSplit="shardId-000000000000",
                                NewStartingHashKey=str(2**127 // 2))

    history.write(run, on_step=inject)
    seen = caught_up(run, history, timeout=300)
    counts = report("shard split", history, seen)
    assert_exact(history, seen, counts)
    # Per order: the first processing of each status follows the path's order.
    s3, bucket = run.client("s3"), run.cfg.names.analytics_bucket
    first_at: dict[tuple[str, str], datetime] = {}
    shards = set()
    for obj in s3.list_objects_v2(Bucket=bucket).get("Contents", []):
        for line in s3.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read().splitlines():
            event = orjson.loads(line)
            if event.get("record_type") != "analytics" or not event["keys"]["order_id"].startswith("spl"):
                continue
            shards.add(event["shard_id"])
            key = (event["keys"]["order_id"], event["item"]["status"])
            at = datetime.fromisoformat(event["processed_at"].replace("Z", "+00:00"))
            first_at[key] = min(first_at.get(key, at), at)
    assert len(shards) >= 3, f"children shards were read too: {shards}"
    for oid, path in history.paths.items():
        times = [first_at[(oid, status)] for status in path]
        assert times == sorted(times), (oid, path, times)
