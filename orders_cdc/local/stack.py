"""The embedded local AWS stack: moto server + LocalStack (Kinesis only), on the host, no Docker.

- moto server serves DynamoDB (+ Streams), SES, SQS, S3, Firehose, CloudWatch (HTTP/1.1).
- LocalStack serves Kinesis through kinesis-mock, because the KCL's Kinesis client speaks
  h2c, which moto cannot (shared/notes/local-aws.md).

Every process we start gets its own session (so one killpg stops it and its children), a log
at ``<root>/logs/<name>.log``, a pid file at ``<root>/run/<name>.pid``, and the environment
variable ``ORDERS_CDC_LOCAL_STACK=<root>``. That marker is inherited by every descendant,
including kinesis-mock, which LocalStack starts in a session of its own: it is how ``stop``
and ``stop_stale`` (the ``down`` command) find our processes, and how they refuse to signal
a PID that has been reused by someone else.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import boto3
from botocore.config import Config

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[2]
SHIM_SOURCE = PROJECT_ROOT / "infra" / "local" / "bind_loopback.c"
MARKER_ENV = "ORDERS_CDC_LOCAL_STACK"
REGION = "us-east-1"
# LocalStack derives the account from the access key: "test" -> 000000000000. Everything
# that talks to the stack (the KCL daemon included) must use the same key, or it sees
# another account with no stream in it.
ACCESS_KEY_ID = "test"
SECRET_ACCESS_KEY = "test"
HOST = "127.0.0.1"

# What /proc/<pid>/cmdline of each process we start must contain (PID-reuse guard).
_CMD_MATCH = {"moto": "orders_cdc.local.moto_server", "localstack": "localstack.runtime.main"}
# Services the project takes from moto (boto3 client names).
MOTO_SERVICES = (
    "dynamodb", "dynamodbstreams", "ses", "sesv2", "sqs", "s3", "firehose", "cloudwatch",
    "sts", "iam", "logs",
)


class StackError(RuntimeError):
    """The local stack could not start or stop; the message names the log to read."""


@dataclass(frozen=True, slots=True)
class LocalStackConfig:
    root: Path = PROJECT_ROOT / ".local"
    moto_port: int = 4567
    localstack_port: int = 4566
    localstack_python: Path = PROJECT_ROOT / ".venv-localstack" / "bin" / "python"
    # Cold start includes LocalStack installing kinesis-mock from npm.
    start_timeout: float = 180.0
    # LocalStack sometimes hangs in "Shutting down kinesis backend": SIGKILL after this at
    # the latest (3 s after kinesis-mock is gone, in practice).
    stop_timeout: float = 10.0
    # kinesis-mock logs every request at INFO; the KCL polls several times a second.
    kinesis_mock_log_level: str = "WARN"
    extra_localstack_env: Mapping[str, str] = field(default_factory=dict)


# ---------------------------------------------------------------- process bookkeeping


def _proc_read(pid: int, name: str) -> bytes | None:
    try:
        return Path(f"/proc/{pid}/{name}").read_bytes()
    except OSError:  # gone, or not ours to read
        return None


def _alive(pid: int) -> bool:
    stat = _proc_read(pid, "stat")
    if stat is None:
        return False
    # Field 3 (after the parenthesised command) is the state; a zombie is already dead.
    return stat.rpartition(b")")[2].split()[0] != b"Z"


def _children(pid: int | None) -> list[int]:
    """Live direct children of pid."""
    kids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            stat = _proc_read(int(entry.name), "stat")
            fields = stat.rpartition(b")")[2].split() if stat else []
            if len(fields) > 1 and fields[1] == str(pid).encode() and fields[0] != b"Z":
                kids.append(int(entry.name))
    return kids


def _has_marker(pid: int, root: Path) -> bool:
    environ = _proc_read(pid, "environ")
    return environ is not None and f"{MARKER_ENV}={root}".encode() in environ.split(b"\0")


def is_ours(pid: int, root: Path, cmd_match: str | None = None) -> bool:
    """True if pid is alive, carries our marker for root and (if given) runs cmd_match."""
    if not _alive(pid) or not _has_marker(pid, root):
        return False
    if cmd_match is None:
        return True
    cmdline = _proc_read(pid, "cmdline") or b""
    return cmd_match.encode() in cmdline


def marked_pids(root: Path) -> set[int]:
    """Every live process carrying our marker for root (our servers and their children)."""
    pids = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            pid = int(entry.name)
            if is_ours(pid, root):
                pids.add(pid)
    return pids


def _signal(pid: int, sig: int) -> None:
    """Signal pid's process group if it leads one (we start everything with setsid), else pid."""
    try:
        if os.getpgid(pid) == pid:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _wait_gone(pids: Iterable[int], timeout: float, settle_grace: float | None = None) -> set[int]:
    """Wait until pids are gone; give up at timeout, or once the survivors have had no
    children for settle_grace (the LocalStack shutdown hang: nothing left to wait for)."""
    start = time.monotonic()
    left = set(pids)
    settled_since: float | None = None
    while left:
        now = time.monotonic()
        if settle_grace is not None and not any(_children(p) for p in left):
            settled_since = settled_since or now
        else:
            settled_since = None
        if now - start > timeout or (settled_since and now - settled_since > settle_grace):
            break
        time.sleep(0.1)
        left = {p for p in left if _alive(p)}
    return left


def terminate(pids: Iterable[int], root: Path, timeout: float, settle_grace: float | None = 3.0) -> None:
    """SIGTERM, wait (see _wait_gone), then SIGKILL: only PIDs that still carry our marker."""
    targets = {p for p in pids if is_ours(p, root)}
    for pid in targets:
        _signal(pid, signal.SIGTERM)
    stubborn = _wait_gone(targets, timeout, settle_grace)
    for pid in stubborn:
        if is_ours(pid, root):
            log.info("pid %d still running after SIGTERM; SIGKILL", pid)
            _signal(pid, signal.SIGKILL)
    _wait_gone(stubborn, 5.0)


def stop_stale(root: Path, timeout: float = 10.0) -> list[int]:
    """The ``down`` command: stop a stack left behind by a crashed run. Returns PIDs signalled.

    Pid files say what ran; the marker says what is still ours (a pid file can name a PID
    the system has since given to a stranger, and kinesis-mock has no pid file of ours).
    """
    root = root.resolve()
    run_dir = root / "run"
    for pid_file in sorted(run_dir.glob("*.pid")) if run_dir.is_dir() else []:
        try:
            pid = int(pid_file.read_text().strip())
        except (OSError, ValueError):
            pid = 0
        if pid > 0 and _alive(pid) and not is_ours(pid, root, _CMD_MATCH.get(pid_file.stem)):
            log.warning("%s names pid %d, which is not ours any more; leaving it alone", pid_file, pid)
        pid_file.unlink(missing_ok=True)
    # LocalStack first, alone: it stops kinesis-mock itself when it shuts down.
    marked = marked_pids(root)
    terminate({p for p in marked if is_ours(p, root, _CMD_MATCH["localstack"])}, root, timeout)
    rest = marked_pids(root)  # moto, and orphans such as kinesis-mock under a SIGKILLed LocalStack
    terminate(rest, root, timeout, settle_grace=None)
    return sorted(marked | rest)


class ManagedProcess:
    """One server process in its own session, logging to <root>/logs/<name>.log."""

    def __init__(self, name: str, argv: Sequence[str], root: Path, env: Mapping[str, str]) -> None:
        self.name = name
        self.argv = list(argv)
        self.root = root.resolve()
        self.env = {**env, MARKER_ENV: str(self.root)}
        self.log_path = self.root / "logs" / f"{name}.log"
        self.pid_path = self.root / "run" / f"{name}.pid"
        self._popen: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self._popen.pid if self._popen else None

    def start(self) -> None:
        existing = self._pid_from_file()
        if existing and is_ours(existing, self.root, _CMD_MATCH.get(self.name)):
            raise StackError(
                f"{self.name} from {self.root} is already running (pid {existing}); "
                "stop it first (`orders-cdc local down`)"
            )
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.pid_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as out:  # truncate: the log is this run's
            self._popen = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                env=self.env, cwd=self.root, start_new_session=True,
            )
        self.pid_path.write_text(f"{self._popen.pid}\n")
        log.info("started %s (pid %d), log %s", self.name, self._popen.pid, self.log_path)

    def exit_code(self) -> int | None:
        return self._popen.poll() if self._popen else None

    def fail(self, what: str) -> StackError:
        """One-line error: what failed, and where the log is."""
        code = self.exit_code()
        state = f"exited with status {code}" if code is not None else "still running"
        return StackError(f"{self.name}: {what} ({state}); see {self.log_path}")

    def stop(self, timeout: float, settle_grace: float | None = None) -> None:
        """SIGTERM the group; SIGKILL it at timeout (or earlier: see _wait_gone)."""
        if self._popen is None:
            return
        pid = self._popen.pid
        if self._popen.poll() is None:
            started = time.monotonic()
            _signal(pid, signal.SIGTERM)
            if _wait_gone({pid}, timeout, settle_grace):
                waited = time.monotonic() - started
                level = logging.WARNING if waited >= timeout else logging.INFO
                log.log(level, "%s still running %.1fs after SIGTERM; SIGKILL", self.name, waited)
                _signal(pid, signal.SIGKILL)
            self._popen.wait(10)
        else:
            # The leader is gone but its group may still hold children.
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.pid_path.unlink(missing_ok=True)

    def _pid_from_file(self) -> int | None:
        try:
            return int(self.pid_path.read_text().strip())
        except (OSError, ValueError):
            return None


# ---------------------------------------------------------------- helpers


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        # Same option the servers set, so a TIME_WAIT from the last run does not count.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _http_ok(url: str, timeout: float = 2.0) -> bytes | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 (loopback only)
            return resp.read() if resp.status == 200 else None
    except (urllib.error.URLError, OSError, ValueError):
        return None


def _child_env(drop_prefixes: Sequence[str] = ("AWS_", "PYTHON", "VIRTUAL_ENV")) -> dict[str, str]:
    # Real AWS credentials have no business in an emulator, and the project venv's
    # PYTHONPATH would make LocalStack's own venv import the wrong boto3.
    return {k: v for k, v in os.environ.items() if not k.startswith(tuple(drop_prefixes))}


def ensure_shim(root: Path, source: Path = SHIM_SOURCE) -> Path | None:
    """Compile the bind-to-loopback LD_PRELOAD shim into <root>/lib if missing or stale."""
    out = root.resolve() / "lib" / "bind_loopback.so"
    if re.search(r"[\s:]", str(out)):  # LD_PRELOAD splits on spaces and colons
        log.warning("cannot LD_PRELOAD %s (space or colon in path): kinesis-mock will bind 0.0.0.0", out)
        return None
    if not source.is_file():
        log.warning("%s not found: kinesis-mock will bind 0.0.0.0", source)
        return None
    if out.is_file() and out.stat().st_mtime >= source.stat().st_mtime:
        return out
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        log.warning("no C compiler: kinesis-mock's side ports will listen on 0.0.0.0")
        return None
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}")
    proc = subprocess.run(
        [cc, "-shared", "-fPIC", "-O2", "-o", str(tmp), str(source), "-ldl"],
        capture_output=True, text=True, timeout=120,
    )
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        log.warning("compiling %s failed, kinesis-mock will bind 0.0.0.0: %s", source, proc.stderr.strip())
        return None
    os.replace(tmp, out)  # atomic: two stacks may compile at once
    return out


_SS_PID = re.compile(r"pid=(\d+)")


def _is_loopback(host: str) -> bool:
    host = host.strip("[]").split("%", 1)[0]
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:  # "*" = every address
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or bool(mapped and mapped.is_loopback)


def exposed_listeners(pids: Iterable[int]) -> list[str] | None:
    """Listening sockets of these PIDs that are not on loopback (`ss -ltunp`); None without ss."""
    ss = shutil.which("ss")
    if ss is None:
        return None
    wanted = set(pids)
    try:
        lines = subprocess.run([ss, "-H", "-l", "-t", "-u", "-n", "-p"], capture_output=True,
                               text=True, timeout=10, check=True).stdout.splitlines()
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("`ss -ltunp` failed: %s", exc)
        return None
    exposed = []
    for line in lines:
        cols = line.split()
        if len(cols) < 6 or not wanted & {int(p) for p in _SS_PID.findall(line)}:
            continue
        host = cols[4].rsplit(":", 1)[0]
        if not _is_loopback(host):
            exposed.append(line.strip())
    return exposed


# ---------------------------------------------------------------- the two servers


class MotoServer:
    """moto's server on 127.0.0.1, one request at a time (orders_cdc/local/moto_server.py);
    also used by the test suite's fixture."""

    def __init__(self, root: Path, port: int, python: str = sys.executable) -> None:
        self.port = port
        self.endpoint = f"http://{HOST}:{port}"
        self.process = ManagedProcess(
            "moto", [python, "-m", "orders_cdc.local.moto_server", "-H", HOST, "-p", str(port)], root, _child_env(),
        )

    def start(self) -> None:
        if not _port_free(self.port):
            raise StackError(f"moto: port {HOST}:{self.port} is already in use")
        self.process.start()

    def wait_ready(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            if self.process.exit_code() is not None:
                raise self.process.fail("exited during start-up")
            if _http_ok(f"{self.endpoint}/moto-api/") is not None:
                return
            time.sleep(0.1)
        raise self.process.fail(f"not answering {self.endpoint}/moto-api/ in time")

    def stop(self, timeout: float = 10.0) -> None:
        self.process.stop(timeout)


class LocalStackKinesis:
    """LocalStack on the host (its own venv), Kinesis only, gateway on 127.0.0.1 via hypercorn."""

    def __init__(self, cfg: LocalStackConfig) -> None:
        self.cfg = cfg
        self.endpoint = f"http://{HOST}:{cfg.localstack_port}"
        self.shim: Path | None = None
        self.process: ManagedProcess | None = None

    def start(self) -> None:
        cfg = self.cfg
        if not Path(cfg.localstack_python).is_file():
            raise StackError(
                f"localstack: no python at {cfg.localstack_python} (the Makefile builds .venv-localstack)"
            )
        if not _port_free(cfg.localstack_port):
            raise StackError(f"localstack: port {HOST}:{cfg.localstack_port} is already in use")
        root = cfg.root.resolve()
        fs_root = root / "localstack"
        (fs_root / "tmp").mkdir(parents=True, exist_ok=True)
        env = _child_env()
        env.update({
            "SERVICES": "kinesis",
            "PERSISTENCE": "0",
            "KINESIS_PERSISTENCE": "0",  # defaults to on, independently of PERSISTENCE
            "GATEWAY_LISTEN": f"{HOST}:{cfg.localstack_port}",
            # The default twisted gateway ignores the host and binds every interface;
            # hypercorn honours it and serves h2c, which the KCL needs.
            "GATEWAY_SERVER": "hypercorn",
            "LOCALSTACK_HOST": f"{HOST}:{cfg.localstack_port}",
            # These machines look like containers to LocalStack, which then ignores FILESYSTEM_ROOT.
            "OVERRIDE_IN_DOCKER": "0",
            "FILESYSTEM_ROOT": str(fs_root),
            "TMPDIR": str(fs_root / "tmp"),
            "DNS_ADDRESS": "0",  # no DNS server on port 53
            "SKIP_SSL_CERT_DOWNLOAD": "1",
            "DISABLE_EVENTS": "1",  # no analytics calls home
            "KINESIS_MOCK_LOG_LEVEL": cfg.kinesis_mock_log_level,
            "PYTHONUNBUFFERED": "1",
            **cfg.extra_localstack_env,
        })
        self.shim = ensure_shim(root)
        if self.shim is not None:
            env["LD_PRELOAD"] = " ".join(filter(None, [str(self.shim), env.get("LD_PRELOAD")]))
        self.process = ManagedProcess(
            "localstack", [str(cfg.localstack_python), "-m", "localstack.runtime.main"], root, env,
        )
        self.process.start()

    def wait_ready(self, deadline: float) -> None:
        assert self.process is not None
        health = f"{self.endpoint}/_localstack/health"
        while True:
            if self.process.exit_code() is not None:
                raise self.process.fail("exited during start-up")
            body = _http_ok(health)
            if body is not None and json.loads(body).get("services", {}).get("kinesis") in (
                "available", "running",
            ):
                break
            if time.monotonic() > deadline:
                raise self.process.fail(f"{health} did not report kinesis available in time")
            time.sleep(0.1)
        self._warm_kinesis(deadline)

    def _warm_kinesis(self, deadline: float) -> None:
        """LocalStack installs (npm) and starts kinesis-mock at the first Kinesis call: do it now."""
        assert self.process is not None
        started = time.monotonic()
        last_error = ""
        while time.monotonic() < deadline:
            if self.process.exit_code() is not None:
                raise self.process.fail("exited while starting kinesis-mock")
            left = max(1.0, deadline - time.monotonic())
            client = boto3.client(
                "kinesis", endpoint_url=self.endpoint, region_name=REGION,
                aws_access_key_id=ACCESS_KEY_ID, aws_secret_access_key=SECRET_ACCESS_KEY,
                config=Config(retries={"max_attempts": 1}, connect_timeout=2, read_timeout=left),
            )
            try:
                client.list_streams(Limit=1)
                log.info("kinesis-mock answered after %.1fs", time.monotonic() - started)
                return
            except Exception as exc:  # noqa: BLE001 (500s while installing; we retry to the deadline)
                last_error = str(exc).splitlines()[0]
                time.sleep(0.5)
        raise self.process.fail(f"Kinesis (kinesis-mock from npm) not answering: {last_error}")

    def stop(self) -> None:
        if self.process is not None:
            # About one stop in ten, LocalStack 4.9.2 hangs after "Shutting down kinesis backend"
            # (a second SIGTERM or SIGINT does not help). Once kinesis-mock, its child, is gone
            # there is nothing left to save (PERSISTENCE=0): SIGKILL after a short grace.
            self.process.stop(self.cfg.stop_timeout, settle_grace=3.0)


class LocalStack:
    """The whole local stack. ``with LocalStack(cfg) as stack: stack.endpoints["kinesis"]``."""

    def __init__(self, cfg: LocalStackConfig = LocalStackConfig()) -> None:
        self.cfg = cfg
        self.root = cfg.root.resolve()
        self.moto = MotoServer(self.root, cfg.moto_port)
        self.localstack = LocalStackKinesis(cfg)
        self.timings: dict[str, float] = {}

    @property
    def endpoints(self) -> dict[str, str]:
        return {**{name: self.moto.endpoint for name in MOTO_SERVICES},
                "kinesis": self.localstack.endpoint}

    def aws_env(self) -> dict[str, str]:
        """Standard AWS variables pointing boto3 (and our CLI) at this stack."""
        return {
            "AWS_ENDPOINT_URL": self.moto.endpoint,
            "AWS_ENDPOINT_URL_KINESIS": self.localstack.endpoint,
            "AWS_REGION": REGION,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY_ID,
            "AWS_SECRET_ACCESS_KEY": SECRET_ACCESS_KEY,
        }

    def pids(self) -> set[int]:
        """Every live process of this stack, including kinesis-mock and npm."""
        return marked_pids(self.root)

    def start(self) -> LocalStack:
        running = self.pids()
        if running:  # checked before starting anything, so the failure path stops nothing of theirs
            raise StackError(f"a local stack from {self.root} is already running (pids "
                             f"{sorted(running)}); stop it with `orders-cdc local down`")
        t0 = time.monotonic()
        deadline = t0 + self.cfg.start_timeout
        try:
            # Start both, then wait: moto is ready long before LocalStack.
            self.moto.start()
            self.localstack.start()
            self.moto.wait_ready(deadline)
            self.timings["moto_ready"] = time.monotonic() - t0
            self.localstack.wait_ready(deadline)
            self.timings["kinesis_ready"] = time.monotonic() - t0
            self._check_loopback()
        except BaseException:
            self.stop()
            raise
        log.info("local stack up in %.1fs: %s", time.monotonic() - t0, self.endpoints)
        return self

    def _check_loopback(self) -> None:
        exposed = exposed_listeners(self.pids())
        if exposed is None:
            log.warning("`ss` not found: cannot check that the stack listens on loopback only")
        elif exposed and self.localstack.shim is None:
            log.warning("listening beyond loopback (no bind shim): %s", "; ".join(exposed))
        elif exposed:
            raise StackError(f"listening beyond loopback despite the bind shim: {'; '.join(exposed)}")

    def stop(self) -> None:
        started = [p for p in (self.moto.process, self.localstack.process) if p and p.pid]
        if not started:
            return  # e.g. start() refused because this root's stack already runs: not ours to stop
        # LocalStack first: it stops kinesis-mock itself when it shuts down cleanly.
        self.localstack.stop()
        self.moto.stop(self.cfg.stop_timeout)
        leftovers = self.pids()  # e.g. kinesis-mock orphaned by a SIGKILLed LocalStack
        if leftovers:
            log.info("stopping leftover stack processes %s", sorted(leftovers))
            terminate(leftovers, self.root, 3.0)

    def __enter__(self) -> LocalStack:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
