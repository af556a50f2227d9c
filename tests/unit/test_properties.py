from datetime import datetime, timezone
from pathlib import Path

import pytest

from orders_cdc.errors import SettingsError
from orders_cdc.kcl import daemon, properties
from orders_cdc.settings import load

ROOT = Path(__file__).resolve().parents[2]
BASE = """executableName = python3 x.py
applicationName = app
streamName = s
AwsCredentialsProvider = DefaultCredentialsProvider
"""


def check(text):
    properties.validate(properties.parse(text))


def test_shipped_app_properties_is_valid():
    check((ROOT / "app.properties").read_text())


def test_misspelt_key_fails_with_a_suggestion():
    with pytest.raises(SettingsError, match=r"app.properties:5: unknown key 'DynamoDBEndpoint' \(did you mean 'dynamoDBEndpoint'\?\)"):
        check(BASE + "DynamoDBEndpoint = http://127.0.0.1:1\n")


def test_sdk_v1_style_key_is_unknown():
    with pytest.raises(SettingsError, match="unknown key 'kinesisEndpointUrl'"):
        check(BASE + "kinesisEndpointUrl = http://x\n")


def test_nested_client_keys_are_allowed():
    check(BASE + "cloudWatchClient.endpointOverride = http://127.0.0.1:1\n")


def test_credentials_key_is_case_normalised_like_the_daemon():
    check(BASE.replace("AwsCredentialsProvider", "AWSCredentialsProvider"))


@pytest.mark.parametrize(
    "line, message",
    [
        ("metricsLevel = NONE  # quiet\n", "inline '#'"),
        ("metricsLevel = NONE \n", "trailing spaces"),
        ("retrievalMode = PUSH\n", "expected one of POLLING, FANOUT, DEFAULT"),
        ("initialPositionInStream = AT_TIMESTAMP\n", "expected one of TRIM_HORIZON, LATEST"),
        ("cleanupLeasesUponShardCompletion = false\n", "has no effect"),
        ("applicationName = again\n", "set twice"),
    ],
)
def test_values_the_daemon_would_misread(line, message):
    with pytest.raises(SettingsError, match=message):
        check(BASE + line)


@pytest.mark.parametrize("missing", ["executableName", "applicationName", "AwsCredentialsProvider", "streamName"])
def test_required_keys(missing):
    text = "\n".join(l for l in BASE.splitlines() if not l.startswith(missing))
    with pytest.raises(SettingsError, match=f"{missing}.* is missing"):
        check(text)


def test_effective_properties_lay_the_environment_over_the_file(tmp_path):
    env = {
        "AWS_REGION": "eu-west-1",
        "ORDERS_CDC_STREAM": "orders-stream",
        "ORDERS_CDC_APPLICATION": "orders-cdc-prod",
        "ORDERS_CDC_WORKER_ID": "w-1",
        "AWS_ENDPOINT_URL": "http://127.0.0.1:4567",
        "AWS_ENDPOINT_URL_KINESIS": "http://127.0.0.1:4566",
        "ORDERS_CDC_INITIAL_POSITION": "2026-11-28T10:00:00Z",
        "ORDERS_CDC_MAX_LEASES_FOR_WORKER": "4",
    }
    assert "maxLeasesForWorker" not in daemon.effective_properties(load({"AWS_REGION": "eu-west-1"}), ROOT / "app.properties")
    values = daemon.effective_properties(load(env), ROOT / "app.properties", executable="py rp.py")
    assert values["maxLeasesForWorker"] == "4"
    assert values["executableName"] == "py rp.py"
    assert values["streamName"] == "orders-stream"
    assert values["applicationName"] == "orders-cdc-prod"
    assert values["regionName"] == "eu-west-1"
    assert values["workerId"] == "w-1"
    assert values["kinesisEndpoint"] == "http://127.0.0.1:4566"
    assert values["dynamoDBEndpoint"] == "http://127.0.0.1:4567"
    assert "initialPositionInStream" not in values
    assert values["initialPositionInStreamExtended"] == str(int(datetime(2026, 11, 28, 10, tzinfo=timezone.utc).timestamp()))
    rendered = properties.render(values)
    properties.validate(properties.parse(rendered))
