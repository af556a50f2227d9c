"""infra/ecs/template.yaml deployed into moto's CloudFormation (the session moto server).

moto creates the stack's tables, queues, stream, buckets, roles, log groups, cluster, task
definition and service; it skips (with a warning) the types it does not implement: the
bucket policies, the Firehose log stream, the delivery stream and the alarms. Tests that need
the delivery stream create it themselves (`create_delivery_stream`).
"""

from __future__ import annotations

import ast
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3

from orders_cdc.local.stack import ACCESS_KEY_ID, REGION, SECRET_ACCESS_KEY

TEMPLATE = Path(__file__).resolve().parents[1] / "infra" / "ecs" / "template.yaml"
ACCOUNT = "123456789012"  # moto's
NOT_IN_MOTO = {"AWS::S3::BucketPolicy", "AWS::Logs::LogStream", "AWS::KinesisFirehose::DeliveryStream",
               "AWS::CloudWatch::Alarm"}


@dataclass
class Deployed:
    endpoint: str
    name: str
    parameters: dict[str, str]
    status: dict[str, Any] = field(default_factory=dict)
    session: boto3.session.Session = field(default_factory=lambda: boto3.session.Session(
        aws_access_key_id=ACCESS_KEY_ID, aws_secret_access_key=SECRET_ACCESS_KEY, region_name=REGION))

    def client(self, service: str):
        return self.session.client(service, endpoint_url=self.endpoint)

    @property
    def outputs(self) -> dict[str, str]:
        return {o["OutputKey"]: o["OutputValue"] for o in self.status.get("Outputs", [])}

    def physical_ids(self) -> dict[str, tuple[str, str]]:
        """Logical id -> (type, physical id) of every resource moto created."""
        summaries = self.client("cloudformation").list_stack_resources(StackName=self.name)["StackResourceSummaries"]
        return {s["LogicalResourceId"]: (s["ResourceType"], s.get("PhysicalResourceId", "")) for s in summaries}

    def container_environment(self) -> dict[str, str]:
        (container,) = self.client("ecs").describe_task_definition(taskDefinition=self.name)["taskDefinition"][
            "containerDefinitions"]
        return {e["name"]: e["value"] for e in container["environment"]}

    def task_role_policy(self) -> dict[str, Any]:
        return self.role_policy("TaskRole")

    def role_policy(self, logical_id: str) -> dict[str, Any]:
        """The inline policy of one of the stack's roles, its ARNs resolved."""
        iam = self.client("iam")
        role = next(r["RoleName"] for r in iam.list_roles(MaxItems=1000)["Roles"]
                    if r["RoleName"].startswith(f"{self.name}-{logical_id}-"))
        (policy,) = iam.list_role_policies(RoleName=role)["PolicyNames"]
        document = iam.get_role_policy(RoleName=role, PolicyName=policy)["PolicyDocument"]
        # moto's server hands back the stored document as Python's repr of a dict.
        return ast.literal_eval(document) if isinstance(document, str) else document

    def create_delivery_stream(self) -> str:
        """The analytics delivery stream moto's CloudFormation skips, as the template names it."""
        name = f"{self.name}-analytics"
        bucket = self.physical_ids()["AnalyticsBucket"][1]
        self.client("firehose").create_delivery_stream(
            DeliveryStreamName=name, DeliveryStreamType="DirectPut",
            ExtendedS3DestinationConfiguration={"RoleARN": f"arn:aws:iam::{ACCOUNT}:role/firehose",
                                                "BucketARN": f"arn:aws:s3:::{bucket}"})
        return name

    def delete(self) -> None:
        self.client("cloudformation").delete_stack(StackName=self.name)


def deploy(endpoint: str, timeout: float = 60.0, **overrides: str) -> Deployed:
    """create_stack with test parameters (any overridden) and wait for it to settle."""
    name = f"ocdc-{uuid.uuid4().hex[:8]}"
    parameters = {"Image": "123456789012.dkr.ecr.us-east-1.amazonaws.com/orders-cdc:test",
                  "Subnets": "subnet-0123456789abcdef0,subnet-0123456789abcdef1",
                  "SecurityGroups": "sg-0123456789abcdef0", "SenderEmail": "orders@shop.example",
                  "ApplicationName": f"{name}-app", **overrides}
    stack = Deployed(endpoint, name, parameters)
    cfn = stack.client("cloudformation")
    cfn.create_stack(StackName=name, TemplateBody=TEMPLATE.read_text(), Capabilities=["CAPABILITY_IAM"],
                     Parameters=[{"ParameterKey": k, "ParameterValue": v} for k, v in parameters.items()])
    deadline = time.monotonic() + timeout
    while (status := cfn.describe_stacks(StackName=name)["Stacks"][0])["StackStatus"].endswith("IN_PROGRESS"):
        if time.monotonic() > deadline:
            raise AssertionError(f"stack {name} still {status['StackStatus']} after {timeout} s")
        time.sleep(0.2)
    stack.status = status
    return stack
