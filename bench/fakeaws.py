"""A fake AWS endpoint for B5: minimal valid replies after a realistic per-service delay.

    python -m bench.fakeaws --port 0 --profile aws --stats-out FILE

Prints its port on stdout's first line and binds 127.0.0.1 only. A hand-written HTTP/1.1
server on asyncio with keep-alive: every call waits its delay in ``asyncio.sleep``, so calls
overlap and any number can be in flight. The operation comes from ``X-Amz-Target``
(DynamoDB ``DynamoDB_20120810.X``, Firehose ``Firehose_20150804.X``, SQS JSON ``AmazonSQS.X``)
or from the form's ``Action=`` (SES v1 and SQS query protocol, XML replies); the service from
the SigV4 credential scope. Nothing is stored: each reply is the smallest one botocore
accepts as a success (GetItem finds nothing, BatchGetItem returns every table empty, batch
writes leave nothing unprocessed, SQS replies carry the MD5 digests botocore checks).

Delay profiles (``--profile``): ``zero``; ``aws`` (medians, see shared notes on AWS limits):
DynamoDB 6 ms, its TransactWriteItems 12 ms, SQS 15 ms, Firehose 30 ms, SES 60 ms;
``aws-p99``: three times ``aws``.

Counted: calls per ``service.Operation``, unknown operations (answered 400), the most calls
in flight at once (overall and per service), and this process's CPU seconds. ``GET /__stats``
returns them as JSON, ``GET /__reset`` starts them again (the runner calls it after its
warm-up); on SIGTERM/SIGINT they are written to ``--stats-out``.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import signal
import struct
import sys
import time
import uuid
from collections import Counter
from typing import Any
from urllib.parse import parse_qsl

_AWS_MS = {"dynamodb": 6.0, "sqs": 15.0, "firehose": 30.0, "ses": 60.0}
_AWS_OP_MS = {("dynamodb", "TransactWriteItems"): 12.0}
PROFILES = ("zero", "aws", "aws-p99")
_TARGET_SERVICES = {"DynamoDB_20120810": "dynamodb", "Firehose_20150804": "firehose", "AmazonSQS": "sqs"}
_MAX_BODY = 64 * 1024 * 1024


def delay_seconds(profile: str, service: str, operation: str) -> float:
    if profile == "zero":
        return 0.0
    ms = _AWS_OP_MS.get((service, operation), _AWS_MS.get(service, 0.0))
    return ms * (3 if profile == "aws-p99" else 1) / 1000


class Stats:
    def __init__(self, profile: str) -> None:
        self.profile = profile
        self.reset()

    def reset(self) -> None:
        self.calls: Counter[str] = Counter()
        self.unknown: Counter[str] = Counter()
        self.in_flight = 0
        self.max_in_flight = 0
        self.in_flight_by_service: Counter[str] = Counter()
        self.max_in_flight_by_service: Counter[str] = Counter()
        self.connections = 0
        self.cpu0 = time.process_time()
        self.wall0 = time.monotonic()

    def enter(self, service: str) -> None:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        self.in_flight_by_service[service] += 1
        n = self.in_flight_by_service[service]
        if n > self.max_in_flight_by_service[service]:
            self.max_in_flight_by_service[service] = n

    def leave(self, service: str) -> None:
        self.in_flight -= 1
        self.in_flight_by_service[service] -= 1

    def to_json(self) -> dict[str, Any]:
        return {
            "profile": self.profile,
            "calls": dict(sorted(self.calls.items())),
            "total_calls": sum(self.calls.values()),
            "unknown_operations": dict(self.unknown),
            "max_in_flight": self.max_in_flight,
            "max_in_flight_by_service": dict(sorted(self.max_in_flight_by_service.items())),
            "connections_opened": self.connections,
            "cpu_s": round(time.process_time() - self.cpu0, 4),
            "wall_s": round(time.monotonic() - self.wall0, 3),
        }


# --- replies --------------------------------------------------------------------------------


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()  # noqa: S324 - what SQS returns, not security


def _md5_attributes(attributes: dict[str, Any]) -> str:
    """SQS's digest of message attributes (name, type, transport byte, value; length-prefixed)."""
    out = bytearray()

    def chunk(data: bytes) -> None:
        out.extend(struct.pack("!I", len(data)))
        out.extend(data)

    for name in sorted(attributes):
        attr = attributes[name]
        kind = attr.get("DataType", "String")
        chunk(name.encode())
        chunk(kind.encode())
        if "BinaryValue" in attr:
            import base64

            out.append(2)
            value = attr["BinaryValue"]
            chunk(base64.b64decode(value) if isinstance(value, str) else bytes(value))
        else:
            out.append(1)
            chunk(str(attr.get("StringValue", "")).encode())
    return _md5(bytes(out))


def _message_reply(message: dict[str, Any]) -> dict[str, Any]:
    reply = {"MessageId": str(uuid.uuid4()), "MD5OfMessageBody": _md5(str(message.get("MessageBody", "")).encode())}
    if message.get("MessageAttributes"):
        reply["MD5OfMessageAttributes"] = _md5_attributes(message["MessageAttributes"])
    return reply


def _table_description(name: str) -> dict[str, Any]:
    return {"Table": {"TableName": name, "TableStatus": "ACTIVE", "ItemCount": 0, "TableSizeBytes": 0,
                      "KeySchema": [{"AttributeName": "id", "KeyType": "HASH"}],
                      "AttributeDefinitions": [{"AttributeName": "id", "AttributeType": "S"}],
                      "TableArn": f"arn:aws:dynamodb:us-east-1:000000000000:table/{name}",
                      "BillingModeSummary": {"BillingMode": "PAY_PER_REQUEST"}}}


def json_reply(service: str, operation: str, body: dict[str, Any], port: int) -> dict[str, Any] | None:
    """The reply for a JSON-protocol call, or None for an operation not served."""
    if service == "dynamodb":
        if operation == "BatchGetItem":
            return {"Responses": {table: [] for table in body.get("RequestItems", {})}, "UnprocessedKeys": {}}
        if operation == "BatchWriteItem":
            return {"UnprocessedItems": {}}
        if operation in ("GetItem", "PutItem", "DeleteItem", "TransactWriteItems"):
            return {}
        if operation == "UpdateItem":
            return {"Attributes": {}} if body.get("ReturnValues", "NONE") != "NONE" else {}
        if operation == "TransactGetItems":
            return {"Responses": [{} for _ in body.get("TransactItems", ())]}
        if operation in ("Query", "Scan"):
            return {"Items": [], "Count": 0, "ScannedCount": 0}
        if operation == "DescribeTable":
            return _table_description(body.get("TableName", "table"))
        return None
    if service == "sqs":
        if operation == "GetQueueUrl":
            return {"QueueUrl": f"http://127.0.0.1:{port}/000000000000/{body.get('QueueName', 'queue')}"}
        if operation == "SendMessage":
            return _message_reply(body)
        if operation == "SendMessageBatch":
            return {"Successful": [{"Id": e["Id"], **_message_reply(e)} for e in body.get("Entries", ())], "Failed": []}
        return None
    if service == "firehose":
        if operation == "PutRecordBatch":
            return {"FailedPutCount": 0, "Encrypted": False,
                    "RequestResponses": [{"RecordId": uuid.uuid4().hex} for _ in body.get("Records", ())]}
        if operation == "PutRecord":
            return {"RecordId": uuid.uuid4().hex, "Encrypted": False}
        return None
    return None


def _query_list(form: dict[str, str], prefix: str) -> list[dict[str, str]]:
    """``Prefix.N.Field=value`` form entries as a list of dicts (SQS query protocol)."""
    found: dict[int, dict[str, str]] = {}
    for key, value in form.items():
        if key.startswith(prefix + "."):
            index, _, rest = key[len(prefix) + 1:].partition(".")
            if index.isdigit():
                found.setdefault(int(index), {})[rest] = value
    return [found[i] for i in sorted(found)]


def query_reply(service: str, operation: str, form: dict[str, str], port: int) -> str | None:
    """The XML reply for a query-protocol call (SES v1; SQS if botocore speaks query)."""
    rid = f"<ResponseMetadata><RequestId>{uuid.uuid4()}</RequestId></ResponseMetadata>"
    if service == "ses" and operation in ("SendEmail", "SendRawEmail"):
        return (f'<{operation}Response xmlns="http://ses.amazonaws.com/doc/2010-12-01/"><{operation}Result>'
                f"<MessageId>{uuid.uuid4()}</MessageId></{operation}Result>{rid}</{operation}Response>")
    if service == "sqs":
        ns = 'xmlns="http://queue.amazonaws.com/doc/2012-11-05/"'
        if operation == "GetQueueUrl":
            url = f"http://127.0.0.1:{port}/000000000000/{form.get('QueueName', 'queue')}"
            return f"<GetQueueUrlResponse {ns}><GetQueueUrlResult><QueueUrl>{url}</QueueUrl></GetQueueUrlResult>{rid}</GetQueueUrlResponse>"
        if operation == "SendMessage":
            r = _message_reply({"MessageBody": form.get("MessageBody", "")})
            return (f"<SendMessageResponse {ns}><SendMessageResult><MessageId>{r['MessageId']}</MessageId>"
                    f"<MD5OfMessageBody>{r['MD5OfMessageBody']}</MD5OfMessageBody></SendMessageResult>{rid}</SendMessageResponse>")
        if operation == "SendMessageBatch":
            entries = "".join(
                f"<SendMessageBatchResultEntry><Id>{e.get('Id')}</Id><MessageId>{uuid.uuid4()}</MessageId>"
                f"<MD5OfMessageBody>{_md5(e.get('MessageBody', '').encode())}</MD5OfMessageBody></SendMessageBatchResultEntry>"
                for e in _query_list(form, "SendMessageBatchRequestEntry"))
            return f"<SendMessageBatchResponse {ns}><SendMessageBatchResult>{entries}</SendMessageBatchResult>{rid}</SendMessageBatchResponse>"
    return None


# --- the server -----------------------------------------------------------------------------


def _service_from_auth(headers: dict[str, str]) -> str | None:
    """The service in the SigV4 credential scope: Credential=AKID/date/region/SERVICE/aws4_request."""
    auth = headers.get("authorization", "")
    at = auth.find("Credential=")
    if at < 0:
        return None
    scope = auth[at + 11:].split(",", 1)[0].split("/")
    return scope[3] if len(scope) >= 5 else None


class Server:
    def __init__(self, profile: str) -> None:
        self.profile = profile
        self.stats = Stats(profile)
        self.port = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.stats.connections += 1
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                lines = head.decode("latin-1").split("\r\n")
                method, path, _version = (lines[0].split(" ", 2) + ["", ""])[:3]
                headers: dict[str, str] = {}
                for line in lines[1:]:
                    if ":" in line:
                        name, _, value = line.partition(":")
                        headers[name.strip().lower()] = value.strip()
                length = int(headers.get("content-length", "0") or 0)
                if length > _MAX_BODY:
                    return
                if headers.get("expect", "").lower() == "100-continue":
                    writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                body = await reader.readexactly(length) if length else b""
                status, ctype, payload = await self.respond(method, path, headers, body)
                close = headers.get("connection", "").lower() == "close"
                writer.write(
                    f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(payload)}\r\n"
                    f"x-amzn-RequestId: {uuid.uuid4()}\r\n{'Connection: close' if close else 'Connection: keep-alive'}\r\n\r\n"
                    .encode("latin-1") + payload)
                await writer.drain()
                if close:
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        finally:
            writer.close()

    async def respond(self, method: str, path: str, headers: dict[str, str], body: bytes) -> tuple[str, str, bytes]:
        if path.startswith("/__stats"):
            return "200 OK", "application/json", json.dumps(self.stats.to_json()).encode()
        if path.startswith("/__reset"):
            self.stats.reset()
            return "200 OK", "application/json", b"{}"
        target = headers.get("x-amz-target")
        if target:
            prefix, _, operation = target.partition(".")
            service = _TARGET_SERVICES.get(prefix) or _service_from_auth(headers) or prefix
            try:
                request = json.loads(body or b"{}")
            except ValueError:
                request = {}
            reply: Any = json_reply(service, operation, request, self.port)
            ctype = "application/x-amz-json-1.1" if service == "firehose" else "application/x-amz-json-1.0"
            encoded = None if reply is None else json.dumps(reply).encode()
        else:
            form = dict(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True))
            operation = form.get("Action", f"{method} {path}")
            service = _service_from_auth(headers) or ("ses" if "Email" in operation else "sqs")
            reply = query_reply(service, operation, form, self.port)
            ctype = "text/xml"
            encoded = None if reply is None else reply.encode()
        name = f"{service}.{operation}"
        self.stats.enter(service)
        try:
            wait = delay_seconds(self.profile, service, operation)
            if wait:
                await asyncio.sleep(wait)
        finally:
            self.stats.leave(service)
        if encoded is None:
            self.stats.unknown[name] += 1
            if ctype == "text/xml":
                err = (f"<ErrorResponse><Error><Type>Sender</Type><Code>InvalidAction</Code>"
                       f"<Message>fakeaws does not serve {name}</Message></Error></ErrorResponse>").encode()
            else:
                err = json.dumps({"__type": "UnknownOperationException", "message": f"fakeaws does not serve {name}"}).encode()
            return "400 Bad Request", ctype, err
        self.stats.calls[name] += 1
        return "200 OK", ctype, encoded


async def serve(port: int, profile: str, stats_out: str | None) -> None:
    server = Server(profile)
    listener = await asyncio.start_server(server.handle, "127.0.0.1", port, backlog=1024)
    server.port = listener.sockets[0].getsockname()[1]
    sys.stdout.write(f"{server.port}\n")
    sys.stdout.flush()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with listener:
        await stop.wait()
    if stats_out:
        with open(stats_out, "w") as out:
            json.dump(server.stats.to_json(), out, indent=2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.fakeaws", description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--profile", choices=PROFILES, default="aws")
    parser.add_argument("--stats-out")
    args = parser.parse_args(argv)
    asyncio.run(serve(args.port, args.profile, args.stats_out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
