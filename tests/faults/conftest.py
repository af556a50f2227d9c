from __future__ import annotations

import pytest

from orders_cdc.local.runner import LocalRun, LocalRunConfig
from orders_cdc.local.stack import PROJECT_ROOT, LocalStackConfig, free_port


@pytest.fixture
def fault_run(request):
    """A LocalRun of its own per scenario (fresh stream, tables and lease table)."""
    runs = []

    def start(daemon: bool = True, **extra_env) -> LocalRun:
        root = PROJECT_ROOT / ".local" / f"faults-{request.node.name[:40]}"
        cfg = LocalRunConfig(stack=LocalStackConfig(root=root, moto_port=free_port(), localstack_port=free_port()),
                             extra_env={"ORDERS_CDC_CHECKPOINT_EVERY_SECONDS": "1", **extra_env})
        run = LocalRun(cfg)
        runs.append(run)
        run.start_stack()
        run.start_bridge()
        if daemon:
            run.start_daemon()
        return run

    yield start
    for run in runs:
        run.stop()


@pytest.fixture
def fault_proxy():
    """Start a FaultProxy (tests/faults/proxy.py) in front of a service; each is closed after
    the scenario's runs are stopped (ask for this fixture before `fault_run`), so a daemon
    still working at teardown does not lose its endpoint first."""
    from tests.faults.proxy import FaultProxy

    proxies = []

    def start(upstream: str, **options) -> FaultProxy:
        proxy = FaultProxy(upstream, **options).__enter__()
        proxies.append(proxy)
        return proxy

    yield start
    for proxy in proxies:
        proxy.__exit__(None, None, None)
