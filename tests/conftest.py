"""Fixtures shared by every test directory. Keep this file to shared fixtures only."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from orders_cdc.local.stack import MotoServer, free_port


def _moto(tmp_path_factory: pytest.TempPathFactory, name: str) -> Iterator[str]:
    server = MotoServer(tmp_path_factory.mktemp(name), free_port())
    server.start()
    try:
        server.wait_ready(time.monotonic() + 30)
        yield server.endpoint
    finally:
        server.stop()


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real moto server (orders_cdc.local.moto_server) on 127.0.0.1 and a free port, for the whole session; yields its URL.

    Its log is <tmp>/moto-server/logs/moto.log. Stopped by PID (its own process group).
    Tests share it: use unique resource names (e.g. a uuid suffix).
    """
    yield from _moto(tmp_path_factory, "moto-server")


@pytest.fixture(scope="module")
def private_moto_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A moto server for one test module alone: for tests that deploy and delete whole
    CloudFormation stacks. moto's state dump (/moto-api/data.json, which other tests read)
    fails once an object's bucket was deleted under it."""
    yield from _moto(tmp_path_factory, "moto-private")


@pytest.fixture
def moto_resources(moto_server):
    """Every local resource under uuid-suffixed names on the shared moto server, and the
    environment a child or CLI needs to use them. Returns (names, clients, created, env)."""
    import os
    import uuid

    from orders_cdc.local.resources import LocalClients, ResourceNames, create_resources

    suffix = uuid.uuid4().hex[:8]
    names = ResourceNames.unique(suffix, shards=1)
    clients = LocalClients.from_endpoints({name: moto_server for name in LocalClients.__dataclass_fields__})
    created = create_resources(clients, names)
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "ORDERS_CDC_"))},
        "AWS_ENDPOINT_URL": moto_server, "AWS_REGION": "us-east-1",
        "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
        **names.environment(),
    }
    yield names, clients, created, env
    # moto allows 50 delivery streams per account, like Firehose: give this one back.
    try:
        clients.firehose.delete_delivery_stream(DeliveryStreamName=names.firehose_stream)
    except clients.firehose.exceptions.ResourceNotFoundException:
        pass
