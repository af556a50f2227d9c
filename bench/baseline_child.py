"""B1's baseline child: the usual approach, with the same routes and handlers as ours.

amazon-kclpy's own loop (``amazon_kclpy.kcl.KCLProcess``: stdlib ``json`` on every line)
and a v3 ``RecordProcessorBase`` that does what kclpy's sample and most Lambda code do:
``record.binary_data`` (base64), ``json.loads``, boto3's ``TypeDeserializer`` on the keys and
both images, eagerly; then the same routes (``processors.all_routes``, the same predicates)
and the same handler functions, against the same in-memory clients (``bench.fakes``), one
call per route per batch; checkpoint at the end of every batch.

What differs from our child is therefore only the protocol loop, the decoding and the
batch plumbing; the handlers' own work is identical. (boto3's TypeDeserializer cannot take
the base64 text that B/BS values are on the wire and raises TypeError; the usual fix, also
Powertools', is to decode it in ``_deserialize_b``/``_deserialize_bs``, done here.)

    python -m bench.baseline_child [--mode full|route-only] [--calls-out FILE] [--clients fake|real]

``--clients real`` (B5) gives the handlers real boto3 clients (``orders_cdc.app.Clients``,
honouring AWS_ENDPOINT_URL) instead of ``bench.fakes``: the same sequential loop, through
botocore and HTTP to whatever endpoint the environment names.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
import traceback
from datetime import datetime, timezone

from amazon_kclpy import kcl
from amazon_kclpy.v3 import processor
from boto3.dynamodb.types import TypeDeserializer

from bench.fakes import CallLog, FakeClients, bench_routes
from orders_cdc.app import Context
from orders_cdc.change import ChangeRecord, EventName, Position, SourceFormat
from orders_cdc.counters import MAX_TRANSACTION_ITEMS, merge, update_action
from orders_cdc.routing import Idempotency

_TTL_PRINCIPAL = "dynamodb.amazonaws.com"
_UNITS = {"MICROSECOND": 1, "MILLISECOND": 1000}


class Deserializer(TypeDeserializer):
    def _deserialize_b(self, value):
        return base64.b64decode(value)

    def _deserialize_bs(self, value):
        return {base64.b64decode(v) for v in value}


class UsualProcessor(processor.RecordProcessorBase):
    def __init__(self, routes, ctx) -> None:
        self.routes = routes
        self.ctx = ctx
        self.shard_id = ""
        self.deserializer = Deserializer()

    def initialize(self, initialize_input) -> None:
        self.shard_id = initialize_input.shard_id

    def _image(self, image):
        if image is None:
            return None
        deserialize = self.deserializer.deserialize
        return {name: deserialize(value) for name, value in image.items()}

    def _change(self, record) -> ChangeRecord:
        data = record.binary_data
        doc = json.loads(data)
        ddb = doc["dynamodb"]
        created_us = ddb["ApproximateCreationDateTime"] * _UNITS[ddb.get("ApproximateCreationDateTimePrecision", "MILLISECOND")]
        new_av, old_av = ddb.get("NewImage"), ddb.get("OldImage")
        change = ChangeRecord(
            table=doc["tableName"],
            event=EventName(doc["eventName"]),
            event_id=doc["eventID"],
            keys=self._image(ddb["Keys"]),
            created_at=datetime.fromtimestamp(created_us / 1_000_000, tz=timezone.utc),
            created_us=created_us,
            ttl_delete=(doc.get("userIdentity") or {}).get("principalId") == _TTL_PRINCIPAL,
            size_bytes=ddb.get("SizeBytes"),
            source=SourceFormat.KINESIS,
            position=Position(self.shard_id, record.sequence_number, record.sub_sequence_number or 0),
            raw=data,
            new_av=new_av,
            old_av=old_av,
        )
        # Eager, as usual: both images unmarshalled up front; the handlers then read these.
        object.__setattr__(change, "_new_image", self._image(new_av))
        object.__setattr__(change, "_old_image", self._image(old_av))
        return change

    def process_records(self, process_records_input) -> None:
        work: dict = {}
        last = None
        for record in process_records_input.records:
            change = self._change(record)
            for route in self.routes:
                if route.matches(change):
                    work.setdefault(route, []).append(change)
            last = record
        for route, changes in work.items():
            try:
                if route.per_change:  # one change after the other
                    out = []
                    for change in changes:
                        try:
                            out.append(route.handler(change, self.ctx))
                        except Exception:  # the sample logs and carries on
                            traceback.print_exc(file=sys.stderr)
                else:
                    out = route.handler(changes, self.ctx)
                if route.idempotency is Idempotency.ATOMIC:
                    self._write_counters(out)
            except Exception:  # the sample logs and carries on
                traceback.print_exc(file=sys.stderr)
        if last is not None:
            process_records_input.checkpointer.checkpoint(last.sequence_number, last.sub_sequence_number)

    def _write_counters(self, out) -> None:
        """Our counter routes return their ADD deltas; the usual code writes them straight
        away (summed per batch, 100 per transaction), with no done-markers."""
        updates = merge(u for entry in out if not isinstance(entry, BaseException) for u in entry)
        for start in range(0, len(updates), MAX_TRANSACTION_ITEMS):
            self.ctx.clients.dynamodb.transact_write_items(
                TransactItems=[{"Update": update_action(u)} for u in updates[start : start + MAX_TRANSACTION_ITEMS]])

    def lease_lost(self, lease_lost_input) -> None:
        pass

    def shard_ended(self, shard_ended_input) -> None:
        shard_ended_input.checkpointer.checkpoint()

    def shutdown_requested(self, shutdown_requested_input) -> None:
        shutdown_requested_input.checkpointer.checkpoint()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.baseline_child")
    parser.add_argument("--mode", choices=("full", "route-only"), default="full")
    parser.add_argument("--calls-out")
    parser.add_argument("--clients", choices=("fake", "real"), default="fake")
    args = parser.parse_args(argv)

    from orders_cdc import settings as settings_module
    from orders_cdc.app import Clients
    from processors import all_routes

    settings = settings_module.load()
    calls = CallLog()
    routes = bench_routes(all_routes(settings.resources), args.mode, calls)
    clients = Clients(settings) if args.clients == "real" else FakeClients(settings, calls)
    ctx = Context(settings, clients)
    try:
        kcl.KCLProcess(UsualProcessor(routes, ctx)).run()
    finally:
        calls.save(args.calls_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
