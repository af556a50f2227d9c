"""Concurrency within a batch: the call pool, per-item order under random delays, the
checkpoint under concurrency, the SES rate, and what happens after a failure (retry.decide)."""

from __future__ import annotations

import random
import threading
import time

import pytest
from botocore.exceptions import ClientError
from hypothesis import given, settings
from hypothesis import strategies as st

from orders_cdc.checkpointing import CheckpointPolicy
from orders_cdc.concurrency import Call, CallPool, NotStarted
from orders_cdc.deadletter import InMemoryDeadLetterSink
from orders_cdc.errors import DeferredError, FatalProcessingError, HandlerTimeout, PermanentError, RetryableError
from orders_cdc.idempotency.memory import InMemoryIdempotencyStore
from orders_cdc.outcomes import Outcome
from orders_cdc.pipeline import Pipeline, _Record, _Task, _units
from orders_cdc.ratelimit import TokenBucket
from orders_cdc.retry import Decision, RetryPolicy, Verdict, decide
from orders_cdc.routing import Idempotency, Route, Router
from tests.factories import kcl_record, kds_record, sequence_number
from tests.unit.test_pipeline import FakeClock

# ---------------------------------------------------------------------------------------------
# The pool


def test_the_pool_keeps_at_most_capacity_calls_in_flight_and_returns_results_in_order():
    pool, lock, now, most = CallPool(capacity=4), threading.Lock(), [0], [0]

    def work(n):
        with lock:
            now[0] += 1
            most[0] = max(most[0], now[0])
        time.sleep(0.01)
        with lock:
            now[0] -= 1
        if n == 7:
            raise KeyError(n)
        return n

    results = pool.run([Call(lambda n=n: work(n)) for n in range(20)], timeout=5, time_left=60)
    assert most[0] == pool.most_in_flight == 4, "the cap holds, and it is reached"
    assert results[:7] == list(range(7)) and isinstance(results[7], KeyError) and results[8:] == list(range(8, 20))


def test_a_hung_call_times_out_its_thread_is_replaced_and_its_late_result_is_handed_to_on_late():
    pool, release, late = CallPool(capacity=1), threading.Event(), []
    first = pool.run([Call(lambda: release.wait(30) and "sent", late.append)], timeout=0.05, time_left=60)
    assert isinstance(first[0], HandlerTimeout)
    assert pool.run([Call(lambda: "next")], timeout=5, time_left=60) == ["next"], "capacity is not lost to the hung call"
    release.set()
    for _ in range(200):
        if late:
            break
        time.sleep(0.01)
    assert late == ["sent"], "what the abandoned call did is reported when it ends"


def test_past_max_abandoned_hung_calls_the_pool_gives_up():
    pool, release = CallPool(max_abandoned=2), threading.Event()
    try:
        for _ in range(2):
            [result] = pool.run([Call(lambda: release.wait(30))], timeout=0.01, time_left=60)
            assert isinstance(result, HandlerTimeout)
        with pytest.raises(FatalProcessingError, match="still hung"):
            pool.run([Call(lambda: None)], timeout=5, time_left=60)
    finally:
        release.set()


def test_a_call_whose_timeout_does_not_fit_in_the_time_left_is_not_started():
    ran = []
    [result] = CallPool().run([Call(lambda: ran.append(1))], timeout=10, time_left=5)
    assert isinstance(result, NotStarted) and isinstance(result, DeferredError) and ran == []


# ---------------------------------------------------------------------------------------------
# Per-item order under concurrency


def change(order_id: str, n: int) -> dict:
    return kds_record("MODIFY", new={"order_id": order_id, "status": f"s{n}"}, old={"order_id": order_id, "status": "x"},
                      keys={"order_id": order_id})


class Recorder:
    """A route's handler with random delays and random retryable failures; records, per
    item, the order in which changes were applied, and the most calls of one item at once."""

    def __init__(self, seed: int, fail_rate: float = 0.0, per_change: bool = False):
        self.rand, self.fail_rate, self.per_change = random.Random(seed), fail_rate, per_change
        self.lock = threading.Lock()
        self.applied: dict[str, list[int]] = {}
        self.active: dict[str, int] = {}
        self.overlap = 0

    def _one(self, c) -> None:
        item = c.keys["order_id"]
        with self.lock:
            self.active[item] = self.active.get(item, 0) + 1
            self.overlap = max(self.overlap, self.active[item])
            delay, fail = self.rand.random() * 0.004, self.rand.random() < self.fail_rate
        time.sleep(delay)
        with self.lock:
            self.active[item] -= 1
            if fail:
                raise RetryableError("flaky")
            self.applied.setdefault(item, []).append(int(c.new_image["status"][1:]))

    def __call__(self, changes, ctx):
        if self.per_change:
            return self._one(changes)
        from orders_cdc.errors import PartialBatchFailure

        failures, failed_items = {}, set()
        for j, c in enumerate(changes):  # a batch handler applies an item's changes in order
            if c.keys["order_id"] in failed_items:
                failures[j] = RetryableError("held")
                continue
            try:
                self._one(c)
            except RetryableError as exc:
                failures[j] = exc
                failed_items.add(c.keys["order_id"])
        if failures:
            raise PartialBatchFailure(failures)


def concurrent_pipeline(routes, store=None):
    return Pipeline(router=Router(routes), ctx=None, dead_letters=InMemoryDeadLetterSink(),
                    retry=RetryPolicy(max_attempts=50, base_seconds=0.001, max_seconds=0.002),
                    idempotency=store, pool=CallPool(capacity=16), handler_timeout_seconds=10)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), items=st.integers(1, 6), per_item=st.integers(1, 5),
       per_change=st.booleans(), fail_rate=st.sampled_from([0.0, 0.2]))
def test_random_delays_and_failures_never_reorder_one_items_changes_on_a_route(seed, items, per_item, per_change,
                                                                               fail_rate):
    rand = random.Random(seed)
    histories = {f"o-{i}": list(range(per_item)) for i in range(items)}
    stream, cursor = [], {k: 0 for k in histories}
    while any(cursor[k] < per_item for k in cursor):  # interleave the items' histories at random
        k = rand.choice([k for k in cursor if cursor[k] < per_item])
        stream.append(change(k, cursor[k]))
        cursor[k] += 1
    recorder = Recorder(seed, fail_rate, per_change)
    route = Route("r", "Orders", recorder, idempotency=Idempotency.OFF, per_change=per_change,
                  max_batch=None if per_change else 2)
    results = concurrent_pipeline([route]).process(
        [kcl_record(d, sequence_number(n)) for n, d in enumerate(stream, 1)], "s")
    assert {r.outcome for r in results} == {Outcome.DONE}
    assert recorder.applied == histories, "each item's changes applied once, in stream order"
    assert recorder.overlap == 1, "never two calls of one item on one route at once"


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 40))
def test_the_checkpoint_never_passes_an_unsettled_record(seed, n):
    """Records settle in any order under concurrency; the checkpoint is only ever at a
    record before which every record is settled (here: done or dead-lettered)."""
    rand = random.Random(seed)
    permanent = {k for k in range(1, n + 1) if rand.random() < 0.15}

    def handler(c, ctx):
        time.sleep(rand.random() * 0.003)
        if int(c.keys["order_id"][2:]) in permanent:
            raise PermanentError("bad")

    route = Route("r", "Orders", handler, idempotency=Idempotency.OFF, per_change=True)
    results = concurrent_pipeline([route]).process(
        [kcl_record(change(f"o-{k}", 0), sequence_number(k)) for k in range(1, n + 1)], "s")
    assert [r.outcome for r in results] == [Outcome.DEAD_LETTERED if k in permanent else Outcome.DONE
                                            for k in range(1, n + 1)]
    policy, checkpointer = CheckpointPolicy(every_records=1, every_seconds=0), Checkpointer()
    policy.observe(results[: n // 2])
    policy.checkpoint(checkpointer, force=True)
    policy.observe(results[n // 2 :])
    policy.checkpoint(checkpointer, force=True)
    assert checkpointer.at[-1] == (sequence_number(n), 0)
    assert checkpointer.at == sorted(checkpointer.at), "never backwards"


class Checkpointer:
    def __init__(self):
        self.at = []

    def checkpoint(self, sequence_number=None, sub_sequence_number=None):
        self.at.append((sequence_number, sub_sequence_number))


def test_a_batch_that_cannot_settle_is_never_acknowledged_while_its_neighbours_ran():
    """One order's change can never be done (its route is held); the others run at once
    but the batch ends in FatalProcessingError: no results, so no checkpoint past it."""
    ran = []

    def handler(c, ctx):
        if c.keys["order_id"] == "o-3":
            raise DeferredError("held elsewhere")
        ran.append(c.keys["order_id"])

    clock = FakeClock()
    p = Pipeline(router=Router([Route("r", "Orders", handler, idempotency=Idempotency.OFF, per_change=True)]),
                 ctx=None, dead_letters=InMemoryDeadLetterSink(), sleep=clock.sleep, clock=clock,
                 pool=CallPool(capacity=4), batch_deadline_seconds=30, handler_timeout_seconds=1)
    with pytest.raises(FatalProcessingError, match="1 record"):
        p.process([kcl_record(change(f"o-{k}", 0), sequence_number(k)) for k in range(1, 9)], "s")
    assert sorted(ran) == sorted(f"o-{k}" for k in range(1, 9) if k != 3)


def test_one_orders_hung_call_does_not_hold_the_other_orders():
    release, sent = threading.Event(), []

    def send(c, ctx):
        if c.keys["order_id"] == "o-0":
            release.wait(30)
        sent.append(c.keys["order_id"])

    route = Route("email", "Orders", send, per_change=True)
    p = Pipeline(router=Router([route]), ctx=None, dead_letters=InMemoryDeadLetterSink(),
                 retry=RetryPolicy(max_attempts=3, base_seconds=0, max_seconds=0), sleep=lambda s: release.set(),
                 idempotency=InMemoryIdempotencyStore(lock_seconds=0.5), pool=CallPool(capacity=4),
                 handler_timeout_seconds=0.2)
    started = time.monotonic()
    results = p.process([kcl_record(change(f"o-{k}", 0), sequence_number(k + 1)) for k in range(30)], "s")
    assert {r.outcome for r in results} == {Outcome.DONE} or {r.outcome for r in results} == {Outcome.DONE,
                                                                                            Outcome.DUPLICATE}
    assert sorted(set(sent)) == sorted(f"o-{k}" for k in range(30))
    assert sent.index("o-1") < 5 and time.monotonic() - started < 10, "the other orders went on at once"


def test_a_timed_out_send_is_not_sent_again_once_it_finishes_late():
    """The defect: a send that overran its deadline went on in the abandoned thread while
    the retry sent it again. Now its lock is kept, and its late completion is recorded."""
    release, sent = threading.Event(), []
    clock = FakeClock()

    def send(c, ctx):
        if not sent:
            release.wait(30)
        sent.append(c.keys["order_id"])

    def sleep(seconds):
        release.set()  # the hung send completes while the retry waits out the lock's lease
        time.sleep(0.2)
        clock.sleep(seconds)

    store = InMemoryIdempotencyStore(lock_seconds=90)
    p = Pipeline(router=Router([Route("email", "Orders", send, per_change=True)]), ctx=None,
                 dead_letters=InMemoryDeadLetterSink(), retry=RetryPolicy(base_seconds=0, max_seconds=0),
                 sleep=sleep, clock=clock, idempotency=store, pool=CallPool(), handler_timeout_seconds=0.05)
    [result] = p.process([kcl_record(change("o-1", 0), sequence_number(1))], "s")
    assert result.outcome is Outcome.DUPLICATE, "the retry found the late send's done-marker"
    assert sent == ["o-1"], "one email"


# ---------------------------------------------------------------------------------------------
# Cutting a round into calls


def tasks(route, items):
    return [_Task(route, _Record(i, {}, item=item)) for i, item in enumerate(items)]


def test_a_round_is_cut_into_calls_that_never_split_an_item_and_hold_at_most_max_batch():
    route = Route("views", "Orders", lambda cs, ctx: None, idempotency=Idempotency.OFF, max_batch=3)
    units = _units(route, tasks(route, ["a", "b", "a", "c", "d", "a", "e"]))
    assert [[t.record.item for t in u.tasks] for u in units] == [["a", "a", "a"], ["b", "c", "d"], ["e"]]
    big = _units(route, tasks(route, ["z"] * 7 + ["y"]))
    assert [[t.record.item for t in u.tasks] for u in big] == [["z", "z", "z"], ["y"]], "a very busy item waits"


def test_a_per_change_route_gets_one_change_of_an_item_per_round_and_an_atomic_route_one_call():
    email = Route("email", "Orders", lambda c, ctx: None, per_change=True)
    assert [[t.record.item for t in u.tasks] for u in _units(email, tasks(email, ["a", "b", "a"]))] == [["a"], ["b"]]
    counters = Route("metrics", "Orders", lambda cs, ctx: [], idempotency=Idempotency.ATOMIC)
    assert len(_units(counters, tasks(counters, ["a", "b", "c"]))) == 1


# ---------------------------------------------------------------------------------------------
# The SES sending rate


class ManualClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now

    def sleep(self, seconds):
        self.now += seconds


def test_the_token_bucket_spaces_sends_at_the_rate_and_hands_back_what_would_wait_too_long():
    clock = ManualClock()
    bucket = TokenBucket(rate=10, burst=2, clock=clock, sleep=clock.sleep)
    assert [bucket.take(max_wait=1) for _ in range(2)] == [0.0, 0.0] and clock.now == 0, "the burst"
    assert bucket.take(max_wait=1) == 0.0 and clock.now == pytest.approx(0.1), "then one per 1/rate"
    assert bucket.take(max_wait=0.01) == pytest.approx(0.1), "too long a wait: nothing taken, the wait said"
    clock.now += 5
    assert bucket.take(max_wait=0) == 0.0


def throttled():
    return ClientError({"Error": {"Code": "Throttling", "Message": "Maximum sending rate exceeded."},
                        "ResponseMetadata": {"HTTPStatusCode": 400}}, "SendEmail")


def test_ses_throttling_is_back_pressure_no_attempt_spent_and_no_circuit_opened():
    from orders_cdc.app import Context
    from processors import notification

    class Ses:
        def __init__(self):
            self.calls, self.sent = 0, []

        def send_email(self, **kw):
            self.calls += 1
            if self.calls <= 40:  # 40 refusals in a row: more than attempts x records would allow
                raise throttled()
            self.sent.append(kw["Destination"]["ToAddresses"][0])

    class Clients:
        ses = Ses()

    from orders_cdc.settings import Settings

    ctx = Context(Settings(region="us-east-1"), Clients())
    route = next(r for r in notification.routes(Settings(region="us-east-1").resources)
                 if r.name == "notification.shipped_email")
    clock = FakeClock()
    p = Pipeline(router=Router([route]), ctx=ctx, dead_letters=InMemoryDeadLetterSink(),
                 retry=RetryPolicy(max_attempts=2), sleep=clock.sleep, clock=clock,
                 idempotency=InMemoryIdempotencyStore(), pool=CallPool(capacity=1))
    docs = [kds_record("MODIFY", new={"order_id": f"o-{k}", "status": "shipped", "customer_email": f"c{k}@example.com"},
                       old={"order_id": f"o-{k}", "status": "processing"}, keys={"order_id": f"o-{k}"})
            for k in range(6)]
    results = p.process([kcl_record(d, sequence_number(k + 1)) for k, d in enumerate(docs)], "s")
    assert {r.outcome for r in results} == {Outcome.DONE}, "nothing dead-lettered"
    assert len(ctx.clients.ses.sent) == 6
    assert p.breaker_for(route).state.value == "closed"


# ---------------------------------------------------------------------------------------------
# What happens after a failure: retry.decide, table-tested

POLICY = RetryPolicy(max_attempts=3, base_seconds=1, max_seconds=1, max_record_age_seconds=3600)
NOW = 1_000.0


class Rand(random.Random):
    def uniform(self, a, b):
        return b  # the ceiling, so the table can say when


@pytest.mark.parametrize(
    ("exc", "attempts", "age", "closed", "worked", "expected"),
    [
        (DeferredError("locked", until=NOW + 50), 2, 0, True, True, Decision(Verdict.WAIT, 2, NOW + 50)),
        (DeferredError("no time given"), 0, 0, False, False, Decision(Verdict.WAIT, 0, NOW + 1)),
        (PermanentError("bad"), 0, 0, True, True, Decision(Verdict.DEAD_LETTER, 1)),
        (PermanentError("bad"), 2, 0, False, False, Decision(Verdict.DEAD_LETTER, 3)),
        (RetryableError("503"), 1, 0, False, False, Decision(Verdict.HOLD, 1, NOW + 30)),
        (RetryableError("503"), 0, 0, True, True, Decision(Verdict.RETRY, 1, NOW + 1)),
        (RetryableError("503"), 2, 0, True, False, Decision(Verdict.TRIP, 3)),
        (RetryableError("503"), 2, 0, True, True, Decision(Verdict.DEAD_LETTER, 3)),
        (RetryableError("503"), 2, 7200, True, False, Decision(Verdict.DEAD_LETTER, 3)),
        (RetryableError("503"), 0, 7200, True, True, Decision(Verdict.DEAD_LETTER, 1)),
        (KeyError("bug"), 2, 0, True, False, Decision(Verdict.DEAD_LETTER, 3)),
        (KeyError("bug"), 0, 0, True, False, Decision(Verdict.RETRY, 1, NOW + 1)),
    ],
    ids=["deferred-until", "deferred-backoff", "permanent", "permanent-while-open", "outage-while-open",
         "retry", "out-of-attempts-route-down", "out-of-attempts-route-works", "too-old-route-down",
         "too-old-first-failure", "a-bug-out-of-attempts", "a-bug-retried"],
)
def test_decide(exc, attempts, age, closed, worked, expected):
    assert decide(POLICY, exc, attempts=attempts, now=NOW, age=age, circuit_closed=closed, probe_at=NOW + 30,
                  worked_since_first_failure=worked, rand=Rand()) == expected


def test_done_markers_are_written_as_calls_finish_not_only_when_the_round_ends():
    """The crash window (a send done, its marker not written yet) is the last few calls, not
    the whole round: with one send still hanging, the others' markers are already durable."""
    store, seen_while_hanging = InMemoryIdempotencyStore(lock_seconds=90), []

    def send(c, ctx):
        if c.keys["order_id"] == "o-0":
            for _ in range(500):  # until the 59 others are done
                if sum(r.status.value == "COMPLETED" for r in list(store.records.values())) >= 50:
                    break
                time.sleep(0.01)
            seen_while_hanging.append(sum(r.status.value == "COMPLETED" for r in list(store.records.values())))

    route = Route("email", "Orders", send, per_change=True)
    p = Pipeline(router=Router([route]), ctx=None, dead_letters=InMemoryDeadLetterSink(), idempotency=store,
                 pool=CallPool(capacity=8))
    results = p.process([kcl_record(change(f"o-{k}", 0), sequence_number(k + 1)) for k in range(60)], "s")
    assert {r.outcome for r in results} == {Outcome.DONE}
    assert seen_while_hanging[0] == 50, "two BatchWriteItems of 25 went out before the round ended"
    assert sum(r.status.value == "COMPLETED" for r in store.records.values()) == 60


def test_an_idle_worker_keeps_nothing_of_its_last_call_alive():
    """A worker waiting for work held its last call, and through its closure that call's
    changes: for a counter route, the whole previous batch, alive while the next one ran."""
    import gc
    import weakref

    class Batch:
        pass

    pool, batch = CallPool(capacity=2), Batch()
    alive = weakref.ref(batch)
    pool.run([Call(lambda b=batch: id(b))], timeout=5, time_left=60)
    del batch
    gc.collect()
    assert alive() is None
