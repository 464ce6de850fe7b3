"""`python -m daemon COMMAND`: train in-process, run the demo, run the daemon, and talk to it.

`train`, `demo` and `schema` work without a daemon. `serve` runs the daemon; `submit`, `jobs`, `status`,
`follow`, `stop`, `cancel`, `logs`, `delete`, `deploy` and `info` are its command-line client (they need only
`websockets` and PyYAML, never torch). `label` captions images; `lora ...` are the LoRA tools.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from shared.client import DaemonError, DaemonUnavailable
from shared.errors import UserError, WriteError


def _cmd_train(args: argparse.Namespace) -> int:
    from shared.preflight import load_config
    from shared.train import run_training

    config = args.config or args.config_file
    if not config:
        raise UserError("train: give a config file: python -m daemon train --config my.yaml")
    cfg = load_config(config, args.set)
    try:
        result = run_training(cfg)
    except WriteError as exc:  # the LoRA was saved into output_dir before the deploy was tried
        if cfg.deploy_dir and exc.folder.resolve() == Path(cfg.deploy_dir).resolve():
            raise UserError(f"deploy_dir: {exc}; the trained LoRA is kept in {cfg.output_dir}") from None
        raise
    if cfg.machine_rank > 0:  # a multi-machine run: machine 0 writes the outputs
        print(f"Machine {cfg.machine_rank} finished its part; machine 0 writes the LoRA")
        return 0
    for verdict in result.verdicts:
        print(f"warning: {verdict['title']}: {verdict['message']}")
    best = result.best_checkpoint or {}
    if best and not best.get("final"):
        print(f"best checkpoint: step {best['step']} ({best.get('by')}): {best['path']}")
    print(f"LoRA written to {result.output_path}" + (f"; report: {result.report}" if result.report else ""))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from daemon.demo import run_demo

    run_demo(Path(args.workdir))
    return 0


def _cmd_schema(args: argparse.Namespace) -> int:
    import json

    from shared.schema.json_schema import document

    print(json.dumps(document(args.kind), indent=2))
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from daemon.server import serve
    from daemon.settings import load_settings

    settings = load_settings(
        args.state_dir, host=args.host, port=args.port,
        read_roots=args.allow_read or None, write_roots=args.allow_write or None,
        max_parallel_jobs=args.max_parallel_jobs, heartbeat_s=args.heartbeat,
    )
    return serve(settings)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m daemon",
        description="lora-daemon: train LoRA adapters for Stable Diffusion and LLMs, locally.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    train = sub.add_parser("train", help="train a LoRA from a YAML config, in this process")
    train.add_argument("config_file", nargs="?", help="the YAML config (or use --config)")
    train.add_argument("--config", "-c", help="the YAML config")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    train.set_defaults(func=_cmd_train)

    demo = sub.add_parser("demo", help="train the bundled tiny SD model on the bundled images")
    demo.add_argument("--workdir", default="demo_output", help="where the demo writes (default: ./demo_output)")
    demo.set_defaults(func=_cmd_demo)

    schema = sub.add_parser("schema", help="print the job config's JSON Schema (every key, its type, rule and "
                            "default), for other clients")
    schema.add_argument("--kind", choices=("train", "label"), default="train",
                        help="train (default): a training config; label: an auto-label job's options")
    schema.set_defaults(func=_cmd_schema)

    serve = sub.add_parser("serve", help="run the trainer daemon (websocket server and job queue)")
    serve.add_argument("--state-dir", help="state folder (default $LORA_DAEMON_HOME, else "
                       "$XDG_STATE_HOME/lora-daemon, else ~/.local/state/lora-daemon)")
    serve.add_argument("--host", help="bind address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default 7861; 0 picks a free one, written to daemon.json)")
    serve.add_argument("--allow-read", action="append", metavar="DIR",
                       help="folder jobs may read models and data from (repeatable; default: your home)")
    serve.add_argument("--allow-write", action="append", metavar="DIR",
                       help="folder jobs may write outputs and deploy into (repeatable; default: your home)")
    serve.add_argument("--max-parallel-jobs", type=int, help="jobs running at once (default 1)")
    serve.add_argument("--heartbeat", type=float, help="seconds between heartbeat messages (default 15)")
    serve.set_defaults(func=_cmd_serve)

    from daemon.remote import add_client_commands

    add_client_commands(sub)

    from shared.autolabel.cli import add_label_command

    add_label_command(sub)
    from daemon.lora_cli import add_lora_command

    add_lora_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except DaemonError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3 if isinstance(exc, DaemonUnavailable) else 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
