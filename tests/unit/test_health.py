"""The heartbeat and `orders-cdc health`: healthy and unhealthy states, the pid check on real
processes, and the lease-table watch against a real moto server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import boto3
import pytest

from orders_cdc import cli
from orders_cdc.health import JVM_MAIN_CLASS, Heartbeat, HealthSettings, Monitor, WorkerWatch, check, jvm_alive
from orders_cdc.local.runner import wait_until


class Clock:
    def __init__(self, now: float):
        self.now = now

    def __call__(self) -> float:
        return self.now


def beat(tmp_path: Path, **state) -> HealthSettings:
    settings = HealthSettings(heartbeat_file=tmp_path / "hb", stale_seconds=60, interval_seconds=5)
    Heartbeat(settings.heartbeat_file).write(**({"jvm_pid": 4242, "worker_id": "w-1"} | state))
    return settings


def test_fresh_heartbeat_of_a_live_jvm_is_healthy(tmp_path):
    settings = beat(tmp_path, activity="renewing 2 lease(s)")
    mtime = settings.heartbeat_file.stat().st_mtime
    healthy, line = check(settings, now=lambda: mtime + 59, alive=lambda pid: pid == 4242)
    assert healthy, line
    assert line.startswith("healthy: JVM pid 4242, worker w-1") and "renewing 2 lease(s)" in line


def test_stale_heartbeat_is_unhealthy(tmp_path):
    settings = beat(tmp_path, activity="renewing 2 lease(s)")
    mtime = settings.heartbeat_file.stat().st_mtime
    healthy, line = check(settings, now=lambda: mtime + 61, alive=lambda pid: True)
    assert not healthy
    assert line.startswith("unhealthy: heartbeat 61 s old (limit 60 s): worker w-1 neither renews a lease")


def test_dead_jvm_is_unhealthy_however_fresh_the_heartbeat(tmp_path):
    settings = beat(tmp_path)
    healthy, line = check(settings, alive=lambda pid: False)
    assert (healthy, line) == (False, "unhealthy: the KCL daemon (JVM pid 4242) is not running")


def test_no_heartbeat_file_is_unhealthy(tmp_path):
    healthy, line = check(HealthSettings(heartbeat_file=tmp_path / "none"))
    assert not healthy and "no heartbeat file" in line


def test_jvm_alive_checks_the_real_process_and_its_command_line():
    lookalike = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", JVM_MAIN_CLASS])
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert jvm_alive(lookalike.pid)
        assert not jvm_alive(other.pid), "a process that reused the pid is not the daemon"
        lookalike.kill()
        wait_until(lambda: not jvm_alive(lookalike.pid), 10, 0.05, "the killed process to be seen dead (zombie)")
        lookalike.wait()
        assert not jvm_alive(lookalike.pid)
    finally:
        for p in (lookalike, other):
            p.kill()
            p.wait()


def test_touch_refreshes_only_an_existing_file_and_at_most_once_a_second(tmp_path):
    path = tmp_path / "hb"
    clock = Clock(100.0)
    hb = Heartbeat(path, clock=clock)
    hb.touch()
    assert not path.exists(), "a child never creates the file: only `orders-cdc run` does"
    path.write_text("{}")
    os.utime(path, (1000, 1000))
    clock.now = 102.0
    hb.touch()
    assert path.stat().st_mtime > 1000
    os.utime(path, (1000, 1000))
    clock.now = 102.5
    hb.touch()
    assert path.stat().st_mtime == 1000, "throttled"
    clock.now = 103.5
    hb.touch()
    assert path.stat().st_mtime > 1000


def test_health_command_exit_codes_and_one_line(tmp_path, monkeypatch, capsys):
    lookalike = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", JVM_MAIN_CLASS])
    try:
        path = tmp_path / "hb"
        Heartbeat(path).write(jvm_pid=lookalike.pid, worker_id="w-1", activity="starting")
        monkeypatch.setenv("ORDERS_CDC_HEARTBEAT_FILE", str(path))
        assert cli.main(["health"]) == 0
        assert capsys.readouterr().err.splitlines() == [
            f"orders-cdc: healthy: JVM pid {lookalike.pid}, worker w-1, heartbeat 0 s old (starting)"]
        os.utime(path, (1, 1))
        assert cli.main(["health"]) == 1
        [line] = capsys.readouterr().err.splitlines()
        assert line.startswith("orders-cdc: unhealthy: heartbeat ")
        os.utime(path)
        lookalike.kill()
        lookalike.wait()
        assert cli.main(["health"]) == 1
        assert capsys.readouterr().err.splitlines() == [
            f"orders-cdc: unhealthy: the KCL daemon (JVM pid {lookalike.pid}) is not running"]
        monkeypatch.setenv("ORDERS_CDC_HEARTBEAT_STALE_SECONDS", "soon")
        assert cli.main(["health"]) == 1
        assert capsys.readouterr().err.splitlines() == [
            "orders-cdc: unhealthy: ORDERS_CDC_HEARTBEAT_STALE_SECONDS='soon' is not a number"]
    finally:
        lookalike.kill()
        lookalike.wait()


# -- the lease-table watch, on a real moto server ------------------------------------------------

@pytest.fixture
def lease_tables(moto_server):
    ddb = boto3.client("dynamodb", endpoint_url=moto_server, region_name="us-east-1",
                       aws_access_key_id="test", aws_secret_access_key="test")
    app = f"app-{uuid.uuid4().hex[:8]}"
    ddb.create_table(TableName=app, BillingMode="PAY_PER_REQUEST",
                     KeySchema=[{"AttributeName": "leaseKey", "KeyType": "HASH"}],
                     AttributeDefinitions=[{"AttributeName": "leaseKey", "AttributeType": "S"}])
    ddb.create_table(TableName=f"{app}-WorkerMetricStats", BillingMode="PAY_PER_REQUEST",
                     KeySchema=[{"AttributeName": "wid", "KeyType": "HASH"}],
                     AttributeDefinitions=[{"AttributeName": "wid", "AttributeType": "S"}])
    return ddb, app


def lease(ddb, table, shard, owner, counter):
    ddb.put_item(TableName=table, Item={"leaseKey": {"S": shard}, "leaseOwner": {"S": owner},
                                        "leaseCounter": {"N": str(counter)}, "checkpoint": {"S": "TRIM_HORIZON"}})


def test_watch_sees_renewals_of_its_own_leases_only(lease_tables):
    ddb, app = lease_tables
    watch = WorkerWatch(ddb, app, "w-1", f"{app}-WorkerMetricStats")
    lease(ddb, app, "shardId-0", "w-1", 1)
    lease(ddb, app, "shardId-1", "w-2", 1)
    ddb.put_item(TableName=app, Item={"leaseKey": {"S": "Leader"}, "entityType": {"S": "LEADER"}})
    assert watch.activity() is None, "one look cannot tell a renewal"
    lease(ddb, app, "shardId-1", "w-2", 2)  # another worker renews: not us
    assert watch.activity() is None
    lease(ddb, app, "shardId-0", "w-1", 2)
    assert watch.activity() == "renewing 1 lease(s)"
    assert watch.activity() is None, "a counter that stopped moving is not a renewal"


def test_watch_counts_a_worker_without_leases_that_reports_to_the_assigner(lease_tables):
    ddb, app = lease_tables
    watch = WorkerWatch(ddb, app, "w-3", f"{app}-WorkerMetricStats")
    assert watch.activity() is None
    table = f"{app}-WorkerMetricStats"
    ddb.put_item(TableName=table, Item={"wid": {"S": "w-3"}, "lut": {"N": "1900000000"}})
    assert watch.activity() is None, "a report seen once may be an old one"
    ddb.put_item(TableName=table, Item={"wid": {"S": "w-3"}, "lut": {"N": "1900000030"}})
    assert watch.activity() == "holds 0 lease(s), reporting to the lease assigner"
    assert watch.activity() is None, "a report that stopped (a stalled JVM) does not count"
    ddb.put_item(TableName=table, Item={"wid": {"S": "w-3"}, "lut": {"N": "1900000060000"}})  # milliseconds
    assert watch.activity() == "holds 0 lease(s), reporting to the lease assigner"


def test_watch_without_a_worker_metrics_table_relies_on_renewals(lease_tables):
    ddb, app = lease_tables
    watch = WorkerWatch(ddb, app, "w-1", "no-such-table")
    assert watch.activity() is None


class ScriptedWatch(WorkerWatch):
    def __init__(self, answers):
        self.answers = list(answers)
        self.calls = threading.Semaphore(0)
        self.go = threading.Event()  # nothing is answered before the test says so

    def activity(self):
        self.go.wait()
        self.calls.release()
        answer = self.answers.pop(0) if self.answers else None
        if isinstance(answer, Exception):
            raise answer
        return answer


def test_monitor_writes_at_start_and_refreshes_only_on_activity_while_the_jvm_lives(tmp_path):
    path = tmp_path / "hb"
    watch = ScriptedWatch([RuntimeError("lease table unreachable"), "renewing 1 lease(s)"])
    monitor = Monitor(Heartbeat(path), watch, "w-1", interval=0.01)
    alive = threading.Event()
    alive.set()
    monitor.started(777, alive.is_set)
    try:
        assert json.loads(path.read_text())["activity"] == "starting"
        assert json.loads(path.read_text())["jvm_pid"] == 777
        watch.go.set()
        wait_until(lambda: json.loads(path.read_text())["activity"] == "renewing 1 lease(s)", 30, 0.01,
                   "the monitor to record the renewal after a failed read")
        os.utime(path, (1, 1))
        while watch.calls.acquire(blocking=False):
            pass
        for _ in range(3):  # three more looks, nothing seen: no refresh
            watch.calls.acquire(timeout=30)
        alive.clear()
        monitor.stopped()
        assert path.stat().st_mtime == 1
    finally:
        monitor.stopped()


def test_an_unwritable_heartbeat_does_not_stop_the_worker(tmp_path, caplog):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    monitor = Monitor(Heartbeat(blocker / "hb"), ScriptedWatch([]), "w-1", interval=60)
    monitor.started(777, lambda: False)
    monitor.stopped()
    assert any(r.getMessage().startswith("cannot write the heartbeat file") for r in caplog.records)
    healthy, line = check(HealthSettings(heartbeat_file=blocker / "hb"))
    assert not healthy
