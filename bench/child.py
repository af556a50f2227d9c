"""B1's child for OUR processor: what record_processor.py runs, with in-memory AWS clients.

Same entry steps as ``orders_cdc.cli.child_main`` (protocol streams, settings from the
environment, JSON logs, ``build_processor``, ``protocol.run``); the only difference is the
``clients`` argument: ``bench.fakes.FakeClients``. The real routes from
``processors.all_routes`` run; each handler is wrapped only to attribute its fake calls.

    python -m bench.child [--mode full|route-only] [--calls-out FILE] [--profile FILE]

``route-only`` replaces every handler with a no-op: decode + route + pipeline + protocol.
"""

from __future__ import annotations

import argparse
import sys

from bench.fakes import CallLog, FakeClients, bench_routes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.child")
    parser.add_argument("--mode", choices=("full", "route-only"), default="full")
    parser.add_argument("--calls-out")
    parser.add_argument("--profile")
    args = parser.parse_args(argv)

    from orders_cdc import logs, settings as settings_module
    from orders_cdc.app import build_pipeline, tune_gc
    from orders_cdc.checkpointing import CheckpointPolicy
    from orders_cdc.consumer import ChangeProcessor
    from orders_cdc.kcl import protocol
    from orders_cdc.routing import Router

    proto_in, proto_out = protocol.protocol_streams()
    settings = settings_module.load()
    logs.setup(settings.log_level, component="processor")
    calls = CallLog()
    # The production pipeline (app.build_pipeline), with fake clients and counted routes.
    pipeline = build_pipeline(settings, FakeClients(settings, calls))
    pipeline.router = Router(bench_routes(pipeline.router.routes, args.mode, calls))
    processor = ChangeProcessor(
        pipeline, lambda: CheckpointPolicy(settings.checkpoint_every_records, settings.checkpoint_every_seconds))

    tune_gc()  # as child_main does

    profiler = None
    if args.profile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    try:
        protocol.run(processor, proto_in, proto_out)
    finally:
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(args.profile)
        calls.save(args.calls_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
