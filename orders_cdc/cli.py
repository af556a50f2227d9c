"""The `orders-cdc` command and the child entry point."""

from __future__ import annotations

import argparse
import logging
import re
import signal
import sys
import time
import uuid
from pathlib import Path

from botocore.exceptions import BotoCoreError, ClientError

from orders_cdc import health, logs, settings as settings_module
from orders_cdc.errors import SettingsError, Stopping

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
    from orders_cdc.app import build_processor, tune_gc

    processor = build_processor(settings)

    def stop(_signum, _frame):
        # `orders-cdc run` passes ECS's SIGTERM to the daemon's process group, so this child
        # hears it while the daemon waits shutdownGraceMillis for its batch: start no more
        # calls (an email begun now could outlive the grace and its done-marker). A second
        # SIGTERM ends the child at once.
        processor.request_stop()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)

    signal.signal(signal.SIGTERM, stop)
    tune_gc()
    try:
        protocol.run(processor, proto_in, proto_out)
    except Stopping as exc:
        log.warning("processor stopped; exiting without acknowledging", extra={"why": str(exc)})
        return 1
    except Exception:
        # Not acknowledging is the point: the daemon stops this worker, and the restarted
        # worker resumes from the last checkpoint, which never passed an unsettled record.
        log.exception("processor failed; exiting without acknowledging the batch")
        return 1
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from orders_cdc.kcl import daemon
    from orders_cdc.preflight import preflight

    if args.check:
        return _check(args)
    settings = settings_module.load()
    if args.from_:
        settings = _with_position(settings, args.from_)
    values = daemon.effective_properties(settings, Path(args.properties))
    if not args.skip_preflight:
        preflight(settings, values)
    # The KCL's own default is a random UUID; choosing it here lets the heartbeat find
    # this worker's leases.
    values.setdefault("workerId", str(uuid.uuid4()))
    command = daemon.build_command(values, Path(args.run_dir))
    return daemon.run(command, restart=args.restart, monitor=health.monitor_for(settings, values))


def _check(args: argparse.Namespace) -> int:
    """`run --check`: every problem, one line each, and nothing started. Exit 0 or 1."""
    from orders_cdc.kcl import daemon
    from orders_cdc.preflight import checks

    try:
        settings = settings_module.load()
        if args.from_:
            settings = _with_position(settings, args.from_)
    except SettingsError as exc:
        print(f"orders-cdc: {exc}")
        return 1
    values, problems = daemon.checked_properties(settings, Path(args.properties))
    if not problems and not args.skip_preflight:
        problems = list(checks(settings, values))
    for problem in problems:
        print(f"orders-cdc: {problem}")
    if not problems:
        print(f"orders-cdc: ok: {args.properties} and the environment check out"
              + ("" if args.skip_preflight else "; the stream, the lease table and every downstream resource answer"))
    return 1 if problems else 0


def _context(args: argparse.Namespace):
    """Settings, the effective daemon properties, and clients for the stream and lease table."""
    import boto3

    from orders_cdc.kcl import daemon

    settings = settings_module.load()
    values = daemon.effective_properties(settings, Path(args.properties))
    session = boto3.session.Session(region_name=settings.region)
    kinesis = session.client("kinesis", endpoint_url=settings.endpoint("kinesis"))
    dynamodb = session.client("dynamodb", endpoint_url=settings.endpoint("dynamodb"))
    stream = values.get("streamName") or values["streamArn"].rsplit("/", 1)[-1]
    return settings, values, kinesis, dynamodb, stream, values.get("tableName", values["applicationName"])


def _cmd_status(args: argparse.Namespace) -> int:
    """Shards (owner, checkpoint, when its record arrived, lag, closed or open, parents),
    workers (leases held), and the dead-letter queue: a table, or one JSON document."""
    import time

    import boto3
    import orjson
    from botocore.config import Config

    from orders_cdc import leases
    from orders_cdc.kcl import daemon

    settings = settings_module.load()
    values = daemon.effective_properties(settings, Path(args.properties))
    # Short timeouts and few retries: an endpoint that does not answer is one line, soon.
    config = Config(connect_timeout=3, read_timeout=10, retries={"mode": "standard", "total_max_attempts": 3})
    session = boto3.session.Session(region_name=values.get("regionName") or settings.region)
    kinesis = session.client("kinesis", endpoint_url=values.get("kinesisEndpoint") or settings.endpoint("kinesis"),
                             config=config)
    dynamodb = session.client("dynamodb", endpoint_url=values.get("dynamoDBEndpoint") or settings.endpoint("dynamodb"),
                              config=config)
    sqs = session.client("sqs", endpoint_url=settings.endpoint("sqs"), config=config)
    cloudwatch = session.client("cloudwatch", endpoint_url=settings.endpoint("cloudwatch"), config=config)
    stream = values.get("streamName") or values["streamArn"].rsplit("/", 1)[-1]
    application = values["applicationName"]
    table = values.get("tableName", application)

    current = leases.read_leases(dynamodb, table)
    shards = leases.shard_rows(kinesis, stream, current)
    reports = leases.worker_metric_reports(dynamodb, table, values.get("workerMetricsTableName",
                                                                       f"{application}-WorkerMetricStats"))
    workers = leases.worker_rows(current, reports, time.time())
    letters = leases.dead_letter_status(sqs, cloudwatch, settings.resources.dlq_queue)
    if args.json:
        doc = {"stream": stream, "lease_table": table, "shards": shards, "workers": workers, "dead_letters": letters}
        sys.stdout.write(orjson.dumps(doc).decode() + "\n")
        return 0
    sys.stdout.write(_status_table(stream, table, shards, workers, letters))
    return 0


def _status_table(stream: str, table: str, shards: list[dict], workers: list[dict], letters: dict) -> str:
    def lag(row):
        if row["error"]:
            return "? (" + row["error"][:60] + ")"
        return "?" if row["millis_behind"] is None else f"{row['millis_behind']:,} ms"

    def seq(value: str) -> str:
        return value if len(value) <= 14 else "..." + value[-11:]

    shard_lines = [("SHARD", "STATE", "OWNER", "CHECKPOINT", "CHECKPOINTED RECORD ARRIVED", "LAG", "PARENTS")]
    for r in shards:
        shard_lines.append((r["shard"], r["state"], r["owner"] or "-", seq(r["checkpoint"]) or "-",
                            (r["checkpoint_arrival"] or "-")[:19].replace("T", " "), lag(r), ",".join(r["parents"]) or "-"))
    worker_lines = [("WORKER", "LEASES", "LAST REPORT TO THE ASSIGNER")]
    for w in workers:
        ago = "-" if w["reported_seconds_ago"] is None else f"{w['reported_seconds_ago']:.0f} s ago"
        worker_lines.append((w["worker"], str(w["leases"]), ago))
    if letters["error"]:
        dlq = f"dead letters ({letters['queue']}): {letters['error']}"
    else:
        age = ("n/a" if letters["oldest_age_seconds"] is None else f"{letters['oldest_age_seconds']:.0f} s")
        dlq = (f"dead letters ({letters['queue']}): {letters['visible']} waiting, {letters['in_flight']} being read; "
               f"oldest {age} ({letters['oldest_age_source']})")
    parts = [f"stream {stream}: {len(shards)} shard(s); lease table {table}\n", _columns(shard_lines), "\n",
             _columns(worker_lines) if len(worker_lines) > 1 else "no worker holds a lease or reports\n", "\n", dlq + "\n"]
    return "".join(parts)


def _columns(lines: list[tuple[str, ...]]) -> str:
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    return "".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() + "\n" for line in lines)


def _cmd_health(args: argparse.Namespace) -> int:
    """The container's health check: 0 healthy, 1 not; one line on stderr either way."""
    from dataclasses import replace

    try:
        settings = settings_module.load_health()
    except SettingsError as exc:
        sys.stderr.write(f"orders-cdc: unhealthy: {exc}\n")
        return 1
    if args.heartbeat_file:
        settings = replace(settings, heartbeat_file=Path(args.heartbeat_file))
    healthy, line = health.check(settings)
    sys.stderr.write(f"orders-cdc: {line}\n")
    return 0 if healthy else 1


def _cmd_replay(args: argparse.Namespace) -> int:
    from orders_cdc import replay
    from orders_cdc.app import Clients, build_pipeline
    from orders_cdc.leases import retention_hours

    settings, _, kinesis, _, stream, _ = _context(args)
    now = replay.now_utc()
    start = replay.parse_time(args.from_, "--from", now)
    end = replay.parse_time(args.to, "--to", now) if args.to else None
    if not 0 < args.read_share <= 1:
        raise SettingsError(f"--read-share {args.read_share:g}: give a share of the shard's 5 reads/s, in (0, 1]")
    if args.parallel < 1:
        raise SettingsError(f"--parallel {args.parallel}: give at least 1 shard at a time")
    window = replay.check_window(start, end, now=now, retention_hours=retention_hours(kinesis, stream),
                                 ttl_seconds=settings.idempotency_ttl_seconds, force=args.force)
    plan = replay.choose_shards(replay.list_shards(kinesis, stream), args.shard)
    clients = Clients(settings)
    namespace = f"force@{window.start.isoformat()}#" if args.force else ""

    def new_pipeline():
        return build_pipeline(settings, clients, args.routes, key_namespace=namespace)

    new_pipeline()  # a bad --routes fails here, before anything is read
    if args.force and not args.dry_run:
        sys.stderr.write("orders-cdc: --force: EVERY reaction in the window runs again, those already done included: "
                         "emails are sent again, refunds requested again, counters added again.\n")
    job = replay.Replay(kinesis, stream, window, plan, new_pipeline, dry_run=args.dry_run,
                        read_share=args.read_share, parallel=args.parallel)
    log.info("replay", extra={"from": window.start.isoformat(), "to": window.end.isoformat(), "shards": len(plan),
                              "routes": args.routes or "all", "dry_run": args.dry_run, "force": args.force})
    try:
        with _replay_progress(job, args.progress) as on_progress:
            job.on_progress = on_progress
            tally = job.run()
    except replay.ReplayFailed as exc:
        from orders_cdc.errors import describe

        left = ", ".join(f"{p.shard} at {p.position.isoformat() if p.position else window.start.isoformat()}"
                         for p in exc.progress.values() if not p.finished)
        sys.stderr.write(f"orders-cdc: replay stopped: shard {exc.shard}: {describe(exc.cause)}; not finished: {left}. "
                         f"Run it again with the same --from: what was done is found done, not repeated.\n")
        _replay_summary(job.tally, window, args)
        return 1
    _replay_summary(tally, window, args)
    return 0


def _replay_progress(job, mode: str):
    """A rich progress bar on stderr (records, shards, rate, how far behind the tip, ETA)."""
    import contextlib

    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from orders_cdc.replay import fraction_done

    console = Console(stderr=True)
    if mode == "off" or (mode == "auto" and not console.is_terminal):
        return contextlib.nullcontext(lambda progress, tally: None)
    bar = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                   TextColumn("{task.fields[detail]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                   console=console, transient=False)
    task = bar.add_task("replay", total=1000, detail="")
    started = time.monotonic()

    def on_progress(progress, tally) -> None:
        behind = max((p.millis_behind or 0) for p in progress.values() if not p.finished) \
            if any(not p.finished for p in progress.values()) else 0
        rate = tally.records / max(time.monotonic() - started, 1e-6)
        bar.update(task, completed=1000 * fraction_done(progress, job.window),
                   detail=f"{tally.records} records, {len(tally.shards_done)}/{len(progress)} shards, "
                          f"{rate:,.0f}/s, {behind / 1000:,.0f} s behind the tip")

    @contextlib.contextmanager
    def running():
        with bar:
            yield on_progress

    return running()


def _replay_summary(tally, window, args: argparse.Namespace) -> None:
    import orjson

    doc = {"from": window.start.isoformat(), "to": window.end.isoformat(), "dry_run": args.dry_run,
           "force": args.force} | tally.as_dict()
    if args.json:
        sys.stdout.write(orjson.dumps(doc).decode() + "\n")
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    title = (f"{'would replay' if args.dry_run else 'replayed'} {tally.records} record(s) of "
             f"{len(tally.shards_done)} shard(s), {window.start.isoformat()} to {window.end.isoformat()}")
    table = Table(title=title)
    columns = sorted({o for outcomes in doc["routes"].values() for o in outcomes})
    table.add_column("route")
    for column in columns:
        table.add_column(column, justify="right")
    for route, outcomes in doc["routes"].items():
        table.add_row(route, *(str(outcomes.get(c, 0)) for c in columns))
    console.print(table)
    console.print("records: " + ", ".join(f"{k} {v}" for k, v in doc["outcomes"].items()) + "; events: "
                  + ", ".join(f"{k} {v}" for k, v in doc["events"].items()))


def _cmd_rewind(args: argparse.Namespace) -> int:
    from orders_cdc import leases, replay

    settings, values, kinesis, dynamodb, stream, table = _context(args)
    now = replay.now_utc()
    when = replay.parse_time(args.from_, "--from", now)
    replay.check_window(when, None, now=now, retention_hours=leases.retention_hours(kinesis, stream),
                        ttl_seconds=settings.idempotency_ttl_seconds, force=args.force)
    if not args.skip_running_check:
        failover = int(values.get("failoverTimeMillis", "10000")) / 1000
        log.info("checking that no worker is running", extra={"seconds": failover})
        live = leases.renewing_workers(dynamodb, table, failover)
        if live:
            raise SettingsError(f"workers are running ({', '.join(sorted(set(live.values())))}): stop every worker first")
    current = leases.read_leases(dynamodb, table)
    changed = leases.reset_to_timestamp(dynamodb, table, current)
    sys.stderr.write(f"{changed} lease(s) of {table} set to AT_TIMESTAMP ({len(current) - changed} already were).\n"
                     f"Start the workers with: orders-cdc run --from {when.isoformat()}\n"
                     f"(or ORDERS_CDC_INITIAL_POSITION={when.isoformat()}). Side effects already done are not "
                     f"repeated while their idempotency records live; analytics and audit copies are sent again.\n")
    return 0


def _cmd_dlq(args: argparse.Namespace) -> int:
    import orjson

    from orders_cdc import dlq
    from orders_cdc.app import Clients, build_pipeline

    settings = settings_module.load()
    clients = Clients(settings)
    url = clients.queue_url(settings.resources.dlq_queue)
    out = sys.stdout
    if args.dlq_command == "list":
        received = list(dlq.receive(clients.sqs, url, args.max))
        for r in received:
            record = {"record": dlq.whole(r.letter, clients.s3).get("record")} if args.records else {}
            out.write(orjson.dumps(dlq.summary(r.letter) | record).decode() + "\n")
        dlq.release(clients.sqs, url, received)  # listing takes nothing away
        return 0
    for letter, outcome in dlq.redrive(build_pipeline(settings, clients), clients.sqs, url, args.max, clients.s3):
        out.write(orjson.dumps({"sequence_number": letter["sequence_number"], "shard_id": letter["shard_id"],
                                "was": letter["reason"], "now": outcome}).decode() + "\n")
    return 0


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
    run.add_argument("--check", action="store_true",
                     help="check every setting, the properties file and every resource, print one line per problem, "
                          "start nothing; exit 0 or 1")
    run.add_argument("--restart", action="store_true",
                     help="restart the daemon with backoff when it fails (local runs; in ECS the service replaces the task)")
    run.set_defaults(func=_cmd_run)

    status = sub.add_parser("status", help="shards (owner, checkpoint, lag, closed/open), workers, dead letters",
                            description="Read the KCL lease table, ask Kinesis how far each checkpoint is behind, "
                                        "and the dead-letter queue how deep it is.")
    status.add_argument("--properties", default="app.properties")
    status.add_argument("--json", action="store_true",
                        help="one JSON document: shards, workers and dead_letters")
    status.set_defaults(func=_cmd_status)

    health_cmd = sub.add_parser(
        "health", help="is this container's worker alive and at work? (exit 0 healthy, 1 not)",
        description="Read the heartbeat that `orders-cdc run` keeps (ORDERS_CDC_HEARTBEAT_FILE): healthy while the "
                    "JVM lives and the worker renews a lease, reports to the lease assigner or processes batches, "
                    "as seen within ORDERS_CDC_HEARTBEAT_STALE_SECONDS. No AWS call.")
    health_cmd.add_argument("--heartbeat-file", help="default: ORDERS_CDC_HEARTBEAT_FILE or /tmp/orders-cdc.heartbeat")
    health_cmd.set_defaults(func=_cmd_health)

    replay = sub.add_parser(
        "replay", help="send a window of the stream through the pipeline again, beside the live consumer",
        description="Read the stream from --from (to --to, or the tip), every shard, parents before children, and "
                    "send it through the same pipeline and idempotency store as the consumer: what was done is "
                    "found done. TIME: ISO-8601 with a zone, epoch seconds, or relative (-2h, -30m, -1d).")
    replay.add_argument("--from", dest="from_", metavar="TIME", required=True)
    replay.add_argument("--to", metavar="TIME", help="stop before this arrival time (default: the tip at the start)")
    replay.add_argument("--shard", nargs="+", metavar="ID", help="only these shards")
    replay.add_argument("--routes", nargs="+", metavar="NAME", help="only these routes (e.g. notification.shipped_email)")
    replay.add_argument("--dry-run", action="store_true",
                        help="read and route only: print what would run and what is already done; no side effect")
    replay.add_argument("--force", action="store_true",
                        help="run reactions again even when done before (emails, refunds, counters!), and accept "
                             "a --from older than the idempotency records' TTL")
    replay.add_argument("--read-share", type=float, default=0.2, metavar="SHARE",
                        help="share of each shard's 5 GetRecords/s to use (default 0.2: 1 read/s of up to 1,000 "
                             "records; the live consumer polls up to 4/s when idle)")
    replay.add_argument("--parallel", type=int, default=4, metavar="N", help="shards read at once (default 4)")
    replay.add_argument("--progress", choices=("auto", "on", "off"), default="auto",
                        help="progress bar on stderr (auto: when it is a terminal)")
    replay.add_argument("--json", action="store_true", help="the summary as one JSON object")
    replay.add_argument("--properties", default="app.properties")
    replay.set_defaults(func=_cmd_replay)

    rewind = sub.add_parser("rewind", help="with every worker stopped, restart the consumer itself from a time",
                            description="Point every lease at AT_TIMESTAMP (all or nothing per 100 leases; run it "
                                        "again to finish one that failed part-way); then start the workers with "
                                        "`orders-cdc run --from TIME`.")
    rewind.add_argument("--from", dest="from_", metavar="TIME", required=True,
                        help="ISO-8601 time with a zone, epoch seconds, or relative (-2h)")
    rewind.add_argument("--skip-running-check", action="store_true",
                        help="do not wait a failover period to check that no worker renews its leases")
    rewind.add_argument("--force", action="store_true", help="accept a time older than the idempotency records' TTL")
    rewind.add_argument("--properties", default="app.properties")
    rewind.set_defaults(func=_cmd_rewind)

    dlq = sub.add_parser("dlq", help="list or redrive dead-lettered records",
                         description="Dead letters hold the original record, the reason, the attempts, shard and sequence.")
    dlq_cmds = dlq.add_subparsers(dest="dlq_command", required=True, metavar="ACTION")
    dlq_list = dlq_cmds.add_parser("list", help="print letters as JSON lines (they stay in the queue)")
    dlq_list.add_argument("--max", type=int, default=100)
    dlq_list.add_argument("--records", action="store_true", help="include the original records")
    dlq_list.set_defaults(func=_cmd_dlq)
    dlq_redrive = dlq_cmds.add_parser("redrive", help="send letters through the pipeline again (idempotently)")
    dlq_redrive.add_argument("--max", type=int, default=100)
    dlq_redrive.set_defaults(func=_cmd_dlq)

    decode = sub.add_parser("decode", help="show records the way the processor sees them (stdin -> JSON lines)",
                            description="Read KDS-for-DynamoDB documents (JSON or base64) or DynamoDB Streams records, one a line.")
    decode.set_defaults(func=_cmd_decode)

    from orders_cdc.local import cli as local_cli

    local_cli.add_commands(sub)
    return parser


def _relative_times(argv: list[str]) -> list[str]:
    """`--from -2h` as `--from=-2h`: argparse takes a value that starts with '-' for an option."""
    out: list[str] = []
    for arg in argv:
        if out and out[-1] in ("--from", "--to") and re.fullmatch(r"-\d.*", arg):
            out[-1] = f"{out[-1]}={arg}"
        else:
            out.append(arg)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(_relative_times(list(sys.argv[1:] if argv is None else argv)))
    logs.setup("INFO", component="cli")
    try:
        return args.func(args)
    except SettingsError as exc:
        sys.stderr.write(f"orders-cdc: {exc}\n")
        return 2
    except (BotoCoreError, ClientError) as exc:
        # An endpoint that does not answer, no credentials, a missing resource: one line.
        sys.stderr.write(f"orders-cdc: {_aws_problem(exc)}\n")
        return 2
    except KeyboardInterrupt:
        return 130


def _aws_problem(exc: Exception) -> str:
    from botocore.exceptions import EndpointConnectionError, NoCredentialsError

    from orders_cdc.errors import describe, redact

    if isinstance(exc, EndpointConnectionError):
        return f"cannot reach {exc.kwargs.get('endpoint_url')}: is the endpoint right, and the service up?"
    if isinstance(exc, NoCredentialsError):
        return "no AWS credentials found (environment, profile or task role)"
    if isinstance(exc, ClientError):
        return describe(exc)
    return redact(str(exc)) or type(exc).__name__


if __name__ == "__main__":
    sys.exit(main())
