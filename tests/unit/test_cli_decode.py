"""`orders-cdc decode`: records as the processor sees them, one JSON line each."""

import base64
import subprocess
import sys
from pathlib import Path

import orjson

from tests.factories import kds_record, streams_record

ROOT = Path(__file__).resolve().parents[2]


def decode(*lines: bytes) -> list[bytes]:
    proc = subprocess.run([sys.executable, "-m", "orders_cdc.cli", "decode"], input=b"\n".join(lines) + b"\n",
                          cwd=ROOT, capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr.decode()
    return proc.stdout.splitlines()


def test_all_three_forms_and_a_bad_line():
    doc = orjson.dumps(kds_record("INSERT", new={"order_id": "o-1", "total": "x"}, old=None, keys={"order_id": "o-1"},
                                  new_av={"order_id": {"S": "o-1"}, "total": {"N": "12345678901234567890.123456789012345678"},
                                          "tags": {"SS": ["b", "a"]}, "sig": {"B": "AAE="}}))
    streams = orjson.dumps(streams_record("REMOVE", new=None, old={"order_id": "o-2"}, keys={"order_id": "o-2"}))
    out = decode(doc, base64.b64encode(doc), streams, b"not a record")
    assert out[0] == out[1], "JSON and its base64 form decode alike"
    assert b'"total":12345678901234567890.123456789012345678' in out[0], "numbers are exact literals"
    first = orjson.loads(out[0])
    assert first["new"]["tags"] == ["a", "b"] and first["new"]["sig"] == "AAE="
    assert first["created_at"] == "2024-07-15T02:39:25.891550Z"
    assert set(first) == {"table", "event", "keys", "new", "old", "created_at", "ttl_delete"}
    assert orjson.loads(out[2])["event"] == "REMOVE"
    bad = orjson.loads(out[3])
    assert bad["raw"] == "not a record" and bad["error"]
