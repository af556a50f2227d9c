"""`orders-cdc run`'s stop: a SIGTERM to the wrapper reaches the daemon's whole process group,
so the Python children hear it too (and drain, see consumer.py) while the JVM shuts down.
A stand-in for the JVM (a Python script that starts a child, as the daemon starts one per
shard) records which processes got the signal."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

FAKE_DAEMON = textwrap.dedent("""
    import os, signal, subprocess, sys, time
    out = sys.argv[1]
    def record(name):
        def handler(signum, frame):
            open(out, "a").write(name + "\\n")
            sys.exit(0)
        return handler
    if len(sys.argv) > 2:  # the child
        signal.signal(signal.SIGTERM, record("child"))
    else:
        signal.signal(signal.SIGTERM, record("daemon"))
        child = subprocess.Popen([sys.executable, __file__, out, "child"])
        open(out + ".pgid", "w").write(str(os.getpgid(0)))
    open(out + ".ready", "a").write("x")
    while True:
        time.sleep(0.1)
""")

WRAPPER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from orders_cdc.kcl import daemon
    sys.exit(daemon.run(daemon.DaemonCommand([sys.executable, sys.argv[1], sys.argv[2]], Path("unused"))))
""")


def test_a_sigterm_to_the_wrapper_reaches_the_daemon_and_its_children(tmp_path):
    script, out = tmp_path / "fake_daemon.py", tmp_path / "signals.txt"
    script.write_text(FAKE_DAEMON)
    root = Path(__file__).resolve().parents[2]
    wrapper = subprocess.Popen([sys.executable, "-c", WRAPPER, str(script), str(out)], cwd=root)
    try:
        deadline = time.monotonic() + 30
        while not (Path(f"{out}.ready").exists() and len(Path(f"{out}.ready").read_text()) == 2):
            assert time.monotonic() < deadline, "the fake daemon and its child did not start"
            time.sleep(0.05)
        wrapper.send_signal(signal.SIGTERM)
        assert wrapper.wait(30) == 0
        deadline = time.monotonic() + 10
        while sorted(out.read_text().split()) != ["child", "daemon"]:
            assert time.monotonic() < deadline, out.read_text() if out.exists() else "no signal recorded"
            time.sleep(0.05)
    finally:
        if wrapper.poll() is None:
            wrapper.kill()
        pgid = Path(f"{out}.pgid")
        if pgid.exists():  # the fake daemon's session: none of it may outlive the test
            with contextlib.suppress(ProcessLookupError):
                os.killpg(int(pgid.read_text()), signal.SIGKILL)
