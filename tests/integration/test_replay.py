"""`orders-cdc status` and `orders-cdc replay --from TIME` against the real daemon."""

from __future__ import annotations

import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone

import orjson
import pytest

from orders_cdc.local.runner import LocalRun, LocalRunConfig, wait_until
from orders_cdc.local.stack import PROJECT_ROOT, LocalStackConfig, free_port
from tests.faults.harness import History, observe

pytestmark = pytest.mark.integration


def cli(run: LocalRun, *args: str, **extra_env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orders_cdc.cli", *args], env=run.env(**extra_env),
                          cwd=PROJECT_ROOT, capture_output=True, timeout=120)


def test_status_then_replay_from_a_time_redelivers_without_repeating_side_effects():
    cfg = LocalRunConfig(stack=LocalStackConfig(root=PROJECT_ROOT / ".local" / "test-replay",
                                                moto_port=free_port(), localstack_port=free_port()),
                         extra_env={"ORDERS_CDC_CHECKPOINT_EVERY_SECONDS": "1"})
    with LocalRun(cfg) as run:
        history = History(orders=8, prefix="rp")
        since = datetime.now(timezone.utc) - timedelta(seconds=2)
        history.write(run, rate=20)
        wait_until(lambda: set(observe(run, "rp").changes) >= history.expected_changes(), 240, 2.0, "the history")

        def checkpointed():
            proc = cli(run, "status", "--json")
            assert proc.returncode == 0, proc.stderr.decode()[-2000:]
            rows = orjson.loads(proc.stdout)["shards"]
            return rows if rows and all(r["checkpoint"].isdigit() and r["millis_behind"] == 0 for r in rows) else None

        rows = wait_until(checkpointed, 60, 2.0, "status to show checkpoints at the tip")
        assert {r["owner"] for r in rows} == {"local-worker-1"} and len(rows) == 2
        first = observe(run, "rp")

        run.daemons[0].stop(60)
        proc = cli(run, "replay", "--from", since.isoformat())
        assert proc.returncode == 0, proc.stderr.decode()[-2000:]
        assert all(r["checkpoint"] == "AT_TIMESTAMP" for r in orjson.loads(cli(run, "status", "--json").stdout)["shards"])

        refused = cli(run, "run")
        assert refused.returncode == 2
        assert refused.stderr.decode().strip() == "orders-cdc: leases are set to replay (AT_TIMESTAMP): start with --from TIME (the replay time)"

        run.start_daemon(ORDERS_CDC_INITIAL_POSITION=since.isoformat())
        seen = wait_until(lambda: (s := observe(run, "rp")) and all(n >= 2 for n in s.changes.values()) and s,
                          240, 2.0, "every change delivered again")
        time.sleep(5)
        seen = observe(run, "rp")
        print(f"\nREPLAY: {sum(seen.changes.values()) - sum(first.changes.values())} changes re-delivered; "
              f"emails {sum(first.emails.values())} -> {sum(seen.emails.values())}")
        assert set(seen.changes) == history.expected_changes()
        assert seen.emails == first.emails == history.expected_emails(), "no email sent twice"
        assert seen.refunds == first.refunds == history.expected_refunds(), "no refund requested twice"
        assert (seen.order_count, seen.revenue) == history.expected_revenue()
