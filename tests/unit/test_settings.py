from datetime import datetime, timezone

import pytest

from orders_cdc.errors import SettingsError
from orders_cdc.settings import load, parse_position

BASE = {"AWS_REGION": "us-east-1", "ORDERS_CDC_STREAM": "orders"}


def test_defaults():
    s = load(BASE)
    assert s.application_name is None, "app.properties' value is kept"
    assert s.resources.dlq_queue == "orders-cdc-dlq"
    assert s.checkpoint_every_records == 1000
    assert s.endpoint("kinesis") is None


def test_standard_endpoint_variables():
    s = load({**BASE, "AWS_ENDPOINT_URL": "http://127.0.0.1:1", "AWS_ENDPOINT_URL_KINESIS": "http://127.0.0.1:2"})
    assert s.endpoint("kinesis") == "http://127.0.0.1:2"
    assert s.endpoint("sqs") == "http://127.0.0.1:1"


def test_region_falls_back_to_default_region():
    assert load({"AWS_DEFAULT_REGION": "eu-west-1", "ORDERS_CDC_STREAM": "x"}).region == "eu-west-1"


@pytest.mark.parametrize(
    "env, message",
    [
        ({"ORDERS_CDC_STREAM": "x"}, "AWS_REGION is not set"),
        ({**BASE, "ORDERS_CDC_MAX_ATTEMPTS": "many"}, "ORDERS_CDC_MAX_ATTEMPTS='many' is not an integer"),
        ({**BASE, "ORDERS_CDC_MAX_ATTEMPTS": "0"}, "must be >= 1"),
        ({**BASE, "ORDERS_CDC_LOG_LEVEL": "LOUD"}, "expected one of"),
        ({**BASE, "AWS_ENDPOINT_URL_KINESIS": "localhost:4566"}, "AWS_ENDPOINT_URL_KINESIS='localhost:4566' is not an http"),
        ({**BASE, "ORDERS_CDC_INITIAL_POSITION": "yesterday"}, "expected TRIM_HORIZON, LATEST"),
        ({**BASE, "ORDERS_CDC_STREAM": "bad name"}, "not a valid stream name"),
    ],
)
def test_bad_settings_fail_in_one_line(env, message):
    with pytest.raises(SettingsError) as info:
        load(env)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_positions():
    assert parse_position("trim_horizon") == "TRIM_HORIZON"
    assert parse_position("1700000000") == datetime(2023, 11, 14, 22, 13, 20, tzinfo=timezone.utc)
    assert parse_position("AT_TIMESTAMP:2026-11-28T10:00:00+01:00") == datetime(2026, 11, 28, 9, tzinfo=timezone.utc)
    with pytest.raises(SettingsError, match="give a timezone"):
        parse_position("2026-11-28T10:00:00")


@pytest.mark.parametrize("handler_timeout", [20.0, 60.0, 300.0])
def test_clients_pool_a_connection_per_call_in_flight_and_the_send_clients_never_resend_by_themselves(handler_timeout):
    from orders_cdc.app import Clients
    from orders_cdc.settings import load

    clients = Clients(load({"AWS_REGION": "us-east-1", "ORDERS_CDC_MAX_IN_FLIGHT": "48",
                            "ORDERS_CDC_HANDLER_TIMEOUT_SECONDS": str(handler_timeout),
                            "ORDERS_CDC_IDEMPOTENCY_LOCK_SECONDS": str(handler_timeout + 30),
                            "ORDERS_CDC_BATCH_DEADLINE_SECONDS": str(handler_timeout + 60)}))
    for client in (clients.dynamodb, clients.ses, clients.sqs, clients.firehose):
        assert client.meta.config.max_pool_connections == 48
    # An email or a refund whose reply timed out may have gone: one attempt, and no read
    # timeout before the handler's deadline (whose late completion is still recorded).
    for send in (clients.ses, clients.sqs):
        assert send.meta.config.retries["total_max_attempts"] == 1
        assert send.meta.config.read_timeout > handler_timeout
    assert clients.firehose.meta.config.retries["total_max_attempts"] == 3
    assert clients.dynamodb.meta.config.retries["total_max_attempts"] == 3
    assert (clients.dynamodb.meta.config.connect_timeout, clients.dynamodb.meta.config.read_timeout) == (2, 5)


@pytest.mark.parametrize("name", ["ORDERS_CDC_WORKER_ID", "AWS_ENDPOINT_URL", "AWS_REGION", "ORDERS_CDC_APPLICATION"])
def test_a_line_break_in_a_setting_cannot_inject_a_property(name):
    env = {"AWS_REGION": "us-east-1", name: "http://127.0.0.1:4566/\nexecutableName = sh -c evil"}
    with pytest.raises(SettingsError, match=f"{name} contains a control character") as info:
        load(env)
    assert "\n" not in str(info.value)


def test_the_properties_file_never_gets_a_line_a_value_did_not_mean():
    from orders_cdc.kcl import properties

    with pytest.raises(ValueError, match="workerId"):
        properties.render({"workerId": "w-1\nexecutableName = sh"})


# ---- the replica (replication.orders_replica)

ARN = "arn:aws:dynamodb:eu-west-1:123456789012:table/OrdersCopy"


def test_replica_defaults_are_the_app_region_and_endpoint_and_ttl_expiries_replicated():
    s = load(BASE)
    assert (s.resources.replica_table, s.replica_region, s.replica_endpoint, s.replica_ttl_deletes) == \
        ("OrdersReplica", None, None, True)
    assert s.resources.environment()["ORDERS_CDC_REPLICA_TABLE"] == "OrdersReplica"


@pytest.mark.parametrize(("raw", "expected"), [("false", False), ("0", False), ("No", False), ("off", False),
                                               ("TRUE", True), ("1", True), ("yes", True), ("", True)])
def test_replica_ttl_deletes_is_a_boolean(raw, expected):
    assert load({**BASE, "ORDERS_CDC_REPLICA_TTL_DELETES": raw}).replica_ttl_deletes is expected


def test_replica_table_region_and_endpoint_are_read_once_and_an_arn_gives_its_region():
    s = load({**BASE, "ORDERS_CDC_REPLICA_TABLE": "Copy", "ORDERS_CDC_REPLICA_REGION": "eu-central-1",
              "ORDERS_CDC_REPLICA_ENDPOINT": "http://127.0.0.1:8000"})
    assert (s.resources.replica_table, s.replica_region, s.replica_endpoint) == ("Copy", "eu-central-1", "http://127.0.0.1:8000")
    assert load({**BASE, "ORDERS_CDC_REPLICA_TABLE": ARN}).replica_region == "eu-west-1"
    # the orders table's name is fine where it is another table: another region or endpoint
    assert load({**BASE, "ORDERS_CDC_REPLICA_TABLE": "Orders", "ORDERS_CDC_REPLICA_REGION": "eu-west-1"}).replica_region == "eu-west-1"


@pytest.mark.parametrize(
    "env, message",
    [
        ({"ORDERS_CDC_REPLICA_TTL_DELETES": "maybe"}, "ORDERS_CDC_REPLICA_TTL_DELETES='maybe' is not a boolean (true or false)"),
        ({"ORDERS_CDC_REPLICA_REGION": "Mars"}, "ORDERS_CDC_REPLICA_REGION='Mars' is not an AWS region (e.g. eu-west-1)"),
        ({"ORDERS_CDC_REPLICA_ENDPOINT": "localhost:8000"}, "ORDERS_CDC_REPLICA_ENDPOINT='localhost:8000' is not an http(s) URL"),
        ({"ORDERS_CDC_REPLICA_TABLE": "a b"}, "ORDERS_CDC_REPLICA_TABLE='a b' is not a DynamoDB table name or table ARN"),
        ({"ORDERS_CDC_REPLICA_TABLE": ARN, "ORDERS_CDC_REPLICA_REGION": "us-east-2"},
         f"ORDERS_CDC_REPLICA_TABLE='{ARN}' is in eu-west-1, not ORDERS_CDC_REPLICA_REGION='us-east-2'"),
        ({"ORDERS_CDC_REPLICA_TABLE": "Orders"},
         "ORDERS_CDC_REPLICA_TABLE='Orders' is the orders table itself (same region and endpoint)"),
        ({"ORDERS_CDC_REPLICA_TABLE": "Orders", "ORDERS_CDC_REPLICA_REGION": "us-east-1"}, "is the orders table itself"),
        ({"ORDERS_CDC_REPLICA_TABLE": "Orders", "AWS_ENDPOINT_URL": "http://127.0.0.1:5000",
          "ORDERS_CDC_REPLICA_ENDPOINT": "http://127.0.0.1:5000"}, "is the orders table itself"),
    ],
)
def test_bad_replica_settings_fail_in_one_line(env, message):
    with pytest.raises(SettingsError) as info:
        load({**BASE, **env})
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_the_replica_client_has_its_own_region_and_endpoint_and_the_dynamodb_conventions():
    from orders_cdc.app import Clients

    clients = Clients(load({**BASE, "AWS_ENDPOINT_URL_DYNAMODB": "http://127.0.0.1:1", "ORDERS_CDC_MAX_IN_FLIGHT": "48",
                            "ORDERS_CDC_REPLICA_REGION": "eu-west-1", "ORDERS_CDC_REPLICA_ENDPOINT": "http://127.0.0.1:2"}))
    replica = clients.replica
    assert replica is clients.replica, "built once"
    assert (replica.meta.region_name, replica.meta.endpoint_url) == ("eu-west-1", "http://127.0.0.1:2")
    assert (clients.dynamodb.meta.region_name, clients.dynamodb.meta.endpoint_url) == ("us-east-1", "http://127.0.0.1:1")
    assert replica.meta.config.max_pool_connections == 48
    assert (replica.meta.config.connect_timeout, replica.meta.config.read_timeout) == (2, 5)
    assert replica.meta.config.retries["total_max_attempts"] == 3
    # unset: the app's region and the standard DynamoDB endpoint
    same = Clients(load({**BASE, "AWS_ENDPOINT_URL_DYNAMODB": "http://127.0.0.1:1"})).replica
    assert (same.meta.region_name, same.meta.endpoint_url) == ("us-east-1", "http://127.0.0.1:1")
