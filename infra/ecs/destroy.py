"""`make destroy`: delete the orders-cdc stack and wait until it is gone.

CloudFormation cannot delete a bucket that still holds objects, and in a versioned bucket
every object version and delete marker counts. So first every bucket that the stack would
delete (DeletionPolicy not Retain: the dead-letter bucket) is emptied: all versions, all
delete markers, unfinished multipart uploads. Then the stack is deleted and waited for.

Kept, and listed at the end: the resources marked Retain (the Orders table, its replica and
the analytics bucket: the business records) and the KCL's own tables, which the stack never
owned (<ApplicationName>, -CoordinatorState, -WorkerMetricStats).

    python infra/ecs/destroy.py --stack orders-cdc [--yes]

Standard AWS variables apply (AWS_REGION, AWS_PROFILE, AWS_ENDPOINT_URL...). Progress and
the summary go to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from typing import Any

import boto3
from botocore.exceptions import ClientError

RETAINED = ("Retain", "RetainExceptOnCreate", "Snapshot")


def _say(message: str) -> None:
    sys.stderr.write(f"destroy: {message}\n")


def _template(cfn, stack: str) -> dict[str, Any]:
    body = cfn.get_template(StackName=stack, TemplateStage="Original")["TemplateBody"]
    if isinstance(body, dict):  # boto3 parses a JSON body
        return body
    try:
        return json.loads(body)
    except ValueError:
        from cfnlint.decode import cfn_yaml  # YAML with CloudFormation's short tags

        return cfn_yaml.loads(body)


def plan(cfn, stack: str) -> tuple[list[str], list[tuple[str, str, str]]]:
    """(buckets to empty, [(logical id, type, physical id) the deletion keeps])."""
    resources = _template(cfn, stack).get("Resources", {})
    to_empty, kept = [], []
    paginator = cfn.get_paginator("list_stack_resources")
    for page in paginator.paginate(StackName=stack):
        for summary in page["StackResourceSummaries"]:
            logical, kind = summary["LogicalResourceId"], summary["ResourceType"]
            physical = summary.get("PhysicalResourceId") or ""
            if not physical or summary.get("ResourceStatus") == "DELETE_COMPLETE":
                continue
            if resources.get(logical, {}).get("DeletionPolicy") in RETAINED:
                kept.append((logical, kind, physical))
            elif kind == "AWS::S3::Bucket":
                to_empty.append(physical)
    return to_empty, kept


def _versions(s3, bucket: str) -> Iterator[dict[str, str]]:
    for page in s3.get_paginator("list_object_versions").paginate(Bucket=bucket):
        for entry in page.get("Versions", []) + page.get("DeleteMarkers", []):
            yield {"Key": entry["Key"], "VersionId": entry["VersionId"]}


def empty_bucket(s3, bucket: str) -> int:
    """Delete every object version and delete marker (and abort unfinished uploads); returns
    how many versions and markers were deleted. A bucket already gone counts as empty."""
    deleted = 0
    try:
        for page in s3.get_paginator("list_multipart_uploads").paginate(Bucket=bucket):
            for upload in page.get("Uploads", []):
                s3.abort_multipart_upload(Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
        while True:  # listed again until empty: a writer may still be finishing
            batch = list(_versions(s3, bucket))
            if not batch:
                return deleted
            for start in range(0, len(batch), 1000):  # DeleteObjects takes 1,000 keys
                reply = s3.delete_objects(Bucket=bucket, Delete={"Objects": batch[start:start + 1000], "Quiet": True})
                if reply.get("Errors"):
                    first = reply["Errors"][0]
                    raise RuntimeError(f"bucket {bucket}: {first.get('Code')} deleting {first.get('Key')}")
                deleted += len(batch[start:start + 1000])
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("NoSuchBucket", "404"):
            return deleted
        raise


def kcl_tables(cfn, stack: str) -> list[str]:
    parameters = cfn.describe_stacks(StackName=stack)["Stacks"][0].get("Parameters", [])
    app = next((p["ParameterValue"] for p in parameters if p["ParameterKey"] == "ApplicationName"), None)
    return [app, f"{app}-CoordinatorState", f"{app}-WorkerMetricStats"] if app else []


def destroy(session: boto3.session.Session, stack: str, delay: int = 15, max_attempts: int = 240) -> int:
    cfn, s3 = session.client("cloudformation"), session.client("s3")
    try:
        cfn.describe_stacks(StackName=stack)
    except ClientError as exc:
        if "does not exist" in str(exc):
            _say(f"no stack {stack!r}: nothing to do")
            return 0
        raise
    buckets, kept = plan(cfn, stack)
    leftovers = kcl_tables(cfn, stack)
    for bucket in buckets:
        _say(f"emptying bucket {bucket} (every version and delete marker)")
        _say(f"  {empty_bucket(s3, bucket)} deleted")
    _say(f"deleting stack {stack}")
    cfn.delete_stack(StackName=stack)
    cfn.get_waiter("stack_delete_complete").wait(StackName=stack,
                                                 WaiterConfig={"Delay": delay, "MaxAttempts": max_attempts})
    _say(f"stack {stack} deleted")
    for logical, kind, physical in kept:
        _say(f"kept (DeletionPolicy Retain): {logical} {kind} {physical}")
    for table in leftovers:
        _say(f"not the stack's (the KCL created it), delete it by hand if retiring the application: "
             f"DynamoDB table {table}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="destroy.py", description=__doc__.splitlines()[0])
    parser.add_argument("--stack", required=True)
    parser.add_argument("--yes", action="store_true", help="do not ask for the stack's name first")
    args = parser.parse_args(argv)
    if not args.yes:
        sys.stderr.write(f"Delete stack {args.stack!r} and the dead letters in its bucket? Type its name: ")
        sys.stderr.flush()
        if sys.stdin.readline().strip() != args.stack:
            _say("not confirmed: nothing deleted")
            return 1
    return destroy(boto3.session.Session(), args.stack)


if __name__ == "__main__":
    sys.exit(main())
