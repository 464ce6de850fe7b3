"""The `label` subcommand of `python -m daemon`: its arguments and its handler."""

from __future__ import annotations

import argparse
import sys

from shared.reporting import Reporter


class _TqdmReporter(Reporter):
    """Log lines on stdout, a progress bar on stderr."""

    def __init__(self):
        self._bar = None

    def log(self, message: str) -> None:
        if self._bar is not None:
            self._bar.write(message)
        else:
            print(message, flush=True)

    def event(self, kind: str, **data) -> None:
        from tqdm import tqdm

        if kind == "label_started":
            self._bar = tqdm(total=data["total"], desc="labelling", unit="img", file=sys.stderr, dynamic_ncols=True)
        elif kind == "label_progress" and self._bar is not None:
            self._bar.update(data["done"] - self._bar.n)
            if data["done"] >= data["total"]:
                self._bar.close()
                self._bar = None


def run_label(args: argparse.Namespace) -> int:
    from shared.autolabel.labeller import label_folder

    result = label_folder(
        args.input, args.output, args.format,
        model=args.model, pretrained=args.pretrained, weights=args.weights,
        vocab_file=args.vocab, builtin_vocab=not args.no_builtin_vocab, trigger=args.trigger,
        top_k=args.top_k, threshold=args.threshold, batch_size=args.batch_size, device=args.device,
        overwrite=args.overwrite, reporter=_TqdmReporter(),
    )
    for line in result.unreadable_lines():
        print(line)
    print(result.summary())
    return 0


def add_label_command(sub) -> None:
    """Add `label` to the CLI's subparsers."""
    from shared.autolabel.clip_model import DEFAULT_MODEL

    p = sub.add_parser(
        "label", help="caption a folder of images with CLIP (metadata.csv or .txt files)",
        description="Caption the images in a folder with an open_clip model on this machine. Existing captions "
        "are kept unless --overwrite (which keeps a backup). Nothing is downloaded.",
    )
    p.add_argument("--input", "-i", required=True, help="the folder of images")
    p.add_argument("--output", "-o", help="metadata.csv to write or merge into (default: INPUT/metadata.csv); "
                   "with --format txt, the folder for the .txt files (default: INPUT)")
    p.add_argument("--format", choices=("csv", "txt"), default="csv", help="metadata.csv (default) or .txt sidecars")
    p.add_argument("--trigger", help="a trigger word put first in every caption")
    p.add_argument("--vocab", help="your own phrases: .txt (one a line, [category] lines) or .json")
    p.add_argument("--no-builtin-vocab", action="store_true", help="use only the phrases of --vocab")
    p.add_argument("--top-k", type=int, default=2, help="at most this many phrases per category (default 2)")
    p.add_argument("--threshold", type=float, default=0.1,
                   help="keep a phrase if CLIP gives it at least this probability within its category (default 0.1)")
    p.add_argument("--batch-size", type=int, default=16, help="images per batch (default 16)")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N or mps")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"open_clip architecture (default {DEFAULT_MODEL}) or a model config .json")
    p.add_argument("--pretrained", help="a pretrained tag already in the local cache (e.g. laion2b_s34b_b79k), or a "
                   "checkpoint path")
    p.add_argument("--weights", help="an open_clip checkpoint file (.safetensors/.bin/.pt) or a folder with "
                   "open_clip_config.json")
    p.add_argument("--overwrite", action="store_true", help="replace existing captions (the old ones are backed up)")
    p.set_defaults(func=run_label)
