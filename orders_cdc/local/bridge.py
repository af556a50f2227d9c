"""LOCAL ONLY: a stand-in for "Kinesis Data Streams for DynamoDB". Never deploy this.

moto has no Kinesis streaming destination, so in local mode this bridge reads the table's
DynamoDB Stream (moto) and writes every change into the Kinesis stream (LocalStack) in the
exact KDS-for-DDB record format (shared/notes/record-format.md):

- ``eventID`` is a fresh UUID4 string; ``userIdentity`` is null, or the TTL service identity.
- The partition key is the uppercase MD5 hex of the item key's canonical JSON (32 chars), so
  one item's changes land on one shard, in order.
- ``ApproximateCreationDateTime`` is in MICROSECOND (default) or MILLISECOND units, as
  ``ApproximateCreationDateTimePrecision`` says.

Creation time, and what we did about it: the DynamoDB Stream record's own time is the source
(AWS gives whole seconds there; moto 5.2 gives milliseconds). Several changes of one item can
therefore share a time, which a consumer's per-item high-water mark would read as duplicates
or stale. So, per item (partition key), the bridge emits ``max(record time, previous + 1 unit)``:
the stream's time whenever it moves forward, otherwise one microsecond (or millisecond) past
the item's previous change. Times never go backwards and are strictly increasing per item; the
bump is at most a few units per burst. That per-item memory is kept only as long as it matters.

``SizeBytes`` is passed through from the stream record (moto overestimates it).

Delivery: a read batch is converted once (IDs and times fixed), held in memory, and only
dropped when PutRecords accepted it, so a retried change is byte-identical. A PutRecords batch
never holds two changes of one item, so retrying its failed entries cannot reorder an item.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import random
import threading
import time
import uuid
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any, Literal

from botocore.exceptions import BotoCoreError, ClientError

log = logging.getLogger(__name__)

Precision = Literal["MICROSECOND", "MILLISECOND"]
_UNITS_PER_SECOND = {"MICROSECOND": 1_000_000, "MILLISECOND": 1_000}
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_MAX_BATCH_RECORDS = 500
_MAX_BATCH_BYTES = 5 * 1024 * 1024
_MAX_RECORD_BYTES = 1024 * 1024  # data + partition key
_MAX_PENDING = 10_000  # read no more while this many changes wait for Kinesis
_LAST_TS_LIMIT = 100_000  # per-item time memory before pruning


class BridgeError(RuntimeError):
    """The bridge cannot work at all (e.g. the table has no stream)."""


@dataclass(frozen=True, slots=True)
class _Entry:
    partition_key: str
    data: bytes


@dataclass(slots=True)
class _Shard:
    shard_id: str
    parent_id: str | None
    start: str  # TRIM_HORIZON | LATEST, used until we have a sequence number
    iterator: str | None = None
    last_sequence: str | None = None
    done: bool = False


def attribute_value_json(value: Any) -> Any:
    """boto3 hands B/BS values as bytes; the wire (and KDS-for-DDB) carries base64 text."""
    if isinstance(value, (bytes, bytearray)):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, Mapping):
        return {k: attribute_value_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [attribute_value_json(v) for v in value]
    return value


def partition_key(keys: Mapping[str, Any]) -> str:
    canonical = json.dumps(attribute_value_json(keys), sort_keys=True, separators=(",", ":"))
    return hashlib.md5(canonical.encode(), usedforsecurity=False).hexdigest().upper()


def _epoch_units(value: Any, per_second: int) -> int:
    if isinstance(value, datetime):
        aware = value if value.tzinfo else value.replace(tzinfo=timezone.utc)
        return (aware - _EPOCH) // timedelta(microseconds=1) * per_second // 1_000_000
    return int(Decimal(str(value)) * per_second)  # epoch seconds as a number


class StreamBridge:
    """DynamoDB Stream (moto) -> Kinesis (LocalStack), in KDS-for-DDB format. LOCAL ONLY."""

    def __init__(
        self,
        ddb_streams_client: Any,
        dynamodb_client: Any,
        kinesis_client: Any,
        table_name: str,
        stream_name: str,
        precision: Precision = "MICROSECOND",
        poll_interval: float = 0.1,
        *,
        start_position: Literal["TRIM_HORIZON", "LATEST"] = "TRIM_HORIZON",
        max_put_attempts: int = 8,
        retry_delay: float = 0.025,
        shard_refresh_interval: float = 10.0,
    ) -> None:
        if precision not in _UNITS_PER_SECOND:
            raise ValueError(f"precision must be MICROSECOND or MILLISECOND, not {precision!r}")
        self._streams = ddb_streams_client
        self._dynamodb = dynamodb_client
        self._kinesis = kinesis_client
        self.table_name = table_name
        self.stream_name = stream_name
        self.precision = precision
        self.poll_interval = poll_interval
        self._start_position = start_position
        self._max_put_attempts = max_put_attempts
        self._retry_delay = retry_delay
        self._refresh_interval = shard_refresh_interval
        self._per_second = _UNITS_PER_SECOND[precision]
        self._stream_arn: str | None = None
        self._shards: dict[str, _Shard] = {}
        self._next_refresh = 0.0
        self._pending: deque[_Entry] = deque()
        self._last_ts: dict[str, int] = {}
        self._newest_base = 0
        # Counters (read from other threads; plain ints are fine).
        self.forwarded = 0  # accepted by Kinesis
        self.read = 0  # taken from the DynamoDB Stream
        self.retried = 0  # entries PutRecords rejected and we sent again
        self.skipped_oversize = 0  # over Kinesis's 1 MB limit, like FailedToReplicateRecordCount

    @property
    def pending(self) -> int:
        return len(self._pending)

    # ------------------------------------------------------------ loop

    def run(self, stop_event: threading.Event) -> None:
        """Pump until stop_event is set; errors are logged and retried with backoff."""
        failures = 0
        while not stop_event.is_set():
            try:
                moved = self.pump_once()
                failures = 0
            except (BotoCoreError, ClientError) as exc:
                failures += 1
                log.warning("bridge pump failed (%d in a row): %s", failures, exc)
                stop_event.wait(min(5.0, self.poll_interval * 2**failures))
                continue
            if not moved and not self._pending:
                stop_event.wait(self.poll_interval)
        if self._pending:
            log.warning("bridge stopping with %d changes not forwarded", len(self._pending))

    def pump_once(self) -> int:
        """Read what the stream has (one GetRecords per shard) and forward it. Returns records forwarded."""
        before = self.forwarded
        if len(self._pending) < _MAX_PENDING:
            self._refresh_shards()
            for shard in list(self._shards.values()):
                if self._readable(shard):
                    self._read(shard)
        self._flush()
        return self.forwarded - before

    # ------------------------------------------------------------ reading

    def _arn(self) -> str:
        if self._stream_arn is None:
            table = self._dynamodb.describe_table(TableName=self.table_name)["Table"]
            arn = table.get("LatestStreamArn")
            if not arn or not table.get("StreamSpecification", {}).get("StreamEnabled"):
                raise BridgeError(f"table {self.table_name} has no DynamoDB Stream enabled")
            self._stream_arn = str(arn)
        return self._stream_arn

    def _refresh_shards(self, force: bool = False) -> None:
        if not force and time.monotonic() < self._next_refresh:
            return
        first = not self._shards
        kwargs: dict[str, Any] = {"StreamArn": self._arn()}
        while True:
            desc = self._streams.describe_stream(**kwargs)["StreamDescription"]
            for s in desc.get("Shards", []):
                if s["ShardId"] in self._shards:
                    continue
                # Shards there at start begin at start_position; later ones are new: read them whole.
                start = self._start_position if first else "TRIM_HORIZON"
                closed = "EndingSequenceNumber" in s.get("SequenceNumberRange", {})
                self._shards[s["ShardId"]] = _Shard(
                    s["ShardId"], s.get("ParentShardId"), start, done=closed and start == "LATEST",
                )
            if not desc.get("LastEvaluatedShardId"):
                break
            kwargs["ExclusiveStartShardId"] = desc["LastEvaluatedShardId"]
        self._next_refresh = time.monotonic() + self._refresh_interval

    def _readable(self, shard: _Shard) -> bool:
        # A child is read only after its parent is drained, so an item's order survives a split.
        parent = self._shards.get(shard.parent_id or "")
        return not shard.done and (parent is None or parent.done)

    def _iterator(self, shard: _Shard) -> str:
        if shard.iterator is None:
            kwargs: dict[str, Any] = {"StreamArn": self._arn(), "ShardId": shard.shard_id}
            if shard.last_sequence is None:
                kwargs["ShardIteratorType"] = shard.start
            else:
                kwargs.update(ShardIteratorType="AFTER_SEQUENCE_NUMBER", SequenceNumber=shard.last_sequence)
            shard.iterator = self._streams.get_shard_iterator(**kwargs)["ShardIterator"]
        return shard.iterator

    def _read(self, shard: _Shard) -> None:
        try:
            resp = self._streams.get_records(ShardIterator=self._iterator(shard), Limit=1000)
        except ClientError as exc:
            if exc.response["Error"]["Code"] == "ExpiredIteratorException":
                shard.iterator = None  # re-made from last_sequence next time
                return
            raise
        for record in resp.get("Records", []):
            self._pending.append(self._convert(record))
            shard.last_sequence = record["dynamodb"].get("SequenceNumber", shard.last_sequence)
            self.read += 1
        shard.iterator = resp.get("NextShardIterator")
        if shard.iterator is None:  # closed and drained: children may start
            shard.done = True
            self._refresh_shards(force=True)

    # ------------------------------------------------------------ converting

    def _convert(self, record: Mapping[str, Any]) -> _Entry:
        ddb = record["dynamodb"]
        keys = attribute_value_json(ddb["Keys"])
        pk = partition_key(keys)
        created = self._creation_time(pk, ddb["ApproximateCreationDateTime"])
        body: dict[str, Any] = {
            "ApproximateCreationDateTime": created,
            "ApproximateCreationDateTimePrecision": self.precision,
            "Keys": keys,
        }
        for image in ("NewImage", "OldImage"):
            if image in ddb:
                body[image] = attribute_value_json(ddb[image])
        body["SizeBytes"] = ddb.get("SizeBytes", 0)
        identity = record.get("userIdentity")
        payload = {
            "awsRegion": record.get("awsRegion") or self._streams.meta.region_name,
            "eventID": str(uuid.uuid4()),
            "eventName": record["eventName"],
            "userIdentity": (
                {"type": identity.get("Type"), "principalId": identity.get("PrincipalId")}
                if identity else None
            ),
            "recordFormat": "application/json",
            "tableName": self.table_name,
            "dynamodb": body,
            "eventSource": "aws:dynamodb",
        }
        return _Entry(pk, json.dumps(payload, separators=(",", ":")).encode())

    def _creation_time(self, pk: str, source_time: Any) -> int:
        """The stream's time, pushed one unit past this item's previous change if needed."""
        base = _epoch_units(source_time, self._per_second)
        previous = self._last_ts.get(pk)
        created = base if previous is None or base > previous else previous + 1
        self._last_ts[pk] = created
        self._newest_base = max(self._newest_base, base)
        if len(self._last_ts) > _LAST_TS_LIMIT:
            # An item whose last time is behind the stream's newest time needs no bump any more.
            self._last_ts = {k: v for k, v in self._last_ts.items() if v >= self._newest_base}
        return created

    # ------------------------------------------------------------ writing

    def _next_batch(self) -> list[_Entry]:
        batch: list[_Entry] = []
        keys: set[str] = set()
        size = 0
        while self._pending and len(batch) < _MAX_BATCH_RECORDS:
            entry = self._pending[0]
            entry_size = len(entry.data) + len(entry.partition_key)
            if entry_size > _MAX_RECORD_BYTES:
                self._pending.popleft()
                self.skipped_oversize += 1
                log.warning("change of item %s is %d bytes, over Kinesis's 1 MB: skipped",
                            entry.partition_key, entry_size)
                continue
            # One change per item per batch: a failed entry retried later cannot overtake.
            if entry.partition_key in keys or size + entry_size > _MAX_BATCH_BYTES:
                break
            batch.append(self._pending.popleft())
            keys.add(entry.partition_key)
            size += entry_size
        return batch

    def _flush(self) -> None:
        attempt = 0
        while self._pending:
            batch = self._next_batch()
            if not batch:
                continue  # everything left was oversize
            try:
                resp = self._kinesis.put_records(
                    StreamName=self.stream_name,
                    Records=[{"Data": e.data, "PartitionKey": e.partition_key} for e in batch],
                )
                failed = [e for e, r in zip(batch, resp["Records"]) if r.get("ErrorCode")]
            except (BotoCoreError, ClientError) as exc:
                log.warning("PutRecords failed for %d changes: %s", len(batch), exc)
                failed = batch
            self.forwarded += len(batch) - len(failed)
            if not failed:
                attempt = 0
                continue
            # Back off harder only while nothing gets through; partial progress keeps it short.
            attempt = 1 if len(failed) < len(batch) else attempt + 1
            # Back to the front, in their order: nothing of theirs was sent after them.
            self._pending.extendleft(reversed(failed))
            self.retried += len(failed)
            if attempt >= self._max_put_attempts:
                log.warning("%d changes still not accepted by Kinesis; will retry next pump",
                            len(self._pending))
                return
            time.sleep(min(2.0, self._retry_delay * 2**attempt) * random.uniform(0.5, 1.0))
