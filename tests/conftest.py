"""Fixtures shared by every test directory. Keep this file to shared fixtures only."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from orders_cdc.local.stack import MotoServer, free_port


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real `moto.server` on 127.0.0.1 and a free port, for the whole session; yields its URL.

    Its log is <tmp>/moto-server/logs/moto.log. Stopped by PID (its own process group).
    Tests share it: use unique resource names (e.g. a uuid suffix).
    """
    server = MotoServer(tmp_path_factory.mktemp("moto-server"), free_port())
    server.start()
    try:
        server.wait_ready(time.monotonic() + 30)
        yield server.endpoint
    finally:
        server.stop()
