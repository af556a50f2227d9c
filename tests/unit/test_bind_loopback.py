"""The LD_PRELOAD shim (infra/local/bind_loopback.c) that keeps kinesis-mock's listeners on
loopback: compiled with the machine's gcc, run under a real Python process's sockets."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from orders_cdc.local.stack import ensure_shim

PROBE = r"""
import json, socket
out = {}
def name(s):
    return s.getsockname()[0]
def tcp(family, addr=None, v6only=None):
    s = socket.socket(family, socket.SOCK_STREAM)
    if v6only is not None:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, v6only)
    if addr is not None:
        s.bind((addr, 0))
    s.listen()
    return name(s)
out["ipv4 0.0.0.0"] = tcp(socket.AF_INET, "0.0.0.0")
out["ipv6 :: dual-stack"] = tcp(socket.AF_INET6, "::", v6only=0)
out["ipv6 :: v6only"] = tcp(socket.AF_INET6, "::", v6only=1)
out["ipv6 ::ffff:0.0.0.0"] = tcp(socket.AF_INET6, "::ffff:0.0.0.0", v6only=0)
out["ipv4 listen unbound"] = tcp(socket.AF_INET)
out["ipv6 listen unbound"] = tcp(socket.AF_INET6, v6only=0)
out["ipv4 explicit"] = tcp(socket.AF_INET, "127.0.0.2")
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(("0.0.0.0", 0))
out["udp port 0"] = name(u)
print(json.dumps(out))
"""


def probe(env: dict[str, str]) -> dict[str, str]:
    proc = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.mark.skipif(shutil.which("gcc") is None and shutil.which("cc") is None, reason="no C compiler here")
def test_every_wildcard_listener_lands_on_loopback_and_nothing_else_moves(tmp_path):
    shim = ensure_shim(tmp_path)
    assert shim is not None
    plain = probe(dict(os.environ))
    assert plain["ipv4 0.0.0.0"] == "0.0.0.0" and plain["ipv4 listen unbound"] == "0.0.0.0", "the probe sees wildcards"
    shimmed = probe({**os.environ, "LD_PRELOAD": str(shim)})
    assert shimmed == {
        "ipv4 0.0.0.0": "127.0.0.1",
        "ipv6 :: dual-stack": "::ffff:127.0.0.1",
        "ipv6 :: v6only": "::1",
        "ipv6 ::ffff:0.0.0.0": "::ffff:127.0.0.1",
        "ipv4 listen unbound": "127.0.0.1",
        "ipv6 listen unbound": "::ffff:127.0.0.1",
        "ipv4 explicit": "127.0.0.2",
        "udp port 0": "0.0.0.0",  # a client choosing its source port: left alone
    }
