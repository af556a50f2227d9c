"""`orders-cdc replay`: read a window of the stream again and send it through the pipeline.

It reads the stream itself, beside the live consumer, from AT_TIMESTAMP iterators: every
shard in the window, closed parents still in retention included, each parent before its
children (a child's changes to an order come after its parent's). What it reads goes
through the same decode -> route -> handler pipeline as the daemon's children, with the
same idempotency store, so a reaction already done is a duplicate, not a second email.

The window is [--from, --to), by each record's ApproximateArrivalTimestamp (the time
AT_TIMESTAMP itself positions by). Without --to it ends where the stream's tip was when the
replay started: what arrives later is the live consumer's.

Reads stay under `read_share` of each shard's 5 GetRecords/s (the live consumer's share is
the rest) and back off on throttling with the pipeline's own backoff.
"""

from __future__ import annotations

import logging
import queue
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from orders_cdc import settings as settings_module
from orders_cdc.errors import Failure, SettingsError, classify, error_code, is_throttling
from orders_cdc.ratelimit import TokenBucket
from orders_cdc.retry import RetryPolicy

log = logging.getLogger(__name__)

SHARD_READS_PER_SECOND = 5  # Kinesis: GetRecords per shard per second, shared by every reader
_RELATIVE = re.compile(r"-((?:\d+(?:\.\d+)?[smhd])+)")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_time(raw: str, name: str, now: datetime) -> datetime:
    """ISO-8601 with a zone, epoch seconds, or relative to now: -2h, -30m, -1d12h."""
    text = raw.strip()
    relative = _RELATIVE.fullmatch(text)
    if relative:
        seconds = sum(float(n) * _UNITS[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)([smhd])", relative.group(1)))
        return now - timedelta(seconds=seconds)
    try:
        when = settings_module.parse_position(text, name)
    except SettingsError as exc:
        if "timezone" in str(exc):
            raise
        when = None
    if not isinstance(when, datetime):
        raise SettingsError(f"{name}={raw!r}: expected an ISO-8601 time with a zone, epoch seconds, or -2h / -30m")
    return when


@dataclass(frozen=True, slots=True)
class Window:
    start: datetime  # inclusive
    end: datetime  # exclusive
    open_end: bool  # no --to: the end is the tip as the replay started


def check_window(start: datetime, end: datetime | None, *, now: datetime, retention_hours: float,
                 ttl_seconds: float, force: bool) -> Window:
    """The window, or the first reason it cannot be replayed (SettingsError, one line)."""
    oldest = now - timedelta(hours=retention_hours)
    if start > now:
        raise SettingsError(f"--from {start.isoformat()} is in the future")
    if end is not None and end > now:
        raise SettingsError(f"--to {end.isoformat()} is in the future: leave --to out to read up to the stream's tip")
    if end is not None and end <= start:
        raise SettingsError(f"--to {end.isoformat()} is not after --from {start.isoformat()}")
    if start < oldest:
        raise SettingsError(f"--from {start.isoformat()} is before the stream's {retention_hours:g} h retention "
                            f"(the oldest record readable arrived after {oldest.isoformat(timespec='seconds')})")
    if not force and (now - start).total_seconds() > ttl_seconds:
        raise SettingsError(f"--from {start.isoformat()} is older than the idempotency records' TTL "
                            f"({ttl_seconds / 3600:g} h): reactions done before then are forgotten and would run "
                            f"again; --force accepts that")
    return Window(start, end or now, end is None)


@dataclass(frozen=True, slots=True)
class Shard:
    id: str
    parents: tuple[str, ...] = ()
    closed: bool = False


def list_shards(kinesis, stream: str) -> list[Shard]:
    from orders_cdc.leases import stream_shards

    return [Shard(s["ShardId"], tuple(p for p in (s.get("ParentShardId"), s.get("AdjacentParentShardId")) if p),
                  "EndingSequenceNumber" in s.get("SequenceNumberRange", {}))
            for s in stream_shards(kinesis, stream).values()]


def choose_shards(shards: Sequence[Shard], wanted: Sequence[str] | None) -> list[Shard]:
    if not wanted:
        return list(shards)
    known = {s.id for s in shards}
    unknown = [w for w in wanted if w not in known]
    if unknown:
        raise SettingsError(f"--shard {', '.join(unknown)}: not a shard of the stream (its shards: "
                            f"{', '.join(sorted(known))})")
    return [s for s in shards if s.id in set(wanted)]


def ready(plan: Sequence[Shard], done: set[str], started: set[str]) -> list[Shard]:
    """Shards that may start now: not started, and every parent that is in the plan is done."""
    ids = {s.id for s in plan}
    return [s for s in plan if s.id not in started and all(p in done or p not in ids for p in s.parents)]


def kcl_record(record: dict) -> dict:
    """A GetRecords record in the shape the daemon hands the child (kcl/protocol.py)."""
    import base64

    return {"data": base64.b64encode(record["Data"]).decode("ascii"),
            "sequenceNumber": record["SequenceNumber"], "subSequenceNumber": 0,
            "partitionKey": record["PartitionKey"],
            "approximateArrivalTimestamp": int(record["ApproximateArrivalTimestamp"].timestamp() * 1000)}


@dataclass
class ShardProgress:
    shard: str
    records: int = 0
    position: datetime | None = None  # the arrival time of the last record read
    millis_behind: int | None = None
    finished: bool = False


@dataclass
class ShardReader:
    """The records of one shard within the window, batch by batch, within its read budget."""

    kinesis: Any
    stream: str
    shard: str
    window: Window
    reads: TokenBucket
    limit: int = 1000
    backoff: RetryPolicy = field(default_factory=RetryPolicy)
    sleep: Callable[[float], None] = time.sleep
    stop: threading.Event = field(default_factory=threading.Event)

    def batches(self, progress: ShardProgress) -> Iterator[list[dict]]:
        iterator, last, failures = self._iterator(None), None, 0
        while iterator and not self.stop.is_set():
            self.reads.take(max_wait=float("inf"))
            try:
                reply = self.kinesis.get_records(ShardIterator=iterator, Limit=self.limit)
            except Exception as exc:
                if error_code(exc) == "ExpiredIteratorException":
                    iterator = self._iterator(last)
                    continue
                # Throttling is the shard's budget, shared with the live consumer: wait, as
                # long as it takes. Another transient error gets the policy's attempts.
                failures += 1
                if is_throttling(exc) or (classify(exc) is Failure.TRANSIENT and failures < self.backoff.max_attempts):
                    self.sleep(self.backoff.backoff(failures))
                    continue
                raise
            failures = 0
            records = reply.get("Records", [])
            progress.millis_behind = reply.get("MillisBehindLatest")
            keep = [r for r in records if self.window.start <= r["ApproximateArrivalTimestamp"] < self.window.end]
            past_end = any(r["ApproximateArrivalTimestamp"] >= self.window.end for r in records)
            if records:
                last = records[-1]["SequenceNumber"]
                progress.position = min(records[-1]["ApproximateArrivalTimestamp"], self.window.end)
            if keep:
                yield [kcl_record(r) for r in keep]
            if past_end or (not records and progress.millis_behind == 0):
                return  # past --to, or at the tip
            iterator = reply.get("NextShardIterator")  # None: a closed shard, read to its end

    def _iterator(self, after: str | None) -> str | None:
        kwargs = ({"ShardIteratorType": "AFTER_SEQUENCE_NUMBER", "StartingSequenceNumber": after} if after
                  else {"ShardIteratorType": "AT_TIMESTAMP", "Timestamp": self.window.start})
        return self.kinesis.get_shard_iterator(StreamName=self.stream, ShardId=self.shard, **kwargs)["ShardIterator"]


@dataclass
class Tally:
    """What a replay did (or, dry, would do)."""

    records: int = 0
    outcomes: Counter = field(default_factory=Counter)  # record outcome -> records
    routes: Counter = field(default_factory=Counter)  # (route, outcome) -> changes
    events: Counter = field(default_factory=Counter)  # event name -> records
    shards_done: list[str] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add_results(self, results) -> None:
        with self._lock:
            self.records += len(results)
            for r in results:
                self.outcomes[r.outcome.value] += 1
                self.events[r.change.event.value if r.change else "undecodable"] += 1
                for route, outcome in r.routes:
                    self.routes[(route, outcome.value)] += 1

    def add_previews(self, previews) -> None:
        with self._lock:
            self.records += len(previews)
            for p in previews:
                self.events[p.event or "undecodable"] += 1
                if p.error:
                    self.outcomes["would_dead_letter"] += 1
                elif not p.routes:
                    self.outcomes["skipped"] += 1
                else:
                    self.outcomes["already_done" if all(p.routes.values()) else "would_run"] += 1
                for route, done in p.routes.items():
                    self.routes[(route, "already_done" if done else "would_run")] += 1

    def as_dict(self) -> dict:
        by_route: dict[str, dict[str, int]] = {}
        for (route, outcome), n in sorted(self.routes.items()):
            by_route.setdefault(route, {})[outcome] = n
        return {"records": self.records, "outcomes": dict(sorted(self.outcomes.items())), "routes": by_route,
                "events": dict(sorted(self.events.items())), "shards_done": sorted(self.shards_done)}


class ReplayFailed(Exception):
    def __init__(self, shard: str, cause: BaseException, progress: dict[str, ShardProgress]):
        self.shard, self.cause, self.progress = shard, cause, progress
        super().__init__(f"shard {shard}: {type(cause).__name__}: {cause}")


@dataclass
class Replay:
    """Runs the readers, `parallel` shards at a time, parents first; each shard's batches go
    to its own pipeline (`process(records, shard_id)`, or `preview` when dry)."""

    kinesis: Any
    stream: str
    window: Window
    plan: list[Shard]
    new_pipeline: Callable[[], Any]
    dry_run: bool = False
    read_share: float = 0.2
    parallel: int = 4
    limit: int = 1000
    sleep: Callable[[float], None] = time.sleep
    on_progress: Callable[[dict[str, ShardProgress], Tally], None] = lambda progress, tally: None
    tally: Tally = field(default_factory=Tally)
    progress: dict[str, ShardProgress] = field(default_factory=dict)
    stop: threading.Event = field(default_factory=threading.Event)
    _idle: queue.Queue = field(default_factory=queue.Queue, repr=False)

    def run(self) -> Tally:
        self.progress = {s.id: ShardProgress(s.id) for s in self.plan}
        done: set[str] = set()
        started: set[str] = set()
        running: dict[Future, str] = {}
        with ThreadPoolExecutor(max_workers=max(1, self.parallel), thread_name_prefix="replay") as pool:
            try:
                while len(done) < len(self.plan):
                    for shard in ready(self.plan, done, started)[: self.parallel - len(running)]:
                        started.add(shard.id)
                        running[pool.submit(self._shard, shard.id)] = shard.id
                    finished, _ = wait(running, timeout=0.5, return_when=FIRST_COMPLETED)
                    for future in finished:
                        shard = running.pop(future)
                        exc = future.exception()
                        if exc is not None:
                            raise ReplayFailed(shard, exc, self.progress) from exc
                        done.add(shard)
                        self.tally.shards_done.append(shard)
                    self.on_progress(self.progress, self.tally)
            except BaseException:
                self.stop.set()
                raise
        self.on_progress(self.progress, self.tally)
        return self.tally

    def _shard(self, shard: str) -> None:
        progress = self.progress[shard]
        reads = TokenBucket(SHARD_READS_PER_SECOND * self.read_share, burst=1)
        reader = ShardReader(self.kinesis, self.stream, shard, self.window, reads, self.limit,
                             sleep=self.sleep, stop=self.stop)
        # At most `parallel` pipelines (each with its pool of call threads), reused shard after shard.
        try:
            pipeline = self._idle.get_nowait()
        except queue.Empty:
            pipeline = self.new_pipeline()
        try:
            for records in reader.batches(progress):
                if self.dry_run:
                    self.tally.add_previews(pipeline.preview(records, shard))
                else:
                    self.tally.add_results(pipeline.process(records, shard))
                progress.records += len(records)
        finally:
            self._idle.put(pipeline)
        if self.stop.is_set():
            raise InterruptedError("stopped")
        progress.finished = True
        log.info("replay: shard done", extra={"shard": shard, "records": progress.records})


def fraction_done(progress: dict[str, ShardProgress], window: Window) -> float:
    """Of the window's time, across shards: a finished shard counts whole."""
    span = max((window.end - window.start).total_seconds(), 1e-6)
    parts = [1.0 if p.finished else
             0.0 if p.position is None else min(1.0, (p.position - window.start).total_seconds() / span)
             for p in progress.values()]
    return sum(parts) / len(parts) if parts else 1.0


def now_utc() -> datetime:
    return datetime.now(timezone.utc)
