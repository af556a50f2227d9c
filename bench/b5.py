"""B5: the child's throughput through the network, at real AWS latencies.

The production entry, unchanged, as the daemon runs it (``python record_processor.py``,
cwd = the repository root), driven through the multilang pipe exactly as B1 drives its
children (``bench.b1._Driver``, ``bench.b1.build_batches``), with real boto3 clients: every
AWS call goes through real botocore (serialise, sign, parse) and HTTP/1.1 over loopback to
``bench.fakeaws``, which answers after the delay of the profile:

- ``zero``: no delay (what the child's own CPU allows, the network stack included);
- ``aws``: medians (DynamoDB 6 ms, TransactWriteItems 12 ms, SQS 15 ms, Firehose 30 ms, SES 60 ms);
- ``aws-p99``: three times ``aws``.

Beside it, against the same endpoint process and delays: kclpy's usual loop
(``bench.baseline_child --clients real``), the same handlers run one after another.

One warm-up batch, then batches of 1,000 changes (the baseline: 200) until a fixed count or
about ``max_seconds`` of wall time, at least one. Measured per side: changes/s, MiB/s of change
JSON, AWS calls per change by operation (from the endpoint's counters, reset after the
warm-up), the most calls in flight at once, the child's CPU (/proc/PID/stat) and peak RSS
(VmHWM), and the endpoint's own CPU. The shard's limits beside them: 1 MiB/s (writes) and
2 MiB/s (reads) divided by the mean change size.

    python -m bench.b5 [--quick] [--profiles zero,aws,aws-p99]   (or python -m bench --only b5)
    python -m bench.b5 --spy [--profiles aws]                      (py-spy of our child, one batch)
    python -m bench.b5 --sizing [--profiles aws]                   (our child's peak RSS at the deployed maxRecords)
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import orjson

from bench.b1 import Batches, ChildFailed, _cpu_seconds, _Driver, _frame, _py_spy, build_batches, collapsed
from bench.common import MIB, ROOT, WORK, child_env

PROFILES = ("zero", "aws", "aws-p99")
OURS = [sys.executable, "record_processor.py"]
BASELINE = [sys.executable, "-m", "bench.baseline_child", "--clients", "real"]
EMAIL = "ses.SendEmail"
TRANSPORT = "real botocore clients, HTTP/1.1 over loopback (127.0.0.1) to bench.fakeaws"
WRITE_LIMIT_BYTES = 1 * MIB  # per shard per second (Kinesis: 1 MiB/s in, 2 MiB/s out)
READ_LIMIT_BYTES = 2 * MIB


class FakeAws:
    """bench.fakeaws as a subprocess, for one delay profile."""

    def __init__(self, profile: str, tag: str) -> None:
        out = WORK / "b5"
        out.mkdir(parents=True, exist_ok=True)
        self.stats_path = out / f"fakeaws-{tag}.json"
        self._log = open(out / f"fakeaws-{tag}.log", "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "bench.fakeaws", "--port", "0", "--profile", profile,
                                      "--stats-out", str(self.stats_path)],
                                     cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self._log)
        line = self.proc.stdout.readline()
        if not line.strip().isdigit():
            self.proc.kill()
            raise RuntimeError(f"fakeaws did not start; see {self._log.name}")
        self.port = int(line)
        self.url = f"http://127.0.0.1:{self.port}"

    def _get(self, path: str) -> dict[str, Any]:
        with urllib.request.urlopen(self.url + path, timeout=10) as reply:
            return json.loads(reply.read())

    def reset(self) -> None:
        self._get("/__reset")

    def stats(self) -> dict[str, Any]:
        return self._get("/__stats")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc.stdout.close()
        self._log.close()

    def env(self) -> dict[str, str]:
        return child_env(AWS_ENDPOINT_URL=self.url, AWS_ACCESS_KEY_ID="bench-dummy", AWS_SECRET_ACCESS_KEY="bench-dummy",
                         ORDERS_CDC_LOG_LEVEL="WARNING")


def _loaded_from_here(pid: int) -> bool | None:
    """True if the child mapped this checkout's orders_cdc C extension (so it imports this
    checkout's orders_cdc, not another's through the editable install); None if no C
    extension is mapped (pure Python: cannot tell from the maps)."""
    paths = {line.split()[-1] for line in Path(f"/proc/{pid}/maps").read_text().splitlines() if "_avfast" in line}
    if not paths:
        return None
    return all(Path(p).is_relative_to(ROOT / "orders_cdc") for p in paths)


def run_side(who: str, fake: FakeAws, batches: Batches, max_seconds: float, tag: str) -> dict[str, Any]:
    argv = OURS if who == "ours" else BASELINE
    driver = _Driver(argv, WORK / "b5" / f"child-{tag}.log", env=fake.env())
    try:
        driver.initialize()
        driver.batch(batches.warmup)
        fake.reset()  # only the timed batches' calls
        pid = driver.proc.pid
        cpu0, t0 = _cpu_seconds(pid), time.perf_counter()
        done = payload = 0
        for i, line in enumerate(batches.lines):
            driver.batch(line)
            done += batches.size
            payload += batches.line_payloads[i]
            if time.perf_counter() - t0 >= max_seconds:
                break
        wall = time.perf_counter() - t0
        cpu = _cpu_seconds(pid) - cpu0
        stats = fake.stats()
        hwm = driver.memory_mb("VmHWM")
        here = _loaded_from_here(pid)
        driver.request({"action": "shutdownRequested"})
    except BaseException:
        driver.kill()
        raise
    driver.finish(who)
    calls = stats["calls"]
    total = sum(calls.values())
    return {
        "batch_size": batches.size,
        "batches": done // batches.size,
        "changes": done,
        "wall_s": round(wall, 3),
        "changes_per_s": round(done / wall, 1),
        "mib_per_s": round(payload / MIB / wall, 3),
        "calls_per_change": {op: round(n / done, 4) for op, n in sorted(calls.items())},
        "calls_per_change_total": round(total / done, 4),
        "non_email_calls_per_change": round((total - calls.get(EMAIL, 0)) / done, 4),
        "max_in_flight": stats["max_in_flight"],
        "max_in_flight_by_service": stats["max_in_flight_by_service"],
        "connections_opened": stats["connections_opened"],
        "unknown_operations": stats["unknown_operations"],
        "child_cpu_s": round(cpu, 3),
        "child_cpu_s_per_1000_changes": round(cpu / done * 1000, 3),
        "child_cpu_share_of_wall": round(cpu / wall, 3),
        "child_peak_rss_mb": round(hwm, 1),
        "fakeaws_cpu_s": stats["cpu_s"],
        "fakeaws_cpu_s_per_1000_changes": round(stats["cpu_s"] / done * 1000, 3),
        "child_imports_this_checkout": here,
        "checkpoints": driver.checkpoints,
    }


def plan(quick: bool) -> dict[str, Any]:
    if quick:
        return {"ours": (250, 2, 50), "baseline": (50, 2, 20), "max_seconds": 3.0}  # a smoke test
    # (batch size, batches at most, warm-up records); a side stops after max_seconds of timed batches.
    return {"ours": (1000, 10, 100), "baseline": (200, 10, 50), "max_seconds": 20.0}


def _docs(p: dict[str, Any]) -> tuple[list[dict], Batches, Batches]:
    from bench.orders import kds_docs

    size, count, warm = p["ours"]
    bsize, bcount, bwarm = p["baseline"]
    # One interleaved history: the warm-up batch is its first changes, in order, and the
    # timed batches continue it, so both sides time the same steady mix and no timed change
    # repeats a warm-up one. (build_batches warms up on the last documents, reversed.)
    docs = kds_docs(max(size * count, bsize * bcount) + max(warm, bwarm))
    return docs, build_batches(_warm_first(docs, warm), size, count, warm), \
        build_batches(_warm_first(docs, bwarm), bsize, bcount, bwarm)


def _warm_first(docs: list[dict], warm: int) -> list[dict]:
    """docs reordered so that build_batches' warm-up is docs[:warm] in order and its timed
    batches start at docs[warm]."""
    return docs[warm:] + docs[:warm][::-1]


def run(profiles: tuple[str, ...] = PROFILES, quick: bool = False, progress=print) -> dict[str, Any]:
    p = plan(quick)
    docs, ours_batches, base_batches = _docs(p)
    sizes = [len(orjson.dumps(d)) for d in docs]
    mean = sum(sizes) / len(sizes)
    write_limit, read_limit = WRITE_LIMIT_BYTES / mean, READ_LIMIT_BYTES / mean
    result: dict[str, Any] = {
        "transport": TRANSPORT,
        "child": "record_processor.py (the production entry, unchanged), multilang pipe as in B1",
        "baseline": "bench.baseline_child --clients real: amazon-kclpy's loop, the same handlers one after another",
        "c_fast_path": _c_fast_path(),
        "change_json_bytes_mean": round(mean),
        "shard_write_limit_changes_per_s": round(write_limit),
        "shard_read_limit_changes_per_s": round(read_limit),
        "units": "MiB of change JSON (the Kinesis records' data); shard limits: 1 MiB/s write, 2 MiB/s read",
        "plan": {"ours_batch": p["ours"][0], "ours_max_batches": p["ours"][1], "ours_warmup_records": p["ours"][2],
                 "baseline_batch": p["baseline"][0], "baseline_max_batches": p["baseline"][1],
                 "baseline_warmup_records": p["baseline"][2], "max_seconds_per_side": p["max_seconds"],
                 "note": "the baseline runs smaller batches so that a sequential child at 60 ms per email "
                         "finishes a batch within the time bound"},
        "profiles": {},
    }
    for profile in profiles:
        fake = FakeAws(profile, profile)
        try:
            ours = run_side("ours", fake, ours_batches, p["max_seconds"], f"ours-{profile}")
            progress(f"  B5 {profile:8} ours     {ours['changes_per_s']:>8,.1f} changes/s  {ours['mib_per_s']:.3f} MiB/s  "
                     f"{ours['calls_per_change_total']:.3f} calls/change  in flight ≤ {ours['max_in_flight']}  "
                     f"cpu {ours['child_cpu_s_per_1000_changes']:.2f} s/1000")
            base = run_side("baseline", fake, base_batches, p["max_seconds"], f"baseline-{profile}")
            progress(f"  B5 {profile:8} baseline {base['changes_per_s']:>8,.1f} changes/s  {base['mib_per_s']:.3f} MiB/s  "
                     f"{base['calls_per_change_total']:.3f} calls/change  in flight ≤ {base['max_in_flight']}")
        finally:
            fake.stop()
        entry = {"ours": ours, "baseline": base, "ratio_vs_baseline": round(ours["changes_per_s"] / base["changes_per_s"], 2),
                 "ours_vs_write_limit": round(ours["changes_per_s"] / write_limit, 3),
                 "ours_vs_read_limit": round(ours["changes_per_s"] / read_limit, 3)}
        result["profiles"][profile] = entry
    result["targets"] = targets(result)
    return result


def targets(result: dict[str, Any]) -> dict[str, Any]:
    prof = result["profiles"]
    out: dict[str, Any] = {}
    if "aws" in prof:
        rate = prof["aws"]["ours"]["changes_per_s"]
        out["aws_changes_per_s_ge_590"] = {"value": rate, "target": 590, "met": rate >= 590}
        out["aws_changes_per_s_stretch_ge_1180"] = {"value": rate, "target": 1180, "met": rate >= 1180}
        ratio = prof["aws"]["ratio_vs_baseline"]
        out["aws_ge_10x_baseline"] = {"value": ratio, "target": 10, "met": ratio >= 10}
    if "zero" in prof:
        rate, limit = prof["zero"]["ours"]["changes_per_s"], 2 * result["shard_read_limit_changes_per_s"]
        out["zero_ge_2x_read_limit"] = {"value": rate, "target": limit, "met": rate >= limit}
    worst = max(e["ours"]["non_email_calls_per_change"] for e in prof.values()) if prof else None
    if worst is not None:
        out["non_email_calls_per_change_le_0_1"] = {"value": worst, "target": 0.1, "met": worst <= 0.1}
    return out


def _c_fast_path() -> bool | None:
    env = dict(child_env(), ORDERS_CDC_LOG_LEVEL="WARNING")
    code = "import orders_cdc.attrvalue as a; print(int(bool(a.ACCELERATED)))"
    try:
        out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, timeout=30, check=True)
        return out.stdout.strip() == b"1"
    except (subprocess.SubprocessError, OSError):
        return None


# --- sizing: the child's memory at the deployed batch size ---------------------------------


def sizing(profile: str = "aws", batches: int = 3) -> dict[str, Any]:
    """Our child alone, fed full batches of the deployed ``maxRecords`` (infra/ecs/app.properties)
    through real botocore at ``profile``'s latencies: its peak RSS (VmHWM) is the per-shard
    figure of the task's memory rule (README, "Deploy")."""
    from orders_cdc.kcl import properties

    deployed = ROOT / "infra" / "ecs" / "app.properties"
    size = int(properties.parse(deployed.read_text(), str(deployed))["maxRecords"].value)
    from bench.orders import kds_docs

    docs = kds_docs(size * batches + size)
    fake = FakeAws(profile, f"sizing-{profile}")
    try:
        # The warm-up batch is a full one too: the high-water mark is what a task must hold.
        side = run_side("ours", fake, build_batches(_warm_first(docs, size), size, batches, size), 1e9,
                        f"sizing-{profile}")
    finally:
        fake.stop()
    return {"profile": profile, "max_records": size, "batches_after_warmup": side["batches"],
            "child_peak_rss_mb": side["child_peak_rss_mb"], "changes_per_s": side["changes_per_s"],
            "max_in_flight": side["max_in_flight"], "transport": TRANSPORT}


# --- py-spy: where our child's wall time and CPU go under a delay profile -------------------


def spy(profile: str = "aws", size: int = 1000) -> dict[str, Any]:
    """Our child under ``profile``: one batch recorded with --idle (wall time, every thread),
    the next with --gil (CPU); --threads keeps the thread of each sample."""
    exe = _py_spy()
    if exe is None:
        return {"error": "py-spy is not installed (pip install py-spy)"}
    from bench.orders import kds_docs

    docs = kds_docs(2 * size + 200)
    batches = build_batches(_warm_first(docs, 200), size, 2, 200)
    fake = FakeAws(profile, f"spy-{profile}")
    out: dict[str, Any] = {"profile": profile, "batch": size, "transport": TRANSPORT}
    try:
        driver = _Driver(OURS, WORK / "b5" / f"child-spy-{profile}.log", env=fake.env())
        try:
            driver.initialize()
            driver.batch(batches.warmup)
            # wall: every thread, waiting or not (--idle); cpu: only samples holding the GIL
            # (--gil), i.e. Python running (py-spy's own idle test counts a thread blocked in a
            # socket read as active, so it would overstate the CPU).
            for kind, line, flags in (("wall", batches.lines[0], ["--idle"]), ("cpu", batches.lines[1], ["--gil"])):
                raw = WORK / "b5" / f"spy-{profile}-{kind}.txt"
                recorder = subprocess.Popen([exe, "record", "--pid", str(driver.proc.pid), "--rate", "250", "--format", "raw",
                                             "--threads", "--nonblocking", "--output", str(raw), *flags],
                                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                time.sleep(1.0)  # attached
                t0, c0 = time.perf_counter(), _cpu_seconds(driver.proc.pid)
                driver.batch(line)
                wall, cpu = time.perf_counter() - t0, _cpu_seconds(driver.proc.pid) - c0
                recorder.send_signal(signal.SIGINT)
                recorder.wait(60)
                summary = raw_summary(raw) if raw.exists() else {"error": recorder.stderr.read().decode(errors="replace")[-300:]}
                summary.update(batch_wall_s=round(wall, 3), batch_cpu_s=round(cpu, 3), file=str(raw.relative_to(ROOT)))
                out[kind] = summary
            driver.request({"action": "shutdownRequested"})
        except BaseException:
            driver.kill()
            raise
        driver.finish()
    finally:
        fake.stop()
    return out


def raw_summary(path: Path, top: int = 15) -> dict[str, Any]:
    """py-spy raw (collapsed) stacks with --threads: samples by thread, top functions by own
    (leaf) and total (anywhere on the stack, once per sample) samples."""
    threads: dict[str, int] = {}
    ids: dict[str, set[str]] = {}
    modules: dict[str, int] = {}
    handler_wall: dict[str, int] = {}
    main = 0
    own: dict[str, int] = {}
    total_by: dict[str, int] = {}
    total = 0
    for stack, n in collapsed(path):
        total += n
        parts = stack.split(";")
        # "thread (1234): name"; pool threads share a name prefix (views_0, ...): grouped.
        tid, _, name = parts[0].partition(": ")
        group = (name or tid).rstrip("0123456789").rstrip("_-") or name or tid
        threads[group] = threads.get(group, 0) + n
        ids.setdefault(group, set()).add(tid)
        frames = [_frame(f) for f in parts[1:]] or [("(no Python frame)", "")]
        route = next((file for fn, file in frames if file.startswith("processors/") and not
                      file.removeprefix("processors/").startswith("_")), None)
        route = route or next((file for fn, file in frames if file.startswith("processors/")), None)
        if route is None:
            route = "main thread: " + frames[-1][0] if group == "MainThread" else "outside handlers: " + frames[-1][0]
        modules[route] = modules.get(route, 0) + n
        if group == "handler":  # one handler call at a time: its thread's samples are wall time
            handler_wall[route] = handler_wall.get(route, 0) + n
        elif group == "MainThread":
            main += n
        labels = [f"{fn} ({file})" for fn, file in frames]
        own[labels[-1]] = own.get(labels[-1], 0) + n
        for label in set(labels):
            total_by[label] = total_by.get(label, 0) + n

    def share(d: dict[str, int], k: int = top) -> dict[str, float]:
        return {key: round(v / total * 100, 1) for key, v in sorted(d.items(), key=lambda kv: -kv[1])[:k]}

    return {"samples": total, "percent_by_thread": share(threads, 30),
            "threads_seen": {g: len(t) for g, t in sorted(ids.items())},
            "percent_by_handler_module": share(modules, 12),
            # With --idle: the share of the main thread's time (≈ the batch's wall time) that a
            # handler call of each module was running (the main thread waits in join meanwhile).
            "handler_calls_percent_of_main_thread": {k: round(v / main * 100, 1) for k, v in
                                                     sorted(handler_wall.items(), key=lambda kv: -kv[1])} if main else {},
            "top_own_percent": share(own),
            "top_total_percent": share(total_by)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.b5", description=__doc__.splitlines()[0])
    parser.add_argument("--profiles", default=",".join(PROFILES))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--spy", action="store_true", help="py-spy our child under each profile instead")
    parser.add_argument("--sizing", action="store_true", help="our child's peak RSS at the deployed maxRecords")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    profiles = tuple(p.strip() for p in args.profiles.split(",") if p.strip())
    (WORK / "b5").mkdir(parents=True, exist_ok=True)
    if args.spy:
        result: Any = {p: spy(p) for p in profiles}
    elif args.sizing:
        result = {p: sizing(p) for p in profiles}
    else:
        result = run(profiles, args.quick, progress=lambda m: print(m, file=sys.stderr))
    text = orjson.dumps(result, option=orjson.OPT_INDENT_2).decode()
    if args.out:
        args.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    os.chdir(ROOT)
    sys.exit(main())
