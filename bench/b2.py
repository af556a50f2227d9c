"""B2: decode + unmarshall alone, in-process, ours against the usual decoders.

Every candidate starts from the daemon's record (``data`` is base64 text, as in a
``processRecords`` line) and ends with the change's keys and both images as plain Python
(Decimal numbers, sets, bytes). Batches of 1,000 are decoded and kept alive together, as a
batch is in the processor, then dropped. Candidates run interleaved; medians of the runs.

- ours: ``orders_cdc.change.decode_kcl_record`` + ``.keys``, ``.new_image``, ``.old_image``.
- ours, routing read: the same decode, then only ``status`` from both images (what routing
  reads; the rest of the images stays undecoded).
- TypeDeserializer: base64 + stdlib ``json`` + boto3's ``TypeDeserializer`` (B/BS decoded from
  base64 in ``_deserialize_b``/``_bs``, as the usual fix does: boto3 raises on base64 text).
- orjson + TypeDeserializer: the same with orjson, to separate parsing from unmarshalling.
- Powertools: base64 + ``json`` + ``DynamoDBRecord(...).dynamodb.keys/new_image/old_image``
  (Powertools leaves B values as base64 text: slightly less work than the others).
- the unmarshaller alone (keys and both images, without base64, JSON parsing and the envelope):
  ours (``unmarshal_map``), the same with the C fast path (``orders_cdc/_avfast.c``) swapped for
  the pure-Python one it replaces, and TypeDeserializer. Paired: the candidates take turns on
  the same records within each batch, in an order that rotates record by record, so a slow
  spell of this shared VM falls on all of them alike. Two ways:
  - hot, as the pipeline runs it: each document is parsed with orjson and unmarshalled by each
    candidate straight away, while it is still in the CPU cache (the pipeline decodes a
    matched change's images right after routing it). Each call is timed (``perf_counter``);
  - cold: each candidate on its own copy of the documents, parsed before the run started, so
    the CPU cache has lost them: what handlers would pay unmarshalling after a whole batch.
  The collector is paused while they run: its walks over the live batch start at whichever
  allocation crosses the threshold (a parse or a candidate), and one full collection in a
  timed call moves a figure by half. That favours TypeDeserializer, which allocates more.
"""

from __future__ import annotations

import base64
import gc
import json
import time
from collections.abc import Callable
from typing import Any

import orjson

from bench.baseline_child import Deserializer
from bench.common import MIB, median
from orders_cdc.change import decode_kcl_record

SHARD = "shardId-000000000000"


def _ours(records: list[dict]) -> list[Any]:
    out = []
    for record in records:
        change = decode_kcl_record(record, SHARD)
        out.append((change, change.keys, change.new_image, change.old_image))
    return out


def _ours_routing(records: list[dict]) -> list[Any]:
    out = []
    for record in records:
        change = decode_kcl_record(record, SHARD)
        out.append((change, change.new_value("status"), change.old_value("status")))
    return out


def _type_deserializer(loads: Callable[[Any], Any]) -> Callable[[list[dict]], list[Any]]:
    deserialize = Deserializer().deserialize

    def image(av: dict | None) -> dict | None:
        return None if av is None else {k: deserialize(v) for k, v in av.items()}

    def decode(records: list[dict]) -> list[Any]:
        out = []
        for record in records:
            doc = loads(base64.b64decode(record["data"]))
            ddb = doc["dynamodb"]
            out.append((doc, image(ddb["Keys"]), image(ddb.get("NewImage")), image(ddb.get("OldImage"))))
        return out

    return decode


def _powertools() -> Callable[[list[dict]], list[Any]] | None:
    try:
        from aws_lambda_powertools.utilities.data_classes.dynamo_db_stream_event import DynamoDBRecord
    except ImportError:
        return None

    def decode(records: list[dict]) -> list[Any]:
        out = []
        for record in records:
            rec = DynamoDBRecord(json.loads(base64.b64decode(record["data"])))
            ddb = rec.dynamodb  # a new wrapper on every access: take it once
            out.append((rec, ddb.keys, ddb.new_image, ddb.old_image))
        return out

    return decode


def _unmarshal_ours(doc: dict) -> Any:
    from orders_cdc.attrvalue import unmarshal_map

    ddb = doc["dynamodb"]
    return unmarshal_map(ddb["Keys"]), unmarshal_map(ddb.get("NewImage") or {}), unmarshal_map(ddb.get("OldImage") or {})


def _pure_python(unmarshal: Callable[[dict], Any]) -> Callable[[dict], Any]:
    """The same, with the C fast path (orders_cdc/_avfast.c) swapped for the Python one."""
    from orders_cdc import attrvalue

    def run(doc: dict) -> Any:
        saved = attrvalue._fast_map, attrvalue._fast_value
        attrvalue._fast_map, attrvalue._fast_value = attrvalue._py_fast_map, attrvalue._py_fast_value
        try:
            return unmarshal(doc)
        finally:
            attrvalue._fast_map, attrvalue._fast_value = saved

    return run


def _unmarshal_typedeserializer() -> Callable[[dict], Any]:
    deserialize = Deserializer().deserialize

    def run(doc: dict) -> Any:
        ddb = doc["dynamodb"]
        return tuple({k: deserialize(v) for k, v in (ddb.get(name) or {}).items()} for name in ("Keys", "NewImage", "OldImage"))

    return run


def unmarshallers() -> dict[str, Callable[[dict], Any]]:
    return {"ours": _unmarshal_ours, "ours_pure_python": _pure_python(_unmarshal_ours),
            "typedeserializer": _unmarshal_typedeserializer()}


def _paired(raws: list[bytes], batch: int, reps: int) -> dict[str, dict[str, list[float]]]:
    """Seconds each unmarshaller spent per rep, {"hot": {name: [...]}, "cold": {...}}."""
    funcs = unmarshallers()
    names = list(funcs)
    copies = {name: [orjson.loads(raw) for raw in raws] for name in names}  # cold: one copy each
    clock = time.perf_counter
    spent: dict[str, dict[str, list[float]]] = {how: {name: [] for name in names} for how in ("hot", "cold")}
    enabled = gc.isenabled()
    for _ in range(reps):
        gc.collect()
        gc.disable()
        try:
            hot, cold = dict.fromkeys(names, 0.0), dict.fromkeys(names, 0.0)
            for start in range(0, len(raws), batch):
                kept: list[Any] = []
                for j, raw in enumerate(raws[start : start + batch]):
                    doc = orjson.loads(raw)
                    for k in range(len(names)):
                        name = names[(j + k) % len(names)]
                        t0 = clock()
                        kept.append(funcs[name](doc))
                        hot[name] += clock() - t0
                for k in range(len(names)):
                    name = names[(start // batch + k) % len(names)]
                    f = funcs[name]
                    t0 = clock()
                    kept.extend([f(doc) for doc in copies[name][start : start + batch]])
                    cold[name] += clock() - t0
                del kept
        finally:
            if enabled:
                gc.enable()
        for name in names:
            spent["hot"][name].append(hot[name])
            spent["cold"][name].append(cold[name])
    return spent


def candidates() -> dict[str, Callable[[list[dict]], list[Any]] | None]:
    """Whole-record candidates, on the daemon's records."""
    return {
        "ours": _ours,
        "ours_routing_read": _ours_routing,
        "typedeserializer": _type_deserializer(json.loads),
        "orjson_typedeserializer": _type_deserializer(orjson.loads),
        "powertools": _powertools(),
    }


def _check_equal(records: list[dict]) -> None:
    """The candidates must produce the same images, or the comparison means nothing."""
    ours = _ours(records)
    usual = _type_deserializer(json.loads)(records)
    for (_, keys, new, old), (_, k2, n2, o2) in zip(ours, usual):
        if (keys, new, old) != (k2, n2, o2):
            raise AssertionError(f"ours and TypeDeserializer disagree on {keys}")
    # The unmarshallers timed alone too (the pure-Python path included).
    funcs = unmarshallers()
    for record in records:
        doc = orjson.loads(base64.b64decode(record["data"]))
        first, *others = (tuple(f(doc)) for f in funcs.values())
        if any(other != first for other in others):
            raise AssertionError(f"the unmarshallers disagree on {doc['dynamodb']['Keys']}")


def run(records: list[dict], payload_bytes: int, reps: int = 5, batch: int = 1000, progress=print) -> dict[str, Any]:
    """Every candidate under the GC settings of our child (app.tune_gc): with CPython's
    defaults the collector's walks over the live batch land on whichever candidate happens
    to allocate when they trigger, and swamp the decoders' own differences."""
    from orders_cdc.app import tune_gc

    thresholds = gc.get_threshold()
    tune_gc()
    try:
        return _run(records, payload_bytes, reps, batch, progress)
    finally:
        gc.unfreeze()
        gc.set_threshold(*thresholds)


def _run(records: list[dict], payload_bytes: int, reps: int, batch: int, progress) -> dict[str, Any]:
    _check_equal(records[:200])
    funcs = {name: f for name, f in candidates().items() if f is not None}
    batches = [records[i : i + batch] for i in range(0, len(records), batch)]
    cpu: dict[str, list[float]] = {name: [] for name in funcs}
    wall: dict[str, list[float]] = {name: [] for name in funcs}
    for rep in range(reps):
        order = list(funcs) if rep % 2 == 0 else list(reversed(funcs))
        for name in order:
            gc.collect()
            c0, w0 = time.process_time(), time.perf_counter()
            for chunk in batches:
                kept = funcs[name](chunk)
                del kept
            cpu[name].append(time.process_time() - c0)
            wall[name].append(time.perf_counter() - w0)
    n = len(records)
    out: dict[str, Any] = {"records": n, "payload_mib": round(payload_bytes / MIB, 2), "runs": reps,
                           "gc": f"as our child: freeze() + thresholds {gc.get_threshold()}",
                           "rates": "per CPU second of this process (medians); wall-clock beside", "candidates": {}}
    for name in funcs:
        t, w = median(cpu[name]), median(wall[name])
        out["candidates"][name] = {
            "records_per_s": round(n / t),
            "payload_mb_per_s": round(payload_bytes / MIB / t, 2),
            "us_per_record": round(t / n * 1e6, 1),
            "wall_records_per_s": round(n / w),
        }
        progress(f"  B2 {name:24} {n / t:>10,.0f} rec/CPU s  {t / n * 1e6:7.1f} us/record  (wall {n / w:,.0f} rec/s)")
    base = out["candidates"]["typedeserializer"]["records_per_s"]
    ours = out["candidates"]["ours"]["records_per_s"]
    out["ratio_vs_typedeserializer"] = round(ours / base, 2)
    out["routing_read_ratio_vs_typedeserializer"] = round(out["candidates"]["ours_routing_read"]["records_per_s"] / base, 2)
    paired = _paired([base64.b64decode(r["data"]) for r in records], batch, reps)
    out["unmarshaller"] = {"records": n, "runs": reps, "timing": "perf_counter per call (hot) or per batch (cold), "
                           "collector paused; medians of the runs", "hot": {}, "cold": {}}
    for how, spent in paired.items():
        section = out["unmarshaller"][how]
        for name, seconds in spent.items():
            t = median(seconds)
            section[name] = {"records_per_s": round(n / t), "us_per_record": round(t / n * 1e6, 1)}
            progress(f"  B2 unmarshaller {how:4} {name:18} {n / t:>10,.0f} rec/s  {t / n * 1e6:7.1f} us/record")
        usual = spent["typedeserializer"]
        section["ratio_vs_typedeserializer"] = round(median(usual) / median(spent["ours"]), 2)
        section["pure_python_ratio_vs_typedeserializer"] = round(median(usual) / median(spent["ours_pure_python"]), 2)
        # Each run's own ratio too: the pairing should keep these close, whatever the VM does.
        section["ratio_each_run"] = [round(u / o, 2) for u, o in zip(usual, spent["ours"])]
    from orders_cdc import attrvalue

    out["c_fast_path"] = attrvalue.ACCELERATED  # False: built without a C compiler; "ours" is pure Python
    if "powertools" in out["candidates"]:
        out["ratio_vs_powertools"] = round(ours / out["candidates"]["powertools"]["records_per_s"], 2)
    else:
        out["ratio_vs_powertools"] = None
        out["powertools"] = "not installed (pip install '.[bench]')"
    return out
