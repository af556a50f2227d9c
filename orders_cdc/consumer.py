"""The record processor the daemon drives: one per shard, one process per shard.

It stays thin: hand the batch to the pipeline, feed the outcomes to the checkpoint
policy, checkpoint when due. Exceptions are not caught here; see kcl/protocol.py.

Asked to stop (SIGTERM, `request_stop`): the batch in hand ends with what is in flight, its
settled prefix is checkpointed, and the batch is acknowledged so that the daemon goes on to
shutdownRequested; a later non-empty batch, or the end of the shard, is never acknowledged
(the child exits): the shard's next owner resumes from the checkpoint.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable

from orders_cdc.checkpointing import CheckpointPolicy
from orders_cdc.errors import Stopping
from orders_cdc.kcl.protocol import Checkpointer, CheckpointError, KclError, RecordProcessor
from orders_cdc.metrics import ROUTE_UNITS, child_started, emf, route_metrics
from orders_cdc.pipeline import Outcome, Pipeline

log = logging.getLogger(__name__)


class ChangeProcessor(RecordProcessor):
    def __init__(self, pipeline: Pipeline, new_policy: Callable[[], CheckpointPolicy], metrics: bool = True,
                 heartbeat: Callable[[], None] = lambda: None):
        self._pipeline = pipeline
        self._new_policy = new_policy
        self._metrics = metrics
        # Touched on initialize and every processRecords (health.py): the daemon calls a
        # child only while it holds the shard's lease.
        self._heartbeat = heartbeat
        self.shard_id = ""
        self.policy = new_policy()
        self.totals: Counter[str] = Counter()

    def request_stop(self) -> None:
        """The child's SIGTERM handler: no new calls; see the module docstring."""
        self._pipeline.request_stop()

    def initialize(self, shard_id, sequence_number, sub_sequence_number) -> None:
        self.shard_id = shard_id
        self.policy = self._new_policy()
        self._heartbeat()
        if self._metrics:
            child_started(shard_id)
        log.info("shard initialized", extra={"shard": shard_id, "from": sequence_number})

    def process_records(self, records, millis_behind_latest, checkpointer: Checkpointer) -> None:
        self._heartbeat()
        if records and self._pipeline.stopping:
            raise Stopping(f"stopping: a batch of {len(records)} record(s) left for the shard's next owner")
        if records:
            started = time.perf_counter()
            results = self._pipeline.process(records, self.shard_id)
            self.policy.observe(results)
            counts = Counter(r.outcome.value for r in results)
            if counts[Outcome.UNSETTLED.value]:
                self.policy.checkpoint(checkpointer, force=True)
                log.warning("stopping: records left for the shard's next owner",
                            extra={"shard": self.shard_id, "unsettled": counts[Outcome.UNSETTLED.value],
                                   "checkpoint": self.policy.committed})
            # Per route: a record can be DONE for one route and a duplicate for another.
            reactions = Counter(f"{o.value}_reactions" for r in results for _, o in r.routes
                                if o in (Outcome.DUPLICATE, Outcome.STALE))
            self.totals.update(counts + reactions)
            retried, latency_ms, circuits = self._pipeline.stats.drain()  # drained either way: it must not grow
            self._heartbeat()
            if self._metrics:
                emf(
                    {"Records": len(records),
                     **{k.title().replace("_", ""): v for k, v in (counts + reactions).items()},
                     "BatchSeconds": time.perf_counter() - started, "MillisBehindLatest": millis_behind_latest or 0},
                    {"Shard": self.shard_id},
                    units={"BatchSeconds": "Seconds", "MillisBehindLatest": "Milliseconds"},
                )
                # One document per route the batch touched, never one per record.
                for route, metrics in route_metrics(results, retried, latency_ms, circuits).items():
                    emf(metrics, {"Shard": self.shard_id, "Route": route}, units=ROUTE_UNITS,
                        dimension_sets=[["Shard", "Route"], ["Route"]])
        # The daemon also calls with an empty list when idle (callProcessRecordsEvenForEmptyRecordList),
        # which lets a time-due checkpoint land without waiting for the next record.
        self.policy.checkpoint(checkpointer)

    def lease_lost(self) -> None:
        # Another worker owns the shard now; checkpointing would fail and must not be tried.
        log.info("lease lost", extra={"shard": self.shard_id, "totals": dict(self.totals)})

    def shard_ended(self, checkpointer: Checkpointer) -> None:
        # Every record was handled before this call (process_records returns only then, unless
        # the worker is stopping), so SHARD_END is safe; without it the child shards are never
        # processed.
        if self.policy.blocked:
            raise Stopping("stopping: the shard's last records are not settled; SHARD_END not written")
        for attempt in range(1, 6):
            try:
                checkpointer.checkpoint(None, None)
                break
            except CheckpointError as exc:
                if exc.error in (KclError.SHUTDOWN, KclError.INVALID_STATE):
                    # The lease moved on: its new owner ends the shard. Exiting would stop
                    # every other shard of this worker for nothing.
                    log.warning("shard end not checkpointed", extra={"shard": self.shard_id, "error": exc.error.value})
                    return
                if exc.error is not KclError.THROTTLING or attempt == 5:
                    raise
                time.sleep(0.5 * 2**attempt)
        log.info("shard ended", extra={"shard": self.shard_id, "totals": dict(self.totals)})

    def shutdown_requested(self, checkpointer: Checkpointer) -> None:
        self.policy.checkpoint(checkpointer, force=True)
        log.info("shutdown requested", extra={"shard": self.shard_id, "checkpoint": self.policy.committed})
