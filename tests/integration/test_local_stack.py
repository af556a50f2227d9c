"""The real embedded stack: moto server + LocalStack (kinesis-mock) on the host, no Docker."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from orders_cdc.local.bridge import StreamBridge
from orders_cdc.local.resources import LocalClients, ResourceNames, create_resources
from orders_cdc.local.stack import (
    ACCESS_KEY_ID,
    PROJECT_ROOT,
    REGION,
    SECRET_ACCESS_KEY,
    LocalStack,
    LocalStackConfig,
    StackError,
    _alive,
    exposed_listeners,
    free_port,
    stop_stale,
)

pytestmark = pytest.mark.integration
log = logging.getLogger(__name__)

# A root of its own (kept between runs, so only the first run installs kinesis-mock from
# npm), and free ports, so a developer's `make run-local` on 4566/4567 is left alone.
ROOT = PROJECT_ROOT / ".local" / "test-stack"
LS_PYTHON = Path(os.environ.get("ORDERS_CDC_LOCALSTACK_PYTHON", LocalStackConfig().localstack_python))


def config() -> LocalStackConfig:
    if not LS_PYTHON.is_file():
        # A failure, not a skip: `make test` builds it first, and a skipped tier would hide a broken install.
        pytest.fail(f"no LocalStack venv at {LS_PYTHON} (the Makefile builds .venv-localstack)")
    return LocalStackConfig(root=ROOT, moto_port=free_port(), localstack_port=free_port(),
                            localstack_python=LS_PYTHON)


@pytest.fixture
def stack() -> Iterator[LocalStack]:
    cfg = config()
    stop_stale(cfg.root)  # a previous run of this test killed hard
    t0 = time.monotonic()
    with LocalStack(cfg) as s:
        log.info("stack up in %.1fs %s", time.monotonic() - t0, s.timings)
        yield s


def h2c_list_streams(endpoint: str) -> tuple[str, str] | None:
    """A signed Kinesis ListStreams over h2c with prior knowledge, as the KCL sends it."""
    curl = shutil.which("curl")
    if curl is None:
        return None
    features = subprocess.run([curl, "--version"], capture_output=True, text=True).stdout
    if "HTTP2" not in features:
        return None
    proc = subprocess.run(
        [curl, "-sS", "--http2-prior-knowledge", "--max-time", "20",
         "--aws-sigv4", f"aws:amz:{REGION}:kinesis", "--user", f"{ACCESS_KEY_ID}:{SECRET_ACCESS_KEY}",
         "-H", "Content-Type: application/x-amz-json-1.1",
         "-H", "X-Amz-Target: Kinesis_20131202.ListStreams",
         "-d", "{}", "-w", "\n%{http_version} %{http_code}", endpoint + "/"],
        capture_output=True, text=True, check=True,
    )
    body, _, status = proc.stdout.rpartition("\n")
    return body, status


def test_stack_serves_everything_on_loopback_and_stops_clean(stack: LocalStack) -> None:
    endpoints = stack.endpoints
    assert endpoints["kinesis"] == stack.localstack.endpoint
    assert all(url.startswith("http://127.0.0.1:") for url in endpoints.values())

    names = ResourceNames(stream=f"orders-cdc-{uuid.uuid4().hex[:8]}")
    clients = LocalClients.from_endpoints(endpoints)
    created = create_resources(clients, names)
    again = create_resources(clients, names)  # idempotent
    assert again.stream_arn == created.stream_arn

    # Kinesis over HTTP/1.1 (boto3) ...
    shards = clients.kinesis.list_shards(StreamName=names.stream)["Shards"]
    assert len(shards) == 2
    # ... and over h2c, which is what the KCL speaks.
    h2 = h2c_list_streams(endpoints["kinesis"])
    if h2 is not None:
        body, status = h2
        assert status == "2 200", (status, body)
        assert names.stream in json.loads(body)["StreamNames"]

    # The local bridge end to end: moto's table stream -> LocalStack's Kinesis.
    clients.dynamodb.put_item(TableName=names.orders_table,
                              Item={"order_id": {"S": "it-1"}, "status": {"S": "placed"}})
    bridge = StreamBridge(clients.dynamodbstreams, clients.dynamodb, clients.kinesis,
                          names.orders_table, names.stream)
    deadline = time.monotonic() + 20
    while bridge.forwarded < 1:
        assert time.monotonic() < deadline
        bridge.pump_once()
    got = []
    for shard in shards:
        it = clients.kinesis.get_shard_iterator(StreamName=names.stream, ShardId=shard["ShardId"],
                                                ShardIteratorType="TRIM_HORIZON")["ShardIterator"]
        got += [json.loads(r["Data"]) for r in clients.kinesis.get_records(ShardIterator=it)["Records"]]
    assert [g["dynamodb"]["Keys"] for g in got] == [{"order_id": {"S": "it-1"}}]

    # Nothing of ours listens beyond loopback, kinesis-mock (node) included.
    pids = stack.pids()
    names_by_pid = {p: Path(f"/proc/{p}/comm").read_text().strip() for p in pids}
    assert "node" in names_by_pid.values(), names_by_pid
    exposed = exposed_listeners(pids)
    assert exposed == [] or exposed is None, exposed
    assert stack.localstack.shim is not None or shutil.which("gcc") is None

    t0 = time.monotonic()
    stack.stop()
    log.info("stack stopped in %.1fs", time.monotonic() - t0)
    assert not [p for p in pids if _alive(p)]
    assert not list((stack.root / "run").glob("*.pid"))


def test_down_stops_a_stack_left_behind_and_spares_strangers(stack: LocalStack) -> None:
    pids = stack.pids()
    assert len(pids) >= 3  # moto, LocalStack, kinesis-mock
    # A stranger whose PID sits in one of our pid files (PID reuse after a crash).
    stranger = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        (stack.root / "run" / "localstack.pid").write_text(f"{stranger.pid}\n")
        # `down` from another process would see exactly this: pid files + marked processes.
        signalled = stop_stale(stack.root, timeout=10)
        assert set(signalled) >= pids and stranger.pid not in signalled
        assert not [p for p in pids if _alive(p)]
        assert stranger.poll() is None
    finally:
        stranger.kill()
        stranger.wait()


def test_stop_kills_a_hung_localstack_and_its_orphaned_kinesis_mock() -> None:
    cfg = replace(config(), stop_timeout=1.0)
    stop_stale(cfg.root)
    stack = LocalStack(cfg).start()
    try:
        pids = stack.pids()
        ls_pid = stack.localstack.process.pid
        # A stopped process cannot act on SIGTERM: like LocalStack stuck in "Shutting down kinesis".
        os.kill(ls_pid, signal.SIGSTOP)
    finally:
        t0 = time.monotonic()
        stack.stop()
    assert time.monotonic() - t0 < 10
    assert not [p for p in pids if _alive(p)]


def test_a_second_stack_on_the_same_root_is_refused_and_leaves_the_first_running(stack: LocalStack) -> None:
    pids = stack.pids()
    other = LocalStack(replace(stack.cfg, moto_port=free_port(), localstack_port=free_port()))
    with pytest.raises(StackError, match="already running"):
        other.start()
    assert all(_alive(p) for p in pids)
