"""NDJSON lines -> Firehose PutRecordBatch, chunked to the API's limits. Shared by the
analytics and audit handlers, which write to the same delivery stream."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

from orders_cdc.change import ChangeRecord
from orders_cdc.errors import PermanentError, RetryableError
from processors._batch import each, raise_failures

# PutRecordBatch limits: 500 records and 4 MiB per call, 1,000 KiB per record.
MAX_RECORDS = 500
MAX_BYTES = 4 * 1024 * 1024
MAX_RECORD_BYTES = 1000 * 1024


def put_ndjson(ctx, lines: Sequence[bytes]) -> dict[int, BaseException]:
    """Send every line (each ending in a newline); returns {index: error} for those that
    failed. A failed call fails only its own chunk: the other chunks are still sent."""
    stream = ctx.settings.resources.firehose_stream
    failures: dict[int, BaseException] = {}
    for i, line in enumerate(lines):
        if len(line) > MAX_RECORD_BYTES:
            failures[i] = PermanentError(f"record of {len(line)} bytes exceeds Firehose's {MAX_RECORD_BYTES}")
    sendable = [i for i in range(len(lines)) if i not in failures]
    for chunk in chunks([lines[i] for i in sendable]):
        indices = [sendable[j] for j in chunk]
        try:
            reply = ctx.clients.firehose.put_record_batch(
                DeliveryStreamName=stream, Records=[{"Data": lines[i]} for i in indices]
            )
        except Exception as exc:  # noqa: BLE001 - the caller reports it per record
            failures.update({i: exc for i in indices})
            continue
        if reply.get("FailedPutCount"):
            for i, entry in zip(indices, reply["RequestResponses"]):
                if "ErrorCode" in entry:
                    failures[i] = RetryableError(f"{entry['ErrorCode']}: {entry.get('ErrorMessage')}")
    return failures


def put_changes(ctx, changes: Sequence[ChangeRecord], to_line: Callable[[ChangeRecord], bytes]) -> None:
    """One line per change; raises PartialBatchFailure naming the changes that failed. A
    change whose line cannot be built (a malformed image) fails alone."""
    failures: dict[int, BaseException] = {}
    lines = each(changes, to_line, failures)
    indices = list(lines)
    sent = put_ndjson(ctx, [lines[i] for i in indices])
    failures.update({indices[j]: exc for j, exc in sent.items()})
    raise_failures(failures)


def chunks(lines: Sequence[bytes]) -> Iterator[range]:
    """Index ranges of consecutive lines that fit one PutRecordBatch call."""
    start, size = 0, 0
    for i, line in enumerate(lines):
        if i - start == MAX_RECORDS or (i > start and size + len(line) > MAX_BYTES):
            yield range(start, i)
            start, size = i, 0
        size += len(line)
    if start < len(lines):
        yield range(start, len(lines))
