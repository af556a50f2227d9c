"""One local run: the stack, its resources, the bridge, and the real KCL daemon.

`make run-local` (the demo) and the integration tests both go through this, so the
tests exercise exactly what a newcomer runs.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import boto3

from orders_cdc.local.bridge import StreamBridge
from orders_cdc.local.resources import ResourceNames, create_resources
from orders_cdc.local.stack import MARKER_ENV, PROJECT_ROOT, LocalStack, LocalStackConfig

log = logging.getLogger(__name__)


@dataclass
class LocalRunConfig:
    stack: LocalStackConfig = field(default_factory=LocalStackConfig)
    names: ResourceNames = field(default_factory=lambda: ResourceNames(stream="orders-cdc-changes"))
    application: str = "orders-cdc-local"
    worker_id: str = "local-worker-1"
    properties: Path = PROJECT_ROOT / "app.properties"
    extra_env: dict[str, str] = field(default_factory=dict)
    daemon_stop_timeout: float = 40.0


class DaemonProcess:
    """The JVM, in its own session, logging to a file; stopped with SIGTERM like ECS does."""

    def __init__(self, argv: list[str], env: dict[str, str], log_path: Path):
        self.argv, self.env, self.log_path = argv, env, log_path
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as out:
            self.proc = subprocess.Popen(self.argv, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True, cwd=PROJECT_ROOT)
        log.info("daemon started", extra={"pid": self.proc.pid, "log": str(self.log_path)})

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        """Signal the JVM only (not its children): that is what ECS and `kill` do."""
        if self.alive():
            os.kill(self.proc.pid, sig)

    def stop(self, timeout: float) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("daemon did not stop in %.0fs; killing its process group", timeout)
        # The session holds the JVM and its Python children; none may outlive us.
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return self.proc.wait()


class LocalRun:
    def __init__(self, cfg: LocalRunConfig | None = None):
        self.cfg = cfg or LocalRunConfig()
        self.stack = LocalStack(self.cfg.stack)
        self.bridge: StreamBridge | None = None
        self._bridge_stop = threading.Event()
        self._bridge_thread: threading.Thread | None = None
        self.daemons: list[DaemonProcess] = []

    def env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.stack.aws_env())
        env.update(self.cfg.names.environment())  # the names the stack was created with
        env.update({
            "ORDERS_CDC_STREAM": self.cfg.names.stream,
            "ORDERS_CDC_APPLICATION": self.cfg.application,
            "ORDERS_CDC_WORKER_ID": self.cfg.worker_id,
            "CBOR_ENABLED": "false",
            # The stack's marker: `orders-cdc local down` finds (and may stop) the daemon
            # and its children by it, like the stack's own servers.
            MARKER_ENV: str(self.stack.root),
        })
        env.update(self.cfg.extra_env)
        env.update(extra)
        return env

    def client(self, service: str):
        endpoint = self.stack.endpoints[service]
        return boto3.client(service, endpoint_url=endpoint, region_name="us-east-1",
                            aws_access_key_id="test", aws_secret_access_key="test")

    def start_stack(self) -> None:
        self.stack.start()
        create_resources(self.stack.endpoints, self.cfg.names)

    def start_bridge(self) -> None:
        self.bridge = StreamBridge(
            self.client("dynamodbstreams"), self.client("dynamodb"), self.client("kinesis"),
            table_name=self.cfg.names.orders_table, stream_name=self.cfg.names.stream,
        )
        self._bridge_thread = threading.Thread(target=self.bridge.run, args=(self._bridge_stop,), name="bridge", daemon=True)
        self._bridge_thread.start()

    def start_daemon(self, worker_id: str | None = None, **extra_env: str) -> DaemonProcess:
        """`orders-cdc run`, exactly as the container runs it, with the local environment."""
        env = self.env(**({"ORDERS_CDC_WORKER_ID": worker_id} if worker_id else {}), **extra_env)
        worker = env["ORDERS_CDC_WORKER_ID"]
        # One heartbeat per worker (health.py), beside its run directory: several workers,
        # and other local runs, share this host.
        env.setdefault("ORDERS_CDC_HEARTBEAT_FILE", str(self.heartbeat_file(worker)))
        argv = [sys.executable, "-m", "orders_cdc.cli", "run", "--restart", "--properties", str(self.cfg.properties),
                "--run-dir", str(self.cfg.stack.root / "run" / worker)]
        proc = DaemonProcess(argv, env, self.cfg.stack.root / "logs" / f"daemon-{worker}.log")
        proc.start()
        self.daemons.append(proc)
        return proc

    def heartbeat_file(self, worker: str | None = None) -> Path:
        return self.cfg.stack.root / "run" / (worker or self.cfg.worker_id) / "heartbeat"

    def start(self) -> LocalRun:
        try:
            self.start_stack()
            self.start_bridge()
            self.start_daemon()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for proc in self.daemons:
            code = proc.stop(self.cfg.daemon_stop_timeout)
            log.info("daemon stopped", extra={"pid": proc.pid, "code": code})
        self._bridge_stop.set()
        if self._bridge_thread:
            self._bridge_thread.join(10)
        self.stack.stop()

    def __enter__(self) -> LocalRun:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def wait_until(predicate, timeout: float, interval: float = 0.5, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)
