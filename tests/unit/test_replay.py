"""`orders-cdc replay` and `orders-cdc rewind`: the window and its checks (pure), and the
command against a real moto server (Kinesis, DynamoDB, SQS, Firehose -> S3)."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import orjson
import pytest

from orders_cdc import replay
from orders_cdc.errors import SettingsError
from tests.factories import kds_record

ROOT = Path(__file__).resolve().parents[2]
NOW = datetime(2026, 12, 1, 12, 0, tzinfo=timezone.utc)


# -- times and the window ----------------------------------------------------------------------

@pytest.mark.parametrize(("raw", "expected"), [
    ("-2h", NOW - timedelta(hours=2)),
    ("-30m", NOW - timedelta(minutes=30)),
    ("-1d12h", NOW - timedelta(hours=36)),
    ("-90s", NOW - timedelta(seconds=90)),
    ("2026-11-30T09:40:00Z", datetime(2026, 11, 30, 9, 40, tzinfo=timezone.utc)),
    ("2026-11-30T10:40:00+01:00", datetime(2026, 11, 30, 9, 40, tzinfo=timezone.utc)),
    ("1764495600", datetime.fromtimestamp(1764495600, timezone.utc)),
])
def test_times_iso_epoch_and_relative(raw, expected):
    assert replay.parse_time(raw, "--from", NOW) == expected


@pytest.mark.parametrize("raw", ["2026-11-30T09:40:00", "TRIM_HORIZON", "LATEST", "-2x", "yesterday", "2h"])
def test_a_time_without_a_zone_or_not_a_time_is_refused(raw):
    with pytest.raises(SettingsError, match="--from"):
        replay.parse_time(raw, "--from", NOW)


def window(start, end=None, *, retention=24, ttl=7 * 86400, force=False):
    return replay.check_window(start, end, now=NOW, retention_hours=retention, ttl_seconds=ttl, force=force)


@pytest.mark.parametrize(("start", "end", "ttl", "message"), [
    (NOW + timedelta(minutes=1), None, 86400, r"^--from 2026-12-01T12:01:00\+00:00 is in the future$"),
    (NOW - timedelta(hours=1), NOW + timedelta(minutes=5), 86400,
     r"^--to .* is in the future: leave --to out to read up to the stream's tip$"),
    (NOW - timedelta(hours=1), NOW - timedelta(hours=2), 86400, r"^--to .* is not after --from .*$"),
    (NOW - timedelta(hours=25), None, 7 * 86400, r"^--from .* is before the stream's 24 h retention "),
    (NOW - timedelta(hours=3), None, 7200, r"^--from .* is older than the idempotency records' TTL \(2 h\).*--force"),
])
def test_each_bad_window_fails_with_its_line(start, end, ttl, message):
    with pytest.raises(SettingsError, match=message) as caught:
        window(start, end, ttl=ttl)
    assert "\n" not in str(caught.value)


def test_force_accepts_a_window_older_than_the_ttl_but_never_one_past_retention():
    assert window(NOW - timedelta(hours=3), ttl=7200, force=True).start == NOW - timedelta(hours=3)
    with pytest.raises(SettingsError, match="retention"):
        window(NOW - timedelta(hours=30), ttl=7200, force=True)


def test_without_to_the_window_ends_at_the_tip_as_the_replay_starts():
    w = window(NOW - timedelta(hours=1))
    assert (w.end, w.open_end) == (NOW, True)
    w = window(NOW - timedelta(hours=1), NOW - timedelta(minutes=10))
    assert (w.end, w.open_end) == (NOW - timedelta(minutes=10), False)


def test_parents_are_read_before_their_children():
    plan = [replay.Shard("c1", ("p",)), replay.Shard("p"), replay.Shard("c2", ("p", "q")), replay.Shard("x")]
    assert [s.id for s in replay.ready(plan, set(), set())] == ["p", "x"]
    assert [s.id for s in replay.ready(plan, {"p"}, {"p", "x"})] == ["c1", "c2"], "q is not in the plan (expired)"
    assert replay.ready(plan, {"p"}, {"p", "x", "c1", "c2"}) == []


def test_an_unknown_shard_is_refused_with_the_known_ones():
    shards = [replay.Shard("shardId-000000000000"), replay.Shard("shardId-000000000001")]
    with pytest.raises(SettingsError, match=r"^--shard shardId-9: not a shard of the stream \(its shards: shardId-0+, "):
        replay.choose_shards(shards, ["shardId-9"])
    assert replay.choose_shards(shards, ["shardId-000000000001"]) == shards[1:]


def test_fraction_done_counts_time_covered_and_finished_shards_whole():
    w = replay.Window(NOW - timedelta(hours=1), NOW, False)
    progress = {"a": replay.ShardProgress("a", position=NOW - timedelta(minutes=30)),
                "b": replay.ShardProgress("b", finished=True), "c": replay.ShardProgress("c")}
    assert replay.fraction_done(progress, w) == pytest.approx(0.5)


# -- against moto ------------------------------------------------------------------------------

def put(clients, stream, changes):
    """Put change documents (order id, document) on the stream; returns the time before."""
    clients.kinesis.put_records(StreamName=stream, Records=[
        {"Data": orjson.dumps(doc), "PartitionKey": oid} for oid, doc in changes])


def order(oid, status, **extra):
    import random

    from orders_cdc.local.orders import new_order

    return {**new_order(oid, random.Random(oid)), "status": status, **extra}


def change(names, event, new, old=None):
    return new["order_id"], kds_record(event, new=new, old=old, keys={"order_id": new["order_id"]},
                                       created_us=int(time.time() * 1e6), table=names.orders_table)


@pytest.fixture
def history(moto_resources):
    """Changes at T0 < T1 < T2 (a second apart), for the same orders and for others."""
    names, clients, created, env = moto_resources
    env = {**env, "ORDERS_CDC_STREAM": names.stream, "ORDERS_CDC_APPLICATION": f"app-{names.stream}",
           "ORDERS_CDC_MAX_ATTEMPTS": "2"}
    a0, b0 = order("o-1", "pending"), order("o-2", "processing")
    put(clients, names.stream, [change(names, "INSERT", a0), change(names, "INSERT", b0)])
    time.sleep(1.1)
    t1 = datetime.now(timezone.utc)
    a1, c1 = order("o-1", "shipped", tracking_number="1Zo-1"), order("o-3", "pending")
    put(clients, names.stream, [change(names, "MODIFY", a1, a0), change(names, "INSERT", c1)])
    time.sleep(1.1)
    t2 = datetime.now(timezone.utc)
    a2, b2 = order("o-1", "delivered", tracking_number="1Zo-1"), order("o-2", "cancelled", cancel_reason="x")
    put(clients, names.stream, [change(names, "MODIFY", a2, a1), change(names, "MODIFY", b2, b0)])
    time.sleep(0.2)
    return names, clients, created, env, t1, t2


def cli(env, *args, code=0):
    proc = subprocess.run([sys.executable, "-m", "orders_cdc.cli", *args], env=env, cwd=ROOT,
                          capture_output=True, timeout=180)
    assert proc.returncode == code, proc.stderr.decode()[-3000:]
    return proc


def replayed(env, *args, code=0):
    return orjson.loads(cli(env, "replay", "--json", *args, code=code).stdout)


def analytics(clients, names):
    seen = []
    for obj in clients.s3.list_objects_v2(Bucket=names.analytics_bucket).get("Contents", []):
        for line in clients.s3.get_object(Bucket=names.analytics_bucket, Key=obj["Key"])["Body"].read().splitlines():
            event = orjson.loads(line)
            if event.get("record_type") == "analytics":
                seen.append((event["keys"]["order_id"], event["item"]["status"]))
    return sorted(seen)


def refunds(clients, created, names):
    url = created.queue_urls[names.refund_queue]
    attrs = clients.sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["ApproximateNumberOfMessages"])
    return int(attrs["Attributes"]["ApproximateNumberOfMessages"])


def idempotency_items(clients, names):
    return clients.dynamodb.scan(TableName=names.idempotency_table, Select="COUNT")["Count"]


def test_replay_from_t1_processes_exactly_the_changes_at_or_after_t1(history):
    names, clients, created, env, t1, t2 = history
    summary = replayed(env, "--from", t1.isoformat(), "--routes", "analytics.firehose_copy")
    assert analytics(clients, names) == sorted([("o-1", "shipped"), ("o-3", "pending"),
                                                ("o-1", "delivered"), ("o-2", "cancelled")])
    assert summary["records"] == 4 and summary["events"] == {"INSERT": 1, "MODIFY": 3}
    assert summary["routes"] == {"analytics.firehose_copy": {"done": 4}}, "--routes: no other route ran"
    assert refunds(clients, created, names) == 0


def test_to_stops_exactly_before_it(history):
    names, clients, created, env, t1, t2 = history
    summary = replayed(env, "--from", t1.isoformat(), "--to", t2.isoformat(), "--routes", "analytics.firehose_copy")
    assert analytics(clients, names) == sorted([("o-1", "shipped"), ("o-3", "pending")])
    assert summary["records"] == 2


def test_no_reaction_is_repeated_unless_forced_and_force_says_so(history):
    names, clients, created, env, t1, t2 = history
    first = replayed(env, "--from", t1.isoformat())
    assert first["routes"]["refunds.request"] == {"done": 1}
    assert first["routes"]["notification.shipped_email"] == {"done": 1}
    assert refunds(clients, created, names) == 1

    again = replayed(env, "--from", t1.isoformat())
    assert again["routes"]["refunds.request"] == {"duplicate": 1}
    assert again["routes"]["notification.shipped_email"] == {"duplicate": 1}
    assert again["routes"]["notification.delivered_email"] == {"duplicate": 1}
    assert refunds(clients, created, names) == 1, "no refund requested twice"

    proc = cli(env, "replay", "--json", "--force", "--from", t1.isoformat(), "--routes", "refunds.request")
    assert "--force: EVERY reaction in the window runs again" in proc.stderr.decode()
    assert orjson.loads(proc.stdout)["routes"] == {"refunds.request": {"done": 1}}
    assert refunds(clients, created, names) == 2, "forced: requested again"
    forced_again = replayed(env, "--force", "--from", t1.isoformat(), "--routes", "refunds.request")
    assert forced_again["routes"] == {"refunds.request": {"duplicate": 1}}, "a forced replay run twice resumes"
    assert refunds(clients, created, names) == 2


def test_dry_run_has_no_side_effect_and_counts_what_would_run_and_what_is_done(history):
    names, clients, created, env, t1, t2 = history
    before = (analytics(clients, names), refunds(clients, created, names), idempotency_items(clients, names))
    dry = replayed(env, "--dry-run", "--from", t1.isoformat())
    assert (analytics(clients, names), refunds(clients, created, names), idempotency_items(clients, names)) == before
    assert dry["records"] == 4 and dry["events"] == {"INSERT": 1, "MODIFY": 3}
    assert dry["routes"]["refunds.request"] == {"would_run": 1}
    assert dry["routes"]["notification.shipped_email"] == {"would_run": 1}
    assert dry["routes"]["analytics.firehose_copy"] == {"would_run": 4}
    assert dry["outcomes"] == {"would_run": 4}

    replayed(env, "--from", t1.isoformat(), "--to", t2.isoformat())  # o-1 shipped and o-3 pending, done
    dry = replayed(env, "--dry-run", "--from", t1.isoformat())
    assert dry["routes"]["notification.shipped_email"] == {"already_done": 1}
    assert dry["routes"]["refunds.request"] == {"would_run": 1}
    assert dry["routes"]["analytics.firehose_copy"] == {"would_run": 4}, "at-least-once copies are sent again"


@pytest.mark.parametrize(("args", "line"), [
    (["--from", "-1m", "--to", "-2m"], r"--to .* is not after --from "),
    (["--from", "+5m"], r"expected an ISO-8601 time"),
    (["--from", "2999-01-01T00:00:00Z"], r"--from 2999-01-01T00:00:00\+00:00 is in the future"),
    (["--from", "-25h"], r"is before the stream's 24 h retention"),
    (["--from", "-2h"], r"older than the idempotency records' TTL \(1 h\)"),
    (["--from", "-1m", "--routes", "nope"], r"unknown route\(s\) nope; the routes are: analytics.firehose_copy, "),
    (["--from", "-1m", "--shard", "shardId-7"], r"--shard shardId-7: not a shard of the stream"),
    (["--from", "-1m", "--parallel", "0"], r"--parallel 0: give at least 1 shard at a time"),
])
def test_each_bad_time_fails_with_its_line_and_nothing_is_processed(history, args, line):
    names, clients, created, env, t1, t2 = history
    proc = cli({**env, "ORDERS_CDC_IDEMPOTENCY_TTL_SECONDS": "3600"}, "replay", *args, code=2)
    err = proc.stderr.decode().strip()
    assert len(err.splitlines()) == 1 and err.startswith("orders-cdc: ")
    assert re.search(line, err), err
    assert analytics(clients, names) == [] and refunds(clients, created, names) == 0


# -- rewind (the KCL-native restart): the lease reset ------------------------------------------

def lease_table(clients, name, shards):
    clients.dynamodb.create_table(TableName=name, BillingMode="PAY_PER_REQUEST",
                                  KeySchema=[{"AttributeName": "leaseKey", "KeyType": "HASH"}],
                                  AttributeDefinitions=[{"AttributeName": "leaseKey", "AttributeType": "S"}])
    for i, shard in enumerate(shards):
        clients.dynamodb.put_item(TableName=name, Item={
            "leaseKey": {"S": shard}, "leaseCounter": {"N": str(10 + i)}, "leaseOwner": {"S": "w-1"},
            "checkpoint": {"S": f"4965{i:040d}"}, "checkpointSubSequenceNumber": {"N": "0"}})


def test_the_lease_reset_is_all_or_nothing_and_a_rerun_finishes_it(moto_resources):
    from orders_cdc import leases

    names, clients, created, env = moto_resources
    table = f"leases-{names.stream}"
    lease_table(clients, table, [f"shardId-{i:012d}" for i in range(3)])
    read = leases.read_leases(clients.dynamodb, table)
    clients.dynamodb.update_item(TableName=table, Key={"leaseKey": {"S": "shardId-000000000001"}},
                                 UpdateExpression="SET leaseCounter = leaseCounter + :one",
                                 ExpressionAttributeValues={":one": {"N": "1"}})  # a worker renewed it
    with pytest.raises(SettingsError, match=r"^lease\(s\) shardId-000000000001 changed while resetting: "
                                            r"is a worker running\? 0 of 3 lease\(s\) reset"):
        leases.reset_to_timestamp(clients.dynamodb, table, read)
    assert [lease.checkpoint.isdigit() for lease in leases.read_leases(clients.dynamodb, table)] == [True] * 3

    assert leases.reset_to_timestamp(clients.dynamodb, table, leases.read_leases(clients.dynamodb, table)) == 3
    assert {lease.checkpoint for lease in leases.read_leases(clients.dynamodb, table)} == {"AT_TIMESTAMP"}
    assert leases.reset_to_timestamp(clients.dynamodb, table, leases.read_leases(clients.dynamodb, table)) == 0


def test_at_most_parallel_pipelines_are_built_and_reused_shard_after_shard(moto_resources):
    """Each pipeline has its own pool of call threads: one per shard would leak them."""
    names, clients, created, env = moto_resources
    stream = f"six-{names.stream}"
    clients.kinesis.create_stream(StreamName=stream, ShardCount=6)
    clients.kinesis.get_waiter("stream_exists").wait(StreamName=stream)
    start = datetime.now(timezone.utc) - timedelta(seconds=1)
    clients.kinesis.put_records(StreamName=stream, Records=[
        {"Data": b"{}", "PartitionKey": "k", "ExplicitHashKey": str(i * (2**128 // 6))} for i in range(6)])
    built, seen = [], []

    class Counting:
        """Stands in for the pipeline: counts what it is given and how many are built."""

        def __init__(self):
            built.append(self)

        def process(self, records, shard_id):
            seen.append((shard_id, len(records)))
            return []

    plan = replay.list_shards(clients.kinesis, stream)
    window = replay.Window(start, datetime.now(timezone.utc), True)
    replay.Replay(clients.kinesis, stream, window, plan, Counting, parallel=2, read_share=1).run()
    assert sorted(seen) == [(s.id, 1) for s in plan]
    assert 1 <= len(built) <= 2
