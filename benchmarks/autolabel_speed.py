"""How fast `label_folder` captions images: the tiny test model and a ViT-B-32-sized model.

Both models have random weights (nothing is downloaded), which does not change the speed: the same
layers run. Two numbers per model: the one-off cost of encoding the built-in vocabulary (once per
run, remembered while the model stays loaded), and images/second for the rest of a run: reading and
preprocessing every image, encoding, ranking, composing captions and writing metadata.csv.

    python benchmarks/autolabel_speed.py [--images 48] [--device cpu] [--batch-size 16] [--threads N]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def build(name: str, folder: Path, device: str):
    from shared.autolabel.clip_model import ClipModel
    from shared.fixtures.tiny_clip import create_random, write_tiny_config

    config = write_tiny_config(folder) if name == "tiny" else "ViT-B-32"
    model, preprocess, tokenizer = create_random(config)
    return ClipModel(model.to(device), preprocess, tokenizer, device, f"{name} (random weights)")


def measure(name: str, images: Path, work: Path, device: str, batch_size: int) -> None:
    from shared.autolabel import label_folder
    from shared.reporting import Reporter

    class Quiet(Reporter):
        def log(self, message: str) -> None:
            pass

    started = time.perf_counter()
    clip = build(name, work, device)
    loaded = time.perf_counter() - started
    count = sum(1 for _ in images.glob("*.png"))
    from shared.autolabel.vocab import load_vocabulary

    started = time.perf_counter()
    clip.encode_texts(load_vocabulary().prompts())
    vocab_s = time.perf_counter() - started
    label_folder(images, work / "warmup.csv", clip=clip, batch_size=batch_size, reporter=Quiet())  # warm-up
    started = time.perf_counter()
    result = label_folder(images, work / f"{name}.csv", clip=clip, batch_size=batch_size, reporter=Quiet())
    took = time.perf_counter() - started
    assert len(result.captions) == count
    print(f"{name:>9}: {count / took:8.1f} images/s  ({count} images in {took:.2f} s on {device}, batch "
          f"{batch_size}); vocabulary encoded once in {vocab_s:.2f} s; model built in {loaded:.1f} s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--size", type=int, default=256, help="image side in pixels")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--models", default="tiny,vit-b-32")
    args = parser.parse_args()

    import torch

    from shared.fixtures.images import make_image_folder

    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        images = make_image_folder(tmp / "images", count=args.images, size=(args.size, args.size), captions="none")
        for name in args.models.split(","):
            work = tmp / name
            work.mkdir()
            measure(name, images, work, args.device, args.batch_size)


if __name__ == "__main__":
    main()
