"""`orders-cdc local ...`: the embedded local stack (no Docker) and the demo."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time

log = logging.getLogger(__name__)


def add_commands(sub) -> None:
    local = sub.add_parser("local", help="the local AWS stack (LocalStack Kinesis + moto) and the demo",
                           description="Run everything on this machine, no Docker. Servers bind 127.0.0.1.")
    cmds = local.add_subparsers(dest="local_command", required=True, metavar="ACTION")
    demo = cmds.add_parser("demo", help="stack + resources + bridge + real KCL daemon + order generator + live summary (make run-local)")
    demo.add_argument("--rate", type=float, default=2.0, help="table writes per second (default 2)")
    demo.add_argument("--duration", type=float, default=0, help="stop after this many seconds (default: until Ctrl-C)")
    demo.add_argument("--seed", type=int, default=7)
    _stack_options(demo)
    demo.set_defaults(func=_cmd_demo)
    up = cmds.add_parser("up", help="start the stack, create the resources and run the bridge until Ctrl-C (run the daemon yourself)")
    _stack_options(up)
    up.set_defaults(func=_cmd_up)
    down = cmds.add_parser("down", help="stop a stack left running by `up` or by a crashed run (by PID, ours only)")
    _stack_options(down)
    down.set_defaults(func=_cmd_down)
    seed = cmds.add_parser("seed", help="write demo orders into the Orders table of a running stack")
    seed.add_argument("--count", type=int, default=20)
    seed.add_argument("--seed", type=int, default=7)
    _stack_options(seed)
    seed.set_defaults(func=_cmd_seed)


def _stack_options(parser) -> None:
    parser.add_argument("--state-dir", default=".local", help="logs, pid files and LocalStack state (default .local)")
    parser.add_argument("--kinesis-port", type=int, default=4566, help="LocalStack (Kinesis) port on 127.0.0.1")
    parser.add_argument("--moto-port", type=int, default=4567, help="moto server port on 127.0.0.1")


def _run_config(args: argparse.Namespace):
    from pathlib import Path

    from orders_cdc.local.runner import LocalRunConfig
    from orders_cdc.local.stack import LocalStackConfig

    stack = LocalStackConfig(root=Path(args.state_dir).resolve(), moto_port=args.moto_port, localstack_port=args.kinesis_port)
    return LocalRunConfig(stack=stack)


def _cmd_up(args: argparse.Namespace) -> int:
    from orders_cdc.local.runner import LocalRun

    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    run = LocalRun(_run_config(args))
    try:
        run.start_stack()
        run.start_bridge()
        env_file = run.cfg.stack.root / "env"
        env_file.write_text("".join(f"export {k}={v}\n" for k, v in sorted(run.env().items())
                                    if k.startswith(("AWS_", "ORDERS_CDC_"))))
        sys.stderr.write(f"local stack up: Kinesis {run.stack.endpoints['kinesis']}, moto {run.stack.endpoints['dynamodb']}; "
                         f"the bridge forwards {run.cfg.names.orders_table} changes.\n"
                         f"In another shell: source {env_file} && orders-cdc run   (Ctrl-C here stops the stack)\n")
        stop.wait()
    finally:
        run.stop()
    return 0


def _cmd_down(args: argparse.Namespace) -> int:
    from orders_cdc.local.stack import stop_stale

    stopped = stop_stale(_run_config(args).stack.root)
    sys.stderr.write(f"stopped {len(stopped)} process(es): {sorted(stopped)}\n")
    return 0


def _cmd_seed(args: argparse.Namespace) -> int:
    from boto3.dynamodb.types import TypeSerializer

    from orders_cdc.local.orders import OrderDemo
    from orders_cdc.local.runner import LocalRun

    run = LocalRun(_run_config(args))
    ddb = run.client("dynamodb")
    demo, ser = OrderDemo(seed=args.seed), TypeSerializer()
    for _ in range(args.count):
        _, item = demo.step()
        ddb.put_item(TableName=run.cfg.names.orders_table, Item={k: ser.serialize(v) for k, v in item.items()})
    sys.stderr.write(f"wrote {args.count} changes\n")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from boto3.dynamodb.types import TypeSerializer
    from rich.console import Console
    from rich.live import Live

    from orders_cdc.local.orders import OrderDemo
    from orders_cdc.local.runner import LocalRun
    from orders_cdc.local.summary import Summary, one_line, render

    console = Console(stderr=True)
    # The console tells the story; JSON logs stay for warnings and errors.
    logging.getLogger().setLevel(logging.WARNING)
    stop = threading.Event()

    def on_signal(signum, _frame):
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    run = LocalRun(_run_config(args))
    started = time.monotonic()
    try:
        console.print("[bold]starting the local stack[/] (LocalStack Kinesis + moto; first run installs kinesis-mock)…")
        run.start_stack()
        if stop.is_set():
            return 130
        run.start_bridge()
        daemon = run.start_daemon()
        console.print(f"KCL daemon pid {daemon.pid}, log {daemon.log_path}")
        ddb = run.client("dynamodb")
        summary = Summary({s: run.client(s) for s in ("s3", "ses", "sqs", "dynamodb")}, run.cfg.names)
        writes = 0
        demo, ser = OrderDemo(seed=args.seed), TypeSerializer()
        next_write = time.monotonic()
        next_draw = 0.0
        # In a terminal the table redraws in place; piped, a line every few seconds.
        redraw = 1.0 if console.is_terminal else 5.0
        with Live(console=console, refresh_per_second=2, transient=False, auto_refresh=console.is_terminal) as live:
            while not stop.is_set():
                now = time.monotonic()
                if args.duration and now - started > args.duration:
                    break
                if not daemon.alive():
                    console.print(f"[red]the KCL daemon exited ({daemon.proc.returncode}); see {daemon.log_path}[/]")
                    return 1
                if now >= next_write:
                    _, item = demo.step()
                    ddb.put_item(TableName=run.cfg.names.orders_table, Item={k: ser.serialize(v) for k, v in item.items()})
                    writes += 1
                    next_write = now + 1.0 / args.rate
                if now >= next_draw:
                    snap = summary.snapshot(writes)
                    if console.is_terminal:
                        live.update(render(snap, now - started))
                    else:
                        console.print(one_line(snap, now - started))
                    next_draw = now + redraw
                stop.wait(min(0.05, max(0.0, next_write - time.monotonic())))
        return 0
    finally:
        console.print("stopping: daemon (checkpoints on SIGTERM), bridge, stack…")
        run.stop()
        console.print("stopped; no process left behind")
