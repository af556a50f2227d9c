"""Fuzzing the whole record path: mutated and generated records through the production
routes (their handlers against in-memory clients, bench.fakes). Every record must end done,
skipped, a duplicate or dead-lettered, a dead letter must keep the record exactly as it
came, and nothing may escape as an exception."""

from __future__ import annotations

import base64
import json
from decimal import Decimal

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench.fakes import CallLog, FakeClients
from orders_cdc.app import Context
from orders_cdc.concurrency import InlinePool
from orders_cdc.deadletter import InMemoryDeadLetterSink
from orders_cdc.idempotency.memory import InMemoryIdempotencyStore
from orders_cdc.outcomes import Outcome
from orders_cdc.pipeline import Pipeline
from orders_cdc.retry import RetryPolicy
from orders_cdc.routing import Router
from orders_cdc.settings import Settings
from processors import all_routes
from tests.factories import kds_record, sequence_number
from tests.unit.test_pipeline import FakeClock

SETTINGS = Settings(region="us-east-1")
ORDER = {
    "order_id": "o-1", "status": "shipped", "customer_id": "c-1", "customer_email": "ann@example.com",
    "currency": "EUR", "total": Decimal("18.00"), "created_at": "2026-11-30T10:00:00+00:00",
    "tracking_number": "1Z1", "items": [{"product_id": "p-1", "name": "Mug", "quantity": Decimal(2),
                                         "unit_price": Decimal("9.00")}],
}
BASE = kds_record("MODIFY", new=ORDER, old={**ORDER, "status": "processing"}, keys={"order_id": "o-1"})

NUMBERS = st.sampled_from(["0", "-0", "1E+125", "9.9999999999999999999999999999999999999E+125", "1E+126", "1E-130",
                           "1E-131", "9" * 38, "9" * 39, "1" * 300, "NaN", "Infinity", "1e", "", " 1", "0x10"])
ODD_TEXT = st.text(alphabet=st.characters(codec="utf-8"), max_size=40) | st.sampled_from(
    ["\uffff", "\ufffe", "\u0000", "\u202e", "a" * 5000, "😀" * 100, "\ud7ff\ue000"])
LEAVES = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | ODD_TEXT
          | st.builds(lambda n: {"N": n}, NUMBERS) | st.builds(lambda s: {"S": s}, ODD_TEXT)
          | st.sampled_from([{"SS": []}, {"NS": ["1", "1"]}, {"B": "not base64!"}, {"BS": [5]}, {"L": {}},
                             {"M": []}, {"NULL": False}, {"BOOL": "yes"}, {"Q": "x"}, {}]))
VALUES = st.recursive(LEAVES, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(ODD_TEXT, inner, max_size=4),
                      max_leaves=12)


def paths(doc, prefix=()):
    yield prefix
    if isinstance(doc, dict):
        for key, value in doc.items():
            yield from paths(value, prefix + (key,))
    elif isinstance(doc, list):
        for i, value in enumerate(doc):
            yield from paths(value, prefix + (i,))


def replaced(doc, path, value):
    if not path:
        return value
    copy = dict(doc) if isinstance(doc, dict) else list(doc)
    copy[path[0]] = replaced(doc[path[0]], path[1:], value) if path[1:] else value
    return copy


def nested(depth):
    value = {"S": "leaf"}
    for _ in range(depth):
        value = {"M": {"a": value}}
    return value


@st.composite
def mutated_data(draw) -> bytes:
    """The Kinesis record's data: a valid change with one part of it replaced, or cut short,
    or something else entirely."""
    kind = draw(st.sampled_from(["replace", "replace", "replace", "truncate", "deep", "garbage"]))
    if kind == "truncate":
        raw = orjson.dumps(BASE)
        return raw[: draw(st.integers(0, len(raw) - 1))]
    if kind == "garbage":
        return draw(st.binary(max_size=200))
    doc = BASE
    if kind == "deep":
        doc = replaced(doc, ("dynamodb", "NewImage", "notes"), nested(draw(st.integers(100, 400))))
        return json.dumps(doc).encode()  # orjson refuses to write past 255 levels; a stream may carry them
    path = draw(st.sampled_from(list(paths(BASE))))
    return json.dumps(replaced(doc, path, draw(VALUES)), default=str).encode()


def kcl(data: bytes, n: int) -> dict:
    return {"action": "record", "data": base64.b64encode(data).decode(), "partitionKey": "k",
            "sequenceNumber": sequence_number(n), "subSequenceNumber": 0, "approximateArrivalTimestamp": 1_764_000_000_000}


def pipeline(dlq) -> Pipeline:
    clock = FakeClock()
    return Pipeline(router=Router(all_routes(SETTINGS.resources)), ctx=Context(SETTINGS, FakeClients(SETTINGS, CallLog())),
                    dead_letters=dlq, retry=RetryPolicy(max_attempts=2, base_seconds=0, max_seconds=0),
                    sleep=clock.sleep, clock=clock, idempotency=InMemoryIdempotencyStore(), pool=InlinePool())


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(mutated_data(), min_size=1, max_size=6))
def test_any_record_ends_settled_and_a_dead_letter_keeps_it_whole(datas):
    dlq = InMemoryDeadLetterSink()
    records = [kcl(orjson.dumps(BASE), 1)] + [kcl(data, n) for n, data in enumerate(datas, 2)]
    results = pipeline(dlq).process(records, "shardId-000000000000")
    assert len(results) == len(records)
    assert results[0].outcome is Outcome.DONE, "the good record beside them is done"
    assert all(r.outcome in (Outcome.DONE, Outcome.SKIPPED, Outcome.DUPLICATE, Outcome.DEAD_LETTERED) for r in results)
    lettered = {r.sequence_number for r in results if r.outcome is Outcome.DEAD_LETTERED}
    assert {letter.sequence_number for letter in dlq.letters} == lettered
    by_sequence = {record["sequenceNumber"]: record for record in records}
    for letter in dlq.letters:
        assert letter.record == by_sequence[letter.sequence_number], "the whole record, as it came"
        assert letter.reason
        letter.to_json()  # serialisable, whatever the record held
