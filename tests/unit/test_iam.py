"""The task role, derived from the calls: every AWS call a task makes is granted, and every
grant is used by a call.

The template is deployed into moto's CloudFormation (tests/cfn.py), so the role's policy is
read back from IAM with its ARNs resolved. Then the production code runs as a task runs it,
with the task definition's own environment, real boto3 clients and moto behind them:

- `orders-cdc run`'s start: the effective daemon properties and the preflight checks;
- the child (`app.build_processor`, what record_processor.py runs): one batch that takes
  every route (emails, refunds, counters, the view, Firehose), a refused email address and a
  poison record (dead-lettered to SQS, the lock released) and a poison record too big for a
  message (dead-lettered whole to S3).

A botocore event hook (`before-parameter-build`: the call's own parameters, before they are
serialised) on every client created meanwhile records each call, which is
mapped to the IAM action and resource AWS authorises (TransactWriteItems per item: PutItem,
UpdateItem, DeleteItem, ConditionCheckItem; BatchWriteItem per table; SendMessageBatch as
SendMessage; HeadBucket as ListBucket). The KCL's own calls (it runs under the same role)
are its documented list for a polling consumer, the Kinesis part checked against the
operations its jars can call, the DynamoDB part against a recorded daemon run
(tests/integration/test_kcl_calls.py). The operator commands (`status`, `replay`, `dlq`) run with the
operator's credentials, not the task role, and are not part of this.

The set of recorded calls is written to .local/iam/calls.json for reading.
"""

from __future__ import annotations

import base64
import fnmatch
import json
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.utils import parseaddr
from pathlib import Path
from typing import Any

import botocore.session
import pytest
import requests

from orders_cdc import app, preflight, settings as settings_module
from orders_cdc.change import decode_kinesis_data
from orders_cdc.idempotency import reaction_key
from orders_cdc.idempotency.dynamodb import DynamoDbIdempotencyStore
from orders_cdc.kcl import daemon
from orders_cdc.kcl.protocol import Checkpointer
from orders_cdc.local.stack import ACCESS_KEY_ID, REGION, SECRET_ACCESS_KEY
from orders_cdc.outcomes import Outcome
from tests import cfn
from tests.factories import kcl_record, sequence_number
from tests.unit.test_handlers import doc, order

ROOT = Path(__file__).resolve().parents[2]
DEPLOYED_PROPERTIES = ROOT / "infra" / "ecs" / "app.properties"
RECORDED = ROOT / ".local" / "iam" / "calls.json"

# Granted for a code path the run above cannot reach on DynamoDB (nor on moto): the lock's
# fallback read (DynamoDbIdempotencyStore._get_one) when a refused conditional put comes back
# without the item in the way; with ReturnValuesOnConditionCheckFailure=ALL_OLD DynamoDB
# returns it. Without the grant that fallback would be refused and hold its route.
GRANTED_FOR_A_FALLBACK = {("dynamodb:GetItem", "IdempotencyTable")}

# The KCL's calls for a polling consumer (retrievalMode = POLLING), from "IAM permissions
# required for KCL consumer applications" (Kinesis Data Streams developer guide,
# kcl-iam-permissions): the enhanced fan-out rows (SubscribeToShard, DescribeStreamConsumer,
# RegisterStreamConsumer) do not apply. The guide also lists DescribeStream and
# DescribeStreamSummary; KCL 3.1.3 calls neither outside fan-out (see
# test_the_kcl_calls_no_kinesis_operation_but_these), so they are not the KCL's here.
KCL_KINESIS = ("ListShards", "GetShardIterator", "GetRecords")
KCL_LEASE_TABLE = ("CreateTable", "DescribeTable", "UpdateTable", "Scan", "GetItem", "PutItem", "UpdateItem",
                   "DeleteItem")
KCL_LEASE_INDEX = ("Query",)  # the lease-owner GSI (KCL 3.x)
KCL_COORDINATOR_AND_WORKER_METRICS = ("CreateTable", "DescribeTable", "Scan", "GetItem", "PutItem", "UpdateItem",
                                      "DeleteItem")


@dataclass(frozen=True)
class Request:
    """What IAM authorises for one call: an action on one of `resources` (alternatives, e.g.
    an SES address identity or its domain's), with the condition keys the call carries."""

    action: str
    resources: tuple[str, ...]
    context: tuple[tuple[str, str], ...] = ()
    source: str = ""  # the call it came from, for messages


class Unmapped(AssertionError):
    pass


def _arn(service: str, resource: str) -> str:
    return f"arn:aws:{service}:{REGION}:{cfn.ACCOUNT}:{resource}"


def _table(name: str) -> str:
    return _arn("dynamodb", f"table/{name}")


_TRANSACTION_ITEM_ACTIONS = {"Put": "PutItem", "Update": "UpdateItem", "Delete": "DeleteItem",
                             "ConditionCheck": "ConditionCheckItem"}
_SQS_BATCH_ACTIONS = {"SendMessageBatch": "SendMessage", "DeleteMessageBatch": "DeleteMessage",
                      "ChangeMessageVisibilityBatch": "ChangeMessageVisibility"}


def requests_for(service: str, operation: str, params: dict[str, Any]) -> Iterator[Request]:
    """The IAM requests one call makes (service is botocore's name of the service)."""
    source = f"{service}:{operation}"
    if service == "dynamodb":
        if operation == "TransactWriteItems":
            for item in params["TransactItems"]:
                ((kind, body),) = item.items()
                yield Request(f"dynamodb:{_TRANSACTION_ITEM_ACTIONS[kind]}", (_table(body["TableName"]),), source=source)
        elif operation in ("BatchWriteItem", "BatchGetItem"):
            for table in params["RequestItems"]:
                yield Request(f"dynamodb:{operation}", (_table(table),), source=source)
        elif "TableName" in params:
            resource = _table(params["TableName"])
            if params.get("IndexName"):
                resource += f"/index/{params['IndexName']}"
            yield Request(f"dynamodb:{operation}", (resource,), source=source)
        else:
            raise Unmapped(f"teach requests_for how IAM authorises {source}")
    elif service == "sqs":
        name = params.get("QueueName") or params["QueueUrl"].rstrip("/").rsplit("/", 1)[-1]
        yield Request(f"sqs:{_SQS_BATCH_ACTIONS.get(operation, operation)}", (_arn("sqs", name),), source=source)
    elif service == "s3":
        bucket = params["Bucket"]
        if operation == "HeadBucket":
            yield Request("s3:ListBucket", (f"arn:aws:s3:::{bucket}",), source=source)
        elif operation in ("PutObject", "GetObject", "HeadObject"):
            action = "s3:GetObject" if operation == "HeadObject" else f"s3:{operation}"
            yield Request(action, (f"arn:aws:s3:::{bucket}/{params['Key']}",), source=source)
        else:
            raise Unmapped(f"teach requests_for how IAM authorises {source}")
    elif service in ("ses", "sesv2"):
        # SES v1 SendEmail / SendRawEmail and v2 SendEmail are all ses:Send*Email on the
        # identity that sends: the address's own, or its domain's.
        if operation not in ("SendEmail", "SendRawEmail"):
            raise Unmapped(f"teach requests_for how IAM authorises {source}")
        address = parseaddr(params.get("Source") or params.get("FromEmailAddress") or "")[1]
        domain = address.rsplit("@", 1)[-1]
        action = "ses:SendEmail" if service == "sesv2" else f"ses:{operation}"
        yield Request(action, (_arn("ses", f"identity/{address}"), _arn("ses", f"identity/{domain}")),
                      (("ses:FromAddress", address),), source=source)
    elif service == "firehose":
        yield Request(f"firehose:{operation}", (_arn("firehose", f"deliverystream/{params['DeliveryStreamName']}"),),
                      source=source)
    elif service == "kinesis":
        name = params.get("StreamName") or params["StreamARN"].rsplit("/", 1)[-1]
        yield Request(f"kinesis:{operation}", (_arn("kinesis", f"stream/{name}"),), source=source)
    elif service == "cloudwatch" and operation == "PutMetricData":
        # No resource-level permissions: "*", narrowed by the namespace condition.
        yield Request("cloudwatch:PutMetricData", ("*",), (("cloudwatch:namespace", params["Namespace"]),), source)
    else:
        raise Unmapped(f"teach requests_for how IAM authorises {source}")


def kcl_requests(application: str, stream: str) -> list[Request]:
    """What the daemon itself asks for under the task role (KCL 3.x, polling, metricsLevel SUMMARY)."""
    out = [Request(f"kinesis:{op}", (_arn("kinesis", f"stream/{stream}"),), source="KCL") for op in KCL_KINESIS]
    out += [Request(f"dynamodb:{op}", (_table(application),), source="KCL") for op in KCL_LEASE_TABLE]
    out += [Request(f"dynamodb:{op}", (_table(application) + "/index/LeaseOwnerToLeaseKeyIndex",), source="KCL")
            for op in KCL_LEASE_INDEX]
    out += [Request(f"dynamodb:{op}", (_table(f"{application}-{suffix}"),), source="KCL")
            for suffix in ("CoordinatorState", "WorkerMetricStats") for op in KCL_COORDINATOR_AND_WORKER_METRICS]
    # The KCL's metrics go to the namespace named after the application.
    out.append(Request("cloudwatch:PutMetricData", ("*",), (("cloudwatch:namespace", application),), "KCL"))
    return out


# ----------------------------------------------------------------------------- policy evaluation


@dataclass(frozen=True)
class Grant:
    sid: str
    action: str
    resource: str  # as resolved by CloudFormation


def _as_list(value) -> list:
    return value if isinstance(value, list) else [value]


def grants(policy: dict[str, Any]) -> list[tuple[Grant, dict[str, Any]]]:
    """Every (action, resource) an Allow statement grants, with the statement's condition."""
    out = []
    for statement in policy["Statement"]:
        assert statement["Effect"] == "Allow", f"teach this test Deny statements: {statement}"
        assert "NotAction" not in statement and "NotResource" not in statement, statement
        for action in _as_list(statement["Action"]):
            for resource in _as_list(statement["Resource"]):
                out.append((Grant(statement.get("Sid", ""), action, resource), statement.get("Condition", {})))
    return out


def _condition_holds(condition: dict[str, Any], context: dict[str, str]) -> bool:
    for operator, pairs in condition.items():
        assert operator in ("StringEquals", "StringLike"), f"teach _condition_holds {operator}"
        for key, wanted in pairs.items():
            if key not in context:  # a key the request does not carry never matches
                return False
            values = _as_list(wanted)
            match = fnmatch.fnmatchcase if operator == "StringLike" else str.__eq__
            if not any(match(context[key], v) for v in values):
                return False
    return True


def matching(request: Request, granted: list[tuple[Grant, dict[str, Any]]]) -> list[Grant]:
    context = dict(request.context)
    return [grant for grant, condition in granted
            if fnmatch.fnmatchcase(request.action.lower(), grant.action.lower())
            and any(fnmatch.fnmatchcase(r, grant.resource) for r in request.resources)
            and _condition_holds(condition, context)]


# ----------------------------------------------------------------------------- recording the calls


@dataclass
class Recorder:
    calls: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)
    active: bool = False

    def __call__(self, model, params, **_kwargs) -> None:
        if self.active:
            self.calls.append((model.service_model.service_name, model.name, dict(params)))


def _record_clients(monkeypatch: pytest.MonkeyPatch, recorder: Recorder) -> None:
    """Every botocore client created from now on records its calls (while `recorder.active`)."""
    create_client = botocore.session.Session.create_client

    def recording_create_client(self, *args, **kwargs):
        client = create_client(self, *args, **kwargs)
        client.meta.events.register("before-parameter-build", recorder)
        return client

    monkeypatch.setattr(botocore.session.Session, "create_client", recording_create_client)


class _Checkpoints(Checkpointer):
    def __init__(self) -> None:
        self.positions: list[tuple[str | None, int | None]] = []

    def checkpoint(self, sequence_number=None, sub_sequence_number=None) -> None:
        self.positions.append((sequence_number, sub_sequence_number))


@pytest.fixture(scope="module")
def deployed(private_moto_server) -> Iterator[cfn.Deployed]:
    stack = cfn.deploy(private_moto_server)
    assert stack.status["StackStatus"] == "CREATE_COMPLETE", stack.status.get("StackStatusReason")
    try:
        yield stack
    finally:
        stack.delete()


def _task_batch(orders_table: str, email_domain: str) -> tuple[list[dict], list[Outcome]]:
    """One batch through every route, with a refused address and two poison records."""
    to = f"ann-{uuid.uuid4().hex[:6]}@{email_domain}"
    items = (("p-1", "Kettle", 2, "39.90"), ("p-2", "Mug", 1, "8.99"))
    a0 = order("o-a", items=items, email=to)
    a1 = {**a0, "status": "shipped", "tracking_number": "1Z5"}
    a2 = {**a1, "status": "delivered"}
    b0 = order("o-b", items=(("p-2", "Mug", 4, "8.99"),), email=to)
    b1 = {**b0, "status": "cancelled", "cancel_reason": "too slow"}
    c0 = order("o-c", "processing", email="nobody@")  # SES refuses the address: dead-lettered
    c1 = {**c0, "status": "shipped", "tracking_number": "1Z6"}
    lone = order("o-d", items=(("p-3", "Pot", 1, "12.00"),))
    docs = [doc("INSERT", a0, table=orders_table), doc("MODIFY", a1, a0, table=orders_table),
            doc("MODIFY", a2, a1, table=orders_table), doc("INSERT", b0, table=orders_table),
            doc("MODIFY", b1, b0, table=orders_table), doc("MODIFY", c1, c0, table=orders_table),
            doc("INSERT", lone, table=orders_table), doc("REMOVE", None, b1, table=orders_table),
            doc("REMOVE", None, lone, table=orders_table, ttl=True)]
    records = [kcl_record(d, sequence_number(i)) for i, d in enumerate(docs, 1)]
    expected = [Outcome.DONE] * len(records)
    expected[5] = Outcome.DEAD_LETTERED
    poison = dict(records[0], sequenceNumber=sequence_number(100), data=base64.b64encode(b"{not json").decode())
    # Too big for an SQS message (1 MiB) once in a dead letter: kept whole in S3.
    huge = dict(records[0], sequenceNumber=sequence_number(101), data=base64.b64encode(b"x" * 900_000).decode())
    return records + [poison, huge], expected + [Outcome.DEAD_LETTERED, Outcome.DEAD_LETTERED]


def _held_by_another_worker(deployed: cfn.Deployed, table: str, record: dict, route: str) -> None:
    """Another worker's in-progress lock on `route`'s reaction to `record`, with a short lease:
    our worker finds it taken, and takes it once the lease has run out."""
    change = decode_kinesis_data(base64.b64decode(record["data"]))
    store = DynamoDbIdempotencyStore(deployed.client("dynamodb"), table, owner="another-worker", lock_seconds=2.0)
    store.save_inprogress(reaction_key(route, change), time.time())


def _run_a_task(deployed: cfn.Deployed, monkeypatch, recorder: Recorder) -> None:
    env = {**deployed.container_environment(), "AWS_ENDPOINT_URL": deployed.endpoint,
           "AWS_ACCESS_KEY_ID": ACCESS_KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET_ACCESS_KEY}
    for name in [n for n in os.environ if n.startswith(("AWS_", "ORDERS_CDC_"))]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    # What exists before a task starts and moto's CloudFormation does not make: the delivery
    # stream, the verified sender (a deploy prerequisite), and the lease table the KCL
    # created on its first start (so preflight reads the leases, as on every later start).
    deployed.create_delivery_stream()
    deployed.client("ses").verify_email_identity(EmailAddress=env["ORDERS_CDC_SENDER_EMAIL"])
    deployed.client("dynamodb").create_table(
        TableName=env["ORDERS_CDC_APPLICATION"], BillingMode="PAY_PER_REQUEST",
        AttributeDefinitions=[{"AttributeName": "leaseKey", "AttributeType": "S"}],
        KeySchema=[{"AttributeName": "leaseKey", "KeyType": "HASH"}])
    records, expected = _task_batch(env["ORDERS_CDC_ORDERS_TABLE"], env["ORDERS_CDC_SENDER_EMAIL"].split("@")[1])
    _held_by_another_worker(deployed, env["ORDERS_CDC_IDEMPOTENCY_TABLE"], records[1], "notification.shipped_email")
    recorder.active = True

    # orders-cdc run: the settings, the effective properties, the preflight checks.
    loaded = settings_module.load()
    values = daemon.effective_properties(loaded, DEPLOYED_PROPERTIES)
    assert list(preflight.checks(loaded, values)) == []

    # One child, as record_processor.py builds it.
    processor = app.build_processor(loaded)
    processor.initialize("shardId-000000000000", "TRIM_HORIZON", None)
    checkpoints = _Checkpoints()
    processor.process_records(records, 0, checkpoints)
    processor.shutdown_requested(checkpoints)
    recorder.active = False
    assert processor.totals[Outcome.DONE.value] == expected.count(Outcome.DONE)
    assert processor.totals[Outcome.DEAD_LETTERED.value] == expected.count(Outcome.DEAD_LETTERED)
    assert checkpoints.positions[-1] == (records[-1]["sequenceNumber"], 0)


@pytest.fixture(scope="module")
def task_calls(deployed) -> list[tuple[str, str, dict[str, Any]]]:
    """The calls of one task's start and one child's batch on the deployed stack (once per module,
    so the tests below do not depend on each other's order)."""
    recorder = Recorder()
    with pytest.MonkeyPatch.context() as monkeypatch:
        _record_clients(monkeypatch, recorder)
        _run_a_task(deployed, monkeypatch, recorder)
    return recorder.calls


def test_task_role_grants_exactly_what_the_task_calls(deployed, task_calls):
    ids = {logical: physical for logical, (_, physical) in deployed.physical_ids().items()}
    env = deployed.container_environment()

    ours = [r for service, op, params in task_calls for r in requests_for(service, op, params)]
    RECORDED.parent.mkdir(parents=True, exist_ok=True)
    RECORDED.write_text(json.dumps({
        "calls": sorted({f"{service}:{op}" for service, op, _ in task_calls}),
        "iam": sorted({f"{r.action} {r.resources[0]}" for r in ours}),
    }, indent=2) + "\n")
    every = ours + kcl_requests(env["ORDERS_CDC_APPLICATION"], env["ORDERS_CDC_STREAM"])
    granted = grants(deployed.task_role_policy())

    # 1. Every call is granted.
    refused = sorted({f"{r.source}: {r.action} on {r.resources[0]}" for r in every if not matching(r, granted)})
    assert refused == [], "called but not granted to the task role"

    # 2. Every grant is called.
    used = {grant for r in every for grant in matching(r, granted)}
    fallback = {(action, _table(ids[logical])) for action, logical in GRANTED_FOR_A_FALLBACK}
    unused = sorted(f"{g.sid}: {g.action} on {g.resource}" for g, _ in granted
                    if g not in used and (g.action, g.resource) not in fallback)
    assert unused == [], "granted to the task role but never called"


def test_the_recorded_run_reached_every_downstream(deployed, task_calls):
    """The run covers every kind of call, and they were real: what the batch did is in moto
    (a guard against a driver that silently stopped exercising a route)."""
    calls = {f"{service}:{op}" for service, op, _ in task_calls}
    assert {"ses:SendEmail", "sqs:SendMessageBatch", "s3:PutObject", "firehose:PutRecordBatch",
            "dynamodb:TransactWriteItems", "dynamodb:BatchWriteItem", "dynamodb:PutItem",
            "kinesis:DescribeStreamSummary", "s3:HeadBucket"} <= calls, calls
    data = requests.get(f"{deployed.endpoint}/moto-api/data.json", timeout=10).json()
    assert any(m["source"] == deployed.parameters["SenderEmail"] for m in data.get("ses", {}).get("Message", []))


def _kcl_classes() -> Iterator[tuple[str, bytes]]:
    import zipfile

    for jar in sorted(daemon.jars_dir().glob("amazon-kinesis-client*.jar")):
        with zipfile.ZipFile(jar) as z:
            for name in z.namelist():
                if name.startswith("software/amazon/kinesis/") and name.endswith(".class"):
                    yield name, z.read(name)


def test_the_kcl_calls_no_kinesis_operation_but_these():
    """The KCL's Kinesis calls are the method names of the Kinesis client its classes use
    (a method name is a UTF-8 constant in the class file, length-prefixed). Fan-out classes
    are not used by a polling consumer."""
    model = botocore.session.get_session().get_service_model("kinesis")
    methods = {op[0].lower() + op[1:]: op for op in model.operation_names}
    found = set()
    for name, data in _kcl_classes():
        if "/retrieval/fanout/" in name:
            continue
        found |= {op for method, op in methods.items() if len(method).to_bytes(2, "big") + method.encode() in data}
    assert found == set(KCL_KINESIS), found
