"""The child's GC tuning (app.tune_gc): fewer collections, but cyclic garbage is still collected."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_cycles_are_still_collected_after_tune_gc():
    # In a subprocess: the thresholds are process-wide. No explicit gc.collect() after
    # tune_gc: only the automatic collector can run the finalizers.
    script = textwrap.dedent("""
        import gc, weakref
        from orders_cdc.app import GC_THRESHOLDS, tune_gc
        tune_gc()
        assert gc.get_threshold() == GC_THRESHOLDS and gc.get_freeze_count() > 0
        collected = []

        class Node:
            pass

        for i in range(1000):
            a, b = Node(), Node()
            a.other, b.other = b, a  # a cycle: reference counting alone never frees it
            weakref.finalize(a, collected.append, i)
        del a, b
        for _ in range(5):  # batches: containers kept alive until the batch ends
            batch = [[i] for i in range(100_000)]
        del batch
        print(len(collected))
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) == 1000, "the cycles were collected without an explicit gc.collect()"
