"""CloudWatch Embedded Metric Format lines, written to the log stream (stderr).

In ECS the daemon re-logs the child's stderr; infra/logback.xml unwraps those lines so
CloudWatch Logs sees each EMF document whole and turns it into metrics.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping
from typing import TextIO

import orjson

NAMESPACE = "OrdersCdc"


def emf(
    metrics: Mapping[str, float],
    dimensions: Mapping[str, str],
    units: Mapping[str, str] | None = None,
    stream: TextIO | None = None,
    **properties: object,
) -> None:
    units = units or {}
    document = {
        "_aws": {
            "Timestamp": int(time.time() * 1000),
            "CloudWatchMetrics": [
                {
                    "Namespace": NAMESPACE,
                    "Dimensions": [list(dimensions)],
                    "Metrics": [{"Name": name, "Unit": units.get(name, "Count")} for name in metrics],
                }
            ],
        },
        **dimensions,
        **metrics,
        **properties,
    }
    out = stream or sys.stderr
    out.write(orjson.dumps(document).decode() + "\n")
    out.flush()
