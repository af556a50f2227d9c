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
