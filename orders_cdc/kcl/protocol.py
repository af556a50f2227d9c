"""The MultiLangDaemon wire protocol, and nothing else.

One JSON object a line on stdin from the daemon; one JSON object a line back on stdout.
Every message is answered with {"action":"status","responseFor":<action>}; a checkpoint is a
synchronous request/response inside processRecords, shardEnded or shutdownRequested.

Unlike amazon_kclpy.kcl.KCLProcess, an exception from the processor is NOT swallowed: the
loop stops without sending the status, the child exits non-zero, and the daemon restarts
the shard from its last checkpoint. Acknowledging a batch that failed would lose it.
"""

from __future__ import annotations

import logging
import os
import sys
from abc import ABC, abstractmethod
from dataclasses import dataclass
from enum import StrEnum
from typing import BinaryIO

import orjson

log = logging.getLogger(__name__)


class KclError(StrEnum):
    """Checkpoint error names the daemon sends (Throwable.getSimpleName())."""

    THROTTLING = "ThrottlingException"
    SHUTDOWN = "ShutdownException"
    INVALID_STATE = "InvalidStateException"
    DEPENDENCY = "KinesisClientLibDependencyException"
    ILLEGAL_ARGUMENT = "IllegalArgumentException"
    UNKNOWN = "Unknown"

    @classmethod
    def parse(cls, name: str) -> KclError:
        try:
            return cls(name)
        except ValueError:
            return cls.UNKNOWN


class CheckpointError(Exception):
    def __init__(self, error: KclError, raw: str):
        super().__init__(raw)
        self.error = error


class ProtocolError(Exception):
    """The daemon sent something this protocol does not allow."""


class Checkpointer(ABC):
    @abstractmethod
    def checkpoint(self, sequence_number: str | None = None, sub_sequence_number: int | None = None) -> None:
        """Blocks until the daemon confirms; raises CheckpointError on failure."""


class RecordProcessor(ABC):
    """The amazon-kclpy v3 lifecycle, with plain arguments."""

    @abstractmethod
    def initialize(self, shard_id: str, sequence_number: str | None, sub_sequence_number: int | None) -> None: ...

    @abstractmethod
    def process_records(self, records: list[dict], millis_behind_latest: int | None, checkpointer: Checkpointer) -> None: ...

    @abstractmethod
    def lease_lost(self) -> None: ...

    @abstractmethod
    def shard_ended(self, checkpointer: Checkpointer) -> None: ...

    @abstractmethod
    def shutdown_requested(self, checkpointer: Checkpointer) -> None: ...


@dataclass
class _Io:
    input: BinaryIO
    output: BinaryIO

    def read(self) -> dict | None:
        while True:
            line = self.input.readline()
            if not line:
                return None
            if line.strip():
                return orjson.loads(line)

    def write(self, message: dict) -> None:
        self.output.write(orjson.dumps(message) + b"\n")
        self.output.flush()


class _WireCheckpointer(Checkpointer):
    def __init__(self, io: _Io):
        self._io = io

    def checkpoint(self, sequence_number: str | None = None, sub_sequence_number: int | None = None) -> None:
        self._io.write(
            {"action": "checkpoint", "sequenceNumber": sequence_number, "subSequenceNumber": sub_sequence_number}
        )
        reply = self._io.read()
        if reply is None:
            raise ProtocolError("stdin closed while waiting for a checkpoint reply")
        if reply.get("action") != "checkpoint":
            # The daemon answers a checkpoint with a checkpoint message only; anything else
            # means the two sides disagree about state (kclpy reports this the same way).
            raise CheckpointError(KclError.INVALID_STATE, f"unexpected reply {reply.get('action')!r}")
        error = reply.get("error")
        if error:
            raise CheckpointError(KclError.parse(error), error)


class _NoCheckpointer(Checkpointer):
    """leaseLost has no checkpointer: the lease belongs to another worker now."""

    def checkpoint(self, sequence_number=None, sub_sequence_number=None) -> None:
        raise CheckpointError(KclError.INVALID_STATE, "no checkpointing after the lease is lost")


def protocol_streams() -> tuple[BinaryIO, BinaryIO]:
    """Take stdin/stdout for the protocol and point fd 1 at stderr.

    Anything else that writes to stdout afterwards (a stray print, a C library) lands in
    stderr instead of corrupting the protocol channel.
    """
    proto_out = os.fdopen(os.dup(sys.stdout.fileno()), "wb", buffering=0)
    sys.stdout.flush()
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    sys.stdout = sys.stderr
    return sys.stdin.buffer, proto_out


def run(processor: RecordProcessor, input: BinaryIO, output: BinaryIO) -> None:
    """Serve the daemon until it closes stdin. Processor exceptions propagate."""
    io = _Io(input, output)
    checkpointer = _WireCheckpointer(io)
    while (message := io.read()) is not None:
        action = message.get("action")
        if action == "initialize":
            processor.initialize(message["shardId"], message.get("sequenceNumber"), message.get("subSequenceNumber"))
        elif action == "processRecords":
            processor.process_records(message["records"], message.get("millisBehindLatest"), checkpointer)
        elif action == "leaseLost":
            processor.lease_lost()
        elif action == "shardEnded":
            processor.shard_ended(checkpointer)
        elif action == "shutdownRequested":
            processor.shutdown_requested(checkpointer)
        elif action == "shutdown":
            # Legacy v1/v2 message; the 3.x daemon never sends it.
            reason = message.get("reason")
            if reason == "TERMINATE":
                processor.shard_ended(checkpointer)
            else:
                processor.lease_lost()
        else:
            raise ProtocolError(f"unknown action {action!r}")
        io.write({"action": "status", "responseFor": action})
