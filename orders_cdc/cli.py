"""The `orders-cdc` command and the child entry point."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from orders_cdc import logs, settings as settings_module
from orders_cdc.errors import SettingsError

log = logging.getLogger("orders_cdc")


def child_main() -> int:
    """Entry of record_processor.py: one process per shard, driven by the daemon."""
    from orders_cdc.kcl import protocol

    proto_in, proto_out = protocol.protocol_streams()
    try:
        settings = settings_module.load()
    except SettingsError as exc:
        sys.stderr.write(f"orders-cdc: {exc}\n")
        return 2
    logs.setup(settings.log_level, component="processor")
    from orders_cdc.app import build_processor

    processor = build_processor(settings)
    try:
        protocol.run(processor, proto_in, proto_out)
    except Exception:
        # Not acknowledging is the point: the daemon stops this worker, and the restarted
        # worker resumes from the last checkpoint, which never passed an unsettled record.
        log.exception("processor failed; exiting without acknowledging the batch")
        return 1
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from orders_cdc.kcl import daemon
    from orders_cdc.preflight import preflight

    settings = settings_module.load()
    if args.from_:
        settings = _with_position(settings, args.from_)
    values = daemon.effective_properties(settings, Path(args.properties))
    if not args.skip_preflight:
        stream = values.get("streamName") or values["streamArn"].rsplit("/", 1)[-1]
        preflight(settings, stream, values.get("tableName", values["applicationName"]))
    command = daemon.build_command(values, Path(args.run_dir))
    return daemon.run(command, restart=args.restart)


def _with_position(settings, raw: str):
    from dataclasses import replace

    return replace(settings, initial_position=settings_module.parse_position(raw, "--from"))


def _cmd_decode(args: argparse.Namespace) -> int:
    from orders_cdc.attrvalue import dumps_exact
    from orders_cdc.change import DecodeError, decode_any, to_output

    out = sys.stdout.buffer
    for line in sys.stdin.buffer:
        line = line.strip()
        if not line:
            continue
        try:
            doc = to_output(decode_any(line))
        except DecodeError as exc:
            doc = {"error": exc.reason, "raw": line.decode("utf-8", "replace")}
        out.write(dumps_exact(doc) + b"\n")
    out.flush()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="orders-cdc",
        description="Consume DynamoDB Orders changes from Kinesis with the KCL MultiLangDaemon.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run the KCL daemon with the order processor (as ECS runs it)",
                         description="Check the settings, then run the KCL MultiLangDaemon until it exits; its exit code is ours.")
    run.add_argument("--properties", default="app.properties", help="base daemon properties (default: app.properties)")
    run.add_argument("--run-dir", default=".local/run", help="where the effective properties file is written")
    run.add_argument("--from", dest="from_", metavar="POSITION",
                     help="start position for new leases: TRIM_HORIZON, LATEST or an ISO-8601 time")
    run.add_argument("--skip-preflight", action="store_true", help="do not check the stream and endpoints first")
    run.add_argument("--restart", action="store_true",
                     help="restart the daemon with backoff when it fails (local runs; in ECS the service replaces the task)")
    run.set_defaults(func=_cmd_run)

    decode = sub.add_parser("decode", help="show records the way the processor sees them (stdin -> JSON lines)",
                            description="Read KDS-for-DynamoDB documents (JSON or base64) or DynamoDB Streams records, one a line.")
    decode.set_defaults(func=_cmd_decode)

    from orders_cdc.local import cli as local_cli

    local_cli.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logs.setup("INFO", component="cli")
    try:
        return args.func(args)
    except SettingsError as exc:
        sys.stderr.write(f"orders-cdc: {exc}\n")
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
