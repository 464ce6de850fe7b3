"""`python -m daemon lora {info,resize,merge,extract,convert}`: the LoRA tools on the command line.

Each sub-command calls one function of shared.sd.lora_tools with a tqdm progress callback and prints
its one-line summary; errors are one line (the CLI's UserError handling). With `--daemon` it is queued as
a job of the running daemon instead (kind `lora_<tool>`, the same options), which checks every path
against its folders, runs it behind or between training jobs and keeps its result and log; the progress is
followed until it ends. That is for files the daemon's machine holds, or to keep a large merge from
competing with a training run for memory.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _bar(what: str):
    """A `progress(done, total, name)` callback drawing a tqdm bar on stderr."""
    state = {}

    def progress(done: int, total: int, name: str) -> None:
        from tqdm import tqdm

        bar = state.get("bar")
        if bar is None:
            bar = state["bar"] = tqdm(total=total, desc=what, unit="module", file=sys.stderr, dynamic_ncols=True,
                                      leave=False)
        bar.update(done - bar.n)
        if done >= total:
            bar.close()

    return progress


def _via_daemon(args, tool: str, options: dict) -> int:
    """Queue the tool as a daemon job with `options` (relative paths are relative to this folder) and follow it."""
    from daemon.remote import follow_job
    from shared.client import DaemonClient

    options = {k: str(v) if isinstance(v, Path) else v for k, v in options.items() if v is not None}
    with DaemonClient.connect(args.state_dir, port=args.port) as client:
        job = client.submit(options, kind=f"lora_{tool}", base_dir=Path.cwd().resolve(), source=f"lora {tool}",
                            priority=args.priority)
        print(f"submitted job {job['id']} ({job['name']})", file=sys.stderr, flush=True)
        code = follow_job(client, job["id"])
        if code == 0 and tool == "info":
            from shared.sd.lora_tools.info import info_text

            info = client.get(job["id"])["result"]["info"]
            print(json.dumps(info, indent=2) if args.json else info_text(info))
    return code


def _info(args) -> int:
    if args.daemon:
        return _via_daemon(args, "info", {"file": args.file})
    from shared.sd.lora_tools.info import info_text, lora_info

    info = lora_info(Path(args.file))
    print(json.dumps(info, indent=2, default=str) if args.json else info_text(info))
    return 0


def _resize(args) -> int:
    if args.daemon:
        return _via_daemon(args, "resize", {"file": args.file, "rank": args.rank, "energy": args.energy,
                                            "out_dir": args.out, "name": args.name})
    from shared.sd.lora_tools.resize import resize_lora

    result = resize_lora(Path(args.file), rank=args.rank, energy=args.energy, out_dir=args.out, name=args.name,
                         progress=_bar("resize"))
    if args.verbose:
        for key, (old, new, kept) in result.modules.items():
            print(f"{key}: rank {old} -> {new}, kept {kept:.2%}")
    print(result.summary())
    return 0


def _merge(args) -> int:
    if args.daemon:
        return _via_daemon(args, "merge", {"loras": args.loras, "base": args.base, "mode": args.mode,
                                           "rank": args.rank, "model_config": args.model_config, "out_dir": args.out,
                                           "name": args.name})
    from shared.sd.lora_tools.merge import merge_into_checkpoint, merge_loras, parse_weighted

    loras = parse_weighted(args.loras)
    if args.base:
        result = merge_into_checkpoint(Path(args.base), loras, out_dir=args.out, name=args.name,
                                       model_config=args.model_config, progress=_bar("merge"))
    else:
        result = merge_loras(loras, mode=args.mode, rank=args.rank, out_dir=args.out, name=args.name,
                             model_config=args.model_config, progress=_bar("merge"))
    print(result.summary())
    return 0


def _extract(args) -> int:
    if args.daemon:
        return _via_daemon(args, "extract", {"base": args.base, "tuned": args.tuned, "rank": args.rank,
                                             "conv_rank": args.conv_rank, "text_encoder": not args.unet_only,
                                             "min_diff": args.min_diff, "model_config": args.model_config,
                                             "out_dir": args.out, "name": args.name})
    from shared.sd.lora_tools.extract import extract_lora

    result = extract_lora(Path(args.base), Path(args.tuned), rank=args.rank, conv_rank=args.conv_rank,
                          text_encoder=not args.unet_only, min_diff=args.min_diff, out_dir=args.out, name=args.name,
                          model_config=args.model_config, progress=_bar("extract"))
    print(result.summary())
    return 0


def _convert(args) -> int:
    if args.daemon:
        return _via_daemon(args, "convert", {"file": args.file, "to": args.to, "arch": args.arch,
                                             "model_config": args.model_config, "out_dir": args.out,
                                             "name": args.name})
    from shared.sd.lora_tools.convert import convert_lora

    result = convert_lora(Path(args.file), to=args.to, out_dir=args.out, name=args.name, arch=args.arch,
                          model_config=args.model_config)
    print(result.summary())
    return 0


def _output_args(p) -> None:
    p.add_argument("--out", type=Path, help="folder to write into (default: beside the input); an existing file is "
                   "never replaced: a taken name gets _2, _3, ...")
    p.add_argument("--name", help="file name without .safetensors (default: from the input's name)")


def _model_config_arg(p) -> None:
    p.add_argument("--model-config", type=Path, help="a diffusers-format config folder for a model of non-standard "
                   "size (as the training key model_config)")


def _daemon_args() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    group = p.add_argument_group("as a daemon job")
    group.add_argument("--daemon", action="store_true", help="queue it as a job of the running daemon (paths must "
                       "lie in its allowed folders) and follow it, instead of running it here")
    group.add_argument("--state-dir", help="the daemon's state folder (token and port; default as for serve)")
    group.add_argument("--port", type=int, help="the daemon's port (default: from <state-dir>/daemon.json)")
    group.add_argument("--priority", type=int, default=0, help="higher runs first (default 0)")
    return p


def add_lora_command(sub) -> None:
    """Add `lora` and its sub-commands to the CLI's subparsers."""
    lora = sub.add_parser("lora", help="LoRA tools: info, resize, merge, extract, convert",
                          description="Inspect and transform LoRA files (kohya/LyCORIS layout as A1111, Forge and "
                          "ComfyUI load; diffusers layout for convert).")
    tools = lora.add_subparsers(dest="lora_command", metavar="TOOL", required=True)
    daemon = _daemon_args()

    p = tools.add_parser("info", parents=[daemon], help="type, rank, alpha, targets, base model and metadata of a LoRA file")
    p.add_argument("file")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=_info)

    p = tools.add_parser("resize", parents=[daemon], help="a LoRA to a lower rank by SVD (reports the kept energy)")
    p.add_argument("file")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--rank", type=int, help="the new rank of every module")
    how.add_argument("--energy", type=float, help="per module, the smallest rank keeping this fraction of the "
                     "energy (e.g. 0.9)")
    p.add_argument("--verbose", "-v", action="store_true", help="print every module's rank and kept energy")
    _output_args(p)
    p.set_defaults(func=_resize)

    p = tools.add_parser("merge", parents=[daemon], help="LoRAs into a base checkpoint (--base), or several LoRAs into one")
    p.add_argument("loras", nargs="+", metavar="LORA[:WEIGHT]", help="LoRA files, each with an optional weight "
                   "(default 1)")
    p.add_argument("--base", help="a base checkpoint (.safetensors/.ckpt): write it with the LoRAs merged in")
    p.add_argument("--mode", choices=("concat", "svd"), default="concat",
                   help="LoRAs into one: concat stacks the ranks (exact; LoRA/LoCon), svd factorises the sum to --rank")
    p.add_argument("--rank", type=int, help="the rank for --mode svd")
    _model_config_arg(p)
    _output_args(p)
    p.set_defaults(func=_merge)

    p = tools.add_parser("extract", parents=[daemon], help="a LoRA from a fine-tuned checkpoint and its base (SVD of the differences)")
    p.add_argument("--base", required=True, help="the base checkpoint")
    p.add_argument("--tuned", required=True, help="the fine-tuned checkpoint")
    p.add_argument("--rank", type=int, required=True, help="the LoRA rank")
    p.add_argument("--conv-rank", type=int, default=0, help="also extract the ResBlock convs at this rank (LoCon)")
    p.add_argument("--unet-only", action="store_true", help="leave the text encoders out")
    p.add_argument("--min-diff", type=float, default=1e-5,
                   help="skip modules whose weights differ by less than this (default 1e-5)")
    _model_config_arg(p)
    _output_args(p)
    p.set_defaults(func=_extract)

    p = tools.add_parser("convert", parents=[daemon], help="kohya <-> diffusers/PEFT naming")
    p.add_argument("file")
    p.add_argument("--to", required=True, choices=("diffusers", "kohya"))
    p.add_argument("--arch", choices=("sd1", "sd2", "sdxl"), help="the model family when the file does not say")
    _model_config_arg(p)
    _output_args(p)
    p.set_defaults(func=_convert)


def main(argv: list[str] | None = None) -> int:  # for `python -m daemon.lora_cli` while debugging
    parser = argparse.ArgumentParser(prog="lora")
    add_lora_command(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["lora", *(argv or sys.argv[1:])])
    return args.func(args)
