"""Dead-letter sinks. `send` returns only once the entries are durable, because the
checkpoint may then move past them."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import orjson

from orders_cdc.sqs import json_body

_MAX_REASON = 4096
S3_PREFIX = "dead-letters/"
MAX_MESSAGE_BYTES = 1024 * 1024  # SQS: a message and a SendMessageBatch, each (the queue must allow it)


@dataclass(frozen=True, slots=True)
class DeadLetter:
    record: dict  # the daemon's record exactly as received (data still base64)
    shard_id: str
    sequence_number: str
    sub_sequence_number: int
    reason: str
    error_type: str
    attempts: int
    failed_routes: tuple[str, ...] = ()
    dead_lettered_at: str = ""

    @property
    def position(self) -> tuple[str, str, int]:
        return self.shard_id, self.sequence_number, self.sub_sequence_number

    @property
    def object_key(self) -> str:
        """Where the whole letter goes in S3 when it is too big for a message."""
        return f"{S3_PREFIX}{self.shard_id}/{self.sequence_number}-{self.sub_sequence_number}.json"

    def to_json(self, without_data: bool = False, stored_at: dict[str, str] | None = None) -> bytes:
        """`without_data`: the record's `data` is left out; `stored_at` ({"bucket", "key"})
        says where the whole letter is (`record_s3`), else `record_truncated`: true (the shard
        and sequence number still find it in the stream while it is retained)."""
        record = {k: v for k, v in self.record.items() if k != "data"} if without_data else self.record
        where = {"record_s3": stored_at} if stored_at else {"record_truncated": True} if without_data else {}
        return orjson.dumps(
            {
                "reason": self.reason[:_MAX_REASON],
                "error_type": self.error_type,
                "attempts": self.attempts,
                "shard_id": self.shard_id,
                "sequence_number": self.sequence_number,
                "sub_sequence_number": self.sub_sequence_number,
                "failed_routes": list(self.failed_routes),
                "dead_lettered_at": self.dead_lettered_at,
                "record": record,
                **where,
            }
        )


class DeadLetterSink(ABC):
    @abstractmethod
    def send(self, letters: Sequence[DeadLetter]) -> None:
        """Persist all letters or raise."""


@dataclass
class InMemoryDeadLetterSink(DeadLetterSink):
    letters: list[DeadLetter] = field(default_factory=list)

    def send(self, letters: Sequence[DeadLetter]) -> None:
        self.letters.extend(letters)


class SqsDeadLetterSink(DeadLetterSink):
    """SQS SendMessageBatch: at most 10 entries and `max_bytes` (1 MiB, SQS's limit for a
    message and for a batch) per call. A letter too big for one message (a Kinesis record
    may be 1 MiB, 1.33 MiB in base64) is written whole to S3 (`bucket`, under
    dead-letters/) first, and the message says where (`record_s3`); `orders-cdc dlq` follows
    it. Without a bucket it is sent without its data rather than block the shard forever.

    Entries SQS refuses are resent alone; letters already delivered are not resent when
    the pipeline retries `send` after a failure (fewer duplicates in the queue, though a
    reader must still tolerate them: delivery to SQS is at-least-once).
    """

    def __init__(self, sqs_client, queue_url: str, s3_client=None, bucket: str | None = None,
                 max_bytes: int = MAX_MESSAGE_BYTES, attempts: int = 3):
        self._sqs = sqs_client
        self._queue_url = queue_url
        self._s3 = s3_client
        self._bucket = bucket
        self._max_bytes = max_bytes
        self._attempts = attempts
        self._delivered: set[tuple[str, str, int]] = set()

    def send(self, letters: Sequence[DeadLetter]) -> None:
        pending = [(letter, self._body(letter)) for letter in letters if letter.position not in self._delivered]
        for chunk in self._chunks(pending):
            self._send_chunk(chunk)
        self._delivered.clear()  # everything asked for is durable

    def _body(self, letter: DeadLetter) -> str:
        whole = letter.to_json()
        body = json_body(whole)
        if len(body.encode()) <= self._max_bytes:
            return body
        stored_at = None
        if self._s3 is not None and self._bucket:
            # Durable before the message that points at it (raises otherwise: the pipeline retries).
            self._s3.put_object(Bucket=self._bucket, Key=letter.object_key, Body=whole,
                                ContentType="application/json")
            stored_at = {"bucket": self._bucket, "key": letter.object_key}
        return json_body(letter.to_json(without_data=True, stored_at=stored_at))

    def _chunks(self, pending: list[tuple[DeadLetter, str]]) -> Iterator[list[tuple[DeadLetter, str]]]:
        chunk: list[tuple[DeadLetter, str]] = []
        size = 0
        for entry in pending:
            n = len(entry[1].encode())
            if chunk and (len(chunk) == 10 or size + n > self._max_bytes):
                yield chunk
                chunk, size = [], 0
            chunk.append(entry)
            size += n
        if chunk:
            yield chunk

    def _send_chunk(self, chunk: list[tuple[DeadLetter, str]]) -> None:
        for _ in range(self._attempts):
            reply = self._sqs.send_message_batch(
                QueueUrl=self._queue_url,
                Entries=[{"Id": str(i), "MessageBody": body} for i, (_, body) in enumerate(chunk)],
            )
            failed = {int(f["Id"]): f for f in reply.get("Failed", [])}
            self._delivered.update(letter.position for i, (letter, _) in enumerate(chunk) if i not in failed)
            if not failed:
                return
            first = next(iter(failed.values()))
            if any(f.get("SenderFault") for f in failed.values()):
                break  # our request is wrong: resending it cannot help
            chunk = [chunk[i] for i in sorted(failed)]
        raise RuntimeError(f"dead-letter queue refused {len(failed)} message(s): {first.get('Code')}: {first.get('Message')}")
