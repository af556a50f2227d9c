"""`make destroy` (infra/ecs/destroy.py) against the template deployed into moto's CloudFormation."""

from __future__ import annotations

import importlib.util

import pytest
from botocore.exceptions import ClientError
from cfnlint.decode import cfn_yaml

from tests import cfn

_spec = importlib.util.spec_from_file_location("destroy", cfn.TEMPLATE.parent / "destroy.py")
destroy = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(destroy)


def _versions(s3, bucket: str) -> int:
    reply = s3.list_object_versions(Bucket=bucket)
    return len(reply.get("Versions", [])) + len(reply.get("DeleteMarkers", []))


def test_destroy_empties_the_versioned_bucket_deletes_the_stack_and_keeps_the_retained(private_moto_server, capsys,
                                                                                      monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", private_moto_server)  # destroy.py's clients, as the standard variable says
    stack = cfn.deploy(private_moto_server)
    assert stack.status["StackStatus"] == "CREATE_COMPLETE"
    ids = {logical: physical for logical, (_, physical) in stack.physical_ids().items()}
    s3, ddb = stack.client("s3"), stack.client("dynamodb")
    dead_letters, analytics = ids["DeadLetterBucket"], ids["AnalyticsBucket"]
    # The template versions both buckets; moto's CloudFormation does not pass that on.
    declared = cfn_yaml.load(str(cfn.TEMPLATE))["Resources"]
    for logical, bucket in (("DeadLetterBucket", dead_letters), ("AnalyticsBucket", analytics)):
        assert declared[logical]["Properties"]["VersioningConfiguration"] == {"Status": "Enabled"}
        s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    # Several versions of one letter, a deleted one (a delete marker over its versions), and
    # an unfinished multipart upload: everything that keeps a versioned bucket from deletion.
    for body in (b"v1", b"v2", b"v3"):
        s3.put_object(Bucket=dead_letters, Key="dead-letters/shard/1-0.json", Body=body)
    s3.put_object(Bucket=dead_letters, Key="dead-letters/shard/2-0.json", Body=b"gone")
    s3.delete_object(Bucket=dead_letters, Key="dead-letters/shard/2-0.json")
    s3.create_multipart_upload(Bucket=dead_letters, Key="dead-letters/shard/3-0.json")
    assert _versions(s3, dead_letters) == 5
    s3.put_object(Bucket=analytics, Key="events/a.json.gz", Body=b"kept")

    to_empty, kept = destroy.plan(stack.client("cloudformation"), stack.name)
    assert to_empty == [dead_letters]
    assert {logical for logical, _, _ in kept} == {"OrdersTable", "OrdersReplicaTable", "AnalyticsBucket"}

    assert destroy.destroy(stack.session, stack.name, delay=1, max_attempts=60) == 0

    with pytest.raises(ClientError, match="does not exist"):
        stack.client("cloudformation").describe_stacks(StackName=stack.name)
    with pytest.raises(ClientError) as gone:
        s3.list_object_versions(Bucket=dead_letters)
    assert gone.value.response["Error"]["Code"] == "NoSuchBucket"
    # The business records stay: the Orders table, its replica, the analytics bucket's objects.
    assert s3.get_object(Bucket=analytics, Key="events/a.json.gz")["Body"].read() == b"kept"
    for table in (f"{stack.name}-Orders", f"{stack.name}-OrdersReplica"):
        assert ddb.describe_table(TableName=table)["Table"]["TableStatus"] == "ACTIVE"
    with pytest.raises(ClientError):
        ddb.describe_table(TableName=f"{stack.name}-Idempotency")
    err = capsys.readouterr().err
    assert f"emptying bucket {dead_letters}" in err and "  5 deleted" in err
    assert f"DynamoDB table {stack.name}-app-CoordinatorState" in err and "kept (DeletionPolicy Retain): OrdersTable" in err


def test_destroy_of_a_missing_stack_does_nothing(private_moto_server, capsys, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", private_moto_server)
    session = cfn.Deployed(private_moto_server, "x", {}).session
    assert destroy.destroy(session, "ocdc-never-created", delay=1, max_attempts=2) == 0
    assert "nothing to do" in capsys.readouterr().err
