"""A chaos soak: steady order traffic on the real daemon (2 shards) while faults of every kind
land at random times from a seeded RNG; then, caught up, every effect is checked exactly
(README "Delivery guarantees") and the figures are printed as one `SOAK {...}` line.

Short by default (`pytest -m faults`, part of `make test`, about 3 minutes); as long as you
like with `make soak DURATION=600` (ORDERS_CDC_SOAK_SECONDS). ORDERS_CDC_SOAK_SEED replays a
run's faults (the seed is printed first); ORDERS_CDC_SOAK_RATE sets the table writes a second.

Faults: kill -9 of a Python child; kill -9 of the daemon (the supervisor restarts it);
SIGTERM of the daemon's process group (ECS's stop as `orders-cdc run` passes it on; restarted too);
a 5xx burst in front of SES or SQS;
SES throttling; duplicated and reordered changes put straight onto the stream; the poison
corpus put straight onto the stream. Every kind comes once, in a random order, then again; the
three that restart the JVM (which takes about a minute on a busy 2-core machine) never come
one after the other, and each waits until the daemon has fresh children again, so the
processor always makes progress between faults.

Recovery of a fault: from its start until every change written before its end is done
(its analytics copy, its emails and its refund seen answered 200 by the proxies in front of
Firehose, SES and SQS), so measuring it costs no polling of the stack."""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import pytest

from orders_cdc.local.runner import wait_until
from tests.faults.harness import (
    History, Kill, _scan, answered_before, assert_exact, caught_up, child_pids, counts_of, duplicated_and_reordered,
    ecs_stop, emails_in, emit, freeze_and_kill, jvm_pid, observe, put_changes, put_records, refunds_in, sent_twice,
)
from tests.faults.test_scenarios import POISON

SECONDS = float(os.environ.get("ORDERS_CDC_SOAK_SECONDS") or 105)
SEED = int(os.environ.get("ORDERS_CDC_SOAK_SEED") or random.SystemRandom().randrange(10**6))
# Table writes a second. moto deep-copies every table a TransactWriteItems touches, so its cost
# grows with the tables and the local stack's load with rate² × time: at 8/s it falls from ~20
# to ~1 request a second after about 4 minutes. A longer soak writes slower: 600 s at 3/s
# slowed moto to 25 s a reply by the end, and 2/s kept up.
RATE = float(os.environ.get("ORDERS_CDC_SOAK_RATE") or (min(8.0, round((64 * 150 / SECONDS) ** 0.5, 1))
                                                        if SECONDS <= 180 else 2.0))
GAP = (15.0, 20.0) if SECONDS <= 180 else (15.0, 30.0)  # seconds from a fault's end to the next
ORDERS_PER_ROUND = 20  # one History per round: 60 changes, every path, interleaved
PREFIX = "soak"
RESTARTS = ("kill9_child", "kill9_daemon", "sigterm_daemon")  # each one restarts the JVM (~1 min here)
OTHERS = ("downstream_5xx", "ses_throttling", "duplicates", "poison")

pytestmark = [pytest.mark.faults, pytest.mark.timeout(int(SECONDS) + 900)]


@dataclass
class Fault:
    kind: str
    start: float  # time.monotonic()
    end: float
    detail: dict = field(default_factory=dict)


class Traffic(threading.Thread):
    """Order histories written one after the other at a steady rate until stopped; each one's
    orders join `oracle` when written. `written` holds (time, order id, status) per change."""

    def __init__(self, run, oracle: History, rate: float):
        super().__init__(name="soak-traffic", daemon=True)
        self.run_, self.oracle, self.rate = run, oracle, rate
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.written: list[tuple[float, str, str]] = []
        self.rounds = 0
        self.error: BaseException | None = None

    def run(self):
        try:
            while not self.stop.is_set():
                history = History(orders=ORDERS_PER_ROUND, prefix=f"{PREFIX}-r{self.rounds:03d}")
                times: list[float] = []
                history.write(self.run_, rate=self.rate, on_step=lambda n: times.append(time.monotonic()))
                with self.lock:
                    self.oracle.absorb(history)
                    self.written += [(t, v["order_id"], v["status"]) for t, v in zip(times, history.versions)]
                self.rounds += 1
        except BaseException as exc:  # noqa: BLE001 - re-raised by the test
            self.error = exc

    def add(self, history: History, at: float, changes: list[tuple[str, str]]) -> None:
        with self.lock:
            self.oracle.absorb(history)
            self.written += [(at, oid, status) for oid, status in changes]


def _done_times(proxies) -> tuple[dict, dict, dict]:
    """When each change's analytics copy, each email and each refund was first answered 200."""
    analytics: dict[tuple[str, str], float] = {}
    for r in proxies["firehose"].requests:
        if r.status != 200 or r.action != "PutRecordBatch":
            continue
        for rec in json.loads(r.body).get("Records", []):
            for line in base64.b64decode(rec["Data"]).splitlines():
                event = json.loads(line) if line.strip() else {}
                if event.get("record_type") == "analytics":
                    key = (event["keys"].get("order_id", ""), (event.get("item") or {}).get("status"))
                    analytics[key] = min(analytics.get(key, r.finished), r.finished)
    from tests.faults.proxy import ses_subject

    emails: dict[str, float] = {}
    for r in proxies["ses"].requests:
        if r.status == 200 and (subject := ses_subject(r.body)):
            emails[subject] = min(emails.get(subject, r.finished), r.finished)
    refunds: dict[str, float] = {}
    for r in proxies["sqs"].requests:
        if r.status != 200 or r.action not in ("SendMessageBatch", "SendMessage"):
            continue
        body = json.loads(r.body)
        if not body.get("QueueUrl", "").endswith("refunds"):
            continue
        for entry in body.get("Entries") or [body]:
            oid = json.loads(entry["MessageBody"]).get("order_id", "")
            refunds[oid] = min(refunds.get(oid, r.finished), r.finished)
    return analytics, emails, refunds


def _recoveries(faults: list[Fault], written, proxies) -> list[float | None]:
    analytics, emails, refunds = _done_times(proxies)

    def done_at(oid, status):
        needed = [analytics.get((oid, status))]
        if status == "shipped":
            needed.append(emails.get(f"Your order {oid} has shipped"))
        if status == "delivered":
            needed += [emails.get(f"Your order {oid} has been delivered"), emails.get(f"How was your order {oid}?")]
        if status == "cancelled":
            needed.append(refunds.get(oid))
        return None if None in needed else max(needed)

    done = [(t, done_at(oid, status)) for t, oid, status in written]
    out = []
    for f in faults:
        times = [d for t, d in done if t <= f.end]
        out.append(None if None in times else round(max([f.start, *times]) - f.start, 1))
    return out


def _dump_requests(proxies, t0, kills, faults) -> None:
    """Every SES and SQS call, the kills and the faults, to .local/faults/soak-requests.jsonl,
    for a look after a failure."""
    from tests.faults.harness import COUNTS_FILE
    from tests.faults.proxy import ses_subject

    with (COUNTS_FILE.parent / "soak-requests.jsonl").open("w") as out:
        for f in faults:
            out.write(json.dumps({"fault": f.kind, "start": round(f.start - t0, 3), "end": round(f.end - t0, 3),
                                  **f.detail}, default=str) + "\n")
        for k in kills:
            out.write(json.dumps({"kill": k.pid, "at": round(k.at - t0, 3), "ports": {n: sorted(p) for n, p in k.ports.items()}}) + "\n")
        for name in ("ses", "sqs"):
            for r in proxies[name].requests:
                out.write(json.dumps({"proxy": name, "action": r.action, "port": r.client_port, "status": r.status,
                                      "arrived": round(r.arrived - t0, 3),
                                      "finished": round(r.finished - t0, 3) if r.finished else None,
                                      "what": ses_subject(r.body) if name == "ses" else r.text[:300]}) + "\n")


def test_chaos_soak_short(fault_proxy, fault_run):
    rng = random.Random(SEED)
    print(f"\nSOAK seed={SEED} seconds={SECONDS:.0f} rate={RATE}/s (replay: ORDERS_CDC_SOAK_SEED={SEED})", flush=True)
    wall_start = time.monotonic()
    run = fault_run(daemon=False)
    # SES answers in 50-250 ms (AWS's median is ~60 ms), so a kill often finds sends in flight.
    latency = random.Random(SEED + 1)
    proxies = {name: fault_proxy(run.stack.endpoints[name]) for name in ("sqs", "firehose")}
    proxies["ses"] = fault_proxy(run.stack.endpoints["ses"], delay=lambda body: latency.uniform(0.05, 0.25))
    # Short leases, so a send a kill interrupted is retried within the soak (the lock lease
    # must exceed the handler timeout), as in the kill-9-with-slow-downstream scenario.
    supervisor = run.start_daemon(AWS_ENDPOINT_URL_SES=proxies["ses"].url, AWS_ENDPOINT_URL_SQS=proxies["sqs"].url,
                                  AWS_ENDPOINT_URL_FIREHOSE=proxies["firehose"].url,
                                  ORDERS_CDC_HANDLER_TIMEOUT_SECONDS="20",
                                  ORDERS_CDC_IDEMPOTENCY_LOCK_SECONDS="30")
    oracle = History(orders=0, prefix=PREFIX)
    traffic = Traffic(run, oracle, RATE)
    traffic.start()
    t0 = time.monotonic()  # traffic and faults start with the daemon; a kill waits until it is live
    print(f"SOAK stack up after {t0 - wall_start:.0f}s; traffic and faults for {SECONDS:.0f}s", flush=True)

    faults: list[Fault] = []
    kills: list[Kill] = []
    poison_seqs: dict[str, bytes] = {}  # sequence number -> the poison record's data
    retired: set[int] = set()  # children present at the last kill or restart
    stopped_in_flight: list[dict] = []  # per SIGTERM, each proxy's calls in flight at it
    deck: list[str] = []

    def wait_live():
        """The daemon runs fresh children (a kill or SIGTERM restarts the JVM)."""
        def live():
            kids = child_pids(supervisor.pid)
            return kids if jvm_pid(supervisor.pid) and kids and not set(kids) <= retired else None
        kids = wait_until(live, 240, 0.5, "the daemon's fresh children")
        # ... and they are at work: a Firehose call began after they were seen.
        since = time.monotonic()
        wait_until(lambda: any(r.arrived > since for r in proxies["firehose"].requests[-20:]), 120, 0.2,
                   "the fresh children at work")
        return [k for k in child_pids(supervisor.pid) if k not in retired] or kids

    def kill9_child(f):
        kids = wait_live()
        time.sleep(rng.uniform(0, 2))
        f.start = time.monotonic()  # the fault itself, not the wait before it
        pid = rng.choice(sorted(kids))
        retired.update(kids)
        kills.append(freeze_and_kill(pid, proxies))
        f.detail = {"pid": pid}

    def kill9_daemon(f):
        kids = wait_live()
        time.sleep(rng.uniform(0, 2))
        kids = child_pids(supervisor.pid)
        f.start = time.monotonic()  # the fault itself, not the wait before it
        jvm = jvm_pid(supervisor.pid)
        retired.update(kids)
        kills.append(freeze_and_kill(jvm, proxies, frozen=kids))  # its children's calls in flight count
        f.detail = {"jvm": jvm}

    def sigterm_daemon(f):
        wait_live()
        time.sleep(rng.uniform(0, 2))
        kids = child_pids(supervisor.pid)
        f.start = time.monotonic()  # the fault itself, not the wait before it
        retired.update(kids)
        f.detail = {"jvm": jvm_pid(supervisor.pid)}
        ecs_stop(f.detail["jvm"])
        # The children start nothing once they hear it; what was in flight ends with its
        # done-marker unless the daemon's grace runs out first (then the worker dies in the window).
        at_stop = {name: p.in_flight_at(time.monotonic()) for name, p in proxies.items()}
        stopped_in_flight.append(at_stop)
        f.detail["ses_in_flight"] = len(at_stop["ses"])

    def burst(f, proxy, flag):
        seconds = rng.uniform(3, 6)
        wait_live()  # an outage while the daemon restarts would not be felt
        f.start = time.monotonic()
        flag(proxy).set()
        time.sleep(seconds)
        flag(proxy).clear()
        f.detail.update(seconds=round(seconds, 1), refused=sum(1 for r in proxy.requests if r.arrived >= f.start
                                                              and r.status in (400, 503)))

    def downstream_5xx(f):
        target = rng.choice(["ses", "sqs"])
        f.detail = {"service": target}
        burst(f, proxies[target], lambda p: p.failing)

    def ses_throttling(f):
        burst(f, proxies["ses"], lambda p: p.throttling)

    def duplicates(f):
        history = History(orders=8, prefix=f"{PREFIX}-d{len(faults):03d}")
        docs = history.kds_changes(run.cfg.names.orders_table, created_us=int(time.time() * 1_000_000))
        stream = duplicated_and_reordered(docs)
        put_changes(run, stream)
        history.versions = [d for _, d in docs]
        traffic.add(history, time.monotonic(), [(oid, status) for oid, path in history.paths.items() for status in path])
        f.detail = {"orders": len(history.paths), "records": len(stream)}

    def poison(f):
        seqs = put_records(run, [(data, f"poison-{i}") for i, (data, _) in enumerate(POISON)])
        poison_seqs.update(zip(seqs, (data for data, _ in POISON)))
        f.detail = {"records": len(seqs)}

    inject = {"kill9_child": kill9_child, "kill9_daemon": kill9_daemon, "sigterm_daemon": sigterm_daemon,
              "downstream_5xx": downstream_5xx, "ses_throttling": ses_throttling, "duplicates": duplicates,
              "poison": poison}
    wait_live()  # the first start of the JVM takes a while: the first fault comes once it works
    print(f"SOAK daemon at work after {time.monotonic() - t0:.0f}s", flush=True)
    next_at = time.monotonic() + rng.uniform(5, 12)
    while next_at < t0 + SECONDS:
        time.sleep(max(0.0, next_at - time.monotonic()))
        assert traffic.error is None, traffic.error
        assert supervisor.alive(), "the supervisor runs"
        if not deck:  # every kind once, in a random order, no two restarts in a row; then again
            others, restarts = rng.sample(OTHERS, len(OTHERS)), rng.sample(RESTARTS, len(RESTARTS))
            deck = [others.pop()]
            while restarts:
                deck += [restarts.pop(), others.pop()]
        f = Fault(deck.pop(0), time.monotonic(), 0.0)
        inject[f.kind](f)
        f.end = time.monotonic()
        faults.append(f)
        print(f"SOAK fault {len(faults)} {time.strftime('%H:%M:%S')} at {f.start - t0:.0f}-{f.end - t0:.0f}s: "
              f"{f.kind} {f.detail}", flush=True)
        next_at = f.end + rng.uniform(*GAP)
    traffic.stop.set()
    traffic.join(max(180.0, SECONDS))  # it ends the history it is writing (slowly, once moto has slowed)
    assert not traffic.is_alive() and traffic.error is None, traffic.error
    traffic_end = time.monotonic()

    # Wait on what the proxies saw (cheap), then on the stack itself (harness.caught_up).
    def all_done():
        with traffic.lock:
            last = [Fault("end", traffic_end, traffic_end)]
            return _recoveries(last, traffic.written, proxies)[0] is not None
    wait_until(all_done, 360, 2.0, "every change done, as the proxies saw it")
    caught = time.monotonic()
    seen = caught_up(run, oracle, timeout=120, ses_proxy=proxies["ses"])
    wait_until(lambda: len({l["sequence_number"] for l in observe(run, PREFIX, proxies["ses"]).dead_letters})
               >= len(poison_seqs), 120, 2.0, "every poison record dead-lettered")
    seen = observe(run, PREFIX, proxies["ses"])
    assert supervisor.alive(), "the supervisor runs"

    # Calls in flight at each kill -9 (a port may be reused in a long run: look 60 s back).
    # and the sends answered in the MARKER_WINDOW before a kill: their done-markers (written
    # when their round ends) may not have been yet. Either may go twice (README: "at least
    # once if the worker dies between the send and its done-marker").
    in_flight = {name: [r for k in kills for r in k.calls_in_flight(proxies, since=60)[name]]
                 + [r for at_stop in stopped_in_flight for r in at_stop[name]] for name in proxies}
    answered = {name: [r for k in kills for r in answered_before(k, proxies)[name]] for name in proxies}
    refunded = oracle.expected_refunds()
    ses_at_kills, refunds_at_kills = emails_in(in_flight["ses"]), refunds_in(in_flight["sqs"], refunded)
    ses_window = emails_in(in_flight["ses"] + answered["ses"])
    refunds_window = refunds_in(in_flight["sqs"] + answered["sqs"], refunded)
    twice, refunds_twice = sent_twice(oracle, seen)
    _dump_requests(proxies, t0, kills, faults)
    recoveries = _recoveries(faults, traffic.written, proxies)
    measured = [r for r in recoveries if r is not None]
    letters = seen.dead_letters
    distinct_letters = {l["sequence_number"] for l in letters}
    counts = counts_of("chaos soak", oracle, seen)
    soak = {
        "scenario": "chaos soak",
        "seed": SEED,
        "seconds": round(traffic_end - t0),
        "wall_s": round(time.monotonic() - wall_start),
        "rate_per_s": RATE,
        "changes_written": len(traffic.written),
        "changes_lost": counts["changes_lost"],
        "faults": dict(Counter(f.kind for f in faults)),
        "redeliveries": counts["changes_redelivered"],
        "changes_seen_twice_or_more": sum(1 for n in seen.changes.values() if n > 1),
        "dead_letters": len(letters),
        "dead_letters_duplicated": len(letters) - len(distinct_letters),
        "poison_records": len(poison_seqs),
        "emails": sum(seen.emails.values()),
        "emails_duplicated": sum(twice.values()),
        "emails_duplicated_in_flight_at_a_kill": sum((twice & ses_at_kills).values()),
        "ses_calls_in_flight_at_kills": sum(ses_at_kills.values()),
        "ses_calls_answered_in_the_marker_window": sum(emails_in(answered["ses"]).values()),
        "refunds_duplicated": sum(refunds_twice.values()),
        "refunds_duplicated_in_flight_at_a_kill": sum((refunds_twice & refunds_at_kills).values()),
        "refunds_in_flight_at_kills": sum(refunds_at_kills.values()),
        "refunds_answered_in_the_marker_window": sum(refunds_in(answered["sqs"], refunded).values()),
        "refused_5xx": {name: p.refused for name, p in proxies.items() if p.refused},
        "ses_throttled": proxies["ses"].throttled,
        "longest_recovery_s": max(measured, default=None),
        "recovery_s": [(f.kind, r) for f, r in zip(faults, recoveries)],
        "last_fault_to_caught_up_s": round(caught - faults[-1].start, 1) if faults else None,
    }
    emit("SOAK", soak)

    assert len(faults) >= 3, "faults were injected"
    # The emails read from the proxy are the ones SES (moto) counts as sent.
    assert run.client("ses").get_send_quota()["SentLast24Hours"] == sum(seen.emails.values())
    assert counts["changes_lost"] == 0, soak
    # Emails and refunds exactly once, except a send in flight at a kill -9 (its done-marker
    # could not be written): that one may go twice (README "Delivery guarantees").
    assert not twice - ses_window, f"only emails sent just before or at a kill may go twice: {twice - ses_window}"
    assert sum(twice.values()) <= sum(ses_window.values())
    assert not refunds_twice - refunds_window, \
        f"only refunds sent just before or at a kill may go twice: {refunds_twice - refunds_window}"
    # Everything else exactly once; counters (metrics, inventory) exact.
    assert_exact(oracle, dataclasses.replace(seen, emails=seen.emails - twice, refunds=seen.refunds - refunds_twice),
                 counts)
    # Every poison record dead-lettered, with its original bytes and a reason; nothing else.
    needles = dict(POISON)
    assert distinct_letters == set(poison_seqs), "each poison record dead-lettered, and no other record"
    for letter in letters:
        data = base64.b64decode(letter["record"]["data"])
        assert data == poison_seqs[letter["sequence_number"]], letter
        assert needles[data] in letter["reason"] and letter["reason"] and letter["shard_id"], letter
    # The view: one live row per product of each order, whatever the faults.
    rows = _scan(run.client("dynamodb"), run.cfg.names.product_orders_table)
    expected = {(line["product_id"], oid) for oid in oracle.paths for line in oracle.first[oid]["items"]}
    assert {(r["product_id"], r["order_id"]) for r in rows if "deleted" not in r and r["order_id"].startswith(PREFIX)} \
        == expected
