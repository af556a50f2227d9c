"""Dead-letter sinks. `send` returns only once the entries are durable, because the
checkpoint may then move past them."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field

import orjson


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

    def to_json(self) -> bytes:
        return orjson.dumps(
            {
                "reason": self.reason,
                "error_type": self.error_type,
                "attempts": self.attempts,
                "shard_id": self.shard_id,
                "sequence_number": self.sequence_number,
                "sub_sequence_number": self.sub_sequence_number,
                "failed_routes": list(self.failed_routes),
                "dead_lettered_at": self.dead_lettered_at,
                "record": self.record,
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
    """SQS, in batches of 10 (the SendMessageBatch limit). Failed entries are retried by
    the caller; a partial failure raises so nothing is assumed durable that is not."""

    def __init__(self, sqs_client, queue_url: str):
        self._sqs = sqs_client
        self._queue_url = queue_url

    def send(self, letters: Sequence[DeadLetter]) -> None:
        for start in range(0, len(letters), 10):
            chunk = letters[start : start + 10]
            reply = self._sqs.send_message_batch(
                QueueUrl=self._queue_url,
                Entries=[{"Id": str(i), "MessageBody": letter.to_json().decode()} for i, letter in enumerate(chunk)],
            )
            if reply.get("Failed"):
                failed = reply["Failed"][0]
                raise RuntimeError(f"dead-letter queue refused {len(reply['Failed'])} message(s): {failed.get('Message')}")
