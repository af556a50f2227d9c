"""EMF documents: what a batch emits (per shard, per route, ChildStarts), checked against the
EMF specification, and the record-level log lines (shard, sequence, order id, route, outcome)."""

from __future__ import annotations

import io
import json
import logging

import jsonschema
import pytest
from botocore.exceptions import ClientError

from orders_cdc.checkpointing import CheckpointPolicy
from orders_cdc.consumer import ChangeProcessor
from orders_cdc.deadletter import InMemoryDeadLetterSink
from orders_cdc.errors import PermanentError, RetryableError
from orders_cdc.metrics import MAX_VALUES, emf, quantiles
from orders_cdc.routing import Route
from tests.factories import kds_record, sequence_number
from tests.unit.test_checkpointing import ScriptedCheckpointer
from tests.unit.test_pipeline import FakeClock, batch, order, pipeline

# The EMF specification (CloudWatch_Embedded_Metric_Format_Specification), as a JSON schema:
# a root object with _aws.{Timestamp, CloudWatchMetrics}; each directive a Namespace, up to
# 30 dimension names per set, at most 100 metric definitions with names of 1-255 characters
# and units from CloudWatch's list.
UNITS = ["Seconds", "Microseconds", "Milliseconds", "Bytes", "Kilobytes", "Megabytes", "Gigabytes", "Terabytes",
         "Bits", "Kilobits", "Megabits", "Gigabits", "Terabits", "Percent", "Count", "Bytes/Second",
         "Kilobytes/Second", "Megabytes/Second", "Gigabytes/Second", "Terabytes/Second", "Bits/Second",
         "Kilobits/Second", "Megabits/Second", "Gigabits/Second", "Terabits/Second", "Count/Second", "None"]
EMF_SCHEMA = {
    "type": "object",
    "required": ["_aws"],
    "properties": {
        "_aws": {
            "type": "object",
            "required": ["Timestamp", "CloudWatchMetrics"],
            "properties": {
                "Timestamp": {"type": "integer", "minimum": 0},
                "CloudWatchMetrics": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["Namespace", "Dimensions", "Metrics"],
                        "additionalProperties": False,
                        "properties": {
                            "Namespace": {"type": "string", "minLength": 1, "maxLength": 255},
                            "Dimensions": {"type": "array", "items": {
                                "type": "array", "maxItems": 30,
                                "items": {"type": "string", "minLength": 1, "maxLength": 250}}},
                            "Metrics": {"type": "array", "maxItems": 100, "items": {
                                "type": "object", "required": ["Name"], "additionalProperties": False,
                                "properties": {"Name": {"type": "string", "minLength": 1, "maxLength": 255},
                                               "Unit": {"enum": UNITS},
                                               "StorageResolution": {"enum": [1, 60]}}}},
                        },
                    },
                },
            },
        },
    },
}


def check_emf(doc: dict) -> None:
    """The schema, plus what a schema cannot say: every dimension and metric a directive
    names is a member of the root; dimension values are strings of 1-1024 characters;
    metric values are numbers or arrays of at most 100 numbers."""
    jsonschema.validate(doc, EMF_SCHEMA)
    for directive in doc["_aws"]["CloudWatchMetrics"]:
        for dimension in {d for dims in directive["Dimensions"] for d in dims}:
            assert isinstance(doc.get(dimension), str) and 1 <= len(doc[dimension]) <= 1024, dimension
        for metric in directive["Metrics"]:
            value = doc[metric["Name"]]
            values = value if isinstance(value, list) else [value]
            assert len(values) <= MAX_VALUES
            assert all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values), metric


def documents(capsys) -> list[dict]:
    return [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith('{"_aws"')]


def by_route(docs) -> dict[str, dict]:
    return {d["Route"]: d for d in docs if "Route" in d}


class Flaky:
    """Fails each order's first call with a retryable error (an outage's kind), then works."""

    def __init__(self):
        self.failed = set()

    def __call__(self, changes, ctx):
        first = [c for c in changes if c.keys["order_id"] not in self.failed]
        if first:
            self.failed.update(c.keys["order_id"] for c in first)
            raise RetryableError("downstream 503")


def bad(changes, ctx):
    raise PermanentError("rejected")


def test_a_batch_emits_one_shard_document_and_one_per_route_with_each_outcome(capsys):
    clock = FakeClock()
    p = pipeline([Route("orders.flaky", "Orders", Flaky()), Route("orders.bad", "Orders", bad,
                                                                   when=lambda c: c.keys["order_id"] == "o-3")],
                 clock=clock)
    processor = ChangeProcessor(p, CheckpointPolicy)
    processor.initialize("shardId-000000000001", "TRIM_HORIZON", None)
    records = batch(order("o-1", "shipped", "processing"), order("o-2", "pending", event="INSERT"),
                    order("o-3", "shipped", "processing"))
    records.append({**records[0], "data": "%%% not base64", "sequenceNumber": sequence_number(9)})  # no route
    processor.process_records(records, 1500, ScriptedCheckpointer(None))
    docs = documents(capsys)
    for doc in docs:
        check_emf(doc)

    assert docs[0]["ChildStarts"] == 1 and docs[0]["Shard"] == "shardId-000000000001"
    shard = [d for d in docs if "Records" in d]
    assert len(shard) == 1 and len(docs) == 4, "one ChildStarts, one shard document and one per route"
    assert shard[0]["Records"] == 4 and shard[0]["MillisBehindLatest"] == 1500
    assert shard[0]["DeadLettered"] == 2  # o-3 (route bad) and the undecodable record

    routes = by_route(docs)
    flaky, bad_route = routes["orders.flaky"], routes["orders.bad"]
    assert flaky["_aws"]["CloudWatchMetrics"][0]["Dimensions"] == [["Shard", "Route"], ["Route"]]
    assert (flaky["RecordsIn"], flaky["Done"], flaky["Retried"], flaky["DeadLettered"]) == (3, 3, 3, 0)
    assert flaky["HandlerCalls"] == 2 and len(flaky["HandlerLatency"]) == 2  # the failing call and the retry
    assert all(v >= 0 for v in flaky["HandlerLatency"])
    units = {m["Name"]: m.get("Unit") for m in flaky["_aws"]["CloudWatchMetrics"][0]["Metrics"]}
    assert units["HandlerLatency"] == "Milliseconds" and units["Retried"] == "Count"
    assert (bad_route["RecordsIn"], bad_route["Done"], bad_route["DeadLettered"], bad_route["Retried"]) == (1, 0, 1, 0)


def test_an_outage_counts_one_circuit_opening_and_one_closing(capsys):
    from orders_cdc.breaker import BreakerPolicy

    class Outage:
        """Fails every call until it has failed three times, then works."""

        def __init__(self):
            self.failures = 0

        def __call__(self, changes, ctx):
            if self.failures < 3:
                self.failures += 1
                raise RetryableError("service unavailable")

    p = pipeline([Route("orders.down", "Orders", Outage(), max_batch=1)], attempts=10,
                 breaker=BreakerPolicy(threshold=2, open_seconds=1.0))
    processor = ChangeProcessor(p, CheckpointPolicy)
    processor.initialize("shardId-000000000002", "TRIM_HORIZON", None)
    processor.process_records(batch(order("o-1", "shipped", "processing"), order("o-2", "shipped", "processing")),
                              0, ScriptedCheckpointer(None))
    [doc] = [d for d in documents(capsys) if d.get("Route") == "orders.down"]
    check_emf(doc)
    assert (doc["CircuitOpened"], doc["CircuitClosed"], doc["Done"]) == (1, 1, 2)
    assert doc["Retried"] == 3


def test_duplicates_and_stale_changes_are_counted_per_route(capsys):
    from orders_cdc.outcomes import Outcome, RecordResult
    from orders_cdc.metrics import route_metrics

    results = [RecordResult("1", 0, Outcome.DONE, routes=(("a", Outcome.DONE), ("b", Outcome.STALE))),
               RecordResult("2", 0, Outcome.DUPLICATE, routes=(("a", Outcome.DUPLICATE), ("b", Outcome.DUPLICATE)))]
    metrics = route_metrics(results, {}, {"a": [5.0]})
    assert metrics["a"] == {"RecordsIn": 2, "Done": 1, "Duplicate": 1, "Stale": 0, "DeadLettered": 0, "Retried": 0,
                            "HandlerCalls": 1, "CircuitOpened": 0, "CircuitClosed": 0, "HandlerLatency": [5.0]}
    assert (metrics["b"]["Stale"], metrics["b"]["Duplicate"], metrics["b"]["HandlerCalls"]) == (1, 1, 0)
    assert "HandlerLatency" not in metrics["b"]


def test_many_calls_keep_their_distribution_in_at_most_100_values(capsys):
    values = [float(i) for i in range(1, 1001)]
    kept = quantiles(values)
    assert len(kept) == MAX_VALUES and kept[0] == 1.0 and kept[-1] == 1000.0
    assert abs(kept[49] - 500) <= 10  # the median survives
    assert quantiles(values[:7]) == values[:7]
    with pytest.raises(ValueError, match="at most 100"):
        emf({"HandlerLatency": values}, {"Route": "r"})
    with pytest.raises(ValueError, match="at most 100"):
        emf({f"M{i}": 1 for i in range(101)}, {"Route": "r"})


def test_child_starts_document_is_valid_emf():
    out = io.StringIO()
    from orders_cdc.metrics import child_started

    child_started("shardId-000000000007", stream=out)
    doc = json.loads(out.getvalue())
    check_emf(doc)
    assert doc["ChildStarts"] == 1 and doc["_aws"]["CloudWatchMetrics"][0]["Namespace"] == "OrdersCdc"
    assert doc["_aws"]["CloudWatchMetrics"][0]["Dimensions"] == [["Shard"]]


# -- record-level log lines -------------------------------------------------------------------

RECORD_FIELDS = ("shard", "sequence", "order_id", "route", "outcome")
SES_REJECTED = ClientError(
    {"Error": {"Code": "MessageRejected",
               "Message": "Email address is not verified. The following identities failed the check in region "
                          "US-EAST-1: jane.doe+orders@example.com"},
     "ResponseMetadata": {"RequestId": "5f1d-rid", "HTTPStatusCode": 400}},
    "SendEmail")


def test_every_record_level_line_names_shard_sequence_order_route_and_outcome_and_no_customer_data(caplog):
    caplog.set_level(logging.DEBUG, logger="orders_cdc")

    def rejects(change, ctx):
        raise SES_REJECTED

    def once(changes, ctx, seen=set()):
        if not seen:
            seen.add(1)
            raise RetryableError("Throttled for jane.doe+orders@example.com")

    p = pipeline([Route("notification.shipped_email", "Orders", rejects, per_change=True),
                  Route("analytics.copy", "Orders", once)])
    p.process(batch(kds_record("MODIFY", new={"order_id": "o-9", "status": "shipped",
                                                  "customer_email": "jane.doe+orders@example.com",
                                                  "shipping_address": "221B Baker Street"},
                                   old={"order_id": "o-9", "status": "processing"}, keys={"order_id": "o-9"})),
              "shardId-000000000003")
    broken = batch(order("o-1", "pending", event="INSERT"))[0]
    p.process([{**broken, "data": "%%% not base64", "sequenceNumber": sequence_number(5)}], "shardId-000000000003")

    lines = [r for r in caplog.records if r.getMessage() in ("change failed", "record dead-lettered")]
    outcomes = {(r.getMessage(), r.route, r.outcome) for r in lines}
    assert outcomes == {("change failed", "notification.shipped_email", "dead_letter"),
                        ("change failed", "analytics.copy", "retry"),
                        ("record dead-lettered", "notification.shipped_email", "dead_lettered"),
                        ("record dead-lettered", None, "dead_lettered")}
    for r in lines:
        for name in RECORD_FIELDS:
            assert hasattr(r, name), (r.getMessage(), name)
        assert r.shard == "shardId-000000000003"
    decoded = [r for r in lines if r.route is not None]
    assert {r.order_id for r in decoded} == {"o-9"} and {r.sequence for r in decoded} == {sequence_number(1)}
    broken = next(r for r in lines if r.route is None)
    assert broken.order_id is None and broken.sequence == sequence_number(5)
    # The text of every line, its extra fields included, as the JSON formatter would write it.
    text = " ".join(json.dumps(vars(r), default=str) for r in caplog.records)
    assert "jane.doe" not in text and "Baker Street" not in text
    assert "MessageRejected" in text and "5f1d-rid" in text


def test_handlers_record_level_lines_carry_the_same_fields(caplog):
    from orders_cdc.change import decode_kcl_record
    from processors import metrics as metrics_route, notification

    caplog.set_level(logging.INFO, logger="processors")
    [raw] = batch(kds_record("MODIFY", new={"order_id": "o-4", "status": "shipped", "shipping_address": "1 Main St"},
                             old={"order_id": "o-4", "status": "processing"}, keys={"order_id": "o-4"}))
    change = decode_kcl_record(raw, "shardId-000000000004")
    notification.send_shipped(change, ctx=None)  # no address: nothing sent
    metrics_route.deltas(change)  # no created_at: not counted
    lines = {r.getMessage(): r for r in caplog.records}
    sent, counted = lines["no email address: shipped email not sent"], lines["order without created_at is not counted"]
    assert [(r.shard, r.sequence, r.order_id, r.route, r.outcome) for r in (sent, counted)] == [
        ("shardId-000000000004", sequence_number(1), "o-4", "notification.shipped_email", "not_sent"),
        ("shardId-000000000004", sequence_number(1), "o-4", "metrics.aggregates", "not_counted")]
    assert "Main St" not in json.dumps([vars(r) for r in caplog.records], default=str)
