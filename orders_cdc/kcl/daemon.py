"""Start the Java MultiLangDaemon: effective properties, classpath, JVM flags, signals.

The daemon is a child of `orders-cdc run` in its own session, so a terminal's Ctrl-C
reaches only us; we turn it into one SIGTERM to the daemon's process group: the JVM asks
every record processor to checkpoint (shutdownRequested) within shutdownGraceMillis, and
the Python children (in the JVM's group) start no new calls meanwhile.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from orders_cdc.errors import SettingsError
from orders_cdc.kcl import properties
from orders_cdc.settings import Settings

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[2]
RECORD_PROCESSOR = PROJECT_ROOT / "record_processor.py"
LOGBACK = PROJECT_ROOT / "infra" / "logback.xml"
MAIN_CLASS = "software.amazon.kinesis.multilang.MultiLangDaemon"
# The SDK v2 Kinesis client speaks CBOR unless told not to; emulators and proxies that
# inspect JSON need it off, and it costs nothing against real AWS. There is no
# properties key for it (KCL #784).
JVM_FLAGS = ("-Daws.cborEnabled=false",)


def jars_dir() -> Path:
    override = os.environ.get("ORDERS_CDC_KCL_JARS")
    if override:
        path = Path(override)
    else:
        import amazon_kclpy

        path = Path(amazon_kclpy.__file__).parent / "jars"
    if not any(path.glob("amazon-kinesis-client-multilang-*.jar")):
        raise SettingsError(f"no KCL multilang jar in {path}: run `make install`")
    return path


def effective_properties(settings: Settings, base_file: Path, executable: str | None = None) -> dict[str, str]:
    """app.properties, checked, with the environment's deployment values laid over it."""
    values, problems = checked_properties(settings, base_file, executable)
    if problems:
        raise SettingsError(problems[0])
    return values


def checked_properties(settings: Settings, base_file: Path,
                       executable: str | None = None) -> tuple[dict[str, str], list[str]]:
    """The effective values, and one line per problem of the file or of what the environment
    lays over it (each with the file's line number, where it has one)."""
    entries, problems = properties.parse_all(base_file.read_text(), str(base_file))
    values = {key: entry.value for key, entry in entries.items()}
    values["executableName"] = executable or f"{sys.executable} {RECORD_PROCESSOR}"
    if settings.application_name:
        values["applicationName"] = settings.application_name
    values["regionName"] = settings.region
    if settings.stream_name:
        values.pop("streamArn", None)
        values["streamName"] = settings.stream_name
    if settings.worker_id:
        values["workerId"] = settings.worker_id
    if settings.max_leases_for_worker:
        values["maxLeasesForWorker"] = str(settings.max_leases_for_worker)
    for service, key in (("kinesis", "kinesisEndpoint"), ("dynamodb", "dynamoDBEndpoint")):
        if settings.endpoint(service):
            values[key] = settings.endpoint(service)
    if settings.endpoint("cloudwatch"):
        values["cloudWatchClient.endpointOverride"] = settings.endpoint("cloudwatch")
    if settings.initial_position is not None:
        properties.set_position(values, settings.initial_position)
    merged = {k: properties.Entry(entries[k].line if k in entries and entries[k].value == v else 0, k, v)
              for k, v in values.items()}
    return values, problems + properties.check(merged, str(base_file))


@dataclass(frozen=True)
class DaemonCommand:
    argv: list[str]
    properties_file: Path


def build_command(values: dict[str, str], run_dir: Path, java: str | None = None) -> DaemonCommand:
    java = java or os.environ.get("JAVA", "") or shutil.which("java") or ""
    if not java:
        raise SettingsError("java not found: install a Java 11+ runtime or set JAVA=/path/to/java")
    run_dir.mkdir(parents=True, exist_ok=True)
    props = run_dir / "daemon.properties"
    props.write_text(properties.render(values))
    classpath = f"{jars_dir()}/*{os.pathsep}{run_dir}"
    argv = [java, *JVM_FLAGS, f"-Dlogback.configurationFile={LOGBACK}", "-cp", classpath, MAIN_CLASS,
            "--properties-file", str(props)]
    return DaemonCommand(argv, props)


def run(command: DaemonCommand, env: dict[str, str] | None = None, restart: bool = False,
        max_backoff: float = 30.0, monitor=None) -> int:
    """Run the daemon; SIGTERM/SIGINT to us become one SIGTERM to its process group.

    When a Python child dies, the MultiLangDaemon shuts every shard down and the JVM exits
    1. In ECS the task exits and the service replaces it. With restart=True (local runs)
    we restart it ourselves with backoff; it resumes from the last checkpoints.

    `monitor` (health.Monitor) keeps the worker's heartbeat while each JVM lives.
    """
    stopping = False
    proc: subprocess.Popen | None = None

    def forward(signum, _frame):
        nonlocal stopping
        stopping = True
        log.info("stopping daemon", extra={"signal": signal.Signals(signum).name, "pid": proc.pid if proc else None})
        if proc is not None and proc.poll() is None:
            # The daemon's whole process group: the JVM starts its graceful shutdown, and each
            # Python child stops starting calls, so its batch ends within shutdownGraceMillis.
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    backoff = 1.0
    try:
        while True:
            started = time.monotonic()
            proc = subprocess.Popen(command.argv, env=env, start_new_session=True, stdout=sys.stderr,
                                    stdin=subprocess.DEVNULL)
            log.info("daemon started", extra={"pid": proc.pid, "properties": str(command.properties_file)})
            if monitor is not None:
                running = proc
                monitor.started(proc.pid, lambda: running.returncode is None)
            code = proc.wait()
            if monitor is not None:
                monitor.stopped()
            log.info("daemon exited", extra={"code": code, "pid": proc.pid})
            if stopping or not restart or code == 0:
                return code
            if time.monotonic() - started > 5 * max_backoff:
                backoff = 1.0  # it ran a good while: this is a fresh failure, not a crash loop
            log.warning("restarting the daemon after a failure (a child died or the JVM exited)",
                        extra={"code": code, "in_s": backoff})
            deadline = time.monotonic() + backoff
            while not stopping and time.monotonic() < deadline:
                time.sleep(0.1)
            if stopping:
                return code
            backoff = min(max_backoff, backoff * 2)
    finally:
        if monitor is not None:
            monitor.stopped()
            monitor.heartbeat.remove()
        for s, handler in previous.items():
            signal.signal(s, handler)
