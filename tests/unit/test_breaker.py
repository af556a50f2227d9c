"""Failure isolation: the circuit breaker, outages vs bad records, the batch deadline and
the handler-call deadline. Time is a fake clock that moves only when the pipeline sleeps."""

from __future__ import annotations

import threading

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError

from orders_cdc.breaker import BreakerPolicy, CircuitBreaker, State
from orders_cdc.concurrency import CallPool, InlinePool
from orders_cdc.deadletter import InMemoryDeadLetterSink
from orders_cdc.errors import (
    DeferredError, FatalProcessingError, HandlerTimeout, PartialBatchFailure, PermanentError, RetryableError, SettingsError,
    classify, is_retryable,
)
from orders_cdc.idempotency.memory import InMemoryIdempotencyStore
from orders_cdc.pipeline import Outcome, Pipeline
from orders_cdc.retry import RetryPolicy
from orders_cdc.routing import Route, Router
from orders_cdc.settings import load
from tests.factories import kcl_record, kds_record, sequence_number
from tests.unit.test_pipeline import FakeClock


def test_distinct_records_failing_in_a_row_open_the_circuit():
    clock = FakeClock()
    b = CircuitBreaker("email", BreakerPolicy(threshold=3, open_seconds=1, max_open_seconds=4), clock)
    b.record(0, ["r1", "r2"])
    b.record(0, ["r1", "r2"])
    assert b.state is State.CLOSED, "the same records again are not evidence of an outage"
    b.record(0, ["r3"])
    assert b.state is State.OPEN and b.allowance() == 0 and b.ready_at == clock.now + 1


def test_a_success_resets_the_streak():
    b = CircuitBreaker("email", BreakerPolicy(threshold=3), FakeClock())
    b.record(0, ["r1", "r2"])
    b.record(1, [])
    b.record(0, ["r3", "r4"])
    assert b.state is State.CLOSED


def test_half_open_probes_once_and_backs_off_exponentially_up_to_the_maximum():
    clock = FakeClock()
    b = CircuitBreaker("email", BreakerPolicy(threshold=1, open_seconds=1, max_open_seconds=4), clock)
    b.record(0, ["r1"])
    waits = []
    for _ in range(4):
        waits.append(b.ready_at - clock.now)
        clock.sleep(b.ready_at - clock.now)
        assert b.allowance() == 1 and b.state is State.HALF_OPEN
        b.record(0, ["r1"])  # the probe fails
    assert waits == [1, 2, 4, 4]
    clock.sleep(4)
    assert b.allowance() == 1
    b.record(1, [])
    assert b.state is State.CLOSED and b.allowance() is None
    b.record(0, ["r9"])
    assert b.ready_at - clock.now == 1, "closing resets the backoff"


# ---------------------------------------------------------------------------------------------
# Outages through the pipeline


def shipped(n):
    order_id = f"o-{n}"
    return kds_record("MODIFY", new={"order_id": order_id, "status": "shipped"},
                      old={"order_id": order_id, "status": "processing"}, keys={"order_id": order_id})


def records(count, start=1):
    return [kcl_record(shipped(n), sequence_number(n)) for n in range(start, start + count)]


class FlakySes:
    """SendEmail per change; down (5xx or connection refused) until `down_until`."""

    def __init__(self, clock, down_until, error="5xx", bad=()):
        self.clock, self.down_until, self.error, self.bad = clock, down_until, error, set(bad)
        self.sent: list[str] = []
        self.calls = 0

    def __call__(self, changes, ctx):
        failures = {}
        for j, c in enumerate(changes):
            self.calls += 1
            order_id = c.keys["order_id"]
            if self.clock() < self.down_until:
                failures[j] = (ClientError({"Error": {"Code": "ServiceUnavailable", "Message": "down"},
                                            "ResponseMetadata": {"HTTPStatusCode": 503}}, "SendEmail")
                               if self.error == "5xx" else EndpointConnectionError(endpoint_url="https://email"))
            elif order_id in self.bad:
                failures[j] = KeyError("customer_email")  # a bug this record triggers
            else:
                self.sent.append(order_id)
        if failures:
            raise PartialBatchFailure(failures)


def email_pipeline(ses, clock, dlq, **kw):
    return Pipeline(router=Router([Route("email", "Orders", ses)]), ctx=None, dead_letters=dlq,
                    retry=RetryPolicy(max_attempts=5, base_seconds=0.2, max_seconds=5.0),
                    sleep=clock.sleep, clock=clock, pool=InlinePool(),
                    idempotency=InMemoryIdempotencyStore(lock_seconds=90), **kw)


@pytest.mark.parametrize("error", ["5xx", "connection"])
@pytest.mark.parametrize("count", [1, 3, 40])
def test_a_30_second_email_outage_dead_letters_nothing_and_sends_each_email_once(count, error):
    clock, dlq = FakeClock(), InMemoryDeadLetterSink()
    ses = FlakySes(clock, down_until=clock.now + 30, error=error)
    results = email_pipeline(ses, clock, dlq).process(records(count), "s")
    assert {r.outcome for r in results} == {Outcome.DONE}
    assert dlq.letters == []
    assert sorted(ses.sent) == sorted(f"o-{n}" for n in range(1, count + 1)), "each email exactly once"
    assert 30 <= clock.now - 1_900_000_000 < 70, "recovered soon after the outage, well inside the deadline"
    # Before the circuit opens: one round's worth (a round starts all its calls at once: every
    # record) when >= 5 records fail, else each of the few records spends its 5 attempts.
    # Then single probes, then the rest.
    before_open = count if count >= 5 else 5 * count
    assert ses.calls <= before_open + 6 + count, "probing, not hammering the downstream"


def test_an_outage_spanning_batches_keeps_the_circuit_open_into_the_next_batch():
    clock, dlq = FakeClock(), InMemoryDeadLetterSink()
    ses = FlakySes(clock, down_until=clock.now + 30)
    p = email_pipeline(ses, clock, dlq, batch_deadline_seconds=20)
    with pytest.raises(FatalProcessingError, match="unsettled after 20s"):
        p.process(records(10), "s")
    assert dlq.letters == [] and ses.sent == []
    assert p.breaker_for(Route("email", "Orders", ses)).state is State.OPEN
    results = p.process(records(10), "s")  # the daemon redelivers from the checkpoint
    assert {r.outcome for r in results} == {Outcome.DONE} and len(ses.sent) == 10 and not dlq.letters


def test_a_bad_record_among_good_ones_is_dead_lettered_and_the_circuit_stays_closed():
    clock, dlq = FakeClock(), InMemoryDeadLetterSink()
    ses = FlakySes(clock, down_until=0, bad={"o-2"})
    p = email_pipeline(ses, clock, dlq)
    results = p.process(records(4), "s")
    assert [r.outcome for r in results] == [Outcome.DONE, Outcome.DEAD_LETTERED, Outcome.DONE, Outcome.DONE]
    assert dlq.letters[0].attempts == 5 and dlq.letters[0].error_type == "KeyError"
    assert p.breaker_for(Route("email", "Orders", ses)).state is State.CLOSED


def test_a_transient_failure_of_one_record_is_dead_lettered_once_the_route_is_seen_working():
    """Outage-type errors from one record only: once other records succeed, the record is
    the problem, and its bounded attempts apply."""
    clock, dlq = FakeClock(), InMemoryDeadLetterSink()

    def throttled_for_o1(changes, ctx):
        failures = {j: ClientError({"Error": {"Code": "Throttling", "Message": "x"}}, "SendEmail")
                    for j, c in enumerate(changes) if c.keys["order_id"] == "o-1"}
        if failures:
            raise PartialBatchFailure(failures)

    p = Pipeline(router=Router([Route("email", "Orders", throttled_for_o1)]), ctx=None, dead_letters=dlq,
                 retry=RetryPolicy(max_attempts=3, base_seconds=0.2), sleep=clock.sleep, clock=clock, pool=InlinePool())
    results = p.process(records(3), "s")
    assert [r.outcome for r in results] == [Outcome.DEAD_LETTERED, Outcome.DONE, Outcome.DONE]
    assert dlq.letters[0].attempts == 3


def test_a_downstream_that_never_recovers_ends_the_call_before_the_daemon_timeout():
    clock, dlq = FakeClock(), InMemoryDeadLetterSink()
    ses = FlakySes(clock, down_until=float("inf"))
    started = clock.now
    with pytest.raises(FatalProcessingError, match="unsettled after 240s"):
        email_pipeline(ses, clock, dlq).process(records(5), "s")
    assert clock.now - started <= 240, "never past the bound (daemon timeoutInSeconds is 300)"
    assert dlq.letters == [], "an outage is not the records' fault"


def test_other_routes_finish_while_one_is_down():
    clock, dlq = FakeClock(), InMemoryDeadLetterSink()
    ses = FlakySes(clock, down_until=clock.now + 10)
    copied = []
    p = Pipeline(router=Router([Route("email", "Orders", ses), Route("copy", "Orders", lambda cs, ctx: copied.extend(cs))]),
                 ctx=None, dead_letters=dlq, retry=RetryPolicy(), sleep=clock.sleep, clock=clock, pool=InlinePool())
    results = p.process(records(6), "s")
    assert len(copied) == 6 and {r.outcome for r in results} == {Outcome.DONE}
    assert len(ses.sent) == 6 and not dlq.letters


# ---------------------------------------------------------------------------------------------
# The handler-call deadline


def test_a_hung_call_times_out_and_is_retried():
    release = threading.Event()
    calls = []

    def hangs_first(changes, ctx):
        calls.append(1)
        if len(calls) == 1:
            release.wait(30)

    clock, dlq = FakeClock(), InMemoryDeadLetterSink()
    p = Pipeline(router=Router([Route("copy", "Orders", hangs_first)]), ctx=None, dead_letters=dlq,
                 retry=RetryPolicy(base_seconds=0, max_seconds=0), sleep=clock.sleep, clock=clock,
                 pool=CallPool(), handler_timeout_seconds=0.05)
    try:
        results = p.process(records(1), "s")
    finally:
        release.set()
    assert [r.outcome for r in results] == [Outcome.DONE] and len(calls) == 2 and not dlq.letters


class RecordingPool(InlinePool):
    def __init__(self):
        self.seen = []

    def run(self, calls, timeout, time_left):
        self.seen.append((timeout, time_left))
        return super().run(calls, timeout, time_left)


def test_the_pool_is_given_the_call_timeout_and_what_is_left_of_the_batch_deadline():
    clock, pool = FakeClock(), RecordingPool()
    p = Pipeline(router=Router([Route("copy", "Orders", lambda cs, ctx: clock.sleep(50))]), ctx=None,
                 dead_letters=InMemoryDeadLetterSink(), sleep=clock.sleep, clock=clock, pool=pool,
                 handler_timeout_seconds=60, batch_deadline_seconds=100)
    p.process(records(1), "s")
    p.process(records(1, start=5), "s")
    assert pool.seen == [(60, 100), (60, 100)]


# ---------------------------------------------------------------------------------------------
# Settings


def test_failure_isolation_settings_and_their_defaults():
    base = {"AWS_REGION": "us-east-1"}
    s = load(base)
    assert (s.handler_timeout_seconds, s.batch_deadline_seconds, s.idempotency_lock_seconds, s.idempotency_ttl_seconds,
            s.breaker_threshold, s.breaker_open_seconds, s.breaker_max_open_seconds) == (60, 240, 90, 604800, 5, 1, 30)
    s = load({**base, "ORDERS_CDC_BREAKER_THRESHOLD": "10", "ORDERS_CDC_BATCH_DEADLINE_SECONDS": "120"})
    assert (s.breaker_threshold, s.batch_deadline_seconds) == (10, 120)
    with pytest.raises(SettingsError, match="must exceed ORDERS_CDC_HANDLER_TIMEOUT_SECONDS") as info:
        load({**base, "ORDERS_CDC_HANDLER_TIMEOUT_SECONDS": "120"})
    assert "\n" not in str(info.value)
    with pytest.raises(SettingsError, match="ORDERS_CDC_BREAKER_THRESHOLD='0' must be >= 1"):
        load({**base, "ORDERS_CDC_BREAKER_THRESHOLD": "0"})


# ---------------------------------------------------------------------------------------------
# The dead-letter sink (SQS limits, partial failures)


class FakeSqs:
    def __init__(self, refuse=()):
        self.refuse = list(refuse)  # per call: ids to refuse
        self.bodies: list[str] = []
        self.calls = []

    def send_message_batch(self, QueueUrl, Entries):
        refuse = self.refuse.pop(0) if self.refuse else set()
        self.calls.append(len(Entries))
        self.bodies += [e["MessageBody"] for e in Entries if e["Id"] not in refuse]
        return {"Failed": [{"Id": i, "Code": "InternalError", "Message": "x", "SenderFault": False} for i in refuse]}


def letter(n, data="eA=="):
    from orders_cdc.deadletter import DeadLetter

    return DeadLetter(record={"data": data, "sequenceNumber": str(n)}, shard_id="s", sequence_number=str(n),
                      sub_sequence_number=0, reason="bad", error_type="PermanentError", attempts=1)


def test_dead_letters_fit_sqs_limits_and_refused_ones_are_resent_alone():
    import orjson

    from orders_cdc.deadletter import SqsDeadLetterSink

    sqs = FakeSqs(refuse=[{"1"}])
    big = letter(99, data="A" * 1_400_000)  # a 1 MiB Kinesis record, base64
    SqsDeadLetterSink(sqs, "url").send([letter(n) for n in range(12)] + [big])  # no bucket: sent without data
    assert sqs.calls == [10, 1, 3], "10 per call; the refused entry alone; then the rest"
    bodies = [orjson.loads(b) for b in sqs.bodies]
    assert sorted(int(b["sequence_number"]) for b in bodies) == list(range(12)) + [99]
    [truncated] = [b for b in bodies if b["sequence_number"] == "99"]
    assert truncated["record_truncated"] is True and "data" not in truncated["record"]
    assert all(len(b) <= 1024 * 1024 for b in sqs.bodies)


class FakeS3:
    def __init__(self):
        self.objects = {}

    def put_object(self, Bucket, Key, Body, ContentType):
        self.objects[Bucket, Key] = Body


def test_a_dead_letter_too_big_for_a_message_is_kept_whole_in_s3_and_the_message_points_at_it():
    import orjson

    from orders_cdc.deadletter import SqsDeadLetterSink

    sqs, s3 = FakeSqs(), FakeS3()
    big = letter(7, data="A" * 1_400_000)
    SqsDeadLetterSink(sqs, "url", s3, "dead-letters-bucket").send([letter(1), big])
    small, pointer = (orjson.loads(b) for b in sqs.bodies)
    assert "record_s3" not in small and small["record"]["data"] == "eA=="
    assert pointer["record_s3"] == {"bucket": "dead-letters-bucket", "key": "dead-letters/s/7-0.json"}
    assert "data" not in pointer["record"] and "record_truncated" not in pointer
    stored = orjson.loads(s3.objects["dead-letters-bucket", "dead-letters/s/7-0.json"])
    assert stored["record"] == big.record and stored["reason"] == big.reason, "the whole letter, record and all"


def test_a_retried_send_does_not_resend_delivered_letters():
    from orders_cdc.deadletter import SqsDeadLetterSink

    sqs = FakeSqs(refuse=[{"0"}, {"0"}, {"0"}])
    sink = SqsDeadLetterSink(sqs, "url")
    with pytest.raises(RuntimeError, match="refused 1 message"):
        sink.send([letter(1), letter(2)])
    sink.send([letter(1), letter(2)])
    assert len(sqs.bodies) == 2, "letter 2 went out once"


def test_a_hung_handler_thread_does_not_keep_the_child_alive():
    import subprocess
    import sys

    script = (
        "import threading\n"
        "from orders_cdc.concurrency import Call, CallPool\n"
        "from orders_cdc.errors import HandlerTimeout\n"
        "[result] = CallPool().run([Call(lambda: threading.Event().wait())], 0.01, 60)\n"
        "print('timed out' if isinstance(result, HandlerTimeout) else result)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)
    assert (proc.returncode, proc.stdout.strip()) == (0, b"timed out")


def test_characters_sqs_refuses_are_escaped_and_the_letter_still_decodes_to_the_same_record():
    import orjson

    from orders_cdc.deadletter import SqsDeadLetterSink
    from orders_cdc.sqs import json_body

    sqs = FakeSqs()
    odd = letter(1, data="eA==")
    odd = type(odd)(**{**{f: getattr(odd, f) for f in odd.__dataclass_fields__},
                       "record": {"data": "eA==", "sequenceNumber": "1", "partitionKey": "k\uffff\ufffe"},
                       "reason": "attribute 'n\uffff' is not a number"})
    SqsDeadLetterSink(sqs, "url").send([odd])
    [body] = sqs.bodies
    assert "\uffff" not in body and "\ufffe" not in body and "\\uffff" in body
    assert orjson.loads(body)["record"]["partitionKey"] == "k\uffff\ufffe", "the same record, escaped on the wire"
    assert json_body("é ✓ 😀 \t\n".encode()) == "é ✓ 😀 \t\n", "what SQS accepts is left as it is"


def refusal(code, status=400):
    return ClientError({"Error": {"Code": code, "Message": "refused"}, "ResponseMetadata": {"HTTPStatusCode": status}},
                       "SendEmail")


@pytest.mark.parametrize("error", [refusal("AccountSendingPausedException"), refusal("AccessDeniedException"),
                                   refusal("AWS.SimpleQueueService.NonExistentQueue"), refusal("Anything", 403)])
def test_a_refusal_no_record_can_fix_holds_the_route_and_dead_letters_nothing(error):
    """An account paused, a permission or a queue missing: 20 records used to be dead-lettered
    in one pass. Now the route is held (probed) until it works again, spending no attempts."""
    clock, dlq = FakeClock(), InMemoryDeadLetterSink()
    refused_until = clock.now + 20
    sent = []

    def ses(change, ctx):
        if clock() < refused_until:
            raise error
        sent.append(change.keys["order_id"])

    p = Pipeline(router=Router([Route("email", "Orders", ses, per_change=True)]), ctx=None, dead_letters=dlq,
                 retry=RetryPolicy(max_attempts=2), sleep=clock.sleep, clock=clock, pool=InlinePool(),
                 idempotency=InMemoryIdempotencyStore())
    results = p.process(records(20), "s")
    assert dlq.letters == [] and {r.outcome for r in results} == {Outcome.DONE}
    assert sorted(sent) == sorted(f"o-{n}" for n in range(1, 21))


def test_a_refusal_that_lasts_ends_the_batch_unacknowledged_not_in_the_dead_letter_queue():
    clock, dlq = FakeClock(), InMemoryDeadLetterSink()

    def ses(change, ctx):
        raise refusal("AccountSendingPausedException")

    p = Pipeline(router=Router([Route("email", "Orders", ses, per_change=True)]), ctx=None, dead_letters=dlq,
                 retry=RetryPolicy(max_attempts=2), sleep=clock.sleep, clock=clock, pool=InlinePool(),
                 idempotency=InMemoryIdempotencyStore(), batch_deadline_seconds=120)
    with pytest.raises(FatalProcessingError, match="20 record"):
        p.process(records(20), "s")
    assert dlq.letters == []
    assert p.breaker_for(Route("email", "Orders", ses)).state is not State.CLOSED


@pytest.mark.parametrize(("exc", "expected"), [
    (refusal("ThrottlingException"), "transient"),
    (refusal("InternalFailure", 500), "transient"),
    (refusal("Whatever", 503), "transient"),
    (refusal("AccountSendingPausedException"), "refused"),
    (refusal("ResourceNotFoundException"), "refused"),
    (refusal("UnrecognizedClientException"), "refused"),
    (refusal("Whatever", 403), "refused"),
    (refusal("MessageRejected"), "permanent"),
    (refusal("ValidationException"), "permanent"),
    (EndpointConnectionError(endpoint_url="https://email"), "transient"),
    (KeyError("x"), "unknown"),
    (ValueError("x"), "permanent"),
    (PermanentError("x"), "permanent"),
    (RetryableError("x"), "transient"),
    (HandlerTimeout("x"), "transient"),
    (DeferredError("x"), "deferred"),
])
def test_one_classifier_sorts_every_failure(exc, expected):
    assert classify(exc).value == expected
    assert is_retryable(exc) is (expected != "permanent")


SES_TEXTS = [  # what SES says, recipient and all
    ("MessageRejected", "Email address is not verified. The following identities failed the check in region "
                        "US-EAST-1: ann.o'neil+orders@example.co.uk"),
    ("MessageRejected", "Illegal address: nobody@"),
    ("InvalidParameterValue", "Missing final '@domain' in bob.smith@mail.example.com>"),
]


@pytest.mark.parametrize(("code", "text"), SES_TEXTS)
def test_no_email_address_reaches_the_logs_or_the_dead_letter_reason(code, text, caplog):
    import logging

    clock, dlq = FakeClock(), InMemoryDeadLetterSink()

    def ses(change, ctx):
        raise ClientError({"Error": {"Code": code, "Message": text},
                           "ResponseMetadata": {"HTTPStatusCode": 400, "RequestId": "req-1"}}, "SendEmail")

    p = Pipeline(router=Router([Route("email", "Orders", ses, per_change=True)]), ctx=None, dead_letters=dlq,
                 sleep=clock.sleep, clock=clock, pool=InlinePool(), idempotency=InMemoryIdempotencyStore())
    with caplog.at_level(logging.DEBUG):
        [result] = p.process(records(1), "s")
    assert result.outcome is Outcome.DEAD_LETTERED
    [letter] = dlq.letters
    assert letter.reason.startswith(f"SendEmail: {code} (request req-1): ")
    logged = " ".join(f"{r.getMessage()} {r.__dict__}" for r in caplog.records)
    for leaked in ("ann.o'neil", "+orders@example.co.uk", "bob.smith@mail.example.com"):
        assert leaked not in letter.reason and leaked not in logged
    assert "req-1" in logged, "the request id is logged instead"
