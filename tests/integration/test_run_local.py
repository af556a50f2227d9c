"""`make run-local`'s command, as a newcomer runs it: the demo shows orders flowing through
the real daemon, and stopping it leaves no process behind."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from orders_cdc.local.stack import PROJECT_ROOT, free_port, marked_pids

pytestmark = pytest.mark.integration


def test_demo_shows_orders_flowing_and_ctrl_c_cleans_up(tmp_path):
    state = PROJECT_ROOT / ".local" / "test-demo"
    cmd = [sys.executable, "-m", "orders_cdc.cli", "local", "demo", "--rate", "4",
           "--state-dir", str(state), "--kinesis-port", str(free_port()), "--moto-port", str(free_port())]
    out_path = tmp_path / "demo.out"
    with open(out_path, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=PROJECT_ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + 240
            consumed = 0
            while time.monotonic() < deadline and consumed < 20:
                time.sleep(3)
                assert proc.poll() is None, out_path.read_text()[-3000:]
                counts = re.findall(r"consumed\[([^\]]*)\]", out_path.read_text())
                if counts:
                    consumed = sum(int(n) for n in re.findall(r"=(\d+)", counts[-1]))
            assert consumed >= 20, out_path.read_text()[-3000:]
            assert len(marked_pids(state)) >= 3, "stack servers, daemon and children carry the marker"
        finally:
            proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
            code = proc.wait(120)
    text = out_path.read_text()
    assert code == 0, text[-3000:]
    assert "stopped; no process left behind" in text
    assert marked_pids(state) == set(), "a process of this run outlived it"
    assert re.search(r"emails=\d+ refunds=\d+", text)
