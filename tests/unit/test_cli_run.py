"""`orders-cdc run` refuses a bad setup before the JVM starts, in one line on stderr."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import boto3
import pytest

from orders_cdc.local.stack import free_port

ROOT = Path(__file__).resolve().parents[2]


def run_cli(args, env, tmp_path):
    base = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "ORDERS_CDC_"))}
    return subprocess.run([sys.executable, "-m", "orders_cdc.cli", "run", "--run-dir", str(tmp_path), *args],
                          env={**base, **env}, cwd=ROOT, capture_output=True, timeout=60)


def one_line(proc) -> str:
    assert proc.returncode == 2, proc.stderr.decode()[-2000:]
    assert proc.stdout == b""
    lines = proc.stderr.decode().strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


@pytest.fixture
def aws_env(moto_server):
    return {"AWS_REGION": "us-east-1", "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
            "AWS_ENDPOINT_URL": moto_server}


def test_missing_stream(aws_env, tmp_path):
    line = one_line(run_cli([], {**aws_env, "ORDERS_CDC_STREAM": f"nope-{uuid.uuid4().hex[:6]}"}, tmp_path))
    assert line.startswith("orders-cdc: stream 'nope-") and "not found at http://127.0.0.1:" in line


def test_unreachable_endpoint(aws_env, tmp_path):
    line = one_line(run_cli([], {**aws_env, "AWS_ENDPOINT_URL_KINESIS": "http://127.0.0.1:9"}, tmp_path))
    assert line == "orders-cdc: cannot reach Kinesis at http://127.0.0.1:9"


def test_misspelt_properties_key(aws_env, tmp_path):
    props = tmp_path / "bad.properties"
    props.write_text((ROOT / "app.properties").read_text().replace("dynamoDBEndpoint", "DynamoDBEndpoint"))
    line = one_line(run_cli(["--properties", str(props)], aws_env, tmp_path))
    assert "unknown key 'DynamoDBEndpoint' (did you mean 'dynamoDBEndpoint'?)" in line


def test_missing_region(tmp_path):
    line = one_line(run_cli([], {}, tmp_path))
    assert line == "orders-cdc: AWS_REGION is not set (e.g. AWS_REGION=us-east-1)"


def test_help_lists_the_commands():
    out = subprocess.run([sys.executable, "-m", "orders_cdc.cli", "--help"], cwd=ROOT, capture_output=True, timeout=30)
    assert out.returncode == 0
    for command in (b"run", b"decode", b"local"):
        assert command in out.stdout


def test_an_idempotency_ttl_shorter_than_the_streams_retention_is_refused(aws_env, tmp_path):
    """A redelivery after the done-marker expired would email and count again."""
    stream = f"s-{uuid.uuid4().hex[:6]}"
    kinesis = boto3.client("kinesis", endpoint_url=aws_env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                           aws_access_key_id="test", aws_secret_access_key="test")
    kinesis.create_stream(StreamName=stream, ShardCount=1)
    line = one_line(run_cli([], {**aws_env, "ORDERS_CDC_STREAM": stream, "ORDERS_CDC_IDEMPOTENCY_TTL_SECONDS": "3600"},
                            tmp_path))
    assert line == ("orders-cdc: ORDERS_CDC_IDEMPOTENCY_TTL_SECONDS=3600 is shorter than the stream's retention"
                    " (86400 s): redelivered changes would be done twice")


def check(env, properties_file):
    proc = subprocess.run([sys.executable, "-m", "orders_cdc.cli", "run", "--check", "--properties", str(properties_file)],
                          env=env, cwd=ROOT, capture_output=True, timeout=120)
    return proc.returncode, proc.stdout.decode().splitlines()


def test_run_check_passes_a_good_setup_and_starts_nothing(moto_resources, tmp_path):
    names, _, _, env = moto_resources
    code, lines = check({**env, "ORDERS_CDC_STREAM": names.stream}, ROOT / "app.properties")
    assert (code, len(lines)) == (0, 1) and lines[0].startswith("orders-cdc: ok:"), lines


def test_run_check_names_every_problem_with_its_line(moto_resources, tmp_path):
    names, clients, created, env = moto_resources
    text = (ROOT / "app.properties").read_text().splitlines()
    text[22] = "idleTimeBetweenReadsInMilis = 250"  # misspelt, on line 23
    text.append("maxRecords = 100 ")  # trailing space, a second maxRecords too
    broken = tmp_path / "broken.properties"
    broken.write_text("\n".join(text) + "\n")
    code, lines = check({**env, "ORDERS_CDC_STREAM": names.stream}, broken)
    assert code == 1
    assert f"orders-cdc: {broken}:23: unknown key 'idleTimeBetweenReadsInMilis' (did you mean 'idleTimeBetweenReadsInMillis'?);" \
           " the daemon would silently ignore it" in lines
    assert f"orders-cdc: {broken}:{len(text)}: trailing spaces after maxRecords's value (Java keeps them)" in lines
    assert len(lines) == 2, lines

    clients.sqs.delete_queue(QueueUrl=created.queue_urls[names.refund_queue])
    code, lines = check({**env, "ORDERS_CDC_STREAM": names.stream, "ORDERS_CDC_INVENTORY_TABLE": "Nope"},
                        ROOT / "app.properties")
    assert code == 1
    assert sorted(lines) == ["orders-cdc: queue " + repr(names.refund_queue) + " does not exist",
                             "orders-cdc: table 'Nope' does not exist"]


def test_run_check_reports_a_bad_setting_in_one_line():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "ORDERS_CDC_"))}
    code, lines = check({**env, "AWS_REGION": "us-east-1", "ORDERS_CDC_MAX_ATTEMPTS": "many"}, ROOT / "app.properties")
    assert (code, lines) == (1, ["orders-cdc: ORDERS_CDC_MAX_ATTEMPTS='many' is not an integer"])


def test_run_check_probes_the_replica_table_in_its_own_region_and_endpoint(moto_resources):
    names, clients, _, env = moto_resources
    env = {**env, "ORDERS_CDC_STREAM": names.stream}
    endpoint = env["AWS_ENDPOINT_URL"]
    code, lines = check({**env, "ORDERS_CDC_REPLICA_REGION": "eu-west-1"}, ROOT / "app.properties")
    assert (code, lines) == (1, [f"orders-cdc: replica table {names.replica_table!r} (in eu-west-1 at {endpoint}) does not exist"])

    eu = boto3.client("dynamodb", region_name="eu-west-1", endpoint_url=endpoint, aws_access_key_id="test",
                      aws_secret_access_key="test")
    eu.create_table(TableName=names.replica_table, KeySchema=[{"AttributeName": "order_id", "KeyType": "HASH"}],
                    AttributeDefinitions=[{"AttributeName": "order_id", "AttributeType": "S"}], BillingMode="PAY_PER_REQUEST")
    code, lines = check({**env, "ORDERS_CDC_REPLICA_REGION": "eu-west-1"}, ROOT / "app.properties")
    assert code == 0, lines

    closed = f"http://127.0.0.1:{free_port()}"
    code, lines = check({**env, "ORDERS_CDC_REPLICA_ENDPOINT": closed}, ROOT / "app.properties")
    assert (code, len(lines)) == (1, 1) and lines[0].startswith(f"orders-cdc: replica table {names.replica_table!r}"
                                                                f" (in us-east-1 at {closed}): cannot reach"), lines
