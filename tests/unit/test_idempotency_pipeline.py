"""The pipeline with an idempotency store: each reaction at most once per (route, change),
across redeliveries, duplicates inside a batch, other workers' locks, crashes, timeouts."""

from __future__ import annotations

import threading
import uuid
from decimal import Decimal

import pytest

from orders_cdc.concurrency import CallPool, InlinePool
from orders_cdc.counters import CounterUpdate
from orders_cdc.deadletter import InMemoryDeadLetterSink
from orders_cdc.errors import FatalProcessingError, PartialBatchFailure, PermanentError, RetryableError
from orders_cdc.idempotency import IdempotencyStoreUnavailableError, reaction_key
from orders_cdc.idempotency.base import Status
from orders_cdc.idempotency.dynamodb import DynamoDbIdempotencyStore
from orders_cdc.idempotency.memory import InMemoryIdempotencyStore
from orders_cdc.pipeline import Outcome, Pipeline
from orders_cdc.retry import RetryPolicy
from orders_cdc.routing import Idempotency, Route, Router
from tests.factories import kcl_record, kds_record, sequence_number
from tests.unit.test_idempotency import counting, ddb_client, idempotency_table
from tests.unit.test_pipeline import FakeClock


def shipped(order_id, created_us=1721011165891550, event_id=None):
    return kds_record("MODIFY", new={"order_id": order_id, "status": "shipped"},
                      old={"order_id": order_id, "status": "processing"}, keys={"order_id": order_id},
                      created_us=created_us, event_id=event_id)


def batch(*docs, start=1):
    return [kcl_record(doc, sequence_number(n)) for n, doc in enumerate(docs, start)]


class Reactions:
    """A fake downstream: records each reaction; `fail` maps order ids to errors."""

    def __init__(self, fail=None):
        self.seen: list[list[str]] = []
        self.fail = dict(fail or {})

    def __call__(self, changes, ctx):
        self.seen.append([c.keys["order_id"] for c in changes])
        failures = {j: self.fail[c.keys["order_id"]] for j, c in enumerate(changes) if c.keys["order_id"] in self.fail}
        if failures:
            raise PartialBatchFailure(failures)

    @property
    def done(self):
        return [o for call in self.seen for o in call if o not in self.fail]


def make(routes, store=None, clock=None, dlq=None, attempts=3, **kw):
    clock = clock or FakeClock()
    store = store if store is not None else InMemoryIdempotencyStore(lock_seconds=90)
    p = Pipeline(router=Router(routes), ctx=None, dead_letters=dlq if dlq is not None else InMemoryDeadLetterSink(),
                 retry=RetryPolicy(max_attempts=attempts, base_seconds=0.0, max_seconds=0.0),
                 sleep=clock.sleep, clock=clock, pool=kw.pop("pool", InlinePool()),
                 idempotency=store, **kw)
    return p, store, clock


def test_a_redelivered_batch_is_all_duplicates_and_nothing_runs_twice():
    email = Reactions()
    p, store, _ = make([Route("email", "Orders", email)])
    first = p.process(batch(shipped("o-1"), shipped("o-2")), "s")
    # A KDS duplicate: new event ids, new sequence numbers, same changes.
    again = p.process(batch(shipped("o-1", event_id="dup-1"), shipped("o-2", event_id="dup-2"), start=10), "s")
    assert [r.outcome for r in first] == [Outcome.DONE, Outcome.DONE]
    assert [r.outcome for r in again] == [Outcome.DUPLICATE, Outcome.DUPLICATE]
    assert again[0].routes == (("email", Outcome.DUPLICATE),)
    assert email.seen == [["o-1", "o-2"]]
    assert store.calls["get_many"] == 2, "one batched read per batch"


def test_the_same_change_twice_in_one_batch_reacts_once():
    email = Reactions()
    p, _, _ = make([Route("email", "Orders", email)])
    results = p.process(batch(shipped("o-1"), shipped("o-1", event_id="dup")), "s")
    assert [r.outcome for r in results] == [Outcome.DONE, Outcome.DUPLICATE]
    assert email.seen == [["o-1"]]


def test_done_for_one_route_is_not_done_for_another():
    email, refund = Reactions(), Reactions(fail={"o-1": RetryableError("SQS throttled")})
    p, _, _ = make([Route("email", "Orders", email), Route("refund", "Orders", refund)], attempts=1)
    first = p.process(batch(shipped("o-1"), shipped("o-2")), "s")
    assert [r.outcome for r in first] == [Outcome.DEAD_LETTERED, Outcome.DONE]
    refund.fail.clear()
    replay = p.process(batch(shipped("o-1")), "s")  # e.g. replayed from the dead-letter queue
    assert replay[0].outcome is Outcome.DONE
    assert replay[0].routes == (("email", Outcome.DUPLICATE), ("refund", Outcome.DONE))
    assert email.seen == [["o-1", "o-2"]] and refund.seen == [["o-1", "o-2"], ["o-1"]]


def test_a_failed_reaction_releases_its_lock():
    email = Reactions(fail={"o-1": PermanentError("bad address")})
    p, store, _ = make([Route("email", "Orders", email)])
    p.process(batch(shipped("o-1")), "s")
    assert store.records == {}, "nothing left locked: a replay can run it at once"


def test_a_lock_held_elsewhere_waits_for_its_lease_without_spending_attempts():
    """A worker crashed mid-reaction (its lock is INPROGRESS): this one waits for the
    lease to run out, then reacts. No attempts burnt, nothing dead-lettered."""
    email, dlq = Reactions(), InMemoryDeadLetterSink()
    clock = FakeClock()
    store = InMemoryIdempotencyStore(lock_seconds=90)
    crashed = InMemoryIdempotencyStore(lock_seconds=90, owner="crashed")
    crashed.records = store.records
    change = batch(shipped("o-1"))
    from orders_cdc.change import decode_kcl_record

    crashed.save_inprogress(reaction_key("email", decode_kcl_record(change[0], "s")), clock.now - 30)
    p, _, _ = make([Route("email", "Orders", email)], store=store, clock=clock, dlq=dlq, attempts=1)
    results = p.process(change + batch(shipped("o-2"), start=2), "s")
    assert [r.outcome for r in results] == [Outcome.DONE, Outcome.DONE] and not dlq.letters
    assert email.seen == [["o-2"], ["o-1"]], "o-2 did not wait for o-1's lock"
    assert sum(clock.slept) == pytest.approx(60), "until the crashed worker's lease ended"


class Counts:
    """A pure ATOMIC handler: each change adds 1 to its order's counter (an order id in
    `bad` returns an error for that change instead)."""

    def __init__(self, bad=None, table="Counts"):
        self.seen: list[list[str]] = []
        self.bad = dict(bad or {})
        self.table = table

    def __call__(self, changes, ctx):
        self.seen.append([c.keys["order_id"] for c in changes])
        return [self.bad.get(c.keys["order_id"])
                or [CounterUpdate.of(self.table, {"order_id": c.keys["order_id"]}, {"n": Decimal(1)})]
                for c in changes]


def counted(store):
    return {dict(key)["order_id"]: int(c["n"]) for (_, key), c in store.counters.items()}


def test_atomic_routes_commit_counters_with_their_markers_in_one_call_and_take_no_locks():
    counts = Counts()
    p, store, _ = make([Route("metrics", "Orders", counts, idempotency=Idempotency.ATOMIC)])
    results = p.process(batch(*[shipped(f"o-{i}") for i in range(50)]), "s")
    assert {r.outcome for r in results} == {Outcome.DONE}
    assert counts.seen == [[f"o-{i}" for i in range(50)]], "one handler call for the batch"
    assert store.calls == {"get_many": 1, "transact": 1}, "no lock; 50 counters + 50 markers: one transaction"
    assert counted(store) == {f"o-{i}": 1 for i in range(50)}
    assert {r.status for r in store.records.values()} == {Status.COMPLETED}
    again = p.process(batch(*[shipped(f"o-{i}") for i in range(50)], start=100), "s")
    assert {r.outcome for r in again} == {Outcome.DUPLICATE} and len(counts.seen) == 1


def test_a_child_killed_after_its_commit_counts_nothing_twice_however_the_redelivery_is_cut():
    """The kill -9 case: changes 0-39 committed, the child died before its checkpoint; the
    restarted child (a new owner) gets 20-59 in one batch. Each change counts once."""
    store = InMemoryIdempotencyStore(lock_seconds=90, owner="first")
    first, _, _ = make([Route("metrics", "Orders", Counts(), idempotency=Idempotency.ATOMIC)], store=store)
    first.process(batch(*[shipped(f"o-{i}") for i in range(40)]), "s")
    restarted_store = InMemoryIdempotencyStore(lock_seconds=90, owner="restarted")
    restarted_store.records, restarted_store.counters = store.records, store.counters
    counts = Counts()
    restarted, _, _ = make([Route("metrics", "Orders", counts, idempotency=Idempotency.ATOMIC)], store=restarted_store)
    results = restarted.process(batch(*[shipped(f"o-{i}") for i in range(20, 60)], start=21), "s")
    assert [r.outcome for r in results] == [Outcome.DUPLICATE] * 20 + [Outcome.DONE] * 20
    assert counts.seen == [[f"o-{i}" for i in range(40, 60)]]
    assert counted(store) == {f"o-{i}": 1 for i in range(60)}


def test_an_atomic_change_that_fails_is_retried_alone_and_the_rest_commit():
    dlq = InMemoryDeadLetterSink()
    counts = Counts(bad={"o-1": PermanentError("bad order data")})
    p, store, _ = make([Route("metrics", "Orders", counts, idempotency=Idempotency.ATOMIC)], dlq=dlq)
    results = p.process(batch(*[shipped(f"o-{i}") for i in range(3)]), "s")
    assert [r.outcome for r in results] == [Outcome.DONE, Outcome.DEAD_LETTERED, Outcome.DONE]
    assert counted(store) == {"o-0": 1, "o-2": 1}
    assert dlq.letters[0].reason == "bad order data"


def test_an_atomic_route_without_a_store_is_refused_at_start():
    with pytest.raises(ValueError, match="ATOMIC routes need an idempotency store: metrics"):
        Pipeline(router=Router([Route("metrics", "Orders", Counts(), idempotency=Idempotency.ATOMIC)]), ctx=None,
                 dead_letters=InMemoryDeadLetterSink())


def test_routes_without_idempotency_never_touch_the_store():
    copy = Reactions()
    p, store, _ = make([Route("copy", "Orders", copy, idempotency=Idempotency.OFF)])
    p.process(batch(shipped("o-1")), "s")
    p.process(batch(shipped("o-1")), "s")
    assert copy.seen == [["o-1"], ["o-1"]], "at-least-once by design"
    assert sum(store.calls.values()) == 0


def test_markers_that_cannot_be_written_stop_the_batch_unacknowledged():
    class Down(InMemoryIdempotencyStore):
        def _put_many(self, records):
            raise IdempotencyStoreUnavailableError("throttled")

    p, _, _ = make([Route("email", "Orders", Reactions())], store=Down())
    with pytest.raises(FatalProcessingError, match="mark reactions done"):
        p.process(batch(shipped("o-1")), "s")


def test_a_timed_out_reaction_keeps_its_lock_until_the_lease_ends():
    """The hung call may still send the email: its lock is not released, and the retry
    waits for the lease instead of racing it."""
    release = threading.Event()
    calls = []

    def hangs_once(changes, ctx):
        calls.append(len(calls))
        if len(calls) == 1:
            release.wait(30)

    clock = FakeClock()
    p, store, _ = make([Route("email", "Orders", hangs_once)], clock=clock, pool=CallPool(),
                       handler_timeout_seconds=0.05)
    try:
        results = p.process(batch(shipped("o-1")), "s")
    finally:
        release.set()
    assert [r.outcome for r in results] == [Outcome.DONE]
    assert calls == [0, 1]
    assert sum(clock.slept) == pytest.approx(90), "waited for the lease (90 s) before the retry"


# ---------------------------------------------------------------------------------------------
# The API-call budget, against DynamoDB (moto)


@pytest.fixture
def ddb_store(moto_server):
    client = ddb_client(moto_server)
    return DynamoDbIdempotencyStore(client, idempotency_table(client), lock_seconds=90), counting(client)


def test_atomic_routes_cost_under_a_tenth_of_a_call_per_record(ddb_store):
    """500 changes of 500 orders: 100 items per transaction = 50 counters + 50 markers."""
    store, calls = ddb_store
    counts = f"Counts-{uuid.uuid4().hex[:8]}"
    store._ddb.create_table(TableName=counts, KeySchema=[{"AttributeName": "order_id", "KeyType": "HASH"}],
                            AttributeDefinitions=[{"AttributeName": "order_id", "AttributeType": "S"}],
                            BillingMode="PAY_PER_REQUEST")
    calls.clear()
    p, _, _ = make([Route("metrics", "Orders", Counts(table=counts), idempotency=Idempotency.ATOMIC),
                    Route("copy", "Orders", Reactions(), idempotency=Idempotency.OFF)], store=store)
    p.process(batch(*[shipped(f"o-{i}") for i in range(500)]), "s")
    assert dict(calls) == {"BatchGetItem": 5, "TransactWriteItems": 10}
    assert sum(calls.values()) / 500 <= 0.1
    items = store._ddb.scan(TableName=counts)["Items"]
    assert sorted((i["order_id"]["S"], i["n"]["N"]) for i in items) == sorted((f"o-{i}", "1") for i in range(500))


def test_per_change_routes_lock_100_changes_per_transaction_and_batch_reads_and_markers(ddb_store):
    store, calls = ddb_store
    p, _, _ = make([Route("email", "Orders", Reactions())], store=store)
    p.process(batch(*[shipped(f"o-{i}") for i in range(150)]), "s")
    assert dict(calls) == {"BatchGetItem": 2, "TransactWriteItems": 2, "BatchWriteItem": 6}
    items = store._ddb.scan(TableName=store.table)["Items"]
    assert len(items) == 150 and {i["status"]["S"] for i in items} == {"COMPLETED"}
    calls.clear()
    p.process(batch(*[shipped(f"o-{i}") for i in range(150)], start=200), "s")
    assert dict(calls) == {"BatchGetItem": 2}, "a redelivered batch costs only the reads"


def test_a_lock_transaction_cancelled_by_locks_in_the_way_is_sent_again_without_them(ddb_store):
    store, calls = ddb_store
    other = DynamoDbIdempotencyStore(store._ddb, store.table, lock_seconds=90)  # another worker
    now = 1_900_000_000.0
    other.save_inprogress("k-1", now)
    other.save_success(["k-2"], now)
    calls.clear()
    refused = store.save_inprogress_many(["k-0", "k-1", "k-2", "k-3"], now)
    assert {k: type(e).__name__ for k, e in refused.items()} == {
        "k-1": "IdempotencyInProgressError", "k-2": "IdempotencyAlreadyCompletedError"}
    assert refused["k-1"].until == pytest.approx(now + 90)
    assert dict(calls) == {"TransactWriteItems": 2}, "the first cancelled (ALL_OLD says why), the second takes k-0, k-3"
    assert {i["id"]["S"]: i["status"]["S"] for i in store._ddb.scan(TableName=store.table)["Items"]} == {
        "k-0": "INPROGRESS", "k-1": "INPROGRESS", "k-2": "COMPLETED", "k-3": "INPROGRESS"}


# ---------------------------------------------------------------------------------------------
# The wired processor (app.build_processor) on moto: a redelivered batch reacts nowhere twice


class NoCheckpoints:
    def checkpoint(self, sequence_number=None, sub_sequence_number=None):
        pass


def test_the_wired_processor_reacts_once_to_a_redelivered_batch(moto_server):
    from collections import Counter
    from decimal import Decimal

    import boto3

    from orders_cdc.app import Clients, build_processor
    from orders_cdc.local.resources import LocalClients, ResourceNames, create_resources
    from orders_cdc.settings import load

    s = uuid.uuid4().hex[:8]
    names = ResourceNames.unique(s, shards=1)
    aws = LocalClients.from_endpoints({name: moto_server for name in LocalClients.__dataclass_fields__})
    create_resources(aws, names)
    settings = load({"AWS_ENDPOINT_URL": moto_server, "AWS_REGION": "us-east-1", **names.environment()})
    clients = Clients(settings, boto3.session.Session(aws_access_key_id="test", aws_secret_access_key="test",
                                                      region_name="us-east-1"))
    calls: Counter = Counter()
    for service in ("dynamodb", "sqs", "ses", "firehose"):
        getattr(clients, service).meta.events.register(f"before-call.{service}",
                                                       lambda model, **_: calls.update([model.name]))

    def order(order_id, status):
        return {"order_id": order_id, "status": status, "customer_email": "ann@example.com", "currency": "USD",
                "created_at": "2024-07-15T10:00:00+00:00", "total": Decimal("79.80"),
                "items": [{"product_id": "p-1", "name": "Kettle", "quantity": Decimal(2), "unit_price": Decimal("39.90")}]}

    def docs(event_prefix):
        t, us = names.orders_table, 1_721_037_600_000_000
        return [
            kds_record("INSERT", new=order("o-1", "pending"), old=None, keys={"order_id": "o-1"}, table=t,
                       created_us=us, event_id=f"{event_prefix}-1"),
            kds_record("MODIFY", new=order("o-1", "shipped"), old=order("o-1", "pending"), keys={"order_id": "o-1"},
                       table=t, created_us=us + 1, event_id=f"{event_prefix}-2"),
            kds_record("MODIFY", new=order("o-2", "cancelled"), old=order("o-2", "processing"), keys={"order_id": "o-2"},
                       table=t, created_us=us + 2, event_id=f"{event_prefix}-3"),
        ]

    processor = build_processor(settings, clients)
    processor._metrics = False
    processor.initialize("shardId-000000000000", "TRIM_HORIZON", 0)
    processor.process_records(batch(*docs("a")), 0, NoCheckpoints())
    first = Counter(calls)
    calls.clear()
    processor.process_records(batch(*docs("b"), start=10), 0, NoCheckpoints())  # KDS duplicates
    assert processor.totals["done"] == 6, "the copies to Firehose are at-least-once: still done"
    # metrics x2, the shipped email, inventory (shipped, cancelled), the refund; the
    # pending -> shipped edit changes no metric: nothing was committed, so no marker either
    assert processor.totals["duplicate_reactions"] == 6
    assert first["SendEmail"] == 1 and "SendEmail" not in calls
    assert first["SendMessageBatch"] == 1 and "SendMessageBatch" not in calls, "no second refund request"
    assert "TransactWriteItems" not in calls, "no second inventory movement or metric increment"
    assert calls["PutRecordBatch"] == 2, "analytics and audit copies again (downstream dedups)"
    assert calls["BatchGetItem"] == 1, "duplicates found in one read"
    assert calls["PutItem"] == first["PutItem"] == 1, "no locks taken; what is left is the view's own guarded write"


# ---------------------------------------------------------------------------------------------
# Asked to stop (the child's SIGTERM): nothing starts, what is in flight ends with its marker


def stopping_after_first_send(pipeline, sent):
    """An email route whose first send is the moment the worker is told to stop."""
    def send(change, ctx):
        sent.append(change.keys["order_id"])
        if len(sent) == 1:
            pipeline.request_stop()
    return send


@pytest.mark.parametrize("pool", [InlinePool, lambda: CallPool(capacity=1)])
def test_a_stop_request_starts_no_more_sends_and_the_one_in_flight_keeps_its_marker(pool):
    sent: list[str] = []
    p, store, _ = make([], pool=pool())
    p.router = Router([Route("email", "Orders", stopping_after_first_send(p, sent), per_change=True)])
    results = p.process(batch(shipped("o-1"), shipped("o-2"), shipped("o-3")), "s")

    assert sent == ["o-1"], "no send began after the stop request"
    assert [r.outcome for r in results] == [Outcome.DONE, Outcome.UNSETTLED, Outcome.UNSETTLED]
    assert [r.status for r in store.records.values()] == [Status.COMPLETED], \
        "o-1's done-marker written; no lock left behind for o-2 and o-3"
    # The next owner: o-1 is a duplicate, o-2 and o-3 are sent once.
    sent.clear()
    q, _, _ = make([Route("email", "Orders", lambda c, ctx: sent.append(c.keys["order_id"]), per_change=True)],
                   store=store)
    again = q.process(batch(shipped("o-1"), shipped("o-2"), shipped("o-3")), "s")
    assert [r.outcome for r in again] == [Outcome.DUPLICATE, Outcome.DONE, Outcome.DONE]
    assert sent == ["o-2", "o-3"]


def test_a_stopping_child_checkpoints_the_settled_prefix_and_acknowledges_no_later_batch():
    from orders_cdc.checkpointing import CheckpointPolicy
    from orders_cdc.consumer import ChangeProcessor
    from tests.unit.test_checkpointing import ScriptedCheckpointer

    sent: list[str] = []
    p, _, _ = make([])
    p.router = Router([Route("email", "Orders", stopping_after_first_send(p, sent), per_change=True)])
    processor = ChangeProcessor(p, CheckpointPolicy, metrics=False)
    processor.initialize("s", None, None)
    cp = ScriptedCheckpointer()
    processor.process_records(batch(shipped("o-1"), shipped("o-2")), 0, cp)  # acknowledged
    assert cp.calls == [(sequence_number(1), 0)], "the settled prefix, and nothing past o-2"
    with pytest.raises(FatalProcessingError, match="left for the shard's next owner"):
        processor.process_records(batch(shipped("o-3"), start=3), 0, cp)
    processor.process_records([], 0, cp)  # an idle poll is harmless
    with pytest.raises(FatalProcessingError, match="SHARD_END not written"):
        processor.shard_ended(cp)
    processor.shutdown_requested(cp)
    assert cp.calls == [(sequence_number(1), 0)] and sent == ["o-1"]
