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
- images only: ``unmarshal_map`` against TypeDeserializer on already-parsed documents (the
  unmarshaller alone, without base64, JSON parsing and the envelope; the documents were parsed
  earlier, as in the pipeline, where handlers unmarshal images after the whole batch is routed); also with the C fast
  path (``orders_cdc/_avfast.c``) swapped for the pure-Python one it replaces.
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


def _images_ours(docs: list[dict]) -> list[Any]:
    from orders_cdc.attrvalue import unmarshal_map

    return [(unmarshal_map(d["dynamodb"]["Keys"]), unmarshal_map(d["dynamodb"].get("NewImage") or {}),
             unmarshal_map(d["dynamodb"].get("OldImage") or {})) for d in docs]


def _images_ours_pure_python(docs: list[dict]) -> list[Any]:
    """The same, with the C fast path (orders_cdc/_avfast.c) swapped for the Python one."""
    from orders_cdc import attrvalue

    saved = attrvalue._fast_map, attrvalue._fast_value
    attrvalue._fast_map, attrvalue._fast_value = attrvalue._py_fast_map, attrvalue._py_fast_value
    try:
        return _images_ours(docs)
    finally:
        attrvalue._fast_map, attrvalue._fast_value = saved


def _images_typedeserializer(docs: list[dict]) -> list[Any]:
    deserialize = Deserializer().deserialize
    return [tuple({k: deserialize(v) for k, v in (d["dynamodb"].get(name) or {}).items()}
                  for name in ("Keys", "NewImage", "OldImage")) for d in docs]


def candidates() -> dict[str, Callable[[list[dict]], list[Any]] | None]:
    """Candidates on the daemon's records; the *_images_only ones get parsed documents."""
    return {
        "ours": _ours,
        "ours_routing_read": _ours_routing,
        "typedeserializer": _type_deserializer(json.loads),
        "orjson_typedeserializer": _type_deserializer(orjson.loads),
        "powertools": _powertools(),
        "ours_images_only": _images_ours,
        "ours_pure_python_images_only": _images_ours_pure_python,
        "typedeserializer_images_only": _images_typedeserializer,
    }


def _check_equal(records: list[dict]) -> None:
    """The candidates must produce the same images, or the comparison means nothing."""
    ours = _ours(records)
    usual = _type_deserializer(json.loads)(records)
    for (_, keys, new, old), (_, k2, n2, o2) in zip(ours, usual):
        if (keys, new, old) != (k2, n2, o2):
            raise AssertionError(f"ours and TypeDeserializer disagree on {keys}")


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
    docs = [orjson.loads(base64.b64decode(r["data"])) for r in records]
    doc_batches = [docs[i : i + batch] for i in range(0, len(docs), batch)]
    cpu: dict[str, list[float]] = {name: [] for name in funcs}
    wall: dict[str, list[float]] = {name: [] for name in funcs}
    for rep in range(reps):
        order = list(funcs) if rep % 2 == 0 else list(reversed(funcs))
        for name in order:
            gc.collect()
            c0, w0 = time.process_time(), time.perf_counter()
            for chunk in doc_batches if name.endswith("_images_only") else batches:
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
    images = out["candidates"]
    out["images_only_ratio_vs_typedeserializer"] = round(
        images["ours_images_only"]["records_per_s"] / images["typedeserializer_images_only"]["records_per_s"], 2)
    out["pure_python_images_only_ratio_vs_typedeserializer"] = round(
        images["ours_pure_python_images_only"]["records_per_s"] / images["typedeserializer_images_only"]["records_per_s"], 2)
    from orders_cdc import attrvalue

    out["c_fast_path"] = attrvalue.ACCELERATED  # False: built without a C compiler; "ours" is pure Python
    if "powertools" in out["candidates"]:
        out["ratio_vs_powertools"] = round(ours / out["candidates"]["powertools"]["records_per_s"], 2)
    else:
        out["ratio_vs_powertools"] = None
        out["powertools"] = "not installed (pip install '.[bench]')"
    return out
