"""Fault injection on the real daemon and the local stack. Each scenario writes a known
order history, injects its fault, waits until the processor has caught up, and asserts
0 lost changes and 0 duplicated side effects; it prints its counts (`FAULT {...}`)."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import signal
import threading
import time
from collections import Counter
from datetime import datetime

import orjson
import pytest

from orders_cdc.local.bridge import partition_key
from orders_cdc.local.runner import wait_until
from tests.factories import kds_record
from tests.faults.harness import (
    PATHS, History, answered_before, assert_exact, caught_up, child_pids, connections_to, duplicated_and_reordered,
    ecs_stop, emails_in, freeze_and_kill, jvm_pid, lease_owners, observe, put_changes, refunds_in, report, sent_twice,
)

pytestmark = pytest.mark.faults


def _first_change_processed(run, history, timeout=240):
    wait_until(lambda: observe(run, history.prefix).changes, timeout, 2.0, "the first change to be processed")


def _write_with_fault(run, history, fault, at_step=60):
    """Write the history; once the consumer is live, inject `fault` at `at_step`; wait until
    caught up. Returns what was seen, and {result: what fault returned, at: when}."""
    injected = {}

    def on_step(n):
        if n == 20:
            _first_change_processed(run, history)
        if n == at_step:
            injected.update(result=fault(), at=time.monotonic())

    history.write(run, on_step=on_step)
    return caught_up(run, history, timeout=300), injected


def _run_with_fault(run, history, fault, name, at_step=60):
    """`_write_with_fault`, then report, and assert every reaction exactly once. Returns
    what fault returned."""
    seen, injected = _write_with_fault(run, history, fault, at_step)
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
    _run_with_fault(run, History(orders=40, prefix="term"), lambda: ecs_stop(jvm_pid(supervisor)),
                    "SIGTERM daemon")


def test_two_workers_one_killed_the_other_takes_over(fault_proxy, fault_run):
    """Kill -9 of a whole task. The survivor takes its leases; counters stay exact, and an
    email or refund goes twice only if its send was in flight at the kill or answered within
    the marker window before it (README: "at least once if the worker dies between the send
    and its done-marker"): SES and SQS go through proxies that record every call."""
    run = fault_run(daemon=False)
    ses, sqs = fault_proxy(run.stack.endpoints["ses"]), fault_proxy(run.stack.endpoints["sqs"])
    proxies = {"ses": ses, "sqs": sqs}
    via = {"AWS_ENDPOINT_URL_SES": ses.url, "AWS_ENDPOINT_URL_SQS": sqs.url}
    first = run.start_daemon(**via)
    second = run.start_daemon(worker_id="local-worker-2", **via)

    def kill_task():
        # The whole first task, as when a container dies: the supervisor, and the JVM with
        # its Python children (the JVM runs in a process group of its own). The children are
        # frozen first, so their open connections say which calls were in flight.
        jvm = jvm_pid(first.pid)
        killed = freeze_and_kill(jvm, proxies, frozen=[jvm, *child_pids(first.pid)])
        for group in (first.pid, jvm):
            with contextlib.suppress(ProcessLookupError):  # the group may have gone with the JVM
                os.killpg(group, signal.SIGKILL)
        return killed

    history = History(orders=40, prefix="two")
    seen, injected = _write_with_fault(run, history, kill_task)
    kill = injected["result"]
    in_flight, answered = kill.calls_in_flight(proxies), answered_before(kill, proxies)
    window_emails = emails_in(in_flight["ses"] + answered["ses"])
    window_refunds = refunds_in(in_flight["sqs"] + answered["sqs"], history.expected_refunds())
    twice, refunds_twice = sent_twice(history, seen)
    counts = report("two workers, one killed", history, seen, recovery_s=round(time.monotonic() - kill.at, 1),
                    sends_in_the_window={"ses": sum(window_emails.values()), "refunds": sum(window_refunds.values())})
    assert not twice - window_emails, f"only an email sent in the kill's window may go twice: {twice - window_emails}"
    assert not refunds_twice - window_refunds, f"only a refund in the kill's window may go twice: {refunds_twice}"
    assert_exact(history, dataclasses.replace(seen, emails=seen.emails - twice, refunds=seen.refunds - refunds_twice),
                 counts)
    assert counts["dead_letters"] == 0
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
    docs = history.kds_changes(run.cfg.names.orders_table, created_us=1_795_000_000_000_000)
    # Every change twice; each order's last two changes swapped (the newer one first).
    stream = duplicated_and_reordered(docs)
    put_changes(run, stream)
    history.versions = [d for _, d in docs]
    seen = caught_up(run, history, timeout=300)
    counts = report("duplicated and reordered", history, seen, delivered=len(stream))
    assert_exact(history, seen, counts)
    # The view holds one live row per product of each order, whatever the arrival order.
    rows = run.client("dynamodb").scan(TableName=run.cfg.names.product_orders_table)["Items"]
    expected = {(line["product_id"], oid) for oid in history.paths for line in history.first[oid]["items"]}
    assert {(r["product_id"]["S"], r["order_id"]["S"]) for r in rows if "deleted" not in r} == expected


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



def test_kill_9_of_the_child_with_many_calls_in_flight_against_a_slow_downstream(fault_proxy, fault_run):
    """Every SES, SQS and Firehose call takes 300-500 ms, so a shard's child has many calls
    in flight at once. At the start of a burst of SES calls (>= 4 in flight, none older
    than 250 ms, so none of that round has finished yet), the child with the most SES
    connections open is stopped, its open connections to each proxy are noted (those are
    its calls in flight), and it is killed -9. Counters stay exact; an email or refund may
    go twice only if its send was in flight at the kill (README: "at least once if the
    worker dies between the send and its done-marker")."""
    def slow(body):
        return random.uniform(0.3, 0.5)

    run = fault_run(daemon=False)
    ses = fault_proxy(run.stack.endpoints["ses"], delay=slow)
    sqs = fault_proxy(run.stack.endpoints["sqs"], delay=slow)
    firehose = fault_proxy(run.stack.endpoints["firehose"], delay=slow)
    proxies = {"ses": ses, "sqs": sqs, "firehose": firehose}
    kill: dict = {}
    kill_lock = threading.Lock()
    children: list[int] = []  # kept fresh by a thread: the kill must not wait for a /proc walk

    def kill_at_a_fresh_burst(proxy, request):
        if not children or "at" in kill:
            return
        now = time.monotonic()
        with proxy.lock:
            flying = [r for r in proxy.requests if r.finished is None]
        if len(flying) < 4 or any(now - r.arrived > 0.25 for r in flying):
            return
        with kill_lock:
            if "at" in kill:
                return
            pid = max(list(children), key=lambda p: len(connections_to(p, ses.port)))
            killed = freeze_and_kill(pid, proxies)
            kill.update(at=killed.at, pid=pid, killed=killed, proxy_in_flight=len(flying))

    ses.on_arrival = kill_at_a_fresh_burst
    # Short leases, so the retry of a send the kill interrupted comes within the scenario
    # (the lock lease must exceed the handler timeout).
    supervisor = run.start_daemon(AWS_ENDPOINT_URL_SES=ses.url, AWS_ENDPOINT_URL_SQS=sqs.url,
                                  AWS_ENDPOINT_URL_FIREHOSE=firehose.url,
                                  ORDERS_CDC_HANDLER_TIMEOUT_SECONDS="20",
                                  ORDERS_CDC_IDEMPOTENCY_LOCK_SECONDS="30").pid

    def track_children():
        while "at" not in kill and supervisor_alive():
            children[:] = child_pids(supervisor)
            time.sleep(0.3)

    supervisor_alive = run.daemons[0].alive
    threading.Thread(target=track_children, daemon=True).start()
    history = History(orders=40, prefix="k9s")
    history.write(run, rate=40)
    wait_until(lambda: "at" in kill, 180, 0.5, "a burst of >= 4 SES calls in flight, and the kill")
    time.sleep(1)  # what the killed child had sent reaches the proxy

    at_kill = kill["killed"].calls_in_flight(proxies)  # (a port is not reused so soon)
    seen = caught_up(run, history, timeout=240)
    counts = report("kill -9 child, slow downstream", history, seen,
                    **{f"{name}_in_flight_at_kill": Counter(r.action for r in rs) for name, rs in at_kill.items()},
                    proxy_ses_in_flight_at_kill=kill["proxy_in_flight"],
                    most_in_flight={name: p.most_in_flight for name, p in proxies.items()},
                    ses_calls=len(ses.requests), recovery_s=round(time.monotonic() - kill["at"], 1))
    assert len(at_kill["ses"]) > 1, "many SES calls of the killed child were in flight at the kill"
    assert counts["dead_letters"] == 0, seen.dead_letters
    # At least once for a send in flight at the kill: its done-marker could not be written.
    in_flight = emails_in(at_kill["ses"])
    twice, refunds_twice = sent_twice(history, seen)
    assert not twice - in_flight, f"only emails whose send was in flight at the kill may go twice: {twice - in_flight}"
    assert sum(twice.values()) <= len(at_kill["ses"])
    refunds_in_flight = refunds_in(at_kill["sqs"], history.expected_refunds())
    assert not refunds_twice - refunds_in_flight, "only refunds in flight at the kill may be sent twice"
    # Everything else exactly once, counters (metrics, inventory) exact, nothing lost.
    assert_exact(history, dataclasses.replace(seen, emails=seen.emails - twice, refunds=seen.refunds - refunds_twice),
                 counts)



def test_one_orders_hung_downstream_call_does_not_hold_the_other_orders(fault_proxy, fault_run):
    """The proxy holds every SES call for one order 13 s: longer than the others take, below
    the 60 s handler timeout (and the SES client's read timeout, 5 s past it), so each held
    call ends on its own. The whole
    history is on the stream before the daemon starts, so the held calls share their batch
    with every other order of their shard: while they are held, every other reaction (the
    other orders' emails and refunds, every change's analytics copy, the counters) is done.
    (A change in a later batch would wait: the daemon hands a shard one batch at a time.)"""
    import hashlib

    from tests.faults.proxy import ses_subject

    hold = 13.0
    history = History(orders=40, prefix="hung")
    held = "hung-0004"  # shipped, then delivered: three emails, each on its own route
    assert history.paths[held] == PATHS[0]
    run = fault_run(daemon=False)
    history.write(run)
    wait_until(lambda: run.bridge.forwarded >= len(history.versions), 60, 0.5, "the whole history on the stream")

    def shard_of(oid):
        key = int.from_bytes(hashlib.md5(partition_key({"order_id": {"S": oid}}).encode()).digest(), "big")
        for shard in run.client("kinesis").list_shards(StreamName=run.cfg.names.stream)["Shards"]:
            if int(shard["HashKeyRange"]["StartingHashKey"]) <= key <= int(shard["HashKeyRange"]["EndingHashKey"]):
                return shard["ShardId"]

    neighbours = [o for o in history.paths if o != held and shard_of(o) == shard_of(held)]
    proxy = fault_proxy(run.stack.endpoints["ses"], delay=lambda body: hold if held.encode() in body else 0.0)
    run.start_daemon(AWS_ENDPOINT_URL_SES=proxy.url)
    wait_until(lambda: proxy.held(hold), 180, 0.2, f"{held}'s first SES call to be held")
    hold_start = min(r.arrived for r in proxy.held(hold))
    expected_emails = history.expected_emails()
    others = Counter({s: n for s, n in expected_emails.items() if held not in s})

    def the_others_done():
        seen = observe(run, history.prefix)
        complete = (set(seen.changes) >= history.expected_changes()
                    and all(seen.emails[s] >= n for s, n in others.items())
                    and all(seen.refunds[o] >= n for o, n in history.expected_refunds().items())
                    and (seen.order_count, seen.revenue) == history.expected_revenue()
                    and +seen.shipped_units == history.expected_shipped_units())
        return (seen, time.monotonic()) if complete else None

    during, done_at = wait_until(the_others_done, hold - 3, 1.0, "every reaction but the held order's emails")
    assert proxy.held(hold) and done_at < hold_start + hold, "seen while the held calls were still held"
    assert not any(held in s for s in during.emails), "none of the held order's emails is out yet"
    assert {s: during.emails[s] for s in others} == dict(others), "the other orders' emails, exactly once"
    wait_until(lambda: not proxy.held(hold), 3 * hold, 0.5, "the held calls to end")
    held_subjects = Counter(ses_subject(r.body) for r in proxy.requests if r.delay >= hold)
    assert held_subjects == Counter({s: n for s, n in expected_emails.items() if held in s}), \
        "only the chosen order's calls were held, each sent once"
    seen = caught_up(run, history, timeout=180)
    counts = report("one order's SES calls held 13 s", history, seen, held_calls=sum(held_subjects.values()),
                    same_shard_orders=len(neighbours),
                    others_done_s_after_hold_start=round(done_at - hold_start, 1),
                    caught_up_s_after_hold_start=round(time.monotonic() - hold_start, 1))
    assert neighbours, "other orders share the held order's shard"
    assert counts["dead_letters"] == 0, seen.dead_letters
    assert_exact(history, seen, counts)
