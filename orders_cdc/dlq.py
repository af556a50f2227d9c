"""The dead-letter queue, for operators: list letters, and redrive them through the same
pipeline the daemon runs. Redrive is safe to repeat: reactions already done are
duplicates for the idempotency store, and a record that fails again gets a new letter
(with the new reason) before its old one is deleted. One redrive takes each letter once:
the ones in the queue when it began, never the new letters it writes."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone

import orjson

from orders_cdc.pipeline import Outcome, Pipeline


@dataclass(frozen=True, slots=True)
class Received:
    letter: dict
    receipt_handle: str


def receive(sqs, queue_url: str, limit: int, hide_seconds: int = 60) -> Iterator[Received]:
    """Up to `limit` letters; each stays hidden for `hide_seconds` unless released or deleted."""
    taken = 0
    while taken < limit:
        batch = sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=min(10, limit - taken),
                                    VisibilityTimeout=hide_seconds).get("Messages", [])
        if not batch:
            return
        for message in batch:
            taken += 1
            yield Received(orjson.loads(message["Body"]), message["ReceiptHandle"])


def release(sqs, queue_url: str, received: list[Received]) -> None:
    for start in range(0, len(received), 10):
        sqs.change_message_visibility_batch(QueueUrl=queue_url, Entries=[
            {"Id": str(i), "ReceiptHandle": r.receipt_handle, "VisibilityTimeout": 0}
            for i, r in enumerate(received[start:start + 10])])


def summary(letter: dict) -> dict:
    return {k: letter.get(k) for k in ("reason", "error_type", "attempts", "shard_id", "sequence_number",
                                       "failed_routes", "dead_lettered_at", "record_truncated", "record_s3")}


def whole(letter: dict, s3) -> dict:
    """The letter with its record, fetched from S3 when the message only points at it."""
    where = letter.get("record_s3")
    if not where:
        return letter
    return orjson.loads(s3.get_object(Bucket=where["bucket"], Key=where["key"])["Body"].read())


def redrive(pipeline: Pipeline, sqs, queue_url: str, limit: int, s3=None) -> Iterator[tuple[dict, str]]:
    """Yields (letter summary, what happened) for up to `limit` letters dead-lettered before the
    redrive began. A letter written since (one this redrive re-sent, or a live worker's) is held
    hidden and released at the end, so it is never taken again in the same run."""
    began = datetime.now(timezone.utc)
    held: list[Received] = []
    done = 0
    try:
        for received in receive(sqs, queue_url, limit=sys.maxsize):
            if done >= limit:
                held.append(received)
                break
            letter = whole(received.letter, s3)
            if _written_at(letter) >= began:
                held.append(received)
                continue
            done += 1
            if letter.get("record_truncated") or "data" not in letter.get("record", {}):
                held.append(received)
                yield summary(letter), "kept: the letter has no record data (too large); read it from the stream"
                continue
            [result] = pipeline.process([letter["record"]], letter.get("shard_id") or "redrive")
            sqs.delete_message(QueueUrl=queue_url, ReceiptHandle=received.receipt_handle)
            if result.outcome is Outcome.DEAD_LETTERED:
                yield summary(letter), f"dead-lettered again: {result.reason}"
            else:
                yield summary(letter), result.outcome.value
    finally:
        release(sqs, queue_url, held)


def _written_at(letter: dict) -> datetime:
    try:
        at = datetime.fromisoformat(letter.get("dead_lettered_at") or "")
    except ValueError:
        return datetime.min.replace(tzinfo=timezone.utc)  # no time: an old letter
    return at if at.tzinfo else at.replace(tzinfo=timezone.utc)
