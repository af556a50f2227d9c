"""The wire loop, driven in-process with scripted daemon lines."""

import io

import orjson
import pytest

from orders_cdc.kcl.protocol import CheckpointError, KclError, ProtocolError, RecordProcessor, run


class Recorder(RecordProcessor):
    """Records calls; checkpoints at the end of each batch when asked to."""

    def __init__(self, checkpoint_on_batch=True, fail_on=None):
        self.calls = []
        self.errors = []
        self.checkpoint_on_batch = checkpoint_on_batch
        self.fail_on = fail_on

    def initialize(self, shard_id, sequence_number, sub_sequence_number):
        self.calls.append(("initialize", shard_id, sequence_number, sub_sequence_number))

    def process_records(self, records, millis_behind_latest, checkpointer):
        self.calls.append(("processRecords", [r["sequenceNumber"] for r in records], millis_behind_latest))
        if self.fail_on == "processRecords":
            raise RuntimeError("handler blew up")
        if self.checkpoint_on_batch and records:
            try:
                checkpointer.checkpoint(records[-1]["sequenceNumber"], 0)
            except CheckpointError as exc:
                self.errors.append(exc.error)

    def lease_lost(self):
        self.calls.append(("leaseLost",))

    def shard_ended(self, checkpointer):
        self.calls.append(("shardEnded",))
        checkpointer.checkpoint()

    def shutdown_requested(self, checkpointer):
        self.calls.append(("shutdownRequested",))
        checkpointer.checkpoint("3", 0)


def drive(processor, *messages):
    stdin = io.BytesIO(b"".join(orjson.dumps(m) + b"\n" for m in messages))
    stdout = io.BytesIO()
    error = None
    try:
        run(processor, stdin, stdout)
    except Exception as exc:  # noqa: BLE001 - the test inspects it
        error = exc
    return [orjson.loads(line) for line in stdout.getvalue().splitlines() if line.strip()], error


def record(seq):
    return {"data": "e30=", "partitionKey": "pk", "sequenceNumber": seq, "subSequenceNumber": 0,
            "approximateArrivalTimestamp": 1700000000000, "action": "record"}


def test_full_lifecycle_exact_replies():
    p = Recorder()
    out, error = drive(
        p,
        {"action": "initialize", "shardId": "shardId-000000000001", "sequenceNumber": "TRIM_HORIZON", "subSequenceNumber": 0},
        {"action": "processRecords", "records": [record("1"), record("2")], "millisBehindLatest": 7},
        {"action": "checkpoint", "sequenceNumber": "2", "subSequenceNumber": 0, "error": None},
        {"action": "shardEnded"},
        {"action": "checkpoint", "sequenceNumber": "SHARD_END", "subSequenceNumber": None, "error": None},
    )
    assert error is None
    assert out == [
        {"action": "status", "responseFor": "initialize"},
        {"action": "checkpoint", "sequenceNumber": "2", "subSequenceNumber": 0},
        {"action": "status", "responseFor": "processRecords"},
        {"action": "checkpoint", "sequenceNumber": None, "subSequenceNumber": None},
        {"action": "status", "responseFor": "shardEnded"},
    ]
    assert p.calls[0] == ("initialize", "shardId-000000000001", "TRIM_HORIZON", 0)
    assert p.calls[1] == ("processRecords", ["1", "2"], 7)


def test_checkpoint_error_is_raised_by_name():
    p = Recorder()
    out, error = drive(
        p,
        {"action": "processRecords", "records": [record("5")], "millisBehindLatest": 0},
        {"action": "checkpoint", "sequenceNumber": "5", "subSequenceNumber": 0, "error": "ThrottlingException"},
    )
    assert error is None
    assert p.errors == [KclError.THROTTLING]
    assert out[-1] == {"action": "status", "responseFor": "processRecords"}


def test_unknown_checkpoint_error_name_maps_to_unknown():
    assert KclError.parse("SomethingNewException") is KclError.UNKNOWN
    assert KclError.parse("ShutdownException") is KclError.SHUTDOWN


def test_non_checkpoint_reply_is_invalid_state():
    p = Recorder()
    _, error = drive(
        p,
        {"action": "processRecords", "records": [record("5")], "millisBehindLatest": 0},
        {"action": "shutdownRequested"},
    )
    assert error is None
    assert p.errors == [KclError.INVALID_STATE]


def test_processor_exception_is_not_acknowledged():
    """kclpy would log it and still send status; we must not."""
    p = Recorder(fail_on="processRecords")
    out, error = drive(
        p,
        {"action": "initialize", "shardId": "s", "sequenceNumber": "LATEST", "subSequenceNumber": 0},
        {"action": "processRecords", "records": [record("1")], "millisBehindLatest": 0},
        {"action": "leaseLost"},
    )
    assert isinstance(error, RuntimeError)
    assert out == [{"action": "status", "responseFor": "initialize"}]
    assert ("leaseLost",) not in p.calls


def test_lease_lost_gets_status_and_no_checkpoint():
    p = Recorder()
    out, error = drive(p, {"action": "leaseLost"})
    assert error is None
    assert out == [{"action": "status", "responseFor": "leaseLost"}]


def test_shutdown_requested_checkpoints_then_acknowledges():
    p = Recorder()
    out, _ = drive(
        p,
        {"action": "shutdownRequested"},
        {"action": "checkpoint", "sequenceNumber": "3", "subSequenceNumber": 0, "error": None},
    )
    assert out == [
        {"action": "checkpoint", "sequenceNumber": "3", "subSequenceNumber": 0},
        {"action": "status", "responseFor": "shutdownRequested"},
    ]


def test_blank_lines_are_skipped_and_unknown_action_is_an_error():
    stdin = io.BytesIO(b"\n  \n" + orjson.dumps({"action": "bogus"}) + b"\n")
    with pytest.raises(ProtocolError):
        run(Recorder(), stdin, io.BytesIO())


def test_stdin_closed_during_checkpoint_is_an_error():
    p = Recorder()
    _, error = drive(p, {"action": "processRecords", "records": [record("1")], "millisBehindLatest": 0})
    assert isinstance(error, ProtocolError)
