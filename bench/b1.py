"""B1: processor throughput through the protocol pipe, ours against kclpy's usual loop.

Each child is a subprocess fed exactly what the daemon writes: an ``initialize`` line, then
``processRecords`` lines (batches of 1,000 or 10,000 records), each answered with a status;
checkpoint requests are answered as the daemon answers them. One warm-up batch runs before
the clock starts. Measured per run: wall time from the first timed line written to the last
status read, the child's CPU time over that window (/proc/<pid>/stat), and its peak RSS
(VmHWM in /proc/<pid>/status, read before the child exits). Ours and the baseline alternate, several runs each; medians.
"""

from __future__ import annotations

import base64
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from bench.common import MIB, ROOT, WORK, child_env, median
from tests.factories import partition_key, sequence_number

OURS = [sys.executable, "-m", "bench.child"]
BASELINE = [sys.executable, "-m", "bench.baseline_child"]
SHARD = "shardId-000000000000"
_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class Batches:
    """Pre-built processRecords lines (so building them is never timed)."""

    size: int
    lines: list[bytes]
    records: int
    payload_bytes: int  # the Kinesis records' data, decoded: what counts against 2 MB/s
    warmup: bytes = b""
    line_payloads: list[int] = field(default_factory=list)  # payload_bytes, line by line


def build_batches(docs: list[dict], size: int, count: int, warmup_records: int = 200) -> Batches:
    raws = [orjson.dumps(doc) for doc in docs]
    datas = [base64.b64encode(raw).decode("ascii") for raw in raws]
    keys = [partition_key(doc) for doc in docs]
    arrival = int(time.time() * 1000)
    seq = 10

    def line(indices: list[int]) -> bytes:
        nonlocal seq
        records = []
        for i in indices:
            seq += 1
            records.append({"action": "record", "data": datas[i], "partitionKey": keys[i],
                            "sequenceNumber": sequence_number(seq), "subSequenceNumber": 0,
                            "approximateArrivalTimestamp": arrival})
        return orjson.dumps({"action": "processRecords", "records": records, "millisBehindLatest": 0}) + b"\n"

    n = len(docs)
    warm = line([(len(docs) - 1 - i) % n for i in range(warmup_records)])
    lines, payloads, at = [], [], 0
    for _ in range(count):
        indices = [(at + j) % n for j in range(size)]
        at += size
        payloads.append(sum(len(raws[i]) for i in indices))
        lines.append(line(indices))
    return Batches(size, lines, size * count, sum(payloads), warm, payloads)


@dataclass
class Run:
    who: str  # ours | baseline
    mode: str  # full | route-only
    batch: int
    records: int
    payload_bytes: int
    wall_s: float
    cpu_s: float
    peak_rss_mb: float
    checkpoints: int
    calls: dict[str, Any] = field(default_factory=dict)
    hwm_mb: list[float] = field(default_factory=list)  # VmHWM after each timed batch
    rss_mb: list[float] = field(default_factory=list)  # VmRSS after each timed batch

    @property
    def records_per_s(self) -> float:
        return self.records / self.wall_s

    @property
    def payload_mb_per_s(self) -> float:
        return self.payload_bytes / MIB / self.wall_s

    @property
    def cpu_s_per_mb(self) -> float:
        return self.cpu_s / (self.payload_bytes / MIB)


class ChildFailed(RuntimeError):
    pass


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_bytes().rpartition(b")")[2].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS  # utime + stime


class _Driver:
    """The daemon's side of the pipe."""

    def __init__(self, argv: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log,
                                     cwd=ROOT, env=env if env is not None else child_env())
        self.checkpoints = 0

    def send(self, line: bytes) -> None:
        self.proc.stdin.write(line)
        self.proc.stdin.flush()

    def serve(self, action: str) -> None:
        """Read until the status for ``action``, answering checkpoints as the daemon does."""
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise ChildFailed(f"child exited during {action}; see {self.log_path}")
            if not line.strip():
                continue  # kclpy surrounds each message with newlines
            message = orjson.loads(line)
            if message.get("action") == "checkpoint":
                self.checkpoints += 1
                self.send(orjson.dumps({"action": "checkpoint", "sequenceNumber": message.get("sequenceNumber"),
                                        "subSequenceNumber": message.get("subSequenceNumber"), "error": None}) + b"\n")
            elif message.get("action") == "status":
                if message.get("responseFor") != action:
                    raise ChildFailed(f"status for {message.get('responseFor')!r}, expected {action!r}")
                return
            else:
                raise ChildFailed(f"unexpected message {message!r}")

    def initialize(self, shard: str = "shardId-000000000000") -> None:
        self.request({"action": "initialize", "shardId": shard, "sequenceNumber": "TRIM_HORIZON", "subSequenceNumber": 0})

    def batch(self, line: bytes) -> None:
        """One processRecords line, served to its status."""
        self.send(line)
        self.serve("processRecords")

    def request(self, message: dict) -> None:
        self.send(orjson.dumps(message) + b"\n")
        self.serve(message["action"])

    def memory_mb(self, field: str = "VmHWM") -> float:
        """VmHWM: the peak resident set of the child's own program; VmRSS: the current one.
        (wait4's ru_maxrss would also count the pages the child shared with this process
        before exec.)"""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def finish(self, who: str | None = None) -> None:
        """Close stdin (as the daemon does at the end) and wait for the child to exit; with
        `who`, raise ChildFailed unless it exited 0."""
        try:
            self.proc.stdin.close()
        except BrokenPipeError:
            pass
        code = self.proc.wait(60)
        self.proc.stdout.close()
        self._log.close()
        if who is not None and code != 0:
            raise ChildFailed(f"{who} child exited {code}; see {self.log_path}")

    def kill(self) -> None:
        self.proc.kill()
        self.finish()


def run_child(who: str, mode: str, batches: Batches, tag: str, profile: Path | None = None) -> Run:
    calls_path = WORK / "b1" / f"calls-{tag}.json"
    argv = (OURS if who == "ours" else BASELINE) + ["--mode", mode, "--calls-out", str(calls_path)]
    if profile is not None:
        argv += ["--profile", str(profile)]
    driver = _Driver(argv, WORK / "b1" / f"child-{tag}.log")
    try:
        driver.request({"action": "initialize", "shardId": SHARD, "sequenceNumber": "TRIM_HORIZON", "subSequenceNumber": 0})
        driver.send(batches.warmup)
        driver.serve("processRecords")
        # Only what the timed batches cost: the warm-up's calls are subtracted below.
        driver.checkpoints = 0
        hwm, rss_now = [], []
        cpu0, t0 = _cpu_seconds(driver.proc.pid), time.perf_counter()
        paused = 0.0
        for line in batches.lines:
            driver.send(line)
            driver.serve("processRecords")
            p0 = time.perf_counter()
            hwm.append(round(driver.memory_mb("VmHWM"), 1))
            rss_now.append(round(driver.memory_mb("VmRSS"), 1))
            paused += time.perf_counter() - p0
        wall = time.perf_counter() - t0 - paused
        cpu = _cpu_seconds(driver.proc.pid) - cpu0
        driver.request({"action": "shutdownRequested"})
        rss = driver.memory_mb("VmHWM")
    except BaseException:
        driver.kill()
        raise
    driver.finish(who)
    calls = orjson.loads(calls_path.read_bytes()) if calls_path.exists() else {}
    return Run(who, mode, batches.size, batches.records, batches.payload_bytes, wall, cpu, rss, driver.checkpoints, calls,
               hwm, rss_now)


def summarise(runs: list[Run]) -> dict[str, Any]:
    wall = median([r.wall_s for r in runs])
    cpu = median([r.cpu_s for r in runs])
    r0 = runs[0]
    return {
        "runs": len(runs),
        "records_per_s": round(r0.records / wall),
        "payload_mb_per_s": round(r0.payload_bytes / MIB / wall, 2),
        "cpu_s_per_mb": round(cpu / (r0.payload_bytes / MIB), 4),
        "payload_mb_per_cpu_s": round((r0.payload_bytes / MIB) / cpu, 2),
        "peak_rss_mb": round(max(r.peak_rss_mb for r in runs), 1),
        "hwm_after_each_batch_mb": max(runs, key=lambda r: r.peak_rss_mb).hwm_mb,
        "rss_after_each_batch_mb": max(runs, key=lambda r: r.peak_rss_mb).rss_mb,
        "wall_s": [round(r.wall_s, 3) for r in runs],
        "cpu_s": [round(r.cpu_s, 3) for r in runs],
    }


def calls_per_record(run: Run) -> dict[str, dict[str, Any]]:
    """Per route: records handed to its handler, the handler's own AWS calls, the pipeline's
    idempotency calls made for it, and both per record."""
    out: dict[str, dict[str, Any]] = {}
    records = run.calls.get("records", {})
    suffix = " [idempotency]"
    for route, service, operation, calls, entries in run.calls.get("calls", []):
        base = route[: -len(suffix)] if route.endswith(suffix) else route
        entry = out.setdefault(base, {"records": records.get(base, 0), "calls": 0, "idempotency_calls": 0, "operations": {}})
        entry["idempotency_calls" if base != route else "calls"] += calls
        entry["operations"][f"{service}.{operation}" + (suffix if base != route else "")] = {
            "calls": round(calls, 2), "entries": entries}
    for route, n in records.items():
        out.setdefault(route, {"records": n, "calls": 0, "idempotency_calls": 0, "operations": {}})
    for entry in out.values():
        n = entry["records"]
        entry["idempotency_calls"] = round(entry["idempotency_calls"], 2)
        entry["calls_per_record"] = round(entry["calls"] / n, 4) if n else None
        entry["total_calls_per_record"] = round((entry["calls"] + entry["idempotency_calls"]) / n, 4) if n else None
    return out


def handler_seconds(run: Run) -> dict[str, float]:
    return {route: round(s, 4) for route, s in sorted(run.calls.get("seconds", {}).items(), key=lambda kv: -kv[1])}


def profile_summary(path: Path, top: int = 12) -> dict[str, Any]:
    """Where our child's time goes, from cProfile (which inflates call-heavy code; read shares)."""
    import pstats

    stats = pstats.Stats(str(path))
    total = stats.total_tt  # type: ignore[attr-defined]
    raw = stats.stats  # type: ignore[attr-defined]

    def short(key) -> str:
        file, line, name = key
        file = file.replace(str(ROOT) + "/", "")
        if "site-packages/" in file:
            file = file.split("site-packages/", 1)[1]
        return f"{file}:{line}({name})" if line else name

    inclusive: dict[str, float] = {}
    wanted = {
        "protocol: read + parse the line (orjson)": ("orders_cdc/kcl/protocol.py", "read"),
        "decode (base64 + orjson + envelope)": ("orders_cdc/change.py", "decode_kcl_record"),
        "route (predicates, lazy status reads)": ("orders_cdc/routing.py", "match"),
        "handlers (all routes)": ("bench/fakes.py", "attributed"),
        "EMF metrics line": ("orders_cdc/metrics.py", "emf"),
        "checkpoint round trips": ("orders_cdc/kcl/protocol.py", "checkpoint"),
    }
    for label, (file, name) in wanted.items():
        inclusive[label] = round(sum(v[3] for k, v in raw.items() if k[0].endswith(file) and k[2] == name) / total * 100, 1)
    by_self = sorted(raw.items(), key=lambda kv: -kv[1][2])[:top]
    by_module: dict[str, float] = {}
    for key, value in raw.items():
        file = key[0].replace(str(ROOT) + "/", "")
        module = file.split("site-packages/", 1)[1].split("/", 1)[0] if "site-packages/" in file else file
        if key[0].startswith("~"):
            module = "builtins (C: orjson, Decimal, base64, dict/list ops)"
        by_module[module] = by_module.get(module, 0.0) + value[2]
    modules = sorted(by_module.items(), key=lambda kv: -kv[1])[:top]
    return {
        "profiled_seconds": round(total, 3),
        "inclusive_percent": inclusive,
        "self_percent_by_module": {m: round(s / total * 100, 1) for m, s in modules},
        "top_self": [{"function": short(k), "self_percent": round(v[2] / total * 100, 1), "calls": v[1]} for k, v in by_self],
    }


def run(docs: list[dict], reps: int = 3, plan: list[tuple[str, int, int, int]] | None = None,
        progress=print) -> dict[str, Any]:
    """plan: (mode, batch size, batches per run, runs of each side; 0 = ``reps``)."""
    plan = plan or [("full", 1000, 5, 0), ("full", 10000, 2, 2), ("route-only", 10000, 1, 0)]
    results: dict[str, Any] = {"configs": []}
    for mode, size, count, config_reps in plan:
        batches = build_batches(docs, size, count)
        runs: dict[str, list[Run]] = {"ours": [], "baseline": []}
        reps_here = config_reps or reps
        for rep in range(reps_here):
            for who in ("ours", "baseline") if rep % 2 == 0 else ("baseline", "ours"):
                r = run_child(who, mode, batches, f"{who}-{mode}-{size}-{rep}")
                runs[who].append(r)
                progress(f"  B1 {mode:10} batch {size:>6}  {who:8} run {rep + 1}/{reps_here}: "
                         f"{r.records_per_s:>9,.0f} rec/s  {r.payload_mb_per_s:6.2f} MiB/s  "
                         f"cpu {r.cpu_s:.2f}s  rss {r.peak_rss_mb:.0f} MiB")
        ours, base = summarise(runs["ours"]), summarise(runs["baseline"])
        config = {
            "mode": mode,
            "batch_size": size,
            "batches_per_run": count,
            "records_per_run": batches.records,
            "payload_mib_per_run": round(batches.payload_bytes / MIB, 2),
            "ours": ours,
            "baseline": base,
            "ratio_vs_baseline": round(ours["records_per_s"] / base["records_per_s"], 2),
            "cpu_ratio_vs_baseline": round(base["cpu_s_per_mb"] / ours["cpu_s_per_mb"], 2),
        }
        if mode == "full":
            config["ours_handler_seconds"] = handler_seconds(runs["ours"][0])
            config["ours_calls_per_record"] = calls_per_record(runs["ours"][0])
        results["configs"].append(config)
    return results


_SPY_RULES: list[tuple[str, Callable[[str, str], bool]]] = [
    # (category, test on (function, file)); a sample goes to the first rule any of its frames meets.
    ("handlers", lambda fn, file: file.startswith("processors/")),
    ("idempotency (keys, guard, store)", lambda fn, file: file.startswith("orders_cdc/idempotency/")),
    ("decode (base64, orjson, envelope)", lambda fn, file: fn == "decode_kcl_record"),
    ("route (predicates, status reads)", lambda fn, file: file == "orders_cdc/routing.py"),
    ("protocol: read + parse the line", lambda fn, file: fn == "_Io.read"),
    ("protocol: replies + checkpoints", lambda fn, file: fn in ("_Io.write", "_WireCheckpointer.checkpoint")),
    ("EMF metrics line", lambda fn, file: file == "orders_cdc/metrics.py"),
    ("logging", lambda fn, file: file.startswith("logging/") or "pythonjsonlogger" in file),
    ("pipeline bookkeeping (plan, tasks, results)", lambda fn, file: file == "orders_cdc/pipeline.py"),
    ("checkpoint policy + processor", lambda fn, file: file in ("orders_cdc/checkpointing.py", "orders_cdc/consumer.py")),
    ("call pool threads", lambda fn, file: file == "orders_cdc/concurrency.py"),
]
_HANDLER_PARTS: list[tuple[str, Callable[[str, str], bool]]] = [
    ("fake AWS clients (bench only)", lambda fn, file: file == "bench/fakes.py" and "attributed" not in fn),
    ("boto3 TypeSerializer (DynamoDB request values)", lambda fn, file: file.startswith("boto3/dynamodb/")),
    ("JSON encoding (dumps_exact)", lambda fn, file: fn in ("dumps_exact", "_default", "_wrap_big_ints")),
    ("image unmarshalling (attrvalue)", lambda fn, file: file == "orders_cdc/attrvalue.py"),
    ("exact decimal arithmetic (_order)", lambda fn, file: fn in ("exact_add", "exact_mul")),
]
_POOL = ("concurrent/", "threading", "queue")


def _frame(text: str) -> tuple[str, str]:
    """'func (path/file.py:12)' -> (func, file relative to the project or site-packages)."""
    fn, _, rest = text.rpartition(" (")
    file = rest.rsplit(":", 1)[0]
    for marker in (str(ROOT) + "/", "site-packages/", "python3.11/"):
        if marker in file:
            file = file.split(marker, 1)[1]
    return fn, file


def collapsed(path: Path) -> Iterator[tuple[str, int]]:
    """(stack, samples) for each line of py-spy's raw (collapsed) output."""
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            yield stack, int(count)


def spy_summary(path: Path, top: int = 15) -> dict[str, Any]:
    """Where our child's CPU goes, from py-spy's samples of every thread holding the GIL."""
    categories: dict[str, int] = {}
    handler_modules: dict[str, int] = {}
    handler_parts: dict[str, int] = {}
    leaves: dict[str, int] = {}
    total = 0
    for stack, n in collapsed(path):
        total += n
        frames = [_frame(f) for f in stack.split(";")]
        category = next((name for name, rule in _SPY_RULES if any(rule(fn, file) for fn, file in frames)), "other")
        categories[category] = categories.get(category, 0) + n
        if category == "handlers":
            first = next(i for i, (fn, file) in enumerate(frames) if file.startswith("processors/"))
            module = frames[first][1]
            if module.removeprefix("processors/").startswith("_"):
                module = "processors/(shared helpers)"
            handler_modules[module] = handler_modules.get(module, 0) + n
            inner = frames[first:]
            if inner[-1][1].startswith(_POOL):
                part = "thread pool / locks (views' writers)"
            else:
                part = next((name for name, rule in _HANDLER_PARTS if any(rule(fn, file) for fn, file in inner)),
                            "handler code (incl. Decimal, dict work)")
            handler_parts[part] = handler_parts.get(part, 0) + n
        fn, file = frames[-1]
        leaf = f"{fn} ({file})"
        leaves[leaf] = leaves.get(leaf, 0) + n

    def share(d: dict[str, int]) -> dict[str, float]:
        return {k: round(v / total * 100, 1) for k, v in sorted(d.items(), key=lambda kv: -kv[1])}

    return {
        "tool": "py-spy (all threads, samples holding the GIL)",
        "samples": total,
        "percent_by_stage": share(categories),
        "percent_by_handler_module": share(handler_modules),
        "percent_inside_handlers_by_kind": share(handler_parts),  # also % of all samples
        "top_leaf_functions_percent": dict(list(share(leaves).items())[:top]),
    }


def _py_spy() -> str | None:
    here = Path(sys.executable).parent / "py-spy"
    return str(here) if here.exists() else shutil.which("py-spy")


def profile(docs: list[dict], size: int = 10000, count: int = 1) -> dict[str, Any]:
    """Our child on the full routes, profiled: py-spy attached from outside (every thread, the
    child runs unmodified) if it is installed, else cProfile inside (main thread only)."""
    batches = build_batches(docs, size, count)
    spy = _py_spy()
    if spy is None:
        path = WORK / "b1" / "ours-full.prof"
        run_child("ours", "full", batches, "ours-profile", profile=path)
        summary = profile_summary(path)
        summary["file"] = str(path.relative_to(ROOT))
        summary["note"] = "cProfile sees the main thread only (handlers run on worker threads); pip install py-spy"
        return summary
    out = WORK / "b1" / "ours-full.pyspy.txt"
    driver = _Driver(OURS + ["--mode", "full"], WORK / "b1" / "child-ours-profile.log")
    try:
        driver.request({"action": "initialize", "shardId": SHARD, "sequenceNumber": "TRIM_HORIZON", "subSequenceNumber": 0})
        driver.send(batches.warmup)
        driver.serve("processRecords")
        recorder = subprocess.Popen([spy, "record", "--pid", str(driver.proc.pid), "--rate", "200", "--format", "raw",
                                     "--gil", "--nonblocking", "--output", str(out)],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(1.0)  # attached
        for line in batches.lines:
            driver.send(line)
            driver.serve("processRecords")
        recorder.send_signal(signal.SIGINT)
        recorder.wait(60)
        driver.request({"action": "shutdownRequested"})
    except BaseException:
        driver.kill()
        raise
    driver.finish()
    if not out.exists():
        return {"error": f"py-spy wrote nothing: {recorder.stderr.read().decode(errors='replace')[-300:]}"}
    summary = spy_summary(out)
    summary["file"] = str(out.relative_to(ROOT))
    summary["records"] = batches.records
    return summary


if __name__ == "__main__":
    from bench.orders import kds_docs

    print(orjson.dumps(run(kds_docs(10000), reps=1), option=orjson.OPT_INDENT_2).decode())
