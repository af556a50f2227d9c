"""`orders-cdc rewind` (the KCL-native restart) with the real daemon, and `orders-cdc replay`
across a shard split, on the local stack (LocalStack's kinesis-mock: moto's Kinesis keeps
writing to a split shard's closed parent)."""

from __future__ import annotations

import base64
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone

import orjson
import pytest

from orders_cdc import replay
from orders_cdc.local.runner import LocalRun, LocalRunConfig, wait_until
from orders_cdc.local.stack import PROJECT_ROOT, LocalStackConfig, free_port
from tests.faults.harness import History, observe, put_changes

pytestmark = pytest.mark.integration


def cli(run: LocalRun, *args: str, **extra_env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orders_cdc.cli", *args], env=run.env(**extra_env),
                          cwd=PROJECT_ROOT, capture_output=True, timeout=120)


def config(name: str, **extra_env: str) -> LocalRunConfig:
    return LocalRunConfig(stack=LocalStackConfig(root=PROJECT_ROOT / ".local" / name,
                                                 moto_port=free_port(), localstack_port=free_port()),
                          extra_env={"ORDERS_CDC_CHECKPOINT_EVERY_SECONDS": "1", **extra_env})


def test_rewind_to_t1_makes_the_daemon_redeliver_exactly_from_t1_without_repeating_side_effects():
    with LocalRun(config("test-rewind")) as run:
        before, after = History(orders=6, prefix="rw0"), History(orders=6, prefix="rw1")
        before.write(run, rate=20)
        wait_until(lambda: set(observe(run, "rw0").changes) >= before.expected_changes(), 240, 2.0, "T0's changes")
        time.sleep(1.5)
        t1 = datetime.now(timezone.utc)
        time.sleep(1.5)
        after.write(run, rate=20)
        wait_until(lambda: set(observe(run, "rw1").changes) >= after.expected_changes(), 240, 2.0, "T1's changes")
        wait_until(lambda: all(lease.checkpoint.isdigit() for lease in _leases(run)), 60, 1.0, "checkpoints")
        first = observe(run, "rw1")

        run.daemons[0].stop(60)
        proc = cli(run, "rewind", "--from", t1.isoformat())
        assert proc.returncode == 0, proc.stderr.decode()[-2000:]
        assert "2 lease(s) of" in proc.stderr.decode() and {lease.checkpoint for lease in _leases(run)} == {"AT_TIMESTAMP"}
        refused = cli(run, "run")
        assert refused.returncode == 2
        assert refused.stderr.decode().strip() == ("orders-cdc: leases are rewound (AT_TIMESTAMP): start with --from "
                                                   "TIME, the time given to `orders-cdc rewind`")

        run.start_daemon(ORDERS_CDC_INITIAL_POSITION=t1.isoformat())
        wait_until(lambda: all(n >= 2 for n in observe(run, "rw1").changes.values()), 240, 2.0,
                   "every change since T1 delivered again")
        time.sleep(5)
        old, new = observe(run, "rw0"), observe(run, "rw1")
        assert old.changes == {c: 1 for c in before.expected_changes()}, "nothing before T1 came again"
        assert new.changes == {c: 2 for c in after.expected_changes()}, "everything since T1 came again, once"
        assert new.emails == first.emails == after.expected_emails(), "no email sent twice"
        # The refund queue holds both histories' refunds (observe does not filter them by prefix).
        assert new.refunds == first.refunds == before.expected_refunds() + after.expected_refunds(), \
            "no refund requested twice"


def _leases(run: LocalRun):
    from orders_cdc import leases

    return leases.read_leases(run.client("dynamodb"), run.cfg.application)


class Recorder:
    """A pipeline stand-in that records what it is given: the reader and its order are under test."""

    def __init__(self, calls: list):
        self.calls = calls

    def process(self, records, shard_id):
        self.calls.append((shard_id, [orjson.loads(base64.b64decode(r["data"]))["dynamodb"]["Keys"]["order_id"]["S"]
                                      for r in records]))
        return []


def test_replay_across_a_shard_split_reads_the_parent_before_its_children_and_shard_limits_it():
    from tests.factories import kds_record

    run = LocalRun(config("test-replay-split"))
    try:
        run.start_stack()
        kinesis, stream = run.client("kinesis"), run.cfg.names.stream

        def changes(prefix):
            return [(f"{prefix}-{i}", kds_record("INSERT", new={"order_id": f"{prefix}-{i}", "status": "pending"},
                                                 old=None, keys={"order_id": f"{prefix}-{i}"}))
                    for i in range(30)]

        start = datetime.now(timezone.utc) - timedelta(seconds=1)
        put_changes(run, changes("before"))
        shards = kinesis.list_shards(StreamName=stream)["Shards"]
        parent = shards[0]
        low, high = int(parent["HashKeyRange"]["StartingHashKey"]), int(parent["HashKeyRange"]["EndingHashKey"])
        kinesis.split_shard(StreamName=stream, ShardToSplit=parent["ShardId"], NewStartingHashKey=str((low + high) // 2))
        wait_until(lambda: kinesis.describe_stream_summary(StreamName=stream)["StreamDescriptionSummary"]
                   ["StreamStatus"] == "ACTIVE", 60, 0.5, "the split")
        put_changes(run, changes("after"))

        plan = replay.list_shards(kinesis, stream)
        children = [s.id for s in plan if s.parents == (parent["ShardId"],)]
        assert len(children) == 2 and [s.closed for s in plan if s.id == parent["ShardId"]] == [True]
        window = replay.Window(start, datetime.now(timezone.utc), True)
        calls: list = []
        # Children first in the plan and room for every shard at once: only the parent rule holds them.
        ordered = sorted(plan, key=lambda s: s.id == parent["ShardId"])
        replay.Replay(kinesis, stream, window, ordered, lambda: Recorder(calls), parallel=8, read_share=1).run()
        seen = [(shard, oid) for shard, oids in calls for oid in oids]
        assert sorted(oid for _, oid in seen) == sorted(o for o, _ in changes("before") + changes("after"))
        parent_reads = [i for i, (s, _) in enumerate(calls) if s == parent["ShardId"]]
        child_reads = [i for i, (s, _) in enumerate(calls) if s in children]
        assert parent_reads and child_reads and max(parent_reads) < min(child_reads)
        assert all(oid.startswith("before-") for s, oid in seen if s == parent["ShardId"])

        calls.clear()
        replay.Replay(kinesis, stream, window, replay.choose_shards(plan, children[:1]), lambda: Recorder(calls),
                      read_share=1).run()
        assert calls and {s for s, _ in calls} == {children[0]}
        assert all(oid.startswith("after-") for _, oids in calls for oid in oids)
    finally:
        run.stop()


def test_replay_on_the_local_stack_processes_exactly_the_window_once_with_a_progress_bar():
    """T0 < T1 < T2 on LocalStack's Kinesis, the reactions on moto: `replay --from T1 --to T2`
    processes exactly T1's changes, and a second run repeats no reaction."""
    run = LocalRun(config("test-replay-window"))
    try:
        run.start_stack()
        h0, h1, h2 = (History(orders=4, prefix=p) for p in ("w0", "w1", "w2"))
        t = []
        for h in (h0, h1, h2):
            t.append(datetime.now(timezone.utc))
            time.sleep(1.1)
            put_changes(run, h.kds_changes(run.cfg.names.orders_table, int(time.time() * 1e6)))
            time.sleep(1.1)
        proc = cli(run, "replay", "--from", t[1].isoformat(), "--to", t[2].isoformat(), "--json", "--progress", "on")
        assert proc.returncode == 0, proc.stderr.decode()[-2000:]
        summary = orjson.loads(proc.stdout)
        assert summary["records"] == len(h1.kds_changes(run.cfg.names.orders_table, 0))
        assert "records, " in proc.stderr.decode() and "shards" in proc.stderr.decode(), "the progress bar"
        assert set(observe(run, "w1").changes) == h1.expected_changes()
        assert not observe(run, "w0").changes and not observe(run, "w2").changes
        first = observe(run, "w1")
        assert first.refunds == h1.expected_refunds() and first.emails == h1.expected_emails()

        again = cli(run, "replay", "--from", t[1].isoformat(), "--to", t[2].isoformat(), "--json")
        assert again.returncode == 0, again.stderr.decode()[-2000:]
        assert orjson.loads(again.stdout)["routes"]["refunds.request"] == {"duplicate": sum(h1.expected_refunds().values())}
        seen = observe(run, "w1")
        assert seen.refunds == first.refunds and seen.emails == first.emails, "no reaction repeated"
    finally:
        run.stop()
