"""The worker's heartbeat, and `orders-cdc health`, which reads it.

A worker is healthy when its JVM is alive and it holds leases or is trying to take them.
`orders-cdc run` keeps a heartbeat file (ORDERS_CDC_HEARTBEAT_FILE) for the JVM it runs:
- it writes the file when the JVM starts (its pid, the worker id, "starting");
- every ORDERS_CDC_HEARTBEAT_INTERVAL_SECONDS, while the JVM lives, it reads the lease
  table and rewrites the file when the worker is seen at work: a lease it owns whose
  counter moved (the KCL renews every failoverTimeMillis/3), or its worker-metrics entry
  updated since the last look (KCL 3.x reports every 30 s to the leader that assigns
  leases: a worker holding nothing, with more workers than shards, is still trying to
  take some). Only a change counts: a JVM that is alive but stalled changes nothing;
- each child (one per leased shard) touches the file on initialize and on every
  processRecords, empty ones included, at most once a second.

`orders-cdc health` is unhealthy when the file is missing, its JVM is gone, or it is older
than ORDERS_CDC_HEARTBEAT_STALE_SECONDS. Reads are local (a stat, a small file, /proc):
the container's health check costs no AWS call; the lease-table reads happen in the
wrapper, one Scan and one GetItem per interval.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_FILE = "/tmp/orders-cdc.heartbeat"
# KCL 3.x: WorkerMetricStatsReporter writes lastUpdateTime ("lut") every 30 s by default
# (workerMetricsReporterFreqInMillis), so a worker that holds no lease refreshes the
# heartbeat every 30 s: ORDERS_CDC_HEARTBEAT_STALE_SECONDS must be well above that.
JVM_MAIN_CLASS = "software.amazon.kinesis.multilang.MultiLangDaemon"


@dataclass(frozen=True, slots=True)
class HealthSettings:
    heartbeat_file: Path = Path(DEFAULT_FILE)
    stale_seconds: float = 120.0  # a heartbeat older than this: unhealthy
    interval_seconds: float = 10.0  # how often `run` looks at the lease table


class Heartbeat:
    """The file. The wrapper writes it (atomically); children only touch it."""

    def __init__(self, path: Path, min_touch_interval: float = 1.0, clock: Callable[[], float] = time.monotonic):
        self.path = Path(path)
        self._min = min_touch_interval
        self._clock = clock
        self._last_touch: float | None = None

    def touch(self) -> None:
        """Refresh the file's time, if it exists: only `orders-cdc run` creates it, so a
        child run by anything else (a test, a bench) leaves no file behind. Never raises:
        a heartbeat is not processing, and its failure must not stop a batch."""
        now = self._clock()
        if self._last_touch is not None and now - self._last_touch < self._min:
            return
        self._last_touch = now
        try:
            os.utime(self.path)
        except OSError:
            pass  # no wrapper (file absent) or an unwritable /tmp: health will say so

    def write(self, **state: object) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({**state, "written_at": time.time()}))
        os.replace(tmp, self.path)

    def remove(self) -> None:
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass


def jvm_alive(pid: int) -> bool:
    """The pid runs, and is the MultiLangDaemon (not a process that reused the pid)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, under another user
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    except OSError:
        return True  # no /proc to check with: trust the signal
    # A zombie (exited, not yet reaped) has an empty cmdline and state Z.
    state = stat.rsplit(")", 1)[-1].split()[0] if ")" in stat else ""
    return state != "Z" and JVM_MAIN_CLASS.encode() in cmdline


def check(settings: HealthSettings, now: Callable[[], float] = time.time,
          alive: Callable[[int], bool] = jvm_alive) -> tuple[bool, str]:
    """(healthy, one line saying why)."""
    path = settings.heartbeat_file
    try:
        stat = path.stat()
        state = json.loads(path.read_text())
    except FileNotFoundError:
        return False, f"unhealthy: no heartbeat file {path} (is `orders-cdc run` running here?)"
    except (OSError, ValueError) as exc:
        return False, f"unhealthy: heartbeat file {path} unreadable ({type(exc).__name__})"
    pid = state.get("jvm_pid")
    if not isinstance(pid, int) or not alive(pid):
        return False, f"unhealthy: the KCL daemon (JVM pid {pid}) is not running"
    age = max(0.0, now() - stat.st_mtime)
    activity = state.get("activity") or "starting"
    if age > settings.stale_seconds:
        return False, (f"unhealthy: heartbeat {math.ceil(age)} s old (limit {settings.stale_seconds:g} s): worker "
                       f"{state.get('worker_id')} neither renews a lease nor reports to the lease assigner, "
                       f"and no child processed a batch (last seen: {activity})")
    return True, f"healthy: JVM pid {pid}, worker {state.get('worker_id')}, heartbeat {age:.0f} s old ({activity})"


class WorkerWatch:
    """Reads the lease table to tell whether this worker is at work (see the module doc)."""

    def __init__(self, dynamodb, lease_table: str, worker_id: str, metrics_table: str | None):
        self._ddb = dynamodb
        self._table = lease_table
        self._worker = worker_id
        self._metrics_table = metrics_table
        self._counters: dict[str, int] = {}
        self._reported: float | None = None

    def activity(self) -> str | None:
        """What shows the worker at work now, or None. Raises on AWS errors (the caller logs)."""
        owned: dict[str, int] = {}
        reported: float | None = None
        kwargs = {"TableName": self._table,
                  "ProjectionExpression": "leaseKey, leaseOwner, leaseCounter, entityType, lut"}
        while True:
            page = self._ddb.scan(**kwargs)
            for item in page.get("Items", []):
                kind = item.get("entityType", {}).get("S", "LEASE")
                key = item.get("leaseKey", {}).get("S", "")
                if kind == "LEASE" and item.get("leaseOwner", {}).get("S") == self._worker and "leaseCounter" in item:
                    owned[key] = int(item["leaseCounter"]["N"])
                elif kind == "WORKER_METRIC_STATS" and key == self._worker and "lut" in item:
                    reported = _seconds(item["lut"]["N"])  # KCL 3.5 single-table format
            if "LastEvaluatedKey" not in page:
                break
            kwargs["ExclusiveStartKey"] = page["LastEvaluatedKey"]
        renewed = [k for k, counter in owned.items() if k in self._counters and counter != self._counters[k]]
        self._counters = owned
        if renewed:
            return f"renewing {len(owned)} lease(s)"
        if reported is None and self._metrics_table:
            reported = self._metrics_reported()
        before, self._reported = self._reported, reported
        if reported is not None and before is not None and reported > before:
            return f"holds {len(owned)} lease(s), reporting to the lease assigner"
        return None

    def _metrics_reported(self) -> float | None:
        from botocore.exceptions import ClientError

        try:
            item = self._ddb.get_item(TableName=self._metrics_table, Key={"wid": {"S": self._worker}},
                                      ProjectionExpression="lut").get("Item")
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") == "ResourceNotFoundException":
                return None  # 2.x-compatible mode or the single-table format: no such table
            raise
        return _seconds(item["lut"]["N"]) if item and "lut" in item else None


def _seconds(raw: str) -> float:
    value = float(raw)
    return value / 1000 if value > 1e11 else value  # epoch seconds or milliseconds


class Monitor:
    """Run by `orders-cdc run` beside each JVM: writes the heartbeat at start, then
    refreshes it while the JVM lives and the worker is seen at work."""

    def __init__(self, heartbeat: Heartbeat, watch: WorkerWatch, worker_id: str, interval: float):
        self.heartbeat, self.watch, self.worker_id, self.interval = heartbeat, watch, worker_id, interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def started(self, pid: int, alive: Callable[[], bool]) -> None:
        self.stopped()
        self._stop = threading.Event()
        self._write(pid, "starting")
        self._thread = threading.Thread(target=self._loop, args=(pid, alive, self._stop), name="heartbeat", daemon=True)
        self._thread.start()

    def stopped(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.interval + 10)
            self._thread = None

    def _write(self, pid: int, activity: str) -> None:
        # The worker goes on without its heartbeat (health then says so): processing does
        # not depend on a file in /tmp.
        try:
            self.heartbeat.write(jvm_pid=pid, worker_id=self.worker_id, activity=activity)
        except OSError as exc:
            log.error("cannot write the heartbeat file: health will report unhealthy",
                      extra={"path": str(self.heartbeat.path), "error": f"{type(exc).__name__}: {exc.strerror}"})

    def _loop(self, pid: int, alive: Callable[[], bool], stop: threading.Event) -> None:
        last, failing = None, False
        while not stop.wait(self.interval) and alive():
            try:
                activity = self.watch.activity()
                if failing:
                    log.info("lease table readable again", extra={"worker": self.worker_id})
                failing = False
            except Exception as exc:  # noqa: BLE001 - the heartbeat goes stale instead; health reports it
                from orders_cdc.errors import describe

                if not failing:
                    log.warning("cannot read the lease table for the heartbeat", extra={"error": describe(exc)})
                failing, activity = True, None
            if activity:
                self._write(pid, activity)
            if activity != last:
                log.info("worker activity", extra={"worker": self.worker_id, "activity": activity or "none seen"})
                last = activity


def monitor_for(settings, values: dict[str, str]) -> Monitor:
    """The monitor of the daemon `orders-cdc run` starts with these effective properties:
    the lease table, endpoint and region the daemon itself uses."""
    import boto3
    from botocore.config import Config

    endpoint = values.get("dynamoDBEndpoint") or settings.endpoint("dynamodb")
    # Short timeouts, few retries: a slow answer must not hold the loop past its interval.
    config = Config(connect_timeout=2, read_timeout=5, retries={"mode": "standard", "total_max_attempts": 2})
    dynamodb = boto3.session.Session(region_name=values.get("regionName") or settings.region).client(
        "dynamodb", endpoint_url=endpoint, config=config)
    application = values["applicationName"]
    worker = values["workerId"]
    watch = WorkerWatch(dynamodb, values.get("tableName", application), worker,
                        values.get("workerMetricsTableName", f"{application}-WorkerMetricStats"))
    return Monitor(Heartbeat(settings.health.heartbeat_file), watch, worker, settings.health.interval_seconds)
