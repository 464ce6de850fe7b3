"""`python -m daemon COMMAND`: train in-process, run the bundled demo."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from shared.errors import UserError


def _cmd_train(args: argparse.Namespace) -> int:
    from shared.config import load_config
    from shared.train import run_training

    config = args.config or args.config_file
    if not config:
        raise UserError("train: give a config file: python -m daemon train --config my.yaml")
    cfg = load_config(config, args.set)
    result = run_training(cfg)
    print(f"LoRA written to {result.output_path}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from shared.demo import run_demo

    run_demo(Path(args.workdir))
    return 0


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

    from shared.autolabel.cli import add_label_command

    add_label_command(sub)
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
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
