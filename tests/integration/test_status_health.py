"""`orders-cdc status` and `orders-cdc health` against the real daemon on the local stack:
healthy while it renews its leases; unhealthy when its JVM is alive but stalled (SIGSTOP:
no renewal, no batch) and when it is dead."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import orjson
import pytest

from orders_cdc.local.runner import LocalRun, LocalRunConfig, wait_until
from orders_cdc.local.stack import PROJECT_ROOT, LocalStackConfig, free_port
from tests.faults.harness import History, observe

pytestmark = pytest.mark.integration
STALE = 20


def cli(run: LocalRun, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orders_cdc.cli", *args], cwd=PROJECT_ROOT, capture_output=True,
                          timeout=120, env=run.env(ORDERS_CDC_HEARTBEAT_FILE=str(run.heartbeat_file())))


def health(run: LocalRun) -> tuple[int, str]:
    proc = cli(run, "health")
    lines = [line for line in proc.stderr.decode().splitlines() if not line.startswith("{")]
    assert len(lines) == 1, proc.stderr.decode()
    return proc.returncode, lines[0]


def test_status_and_health_of_the_real_daemon():
    cfg = LocalRunConfig(stack=LocalStackConfig(root=PROJECT_ROOT / ".local" / "test-status",
                                                moto_port=free_port(), localstack_port=free_port()),
                         extra_env={"ORDERS_CDC_CHECKPOINT_EVERY_SECONDS": "1",
                                    "ORDERS_CDC_HEARTBEAT_STALE_SECONDS": str(STALE),
                                    "ORDERS_CDC_HEARTBEAT_INTERVAL_SECONDS": "2"})
    with LocalRun(cfg) as run:
        history = History(orders=4, prefix="st")
        history.write(run, rate=20)
        wait_until(lambda: set(observe(run, "st").changes) >= history.expected_changes(), 240, 2.0, "the history")

        def at_tip():
            proc = cli(run, "status", "--json")
            assert proc.returncode == 0, proc.stderr.decode()[-2000:]
            doc = orjson.loads(proc.stdout)
            rows = doc["shards"]
            return doc if rows and all(r["checkpoint"].isdigit() and r["millis_behind"] == 0 for r in rows) else None

        doc = wait_until(at_tip, 90, 2.0, "status to show both checkpoints at the tip")
        assert [(r["owner"], r["state"], r["parents"], r["error"]) for r in doc["shards"]] == \
            [("local-worker-1", "open", [], None)] * 2
        assert all(r["checkpoint_arrival"] for r in doc["shards"])
        assert [(w["worker"], w["leases"]) for w in doc["workers"]] == [("local-worker-1", 2)]
        assert (doc["dead_letters"]["visible"], doc["dead_letters"]["oldest_age_seconds"]) == (0, None)
        table = cli(run, "status")
        assert table.returncode == 0 and b"local-worker-1" in table.stdout
        print("\nSTATUS\n" + table.stdout.decode())

        code, line = wait_until(lambda: (h := health(run))[0] == 0 and "renewing 2 lease(s)" in h[1] and h,
                                60, 1.0, "health to see the renewals")
        print(f"HEALTH {code} {line}")
        jvm = json.loads(run.heartbeat_file().read_text())["jvm_pid"]

        # Alive but stalled: no renewal, no batch. The heartbeat goes stale.
        os.kill(jvm, signal.SIGSTOP)
        try:
            code, line = wait_until(lambda: (h := health(run))[0] == 1 and h, STALE + 60, 2.0, "health to go stale")
            assert "unhealthy: heartbeat" in line and "neither renews a lease" in line, line
            print(f"HEALTH {code} {line}")
        finally:
            os.kill(jvm, signal.SIGCONT)

        # Dead: the wrapper killed hard (so it neither restarts the JVM nor removes its
        # heartbeat file), then the JVM's own session (it and its children).
        os.killpg(run.daemons[0].pid, signal.SIGKILL)
        run.daemons[0].proc.wait()
        os.killpg(jvm, signal.SIGKILL)
        wait_until(lambda: health(run)[0] == 1 and "is not running" in health(run)[1], 30, 0.5, "the dead JVM")
        code, line = health(run)
        assert line == f"orders-cdc: unhealthy: the KCL daemon (JVM pid {jvm}) is not running"
        print(f"HEALTH {code} {line}")
